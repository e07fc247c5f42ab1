"""The message API (``/api/v1``): mailboxes, messages, search, wait, tracking.

Served by each site's admin endpoint for that site, and by the embedded lab's
endpoint for every site of the lab and its Internet host (``LabEndpoint``).  The
handlers only know a list of *sites*, objects with ``config.site``,
``message_store``, ``tracking``, ``qmgr``, ``replicator``, ``readiness``,
``bound_port`` — a running ``Site``.  Maildir and SQLite work runs in threads;
raw messages are streamed from their files.

The OpenAPI 3 description is ``imsrelay.admin.openapi.DOCUMENT`` (``/api/v1/openapi.json``).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from imsrelay.access.service import MailboxAccess
from imsrelay.admin.message_store import (
    NotFound,
    Search,
    SearchError,
    Summary,
    parse_search,
    parse_time,
)
from imsrelay.admin.openapi import document
from imsrelay.ingress.backlog import accept_backlog
from imsrelay.model.envelope import DEFERRED, QUEUED, queue_state
from imsrelay.observe import tracking
from imsrelay.observe.readiness import combined
from imsrelay.queue.manager import held_text

# seconds a stopping endpoint lets requests under way finish: a long poll (/api/v1/wait,
# up to its timeout) must not hold a site's stop past what `docker stop` allows
SHUTDOWN_TIMEOUT = 2.0

PREFIX = "/api/v1"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
MAX_WAIT = 300.0  # seconds: the longest long-poll the server holds
WAIT_POLL = 0.2
OPEN_PATHS = frozenset({"/health", "/ready", f"{PREFIX}/openapi.json"})  # no token needed

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SitesProvider = Callable[[], Sequence[Any]]


class BadRequest(Exception):
    """A query the API cannot answer: 400 with the message."""


class Missing(Exception):
    """No such site or message here: 404 with the message."""


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# ------------------------------------------------------------------ query parameters (pure)


def int_param(query: Any, name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, not {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise BadRequest(f"{name} must be between {minimum} and {maximum}" if maximum is not None
                         else f"{name} must be at least {minimum}")
    return value


def float_param(query: Any, name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number of seconds, not {raw!r}") from None
    if not value >= minimum or value != value or value == float("inf"):
        raise BadRequest(f"{name} must be a number of seconds, at least {minimum}")
    return value


def search_param(query: Any, name: str = "query") -> Search:
    try:
        return parse_search(query.get(name, ""))
    except SearchError as exc:
        raise BadRequest(str(exc)) from None


def tracking_query(query: Any) -> tracking.TrackingQuery:
    def time_of(name: str) -> float | None:
        raw = query.get(name)
        if not raw:
            return None
        try:
            return parse_time(raw)
        except SearchError as exc:
            raise BadRequest(f"{name}: {exc}") from None

    known = {"message_id", "queue_id", "sender", "recipient", "since", "until", "limit"}
    unknown = sorted(set(query.keys()) - known)
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return tracking.TrackingQuery(
        message_id=query.get("message_id") or None, queue_id=query.get("queue_id") or None,
        sender=query.get("sender"), recipient=query.get("recipient") or None,
        since=time_of("since"), until=time_of("until"),
        limit=int_param(query, "limit", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT))


def page(items: list[Summary], start: int, limit: int) -> dict[str, Any]:
    chunk = items[start:start + limit]
    return {"total": len(items), "start": start, "count": len(chunk), "messages": [s.as_dict() for s in chunk]}


# ------------------------------------------------------------------ the API


class MessageApi:
    def __init__(self, sites: SitesProvider, *, lab_ready: Callable[[], str | None] | None = None) -> None:
        self._sites = sites
        self._lab_ready = lab_ready

    def add_routes(self, router: web.UrlDispatcher, *, health: bool = True) -> None:
        if health:
            router.add_get("/health", self.get_health)
            router.add_get("/ready", self.get_ready)
        p = PREFIX
        router.add_get(f"{p}/openapi.json", self.get_openapi)
        router.add_get(f"{p}/sites", self.get_sites)
        router.add_get(f"{p}/sites/{{site}}/queue", self.get_queue)
        router.add_get(f"{p}/sites/{{site}}/replication", self.get_replication)
        router.add_get(f"{p}/mailboxes", self.get_mailboxes)
        router.add_get(f"{p}/messages", self.get_messages)
        router.add_get(f"{p}/search", self.get_search)
        router.add_delete(f"{p}/search", self.delete_search)
        router.add_get(f"{p}/wait", self.get_wait)
        router.add_get(f"{p}/messages/{{id}}", self.get_message)
        router.add_patch(f"{p}/messages/{{id}}", self.patch_message)
        router.add_delete(f"{p}/messages/{{id}}", self.delete_message)
        router.add_get(f"{p}/messages/{{id}}/raw", self.get_raw)
        router.add_get(f"{p}/tracking", self.get_tracking)

    @property
    def sites(self) -> list[Any]:
        return list(self._sites())

    def _site(self, name: str) -> Any:
        for s in self.sites:
            if s.config.site.lower() == name.lower():
                return s
        raise Missing(f"no site {name!r} here (sites: {', '.join(s.config.site for s in self.sites) or 'none'})")

    def _store_for(self, message_id: str) -> Any:
        site = message_id.split(":", 1)[0]
        for s in self.sites:
            if s.config.site == site:
                return s.message_store
        raise Missing(f"no message {message_id!r}")

    # -------------------------------------------------------------- health

    async def get_health(self, request: web.Request) -> web.Response:
        return web.json_response({"alive": True, "sites": [s.config.site for s in self.sites]})

    def readiness(self) -> dict[str, Any]:
        reports = {s.config.site: s.readiness.report() for s in self.sites}
        body = combined(reports).as_dict() if len(reports) != 1 else next(iter(reports.values())).as_dict()
        if self._lab_ready is not None:
            why = self._lab_ready()
            if why is not None:
                body["ready"] = False
                body["reasons"] = [f"lab: {why}", *_strings(body["reasons"])]
        if not reports:
            body["ready"] = False
            body["reasons"] = ["no site is running yet", *_strings(body["reasons"])]
        return body

    async def get_ready(self, request: web.Request) -> web.Response:
        body = self.readiness()
        return web.json_response(body, status=200 if body["ready"] else 503)

    async def get_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(document())

    # -------------------------------------------------------------- sites, queue, replication

    async def get_sites(self, request: web.Request) -> web.Response:
        out = []
        for s in self.sites:
            cfg = s.config
            out.append({"site": cfg.site, "organisation": cfg.organisation, "hostname": cfg.hostname,
                        "smtp": {"host": cfg.smtp.listen, "port": s.bound_port},
                        "admin": ({"host": s.admin.bound[0], "port": s.admin.bound[1]}
                                  if getattr(s, "admin", None) is not None and s.admin.bound else None),
                        "access": access_info(getattr(s, "access", None)),
                        "data_dir": str(cfg.data_dir),
                        "ready": s.readiness.report().ready,
                        "queue": {"messages": s.qmgr.backlog},
                        "replication": s.replicator is not None})
        return web.json_response({"sites": out})

    async def get_queue(self, request: web.Request) -> web.Response:
        s = self._site(request.match_info["site"])
        return web.json_response({"site": s.config.site, "messages": queue_items(s.qmgr)})

    async def get_replication(self, request: web.Request) -> web.Response:
        s = self._site(request.match_info["site"])
        if s.replicator is None:
            return web.json_response({"site": s.config.site, "enabled": False, "peers": {}})
        return web.json_response({"site": s.config.site, "enabled": True, "status": await s.replicator.status()})

    # -------------------------------------------------------------- messages

    async def _search(self, q: Search) -> list[Summary]:
        def run() -> list[Summary]:
            found = [m for s in self.sites for m in s.message_store.search(q)]
            found.sort(key=lambda m: (m.received, m.id), reverse=True)
            return found
        return await asyncio.to_thread(run)

    async def get_mailboxes(self, request: web.Request) -> web.Response:
        site = request.query.get("site")
        sites = [self._site(site)] if site else self.sites
        boxes = await asyncio.to_thread(lambda: [b for s in sites for b in s.message_store.mailboxes()])
        return web.json_response({"mailboxes": boxes})

    async def get_messages(self, request: web.Request) -> web.Response:
        q = request.query
        start = int_param(q, "start", 0)
        limit = int_param(q, "limit", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT)
        parts = [q.get("query", "")]
        if q.get("site"):
            self._site(q["site"])
            parts.append(_term("site", q["site"]))
        if q.get("mailbox"):
            parts.append(_term("mailbox", q["mailbox"]))
        search = search_param({"query": " ".join(p for p in parts if p)})
        return web.json_response(page(await self._search(search), start, limit))

    async def get_search(self, request: web.Request) -> web.Response:
        q = request.query
        search = search_param(q)
        if search.empty:
            raise BadRequest("query is required (e.g. query=from:alice subject:hello)")
        start = int_param(q, "start", 0)
        limit = int_param(q, "limit", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT)
        return web.json_response(page(await self._search(search), start, limit))

    async def delete_search(self, request: web.Request) -> web.Response:
        q = request.query
        search = search_param(q)
        if search.empty:  # "", '""', "''": nothing left after parsing would match (and delete) everything
            raise BadRequest("query is required: DELETE /api/v1/search?query=... deletes what it finds "
                             "(query=site:SiteA deletes a whole site's mail)")
        found = await self._search(search)

        def delete() -> int:
            return sum(1 for m in found if self._store_for(m.id).delete(m.id))
        return web.json_response({"deleted": await asyncio.to_thread(delete)})

    async def get_wait(self, request: web.Request) -> web.Response:
        q = request.query
        search = search_param(q)
        timeout = min(float_param(q, "timeout", 30.0), MAX_WAIT)
        deadline = time.monotonic() + timeout
        while True:
            found = await self._search(search)
            if found:
                return web.json_response(page(found, 0, int_param(q, "limit", DEFAULT_LIMIT, minimum=1,
                                                                  maximum=MAX_LIMIT)))
            left = deadline - time.monotonic()
            if left <= 0:
                return json_error(408, f"no message matching {q.get('query', '')!r} arrived within {timeout:g}s")
            await asyncio.sleep(min(WAIT_POLL, left))

    async def get_message(self, request: web.Request) -> web.Response:
        mid = request.match_info["id"]
        store = self._store_for(mid)
        try:
            return web.json_response(await asyncio.to_thread(store.detail, mid))
        except (NotFound, FileNotFoundError):
            return json_error(404, f"no message {mid}")

    async def patch_message(self, request: web.Request) -> web.Response:
        mid = request.match_info["id"]
        store = self._store_for(mid)
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("the request body must be a JSON object like {\"read\": true}") from None
        if not isinstance(body, dict) or not isinstance(body.get("read"), bool):
            raise BadRequest("the request body must be a JSON object like {\"read\": true}")
        try:
            summary = await asyncio.to_thread(store.set_read, mid, body["read"])
        except (NotFound, FileNotFoundError):
            return json_error(404, f"no message {mid}")
        return web.json_response(summary.as_dict())

    async def delete_message(self, request: web.Request) -> web.Response:
        mid = request.match_info["id"]
        store = self._store_for(mid)
        if not await asyncio.to_thread(store.delete, mid):
            return json_error(404, f"no message {mid}")
        return web.json_response({"deleted": 1, "id": mid})

    async def get_raw(self, request: web.Request) -> web.StreamResponse:
        mid = request.match_info["id"]
        store = self._store_for(mid)
        try:
            summary = await asyncio.to_thread(store.find, mid)
        except NotFound:
            return json_error(404, f"no message {mid}")
        name = mid.rsplit(":", 1)[-1].replace('"', "")
        return web.FileResponse(Path(summary.path), headers={
            "Content-Type": "message/rfc822", "Content-Disposition": f'attachment; filename="{name}.eml"'})

    # -------------------------------------------------------------- tracking

    async def get_tracking(self, request: web.Request) -> web.Response:
        q = tracking_query(request.query)
        sites = self.sites

        def fetch(query: tracking.TrackingQuery) -> list[tracking.TrackingEvent]:
            return [e for s in sites for e in s.tracking.query_sync(query)]

        events = await asyncio.to_thread(tracking.gather, fetch, q)
        return web.json_response(tracking.tracking_body(events))


def queue_items(qmgr: Any) -> list[dict[str, Any]]:
    """A site's queued messages and their recipients' states (also ``GET /queue``)."""
    return envelope_items(qmgr.envelopes.values(), held=qmgr.held_recipients)


def envelope_items(envelopes: Iterable[Any],
                   held: Callable[[str], dict[str, str]] = lambda queue_id: {}) -> list[dict[str, Any]]:
    """Queued messages (of one or several workers) and their recipients' states;
    ``held``: why a recipient waits in this process (Transfer mode, ETRN), by queue id."""
    return [{"queue_id": env.queue_id, "sender": env.sender, "origin": env.origin,
             "received_at": env.received_at, "size": env.size,
             "priority": env.extra.get("priority", "normal"),  # Time-outs by priority
             "recipients": [_recipient_item(r, held(env.queue_id).get(r.address)) for r in env.recipients]}
            for env in sorted(envelopes, key=lambda e: e.queue_id)]


def _recipient_item(r: Any, held: str | None) -> dict[str, Any]:
    """One recipient in the queue: ``state`` one of ``QUEUE_STATES`` (queued, deferred,
    held, delivered, bounced, failed), as the CLI names it; a held one has no next attempt."""
    state = queue_state(r.state, r.attempts, held=held is not None)
    return {"address": r.address, "state": state, "attempts": r.attempts,
            "next_attempt": r.next_attempt if state in (QUEUED, DEFERRED) else None, "status": r.status,
            "diagnostic": r.diagnostic, "held": held_text(held) if held else None}  # Transfer mode, ETRN


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _term(key: str, value: str) -> str:
    return f'{key}:"{value}"' if not any(c in value for c in "\"\\") else f"{key}:{value}"


# ------------------------------------------------------------------ middleware


def auth_middleware(token: bytes, log: Any, *, open_paths: frozenset[str] = OPEN_PATHS) -> Any:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_paths:
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            log.warning("admin.unauthorized", peer=request.remote, method=request.method, path=request.path)
            return web.json_response({"error": "a valid admin token is required (Authorization: Bearer ...)"},
                                     status=401, headers={"WWW-Authenticate": 'Bearer realm="imsrelay"'})
        return await handler(request)
    return auth


def errors_middleware(log: Any) -> Any:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400 and not (exc.content_type or "").endswith("json"):
                return json_error(exc.status, exc.reason)
            raise
        except BadRequest as exc:
            return json_error(400, str(exc))
        except Missing as exc:
            return json_error(404, str(exc))
        except Exception as exc:
            log.error("admin.internal_error", method=request.method, path=request.path, error=repr(exc),
                      exc_info=exc)
            return json_error(500, f"internal error: {exc!r}")
    return errors


def access_info(access: MailboxAccess | None) -> dict[str, Any] | None:
    """Where a site's IMAP4 and POP3 listen (imsrelay.access), why not, or None (off)."""
    if access is None:
        return None
    endpoints = access.endpoints
    if endpoints is None:
        return {"unavailable": access.problem}
    return {"host": endpoints.host, **endpoints.ports}


class LabEndpoint:
    """The embedded lab's one endpoint for every host (``127.10.10.1:8025``)."""

    def __init__(self, sites: SitesProvider, *, host: str, port: int, token: str, log: Any,
                 lab_ready: Callable[[], str | None]) -> None:
        self.host, self.port = host, port
        self.log = log
        self.api = MessageApi(sites, lab_ready=lab_ready)
        self.app = web.Application(middlewares=[errors_middleware(log), auth_middleware(token.encode(), log)])
        self.api.add_routes(self.app.router)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True,
                          backlog=accept_backlog()).start()
        addresses = self._runner.addresses
        if addresses:
            self.port = addresses[0][1]
        self.log.info("lab.api_started", listen=self.host, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
