"""Rules every replicated directory object must satisfy before it is merged (pure).

A peer's update is authenticated as a whole, but what it says about each object is
checked like a local change (``Directory.add_mailbox``): the object id matches its
kind, home site and alias; aliases are what ``add_mailbox`` accepts (so a Maildir
path can never leave the data directory); every proxy address parses; the stamp's
origin is the home site.  And no peer may change an object homed at the receiving
site: only that site speaks for its own objects (``Replicator._apply`` drops the
copies of its own objects that peers send back, and refuses any that would change it)."""

from __future__ import annotations

import re
from typing import Any

from imsrelay.model.addresses import AddressError, parse_address, parse_proxy
from imsrelay.model.objects import RECIPIENT_KINDS

ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_TEXT = 256
MAX_PROXIES = 64
MAX_MEMBERS = 5000


def safe_alias(alias: Any) -> bool:
    return isinstance(alias, str) and bool(ALIAS.fullmatch(alias)) and ".." not in alias


def protocols_problem(data: Any) -> str | None:
    """Why a ``protocols`` value (Protocols tab settings) is malformed, or None."""
    if data is None:
        return None
    if not isinstance(data, dict) or any(k not in ("imap4", "pop3") or not isinstance(v, bool)
                                         for k, v in data.items()):
        return f"bad protocol settings {data!r} (imap4/pop3: true or false)"
    return None


def recipient_object_id(kind: str, home_site: str, alias: str) -> str:
    """The object id of a mailbox, custom recipient or list: ``kind:home:alias``."""
    return f"{kind}:{home_site}:{alias.lower()}"


def address_problem(what: str, value: Any) -> str | None:
    """Why ``value`` is not one SMTP address, or None."""
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        return f"bad {what} {value!r}"
    try:
        parse_address(value)
    except AddressError as exc:
        return f"bad {what} {value!r}: {exc}"
    return None


def proxies_problem(alias: str, proxies: Any) -> str | None:
    """Why a list of proxy addresses is malformed, or None."""
    if not isinstance(proxies, list) or len(proxies) > MAX_PROXIES:
        return f"bad proxy addresses for {alias}"
    for p in proxies:
        if not isinstance(p, str) or len(p) > MAX_TEXT:
            return f"bad proxy address {p!r}"
        try:
            proxy = parse_proxy(p)
            if proxy.type == "SMTP":
                parse_address(proxy.address)
        except AddressError as exc:
            return f"bad proxy address {p!r}: {exc}"
    return None


def list_problem(data: dict[str, Any]) -> str | None:
    """Why a distribution list's members, owner or expansion site are malformed, or None."""
    members = data.get("members", [])
    if not isinstance(members, list) or len(members) > MAX_MEMBERS:
        return f"bad members (a list of at most {MAX_MEMBERS} addresses)"
    for member in members:
        problem = address_problem("member", member)
        if problem:
            return problem
    owner = data.get("owner", "")
    if owner != "" and (problem := address_problem("owner", owner)):
        return problem
    site = data.get("expansion_site", "")
    if site != "" and not (isinstance(site, str) and SITE_NAME.fullmatch(site)):
        return f"bad expansion site {site!r}"
    return None


def object_problem(obj: Any, *, receiving_site: str) -> str | None:
    """Why ``obj`` (a DirObject from a peer) must not be merged, or None."""
    home = obj.home_site
    if not isinstance(home, str) or not SITE_NAME.fullmatch(home):
        return f"bad home site {home!r}"
    if obj.stamp.origin != home:
        return f"{obj.object_id} was changed by {obj.stamp.origin!r}, not its home site {home}"
    data = obj.data
    if obj.kind in RECIPIENT_KINDS:
        alias = data.get("alias")
        if not safe_alias(alias):
            return f"bad alias {alias!r}"
        if obj.object_id != recipient_object_id(obj.kind, home, alias):
            return f"object id {obj.object_id!r} does not match {obj.kind} {alias} at {home}"
        display = data.get("display_name", alias)
        if not isinstance(display, str) or len(display) > MAX_TEXT or re.search(r"[\x00-\x1f\x7f]", display):
            return f"bad display name for {alias}"
        problem = proxies_problem(alias, data.get("proxy_addresses", []))
        if problem is None and obj.kind == "custom":
            problem = address_problem("target", data.get("target"))
        if problem is None and obj.kind == "dl":
            problem = list_problem(data)
        return problem or protocols_problem(data.get("protocols"))
    if obj.kind == "site":
        if obj.object_id != f"site:{home}" or data.get("name") != home:
            return f"site object {obj.object_id!r} does not describe its home site {home}"
        for key in ("smtp_address", "routing_address"):
            value = data.get(key, "")
            if value == "" and key == "routing_address":
                continue
            if not isinstance(value, str) or not value.startswith("@"):
                return f"bad {key} {value!r}"
            try:
                parse_address("x" + value)
            except AddressError as exc:
                return f"bad {key} {value!r}: {exc}"
        for key in ("server", "organisation", "hostname"):
            value = data.get(key, "")
            if not isinstance(value, str) or len(value) > MAX_TEXT or re.search(r"[\x00-\x20\x7f/]", value):
                return f"bad {key} {value!r}"
        return protocols_problem(data.get("protocols"))
    return f"unknown object kind {obj.kind!r}"
