"""The site's listening sockets: the SMTP port, submission (587) and implicit TLS (465).

``Listeners`` builds the TLS context (the configured certificate, or a lab CA's
with ``smtp.tls_generate``), keeps descriptors for delivery and the spool whatever
inbound clients do (RLIMIT_NOFILE), opens the sockets with a protocol factory from
``imsrelay.ingress.adapter`` per listener, remembers every live session, and on stop
closes them the way a clean stop must (a session inside DATA gets its reply out
first: ``STOP_GRACE``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import resource
import ssl
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imsrelay.ingress.adapter import CLOSE_GRACE, STOP_GRACE, ImsSMTP, Slots, close_sessions
from imsrelay.ingress.backlog import accept_backlog
from imsrelay.ingress.lab_ca import ensure_ca, ensure_certificate
from imsrelay.model.settings import SiteConfig
from imsrelay.policy.connection_limits import Caps, ConnectionCounter
from imsrelay.routing.host_addresses import local_addresses

ProtocolFactory = Callable[[ssl.SSLContext | None, str, Slots], Callable[[], ImsSMTP]]

class Listeners:
    def __init__(self, config: SiteConfig, protocols: ProtocolFactory, connections: ConnectionCounter, *,
                 workers: int, log: Any) -> None:
        """``protocols(tls, listener, slots)``: the session factory for one listener
        (``smtp``, ``submission`` or ``smtps``).  Each listener has its own slots: the
        SMTP port ``connections`` (smtp.max_inbound_connections), 587 and 465 each
        ``submission.max_connections``: no port can starve another."""
        self.config = config
        self.protocols = protocols
        self.connections = connections
        self.workers = workers
        self.log = log
        self.sessions: weakref.WeakSet[Any] = weakref.WeakSet()  # live sessions: stop() ends them too
        busy_idle, wait = config.smtp.busy_idle_timeout, config.smtp.handshake_timeout
        sub = config.submission
        self.slots: dict[str, Slots] = {"smtp": Slots(connections, busy_idle=busy_idle, max_wait=wait)}
        for name in ("submission", "smtps"):
            caps = Caps(sub.max_connections, sub.max_connections_per_ip, config.smtp.relay_networks)
            self.slots[name] = Slots(ConnectionCounter(caps.for_workers(workers)), busy_idle=busy_idle,
                                     max_wait=wait)
        self.bound_port: int | None = None
        self.submission_ports: dict[str, int] = {}  # "submission" / "smtps" -> bound port
        self.tls: ssl.SSLContext | None = None
        self.certificate_files: tuple[Path, Path] | None = None  # (certificate, key) of self.tls
        self._server: asyncio.base_events.Server | None = None
        self._submission_servers: list[asyncio.base_events.Server] = []

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        cfg = self.config
        self.reserve_descriptors()
        self.tls = self.tls_context()
        self._server = await self._listen("smtp", cfg.smtp.listen, cfg.smtp.port)
        self.bound_port = self._server.sockets[0].getsockname()[1]
        await self._start_submission()

    async def _listen(self, listener: str, host: str, port: int) -> asyncio.base_events.Server:
        factory = self.protocols(self.tls, listener, self.slots[listener])
        sessions = self.sessions

        def session() -> Any:
            protocol = factory()
            sessions.add(protocol)
            return protocol

        implicit = listener == "smtps"
        return await asyncio.get_running_loop().create_server(
            session, host=host, port=port, reuse_address=True, reuse_port=self.workers > 1,
            ssl=self.tls if implicit else None,
            # 465: the TLS handshake is bounded like the greeting (it takes no slot until done)
            ssl_handshake_timeout=self.config.smtp.handshake_timeout if implicit else None,
            ssl_shutdown_timeout=CLOSE_GRACE if implicit else None,
            backlog=accept_backlog(self.config.smtp.listen_backlog))

    async def _start_submission(self) -> None:
        """[submission]: port 587 (STARTTLS, AUTH before MAIL) and 465 (implicit TLS)."""
        sub = self.config.submission
        listen = sub.listen or self.config.smtp.listen
        for listener, port in (("submission", sub.port), ("smtps", sub.tls_port)):
            if port is None:
                continue
            if self.tls is None:
                raise RuntimeError(f"{self.config.path}: submission needs TLS (smtp.tls_cert or smtp.tls_generate)")
            server = await self._listen(listener, listen, port)
            self._submission_servers.append(server)
            self.submission_ports[listener] = server.sockets[0].getsockname()[1]
            self.log.info("submission.started", listener=listener, listen=listen,
                          port=self.submission_ports[listener])

    async def stop(self) -> None:
        for server in self._submission_servers:
            server.close()
        if self._server is not None:
            self._server.close()
            # Python 3.11's Server.close() leaves accepted connections open: a peer's pooled
            # connection would keep talking to this stopped site (and its stopped queue).
            # A session inside DATA first gets its reply out (bounded wait): a message made
            # durable but never answered would come again from the sender, a duplicate.
            await close_sessions(list(self.sessions), grace=STOP_GRACE)
            await self._server.wait_closed()
        for server in self._submission_servers:
            await server.wait_closed()
        self._submission_servers.clear()

    def reserve_descriptors(self) -> None:
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

    def tls_context(self) -> ssl.SSLContext | None:
        cfg = self.config.smtp
        cert, key = cfg.tls_cert, cfg.tls_key
        if (not cert or not key) and cfg.tls_generate:
            cert, key = self._throwaway_certificate()
        if not cert or not key:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        self.certificate_files = (Path(cert), Path(key))
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


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def inbound_caps(config: SiteConfig, workers: int = 1) -> Caps:
    smtp = config.smtp
    return Caps(smtp.max_inbound_connections, smtp.max_connections_per_ip, smtp.relay_networks).for_workers(workers)


def descriptors_reserved(config: SiteConfig) -> int:
    """Descriptors kept for everything but inbound sessions: one per concurrent
    delivery, plus the journal, SQLite, Maildir files, DNS, admin and the listener."""
    return config.delivery.max_deliveries + 64
