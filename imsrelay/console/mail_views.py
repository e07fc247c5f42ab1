"""Mail and message tracking across the organisation, from the sites' message API.

Each site's admin endpoint answers ``/api/v1`` for its own mailboxes and tracking
events; the console joins them: mailboxes and messages of every site (newest
first, paginated), and a message's story across sites (``imsrelay.observe.tracking.follow``
over the events of every site, Message-IDs followed from site to site, as the lab
endpoint does in one process).
"""

from __future__ import annotations

from typing import Any

from imsrelay.console.backend import Organisation, Reply
from imsrelay.observe import tracking

MAX_SITE_LIMIT = 1000  # the message API's largest page
MAX_ROUNDS = 6


async def mailboxes(org: Organisation, site: str | None) -> dict[str, Any]:
    if site:
        reply = await org.call(site, "GET", "/api/v1/mailboxes")
        replies = {site: reply}
    else:
        replies = await org.each("GET", "/api/v1/mailboxes")
    boxes = [b for r in replies.values() if r.ok for b in r.body.get("mailboxes", [])]
    return {"mailboxes": boxes, "errors": _errors(replies)}


def _errors(replies: dict[str, Reply]) -> dict[str, str]:
    """Sites that did not answer, and the servers of a site of several servers that did
    not (``SiteA/Server1``: its site answered for the others)."""
    errors = {s: r.error for s, r in replies.items() if not r.ok}
    for site, r in replies.items():
        servers = r.body.get("servers") if r.ok and isinstance(r.body, dict) else None
        for name, state in (servers.items() if isinstance(servers, dict) else ()):
            if isinstance(state, dict) and not state.get("ok"):
                errors[f"{site}/{name}"] = str(state.get("error"))
    return errors


async def messages(org: Organisation, *, site: str | None, mailbox: str | None, query: str | None,
                   start: int, limit: int) -> tuple[int, dict[str, Any]]:
    """A page of messages, newest first: one site's straight from its API; the whole
    organisation's by merging each site's first ``start + limit`` (at most 1000)."""
    params = {k: v for k, v in (("mailbox", mailbox), ("query", query)) if v}
    if site:
        reply = await org.call(site, "GET", "/api/v1/messages",
                               params={**params, "start": str(start), "limit": str(limit)})
        if not reply.ok:
            return reply.status, {"error": reply.error}
        return 200, reply.body
    want = min(start + limit, MAX_SITE_LIMIT)
    if start >= MAX_SITE_LIMIT:
        want = 1
    replies = await org.each("GET", "/api/v1/messages", params={**params, "start": "0", "limit": str(want)})
    bad = [r for r in replies.values() if r.status == 400]
    if bad:
        return 400, {"error": bad[0].error}
    merged = [m for r in replies.values() if r.ok for m in r.body.get("messages", [])]
    merged.sort(key=lambda m: (m.get("received") or 0, m.get("id") or ""), reverse=True)
    total = sum(int(r.body.get("total", 0)) for r in replies.values() if r.ok)
    chunk = merged[start:start + limit]
    return 200, {"total": total, "start": start, "count": len(chunk), "messages": chunk,
                 "partial": start + limit > MAX_SITE_LIMIT,
                 "errors": _errors(replies)}


def tracking_queries(q: str) -> list[dict[str, str]]:
    """What a console user typed → the tracking searches to run (pure): a Message-ID
    (``<...>``), an address (as recipient, as sender, and as a bare Message-ID), or a
    queue id."""
    q = q.strip()
    if not q:
        return []
    if q.startswith("<"):
        return [{"message_id": q}]
    if "@" in q:
        return [{"recipient": q}, {"sender": q}, {"message_id": f"<{q}>"}]
    if q.isalnum():
        return [{"queue_id": q}]
    return [{"message_id": f"<{q}>"}]


async def track(org: Organisation, q: str) -> dict[str, Any]:
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    errors: dict[str, str] = {}

    async def ask(params: dict[str, str]) -> None:
        replies = await org.each("GET", "/api/v1/tracking", params={**params, "limit": "200"})
        errors.update({k: v for k, v in _errors(replies).items() if replies.get(k) is None
                       or replies[k].status != 400})
        for reply in replies.values():
            if not reply.ok:
                continue
            for e in reply.body.get("events", []):
                seen.setdefault((e["site"], e.get("server"), e["queue_id"], e["time"], e["event"], e.get("recipient")), e)

    for params in tracking_queries(q):
        await ask(params)
    asked: set[str] = set()
    for _ in range(MAX_ROUNDS):
        ids = {e["message_id"] for e in seen.values() if e.get("message_id")} - asked
        if not ids:
            break
        for mid in sorted(ids)[:100]:
            asked.add(mid)
            await ask({"message_id": mid})
    events = [tracking.TrackingEvent.from_dict(e) for e in seen.values()]
    addresses = await _site_addresses(org)
    stories = []
    for story in tracking.follow(events):
        d = story.as_dict()
        for hop, h in zip(story.hops, d["hops"], strict=True):
            for e, ed in zip(hop.events, h["events"], strict=True):
                ed["description"] = tracking.describe_event(e)
            h["client_site"] = addresses.get((h.get("client") or "").rsplit(":", 1)[0].strip("[]"))
        delivered = {(e.recipient or "").lower(): e.detail.get("mailbox") for hop in story.hops for e in hop.events
                     if e.event == tracking.DELIVERED}
        for r in d["recipients"]:
            r["mailbox"] = delivered.get(r["recipient"].lower()) if r["state"] == "delivered" else None
        stories.append(d)
    return {"query": q, "messages": stories, "errors": errors}


async def _site_addresses(org: Organisation) -> dict[str, str]:
    """SMTP listen address → site name, to name the client of a hop when it is a site."""
    replies = await org.each("GET", "/status")
    return {r.body["smtp"]["listen"]: s for s, r in replies.items() if r.ok and isinstance(r.body, dict)}
