"""Composition root: one Exchange site's IMS built from its configuration.

``Site`` owns the parts (directory, spool, queue manager, SMTP server, outbound
client, replication, admin endpoint), starts and stops them, and offers the SMTP
handler and the queue manager the few live inputs they need (policy, rewrite rules,
routing table), derived from the config file and the directory.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Callable
from typing import Any

from imsrelay import dsn
from imsrelay.addresses import AddressError, parse_address
from imsrelay.config import SiteConfig
from imsrelay.delivery import QueueManager
from imsrelay.directory import Directory
from imsrelay.logs import get_logger
from imsrelay.policy import InboundPolicy
from imsrelay.rewrite import RewriteRules
from imsrelay.router import RoutingTable, is_service_address, local_domains_for
from imsrelay.smtpd import server_factory
from imsrelay.spool import Envelope, Spool


class Site:
    def __init__(self, config: SiteConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.log = get_logger("imsrelay").bind(site=config.site)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.directory = Directory(config.data_dir / "directory.sqlite3", config.site, clock=clock)
        self.spool = Spool(config.data_dir)
        self._addressing = config.site_address  # refreshed from the directory
        self._learned_sites: tuple[tuple[str, str], ...] = ()
        self._loop_marker = f"by {config.hostname} (imsrelay)".encode().lower()
        self.smtp_client: Any = None
        self.replicator: Any = None
        self.admin: Any = None
        self.qmgr = QueueManager(self, self.spool, smtp_deliver=self._smtp_deliver,
                                 directory_deliver=self._directory_deliver, clock=clock)
        self._server: asyncio.base_events.Server | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.bound_port: int | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config
        provisioned = await self.directory.run(
            self.directory.provision, organisation=cfg.organisation, server=cfg.server,
            site_domain=cfg.site_domain, hostname=cfg.hostname,
            mailboxes=[(m.alias, m.display_name, m.extra_addresses) for m in cfg.mailboxes])
        if provisioned:
            self.log.info("directory.provisioned", mailboxes=len(cfg.mailboxes), data_dir=str(cfg.data_dir))
        await self.refresh()
        loop = asyncio.get_running_loop()
        self.directory.listeners.append(lambda: loop.call_soon_threadsafe(self._schedule_refresh))
        self._build_outbound()
        await self.qmgr.start()
        tls = self._tls_context()
        self._server = await loop.create_server(server_factory(self, tls), host=cfg.smtp.listen,
                                                port=cfg.smtp.port, reuse_address=True)
        self.bound_port = self._server.sockets[0].getsockname()[1]
        self._refresher = asyncio.create_task(self._refresh_periodically(), name="site-refresh")
        if self.replicator is not None:
            await self.replicator.start()
        if self.admin is not None:
            await self.admin.start()
        self.log.info("site.started", listen=cfg.smtp.listen, port=self.bound_port, hostname=cfg.hostname,
                      data_dir=str(cfg.data_dir), tls=tls is not None)

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        if self.replicator is not None:
            await self.replicator.stop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        await self.qmgr.stop()
        if self.smtp_client is not None:
            await self.smtp_client.close()
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
        self.smtp_client = SmtpClient(self.config, resolver, self.self_endpoints(), self.log)

    def _tls_context(self) -> ssl.SSLContext | None:
        cfg = self.config.smtp
        if not cfg.tls_cert or not cfg.tls_key:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
        return ctx

    # ------------------------------------------------------------ live state

    async def refresh(self) -> None:
        site = await self.directory.run(self.directory.site_object)
        if site is not None:
            self._addressing = site.smtp_address
        self._learned_sites = tuple(await self.directory.run(self.learned_sites_sync))

    def learned_sites_sync(self) -> list[tuple[str, str]]:
        """Sites made known to routing by the last Check Now (stored in the directory)."""
        import json

        raw = self.directory._meta("kcc.sites")
        return [tuple(x) for x in json.loads(raw)] if raw else []  # type: ignore[misc]

    def _schedule_refresh(self) -> None:
        asyncio.ensure_future(self.refresh())

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            try:
                await self.refresh()
            except Exception as exc:  # keep serving with the last known state
                self.log.warning("site.refresh_failed", error=repr(exc))

    @property
    def addressing_domain(self) -> str:
        return self._addressing.lstrip("@").lower()

    def self_endpoints(self) -> frozenset[tuple[str, int]]:
        cfg = self.config.smtp
        port = self.bound_port or cfg.port
        return frozenset({(cfg.listen.lower(), port), (self.config.hostname.lower(), port)})

    def inbound_policy(self) -> InboundPolicy:
        cfg = self.config
        locals_ = local_domains_for(cfg.site_domain, self.addressing_domain, cfg.company_domain,
                                    cfg.smtp.accepted_domains)
        org = tuple(c.routing_domain for c in cfg.connected_sites) + tuple(d for _, d in self._learned_sites)
        return InboundPolicy(local_domains=locals_, org_routing_domains=org,
                             relay_networks=cfg.smtp.relay_networks, max_recipients=cfg.smtp.max_recipients,
                             max_message_size=cfg.smtp.max_message_size, max_hops=cfg.smtp.max_hops)

    async def routing_table(self) -> RoutingTable:
        cfg = self.config
        return RoutingTable(
            site=cfg.site, site_domain=cfg.site_domain,
            local_domains=self.inbound_policy().local_domains,
            connected_sites=cfg.connected_sites, learned_sites=self._learned_sites,
            email_domains=cfg.email_domains,
            smart_host=(cfg.delivery.smart_host, cfg.delivery.smart_host_port) if cfg.delivery.smart_host else None,
            self_endpoints=self.self_endpoints(), starttls_default=cfg.delivery.starttls,
            starttls_by_domain=tuple((p.domain, p.starttls) for p in cfg.delivery.tls_policies),
            service_domains=(self.addressing_domain,))

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
        return await self.directory.run(self.directory.find_recipient, address) is not None

    async def local_primaries(self, addresses: list[str]) -> dict[str, str]:
        """Lookup key → primary address, for addresses of mailboxes homed here."""
        found = await self.directory.run(self.directory.find_recipients, addresses)
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
        self.qmgr.submit(env)

    async def enqueue_local(self, env: Envelope, message: bytes) -> None:
        """Queue a message this site generates itself (NDRs, replication)."""
        await self.spool.enqueue(env, message)
        self.qmgr.submit(env)
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


async def run_site(config: SiteConfig, stop: asyncio.Event) -> None:
    site = Site(config)
    await site.start()
    try:
        await stop.wait()
    finally:
        await site.stop()
