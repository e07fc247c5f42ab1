"""Organisation-wide views the console builds from the sites' answers (pure)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def recipients(directories: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every mailbox, custom recipient (KB Q258203) and distribution list (KB Q185194) of
    the organisation once: its home site's copy (proxy addresses, primary first), at
    which sites it is known, and where a copy differs from home's.  ``kind``: mailbox,
    custom (with its ``target``) or dl (``members``, ``owner``, ``expansion_site``)."""
    copies: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for site, snapshot in directories.items():
        for kind, key_name in (("mailbox", "mailboxes"), ("custom", "custom_recipients"),
                               ("dl", "distribution_lists")):
            for m in snapshot.get(key_name, []):
                key = (str(m["home_site"]), kind, str(m["alias"]).lower())
                copies.setdefault(key, {})[site] = m
    rows = []
    order = {"mailbox": 0, "custom": 1, "dl": 2}
    for (home, kind, _), by_site in sorted(copies.items(),
                                           key=lambda kv: (kv[0][0].lower(), order[kv[0][1]], kv[0][2])):
        own = by_site.get(home) or next(iter(by_site.values()))
        addresses = _ordered(own)
        stale = sorted(s for s, m in by_site.items() if _ordered(m) != addresses or _details(m) != _details(own))
        rows.append({"alias": own["alias"], "display_name": own.get("display_name") or own["alias"],
                     "kind": kind, **_details(own),
                     "home_site": home, "primary_address": own.get("primary_address"),
                     "proxy_addresses": addresses, "known_at": sorted(by_site),
                     "protocols": dict(own.get("protocols") or {}),
                     "home_copy": home in by_site, "differs_at": stale})
    return rows


def _details(m: dict[str, Any]) -> dict[str, Any]:
    """What a custom recipient or list adds to a row (nothing for a mailbox)."""
    return {k: m[k] for k in ("target", "members", "owner", "expansion_site") if k in m}


def _ordered(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Proxy addresses, the primary SMTP address first (``SMTP:`` upper case = primary)."""
    result: list[dict[str, Any]] = []
    for p in m.get("proxy_addresses", []):
        kind, _, address = str(p).partition(":")
        result.append({"type": kind.upper(), "address": address, "primary": kind.isupper() and kind == "SMTP"})
    result.sort(key=lambda a: (not a["primary"], a["type"], a["address"].lower()))
    return result


def signature(value: Any) -> str:
    """A short digest of a JSON value: what the live feed compares between polls."""
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_topics(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def queue_signature(queue: dict[str, Any]) -> list[Any]:
    return [(m["queue_id"], [(r["address"], r["state"], r["attempts"]) for r in m["recipients"]])
            for m in queue.get("messages", [])]


def replication_signature(status: dict[str, Any]) -> list[Any]:
    return [(p["site"], p["high_water"], p["last_request"], p["last_reply"], p["last_error"], p["backlog"],
             p["applied"]) for p in status.get("peers", [])] + [status.get("highest_usn")]


def link_monitor_signature(body: dict[str, Any]) -> list[Any]:
    """What changes the Link Monitors page: each target's state and its answers."""
    return [(m["name"], t["target"], t["state"], t["answers"], t["problem"])
            for m in body.get("monitors", []) for t in m["targets"]]
