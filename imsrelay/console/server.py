"""The web console (aiohttp): the Exchange Administrator of the organisation.

One page (``static/index.html`` + ``console.js`` + ``console.css``, shipped in the
package, nothing remote) and a JSON API under ``/api`` that the page calls.  The
API answers from the sites' admin endpoints (``backend.Organisation``); the console
holds only log-in sessions.

=======  ==============================  =======================================
POST     /login                          ``{token}`` → session cookie + CSRF token
POST     /logout                         end the session
GET      /api/session                    the session's CSRF token, sites, stage
GET      /api/organisation               every site: status + set-up + replication
GET      /api/recipients                 every mailbox, where it is known
GET      /api/events                     server-sent events: what changed
GET      /api/stage · POST /api/stage/next   the lab's article stage (``--stage``)
ANY      /api/site/SITE/PATH             the site's admin endpoint (allow-listed)
GET      /api/site/SITE/message-html/ID  a message's HTML, neutralised, for the
                                         sandboxed frame (``MESSAGE_CSP``)
=======  ==============================  =======================================

Every ``/api`` request needs the session cookie (``HttpOnly; SameSite=Strict``);
every request that changes something also needs the session's CSRF token in the
``X-CSRF-Token`` header.  The admin token is sent once, in the log-in body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol

from aiohttp import web

from imsrelay.console import mail_views
from imsrelay.console.backend import Organisation, Reply, SiteUnavailable
from imsrelay.console.html_safety import (
    CONSOLE_CSP,
    MESSAGE_CSP,
    SECURITY_HEADERS,
    message_document,
)
from imsrelay.console.live import LiveFeed
from imsrelay.console.property_pages import PROPERTY_CALLS
from imsrelay.console.sessions import COOKIE, CSRF_HEADER, LoginThrottle, Session, Sessions
from imsrelay.console.views import recipients
from imsrelay.ingress.backlog import accept_backlog
from imsrelay.observe.logs import get_logger

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATIC_FILES = {"console.js": "text/javascript", "console.css": "text/css", "favicon.svg": "image/svg+xml",
                "properties.js": "text/javascript"}

# (method, path under the site's admin endpoint) the console may call for the page
SITE_CALLS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((m, re.compile(p)) for m, p in (
    ("GET", r"/status"), ("GET", r"/config"), ("GET", r"/directory"),
    ("GET", r"/queue"), ("POST", r"/queue/retry"), ("DELETE", r"/queue/[A-Za-z0-9]{1,64}"),
    ("GET", r"/replication/status"), ("POST", r"/replication/request-now"), ("POST", r"/kcc/check-now"),
    ("GET", r"/site-addressing"), ("POST", r"/site-addressing"), ("GET", r"/link-monitors"),
    ("GET", r"/api/v1/[A-Za-z0-9_.,/:@%+=-]{1,400}"), ("DELETE", r"/api/v1/messages/[A-Za-z0-9_.,:%+=-]{1,200}"),
    ("PATCH", r"/api/v1/messages/[A-Za-z0-9_.,:%+=-]{1,200}"),
)) + PROPERTY_CALLS


def site_call_allowed(method: str, path: str) -> bool:
    """Whether the console relays ``method path`` to a site's admin endpoint: on the
    allow-list, and with no ``.``/``..`` segment (``/api/v1/../../faults`` is ``/faults``
    once a client normalises it), escaped or not, and no empty segment."""
    segments = path.split("/")[1:]
    for segment in segments:
        plain = segment
        for _ in range(3):  # %2e%2e, %252e%252e ...
            plain = urllib.parse.unquote(plain)
        if plain in ("", ".", "..") or "/" in plain or "\\" in plain:
            return False
    return any(m == method and p.fullmatch(path) for m, p in SITE_CALLS)


class StageControl(Protocol):
    """The lab's walk through the article (``imsrelay lab --stage``)."""

    def state(self) -> dict[str, Any]: ...

    async def next(self) -> dict[str, Any]: ...


