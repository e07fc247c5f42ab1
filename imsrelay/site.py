"""Composition root: one Exchange site's IMS built from its configuration.

``Site`` owns the parts (directory, spool, queue manager, SMTP server, outbound
client, replication, admin endpoint), starts and stops them, and offers the SMTP
handler and the queue manager the few live inputs they need (policy, rewrite rules,
routing table), derived from the config file and the directory.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import time
import weakref
from collections.abc import Callable
from typing import Any

from imsrelay import dsn, tracking
from imsrelay.addresses import AddressError, parse_address
from imsrelay.config import SiteConfig
from imsrelay.console.site_console import site_console
from imsrelay.delivery import QueueManager
from imsrelay.directory import Directory, Mailbox, SiteObject
from imsrelay.kcc import learned_sites
from imsrelay.logs import get_logger
from imsrelay.message_store import MessageStore
from imsrelay.policy import InboundPolicy
from imsrelay.readiness import Readiness
from imsrelay.rewrite import RewriteRules
from imsrelay.router import RoutingTable, is_service_address, local_domains_for
from imsrelay.smtpd import server_factory
from imsrelay.spool import Envelope, Spool


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
        self.log = get_logger("imsrelay").bind(site=config.site, **({"worker": worker} if workers > 1 else {}))
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.directory = Directory(config.data_dir / "directory.sqlite3", config.site, clock=clock)
        self.spool = Spool(config.data_dir, worker=worker)
        self._addressing = config.site_address  # refreshed from the directory
        self._learned_sites: tuple[tuple[str, str], ...] = ()
        self._loop_marker = f"by {config.hostname} (imsrelay)".encode().lower()
        self.smtp_client: Any = None
        self.replicator: Any = None
        self.admin: Any = None
        self.qmgr = QueueManager(self, self.spool, smtp_deliver=self._smtp_deliver,
                                 directory_deliver=self._directory_deliver, clock=clock)
        self._free_bytes = 0
        self._endpoints: tuple[int, float, frozenset[tuple[str, int]]] | None = None
        self._free_checked = -10.0
        self._mailbox_cache: dict[str, Mailbox | None] = {}
        self._cache_generation = 0
        self._seen_usn = -1
        self._table: RoutingTable | None = None
        self._server: asyncio.base_events.Server | None = None
        self._sessions: weakref.WeakSet[Any] = weakref.WeakSet()
        self._refresher: asyncio.Task[None] | None = None
        self.bound_port: int | None = None
        self._provisioned = False
        self._recovered = False
        self.readiness = Readiness()
        self.readiness.add("listening", lambda: None if self._server is not None else "the SMTP port is not open yet")
        self.readiness.add("spool recovered", lambda: None if self._recovered else "the queue is being recovered")
        self.readiness.add("directory provisioned",
                           lambda: None if self._provisioned else "the directory is not provisioned yet")
        self.tracking = tracking.TrackingLog(config.data_dir / "tracking.sqlite3", config.site,
                                    days=config.tracking.days, enabled=config.tracking.enabled, clock=clock)
        self.message_store = MessageStore(config.site, config.data_dir / "mailboxes")
        try:
            self._build_replication_and_admin()
        except Exception:
            self.directory.close()
            self.spool.close()
            raise

    async def _wait_for_provisioning(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not await self.directory.run(lambda: self.directory.provisioned):
            if time.monotonic() > deadline:
                raise RuntimeError("worker 0 did not provision the directory")
            await asyncio.sleep(0.1)

    def _build_replication_and_admin(self) -> None:
        """Directory replication needs the organisation key; the admin endpoint a token."""
        from imsrelay.admin import AdminServer
        from imsrelay.replication import Replicator

        if self.config.replication.resolved_key():
            self.replicator = Replicator(self)
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
        else:
            await self._wait_for_provisioning()
        self._provisioned = True
        await self.refresh()
        loop = asyncio.get_running_loop()
        self.directory.listeners.append(lambda: loop.call_soon_threadsafe(self._directory_changed))
        self._build_outbound()
        await self.qmgr.start()
        if self.worker == 0:
            adopted = await self.spool.adopt_orphans(self.workers)
            for env in adopted:
                self.qmgr.submit(env)
            if adopted:
                self.log.info("queue.adopted", messages=len(adopted), reason="journals of workers no longer running")
        self._recovered = True
        tls = self._tls_context()
        factory = server_factory(self, tls)

        def session() -> Any:  # remember live sessions: stop() must end them too
            protocol = factory()
            self._sessions.add(protocol)
            return protocol

        self._server = await loop.create_server(session, host=cfg.smtp.listen, port=cfg.smtp.port,
                                                reuse_address=True, reuse_port=self.workers > 1)
        self.bound_port = self._server.sockets[0].getsockname()[1]
        self._refresher = asyncio.create_task(self._refresh_periodically(), name="site-refresh")
        if self.replicator is not None and self.worker == 0:
            await self.replicator.start()  # schedules run once per site, in worker 0
        self.log.info("site.started", listen=cfg.smtp.listen, port=self.bound_port, hostname=cfg.hostname,
                      data_dir=str(cfg.data_dir), tls=tls is not None)

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        if self.replicator is not None and self.worker == 0:
            await self.replicator.stop()
        if self._server is not None:
            self._server.close()
            # Python 3.11's Server.close() leaves accepted connections open: a peer's pooled
            # connection would keep talking to this stopped site (and its stopped queue).
            for protocol in list(self._sessions):
                if protocol.transport is not None:
                    protocol.transport.close()
            await self._server.wait_closed()
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        await self.qmgr.stop()
        if self.smtp_client is not None:
            await self.smtp_client.close()
        await self.tracking.stop()
        self.spool.close()
        self.directory.close()
        self.log.info("site.stopped")

    def _build_outbound(self) -> None:
        """The SMTP client and replication, when their modules are present."""
        try:
            from imsrelay.smtp_client import SmtpClient
        except ImportError:
            return
        from imsrelay.dns import MailResolver

        resolver = MailResolver(self.config.dns.nameservers, timeout=self.config.dns.timeout)
        self.smtp_client = SmtpClient(self.config, resolver, self.self_endpoints, self.log)

    def _tls_context(self) -> ssl.SSLContext | None:
        cfg = self.config.smtp
        if not cfg.tls_cert or not cfg.tls_key:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
        return ctx

    # ------------------------------------------------------------ live state

    async def refresh(self) -> None:
        """Re-read what the site derives from its directory (Site Addressing, sites
        learned by Check Now) and drop cached look-ups if the directory changed —
        also when another process (an offline CLI command) changed it."""
        site, learned, usn = await self.directory.run(self._directory_snapshot)
        if usn != self._seen_usn:
            self._seen_usn = usn
            self._clear_lookups()
        if site is not None:
            self._addressing = site.smtp_address
        self._learned_sites = learned
        self._table = None

    def _directory_snapshot(self) -> tuple[SiteObject | None, tuple[tuple[str, str], ...], int]:
        return self.directory.site_object(), tuple(learned_sites(self.directory)), self.directory.highest_usn

    def _directory_changed(self) -> None:
        self._clear_lookups()
        self._schedule_refresh()

    def _clear_lookups(self) -> None:
        self._mailbox_cache.clear()
        self._cache_generation += 1

    async def lookup_mailboxes(self, addresses: list[str]) -> list[Mailbox | None]:
        """Directory look-ups by address, answered from memory when possible."""
        missing = [a for a in addresses if a.lower() not in self._mailbox_cache]
        if missing:
            generation = self._cache_generation
            found = await self.directory.run(self.directory.find_recipients, missing)
            if generation == self._cache_generation and len(self._mailbox_cache) < 100_000:
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
    def addressing_domain(self) -> str:
        return self._addressing.lstrip("@").lower()

    def self_endpoints(self) -> frozenset[tuple[str, int]]:
        """Where this site listens (recomputed at most once a minute: interfaces may change)."""
        port = self.bound_port or self.config.smtp.port
        now = time.monotonic()
        cached = self._endpoints
        if cached is None or cached[0] != port or now - cached[1] > 60.0:
            cached = self._endpoints = (port, now, endpoints_for(self.config, port))
        return cached[2]

    def inbound_policy(self) -> InboundPolicy:
        cfg = self.config
        locals_ = local_domains_for(cfg.site_domain, self.addressing_domain,
                                    cfg.smtp.accepted_domains)
        org = tuple(c.routing_domain for c in cfg.connected_sites) + tuple(d for _, d in self._learned_sites)
        return InboundPolicy(local_domains=locals_, org_routing_domains=org,
                             relay_networks=cfg.smtp.relay_networks, max_recipients=cfg.smtp.max_recipients,
                             max_message_size=cfg.smtp.max_message_size, max_hops=cfg.smtp.max_hops)

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
        if parsed.local.lower() == "postmaster" and any(
                parsed.domain == d.lstrip("#") for d in table.local_domains):
            return True
        return (await self.lookup_mailboxes([address]))[0] is not None

    async def local_primaries(self, addresses: list[str]) -> dict[str, str]:
        """Lookup key → primary address, for addresses of mailboxes homed here."""
        found = await self.lookup_mailboxes(addresses)
        out: dict[str, str] = {}
        for addr, mbx in zip(addresses, found, strict=True):
            if mbx is not None and mbx.home_site == self.config.site and mbx.primary_address:
                out[parse_address(addr).key] = mbx.primary_address
        return out

    def seen_before(self, raw: bytes) -> bool:
        """Our own Received: line is already in the header: the message came back."""
        end = raw.find(b"\r\n\r\n")
        header = raw if end < 0 else raw[:end]
        return self._loop_marker in re.sub(rb"\s+", b" ", header.lower())

    # ------------------------------------------------------------ queue

    async def accept(self, env: Envelope, message: bytes) -> None:
        await self.spool.enqueue(env, message)
        self._track_received(env, message)
        self.qmgr.submit(env, message)

    def _track_received(self, env: Envelope, message: bytes) -> None:
        self.tracking.record(tracking.RECEIVED, env.queue_id, message_id=tracking.message_id_of(message),
                             sender=env.sender, related=env.extra.get("report_for"), origin=env.origin,
                             client=env.client or None, helo=env.helo or None, size=len(message),
                             recipients=[r.address for r in env.recipients])

    async def enqueue_local(self, env: Envelope, message: bytes) -> None:
        """Queue a message this site generates itself (NDRs, replication)."""
        await self.spool.enqueue(env, message)
        self._track_received(env, message)
        self.qmgr.submit(env, message)
        self.log.info("message.queued", queue_id=env.queue_id, sender=env.sender or "<>",
                      recipients=[r.address for r in env.recipients], origin=env.origin, size=len(message))

    async def _smtp_deliver(self, route: Any, env: Envelope, rcpts: list[str], message: bytes) -> dict[str, Any]:
        from imsrelay.outcome import Outcome

        if self.smtp_client is None:
            return {r: Outcome.temporary("4.4.0", "no SMTP client configured") for r in rcpts}
        return await self.smtp_client.deliver(route, env, rcpts, message)

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


def endpoints_for(config: SiteConfig, port: int) -> frozenset[tuple[str, int]]:
    """Where this site itself listens: (address, port) and (host name, port); with a
    wildcard listen address (0.0.0.0, ::) every address of this host, so that an MX
    or table entry pointing back here is recognised as a loop."""
    listen = config.smtp.listen.lower()
    addresses = {listen}
    if listen in ("", "0.0.0.0", "::"):
        addresses |= local_addresses()
    return frozenset({(a, port) for a in addresses} | {(config.hostname.lower(), port)})


def local_addresses() -> set[str]:
    """This host's interface addresses (Linux: IPv4 via SIOCGIFADDR, IPv6 from
    /proc/net/if_inet6); no name lookups.  Empty where neither is available."""
    import fcntl
    import ipaddress
    import socket
    import struct

    found = {"127.0.0.1", "::1"}
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue  # no IPv4 address on this interface
            found.add(socket.inet_ntoa(packed[20:24]))
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                raw = line.split()[0]
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    except (OSError, ValueError):
        pass
    return found


def routing_table_for(config: SiteConfig, *, addressing_domain: str, learned_sites: tuple[tuple[str, str], ...],
                      self_endpoints: frozenset[tuple[str, int]]) -> RoutingTable:
    """The router's input from the config file and what the directory says (pure);
    shared by the running site and ``imsrelay route``."""
    d = config.delivery
    locals_ = local_domains_for(config.site_domain, addressing_domain,
                                config.smtp.accepted_domains)
    return RoutingTable(
        site=config.site, site_domain=config.site_domain, local_domains=locals_,
        connected_sites=config.connected_sites, learned_sites=tuple(learned_sites),
        email_domains=config.email_domains,
        smart_host=(d.smart_host, d.smart_host_port) if d.smart_host else None,
        self_endpoints=self_endpoints, starttls_default=d.starttls,
        starttls_by_domain=tuple((p.domain, p.starttls) for p in d.tls_policies),
        service_domains=(addressing_domain,), mx_port=d.mx_port)


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
