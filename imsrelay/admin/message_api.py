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
import dataclasses
import hmac
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from imsrelay.access.service import MailboxAccess
from imsrelay.admin.federation import Scope, ServerAnswer, SiteServers, UnknownServer
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

    known = {"message_id", "queue_id", "sender", "recipient", "since", "until", "limit", "local", "server"}
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


def tracking_params(q: tracking.TrackingQuery) -> dict[str, str]:
    """A tracking query as ``GET /api/v1/tracking``'s parameters (the inverse of ``tracking_query``)."""
    pairs = [("message_id", q.message_id), ("queue_id", q.queue_id), ("sender", q.sender),
             ("recipient", q.recipient), ("since", None if q.since is None else repr(q.since)),
             ("until", None if q.until is None else repr(q.until)), ("limit", str(q.limit))]
    return {k: v for k, v in pairs if v is not None}


def labelled_event(e: tracking.TrackingEvent, config: Any) -> tracking.TrackingEvent:
    """An event of a site of several servers names its server (``config.server``)."""
    if e.server or len(config.servers) <= 1:
        return e
    return dataclasses.replace(e, server=config.server)


def _newest_first(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(items, key=lambda m: (m.get("received") or 0, m.get("id") or ""), reverse=True)


# ------------------------------------------------------------------ the API


class MessageApi:
    """``servers``: the site's other servers (``imsrelay.admin.federation``); with them,
    messages, search, mailboxes, queue and tracking answer for the whole site."""

    def __init__(self, sites: SitesProvider, *, lab_ready: Callable[[], str | None] | None = None,
                 servers: SiteServers | None = None) -> None:
        self._sites = sites
        self._lab_ready = lab_ready
        self._servers = servers

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

    def scope(self, query: Any) -> Scope:
        """Which servers of the site a request is about (``?local=1``, ``?server=NAME``)."""
        if self._servers is None:
            return Scope(True, (), False)
        try:
            return self._servers.scope(query)
        except UnknownServer as exc:
            raise Missing(str(exc)) from None

    def _servers_of(self, scope: Scope) -> SiteServers:
        assert self._servers is not None, "a federated scope comes from SiteServers"
        return self._servers

    def _with_report(self, body: dict[str, Any], scope: Scope, answers: dict[str, ServerAnswer]) -> dict[str, Any]:
        if scope.labelled:
            body["servers"] = self._servers_of(scope).report(scope, answers)
        return body

    def _stores_for(self, message_id: str) -> list[Any]:
        site = message_id.split(":", 1)[0]
        stores = [s.message_store for s in self.sites if s.config.site == site]
        if not stores:
            raise Missing(f"no message {message_id!r}")
        return stores

    def _holding(self, message_id: str) -> Any:
        """The store holding a message (blocking when several servers of one site are
        here, as in a lab: it looks at their Maildirs)."""
        stores = self._stores_for(message_id)
        if len(stores) == 1:
            return stores[0]
        for store in stores:
            try:
                store.find(message_id)
            except NotFound:
                continue
            return store
        return stores[0]

    async def _store_for(self, message_id: str) -> Any:
        if len(self._stores_for(message_id)) == 1:
            return self._stores_for(message_id)[0]
        return await asyncio.to_thread(self._holding, message_id)

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
        scope = self.scope(request.query)
        if not scope.labelled:
            return web.json_response({"site": s.config.site, "messages": queue_items(s.qmgr)})
        items, answers = await self._servers_of(scope).gather_lists(
            scope, request.path, "messages", queue_items(s.qmgr) if scope.local else [])
        items.sort(key=lambda m: (m.get("received_at") or 0, m.get("queue_id") or ""))
        return web.json_response(self._with_report({"site": s.config.site, "messages": items}, scope, answers))

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
        scope = self.scope(request.query)
        boxes = await asyncio.to_thread(lambda: [b for s in sites for b in s.message_store.mailboxes()]) \
            if scope.local else []
        if not scope.labelled:
            return web.json_response({"mailboxes": boxes})
        params = {"site": site} if site else {}
        boxes, answers = await self._servers_of(scope).gather_lists(scope, request.path, "mailboxes", boxes,
                                                                    params=params)
        return web.json_response(self._with_report({"mailboxes": boxes}, scope, answers))

    async def _site_page(self, scope: Scope, query: str, search: Search, start: int,
                         limit: int) -> tuple[dict[str, Any], int]:
        """A page of the whole site's messages, newest first (each server's first
        ``start + limit``, merged); the number found."""
        local = await self._search(search) if scope.local else []
        if not scope.labelled:
            return page(local, start, limit), len(local)
        want = min(start + limit, MAX_LIMIT)
        items, answers = await self._servers_of(scope).gather_lists(
            scope, f"{PREFIX}/messages", "messages", [m.as_dict() for m in local[:want]],
            params={"query": query, "start": "0", "limit": str(want)})
        total = len(local) + sum(int(a.body.get("total", 0)) for a in answers.values()
                                 if a.ok and isinstance(a.body, dict))
        chunk = _newest_first(items)[start:start + limit]
        body = {"total": total, "start": start, "count": len(chunk), "messages": chunk}
        return self._with_report(body, scope, answers), total

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
        query = " ".join(p for p in parts if p)
        body, _ = await self._site_page(self.scope(q), query, search_param({"query": query}), start, limit)
        return web.json_response(body)

    async def get_search(self, request: web.Request) -> web.Response:
        q = request.query
        search = search_param(q)
        if search.empty:
            raise BadRequest("query is required (e.g. query=from:alice subject:hello)")
        start = int_param(q, "start", 0)
        limit = int_param(q, "limit", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT)
        body, _ = await self._site_page(self.scope(q), q.get("query", ""), search, start, limit)
        return web.json_response(body)

    async def delete_search(self, request: web.Request) -> web.Response:
        q = request.query
        search = search_param(q)
        if search.empty:  # "", '""', "''": nothing left after parsing would match (and delete) everything
            raise BadRequest("query is required: DELETE /api/v1/search?query=... deletes what it finds "
                             "(query=site:SiteA deletes a whole site's mail)")
        scope = self.scope(q)
        found = await self._search(search) if scope.local else []

        def delete() -> int:
            return sum(1 for m in found if self._holding(m.id).delete(m.id))
        deleted = await asyncio.to_thread(delete)
        if not scope.labelled:
            return web.json_response({"deleted": deleted})
        answers = await self._servers_of(scope).ask("DELETE", request.path, scope.peers,
                                                     params={"query": q.get("query", "")})
        deleted += sum(int(a.body.get("deleted", 0)) for a in answers.values() if a.ok and isinstance(a.body, dict))
        return web.json_response(self._with_report({"deleted": deleted}, scope, answers))

    async def get_wait(self, request: web.Request) -> web.Response:
        q = request.query
        search = search_param(q)
        timeout = min(float_param(q, "timeout", 30.0), MAX_WAIT)
        limit = int_param(q, "limit", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT)
        scope = self.scope(q)
        deadline = time.monotonic() + timeout
        while True:
            body, found = await self._site_page(scope, q.get("query", ""), search, 0, limit)
            if found:
                return web.json_response(body)
            left = deadline - time.monotonic()
            if left <= 0:
                return json_error(408, f"no message matching {q.get('query', '')!r} arrived within {timeout:g}s")
            await asyncio.sleep(min(WAIT_POLL, left))

    def _label(self, item: dict[str, Any], scope: Scope) -> dict[str, Any]:
        if scope.labelled and not item.get("server"):
            item["server"] = self._servers_of(scope).own
        return item

    async def _elsewhere(self, request: web.Request, scope: Scope, mid: str, *, body: Any = None,
                         raw: bool = False) -> web.StreamResponse:
        """A message this server does not hold: the site's other servers are asked at once
        and the one holding it answers; 404 naming the servers that did not answer."""
        answers = await self._servers_of(scope).ask(request.method, request.path, scope.peers, body=body, raw=raw)
        for name, a in answers.items():
            if a.ok and raw:
                return web.Response(body=a.body, headers={
                    "Content-Type": a.content_type, "X-Imsrelay-Server": name,
                    "Content-Disposition": f'attachment; filename="{mid.rsplit(":", 1)[-1].replace(chr(34), "")}.eml"'})
            if a.ok and isinstance(a.body, dict):
                return web.json_response({**a.body, "server": a.body.get("server") or name})
        silent = [a.error or a.server for a in answers.values() if not a.answered]
        why = f" (not answering: {'; '.join(silent)})" if silent else ""
        return web.json_response(self._with_report({"error": f"no message {mid}{why}"}, scope, answers), status=404)

    async def get_message(self, request: web.Request) -> web.StreamResponse:
        mid = request.match_info["id"]
        scope = self.scope(request.query)
        if scope.local:
            try:
                store = await self._store_for(mid)
                return web.json_response(self._label(await asyncio.to_thread(store.detail, mid), scope))
            except (Missing, NotFound, FileNotFoundError) as exc:
                if not scope.peers:
                    if isinstance(exc, Missing):
                        raise
                    return json_error(404, f"no message {mid}")
        return await self._elsewhere(request, scope, mid)

    async def patch_message(self, request: web.Request) -> web.StreamResponse:
        mid = request.match_info["id"]
        scope = self.scope(request.query)
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("the request body must be a JSON object like {\"read\": true}") from None
        if not isinstance(body, dict) or not isinstance(body.get("read"), bool):
            raise BadRequest("the request body must be a JSON object like {\"read\": true}")
        if scope.local:
            try:
                store = await self._store_for(mid)
                summary = await asyncio.to_thread(store.set_read, mid, body["read"])
                return web.json_response(self._label(summary.as_dict(), scope))
            except (Missing, NotFound, FileNotFoundError) as exc:
                if not scope.peers:
                    if isinstance(exc, Missing):
                        raise
                    return json_error(404, f"no message {mid}")
        return await self._elsewhere(request, scope, mid, body={"read": body["read"]})

    async def delete_message(self, request: web.Request) -> web.StreamResponse:
        mid = request.match_info["id"]
        scope = self.scope(request.query)
        if scope.local:
            try:
                store = await self._store_for(mid)
            except Missing:
                if not scope.peers:
                    raise
            else:
                if await asyncio.to_thread(store.delete, mid):
                    return web.json_response(self._label({"deleted": 1, "id": mid}, scope))
                if not scope.peers:
                    return json_error(404, f"no message {mid}")
        return await self._elsewhere(request, scope, mid)

    async def get_raw(self, request: web.Request) -> web.StreamResponse:
        mid = request.match_info["id"]
        scope = self.scope(request.query)
        if scope.local:
            try:
                store = await self._store_for(mid)
                summary = await asyncio.to_thread(store.find, mid)
            except (Missing, NotFound) as exc:
                if not scope.peers:
                    if isinstance(exc, Missing):
                        raise
                    return json_error(404, f"no message {mid}")
            else:
                name = mid.rsplit(":", 1)[-1].replace('"', "")
                return web.FileResponse(Path(summary.path), headers={
                    "Content-Type": "message/rfc822", "Content-Disposition": f'attachment; filename="{name}.eml"'})
        return await self._elsewhere(request, scope, mid, raw=True)

    # -------------------------------------------------------------- tracking

    async def get_tracking(self, request: web.Request) -> web.Response:
        q = tracking_query(request.query)
        scope = self.scope(request.query)
        sites = self.sites

        def local(query: tracking.TrackingQuery) -> list[tracking.TrackingEvent]:
            if not scope.local:
                return []
            return [labelled_event(e, s.config) for s in sites for e in s.tracking.query_sync(query)]

        if not scope.peers:
            events = await asyncio.to_thread(tracking.gather, local, q)
            return web.json_response(self._with_report(tracking.tracking_body(events), scope, {}))
        servers = self._servers_of(scope)
        loop = asyncio.get_running_loop()
        answers: dict[str, ServerAnswer] = {}

        def fetch(query: tracking.TrackingQuery) -> list[tracking.TrackingEvent]:
            """This server's events and every other server's (a server that did not answer is not asked again)."""
            events = local(query)
            ask = [p for p in scope.peers if p not in answers or answers[p].ok]
            replies = asyncio.run_coroutine_threadsafe(
                servers.ask("GET", f"{PREFIX}/tracking", ask, params=tracking_params(query)), loop).result()
            for name, a in replies.items():
                answers[name] = a
                if a.ok and isinstance(a.body, dict):
                    events += [tracking.TrackingEvent.from_dict({**e, "server": e.get("server") or name})
                               for e in a.body.get("events", []) if isinstance(e, dict)]
            return events

        events = await asyncio.to_thread(tracking.gather, fetch, q)
        return web.json_response(self._with_report(tracking.tracking_body(events), scope, answers))


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
