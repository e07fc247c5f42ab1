"""Outbound SMTP: the transport that carries mail to other sites and the Internet.

``SmtpClient.deliver(route, envelope, recipients, message)`` makes one delivery
attempt for a group of recipients that share a route and returns one ``Outcome``
per recipient.  It never raises for anything a peer or the network can do.

- **Next hops.** A ``relay`` route (E-Mail Domain table entry or smart host) goes
  to its fixed host (its A/AAAA addresses when it is a name, never its MX); an
  ``mx`` route to every address of every MX host of the domain, in RFC 5321 §5.1
  order.  The next hop is tried on a connection failure or a temporary (4xx)
  failure; a permanent (5xx) reply ends the attempt for the recipients it covers.
- **Loops** (``imsrelay.loops``). An MX next hop that is this site (its listen address or host name
  at its port) is dropped together with every less preferred one, as RFC 5321
  §5.1 asks; when nothing is left the recipients fail with ``5.4.6``.
- **Connections** are pooled per next hop (address, port) and reused: before
  reuse a connection is checked with ``RSET``; an idle one is closed (``QUIT``)
  after ``delivery.connection_idle``; one older than ``CONNECTION_MAX_AGE`` is not
  reused.  How many deliveries run against one destination at a time is decided
  by the queue manager alone (``delivery.max_per_destination``).  A host that
  refused or timed out a connection is not tried again for a short while
  (``DEAD_HOST_HOLD``), so a dead peer costs one timeout, not one per message,
  and never holds up other destinations.
- **STARTTLS** per route: ``none``; ``opportunistic`` (used when offered, without
  certificate checks as in RFC 7435; if the handshake fails the hop is retried in
  clear and remembered as TLS-broken for ``TLS_BROKEN_HOLD``); ``require`` (a
  temporary failure ``4.7.4`` when the peer does not offer it, ``4.7.5`` when the
  handshake fails).  aiosmtplib is always told ``start_tls=False`` explicitly and
  the upgrade is done here (aiosmtplib issues #16, #122).
- **Timeouts:** ``connect_timeout`` for the TCP connection and greeting,
  ``command_timeout`` for each command, and for DATA ``command_timeout`` plus
  ``data_timeout_per_mib`` per MiB of message.
- **The message** goes out byte for byte as queued (aiosmtplib only dot-stuffs
  and makes line ends CRLF); ``SIZE=`` when the peer offers SIZE (and a message
  above the peer's limit fails ``5.3.4`` without being sent), ``BODY=8BITMIME``
  when the message was received as 8-bit and the peer offers 8BITMIME,
  ``SMTPUTF8`` when the message needs it and the peer offers it — when it needs
  it and the peer does not, a permanent ``5.6.7`` ("remote server does not
  support SMTPUTF8").
- **Outcomes** follow the reply code *and* the connection state (aiosmtplib
  #48): a RCPT 5xx fails that recipient only, 4xx defers it; the DATA reply
  applies to every accepted recipient; a timeout or a dropped connection is
  always temporary.  Diagnostics read ``smtp; 550 5.1.1 <x@y>: unknown user``,
  ``remote`` reads ``host [address]:port``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
from aiosmtplib.errors import (
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import normalize_message_line_endings
from aiosmtplib.response import SMTPResponse

from imsrelay.addresses import ip_literal
from imsrelay.config import SiteConfig
from imsrelay.dns import DnsFailure, MailResolver, NextHop
from imsrelay.envelope import Envelope
from imsrelay.loops import SelfEndpoints, is_self, without_self
from imsrelay.outcome import Outcome
from imsrelay.rewrite import split_message
from imsrelay.router import MX, RELAY, Route

MIB = 1024 * 1024
CONNECTION_MAX_AGE = 300.0  # seconds a connection is reused for (Postfix: 300s)
DEAD_HOST_HOLD = 60.0  # at most this long a host that refused a connection is skipped
TLS_BROKEN_HOLD = 3600.0  # after a failed opportunistic handshake, use clear text this long
QUIT_TIMEOUT = 5.0

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f<>]")
_QUOTED_LOCAL = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"')


# --------------------------------------------------------------------------- pure parts


def reply_text(message: str) -> str:
    """A (possibly multi-line) reply text on one line."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def reply_status(code: int, message: str) -> str:
    """The RFC 3463 code of a reply: the enhanced code it carries when its class
    agrees with the reply code, else the generic ``X.0.0``."""
    m = _ENHANCED.match(message.strip())
    if m and m.group(1) == str(code)[0]:
        return f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}"
    return f"{str(code)[0]}.0.0" if str(code)[0] in "245" else "4.0.0"