class ConsoleServer:
    def __init__(self, organisation: Organisation, token: str, *, listen: str = "127.0.0.1", port: int = 8080,
                 stage: StageControl | None = None, title: str = "imsrelay", live_interval: float = 1.0,
                 backlog: int = 0) -> None:
        """``backlog``: the listening socket's accept queue (0: the kernel's maximum)."""
        self.org = organisation
        self.backlog = backlog
        self.sessions = Sessions(token)
        self.login_throttle = LoginThrottle()
        self.listen = listen
        self.port = port
        self.stage = stage
        self.title = title
        self.log = get_logger("imsrelay").bind(component="console")
        self.live = LiveFeed(organisation, stage=stage, interval=live_interval)
        self.app = web.Application(middlewares=[self._headers, self._errors, self._auth],
                                   client_max_size=256 * 1024)
        r = self.app.router
        r.add_get("/", self.index)
        r.add_get("/static/{name}", self.static)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/api/session", self.get_session)
        r.add_get("/api/organisation", self.get_organisation)
        r.add_get("/api/recipients", self.get_recipients)
        r.add_get("/api/mailboxes", self.get_mailboxes)
        r.add_get("/api/messages", self.get_messages)
        r.add_get("/api/tracking", self.get_tracking)
        r.add_get("/api/events", self.events)
        r.add_get("/api/stage", self.get_stage)
        r.add_post("/api/stage/next", self.post_stage_next)
        r.add_get("/api/site/{site}/message-html/{id}", self.message_html)
        r.add_route("*", "/api/site/{site}/{path:.+}", self.site_call)
        self._runner: web.AppRunner | None = None
        self._live_task: asyncio.Task[None] | None = None
        self.bound: tuple[str, int] | None = None
        self._static_cache: dict[str, bytes] = {}

    @property
    def url(self) -> str:
        host, port = self.bound or (self.listen, self.port)
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    async def start(self) -> None:
        await self.org.start()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.listen, self.port, reuse_address=True,
                           backlog=accept_backlog(self.backlog))
        await site.start()
        addresses = self._runner.addresses
        self.bound = (self.listen, addresses[0][1] if addresses else self.port)
        self._live_task = asyncio.create_task(self.live.run(), name="console-live")
        self.log.info("console.started", url=self.url, sites=self.org.sites, unreachable=self.org.unreachable)

    async def stop(self) -> None:
        if self._live_task is not None:
            self._live_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._live_task
            self._live_task = None
        self.live.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.org.close()
        self.log.info("console.stopped")

    # -------------------------------------------------------------- middleware

    @web.middleware
    async def _headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resp = await handler(request)
        resp.headers.update(SECURITY_HEADERS)
        resp.headers.setdefault("Content-Security-Policy", CONSOLE_CSP)
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return web.json_response({"error": exc.reason}, status=exc.status)
            raise
        except SiteUnavailable as exc:
            return web.json_response({"error": str(exc)}, status=502)
        except _BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except Exception as exc:
            self.log.error("console.internal_error", method=request.method, path=request.path, error=repr(exc),
                           exc_info=exc)
            return web.json_response({"error": f"internal error: {exc!r}"}, status=500)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/") and request.path != "/logout":
            return await handler(request)
        session = self.sessions.find(request.cookies.get(COOKIE))
        if session is None:
            return web.json_response({"error": "log in first (the admin token)"}, status=401)
        if request.method not in ("GET", "HEAD") and not self.sessions.csrf_ok(session, request.headers.get(CSRF_HEADER)):
            self.log.warning("console.csrf_rejected", method=request.method, path=request.path, peer=request.remote)
            return web.json_response({"error": f"missing or wrong {CSRF_HEADER} header"}, status=403)
        return await handler(request)

    # -------------------------------------------------------------- page and log-in

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._static_bytes("index.html"), content_type="text/html", charset="utf-8")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound(reason=f"no file {name}")
        return web.Response(body=self._static_bytes(name), content_type=STATIC_FILES[name],
                            headers={"Cache-Control": "no-cache"})

    def _static_bytes(self, name: str) -> bytes:
        if name not in self._static_cache:
            self._static_cache[name] = resources.files("imsrelay.console").joinpath("static", name).read_bytes()
        return self._static_cache[name]

    async def login(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if origin and origin != f"{request.scheme}://{request.host}":
            return web.json_response({"error": "log-in from another origin refused"}, status=403)
        body = await _json_body(request)
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise _BadRequest("token is required")
        wait = self.login_throttle.retry_after(request.remote, time.monotonic())
        if wait > 0:
            self.log.info("console.login_throttled", peer=request.remote, retry_after=math.ceil(wait))
            return web.json_response({"error": f"too many failed log-ins; try again in {math.ceil(wait)} s"},
                                     status=429, headers={"Retry-After": str(math.ceil(wait))})
        session = self.sessions.log_in(token)
        if session is None:
            self.login_throttle.failure(request.remote, time.monotonic())
            self.log.warning("console.login_failed", peer=request.remote)
            await asyncio.sleep(0.5)  # a guess costs time
            return web.json_response({"error": "that is not the admin token"}, status=401)
        self.log.info("console.login", peer=request.remote)
        resp = web.json_response(self._session_dict(session))
        resp.set_cookie(COOKIE, session.id, httponly=True, samesite="Strict", path="/")
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        self.sessions.log_out(self._session(request).id)
        resp = web.json_response({"logged_out": True})
        resp.del_cookie(COOKIE, path="/")
        return resp

    def _session(self, request: web.Request) -> Session:
        """The request's session (the auth middleware let it through, so there is one)."""
        session = self.sessions.find(request.cookies.get(COOKIE))
        if session is None:
            raise web.HTTPUnauthorized(reason="log in first (the admin token)")
        return session

    def _session_dict(self, session: Session) -> dict[str, Any]:
        return {"csrf": session.csrf, "title": self.org.organisation or self.title, "sites": self.org.sites,
                "outside": self.org.outside,
                "unreachable": self.org.unreachable, "stage": self.stage is not None}

    async def get_session(self, request: web.Request) -> web.Response:
        if self.org.unreachable:
            await self.org.discover()
        return web.json_response(self._session_dict(self._session(request)))

    # -------------------------------------------------------------- organisation views

    async def get_organisation(self, request: web.Request) -> web.Response:
        statuses, configs, replication = await asyncio.gather(
            self.org.each("GET", "/status"), self.org.each("GET", "/config"),
            self.org.each("GET", "/replication/status"))
        sites: list[dict[str, Any]] = []
        for name in self.org.sites:
            status, config, repl = statuses[name], configs[name], replication[name]
            sites.append({"site": name, "reachable": status.ok, "error": None if status.ok else status.error,
                          "status": status.body if status.ok else None, "config": config.body if config.ok else None,
                          "replication": repl.body if repl.ok else None,
                          "replication_error": None if repl.ok else repl.error})
        organisation = next((s["status"]["organisation"] for s in sites if s["status"]), self.title)
        return web.json_response({"organisation": organisation, "sites": sites,
                                  "unreachable": self.org.unreachable})

    async def get_recipients(self, request: web.Request) -> web.Response:
        replies = await self.org.each("GET", "/directory")
        outside = set(self.org.outside)
        replies = {site: r for site, r in replies.items() if site not in outside}
        directories = {site: r.body for site, r in replies.items() if r.ok}
        errors = {site: r.error for site, r in replies.items() if not r.ok}
        return web.json_response({"recipients": recipients(directories), "sites": sorted(directories),
                                  "errors": errors})

    async def get_mailboxes(self, request: web.Request) -> web.Response:
        return web.json_response(await mail_views.mailboxes(self.org, request.query.get("site") or None))

    async def get_messages(self, request: web.Request) -> web.Response:
        q = request.query
        status, body = await mail_views.messages(
            self.org, site=q.get("site") or None, mailbox=q.get("mailbox") or None, query=q.get("query") or None,
            start=_int(q, "start", 0, 10_000_000), limit=_int(q, "limit", 50, 200) or 50)
        return web.json_response(body, status=status)

    async def get_tracking(self, request: web.Request) -> web.Response:
        q = request.query.get("q", "").strip()
        if not q:
            raise _BadRequest("q is required: a Message-ID, an address or a queue id")
        return web.json_response(await mail_views.track(self.org, q))

    async def site_call(self, request: web.Request) -> web.Response:
        site = request.match_info["site"]
        path = "/" + request.match_info["path"]
        if not site_call_allowed(request.method, path):
            raise web.HTTPNotFound(reason=f"the console does not offer {request.method} {path}")
        body = await _json_body(request) if request.method in ("POST", "PATCH", "PUT") and request.can_read_body else None
        raw = path.endswith("/raw")
        reply = await self.org.call(site, request.method, path, params=dict(request.query), body=body, raw=raw)
        if request.method != "GET":
            self.log.info("console.action", site=site, method=request.method, path=path, status=reply.status)
            self.live.poke()
        return _relay(reply)

    async def message_html(self, request: web.Request) -> web.Response:
        site, mid = request.match_info["site"], request.match_info["id"]
        if not re.fullmatch(r"[A-Za-z0-9_.,:%+=-]{1,200}", mid):
            raise _BadRequest("not a message id")
        reply = await self.org.call(site, "GET", f"/api/v1/messages/{mid}")
        if not reply.ok:
            return _relay(reply)
        text = html_part(reply.body)
        document = message_document(text or "<p>(this message has no HTML part)</p>")
        return web.Response(text=document, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": MESSAGE_CSP, "X-Frame-Options": "SAMEORIGIN"})

    # -------------------------------------------------------------- live and stage

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        queue = self.live.subscribe()
        try:
            await resp.write(b"retry: 2000\n\n")
            while True:
                try:
                    topics = await asyncio.wait_for(queue.get(), 15.0)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if topics is None:
                    break
                await resp.write(f"event: change\ndata: {json.dumps({'topics': topics})}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.live.unsubscribe(queue)
        return resp

    async def get_stage(self, request: web.Request) -> web.Response:
        if self.stage is None:
            raise web.HTTPNotFound(reason="this console shows no lab stage (start the lab with --stage)")
        return web.json_response(await asyncio.to_thread(self.stage.state))

    async def post_stage_next(self, request: web.Request) -> web.Response:
        if self.stage is None:
            raise web.HTTPNotFound(reason="this console shows no lab stage (start the lab with --stage)")
        self.log.info("console.stage_next", peer=request.remote)
        result = await self.stage.next()
        self.live.poke()
        return web.json_response(result)


def html_part(message: Any) -> str | None:
    """The HTML part of a message as the message API returns it."""
    if not isinstance(message, dict):
        return None
    value = message.get("html")
    if isinstance(value, str):
        return value
    return None


def _relay(reply: Reply) -> web.Response:
    if isinstance(reply.body, bytes):
        return web.Response(body=reply.body, status=reply.status, content_type="text/plain", charset="utf-8")
    return web.json_response(reply.body, status=reply.status)


class _BadRequest(Exception):
    pass


def _int(query: Any, name: str, default: int, maximum: int) -> int:
    raw = query.get(name)
    if not raw:
        return default
    if not raw.isdigit() or int(raw) > maximum:
        raise _BadRequest(f"{name} must be a whole number from 0 to {maximum}")
    return int(raw)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _BadRequest("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a JSON object")
    return body
