"""The site's admin endpoint (aiohttp.web); the CLI's client is ``imsrelay.admin.client``.

A small JSON API on ``admin.listen:admin.port`` (loopback by default; disabled when
the port is 0), separate from the SMTP listener so no SMTP client can reach it.
Every request must carry ``Authorization: Bearer <token>`` (``admin.token`` or
``$IMSRELAY_ADMIN_TOKEN``); a site with an admin port and no token refuses to start.

=======  ==========================  ==========================================
GET      /status                     site, addressing, queue size, replication
GET      /directory                  sites, mailboxes, custom recipients, lists (``?site=``)
POST     /directory/mailboxes        ``{alias, display_name}``: a mailbox here
DELETE   /directory/mailboxes/ALIAS  delete (a tombstone that replicates)
POST     /directory/custom-recipients        ``{alias, target, display_name, addresses}`` (Q258203)
DELETE   /directory/custom-recipients/ALIAS  delete (a tombstone that replicates)
POST     /directory/lists            ``{alias, members, owner, expansion_site, display_name,
                                     addresses}``: a distribution list here (Q185194)
PUT      /directory/lists/ALIAS      ``{members | add, remove, owner, expansion_site}``
DELETE   /directory/lists/ALIAS      delete (a tombstone that replicates)
POST     /directory/mailboxes/ALIAS/password      ``{password_hash}`` (or ``{password}``)
PUT      /directory/mailboxes/ALIAS/restrictions  ``{accept_from, reject_from,
                                     filter_senders, filter_action}``: lists replace
PUT      /directory/mailboxes/ALIAS/protocols     ``{imap4, pop3}``: true, false or null
                                     (the protocol defaults); a protocol left out is kept
PUT      /directory/protocols        ``{imap4, pop3}``: the site's protocol defaults
GET      /restrictions               the site's relay, accept, submission, filter rules
POST     /restrictions/explain       ``{recipient, sender?, client?, auth?, local_address?}``
POST     /replication/request-now    ``{site, full}``: Request Now
GET      /replication/status         per peer: high-water, last request/reply, backlog
POST     /kcc/check-now              Check Now (knowledge consistency check)
GET      /site-addressing            this site's Site Addressing
POST     /site-addressing            ``{address, update_mailboxes, keep_old}`` → report
GET      /queue                      queued messages and their recipients
POST     /queue/retry                ``{queue_id?}``: retry deferred recipients now
GET      /transfer-mode              the Transfer mode and how many messages it holds
PUT      /transfer-mode              ``{mode}``: change it now (kept across restarts)
GET      /faults                     faults on demand now in force
POST     /faults                     ``{kind, stage, reply, probability, sessions, peer, delay, expires}``
DELETE   /faults[/ID]                clear every fault, or one
GET      /metrics                    Prometheus text format (no token unless metrics.require_token)
GET      /link-monitors              the Link Monitors' targets: state, since, last round trip (Q246674)
GET      /config                     static set-up (imsrelay.admin.console_routes)
DELETE   /queue/QUEUE_ID             remove a queued message, no NDR
GET      /health, /ready             alive; ready (200) or not (503 + reasons), no token
GET      /api/v1/...                 the message API (``imsrelay.admin.message_api``)
=======  ==========================  ==========================================

Errors answer ``{"error": "..."}`` with 400 (bad request: malformed JSON, a missing
or mistyped field, an invalid alias, address or domain), 401 (token), 404 (no such
object), 409 (the directory refuses the change, e.g. the alias exists), 413 (body
over 64 KiB); 500 only for an internal error (logged as ``admin.internal_error``).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, Protocol

from aiohttp import web

from imsrelay.access.service import MailboxAccess
from imsrelay.admin.console_routes import add_console_routes
from imsrelay.admin.federation import SiteServers
from imsrelay.admin.message_api import (
    OPEN_PATHS,
    SHUTDOWN_TIMEOUT,
    BadRequest,
    MessageApi,
    Missing,
    access_info,
    envelope_items,
)
from imsrelay.admin.property_routes import add_property_routes, property_errors
from imsrelay.directory.intrasite import IntraSite, changes_since
from imsrelay.directory.kcc import KccResult
from imsrelay.directory.replication import ReplicationError, Replicator
from imsrelay.directory.restrictions_report import Question, explain, site_rules
from imsrelay.directory.site_addressing import report_dict, site_addressing_job
from imsrelay.directory.store import (
    Directory,
    DirectoryError,
    DirectoryInputError,
    DirectoryNotFound,
)
from imsrelay.ingress.backlog import accept_backlog
from imsrelay.ingress.flow_gate import FlowGate, backpressure_status
from imsrelay.model.addresses import AddressError
from imsrelay.model.errors import ConfigError
from imsrelay.model.objects import CustomRecipient, DistributionList, Mailbox
from imsrelay.model.settings import SiteConfig
from imsrelay.observe.faults import FaultBook, FaultError
from imsrelay.observe.link_monitor import LinkMonitors
from imsrelay.observe.metrics import CONTENT_TYPE, SiteMetrics
from imsrelay.observe.tracking import TrackingLog
from imsrelay.policy.auth import PasswordError, hash_password, parse_hash
from imsrelay.policy.inbound import InboundPolicy
from imsrelay.policy.transfer_mode import TransferMode, parse_mode
from imsrelay.queue.manager import QueueManager
from imsrelay.queue.spool import Spool
from imsrelay.routing.router import RoutingTable
from imsrelay.transport.smtp import SmtpClient

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 64 * 1024  # every request body is a small JSON object
MAX_JSON_DEPTH = 8


# ------------------------------------------------------------------ shared operations


def mailbox_dict(m: Mailbox) -> dict[str, Any]:
    r = m.sender_rules
    return {"alias": m.alias, "display_name": m.display_name, "home_site": m.home_site,
            "primary_address": m.primary_address, "proxy_addresses": list(m.proxy_addresses),
            "accept_from": list(r.accept_from), "reject_from": list(r.reject_from),
            "filter_senders": list(r.filter_senders), "filter_action": r.filter_action,
            "protocols": {"imap4": m.protocols.imap4, "pop3": m.protocols.pop3},
            "home_server": m.home_server}


def recipient_dict(r: CustomRecipient | DistributionList) -> dict[str, Any]:
    """A custom recipient or distribution list as the API and the CLI show it."""
    common = {"alias": r.alias, "display_name": r.display_name, "home_site": r.home_site,
              "primary_address": r.primary_address, "proxy_addresses": list(r.proxy_addresses)}
    if isinstance(r, CustomRecipient):
        return {**common, "kind": "custom", "target": r.target}
    return {**common, "kind": "dl", "members": list(r.members), "owner": r.owner,
            "expansion_site": r.expansion_site}


def directory_snapshot(directory: Directory, site: str | None = None) -> dict[str, Any]:
    return {"sites": [asdict(s) for s in directory.sites()],
            "mailboxes": [mailbox_dict(m) for m in directory.mailboxes(site)],
            "custom_recipients": [recipient_dict(r) for r in directory.recipients("custom", site)
                                  if isinstance(r, CustomRecipient)],
            "distribution_lists": [recipient_dict(r) for r in directory.recipients("dl", site)
                                   if isinstance(r, DistributionList)]}


def _protocol_changes(body: dict[str, Any]) -> dict[str, bool | None]:
    """``{imap4, pop3}`` of a request: true, false or null; unknown keys refused."""
    unknown = sorted(set(body) - {"imap4", "pop3"})
    if unknown:
        raise _BadRequest(f"unknown protocol {unknown[0]!r} (imap4, pop3)")
    changes: dict[str, bool | None] = {}
    for name, value in body.items():
        if value is not None and not isinstance(value, bool):
            raise _BadRequest(f"{name} must be true, false or null (the protocol defaults)")
        changes[name] = value
    if not changes:
        raise _BadRequest("give imap4 and/or pop3: true, false or null")
    return changes


# ------------------------------------------------------------------ server


class AdminSite(Protocol):
    """What the admin endpoint shows and drives at its site (``imsrelay.site.Site``)."""

    config: SiteConfig
    directory: Directory
    qmgr: QueueManager
    replicator: Replicator | None
    intrasite: IntraSite | None  # a site of several servers: directory replication between them
    access: MailboxAccess | None  # IMAP4 and POP3 (None: off)
    smtp_client: SmtpClient
    tracking: TrackingLog
    log: Any
    spool: Spool
    workers: int
    flow: FlowGate
    on_restart: Callable[[], None] | None  # who restarts the site when asked (imsrelay.admin.property_routes)

    @property
    def bound_port(self) -> int | None: ...

    @property
    def learned_sites(self) -> tuple[tuple[str, str], ...]: ...

    async def refresh(self) -> None: ...

    async def check_now(self) -> KccResult: ...

    async def routing_table(self) -> RoutingTable: ...

    def inbound_policy(self) -> InboundPolicy: ...

    # the IMS's connection controls
    transfer_mode: TransferMode
    faults: FaultBook
    metrics: SiteMetrics
    link_monitors: LinkMonitors
    clock: Callable[[], float]

    async def set_transfer_mode(self, mode: TransferMode) -> TransferMode: ...


class AdminServer:
    """``servers``: the site's servers (``imsrelay.admin.federation``), for the views of
    the whole site: messages, search, tracking, queue (None: this server alone)."""

    def __init__(self, site: AdminSite, *, servers: SiteServers | None = None) -> None:
        self.site = site
        self.servers = servers
        cfg: SiteConfig = site.config
        token = cfg.admin.resolved_token()
        if not token:
            raise ConfigError(cfg.path, "admin.token", (
                f"admin.port is {cfg.admin.port} but no token is configured: set admin.token, or the "
                f"environment variable {cfg.admin.token_env or 'named by admin.token_env'}"))
        self._token = token.encode()
        self.log = site.log.bind(component="admin")
        self.app = web.Application(middlewares=[self._errors, self._auth], client_max_size=MAX_BODY)
        r = self.app.router
        r.add_get("/status", self.get_status)
        r.add_get("/directory", self.get_directory)
        r.add_post("/directory/mailboxes", self.post_mailbox)
        r.add_delete("/directory/mailboxes/{alias}", self.delete_mailbox)
        r.add_post("/directory/custom-recipients", self.post_custom_recipient)
        r.add_delete("/directory/custom-recipients/{alias}", self.delete_custom_recipient)
        r.add_post("/directory/lists", self.post_list)
        r.add_put("/directory/lists/{alias}", self.put_list)
        r.add_delete("/directory/lists/{alias}", self.delete_list)
        r.add_post("/directory/mailboxes/{alias}/password", self.post_password)
        r.add_put("/directory/mailboxes/{alias}/restrictions", self.put_restrictions)
        r.add_put("/directory/mailboxes/{alias}/protocols", self.put_mailbox_protocols)
        r.add_put("/directory/protocols", self.put_site_protocols)
        r.add_get("/restrictions", self.get_restrictions)
        r.add_post("/restrictions/explain", self.post_explain)
        r.add_get("/directory/intrasite", self.get_intrasite)
        r.add_get("/directory/intrasite/changes", self.get_intrasite_changes)
        r.add_post("/directory/intrasite/notify", self.post_intrasite_notify)
        r.add_post("/directory/intrasite/pull-now", self.post_intrasite_pull_now)
        r.add_post("/replication/request-now", self.post_request_now)
        r.add_get("/replication/status", self.get_replication_status)
        r.add_post("/kcc/check-now", self.post_check_now)
        r.add_get("/site-addressing", self.get_site_addressing)
        r.add_post("/site-addressing", self.post_site_addressing)
        r.add_get("/queue", self.get_queue)
        r.add_post("/queue/retry", self.post_queue_retry)
        r.add_get("/transfer-mode", self.get_transfer_mode)
        r.add_put("/transfer-mode", self.put_transfer_mode)
        r.add_get("/faults", self.get_faults)
        r.add_post("/faults", self.post_fault)
        r.add_delete("/faults", self.delete_faults)
        r.add_delete("/faults/{fault_id}", self.delete_faults)
        r.add_get("/metrics", self.get_metrics)
        r.add_get("/link-monitors", self.get_link_monitors)
        self.api = MessageApi(lambda: [site], servers=servers)
        self.api.add_routes(r)  # /health, /ready, /api/v1/... (imsrelay.admin.message_api)
        add_console_routes(self.app, site, self.api.scope, servers)  # GET /config, DELETE /queue/ID
        self.app.middlewares.append(property_errors)  # the property pages (imsrelay.admin.property_routes)
        add_property_routes(self.app, site)
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None

    async def start(self) -> None:
        cfg = self.site.config.admin
        if self.servers is not None:
            await self.servers.start()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT)
        await self._runner.setup()
        tcp = web.TCPSite(self._runner, cfg.listen, cfg.port, reuse_address=True,
                          backlog=accept_backlog(self.site.config.smtp.listen_backlog))
        await tcp.start()
        addresses = self._runner.addresses
        port = addresses[0][1] if addresses else cfg.port
        self.bound = (cfg.listen, port)
        self.log.info("admin.started", listen=cfg.listen, port=port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self.log.info("admin.stopped")
        if self.servers is not None:
            await self.servers.stop()

    # -------------------------------------------------------------- middleware

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:  # /health, /ready and the OpenAPI document need no token
            return await handler(request)
        if request.path == "/metrics" and not self.site.config.metrics.require_token:
            return await handler(request)  # scrapers need no token unless asked for
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), self._token):
            self.log.warning("admin.unauthorized", peer=request.remote, method=request.method, path=request.path)
            return web.json_response({"error": "a valid admin token is required (Authorization: Bearer ...)"},
                                     status=401, headers={"WWW-Authenticate": 'Bearer realm="imsrelay"'})
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400 and not (exc.content_type or "").endswith("json"):
                return web.json_response({"error": exc.reason}, status=exc.status)
            raise
        except DirectoryInputError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except DirectoryNotFound as exc:
            return web.json_response({"error": str(exc)}, status=404)
        except (DirectoryError, ReplicationError) as exc:
            return web.json_response({"error": str(exc)}, status=409)
        except (_BadRequest, BadRequest, AddressError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except Missing as exc:
            return web.json_response({"error": str(exc)}, status=404)
        except Exception as exc:
            self.log.error("admin.internal_error", method=request.method, path=request.path, error=repr(exc),
                           exc_info=exc)
            return web.json_response({"error": "internal error (logged at the site as admin.internal_error)"},
                                     status=500)

    # -------------------------------------------------------------- handlers

    async def get_status(self, request: web.Request) -> web.Response:
        """The site at a glance: listeners, queue (with backpressure), directory, replication (key scheme, trusted sites), Transfer mode, workers."""
        site = self.site
        cfg = site.config
        directory = site.directory
        own = await directory.run(directory.site_object)
        invocation, highest, mailboxes = await directory.run(
            lambda: (directory.invocation, directory.highest_usn, len(directory.mailboxes(cfg.site))))
        return web.json_response({
            "organisation": cfg.organisation, "site": cfg.site, "server": cfg.server, "hostname": cfg.hostname,
            "site_domain": cfg.site_domain, "company_domain": cfg.company_domain,
            "data_dir": str(cfg.data_dir.resolve()),  # the CLI checks it talks to its file's site (client.py)
            "site_addressing": own.smtp_address if own else None,
            "routing_address": own.routing_address if own else None,
            "smtp": {"listen": cfg.smtp.listen, "port": site.bound_port},
            "access": access_info(site.access),
            "local_mailboxes": mailboxes,
            "queue": {"messages": await self._queue_size(), "workers": site.workers,
                      "backpressure": backpressure_status(site.flow)},
            "queue_manager": {"ok": site.qmgr.health.ok, "failures": site.qmgr.health.failures,
                              "reason": site.qmgr.health.reason()},
            "directory": {"invocation": invocation, "highest_usn": highest},
            "replication": {"enabled": site.replicator is not None,
                            "key_scheme": site.replicator.key_scheme if site.replicator else None,
                            "trusted_sites": list(site.replicator.trusted_sites) if site.replicator else [],
                            "connectors": [c.site for c in cfg.replication.connectors]},
            "learned_sites": [list(x) for x in site.learned_sites],
            "servers": [{"name": s.name, "host": s.host, "port": s.port, "admin": s.admin} for s in cfg.servers],
            "bridgehead": cfg.bridgehead,
            "tracking": site.tracking.status(),
        })

    async def get_directory(self, request: web.Request) -> web.Response:
        """The directory: mailboxes (proxy addresses, home site, Delivery Restrictions), custom recipients, distribution lists and sites; `?site=` for one site's."""
        directory = self.site.directory
        return web.json_response(await directory.run(directory_snapshot, directory, request.query.get("site")))

    async def post_mailbox(self, request: web.Request) -> web.Response:
        """Create a mailbox: `{"alias", "display_name", "home_server"}` (409 when the alias exists); on a
        site of several servers its home server is this one unless `home_server` names another."""
        body = await _json_body(request)
        alias = _field(body, "alias", str, required=True)
        display = _field(body, "display_name", str) or None
        extra = _field(body, "addresses", list) or []
        home = _field(body, "home_server", str)
        servers = self.site.config.servers
        if home is not None and home.lower() not in {s.name.lower() for s in servers}:
            raise _BadRequest(f"home_server {home!r} is not one of this site's servers "
                              f"({', '.join(s.name for s in servers) or 'a site of one server: leave it out'})")
        directory = self.site.directory
        mbx = await directory.run(directory.add_mailbox, alias, display, [str(a) for a in extra],
                                  self.site.config.home_server_for(home) or None)
        self.site.log.info("directory.mailbox_added", alias=mbx.alias, address=mbx.primary_address)
        return web.json_response(mailbox_dict(mbx), status=201)

    async def delete_mailbox(self, request: web.Request) -> web.Response:
        """Delete a mailbox homed here (a tombstone that replicates)."""
        alias = request.match_info["alias"]
        directory = self.site.directory
        if await directory.run(directory.mailbox, alias) is None:
            return web.json_response({"error": f"no mailbox {alias} at {self.site.config.site}"}, status=404)
        await directory.run(directory.delete_mailbox, alias)
        self.site.log.info("directory.mailbox_deleted", alias=alias)
        return web.json_response({"deleted": alias, "site": self.site.config.site})

    async def post_custom_recipient(self, request: web.Request) -> web.Response:
        """Create a custom recipient (KB Q258203): `{"alias", "target", "display_name", "addresses"}`; mail to its
        addresses goes to `target` (409 when the alias or an address is taken)."""
        body = await _json_body(request)
        alias = _field(body, "alias", str, required=True)
        target = _field(body, "target", str, required=True)
        extra = [str(a) for a in _field(body, "addresses", list) or []]
        directory = self.site.directory
        entry = await directory.run(directory.add_custom_recipient, alias, target,
                                    _field(body, "display_name", str) or None, extra)
        self.site.log.info("directory.recipient_added", kind="custom", alias=entry.alias,
                           address=entry.primary_address, target=entry.target)
        return web.json_response(recipient_dict(entry), status=201)

    async def delete_custom_recipient(self, request: web.Request) -> web.Response:
        """Delete a custom recipient homed here (a tombstone that replicates)."""
        return await self._delete_recipient("custom", request.match_info["alias"])

    async def post_list(self, request: web.Request) -> web.Response:
        """Create a distribution list (KB Q185194): `{"alias", "members", "owner", "expansion_site", "display_name",
        "addresses"}`; members by address; NDRs for them go to `owner` if set, else to the sender."""
        body = await _json_body(request)
        alias = _field(body, "alias", str, required=True)
        members = [str(m) for m in _field(body, "members", list) or []]
        extra = [str(a) for a in _field(body, "addresses", list) or []]
        directory = self.site.directory
        entry = await directory.run(functools.partial(
            directory.add_distribution_list, alias, members, _field(body, "display_name", str) or None,
            owner=_field(body, "owner", str) or "", expansion_site=_field(body, "expansion_site", str) or "",
            extra_addresses=extra))
        self.site.log.info("directory.recipient_added", kind="dl", alias=entry.alias, address=entry.primary_address,
                           members=len(entry.members))
        return web.json_response(recipient_dict(entry), status=201)

    async def put_list(self, request: web.Request) -> web.Response:
        """Change a distribution list homed here: `{"members"}` replaces them, `{"add", "remove"}` change them;
        `owner` and `expansion_site` ("" clears them)."""
        body = await _json_body(request)
        members = _field(body, "members", list)
        directory = self.site.directory
        entry = await directory.run(functools.partial(
            directory.set_distribution_list, request.match_info["alias"],
            members=None if members is None else [str(m) for m in members],
            add=[str(m) for m in _field(body, "add", list) or []],
            remove=[str(m) for m in _field(body, "remove", list) or []],
            owner=_field(body, "owner", str), expansion_site=_field(body, "expansion_site", str)))
        self.site.log.info("directory.list_changed", alias=entry.alias, members=len(entry.members))
        return web.json_response(recipient_dict(entry))

    async def delete_list(self, request: web.Request) -> web.Response:
        """Delete a distribution list homed here (a tombstone that replicates)."""
        return await self._delete_recipient("dl", request.match_info["alias"])

    async def _delete_recipient(self, kind: str, alias: str) -> web.Response:
        directory = self.site.directory
        await directory.run(directory.delete_recipient, kind, alias)
        self.site.log.info("directory.recipient_deleted", kind=kind, alias=alias)
        return web.json_response({"deleted": alias, "site": self.site.config.site})

    async def post_password(self, request: web.Request) -> web.Response:
        """Set a mailbox's SMTP AUTH password: `{"password_hash"}` (scrypt, from `imsrelay directory hash-password`) or `{"password"}`."""
        alias = request.match_info["alias"]
        body = await _json_body(request)
        stored = _field(body, "password_hash", str)
        password = _field(body, "password", str)
        if (stored is None) == (password is None):
            raise _BadRequest("give password_hash (imsrelay directory hash-password) or password")
        try:
            if stored is not None:
                parse_hash(stored)
            else:
                stored = await asyncio.to_thread(hash_password, password)
        except PasswordError as exc:
            raise _BadRequest(str(exc)) from None
        directory = self.site.directory
        await directory.run(directory.set_password_hash, alias, stored,
                            replicate=self.site.config.auth.replicate_credentials)
        self.site.log.info("auth.password_set", alias=alias, source="admin", peer=request.remote)
        return web.json_response({"alias": alias, "site": self.site.config.site, "password": "set"})

    async def put_restrictions(self, request: web.Request) -> web.Response:
        """A mailbox's Delivery Restrictions and Message Filter: `{"accept_from", "reject_from", "filter_senders", "filter_action"}`; a list given replaces the old one."""
        alias = request.match_info["alias"]
        body = await _json_body(request)
        lists = {}
        for name in ("accept_from", "reject_from", "filter_senders"):
            value = _field(body, name, list)
            if value is not None and not all(isinstance(v, str) for v in value):
                raise _BadRequest(f"{name} must be a list of strings")
            lists[name] = value
        action = _field(body, "filter_action", str)
        directory = self.site.directory
        mbx = await directory.run(lambda: directory.set_sender_rules(alias, filter_action=action, **lists))
        self.site.log.info("directory.restrictions_set", alias=alias, accept_from=list(mbx.sender_rules.accept_from),
                           reject_from=list(mbx.sender_rules.reject_from),
                           filter_senders=list(mbx.sender_rules.filter_senders))
        return web.json_response(mailbox_dict(mbx))

    async def put_mailbox_protocols(self, request: web.Request) -> web.Response:
        """A mailbox's IMAP4/POP3 Protocols settings: `{"imap4": true|false|null, "pop3": …}`
        (null: the server's and site's); replicated with the mailbox."""
        alias = request.match_info["alias"]
        changes = _protocol_changes(await _json_body(request))
        directory = self.site.directory
        mbx = await directory.run(directory.set_mailbox_protocols, alias, changes)
        self.site.log.info("directory.protocols_set", alias=alias, imap4=mbx.protocols.imap4, pop3=mbx.protocols.pop3)
        return web.json_response(mailbox_dict(mbx))

    async def put_site_protocols(self, request: web.Request) -> web.Response:
        """The site's IMAP4/POP3 Protocols defaults (`{"imap4": …, "pop3": …}`), replicated in the
        site object."""
        changes = _protocol_changes(await _json_body(request))
        directory = self.site.directory
        site = await directory.run(directory.set_site_protocols, changes)
        self.site.log.info("directory.protocols_set", site=site.name, imap4=site.protocols.imap4,
                           pop3=site.protocols.pop3)
        return web.json_response(asdict(site))

    async def get_restrictions(self, request: web.Request) -> web.Response:
        """The site's own rules: Routing Restrictions, accept rules, Message Filtering, AUTH and submission settings."""
        return web.json_response(site_rules(self.site.config))

    async def post_explain(self, request: web.Request) -> web.Response:
        """What the site would answer a client, and which rule applies: `{"recipient", "sender", "client", "auth", "local_address", "encrypted"}` (as `imsrelay route --from`)."""
        body = await _json_body(request)
        question = Question(recipient=_field(body, "recipient", str, required=True),
                            sender=_field(body, "sender", str), client=_field(body, "client", str),
                            auth=_field(body, "auth", str), local_address=_field(body, "local_address", str),
                            encrypted=bool(_field(body, "encrypted", bool)))
        directory = self.site.directory
        table, policy = await self.site.routing_table(), self.site.inbound_policy()
        lines = await directory.run(lambda: explain(self.site.config, directory, question, table=table,
                                                    policy=policy))
        return web.json_response({"lines": lines})

    def _intrasite(self) -> IntraSite:
        if self.site.intrasite is None:
            raise _Conflict(f"{self.site.config.server} is the only server of site {self.site.config.site} "
                            "([[servers]] lists no other with an admin endpoint)")
        return self.site.intrasite

    async def get_intrasite(self, request: web.Request) -> web.Response:
        """Intra-site directory replication at this server: its USN, and per other server of the site the high-water mark, last pull, applied objects and last error."""
        return web.json_response(await self._intrasite().status())

    async def get_intrasite_changes(self, request: web.Request) -> web.Response:
        """The objects changed on this server above `?since=USN` (one batch; `invocation`: the puller's idea of this database, another one answers from 0) and, with `passwords_after=TIME`, the password hashes set since: what the site's other servers pull."""
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            raise _BadRequest("since must be a USN (an integer)") from None
        if since < 0:
            raise _BadRequest("since must be a USN (an integer, 0 or more)")
        after = request.query.get("passwords_after")
        try:
            passwords_after = None if after is None else float(after)
        except ValueError:
            raise _BadRequest("passwords_after must be a time (seconds since the epoch)") from None
        directory = self.site.directory
        return web.json_response(await directory.run(changes_since, directory, self.site.config.server, since,
                                                     request.query.get("invocation", ""),
                                                     passwords_after=passwords_after))

    async def post_intrasite_notify(self, request: web.Request) -> web.Response:
        """`{"server"}`: another server of the site changed its directory; this one pulls from it now."""
        body = await _json_body(request)
        server = _field(body, "server", str, required=True)
        if not self._intrasite().notified(server):
            raise _BadRequest(f"{server!r} is not another server of site {self.site.config.site}")
        return web.json_response({"pulling_from": server}, status=202)

    async def post_intrasite_pull_now(self, request: web.Request) -> web.Response:
        """Pull every other server's changes now (Request Now inside the site); the results per server."""
        return web.json_response({"server": self.site.config.server, "pulled": await self._intrasite().pull_all()})

    def _replicator(self) -> Replicator:
        if self.site.replicator is None:
            raise _Conflict("replication is not configured at this site (no organisation key: set "
                            "replication.key or the environment variable named by replication.key_env)")
        return self.site.replicator

    async def post_request_now(self, request: web.Request) -> web.Response:
        """Request Now from a peer: `{"site", "full"}` (`full`: all items, not only new and modified ones)."""
        body = await _json_body(request)
        peer = _field(body, "site", str, required=True)
        full = bool(_field(body, "full", bool))
        return web.json_response(await self._replicator().request_now(peer, full=full), status=202)

    async def get_replication_status(self, request: web.Request) -> web.Response:
        """Per-peer replication state: schedule, high-water mark, invocation, last request and reply, applied batches, backlog, last error."""
        return web.json_response(await self._replicator().status())

    async def post_check_now(self, request: web.Request) -> web.Response:
        """Check Now (knowledge consistency check): the sites it learned and its findings."""
        result = await self.site.check_now()
        return web.json_response(result.as_dict())

    async def get_site_addressing(self, request: web.Request) -> web.Response:
        """The site's SMTP Site Addressing and routing address."""
        directory = self.site.directory
        own = await directory.run(directory.site_object)
        cfg = self.site.config
        return web.json_response({"site": cfg.site, "smtp_address": own.smtp_address if own else None,
                                  "routing_address": own.routing_address if own else None,
                                  "site_domain": cfg.site_domain,
                                  "keep_old_address": cfg.replication.keep_old_address})

    async def post_site_addressing(self, request: web.Request) -> web.Response:
        """Set Site Addressing: `{"address", "update_mailboxes", "keep_old"}`; with `update_mailboxes`, the bulk update of every mailbox homed here."""
        body = await _json_body(request)
        address = _field(body, "address", str, required=True)
        update = bool(_field(body, "update_mailboxes", bool))
        keep_old = _field(body, "keep_old", bool)
        if keep_old is None:
            keep_old = self.site.config.replication.keep_old_address
        directory = self.site.directory
        report = await directory.run(site_addressing_job, directory, self.site.log, address,
                                     update_mailboxes=update, keep_old=keep_old)
        await self.site.refresh()
        return web.json_response(report_dict(address, report, update_mailboxes=update, keep_old=keep_old))

    async def _all_envelopes(self) -> list[Any]:
        """This worker's queue from memory, the other workers' from their journals."""
        others = await asyncio.to_thread(self.site.spool.other_workers_envelopes) if self.site.workers > 1 else []
        own = list(self.site.qmgr.envelopes.values())
        known = {e.queue_id for e in own}
        return own + [e for e in others if e.queue_id not in known]

    async def _queue_size(self) -> int:
        """Messages in the whole site's queue (what ``_all_envelopes`` would list)."""
        own = self.site.qmgr.envelopes
        others = await asyncio.to_thread(self.site.spool.other_workers_unfinished) if self.site.workers > 1 else set()
        return len(own) + len(others - own.keys())

    async def get_queue(self, request: web.Request) -> web.Response:
        """Every queued message with each recipient's state, attempts, next attempt and last reply (every worker's); on a site of several servers every server's, each message naming its `server` (`?server=NAME`: one server's; `servers`: which answered)."""
        scope = self.api.scope(request.query)
        own = envelope_items(await self._all_envelopes(), held=self.site.qmgr.held_recipients) if scope.local else []
        if self.servers is None or not scope.labelled:
            return web.json_response({"messages": own})
        items, answers = await self.servers.gather_lists(scope, "/queue", "messages", own)
        items.sort(key=lambda m: (m.get("received_at") or 0, m.get("queue_id") or ""))
        return web.json_response({"messages": items, "servers": self.servers.report(scope, answers)})

    async def post_queue_retry(self, request: web.Request) -> web.Response:
        """Retry now: `{"queue_id"}` for one message, `{}` for all; on a site of several servers a message another server holds is retried there, and `{}` retries at every server (`?server=NAME`: at one)."""
        body = await _json_body(request) if request.can_read_body else {}
        queue_id = _field(body, "queue_id", str)
        scope = self.api.scope(request.query)
        here = scope.local and (not queue_id or queue_id in self.site.qmgr.envelopes)
        retried = self.site.qmgr.retry_now(queue_id) if here else 0
        if self.servers is None or not scope.peers or (here and queue_id):
            if not here:
                return web.json_response({"error": f"no message {queue_id} in the queue"}, status=404)
            return web.json_response({"retried": retried})
        answers = await self.servers.ask("POST", "/queue/retry", scope.peers, body=body)
        retried += sum(int(a.body.get("retried", 0)) for a in answers.values() if a.ok and isinstance(a.body, dict))
        report = self.servers.report(scope, answers)
        if queue_id and not here and not any(a.ok for a in answers.values()):
            return web.json_response({"error": f"no message {queue_id} in the queue of any server that answered",
                                      "servers": report}, status=404)
        return web.json_response({"retried": retried, "servers": report})


    async def get_transfer_mode(self, request: web.Request) -> web.Response:
        """The Transfer mode and how many messages it holds."""
        return web.json_response({"site": self.site.config.site, "mode": self.site.transfer_mode.value,
                                  "held_messages": self.site.qmgr.held_messages()})

    async def put_transfer_mode(self, request: web.Request) -> web.Response:
        """Change the Transfer mode at once: `{"mode": "none"}` (`inbound-outbound`, `inbound`, `outbound`, `none`)."""
        body = await _json_body(request)
        try:
            mode = parse_mode(_field(body, "mode", str, required=True))
        except ValueError as exc:
            raise _BadRequest(str(exc)) from None
        previous = await self.site.set_transfer_mode(mode)
        return web.json_response({"site": self.site.config.site, "mode": mode.value, "previous": previous.value})

    async def get_faults(self, request: web.Request) -> web.Response:
        """The faults on demand of this site."""
        return web.json_response({"site": self.site.config.site, "faults": self.site.faults.listing()})

    async def post_fault(self, request: web.Request) -> web.Response:
        """Add a fault on demand (`imsrelay faults add` sends this)."""
        body = await _json_body(request)
        try:
            fault = self.site.faults.add(body)
        except FaultError as exc:
            raise _BadRequest(str(exc)) from None
        return web.json_response(fault.as_dict(remaining=fault.sessions, now=self.site.clock()), status=201)

    async def delete_faults(self, request: web.Request) -> web.Response:
        """Clear every fault, or the one named in the path."""
        fault_id = request.match_info.get("fault_id")
        try:
            removed = self.site.faults.clear([fault_id] if fault_id else None)
        except FaultError as exc:
            return web.json_response({"error": str(exc)}, status=404)
        return web.json_response({"site": self.site.config.site, "cleared": [f.id for f in removed]})

    async def get_link_monitors(self, request: web.Request) -> web.Response:
        """The Link Monitors of this site (KB Q246674): each target's state, since when, last round trip."""
        return web.json_response({"site": self.site.config.site, "now": self.site.clock(),
                                  "monitors": self.site.link_monitors.snapshot()})

    async def get_metrics(self, request: web.Request) -> web.Response:
        """PerfMon counters as Prometheus metrics (text format 0.0.4); no token unless `metrics.require_token`."""
        if not self.site.config.metrics.enabled:
            return web.json_response({"error": "metrics are disabled at this site (metrics.enabled = false)"},
                                     status=404)
        site = self.site
        replication = await site.replicator.status() if site.replicator is not None else None
        body = site.metrics.render(queued=list(site.qmgr.envelopes.values()), incoming=site.qmgr.incoming,
                                   flow_state=site.flow.state(), open_connections=site.smtp_client.open_connections(),
                                   replication=replication, now=site.clock(), tracking=site.tracking.status())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


class _BadRequest(Exception):
    pass


class _Conflict(DirectoryError):
    pass


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or ``_BadRequest`` saying what is wrong
    (not JSON, not UTF-8, not an object, nested too deeply, a number too long)."""
    # Refuse deep nesting before parsing: json.loads recurses once per level.
    opened = 0
    deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            opened += 1
            deepest = max(deepest, opened)
            if deepest > MAX_JSON_DEPTH:
                raise _BadRequest(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
        elif byte in (0x5D, 0x7D):
            opened -= 1
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _BadRequest("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _BadRequest(f"the request body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError):  # e.g. an integer of more than 4300 digits
        raise _BadRequest("the request body has a value out of range (numbers are limited to 4300 digits)") from None
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a JSON object")
    return body


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
    return parse_json_object(await request.read())


def _field(body: dict[str, Any], name: str, kind: type, *, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise _BadRequest(f"{name} is required")
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = {str: "string", bool: "boolean (true or false)", list: "list", int: "whole number"}
        raise _BadRequest(f"{name} must be a {names.get(kind, kind.__name__)}")
    if isinstance(value, str) and len(value) > 1000:
        raise _BadRequest(f"{name} is too long (at most 1000 characters)")
    return value