def smtp_diagnostic(code: int, message: str) -> str:
    """RFC 3464 diagnostic-code: ``smtp; 550 5.1.1 <x@y>: unknown user``."""
    return f"smtp; {code} {reply_text(message)}".rstrip()


def reply_outcome(code: int, message: str, remote: str) -> Outcome:
    """2xx delivered, 5xx permanent, anything else temporary."""
    status = reply_status(code, message)
    diagnostic = smtp_diagnostic(code, message)
    if 200 <= code < 300:
        return Outcome.delivered(diagnostic, remote)
    if 500 <= code < 600:
        return Outcome.permanent_failure(status, diagnostic, remote)
    if not 400 <= code < 500:
        status = "4.5.0"  # an unexpected reply: a protocol error, try again later
    return Outcome.temporary(status, diagnostic, remote)


def needs_smtputf8(env: Envelope, recipients: Iterable[str], message: bytes) -> bool:
    """Whether the message cannot be sent without SMTPUTF8 (RFC 6531): a non-ASCII
    envelope address, or a message received with SMTPUTF8 whose header is not ASCII."""
    if not env.sender.isascii() or not all(r.isascii() for r in recipients):
        return True
    if env.smtputf8:
        header, _ = split_message(message)
        return not header.isascii()
    return False


def smtp_path(address: str) -> str:
    """``<address>`` for MAIL/RCPT; ValueError for what cannot go on a command line."""
    unquoted = _QUOTED_LOCAL.sub("", address, count=1)
    if _UNSAFE.search(address) or any(c.isspace() for c in unquoted):
        raise ValueError(f"{address!r} cannot be sent in an SMTP command")
    return f"<{address}>"


def data_timeout(size: int, command_timeout: float, per_mib: float) -> float:
    return command_timeout + per_mib * size / MIB


def source_address_for(listen: str, destination: str) -> str | None:
    """The address outbound connections come from (Postfix's ``smtp_bind_address``):
    the site's listen address when it is one specific IP of the destination's family —
    so a peer's ``Received:`` line names this site — else the system's choice.  A
    loopback listen address is used only towards loopback destinations."""
    try:
        own = ipaddress.ip_address(listen)
        dest = ipaddress.ip_address(destination.split("%")[0])
    except ValueError:
        return None
    if own.is_unspecified or own.version != dest.version:
        return None
    if own.is_loopback and not dest.is_loopback:
        return None
    return str(own)


def remote_name(hop: NextHop) -> str:
    address = f"[{hop.address}]" if ":" not in hop.address else f"[IPv6:{hop.address}]"
    return f"{hop.host} {address}:{hop.port}"


# --------------------------------------------------------------------------- connections


class _SessionFailure(Exception):
    """The whole session with one next hop failed; ``outcome`` applies to every
    recipient still open.  ``dead``: the host did not take a connection at all."""

    def __init__(self, outcome: Outcome, *, dead: bool = False,
                 answered: dict[str, Outcome] | None = None) -> None:
        super().__init__(outcome.diagnostic)
        self.outcome = outcome
        self.dead = dead
        self.answered = answered or {}  # recipients the peer had already answered for


@dataclass(eq=False)
class _Connection:
    client: aiosmtplib.SMTP
    hop: NextHop
    policy: str
    tls: bool
    created: float
    transactions: int = 0
    idle_timer: asyncio.TimerHandle | None = None

    @property
    def remote(self) -> str:
        return remote_name(self.hop)

    @property
    def peer(self) -> str:
        return f"{self.hop.address}:{self.hop.port}"


