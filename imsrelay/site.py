"""Composition root: one Exchange site's IMS built from its configuration.

``Site`` builds the parts (directory and its look-ups, spool, queue manager and its
door, the delivery agents, listeners, replication, admin endpoint), hands each what
it uses, starts and stops them.  What it keeps itself is the site's live state
derived from the config file and the directory (Site Addressing, sites learned by
Check Now, the routing table, the inbound policy, the Transfer mode), refreshed when
the directory changes; the ingress, the queue manager and the admin endpoint read
it through their protocols (``Ingress``, ``QueueInputs``, ``AdminSite``).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Callable

from imsrelay.access.service import MailboxAccess, mail_owner
from imsrelay.admin.federation import SiteServers
from imsrelay.admin.message_store import MessageStore
from imsrelay.admin.server import AdminServer
from imsrelay.directory import kcc
from imsrelay.directory.intrasite import IntraSite
from imsrelay.directory.lookups import MailboxLookups
from imsrelay.directory.replication import Replicator, unconfigured_peer_reply
from imsrelay.directory.restrictions_report import (
    accept_rules_for,
    inbound_policy_for,
    relay_rules_for,
)
from imsrelay.directory.store import Directory
from imsrelay.ingress.adapter import ImsSMTP, Slots, server_factory
from imsrelay.ingress.flow_gate import FlowGate
from imsrelay.ingress.handler import SiteHandler
from imsrelay.ingress.listeners import Listeners, inbound_caps
from imsrelay.ingress.turf import Turf
from imsrelay.model.addresses import AddressError, parse_address
from imsrelay.model.envelope import Envelope, use_worker_ids
from imsrelay.model.objects import ATTENDANT_LOCAL, Mailbox, Protocols, SiteObject
from imsrelay.model.settings import SiteConfig
from imsrelay.observe import tracking
from imsrelay.observe.faults import Fault, FaultBook
from imsrelay.observe.link_monitor import LinkMonitors
from imsrelay.observe.logs import site_logger
from imsrelay.observe.metrics import SiteMetrics
from imsrelay.observe.protocol_log import ProtocolLog
from imsrelay.observe.readiness import Readiness
from imsrelay.policy import mail_loops, protocols
from imsrelay.policy.auth import (
    AuthLimits,
    GuessGuard,
    GuessLimits,
    Identity,
    dummy_hash,
    verify_password,
)
from imsrelay.policy.backpressure import Backlog, Limits
from imsrelay.policy.connection_limits import ConnectionCounter
from imsrelay.policy.expansion import Expansion
from imsrelay.policy.inbound import InboundPolicy, tracking_reserve
from imsrelay.policy.internet_mail import OutboundRules
from imsrelay.policy.mail_loops import SelfEndpoints
from imsrelay.policy.restrictions import AcceptRules, Client, FilterDecision, RelayRules
from imsrelay.policy.rewrite import RewriteRules
from imsrelay.policy.transfer_mode import TRANSFER_MODE_KEY, TransferMode, holds, parse_mode
from imsrelay.queue import dsn
from imsrelay.queue.agents import Transport
from imsrelay.queue.door import QueueDoor
from imsrelay.queue.manager import QueueManager
from imsrelay.queue.spool import Spool
from imsrelay.routing.dns import MailResolver
from imsrelay.routing.host_addresses import site_endpoints
from imsrelay.routing.router import (
    ATTENDANT,
    DIRECTORY,
    FAIL,
    LOCAL,
    MX,
    RELAY,
    Route,
    RoutingTable,
    is_attendant_address,
    is_service_address,
    routing_table_for,
    self_addresses,
    sent_back,
    site_routing_domain,
)
from imsrelay.transport.costed import CostedTransport
from imsrelay.transport.directory import DirectoryTransport
from imsrelay.transport.error import ErrorTransport
from imsrelay.transport.etrn import etrn_schedule
from imsrelay.transport.maildir import MaildirTransport
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
        if config.diagnostics.protocol_log_enabled:
            self.protocol_log = ProtocolLog(config.data_dir, max_bytes=config.diagnostics.protocol_log_max_bytes,
                                            files=config.diagnostics.protocol_log_files,
                                            name=f"{config.site}.{worker}")
        self._etrn_tasks: list[asyncio.Task[None]] = []
        if workers > 1:
            use_worker_ids(worker)
            self.spool.lock_wait = 15.0  # a restarted worker waits for its predecessor to let go
        self._addressing = config.site_address  # refreshed from the directory
        self._learned_sites: tuple[tuple[str, str], ...] = ()
        self._loop_marker = mail_loops.received_marker(config.hostname)
        self.replicator: Replicator | None = None
        self.intrasite: IntraSite | None = None  # a site of several servers: replication between them
        self.admin: AdminServer | None = None
        # who restarts this site when its administrator asks (imsrelay serve, the lab); None: nobody
        self.on_restart: Callable[[], None] | None = None
        resolver = MailResolver(config.dns.nameservers, timeout=config.dns.timeout,
                                system=not config.lab.sealed)
        self.smtp_client = SmtpClient(config, resolver, self.self_endpoints, self.log, metrics=self.metrics,
                                      protocol_log=self.protocol_log)
        self.tracking = tracking.TrackingLog(
            config.data_dir / "tracking.sqlite3", config.site, days=config.tracking.days,
            enabled=config.tracking.enabled, clock=clock, max_bytes=config.tracking.max_bytes,
            free_space=self._free_space_now, log=self.log,
            min_free=tracking_reserve(max_message_size=config.smtp.max_message_size,
                                      minfree=config.smtp.queue_minfree))
        smtp = CostedTransport(self.smtp_client, faults=self.faults, metrics=self.metrics, log=self.log)
        transports: dict[str, Transport] = {
            LOCAL: MaildirTransport(config.data_dir, self.spool.committer, hostname=config.hostname,
                                    owner=mail_owner(config.access)),
            DIRECTORY: DirectoryTransport(self._directory_deliver, log=self.log),
            ATTENDANT: DirectoryTransport(self._attendant_deliver, log=self.log, service="system attendant",
                                          error_event="link_monitor.internal_error"),
            RELAY: smtp, MX: smtp, FAIL: ErrorTransport()}
        self.qmgr = QueueManager(self.spool, inputs=self, transports=transports, tracking_log=self.tracking,
                                 delivery=config.delivery, log=self.log, priorities=config.priorities, clock=clock,
                                 outbound=OutboundRules(config.internet_mail, config.delivery.max_message_size))
        self._journal: tuple[int, str | None] | None = None  # (directory USN, the journal recipient's address)
        self.door = QueueDoor(self.spool, self.qmgr, tracking_log=self.tracking, metrics=self.metrics, log=self.log,
                              journal=self if config.journaling.recipient else None,
                              journal_reports=config.journaling.reports, expander=self)
        # the system attendant answers other sites' pings; worker 0 of the site's bridgehead server
        # (the one that talks to the other sites) runs this site's monitors (KB Q246674)
        self.link_monitors = LinkMonitors(
            config.link_monitors if worker == 0 and config.bridgehead else (), site=config.site,
            attendant=f"{ATTENDANT_LOCAL}@{config.site_domain}", hostname=config.hostname,
            resolve=self._link_target_address, enqueue=self.enqueue_local, notify_address=self._notify_address,
            answers_to=self._is_organisation_attendant,
            metrics=self.metrics, log=self.log, clock=clock)
        self.lookups = MailboxLookups(
            self.directory, site=config.site, site_domain=config.site_domain, postmaster=config.smtp.postmaster,
            accepted_domains=config.smtp.accepted_domains, addressing_domain=lambda: self.addressing_domain,
            own_addresses=lambda: self_addresses(self.self_endpoints()))
        self.turf = Turf(config.turf_dir, log=self.log, clock=clock)
        q = config.queue
        self.flow = FlowGate(Limits(q.backpressure_at, q.refuse_at, q.max_delay), self._backlog, metrics=self.metrics)
        self.qmgr.on_progress = self.flow.progressed
        self._free_bytes = 0
        self._endpoints: tuple[int, float, frozenset[tuple[str, int]]] | None = None
        self._free_checked = -10.0
        self._seen_usn = -1
        self._table: RoutingTable | None = None
        self._policy: tuple[tuple[str, tuple[tuple[str, str], ...], SelfEndpoints], InboundPolicy] | None = None
        self._rewrite = RewriteRules(config.site_domain, self.addressing_domain)  # (rewrite_rules)
        a = config.auth
        self.auth_guard = GuessGuard(GuessLimits(
            pair=AuthLimits(max_failures=a.max_failures, window=a.failure_window, lockout=a.lockout,
                            failure_delay=a.failure_delay),
            address=AuthLimits(max_failures=a.max_failures_per_address, window=a.failure_window, lockout=a.lockout),
            account=AuthLimits(max_failures=a.max_failures_per_account, window=a.failure_window, lockout=a.lockout),
            trusted_for=a.trusted_for))
        self._relay_rules = relay_rules_for(config)
        self._accept_rules = accept_rules_for(config)
        self._refresher: asyncio.Task[None] | None = None
        self.connections = ConnectionCounter(inbound_caps(config, workers))
        self.listeners = Listeners(config, self._protocols, self.connections, workers=workers, log=self.log)
        self._provisioned = False
        self._recovered = False
        self.readiness = Readiness()
        self.readiness.add("listening", lambda: None if self.listeners.listening else "the SMTP port is not open yet")
        self.readiness.add("spool recovered", lambda: None if self._recovered else "the queue is being recovered")
        self.readiness.add("directory provisioned",
                           lambda: None if self._provisioned else "the directory is not provisioned yet")
        self.message_store = MessageStore(config.site, config.data_dir / "mailboxes",
                                          server=config.server if len(config.servers) > 1 else None)
        self.access: MailboxAccess | None = None
        if config.access.enabled and worker == 0:  # one Dovecot per server, next to worker 0
            self.access = MailboxAccess(
                config.access, site=self, site_name=config.site, data_dir=config.data_dir,
                listen=config.smtp.listen, allow_plaintext=config.auth.allow_plaintext,
                diagnostics=config.diagnostics, certificate=lambda: self.listeners.certificate_files, log=self.log)
        self.readiness.add("queue manager running", self._queue_manager_problem)
        if self.link_monitors.monitors:  # shown in /ready, never failing it: a link down is no site down
            self.readiness.add_detail("link monitors", self.link_monitors.summary)
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
        if self.config.peer_servers and self.worker == 0:
            self.intrasite = IntraSite(self.config, self.directory, log=self.log, clock=self.clock)
        if self.config.admin.port != 0 and self.worker == 0:
            # the site's other servers ([[servers]]): the admin views answer for the whole site
            self.admin = AdminServer(self, servers=SiteServers.of(self.config, log=self.log))

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
                mailboxes=cfg.provisioned_mailboxes())
            if provisioned:
                self.log.info("directory.provisioned", mailboxes=len(cfg.mailboxes), data_dir=str(cfg.data_dir))
            await self.directory.run(self._provision_passwords)
            created = await self.directory.run(
                self.directory.ensure_configured,
                [(c.alias, c.display_name, c.target, c.extra_addresses) for c in cfg.custom_recipients],
                [(d.alias, d.display_name, d.members, d.owner, d.expansion_site, d.extra_addresses)
                 for d in cfg.distribution_lists])
            if created:
                self.log.info("directory.recipients_created", aliases=created)
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
        self._recovered = True
        await self.listeners.start()
        if self.access is not None:
            await self.access.start()
        self._refresher = asyncio.create_task(self._refresh_periodically(), name="site-refresh")
        if self.intrasite is not None:
            await self.intrasite.start()  # the site's other servers: pull, notify, backstop
        if self.replicator is not None and self.worker == 0:
            await self.replicator.start()  # schedules run once per site, in worker 0
        self.link_monitors.start()  # the bridgehead's worker 0 has the monitors (the others have none)
        if self.worker == 0:
            self._etrn_tasks = [asyncio.create_task(etrn_schedule(r, hostname=cfg.hostname, timeout=cfg.delivery.command_timeout, log=self.log),
                                                   name=f"etrn-{r.host}")
                                for r in cfg.etrn.requests]
        self.log.info("site.started", listen=cfg.smtp.listen, port=self.bound_port, hostname=cfg.hostname,
                      data_dir=str(cfg.data_dir), tls=self.listeners.tls is not None)

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        if self.replicator is not None and self.worker == 0:
            await self.replicator.stop()
        await self.link_monitors.stop()
        if self.intrasite is not None:
            await self.intrasite.stop()
        if self.access is not None:
            await self.access.stop()
        await self.listeners.stop()
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
        if route.server:  # an intra-site hop: the site's own traffic, not the IMS's (no Transfer mode)
            env = self.qmgr.envelopes.get(queue_id)
            if env is not None and sent_back(env.client, route, self.config.servers):
                return f"intrasite:{route.server}"
            return None
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
        return await self._mailbox_address(n.administrator, "NDR copies are not sent")

    async def _notify_address(self, notify: str | None) -> str | None:
        """Where a Link Monitor's alert mail goes: its ``notify``, else the Internet Mail
        tab's administrator (``notifications.administrator``); None: nowhere."""
        name = notify or self.config.notifications.administrator
        return await self._mailbox_address(name, "Link Monitor mail is not sent") if name else None

    async def _mailbox_address(self, name: str, consequence: str) -> str | None:
        """An address as given, or the primary address of the mailbox aliased ``name`` here."""
        if "@" in name:
            return name
        mbx = await self.directory.run(self.directory.mailbox, name, self.config.site)
        if mbx is None or not mbx.primary_address:
            self.log.warning("notifications.no_administrator", administrator=name,
                             reason=f"no such mailbox at this site: {consequence}")
            return None
        return mbx.primary_address

    async def _link_target_address(self, target: str) -> str | None:
        """A Link Monitor target's ping address: an address as given; a site's system
        attendant at its routing domain (Connected Sites or Check Now); None: no route yet."""
        if "@" in target:
            return target
        if target.lower() == self.config.site.lower():
            return f"{ATTENDANT_LOCAL}@{self.config.site_domain}"
        found = site_routing_domain(target, await self.routing_table())
        return f"{ATTENDANT_LOCAL}@{found[0]}" if found else None

    async def _is_organisation_attendant(self, sender: str) -> bool:
        """Whether ``sender`` is the system attendant of this site or of a site it knows
        (Connected Sites, or learned by Check Now): the pings the attendant answers."""
        try:
            address = parse_address(sender)
        except AddressError:
            return False
        if address.local.lower() != ATTENDANT_LOCAL:
            return False
        table = await self.routing_table()
        domains = {self.config.site_domain.lower(), *(c.routing_domain.lower() for c in table.connected_sites),
                   *(d.lower() for _, d in table.learned_sites)}
        return address.domain in domains

    async def _attendant_deliver(self, env: Envelope, message: bytes) -> str:
        return await self.link_monitors.receive(env, message)
    async def journal_address(self) -> str | None:
        """The journal recipient's address (Message Journaling, Q239427): the setting when
        it is an address, else the primary address of the mailbox with that alias
        (looked up again when the directory changed)."""
        recipient = self.config.journaling.recipient
        if not recipient or "@" in recipient:
            return recipient
        cached = self._journal
        if cached is not None and cached[0] == self._seen_usn:
            return cached[1]
        mbx = await self.directory.run(self.directory.mailbox, recipient, self.config.site)
        address = mbx.primary_address if mbx is not None and mbx.primary_address else None
        if address is None:
            # accepted mail is never held back for it: the site logs, and journals again once it exists
            self.log.error("journaling.no_recipient", recipient=recipient,
                           reason="no such mailbox at this site: messages are not journaled")
        self._journal = (self._seen_usn, address)
        return address

    # ------------------------------------------------------------ auth and restrictions

    def _provision_passwords(self) -> None:
        """Password hashes from the config file, for mailboxes that have none yet."""
        replicate = self.config.auth.replicate_credentials
        for m in self.config.mailboxes:
            if m.password_hash and self.directory.ensure_password_hash(m.alias, m.password_hash,
                                                                        replicate=replicate):
                self.log.info("auth.password_set", alias=m.alias, source="config")

    async def account_of(self, login: str) -> str:
        """The key failed attempts at ``login`` are counted under: the account it names
        (whatever form of the login: alias or address), else the login as given."""
        found = await self.directory.run(self.directory.credential, login,
                                         replicated=self.config.auth.replicate_credentials)
        return (found[0].alias if found is not None else login).lower()

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

    async def protocol_refusal(self, identity: Identity, protocol: str) -> str | None:
        """Why a mailbox may not use IMAP4/POP3 here (imsrelay/access asks at each
        login): homed at another site, or disabled at site, server or mailbox level."""
        cfg = self.config
        if identity.home_site != cfg.site:
            return (f"mailbox {identity.alias} is homed at site {identity.home_site}: "
                    f"log in at that site's server")
        site, mbx = await self.directory.run(lambda: (self.directory.site_object(),
                                                      self.directory.mailbox(identity.alias)))
        if mbx is None:
            return f"no mailbox {identity.alias} at {cfg.site}"
        return protocols.refusal(protocol, site=site.protocols if site else Protocols(),
                                 server=cfg.access.server_setting(protocol), mailbox=mbx.protocols,
                                 site_name=cfg.site, server_name=cfg.server, alias=mbx.alias)

    def accept_rules(self) -> AcceptRules:
        return self._accept_rules

    def relay_rules(self) -> RelayRules:
        return self._relay_rules

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
            self.lookups.clear()
        if site is not None:
            self._addressing = site.smtp_address
        self._learned_sites = learned
        self._table = None

    def _directory_snapshot(self) -> tuple[SiteObject | None, tuple[tuple[str, str], ...], int, str | None]:
        return (self.directory.site_object(), tuple(kcc.learned_sites(self.directory)), self.directory.highest_usn,
                self.directory.get_meta(TRANSFER_MODE_KEY))

    def _directory_changed(self) -> None:
        self.lookups.clear()
        self._schedule_refresh()
        if self.config.servers and self.qmgr.held_messages():
            self.qmgr.release_held("intrasite:")  # routed again with what the directory says now

    def _free_space_now(self) -> int:
        """(Any thread) bytes free on the queue's file system."""
        st = os.statvfs(self.config.data_dir)
        return st.f_bavail * st.f_frsize

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
        inputs = (self.addressing_domain, self._learned_sites, self.self_endpoints())  # (own addresses: of these)
        cached = self._policy
        if cached is None or cached[0] != inputs:
            policy = inbound_policy_for(self.config, addressing_domain=inputs[0], learned_sites=inputs[1],
                                        own_addresses=self_addresses(inputs[2]))
            cached = self._policy = (inputs, policy)
        return cached[1]

    async def routing_table(self) -> RoutingTable:
        if self._table is None:
            self._table = routing_table_for(self.config, addressing_domain=self.addressing_domain,
                                            learned_sites=self._learned_sites, self_endpoints=self.self_endpoints())
        return self._table

    async def rewrite_rules(self) -> RewriteRules:
        """The rules of the Site Addressing domain now (made again only when it changed)."""
        rules = self._rewrite
        if rules.addressing_domain != self.addressing_domain:
            rules = self._rewrite = RewriteRules(self.config.site_domain, self.addressing_domain)
        return rules

    async def recipient_known(self, address: str) -> bool:
        try:
            parsed = parse_address(address)
        except AddressError:
            return False
        table = await self.routing_table()
        if is_service_address(parsed, table) or is_attendant_address(parsed, table):
            return True
        if (await self.lookups.lookup_mailboxes([address]))[0] is not None:
            return True
        return (await self.lookups.lookup_entries([address]))[0] is not None  # a custom recipient or list

    async def directory_refusal(self, sender: str, address: str) -> str | None:
        """Replication mail from a site this one has no connector to is deferred
        (``directory.replication.unconfigured_peer_reply``); None: no objection."""
        if self.replicator is None:
            return None
        try:
            parsed = parse_address(address)
        except AddressError:
            return None
        table = await self.routing_table()
        if not is_service_address(parsed, table):
            return None
        connectors = [c.site for c in self.config.replication.connectors]
        return unconfigured_peer_reply(sender, self.config.site, connectors, table)

    def _queue_manager_problem(self) -> str | None:
        """The ``queue manager running`` readiness check: its supervisor's view
        (a failing stage is retried with back-off; meanwhile the site is not ready)."""
        if not self.qmgr.running:
            return "the queue manager is not running"
        return None if self.qmgr.health.ok else self.qmgr.health.reason()

    def seen_before(self, raw: bytes) -> bool:
        return mail_loops.seen_before(raw, self._loop_marker)

    # ------------------------------------------------------------ the parts, as the protocols name them

    def _protocols(self, tls: ssl.SSLContext | None, listener: str, slots: Slots) -> Callable[[], ImsSMTP]:
        """The session factory of one listener (``imsrelay.ingress.listeners``)."""
        return server_factory(SiteHandler(self, self.config, self.log, self.clock), tls, slots,
                              listener=listener)

    @property
    def bound_port(self) -> int | None:
        return self.listeners.bound_port

    @property
    def submission_ports(self) -> dict[str, int]:
        return self.listeners.submission_ports

    async def accept(self, env: Envelope, message: bytes) -> None:
        await self.door.accept(env, message)

    async def expansion(self, env: Envelope, message: bytes) -> Expansion | None:
        """Custom recipients and lists among a message's recipients, resolved (the door asks)."""
        return await self.lookups.expansion(env, message)

    async def enqueue_local(self, env: Envelope, message: bytes) -> None:
        await self.door.enqueue_local(env, message)

    async def lookup_mailboxes(self, addresses: list[str]) -> list[Mailbox | None]:
        return await self.lookups.lookup_mailboxes(addresses)

    async def local_primaries(self, addresses: list[str]) -> dict[str, str]:
        return await self.lookups.local_primaries(addresses)

    async def keep_filtered(self, queue_id: str, sender: str, filtered: dict[str, FilterDecision],
                            message: bytes, client: Client) -> None:
        await self.turf.keep_filtered(queue_id, sender, filtered, message, client)

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
