"""Composition root: one Exchange site's IMS built from its configuration.

``Site`` owns the parts (directory, spool, queue manager, SMTP server, outbound
client, replication, admin endpoint), starts and stops them, and offers the SMTP
handler and the queue manager the few live inputs they need (policy, rewrite rules,
routing table), derived from the config file and the directory.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import resource
import ssl
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imsrelay.admin.message_store import MessageStore
from imsrelay.admin.server import AdminServer
from imsrelay.config.loader import SiteConfig
from imsrelay.console.site_console import site_console
from imsrelay.directory import kcc
from imsrelay.directory.replication import Replicator
from imsrelay.directory.restrictions_report import (
    accept_rules_for,
    inbound_policy_for,
    relay_rules_for,
)
from imsrelay.directory.store import Directory
from imsrelay.ingress.flow_gate import FlowGate
from imsrelay.ingress.lab_ca import ensure_ca, ensure_certificate
from imsrelay.ingress.smtpd import STOP_GRACE, SiteHandler, close_sessions, server_factory
from imsrelay.model.addresses import AddressError, parse_address
from imsrelay.model.envelope import Envelope, use_worker_ids
from imsrelay.model.objects import Mailbox, SiteObject
from imsrelay.observe import tracking
from imsrelay.observe.faults import Fault, FaultBook
from imsrelay.observe.logs import site_logger
from imsrelay.observe.metrics import SiteMetrics
from imsrelay.observe.protocol_log import ProtocolLog
from imsrelay.observe.readiness import Readiness
from imsrelay.policy import loops
from imsrelay.policy.auth import AuthLimits, FailureLimiter, Identity, dummy_hash, verify_password
from imsrelay.policy.backpressure import Backlog, Limits
from imsrelay.policy.connection_limits import Caps, ConnectionCounter
from imsrelay.policy.inbound import InboundPolicy
from imsrelay.policy.loops import SelfEndpoints
from imsrelay.policy.restrictions import AcceptRules, Client, FilterDecision, RelayRules
from imsrelay.policy.rewrite import RewriteRules
from imsrelay.policy.transfer_mode import TRANSFER_MODE_KEY, TransferMode, holds, parse_mode
from imsrelay.queue import dsn
from imsrelay.queue.manager import QueueManager
from imsrelay.queue.spool import Spool
from imsrelay.routing.dns import MailResolver
from imsrelay.routing.host_addresses import local_addresses, site_endpoints
from imsrelay.routing.router import (
    MX,
    RELAY,
    Route,
    RoutingTable,
    directory_lookup_address,
    is_service_address,
    routing_table_for,
    self_addresses,
)
from imsrelay.transport.costed import CostedTransport
from imsrelay.transport.etrn import etrn_schedule
from imsrelay.transport.smtp import SmtpClient


class Site:
    def __init__(self, config: SiteConfig, *, clock: Callable[[], float] = time.time,
                 worker: int = 0, workers: int = 1) -> None:
        """``worker``/``workers``: ``imsrelay serve --workers N`` runs N processes of one
        site sharing its listening port (SO_REUSEPORT), directory and Maildirs, each
        with its own queue journal.  Worker 0 also provisions the directory, runs the
        replication and KCC schedules and the admin endpoint."""
        self.config = config
        self.clock = clock
        self.worker = worker
        self.workers = workers
        self.log = site_logger(config).bind(site=config.site, **({"worker": worker} if workers > 1 else {}))
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = SiteMetrics()
        self.faults = FaultBook(clock=clock)
        self.faults.listeners.append(self._fault_event)
        self.transfer_mode = parse_mode(config.transfer.mode)  # until read from the directory at start
        self.metrics.set_mode(self.transfer_mode)
        self.directory = Directory(config.data_dir / "directory.sqlite3", config.site, clock=clock)
        self.spool = Spool(config.data_dir, worker=worker)
        self.spool.committer.on_flush = self.metrics.flush.observe
        self.protocol_log: ProtocolLog | None = None
        if config.diagnostics.level("smtp_protocol_log", "none") != "none":
            self.protocol_log = ProtocolLog(config.data_dir, max_bytes=config.diagnostics.protocol_log_max_bytes,
                                            files=config.diagnostics.protocol_log_files,
                                            name=f"{config.site}.{worker}")
        self._etrn_tasks: list[asyncio.Task[None]] = []
        if workers > 1:
            use_worker_ids(worker)
            self.spool.lock_wait = 15.0  # a restarted worker waits for its predecessor to let go
        self._addressing = config.site_address  # refreshed from the directory
        self._learned_sites: tuple[tuple[str, str], ...] = ()
        self._loop_marker = loops.received_marker(config.hostname)
        self.replicator: Replicator | None = None
        self.admin: AdminServer | None = None
        resolver = MailResolver(config.dns.nameservers, timeout=config.dns.timeout)
        self.smtp_client = SmtpClient(config, resolver, self.self_endpoints, self.log, metrics=self.metrics,
                                      protocol_log=self.protocol_log)
        self.tracking = tracking.TrackingLog(config.data_dir / "tracking.sqlite3", config.site,
                                             days=config.tracking.days, enabled=config.tracking.enabled,
                                             clock=clock)
        transport = CostedTransport(self.smtp_client, faults=self.faults, metrics=self.metrics, log=self.log)
        self.qmgr = QueueManager(self.spool, inputs=self, transport=transport, tracking_log=self.tracking,
                                 directory_deliver=self._directory_deliver, delivery=config.delivery,
                                 data_dir=config.data_dir, hostname=config.hostname, log=self.log,
                                 priorities=config.priorities, clock=clock)
        q = config.queue
        self.flow = FlowGate(Limits(q.backpressure_at, q.refuse_at, q.max_delay), self._backlog, metrics=self.metrics)
        self.qmgr.on_progress = self.flow.progressed
        self._free_bytes = 0
        self._endpoints: tuple[int, float, frozenset[tuple[str, int]]] | None = None
        self._free_checked = -10.0
        self._mailbox_cache: dict[str, Mailbox | None] = {}
        self._cache_generation = 0
        self._seen_usn = -1
        self._table: RoutingTable | None = None
        self._policy: tuple[tuple[str, tuple[tuple[str, str], ...], frozenset[str]], InboundPolicy] | None = None
        self._server: asyncio.base_events.Server | None = None
        self._submission_servers: list[asyncio.base_events.Server] = []
        self.submission_ports: dict[str, int] = {}  # "submission" / "smtps" -> bound port
        a = config.auth
        self.auth_failures = FailureLimiter(AuthLimits(max_failures=a.max_failures, window=a.failure_window,
                                                       lockout=a.lockout, failure_delay=a.failure_delay))
        self._relay_rules = relay_rules_for(config)
        self._accept_rules = accept_rules_for(config)
        self._sessions: weakref.WeakSet[Any] = weakref.WeakSet()
        self._refresher: asyncio.Task[None] | None = None
        self.bound_port: int | None = None
        self.connections = ConnectionCounter(inbound_caps(config, workers))
        self._provisioned = False
        self._recovered = False
        self.readiness = Readiness()
        self.readiness.add("listening", lambda: None if self._server is not None else "the SMTP port is not open yet")
        self.readiness.add("spool recovered", lambda: None if self._recovered else "the queue is being recovered")
        self.readiness.add("directory provisioned",
                           lambda: None if self._provisioned else "the directory is not provisioned yet")
        self.message_store = MessageStore(config.site, config.data_dir / "mailboxes")
        self.readiness.add("queue manager running", self._queue_manager_problem)
        try:
            self._build_replication_and_admin()
        except Exception:
            self.directory.close()
            self.spool.close()
            if self.protocol_log is not None:
                self.protocol_log.close()
            raise

    async def _wait_for_provisioning(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not await self.directory.run(lambda: self.directory.provisioned):
            if time.monotonic() > deadline:
                raise RuntimeError("worker 0 did not provision the directory")
            await asyncio.sleep(0.1)

    def _build_replication_and_admin(self) -> None:
        """Directory replication needs the organisation key; the admin endpoint a token."""
        if self.config.replication.enabled:
            self.replicator = Replicator(
                self.config, self.directory, routing_table=self.routing_table, enqueue=self.enqueue_local,
                queued=lambda: self.qmgr.envelopes.values(), check_now=self.check_now, log=self.log,
                clock=self.clock)
        elif self.config.replication.connectors:
            self.log.warning("replication.disabled", reason="no organisation key: set replication.key or "
                             f"${self.config.replication.key_env}; dirsync messages are ignored")
        if self.config.admin.port != 0 and self.worker == 0:
            self.admin = AdminServer(self)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.admin is not None:  # first, so that /health and /ready answer while the site starts
            await self.admin.start()
        try:
            await self.tracking.start()
            await self._start_parts()
        except BaseException:
            if self.admin is not None:
                await self.admin.stop()
            await self.tracking.stop()
            raise

    async def _start_parts(self) -> None:
        cfg = self.config
        if self.worker == 0:
            provisioned = await self.directory.run(
                self.directory.provision, organisation=cfg.organisation, server=cfg.server,
                site_domain=cfg.site_domain, hostname=cfg.hostname,
                mailboxes=[(m.alias, m.display_name, m.extra_addresses) for m in cfg.mailboxes])
            if provisioned:
                self.log.info("directory.provisioned", mailboxes=len(cfg.mailboxes), data_dir=str(cfg.data_dir))
            await self.directory.run(self._provision_passwords)
        else:
            await self._wait_for_provisioning()
        if self.worker == 0:
            await self.directory.run(self._initial_transfer_mode)
        self._provisioned = True
        await self.refresh()
        loop = asyncio.get_running_loop()

        def changed() -> None:  # called on the directory's thread
            loop.call_soon_threadsafe(self._directory_changed)

        self.directory.listeners.append(changed)
        await self.qmgr.start()
        if self.worker == 0:
            adopted = await self.spool.adopt_orphans(self.workers)
            for env in adopted:
                self.qmgr.submit(env)
            if adopted:
                self.log.info("queue.adopted", messages=len(adopted), reason="journals of workers no longer running")
        self._reserve_descriptors()
        self._recovered = True
        tls = self._tls_context()
        factory = server_factory(SiteHandler(self, cfg, self.log, self.clock), tls, self.connections)

        def session() -> Any:  # remember live sessions: stop() must end them too
            protocol = factory()
            self._sessions.add(protocol)
            return protocol

        self._server = await loop.create_server(session, host=cfg.smtp.listen, port=cfg.smtp.port,
                                                reuse_address=True, reuse_port=self.workers > 1)
        self.bound_port = self._server.sockets[0].getsockname()[1]
        await self._start_submission(tls, session_of=self._sessions)
        self._refresher = asyncio.create_task(self._refresh_periodically(), name="site-refresh")
        if self.replicator is not None and self.worker == 0:
            await self.replicator.start()  # schedules run once per site, in worker 0
        if self.worker == 0:
            self._etrn_tasks = [asyncio.create_task(etrn_schedule(self, r), name=f"etrn-{r.host}")
                                for r in cfg.etrn.requests]
        self.log.info("site.started", listen=cfg.smtp.listen, port=self.bound_port, hostname=cfg.hostname,
                      data_dir=str(cfg.data_dir), tls=tls is not None)

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        if self.replicator is not None and self.worker == 0:
            await self.replicator.stop()
        for server in self._submission_servers:
            server.close()
        if self._server is not None:
            self._server.close()
            # Python 3.11's Server.close() leaves accepted connections open: a peer's pooled
            # connection would keep talking to this stopped site (and its stopped queue).
            # A session inside DATA first gets its reply out (bounded wait): a message made
            # durable but never answered would come again from the sender, a duplicate.
            await close_sessions(list(self._sessions), grace=STOP_GRACE)
            await self._server.wait_closed()
        for server in self._submission_servers:
            await server.wait_closed()
        self._submission_servers.clear()
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        for task in self._etrn_tasks:
            task.cancel()
        await asyncio.gather(*self._etrn_tasks, return_exceptions=True)
        await self.qmgr.stop()
        await self.smtp_client.close()
        await self.tracking.stop()
        self.spool.close()
        self.directory.close()
        if self.protocol_log is not None:
            self.protocol_log.close()
        self.log.info("site.stopped")

    # ------------------------------------------------------------ transfer mode

    def _initial_transfer_mode(self) -> None:
        if self.directory.get_meta(TRANSFER_MODE_KEY) is None:
            self.directory.set_meta(TRANSFER_MODE_KEY, parse_mode(self.config.transfer.mode).value)

    async def set_transfer_mode(self, mode: TransferMode) -> TransferMode:
        """Change the Transfer mode now (kept in the directory database: it survives a
        restart); returns the previous mode."""
        await self.directory.run(self.directory.set_meta, TRANSFER_MODE_KEY, mode.value)
        previous = self.transfer_mode
        self._apply_transfer_mode(mode)
        return previous

    def _apply_transfer_mode(self, mode: TransferMode) -> None:
        if mode is self.transfer_mode:
            return
        previous, self.transfer_mode = self.transfer_mode, mode
        self.metrics.set_mode(mode)
        released = self.qmgr.release_held("transfer")
        self.log.info("transfer_mode.changed", mode=mode.value, previous=previous.value, released=released)

    def release_etrn(self, node: str) -> int:
        """ETRN from an allowed host: start the mail held for ``node``."""
        return self.qmgr.release_etrn(node)

    def hold_reason(self, queue_id: str, route: Route) -> str | None:
        """Why a due recipient must wait instead of being attempted (None: go)."""
        if holds(self.transfer_mode, remote=route.kind in (RELAY, MX)):
            return f"transfer:{self.transfer_mode.value}"
        if route.etrn and queue_id not in self.qmgr.etrn_released:
            return f"etrn:{(route.domain or '').lower()}:{route.etrn.lower()}"
        return None

    # ------------------------------------------------------------ faults, notifications

    def _fault_event(self, what: str, fault: Fault) -> None:
        if what == "fired":
            self.metrics.faults.labels(fault.kind).inc()
            self.log.info("fault.fired", fault=fault.id, kind=fault.kind, stage=fault.stage, peer=fault.peer)
        else:
            self.log.info(f"fault.{what}", fault=fault.id, kind=fault.kind, description=fault.describe())
        if what in ("cleared", "expired") and fault.kind == "link":
            self.qmgr.retry_now()  # the link is back: what waited for it goes now (drain)

    async def ndr_copy_address(self) -> str | None:
        """The administrator mailbox that receives copies of NDRs (Q190708), if enabled."""
        n = self.config.notifications
        if not n.copy_ndrs or not n.administrator:
            return None
        if "@" in n.administrator:
            return n.administrator
        mbx = await self.directory.run(self.directory.mailbox, n.administrator, self.config.site)
        if mbx is None or not mbx.primary_address:
            self.log.warning("notifications.no_administrator", administrator=n.administrator,
                             reason="no such mailbox at this site: NDR copies are not sent")
            return None
        return mbx.primary_address
    def _reserve_descriptors(self) -> None:
        """Keep descriptors for delivery and the spool whatever inbound clients do:
        raise the soft RLIMIT_NOFILE to the hard limit, and lower the inbound cap
        when even that leaves too little (logged)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        reserved = descriptors_reserved(self.config)
        caps = self.connections.caps
        room = soft - reserved
        if caps.total > room:
            lowered = max(1, room)
            self.log.warning("smtp.connection_cap_lowered", configured=caps.total, lowered=lowered,
                             nofile=soft, reserved=reserved,
                             reason="RLIMIT_NOFILE leaves too few descriptors for delivery and the spool")
            self.connections.caps = Caps(lowered, min(caps.per_ip, lowered), caps.exempt)

    def _tls_context(self) -> ssl.SSLContext | None:
        cfg = self.config.smtp
        cert, key = cfg.tls_cert, cfg.tls_key
        if (not cert or not key) and cfg.tls_generate:
            cert, key = self._throwaway_certificate()
        if not cert or not key:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def _throwaway_certificate(self) -> tuple[Any, Any]:
        """``smtp.tls_generate``: a lab CA and a certificate for this site in ``<data_dir>/tls``."""
        cfg = self.config
        tls_dir = cfg.data_dir / "tls"
        ca = ensure_ca(tls_dir)
        listen = cfg.smtp.listen
        addresses = sorted(local_addresses()) if listen in ("", "0.0.0.0", "::") else [listen]
        names = [cfg.hostname, f"{cfg.server}.{cfg.site_domain}", "localhost"]
        cert = ensure_certificate(tls_dir, "server", ca=ca, hostnames=names,
                                  addresses=[a for a in addresses if _is_ip(a)])
        self.log.info("tls.generated", ca=str(ca[0]), certificate=str(cert[0]))
        return cert

    async def _start_submission(self, tls: ssl.SSLContext | None, *, session_of: Any) -> None:
        """[submission]: port 587 (STARTTLS, AUTH before MAIL) and 465 (implicit TLS)."""
        sub = self.config.submission
        listen = sub.listen or self.config.smtp.listen
        loop = asyncio.get_running_loop()
        for listener, port in (("submission", sub.port), ("smtps", sub.tls_port)):
            if port is None:
                continue
            if tls is None:
                raise RuntimeError(f"{self.config.path}: submission needs TLS (smtp.tls_cert or smtp.tls_generate)")
            factory = server_factory(SiteHandler(self, self.config, self.log, self.clock), tls, self.connections,
                                     listener=listener)

            def session(factory: Any = factory) -> Any:
                protocol = factory()
                session_of.add(protocol)
                return protocol

            server = await loop.create_server(session, host=listen, port=port, reuse_address=True,
                                              reuse_port=self.workers > 1,
                                              ssl=tls if listener == "smtps" else None)
            self._submission_servers.append(server)
            self.submission_ports[listener] = server.sockets[0].getsockname()[1]
            self.log.info("submission.started", listener=listener, listen=listen,
                          port=self.submission_ports[listener])

    # ------------------------------------------------------------ auth and restrictions

    def _provision_passwords(self) -> None:
        """Password hashes from the config file, for mailboxes that have none yet."""
        replicate = self.config.auth.replicate_credentials
        for m in self.config.mailboxes:
            if m.password_hash and self.directory.ensure_password_hash(m.alias, m.password_hash,
                                                                        replicate=replicate):
                self.log.info("auth.password_set", alias=m.alias, source="config")

    async def authenticate(self, login: str, password: bytes) -> Identity | None:
        """The mailbox account ``login`` names, if ``password`` is its password.
        The scrypt check runs off the event loop; an unknown login costs the same."""
        found = await self.directory.run(self.directory.credential, login,
                                         replicated=self.config.auth.replicate_credentials)
        stored = found[1] if found is not None else dummy_hash()
        ok = await asyncio.to_thread(verify_password, password, stored)
        if found is None or not ok:
            return None
        mbx = found[0]
        return Identity(mbx.alias, mbx.home_site, tuple(mbx.smtp_addresses))

    def accept_rules(self) -> AcceptRules:
        return self._accept_rules

    def relay_rules(self) -> RelayRules:
        return self._relay_rules

    async def keep_filtered(self, queue_id: str, sender: str, filtered: dict[str, FilterDecision],
                            message: bytes, client: Client) -> None:
        """Message Filtering: recipients whose copy is deleted or kept in the turf
        directory (``<queue id>.eml`` and ``.json``, written durably before the 250)."""
        kept = {r: d for r, d in filtered.items() if d.action == "turf"}
        if kept:
            await asyncio.to_thread(write_turf, self.config.turf_dir, queue_id, sender, kept, message, client,
                                    self.clock())
        for rcpt, decision in filtered.items():
            self.log.info("message.filtered", queue_id=queue_id, peer=client.ip, sender=sender or "<>",
                          recipient=rcpt, action=decision.action, rule=decision.rule,
                          turf=str(self.config.turf_dir / f"{queue_id}.eml") if decision.action == "turf" else None)

    # ------------------------------------------------------------ live state

    async def refresh(self) -> None:
        """Re-read what the site derives from its directory (Site Addressing, sites
        learned by Check Now) and drop cached look-ups if the directory changed —
        also when another process (an offline CLI command) changed it."""
        site, learned, usn, mode = await self.directory.run(self._directory_snapshot)
        if mode:
            try:
                self._apply_transfer_mode(parse_mode(mode))  # changed by another process (offline CLI, worker 0)
            except ValueError:
                self.log.warning("transfer_mode.invalid", stored=mode)
        if usn != self._seen_usn:
            self._seen_usn = usn
            self._clear_lookups()
        if site is not None:
            self._addressing = site.smtp_address
        self._learned_sites = learned
        self._table = None

    def _directory_snapshot(self) -> tuple[SiteObject | None, tuple[tuple[str, str], ...], int, str | None]:
        return (self.directory.site_object(), tuple(kcc.learned_sites(self.directory)), self.directory.highest_usn,
                self.directory.get_meta(TRANSFER_MODE_KEY))

    def _directory_changed(self) -> None:
        self._clear_lookups()
        self._schedule_refresh()

    def _clear_lookups(self) -> None:
        self._mailbox_cache.clear()
        self._cache_generation += 1

    async def lookup_mailboxes(self, addresses: list[str]) -> list[Mailbox | None]:
        """Directory look-ups by address (postmaster at a local domain is the
        ``smtp.postmaster`` mailbox, RFC 5321 4.5.1)."""
        found = await self._lookup_mailboxes(addresses)
        if any(m is None and self._is_postmaster(a) for a, m in zip(addresses, found, strict=True)):
            admin = await self.directory.run(self.directory.mailbox, self.config.smtp.postmaster)
            found = [admin if m is None and self._is_postmaster(a) else m
                     for a, m in zip(addresses, found, strict=True)]
        return found

    def _is_postmaster(self, address: str) -> bool:
        local, _, domain = address.rpartition("@")
        if local.lower() != "postmaster":
            return False
        domain = domain.lower().rstrip(".")
        return domain in {self.config.site_domain.lower(), self.addressing_domain,
                          *(d.lower() for d in self.config.smtp.accepted_domains if not d.startswith("#")),
                          *(d[1:].lower() for d in self.config.smtp.accepted_domains if d.startswith("#"))}

    async def _lookup_mailboxes(self, addresses: list[str]) -> list[Mailbox | None]:
        """Directory look-ups by address, answered from memory when possible."""
        own = self_addresses(self.self_endpoints())
        if own and any("[" in a for a in addresses):  # user@[this site's address] is user@site domain
            addresses = [directory_lookup_address(a, self.config.site_domain, own) for a in addresses]
        missing = [a for a in addresses if a.lower() not in self._mailbox_cache]
        if missing:
            generation = self._cache_generation
            found = await self.directory.run(self.directory.find_recipients, missing)
            if generation == self._cache_generation and len(self._mailbox_cache) < 10_000:
                for a, m in zip(missing, found, strict=True):
                    self._mailbox_cache[a.lower()] = m
            else:
                answers = {a.lower(): m for a, m in zip(missing, found, strict=True)}
                return [answers[a.lower()] if a.lower() in answers else self._mailbox_cache.get(a.lower())
                        for a in addresses]
        return [self._mailbox_cache.get(a.lower()) for a in addresses]

    def free_space(self) -> int:
        """Bytes free on the queue's file system (statvfs, re-read at most once a second)."""
        now = time.monotonic()
        if now - self._free_checked > 1.0:
            st = os.statvfs(self.spool.root)
            self._free_bytes = st.f_bavail * st.f_frsize
            self._free_checked = now
        return self._free_bytes

    def _schedule_refresh(self) -> None:
        asyncio.ensure_future(self.refresh())

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(5.0 if self.workers == 1 else 1.0)
            try:
                await self.refresh()
            except Exception as exc:  # keep serving with the last known state
                self.log.warning("site.refresh_failed", error=repr(exc))

    @property
    def learned_sites(self) -> tuple[tuple[str, str], ...]:
        """(site, routing domain) pairs Check Now made known to routing."""
        return self._learned_sites

    async def check_now(self) -> kcc.KccResult:
        """Check Now (the knowledge consistency check) at this site."""
        return await kcc.check_now(self.directory, self.config, refresh=self.refresh, log=self.log)

    def _backlog(self) -> Backlog:
        return Backlog(queued=self.qmgr.backlog, incoming=self.qmgr.incoming)

    @property
    def addressing_domain(self) -> str:
        return self._addressing.lstrip("@").lower()

    def self_endpoints(self) -> SelfEndpoints:
        """Where this site listens (recomputed at most once a minute: interfaces may change)."""
        port = self.bound_port or self.config.smtp.port
        now = time.monotonic()
        cached = self._endpoints
        if cached is None or cached[0] != port or now - cached[1] > 60.0:
            cached = self._endpoints = (port, now, site_endpoints(self.config, port))
        return cached[2]

    def inbound_policy(self) -> InboundPolicy:
        """The RCPT policy, rebuilt only when one of its live inputs changed (the Site
        Addressing domain, the sites learned by Check Now, this site's own addresses)."""
        inputs = (self.addressing_domain, self._learned_sites, self_addresses(self.self_endpoints()))
        cached = self._policy
        if cached is None or cached[0] != inputs:
            policy = inbound_policy_for(self.config, addressing_domain=inputs[0], learned_sites=inputs[1],
                                        own_addresses=inputs[2])
            cached = self._policy = (inputs, policy)
        return cached[1]

    async def routing_table(self) -> RoutingTable:
        if self._table is None:
            self._table = self._build_routing_table()
        return self._table

    def _build_routing_table(self) -> RoutingTable:
        return routing_table_for(self.config, addressing_domain=self.addressing_domain,
                                 learned_sites=self._learned_sites, self_endpoints=self.self_endpoints())


    async def rewrite_rules(self) -> RewriteRules:
        return RewriteRules(self.config.site_domain, self.addressing_domain)

    async def recipient_known(self, address: str) -> bool:
        try:
            parsed = parse_address(address)
        except AddressError:
            return False
        table = await self.routing_table()
        if is_service_address(parsed, table):
            return True
        return (await self.lookup_mailboxes([address]))[0] is not None

    async def local_primaries(self, addresses: list[str]) -> dict[str, str]:
        """Lookup key → primary address, for addresses of mailboxes homed here."""
        found = await self._lookup_mailboxes(addresses)  # postmaster stays postmaster (masqueraded)
        out: dict[str, str] = {}
        for addr, mbx in zip(addresses, found, strict=True):
            if mbx is not None and mbx.home_site == self.config.site and mbx.primary_address:
                out[parse_address(addr).key] = mbx.primary_address
        return out

    def _queue_manager_problem(self) -> str | None:
        """The ``queue manager running`` readiness check: its supervisor's view
        (a failing stage is retried with back-off; meanwhile the site is not ready)."""
        main = self.qmgr._main
        if main is None or main.done():
            return "the queue manager is not running"
        return None if self.qmgr.health.ok else self.qmgr.health.reason()

    def seen_before(self, raw: bytes) -> bool:
        return loops.seen_before(raw, self._loop_marker)

    # ------------------------------------------------------------ queue

    async def accept(self, env: Envelope, message: bytes) -> None:
        await self.spool.enqueue(env, message)
        self._track_received(env, message)
        self.qmgr.submit(env, message)
        self.metrics.messages_in.inc()
        self.metrics.bytes_in.inc(len(message))

    def _track_received(self, env: Envelope, message: bytes) -> None:
        self.tracking.record(tracking.RECEIVED, env.queue_id, message_id=tracking.message_id_of(message),
                             sender=env.sender, related=env.extra.get("report_for"), origin=env.origin,
                             client=env.client or None, helo=env.helo or None, size=len(message),
                             recipients=[r.address for r in env.recipients], auth=env.extra.get("auth"))

    async def enqueue_local(self, env: Envelope, message: bytes) -> None:
        """Queue a message this site generates itself (NDRs, replication)."""
        await self.spool.enqueue(env, message)
        self._track_received(env, message)
        self.qmgr.submit(env, message)
        self.log.info("message.queued", queue_id=env.queue_id, sender=env.sender or "<>",
                      recipients=[r.address for r in env.recipients], origin=env.origin, size=len(message))

    async def _directory_deliver(self, env: Envelope, message: bytes) -> None:
        if self.replicator is None:
            self.log.warning("replication.ignored", queue_id=env.queue_id, sender=env.sender,
                             reason="replication is not configured at this site")
            return
        await self.replicator.handle_message(env, message)

    def reporting_site(self) -> dsn.ReportingSite:
        cfg = self.config
        return dsn.ReportingSite(cfg.organisation, cfg.site, cfg.server, cfg.hostname)

    def postmaster_address(self) -> str:
        return f"postmaster@{self.addressing_domain}"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def write_turf(turf_dir: Path, queue_id: str, sender: str, kept: dict[str, FilterDecision], message: bytes,
               client: Client, now: float) -> None:
    """One filtered message in the turf directory: the message as received and what
    filtered it (both fsync'ed)."""
    turf_dir.mkdir(parents=True, exist_ok=True)
    meta = {"queue_id": queue_id, "sender": sender or "<>", "received_at": now, "client": client.ip,
            "auth": client.authenticated,
            "recipients": [{"address": r, "rule": d.rule} for r, d in kept.items()]}
    for name, data in ((f"{queue_id}.eml", message), (f"{queue_id}.json", json.dumps(meta, indent=2).encode())):
        tmp = turf_dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, turf_dir / name)
    fd = os.open(turf_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def inbound_caps(config: SiteConfig, workers: int = 1) -> Caps:
    smtp = config.smtp
    return Caps(smtp.max_inbound_connections, smtp.max_connections_per_ip, smtp.relay_networks).for_workers(workers)


def descriptors_reserved(config: SiteConfig) -> int:
    """Descriptors kept for everything but inbound sessions: one per concurrent
    delivery, plus the journal, SQLite, Maildir files, DNS, admin and the listener."""
    return config.delivery.max_deliveries + 64


async def run_site(config: SiteConfig, stop: asyncio.Event, *, worker: int = 0, workers: int = 1) -> None:
    site = Site(config, worker=worker, workers=workers)
    await site.start()
    console = None
    try:
        if config.console.enabled and worker == 0:
            console = site_console(site)
            await console.start()
        await stop.wait()
    finally:
        if console is not None:
            await console.stop()
        await site.stop()