@dataclass(eq=False)
class _HopState:
    """Everything known about one next hop (address, port)."""

    idle: list[_Connection] = field(default_factory=list)
    active: int = 0
    dead_until: float = 0.0
    dead_reason: str = ""
    tls_broken_until: float = 0.0


class SmtpClient:
    """One site's outbound SMTP transport; safe to share by all delivery tasks."""

    def __init__(self, config: SiteConfig, resolver: MailResolver,
                 self_endpoints: SelfEndpoints | Callable[[], SelfEndpoints], log: Any, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.delivery = config.delivery
        self.resolver = resolver
        self._self_endpoints = self_endpoints if callable(self_endpoints) else (lambda: self_endpoints)
        self.log = log.bind(component="smtp")
        self.clock = clock
        self._hops: dict[tuple[str, int], _HopState] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self._tls_context = _opportunistic_tls_context()
        self._verify_context: ssl.SSLContext | None = None  # built on first use (reads the CA bundle)
        self.connections_opened = 0  # counters, for tests and the admin endpoint
        self.connections_reused = 0

    # ------------------------------------------------------------ public

    async def deliver(self, route: Route, env: Envelope, recipients: list[str],
                      message: bytes) -> dict[str, Outcome]:
        rcpts = list(dict.fromkeys(recipients))
        log = self.log.bind(queue_id=env.queue_id)
        if self._closed:
            return _all(rcpts, Outcome.temporary("4.3.2", "the site is shutting down"))
        if route.kind not in (RELAY, MX):
            return _all(rcpts, Outcome.temporary("4.3.5", f"route kind {route.kind!r} is not an SMTP route"))
        try:
            hops = await self._next_hops(route)
        except DnsFailure as failure:
            log.info("delivery.dns_failed", domain=route.domain, host=route.host, status=failure.status,
                     permanent=failure.permanent, reason=failure.reason)
            if route.kind == RELAY:  # our own table points at a name that does not resolve: retry
                return _all(rcpts, Outcome.temporary("4.4.4", f"relay host {route.host}: {failure.reason}"))
            if failure.permanent:
                return _all(rcpts, Outcome.permanent_failure(failure.status, failure.reason))
            return _all(rcpts, Outcome.temporary(failure.status, failure.reason))
        if route.kind == MX:
            hops, looped = without_self(hops, self._self_endpoints())
            if not hops and looped:
                reason = f"mail for {route.domain} loops back to myself ({self.config.hostname} is its best MX)"
                log.warning("delivery.loop", domain=route.domain, reason=reason)
                return _all(rcpts, Outcome.permanent_failure("5.4.6", reason))
        elif any(is_self(h, self._self_endpoints()) for h in hops):
            reason = f"relay host {route.host}:{route.port} is this site: loop"
            log.warning("delivery.loop", domain=route.domain, reason=reason)
            return _all(rcpts, Outcome.permanent_failure("5.4.6", reason))
        outcomes: dict[str, Outcome] = {}
        pending = rcpts
        for hop in hops:
            result = await self._deliver_via(hop, route, env, pending, message, log)
            outcomes.update(result)
            pending = [r for r in pending if not result[r].ok and not result[r].permanent]
            if not pending:
                break
        return outcomes

    async def close(self) -> None:
        """Close every pooled connection (QUIT, bounded); later deliveries defer."""
        self._closed = True
        for state in self._hops.values():
            for conn in state.idle:
                self._close_later(conn, "site stopping")
            state.idle.clear()
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    def forget_unreachable(self) -> None:
        """Try every host again at the next delivery (an operator asked for a retry)."""
        for state in self._hops.values():
            state.dead_until = 0.0
            state.tls_broken_until = 0.0

    # ------------------------------------------------------------ next hops

    async def _next_hops(self, route: Route) -> list[NextHop]:
        if route.kind == RELAY:
            assert route.host is not None
            literal = ip_literal(route.host)
            if literal is not None:
                return [NextHop(route.host.strip("[]"), literal, route.port, 0)]
            addresses = await self.resolver.addresses(route.host)
            return [NextHop(route.host, a, route.port, 0) for a in addresses]
        assert route.domain is not None
        return await self.resolver.next_hops(route.domain, port=route.port)

    def _state(self, hop: NextHop) -> _HopState:
        key = (hop.address, hop.port)
        state = self._hops.get(key)
        if state is None:
            state = self._hops[key] = _HopState()
        return state

    def _dead(self, hop: NextHop, state: _HopState) -> Outcome | None:
        if state.dead_until > self.clock():
            return Outcome.temporary("4.4.1", f"{state.dead_reason} (host recently unreachable, not tried again yet)",
                                     remote_name(hop))
        return None

    # ------------------------------------------------------------ one next hop

    async def _deliver_via(self, hop: NextHop, route: Route, env: Envelope, rcpts: list[str],
                           message: bytes, log: Any) -> dict[str, Outcome]:
        state = self._state(hop)
        dead = self._dead(hop, state)
        if dead:
            return _all(rcpts, dead)
        state.active += 1
        conn: _Connection | None = None
        try:
            conn = await self._acquire(hop, route.starttls, state, log)
            result = await self._transaction(conn, env, rcpts, message, log)
        except _SessionFailure as failure:
            if failure.dead:
                state.dead_until = self.clock() + self._dead_hold()
                state.dead_reason = failure.outcome.diagnostic
            if conn is not None:
                conn.client.close()
                conn = None
            return {**_all(rcpts, failure.outcome), **failure.answered}
        except BaseException:
            if conn is not None:  # cancelled mid-transaction: the session state is unknown
                conn.client.close()
            raise
        finally:
            state.active -= 1
        self._release(conn, state, log)
        return result

    def _dead_hold(self) -> float:
        return min(DEAD_HOST_HOLD, min(self.delivery.retry_intervals, default=DEAD_HOST_HOLD))

    async def _acquire(self, hop: NextHop, policy: str, state: _HopState, log: Any) -> _Connection:
        now = self.clock()
        while state.idle:
            conn = state.idle.pop()
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if conn.policy != policy or now - conn.created > CONNECTION_MAX_AGE or not conn.client.is_connected:
                self._close_later(conn, "not reusable")
                continue
            try:  # health check (aiosmtplib #243: never trust a long-idle connection)
                reply = await conn.client.rset(timeout=min(self.delivery.command_timeout, 30.0))
            except (SMTPException, OSError) as exc:
                log.debug("delivery.reuse_failed", peer=conn.peer, error=str(exc))
                conn.client.close()
                continue
            except BaseException:  # cancelled: do not leak the connection
                conn.client.close()
                raise
            if reply.code != 250 or not conn.client.is_connected:
                self._close_later(conn, f"RSET answered {reply.code}")
                continue
            self.connections_reused += 1
            log.debug("delivery.reuse", peer=conn.peer, remote=conn.remote, transactions=conn.transactions)
            return conn
        return await self._connect(hop, policy, state, log, allow_tls=True)

    async def _connect(self, hop: NextHop, policy: str, state: _HopState, log: Any, *,
                       allow_tls: bool) -> _Connection:
        cfg = self.delivery
        remote = remote_name(hop)
        peer = f"{hop.address}:{hop.port}"
        source = source_address_for(self.config.smtp.listen, hop.address)
        client = aiosmtplib.SMTP(hostname=hop.address, port=hop.port, local_hostname=self.config.hostname,
                                 timeout=cfg.command_timeout, start_tls=False, use_tls=False,
                                 source_address=(source, 0) if source else None)
        try:
            greeting = await client.connect(timeout=cfg.connect_timeout)
        except SMTPConnectResponseError as exc:
            log.info("delivery.smtp_reply", peer=peer, remote=remote, command="CONNECT", code=exc.code,
                     reply=reply_text(exc.message))
            outcome = reply_outcome(exc.code, exc.message, remote)
            # A 5xx greeting refuses this host, not the recipient: try the next one.
            raise _SessionFailure(Outcome.temporary("4" + outcome.status[1:], outcome.diagnostic, remote)) from None
        except SMTPConnectTimeoutError:
            log.info("delivery.connect_failed", peer=peer, remote=remote, error="timed out")
            raise _SessionFailure(Outcome.temporary(
                "4.4.1", f"connect to {remote}: timed out after {cfg.connect_timeout:g}s", remote), dead=True) from None
        except (SMTPConnectError, OSError) as exc:
            why = _connect_error(exc)
            log.info("delivery.connect_failed", peer=peer, remote=remote, error=why)
            raise _SessionFailure(Outcome.temporary("4.4.1", f"connect to {remote}: {why}", remote),
                                  dead=True) from None
        except SMTPException as exc:
            raise _SessionFailure(Outcome.temporary("4.4.2", f"connect to {remote}: {exc}", remote)) from None
        self.connections_opened += 1
        log.info("delivery.connect", peer=peer, remote=remote, greeting=reply_text(greeting.message)[:200])
        conn = _Connection(client, hop, policy, False, self.clock())
        try:
            await self._hello(conn, log)
            offered = client.supports_extension("starttls")
            if policy in ("require", "verify") and not offered:
                raise _SessionFailure(Outcome.temporary(
                    "4.7.4", f"TLS is required, but was not offered by host {remote}", remote))
            use_tls = offered and (policy in ("require", "verify") or (
                policy == "opportunistic" and allow_tls and state.tls_broken_until <= self.clock()))
            if use_tls:
                try:
                    await self._starttls(conn, log)
                except _SessionFailure:
                    if policy in ("require", "verify"):
                        raise
                    state.tls_broken_until = self.clock() + TLS_BROKEN_HOLD
                    client.close()
                    log.info("delivery.tls_fallback", peer=peer, remote=remote,
                             reason="STARTTLS failed; retrying this host without TLS")
                    return await self._connect(hop, policy, state, log, allow_tls=False)
        except BaseException:
            client.close()
            raise
        return conn

    async def _hello(self, conn: _Connection, log: Any) -> None:
        client = conn.client
        try:
            try:
                await client.ehlo(timeout=self.delivery.command_timeout)
            except SMTPHeloError as exc:
                log.info("delivery.smtp_reply", peer=conn.peer, remote=conn.remote, command="EHLO",
                         code=exc.code, reply=reply_text(exc.message))
                if not client.is_connected:
                    raise
                await client.helo(timeout=self.delivery.command_timeout)
        except SMTPHeloError as exc:
            log.info("delivery.smtp_reply", peer=conn.peer, remote=conn.remote, command="HELO",
                     code=exc.code, reply=reply_text(exc.message))
            raise _SessionFailure(_session_reply(exc.code, exc.message, conn.remote, client)) from None
        except (SMTPServerDisconnected, SMTPTimeoutError, SMTPException, OSError) as exc:
            raise _SessionFailure(_lost(exc, conn.remote, "EHLO")) from None

    async def _starttls(self, conn: _Connection, log: Any) -> None:
        client = conn.client
        server_name: str | None
        if conn.policy == "verify":  # the certificate must name the host we meant to reach
            context, server_name = self._verifying_context(), conn.hop.host.strip("[]")
        else:
            context, server_name = self._tls_context, (conn.hop.host if ip_literal(conn.hop.host) is None else None)
        try:
            await client.starttls(tls_context=context, server_hostname=server_name,
                                  timeout=self.delivery.command_timeout)
        except SMTPResponseException as exc:
            log.info("delivery.smtp_reply", peer=conn.peer, remote=conn.remote, command="STARTTLS",
                     code=exc.code, reply=reply_text(exc.message))
            raise _SessionFailure(Outcome.temporary(
                "4.7.5", f"STARTTLS refused by {conn.remote}: {smtp_diagnostic(exc.code, exc.message)}",
                conn.remote)) from None
        except (SMTPException, ssl.SSLError, OSError) as exc:
            log.info("delivery.tls_failed", peer=conn.peer, remote=conn.remote, error=str(exc))
            raise _SessionFailure(Outcome.temporary(
                "4.7.5", f"TLS handshake with {conn.remote} failed: {exc}", conn.remote)) from None
        conn.tls = True
        ssl_object = client.get_transport_info("ssl_object")
        log.info("delivery.tls", peer=conn.peer, remote=conn.remote,
                 version=ssl_object.version() if ssl_object else None,
                 cipher=ssl_object.cipher()[0] if ssl_object and ssl_object.cipher() else None)
        await self._hello(conn, log)

    def _verifying_context(self) -> ssl.SSLContext:
        if self._verify_context is None:
            ca = self.delivery.tls_ca_file
            self._verify_context = verifying_tls_context(str(ca) if ca else None)
        return self._verify_context

    def _release(self, conn: _Connection, state: _HopState, log: Any) -> None:
        if self._closed or not conn.client.is_connected or self.clock() - conn.created > CONNECTION_MAX_AGE:
            self._close_later(conn, "done")
            return
        loop = asyncio.get_running_loop()
        conn.idle_timer = loop.call_later(self.delivery.connection_idle, self._expire, conn, state)
        state.idle.append(conn)

    def _expire(self, conn: _Connection, state: _HopState) -> None:
        if conn in state.idle:
            state.idle.remove(conn)
            self._close_later(conn, "idle")
        key = (conn.hop.address, conn.hop.port)
        if (not state.idle and state.active == 0 and state.dead_until <= self.clock()
                and state.tls_broken_until <= self.clock() and self._hops.get(key) is state):
            del self._hops[key]

    def _close_later(self, conn: _Connection, reason: str) -> None:
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None
        task = asyncio.ensure_future(self._quit(conn, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _quit(self, conn: _Connection, reason: str) -> None:
        try:
            if conn.client.is_connected:
                await conn.client.quit(timeout=QUIT_TIMEOUT)
        except (SMTPException, OSError):
            pass
        finally:
            conn.client.close()
        self.log.debug("delivery.connection_closed", peer=conn.peer, remote=conn.remote, reason=reason,
                       transactions=conn.transactions)

    # ------------------------------------------------------------ one transaction

    async def _transaction(self, conn: _Connection, env: Envelope, rcpts: list[str], message: bytes,
                           log: Any) -> dict[str, Outcome]:
        client, remote, cfg = conn.client, conn.remote, self.delivery
        ext = client.esmtp_extensions
        outcomes: dict[str, Outcome] = {}
        utf8 = needs_smtputf8(env, rcpts, message)
        if utf8 and "smtputf8" not in ext:
            return _all(rcpts, Outcome.permanent_failure(
                "5.6.7", f"remote server does not support SMTPUTF8 ({remote}): the message needs it", remote))
        # CRLF line ends as sent (SIZE counts them); a big message is scanned off the loop
        wire = (await asyncio.to_thread(normalize_message_line_endings, message) if len(message) > MIB
                else normalize_message_line_endings(message))
        limit = ext.get("size", "")
        if limit.isdigit() and int(limit) > 0 and len(wire) > int(limit):
            return _all(rcpts, Outcome.permanent_failure(
                "5.3.4", f"message size {len(wire)} exceeds size limit {limit} of server {remote}", remote))
        options = []
        if "size" in ext:
            options.append(f"SIZE={len(wire)}")
        if env.body_8bit and "8bitmime" in ext:
            options.append("BODY=8BITMIME")
        smtputf8 = (utf8 or env.smtputf8) and "smtputf8" in ext
        if smtputf8:
            options.append("SMTPUTF8")
        encoding = "utf-8" if smtputf8 else "ascii"
        try:
            sender_path = smtp_path(env.sender) if env.sender else "<>"
        except ValueError as exc:
            return _all(rcpts, Outcome.permanent_failure("5.1.7", str(exc)))

        stage = "MAIL FROM"
        fields = dict(peer=conn.peer, remote=remote)
        conn.transactions += 1
        try:
            reply = await client.execute_command(b"MAIL", b"FROM:" + sender_path.encode(encoding),
                                                 *[o.encode("ascii") for o in options],
                                                 timeout=cfg.command_timeout)
            self._log_reply(log, fields, "MAIL", reply.code, reply.message)
            if reply.code != 250:
                raise _SessionFailure(_session_reply(reply.code, reply.message, remote, client))
            accepted: list[str] = []
            stage = "RCPT TO"
            for rcpt in rcpts:
                try:
                    path = smtp_path(rcpt)
                except ValueError as exc:
                    outcomes[rcpt] = Outcome.permanent_failure("5.1.3", str(exc))
                    continue
                reply = await client.execute_command(b"RCPT", b"TO:" + path.encode(encoding),
                                                     timeout=cfg.command_timeout)
                self._log_reply(log, fields, "RCPT", reply.code, reply.message, recipient=rcpt)
                if reply.code in (250, 251):
                    accepted.append(rcpt)
                elif reply.code == 421 or not client.is_connected:
                    raise _SessionFailure(Outcome.temporary(
                        reply_status(reply.code, reply.message) if reply.code // 100 == 4 else "4.4.2",
                        smtp_diagnostic(reply.code, reply.message), remote))
                else:
                    outcomes[rcpt] = reply_outcome(reply.code, reply.message, remote)
            if not accepted:
                stage = "RSET"
                await client.rset(timeout=cfg.command_timeout)
                return outcomes
            stage = "DATA"
            try:
                reply = await client.data(wire, timeout=data_timeout(len(wire), cfg.command_timeout,
                                                                      cfg.data_timeout_per_mib))
            except SMTPResponseException as exc:  # the reply to DATA or to the final dot
                reply = SMTPResponse(exc.code, exc.message)
            self._log_reply(log, fields, "DATA", reply.code, reply.message, recipients=accepted)
            result = reply_outcome(reply.code, reply.message, remote)
            for rcpt in accepted:
                outcomes[rcpt] = result
            return outcomes
        except _SessionFailure as failure:
            if failure.outcome.permanent:
                return {**_all(rcpts, failure.outcome), **outcomes}
            failure.answered.update(outcomes)
            raise
        except (SMTPServerDisconnected, SMTPTimeoutError, SMTPException, OSError) as exc:
            client.close()
            lost = _lost(exc, remote, stage)
            log.info("delivery.connection_lost", stage=stage, error=lost.diagnostic, **fields)
            return {r: outcomes.get(r, lost) for r in rcpts}

    def _log_reply(self, log: Any, fields: dict[str, Any], command: str, code: int, message: str,
                   **extra: Any) -> None:
        level = log.debug if 200 <= code < 400 else log.info
        level("delivery.smtp_reply", command=command, code=code, reply=reply_text(message)[:500], **fields, **extra)


# --------------------------------------------------------------------------- helpers


def _all(rcpts: Iterable[str], outcome: Outcome) -> dict[str, Outcome]:
    return {r: outcome for r in rcpts}


def _session_reply(code: int, message: str, remote: str, client: aiosmtplib.SMTP) -> Outcome:
    """A reply that refuses the whole transaction (greeting, HELO, MAIL)."""
    outcome = reply_outcome(code, message, remote)
    if outcome.ok:  # an odd positive reply where a refusal was expected
        return Outcome.temporary("4.5.0", outcome.diagnostic, remote)
    return outcome


def _lost(exc: BaseException, remote: str, stage: str) -> Outcome:
    if isinstance(exc, TimeoutError | SMTPTimeoutError):
        why = f"conversation with {remote} timed out while sending {stage}"
    elif isinstance(exc, SMTPServerDisconnected | ConnectionError):
        why = f"lost connection with {remote} while sending {stage}"
    else:
        why = f"error talking to {remote} while sending {stage}: {exc}"
    return Outcome.temporary("4.4.2", why, remote)


def _connect_error(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, SMTPConnectError) and exc.__cause__ else exc
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno)  # "Connection refused", the same under asyncio and uvloop
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause) or type(cause).__name__


def verifying_tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Postfix's "secure"/"verify" level: the peer's certificate must chain to a
    trusted CA (``ca_file``, else the system's store) and name the host."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _opportunistic_tls_context() -> ssl.SSLContext:
    """Encrypt without authenticating the peer (RFC 7435 opportunistic security;
    Postfix's "may"/"encrypt" levels).  No CA bundle is loaded: nothing is verified."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
