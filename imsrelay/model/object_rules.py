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

ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_TEXT = 256
MAX_PROXIES = 64


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


def object_problem(obj: Any, *, receiving_site: str) -> str | None:
    """Why ``obj`` (a DirObject from a peer) must not be merged, or None."""
    home = obj.home_site
    if not isinstance(home, str) or not SITE_NAME.fullmatch(home):
        return f"bad home site {home!r}"
    if obj.stamp.origin != home:
        return f"{obj.object_id} was changed by {obj.stamp.origin!r}, not its home site {home}"
    data = obj.data
    if obj.kind == "mailbox":
        alias = data.get("alias")
        if not safe_alias(alias):
            return f"bad alias {alias!r}"
        if obj.object_id != f"mailbox:{home}:{alias.lower()}":
            return f"object id {obj.object_id!r} does not match mailbox {alias} at {home}"
        display = data.get("display_name", alias)
        if not isinstance(display, str) or len(display) > MAX_TEXT or re.search(r"[\x00-\x1f\x7f]", display):
            return f"bad display name for {alias}"
        proxies = data.get("proxy_addresses", [])
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
        return protocols_problem(data.get("protocols"))
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
