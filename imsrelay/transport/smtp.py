"""Outbound SMTP: the transport that carries mail to other sites and the Internet.

``SmtpClient.deliver(route, envelope, recipients, message)`` makes one delivery
attempt for a group of recipients that share a route and returns one ``Outcome``
per recipient.  It never raises for anything a peer or the network can do.

- **Next hops.** A ``relay`` route (E-Mail Domain table entry or smart host) goes
  to its fixed host (its A/AAAA addresses when it is a name, never its MX); an
  ``mx`` route to every address of every MX host of the domain, in RFC 5321 §5.1
  order.  The next hop is tried on a connection failure or a temporary (4xx)
  failure; a permanent (5xx) reply ends the attempt for the recipients it covers.
- **Loops** (``imsrelay.policy.mail_loops``). An MX next hop that is this site (its listen address or host name
  at its port) is dropped together with every less preferred one, as RFC 5321
  §5.1 asks; when nothing is left the recipients fail with ``5.4.6``.
- **Connections** are pooled per next hop (address, port) and reused: before
  reuse a connection is checked with ``RSET`` (with PIPELINING, the first command
  of the transaction's group: no reply at all, or a refused RSET, and the
  transaction goes to another connection — no body was sent); an idle one is closed (``QUIT``)
  after ``delivery.connection_idle``; one older than ``CONNECTION_MAX_AGE`` is not
  reused.  How many deliveries run against one destination at a time is decided
  by the queue manager alone (``delivery.max_per_destination``); the IMS's
  connection caps (Connections tab, Advanced) are kept here: at most
  ``connections.max_outbound`` connections open to all hosts (idle ones of other
  hosts are closed to make room), ``connections.max_outbound_per_host`` to one next
  hop, and a connection is closed after ``connections.messages_per_connection``
  transactions (0: no limit).  A host that
  refused or timed out a connection is not tried again for a short while
  (``DEAD_HOST_HOLD``), so a dead peer costs one timeout, not one per message,
  and never holds up other destinations.
- **STARTTLS** per route: ``none``; ``opportunistic`` (used when offered, without
  certificate checks as in RFC 7435; if the handshake fails the hop is retried in
  clear and remembered as TLS-broken for ``TLS_BROKEN_HOLD``); ``require`` (a
  temporary failure ``4.7.4`` when the peer does not offer it, ``4.7.5`` when the
  handshake fails).  aiosmtplib is always told ``start_tls=False`` explicitly and
  the upgrade is done here (aiosmtplib issues #16, #122).
- **Several hosts** (``host1,host2,host3``: an E-Mail Domain entry, the smart host,
  a Connected Sites entry naming several servers): the route gives them in this
  message's turn (round robin by message, KB Q279323); a host that did not take a
  connection is remembered as down for a short while (``DEAD_HOST_HOLD``, at most the
  first retry interval) and skipped (``router.hosts_in_turn``), the next one in turn
  carrying the mail; when every host is down the mail waits (``4.4.1``).
- **AUTH** (the Security tab, KB Q174754): with credentials on the route, after
  STARTTLS the client authenticates with PLAIN or LOGIN, as the peer offers.  The
  credentials go only over TLS unless the entry's ``allow_plaintext`` says so (else the
  mail waits, ``4.7.0``); a refused AUTH (``535``) defers the mail with the peer's
  reply (``4.7.8``: a wrong password is the administrator's to fix, as Postfix's
  ``smtp_sasl_auth_soft_bounce``), the next host in turn is tried, and the NDR comes
  only when the message's lifetime runs out; a peer that offers no AUTH gets the mail
  without it.  The password is read when a connection needs it (environment variable,
  file, or the site file) and never logged or traced (the protocol log shows
  ``AUTH PLAIN ********``).
- **Timeouts:** ``connect_timeout`` for the TCP connection and greeting,
  ``command_timeout`` for each command, and for DATA ``command_timeout`` plus
  ``data_timeout_per_mib`` per MiB of message.
- **PIPELINING** (RFC 2920, ``imsrelay.transport.pipelining``) when the peer offers it:
  MAIL, every RCPT and DATA in one write, then their replies in order; the body after
  a 354 when a recipient was accepted; no recipient accepted: RSET, or a lone dot when
  the peer answered DATA with 354 anyway (§3.1).  Replies that did not come before a
  dropped connection leave their recipients deferred.  Without it, one command at a time.
- **The message** goes out byte for byte as queued (``imsrelay.transport.smtp_body``: only
  dot-stuffed; a lone CR or LF made CRLF); ``SIZE=`` when the peer offers SIZE (and a
  message above the peer's limit fails ``5.3.4`` without being sent), ``BODY=8BITMIME``
  when the message was received as 8-bit and the peer offers 8BITMIME,
  ``SMTPUTF8`` when the message needs it and the peer offers it — when it needs
  it and the peer does not, a permanent ``5.6.7`` ("remote server does not
  support SMTPUTF8").
- **DSN** (RFC 3461) when the peer offers it: RET and ENVID on MAIL, NOTIFY and ORCPT
  on each RCPT, as the sender gave them (ORCPT, when none was given, names the address
  received here); an outcome delivered so is ``dsn_passed`` — the peer reports success
  from then on, and the queue sends a ``relayed`` report only for the others.
- **Outcomes** follow the reply code *and* the connection state (aiosmtplib
  #48): a RCPT 5xx fails that recipient only, 4xx defers it; the DATA reply
  applies to every accepted recipient (one other than 354 delivers nothing); a
  timeout or a dropped connection is always temporary.  Diagnostics read
  ``smtp; 550 5.1.1 <x@y>: unknown user``, ``remote`` reads ``host [address]:port``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import ipaddress
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiosmtplib.errors import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.response import SMTPResponse

from imsrelay.model.addresses import ip_literal
from imsrelay.model.dsn_params import orcpt_param, xtext_encode
from imsrelay.model.envelope import PENDING, Envelope, RecipientState
from imsrelay.model.message import header_block
from imsrelay.model.outcome import Outcome
from imsrelay.model.settings import OutboundAuth, SiteConfig, hosts_text
from imsrelay.observe.protocol_log import session_id
from imsrelay.policy.mail_loops import SelfEndpoints, is_self, without_self
from imsrelay.policy.sealed import SEALED_STATUS, inside, networks_text
from imsrelay.routing.dns import DnsFailure, MailResolver, NextHop
from imsrelay.routing.router import MX, RELAY, Route, hosts_in_turn
from imsrelay.transport.pipelining import EARLY, PipeliningSMTP
from imsrelay.transport.smtp_body import LONE_DOT, Body, crlf_message, dot_stuffed_parts

MIB = 1024 * 1024
CONNECTION_MAX_AGE = 300.0  # seconds a connection is reused for (Postfix: 300s)
DEAD_HOST_HOLD = 60.0  # at most this long a host that refused a connection is skipped
TLS_BROKEN_HOLD = 3600.0  # after a failed opportunistic handshake, use clear text this long
QUIT_TIMEOUT = 5.0
OUTCOMES_KEPT = 256  # outcomes of replies to a message kept for the next one (_final_outcome)

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f<>]")
_SPACE = re.compile(r"\s")  # str.isspace()'s characters (both are Py_UNICODE_ISSPACE)
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
        header = header_block(message)
        return not header.isascii()
    return False


@functools.lru_cache(maxsize=4096)
def smtp_path(address: str) -> str:
    """``<address>`` for MAIL/RCPT; ValueError for what cannot go on a command line.
    Memoised (the same senders and recipients come again and again; a refusal is not kept)."""
    unquoted = _QUOTED_LOCAL.sub("", address, count=1)
    if _UNSAFE.search(address) or _SPACE.search(unquoted):
        raise ValueError(f"{address!r} cannot be sent in an SMTP command")
    return f"<{address}>"


def dsn_mail_params(env: Envelope) -> list[str]:
    """MAIL FROM's DSN parameters for a peer that offers DSN: the sender's RET and ENVID."""
    params = [f"RET={env.ret}"] if env.ret else []
    if env.envid:
        params.append(f"ENVID={xtext_encode(env.envid)}")
    return params


_orcpt_param = functools.lru_cache(maxsize=4096)(orcpt_param)  # (xtext, a loop per character: once per address)


def dsn_rcpt_params(r: RecipientState) -> list[str]:
    """RCPT TO's DSN parameters for a peer that offers DSN: the sender's NOTIFY, and its
    ORCPT or else the address this site received (RFC 3461 4.2 lets a relay add it)."""
    params = [f"NOTIFY={r.notify}"] if r.notify else []
    if r.orcpt:
        params.append(f"ORCPT={_orcpt_param(r.orcpt)}")
    elif r.original and r.original.isascii():
        params.append(f"ORCPT={_orcpt_param('rfc822;' + r.original)}")
    return params


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


class _StaleConnection(Exception):
    """A pooled connection failed its RSET check (pipelined with the transaction, before
    any body was sent): the transaction is made again on another connection."""


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
    client: PipeliningSMTP
    hop: NextHop
    policy: str
    tls: bool
    created: float
    transactions: int = 0
    idle_timer: asyncio.TimerHandle | None = None  # closes it when idle long enough; re-arms itself, never cancelled on reuse
    idle_since = 0.0  # loop time it went back to the pool
    session: str = ""  # protocol log session id
    queue_id: str | None = None  # of the transaction under way (protocol log)
    unchecked: bool = False  # taken from the pool: its RSET leads the next pipelined group
    user: str | None = None  # the user name it authenticated as (AUTH), None: none

    @functools.cached_property
    def remote(self) -> str:  # (the hop never changes: its names are made once)
        return remote_name(self.hop)

    @functools.cached_property
    def peer(self) -> str:
        return f"{self.hop.address}:{self.hop.port}"


@dataclass(eq=False)
class _Transaction:
    """One MAIL transaction under way: where it is, and what is known of each recipient."""

    conn: _Connection
    log: Any
    outcomes: dict[str, Outcome]  # recipients answered for (refused, or the DATA reply)
    size: int  # the message as sent, before dot-stuffing
    encoding: str  # of command lines: utf-8 with SMTPUTF8
    dsn: bool = False  # the peer offers DSN: it got the DSN parameters (RFC 3461) and reports success itself
    stage: str = "MAIL FROM"  # the command whose reply is awaited (diagnostics of a lost connection)
    accepted: list[str] = field(default_factory=list)  # recipients whose RCPT got 250/251

    @functools.cached_property
    def fields(self) -> dict[str, Any]:
        return {"peer": self.conn.peer, "remote": self.conn.remote}


class _Slots:
    """``asyncio.Semaphore`` (Python 3.11's algorithm, step for step) whose free slot is
    taken without a coroutine: ``take`` is ``acquire``'s immediate case, ``wait`` its
    waiting one, ``give`` is ``release`` (under ``async with``, a semaphore costs two
    coroutines and some eight calls even when a slot is free).  First come, first
    served: while anyone waits, a newcomer waits too (tests/test_outbound_slots.py)."""

    __slots__ = ("_free", "_waiters")

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def take(self) -> bool:
        """A slot now (True), or False: ``wait`` for one."""
        if self._free == 0 or (self._waiters and any(not w.cancelled() for w in self._waiters)):
            return False
        self._free -= 1
        return True

    async def wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        except asyncio.CancelledError:
            if not waiter.cancelled():  # woken, then cancelled before it ran: the slot goes on
                self._free += 1
                self._wake_up_next()
            raise
        if self._free > 0:
            self._wake_up_next()

    def give(self) -> None:
        self._free += 1
        self._wake_up_next()

    def _wake_up_next(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                self._free -= 1
                waiter.set_result(None)
                return


@dataclass(eq=False)
class _HopState:
    """Everything known about one next hop (address, port)."""

    connections: _Slots  # connections.max_outbound_per_host (the IMS's cap, not the queue's)
    idle: list[_Connection] = field(default_factory=list)
    active: int = 0
    dead_until: float = 0.0
    dead_reason: str = ""
    tls_broken_until: float = 0.0


class SmtpClient:
    """One site's outbound SMTP transport; safe to share by all delivery tasks."""

    def __init__(self, config: SiteConfig, resolver: MailResolver,
                 self_endpoints: SelfEndpoints | Callable[[], SelfEndpoints], log: Any, *,
                 clock: Callable[[], float] = time.monotonic, metrics: Any = None,
                 protocol_log: Any = None) -> None:
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
        self.metrics = metrics
        self.protocol_log = protocol_log
        self.limits = config.connections
        self._slots = _Slots(self.limits.max_outbound)  # connections in use, to every host
        self.most_open = 0  # the most connections open at once (tests, /metrics' current gauge)
        self._down_hosts: dict[tuple[str, int], float] = {}  # host of a host list -> tried again from then
        self._outcomes: dict[tuple[int, str, str, bool], Outcome] = {}  # _final_outcome's

    # ------------------------------------------------------------ public

    async def deliver(self, route: Route, env: Envelope, recipients: list[str],
                      message: bytes) -> dict[str, Outcome]:
        rcpts = list(dict.fromkeys(recipients))
        log = self.log.bind(queue_id=env.queue_id)
        if self._closed:
            return _all(rcpts, Outcome.temporary("4.3.2", "the site is shutting down"))
        if route.kind not in (RELAY, MX):
            return _all(rcpts, Outcome.temporary("4.3.5", f"route kind {route.kind!r} is not an SMTP route"))
        if route.kind == RELAY and route.hosts:
            return await self._deliver_in_turn(route, env, rcpts, message, log)
        outcomes, _ = await self._deliver_route(route, env, rcpts, message, log)
        return outcomes

    async def _deliver_in_turn(self, route: Route, env: Envelope, rcpts: list[str], message: bytes,
                               log: Any) -> dict[str, Outcome]:
        """A next hop of several hosts (Q279323): each in this message's turn, skipping
        those down; a host that takes no connection is remembered as down."""
        now = self.clock()
        for key in [k for k, until in self._down_hosts.items() if until <= now]:
            del self._down_hosts[key]
        order, skipped = hosts_in_turn(route.relay_hosts, self._down_hosts, now)
        if skipped:
            log.info("delivery.hosts_skipped", hosts=hosts_text(skipped), trying=hosts_text(order),
                     reason="recently unreachable")
        if not order:
            return _all(rcpts, Outcome.temporary(
                "4.4.1", f"every host of this next hop is down ({hosts_text(skipped)}: recently unreachable, "
                         "not tried again yet)"))
        outcomes: dict[str, Outcome] = {}
        pending = rcpts
        for i, (host, port) in enumerate(order):
            if i:
                log.info("delivery.host_failover", failed=hosts_text(order[i - 1:i]), next=hosts_text(((host, port),)))
            result, down = await self._deliver_route(dataclasses.replace(route, host=host, port=port, hosts=()),
                                                     env, pending, message, log)
            if down:
                self._down_hosts[(host, port)] = self.clock() + self._dead_hold()
            outcomes.update(result)
            pending = [r for r in pending if not result[r].ok and not result[r].permanent]
            if not pending:
                break
        return outcomes

    async def _deliver_route(self, route: Route, env: Envelope, rcpts: list[str], message: bytes,
                             log: Any) -> tuple[dict[str, Outcome], bool]:
        """One route's next hops in turn: (an outcome per recipient, whether the route's
        host is down: it did not resolve, or none of its addresses took a connection)."""
        try:
            hops = self._literal_hop(route) or await self._next_hops(route)
        except DnsFailure as failure:
            log.info("delivery.dns_failed", domain=route.domain, host=route.host, status=failure.status,
                     permanent=failure.permanent, reason=failure.reason)
            if route.kind == RELAY:  # our own table points at a name that does not resolve: retry
                return _all(rcpts, Outcome.temporary("4.4.4", f"relay host {route.host}: {failure.reason}")), True
            if failure.permanent:
                return _all(rcpts, Outcome.permanent_failure(failure.status, failure.reason)), False
            return _all(rcpts, Outcome.temporary(failure.status, failure.reason)), False
        hops, outside = self._inside_lab(hops)
        if not hops:
            reason = (f"every next hop of {route.host or route.domain} ({', '.join(remote_name(h) for h in outside)}) "
                      f"is outside this sealed lab (lab.networks: {networks_text(self.config.lab.networks)}); "
                      "no connection leaves the lab")
            log.warning("delivery.sealed", domain=route.domain, host=route.host, reason=reason)
            return _all(rcpts, Outcome.permanent_failure(SEALED_STATUS, reason)), False
        if route.kind == MX:
            hops, looped = without_self(hops, self._self_endpoints())
            if not hops and looped:
                reason = f"mail for {route.domain} loops back to myself ({self.config.hostname} is its best MX)"
                log.warning("delivery.loop", domain=route.domain, reason=reason)
                return _all(rcpts, Outcome.permanent_failure("5.4.6", reason)), False
        elif any(is_self(h, self._self_endpoints()) for h in hops):
            reason = f"relay host {route.host}:{route.port} is this site: loop"
            log.warning("delivery.loop", domain=route.domain, reason=reason)
            return _all(rcpts, Outcome.permanent_failure("5.4.6", reason)), False
        outcomes: dict[str, Outcome] = {}
        pending = rcpts
        for hop in hops:
            result = await self._deliver_via(hop, route, env, pending, message, log)
            outcomes.update(result)
            pending = [r for r in pending if not result[r].ok and not result[r].permanent]
            if not pending:
                break
        now = self.clock()
        down = bool(pending) and all(self._state(h).dead_until > now for h in hops)
        return outcomes, down

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
        self._down_hosts.clear()

    def open_connections(self) -> int:
        """Connections open now: in use (one per transaction) and idle in the pool."""
        return sum(s.active + len(s.idle) for s in self._hops.values())

    def _make_room(self, state: _HopState) -> None:
        """Keep open connections within connections.max_outbound: before a transaction
        on ``state``'s host (already counted as active), close idle ones of other hosts."""
        while self.open_connections() - (1 if state.idle else 0) > self.limits.max_outbound:
            oldest = min(((c.created, c, st) for st in self._hops.values() if st is not state for c in st.idle),
                         key=lambda t: t[0], default=None)
            if oldest is None:
                return
            _, conn, st = oldest
            st.idle.remove(conn)
            self._close_later(conn, "max_outbound connections reached")

    def _trace(self, conn: _Connection, who: str, text: str) -> None:
        if self.protocol_log is not None:
            self.protocol_log.line(direction="out", session=conn.session, peer=conn.peer, queue_id=conn.queue_id,
                                   who=who, text=text)

    def _trace_reply(self, conn: _Connection, code: int, message: str) -> None:
        if self.protocol_log is not None:
            lines = message.splitlines() or [""]
            for i, line in enumerate(lines):
                self._trace(conn, "S", f"{code}{'-' if i < len(lines) - 1 else ' '}{line}")

    # ------------------------------------------------------------ next hops

    def _literal_hop(self, route: Route) -> list[NextHop] | None:
        """A relay route to an address literal: its one next hop, nothing to look up."""
        if route.kind == RELAY and route.host is not None:
            literal = ip_literal(route.host)
            if literal is not None:
                return [NextHop(route.host.strip("[]"), literal, route.port, 0)]
        return None

    async def _next_hops(self, route: Route) -> list[NextHop]:
        if route.kind == RELAY:
            assert route.host is not None
            literal = self._literal_hop(route)
            if literal is not None:
                return literal
            addresses = await self.resolver.addresses(route.host)
            return [NextHop(route.host, a, route.port, 0) for a in addresses]
        assert route.domain is not None
        return await self.resolver.next_hops(route.domain, port=route.port)

    def _inside_lab(self, hops: list[NextHop]) -> tuple[list[NextHop], list[NextHop]]:
        """(hops inside the lab, hops outside it): a sealed lab connects only inside
        its networks, whatever DNS or a table said (imsrelay.policy.sealed)."""
        lab = self.config.lab
        if not lab.sealed:
            return hops, []
        return ([h for h in hops if inside(h.address, lab.networks)],
                [h for h in hops if not inside(h.address, lab.networks)])

    def _state(self, hop: NextHop) -> _HopState:
        key = (hop.address, hop.port)
        state = self._hops.get(key)
        if state is None:
            state = self._hops[key] = _HopState(_Slots(self.limits.max_outbound_per_host))
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
        if not state.connections.take():  # a slot of this host's, then of the site's
            await state.connections.wait()
        try:
            if not self._slots.take():
                await self._slots.wait()
            try:
                dead = self._dead(hop, state)  # it may have died while we waited
                if dead:
                    return _all(rcpts, dead)
                state.active += 1
                conn: _Connection | None = None
                try:
                    self._make_room(state)
                    self.most_open = max(self.most_open, self.open_connections() - (1 if state.idle else 0))
                    while True:
                        conn = self._pooled(route.starttls, state, route.auth.username if route.auth else None)
                        if conn is None or not conn.unchecked:  # (connect, or check it with RSET first)
                            conn = await self._acquire(hop, route.starttls, state, log, route.auth, route.auth_for,
                                                       pooled=conn)
                        try:
                            result = await self._transaction(conn, env, rcpts, message, log)
                        except _StaleConnection as stale:  # (a new connection is never stale: this ends)
                            log.debug("delivery.reuse_failed", peer=conn.peer, error=str(stale))
                            conn.client.close()
                            conn = None
                            continue
                        break
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
            finally:
                self._slots.give()
        finally:
            state.connections.give()

    def _count_failed(self) -> None:
        if self.metrics is not None:
            self.metrics.conn_out_failed.inc()

    def _dead_hold(self) -> float:
        return min(DEAD_HOST_HOLD, min(self.delivery.retry_intervals, default=DEAD_HOST_HOLD))

    def _pooled(self, policy: str, state: _HopState, user: str | None) -> _Connection | None:
        """The newest reusable pooled connection (others found on the way are closed);
        one of a peer with PIPELINING is returned checked later (``unchecked``: its
        RSET goes with the transaction's group, _pipelined)."""
        now = self.clock()
        while state.idle:
            conn = state.idle.pop()  # (its idle timer stays: it finds the connection in use and lets go)
            if (conn.policy != policy or conn.user != user or now - conn.created > CONNECTION_MAX_AGE
                    or not conn.client.is_connected):
                self._close_later(conn, "not reusable")
                continue
            if conn.client.supports_extension("pipelining"):
                conn.unchecked = True
            return conn
        return None

    async def _acquire(self, hop: NextHop, policy: str, state: _HopState, log: Any,
                       auth: OutboundAuth | None = None, auth_for: str | None = None,
                       pooled: _Connection | None = None) -> _Connection:
        """A usable connection: ``pooled`` (already taken from the pool) or the next pooled
        one, checked with RSET unless its RSET rides with the next group, else a new one."""
        user = auth.username if auth else None
        while (conn := pooled or self._pooled(policy, state, user)) is not None:
            pooled = None
            if conn.unchecked:
                return conn
            try:  # health check (aiosmtplib #243: never trust a long-idle connection)
                self._trace(conn, "C", "RSET")
                reply = await conn.client.rset(timeout=min(self.delivery.command_timeout, 30.0))
                self._trace_reply(conn, reply.code, reply.message)
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
        return await self._connect(hop, policy, state, log, allow_tls=True, auth=auth, auth_for=auth_for)

    async def _connect(self, hop: NextHop, policy: str, state: _HopState, log: Any, *,
                       allow_tls: bool, auth: OutboundAuth | None = None, auth_for: str | None = None) -> _Connection:
        cfg = self.delivery
        remote = remote_name(hop)
        peer = f"{hop.address}:{hop.port}"
        source = source_address_for(self.config.smtp.listen, hop.address)
        client = PipeliningSMTP(hostname=hop.address, port=hop.port, local_hostname=self.config.hostname,
                                 timeout=cfg.command_timeout, start_tls=False, use_tls=False,
                                 source_address=(source, 0) if source else None)
        session = session_id() if self.protocol_log is not None else ""
        try:
            greeting = await client.connect(timeout=cfg.connect_timeout)
        except SMTPConnectResponseError as exc:
            self._count_failed()
            self._trace(_Connection(client, hop, policy, False, self.clock(), session=session), "S",
                        f"{exc.code} {exc.message}")
            log.info("delivery.smtp_reply", peer=peer, remote=remote, command="CONNECT", code=exc.code,
                     reply=reply_text(exc.message))
            outcome = reply_outcome(exc.code, exc.message, remote)
            # A 5xx greeting refuses this host, not the recipient: try the next one.
            raise _SessionFailure(Outcome.temporary("4" + outcome.status[1:], outcome.diagnostic, remote)) from None
        except SMTPConnectTimeoutError:
            self._count_failed()
            log.info("delivery.connect_failed", peer=peer, remote=remote, error="timed out")
            raise _SessionFailure(Outcome.temporary(
                "4.4.1", f"connect to {remote}: timed out after {cfg.connect_timeout:g}s", remote), dead=True) from None
        except (SMTPConnectError, OSError) as exc:
            self._count_failed()
            why = _connect_error(exc)
            log.info("delivery.connect_failed", peer=peer, remote=remote, error=why)
            raise _SessionFailure(Outcome.temporary("4.4.1", f"connect to {remote}: {why}", remote),
                                  dead=True) from None
        except SMTPException as exc:
            self._count_failed()
            raise _SessionFailure(Outcome.temporary("4.4.2", f"connect to {remote}: {exc}", remote)) from None
        self.connections_opened += 1
        if self.metrics is not None:
            self.metrics.conn_out.inc()
        log.info("delivery.connect", peer=peer, remote=remote, greeting=reply_text(greeting.message)[:200])
        conn = _Connection(client, hop, policy, False, self.clock(), session=session)
        self._trace_reply(conn, greeting.code, greeting.message)
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
                    return await self._connect(hop, policy, state, log, allow_tls=False, auth=auth,
                                               auth_for=auth_for)
            if auth is not None:
                await self._authenticate(conn, auth, auth_for or "the next hop", log)
        except BaseException:
            client.close()
            raise
        return conn

    async def _hello(self, conn: _Connection, log: Any) -> None:
        client = conn.client
        try:
            try:
                self._trace(conn, "C", f"EHLO {self.config.hostname}")
                reply = await client.ehlo(timeout=self.delivery.command_timeout)
                self._trace_reply(conn, reply.code, reply.message)
            except SMTPHeloError as exc:
                self._trace_reply(conn, exc.code, exc.message)
                log.info("delivery.smtp_reply", peer=conn.peer, remote=conn.remote, command="EHLO",
                         code=exc.code, reply=reply_text(exc.message))
                if not client.is_connected:
                    raise
                self._trace(conn, "C", f"HELO {self.config.hostname}")
                reply = await client.helo(timeout=self.delivery.command_timeout)
                self._trace_reply(conn, reply.code, reply.message)
        except SMTPHeloError as exc:
            self._trace_reply(conn, exc.code, exc.message)
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
            self._trace(conn, "C", "STARTTLS")
            reply = await client.starttls(tls_context=context, server_hostname=server_name,
                                          timeout=self.delivery.command_timeout)
            self._trace_reply(conn, reply.code, reply.message)
        except SMTPResponseException as exc:
            self._trace_reply(conn, exc.code, exc.message)
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

    async def _authenticate(self, conn: _Connection, auth: OutboundAuth, whose: str, log: Any) -> None:
        """AUTH PLAIN or LOGIN (as the peer offers) with ``whose`` credentials (Q174754);
        only over TLS unless ``allow_plaintext``.  The password is never logged or traced."""
        client = conn.client
        mechanism = next((m for m in ("plain", "login") if m in client.server_auth_methods), None)
        if mechanism is None:
            log.warning("delivery.auth_unavailable", peer=conn.peer, remote=conn.remote, user=auth.username,
                        offered=" ".join(client.server_auth_methods).upper() or None,
                        reason="the peer offers no AUTH PLAIN or LOGIN: the mail goes without AUTH")
            conn.user = auth.username  # (prepared for these credentials: reusable for them)
            return
        if not conn.tls and not auth.allow_plaintext:
            raise _SessionFailure(Outcome.temporary(
                "4.7.0", f"{whose}: the credentials of {auth.username} are sent only over TLS, and {conn.remote} "
                         "did not take STARTTLS (allow_plaintext = true in its auth table sends them in clear)",
                conn.remote))
        password = await outbound_password(auth, whose)
        if password is None:
            raise _SessionFailure(Outcome.temporary(
                "4.7.0", f"{whose}: no password for {auth.username} (from {auth.password_source})", conn.remote))
        self._trace(conn, "C", f"AUTH {mechanism.upper()} ******** (user {auth.username}; credentials not logged)")
        login = client.auth_plain if mechanism == "plain" else client.auth_login
        try:
            reply = await login(auth.username, password, timeout=self.delivery.command_timeout)
        except SMTPAuthenticationError as exc:
            self._trace_reply(conn, exc.code, exc.message)
            log.warning("delivery.auth_failed", peer=conn.peer, remote=conn.remote, user=auth.username,
                        mechanism=mechanism.upper(), code=exc.code, reply=reply_text(exc.message)[:200])
            status = reply_status(exc.code, exc.message)
            raise _SessionFailure(Outcome.temporary(
                "4" + status[1:] if status[0] in "45" else "4.7.0",
                f"{whose}: authentication as {auth.username} failed at {conn.remote}: "
                f"{smtp_diagnostic(exc.code, exc.message)}", conn.remote)) from None
        except (SMTPServerDisconnected, SMTPTimeoutError, SMTPException, OSError) as exc:
            raise _SessionFailure(_lost(exc, conn.remote, "AUTH")) from None
        self._trace_reply(conn, reply.code, reply.message)
        conn.user = auth.username
        log.info("delivery.auth", peer=conn.peer, remote=conn.remote, user=auth.username,
                 mechanism=mechanism.upper(), tls=conn.tls)

    def _verifying_context(self) -> ssl.SSLContext:
        if self._verify_context is None:
            ca = self.delivery.tls_ca_file
            self._verify_context = verifying_tls_context(str(ca) if ca else None)
        return self._verify_context

    def _release(self, conn: _Connection, state: _HopState, log: Any) -> None:
        conn.queue_id = None
        if self._closed or not conn.client.is_connected or self.clock() - conn.created > CONNECTION_MAX_AGE:
            self._close_later(conn, "done")
            return
        limit = self.limits.messages_per_connection
        if limit and conn.transactions >= limit:
            self._close_later(conn, f"{limit} messages per connection sent")
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        state.idle.append(conn)
        if conn.idle_timer is None:  # (one timer per connection, not one per transaction)
            conn.idle_timer = loop.call_later(self.delivery.connection_idle, self._expire, conn, state)

    def _expire(self, conn: _Connection, state: _HopState) -> None:
        """A connection's idle timer: closes it after ``delivery.connection_idle`` in the
        pool; when it was reused since, waits for the rest of its idle time."""
        conn.idle_timer = None
        if conn not in state.idle:  # in use (its release arms a timer again) or gone
            return
        loop = asyncio.get_running_loop()
        left = conn.idle_since + self.delivery.connection_idle - loop.time()
        if left > EARLY:
            conn.idle_timer = loop.call_later(left, self._expire, conn, state)
            return
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
                self._trace(conn, "C", "QUIT")
                reply = await conn.client.quit(timeout=QUIT_TIMEOUT)
                self._trace_reply(conn, reply.code, reply.message)
        except (SMTPException, OSError):
            pass
        finally:
            conn.client.close()
        self.log.debug("delivery.connection_closed", peer=conn.peer, remote=conn.remote, reason=reason,
                       transactions=conn.transactions)

    # ------------------------------------------------------------ one transaction

    async def _transaction(self, conn: _Connection, env: Envelope, rcpts: list[str], message: bytes,
                           log: Any) -> dict[str, Outcome]:
        client, remote = conn.client, conn.remote
        ext = client.esmtp_extensions
        outcomes: dict[str, Outcome] = {}
        utf8 = needs_smtputf8(env, rcpts, message)
        if utf8 and "smtputf8" not in ext:
            return _all(rcpts, Outcome.permanent_failure(
                "5.6.7", f"remote server does not support SMTPUTF8 ({remote}): the message needs it", remote))
        # CRLF line ends as sent (SIZE counts them) and the dot-stuffed body; a big message off the loop
        # what the ingress found: every line end a CRLF, no line starting with a dot
        clean, dotless = env.extra.get("crlf") is True, env.extra.get("dotless") is True
        size, body = (await asyncio.to_thread(_wire, message, clean, dotless)
                      if len(message) > MIB and not (clean and dotless) else _wire(message, clean, dotless))
        limit = ext.get("size", "")
        if limit.isdigit() and int(limit) > 0 and size > int(limit):
            return _all(rcpts, Outcome.permanent_failure(
                "5.3.4", f"message size {size} exceeds size limit {limit} of server {remote}", remote))
        options = []
        if "size" in ext:
            options.append(f"SIZE={size}")
        if env.body_8bit and "8bitmime" in ext:
            options.append("BODY=8BITMIME")
        smtputf8 = (utf8 or env.smtputf8) and "smtputf8" in ext
        if smtputf8:
            options.append("SMTPUTF8")
        dsn = "dsn" in ext
        if dsn:
            options += dsn_mail_params(env)
        try:
            sender_path = smtp_path(env.sender) if env.sender else "<>"
        except ValueError as exc:
            return _all(rcpts, Outcome.permanent_failure("5.1.7", str(exc)))
        paths: dict[str, str] = {}
        asked = {r.address: r for r in env.recipients if r.state == PENDING} if dsn else {}
        for rcpt in rcpts:
            try:
                paths[rcpt] = smtp_path(rcpt)
            except ValueError as exc:
                outcomes[rcpt] = Outcome.permanent_failure("5.1.3", str(exc))
                continue
            if rcpt in asked:
                paths[rcpt] = " ".join([paths[rcpt], *dsn_rcpt_params(asked[rcpt])])
        if not paths:
            return outcomes

        t = _Transaction(conn, log, outcomes, size, "utf-8" if smtputf8 else "ascii", dsn=dsn)
        mail = " ".join(["MAIL FROM:" + sender_path, *options])
        conn.transactions += 1
        conn.queue_id = env.queue_id
        try:
            if "pipelining" in ext:
                await self._pipelined(t, mail, paths, body)
            else:
                await self._stepwise(t, mail, paths, body)
            return outcomes
        except _SessionFailure as failure:
            if failure.outcome.permanent:
                return {**_all(rcpts, failure.outcome), **outcomes}
            failure.answered.update(outcomes)
            raise
        except (SMTPServerDisconnected, SMTPTimeoutError, SMTPException, OSError) as exc:
            client.close()
            lost = _lost(exc, remote, t.stage)
            self._trace(conn, "S", f"<connection lost during {t.stage}: {lost.diagnostic}>")
            log.info("delivery.connection_lost", stage=t.stage, error=lost.diagnostic, **t.fields)
            return {r: outcomes.get(r, lost) for r in rcpts}

    async def _stepwise(self, t: _Transaction, mail: str, paths: dict[str, str], body: Body) -> None:
        """One command, one reply: for a server that does not offer PIPELINING."""
        conn, client, cfg = t.conn, t.conn.client, self.delivery
        reply = await self._command(t, mail)
        self._log_reply(t.log, t.fields, "MAIL", reply.code, reply.message)
        if reply.code != 250:
            raise _SessionFailure(_session_reply(reply.code, reply.message, conn.remote, client))
        t.stage = "RCPT TO"
        for rcpt, path in paths.items():
            reply = await self._command(t, f"RCPT TO:{path}")
            self._rcpt_reply(t, rcpt, reply, connected=client.is_connected)
        if not t.accepted:
            await self._rset(t)
            return
        t.stage = "DATA"
        self._trace(conn, "C", f"DATA (then the message, {t.size} bytes)")
        reply = await client.execute_command(b"DATA", timeout=cfg.command_timeout)
        self._trace_reply(conn, reply.code, reply.message)
        await self._data(t, reply, body)

    async def _pipelined(self, t: _Transaction, mail: str, paths: dict[str, str], body: Body) -> None:
        """RFC 2920: MAIL, every RCPT and DATA in one write, then their replies in order;
        the body after a 354 when a recipient was accepted."""
        conn, client = t.conn, t.conn.client
        lines = [mail, *(f"RCPT TO:{p}" for p in paths.values())]
        check = conn.unchecked  # a pooled connection: RSET first (aiosmtplib #243), in the same write
        if check:
            self._trace(conn, "C", "RSET")
        for line in lines:
            self._trace(conn, "C", line)
        self._trace(conn, "C", f"DATA (then the message, {t.size} bytes)")
        timeout = self.delivery.command_timeout
        replies, error = await client.pipeline([line.encode(t.encoding) for line in
                                                [*(["RSET"] if check else []), *lines, "DATA"]],
                                               timeout=timeout, first_timeout=min(timeout, 30.0) if check else None)
        for reply in replies:
            self._trace_reply(conn, reply.code, reply.message)
        if check:
            if not replies or replies[0].code != 250:
                if client.is_connected:
                    client.close()  # (a 354 to DATA waits for a body it will never get)
                raise _StaleConnection(f"RSET answered {replies[0].code}" if replies else str(error))
            conn.unchecked = False
            replies = replies[1:]
            self.connections_reused += 1
            t.log.debug("delivery.reuse", peer=conn.peer, remote=conn.remote, transactions=conn.transactions)
        t.stage = pipelined_stage(len(replies), len(paths))  # whose reply did not come, if one did not
        data_reply = replies[-1] if len(replies) == len(lines) + 1 else None
        if replies:
            self._log_reply(t.log, t.fields, "MAIL", replies[0].code, replies[0].message)
            if replies[0].code != 250:
                if data_reply is not None and data_reply.code == 354:  # a server that took DATA anyway
                    client.close()
                raise _SessionFailure(_session_reply(replies[0].code, replies[0].message, conn.remote, client))
        for rcpt, reply in zip(paths, replies[1:1 + len(paths)], strict=False):
            self._rcpt_reply(t, rcpt, reply, connected=True)
        if data_reply is None:  # the connection failed: recipients without an outcome are deferred
            raise error or SMTPServerDisconnected("Connection lost")
        if t.accepted:
            await self._data(t, data_reply, body)
        elif data_reply.code == 354:  # §3.1: DATA accepted with no recipient: end it with an empty message
            self._trace(conn, "C", ".")
            reply = await client.send_body(LONE_DOT, timeout=self.delivery.command_timeout)
            self._trace_reply(conn, reply.code, reply.message)
        else:  # §3.1: DATA refused, as it should be: RSET
            await self._rset(t)

    async def _command(self, t: _Transaction, line: str) -> SMTPResponse:
        self._trace(t.conn, "C", line)
        reply = await t.conn.client.execute_command(line.encode(t.encoding), timeout=self.delivery.command_timeout)
        self._trace_reply(t.conn, reply.code, reply.message)
        return reply

    def _rcpt_reply(self, t: _Transaction, rcpt: str, reply: SMTPResponse, *, connected: bool) -> None:
        self._log_reply(t.log, t.fields, "RCPT", reply.code, reply.message, recipient=rcpt)
        if reply.code in (250, 251):
            t.accepted.append(rcpt)
        elif reply.code == 421 or not connected:
            raise _SessionFailure(Outcome.temporary(
                reply_status(reply.code, reply.message) if reply.code // 100 == 4 else "4.4.2",
                smtp_diagnostic(reply.code, reply.message), t.conn.remote))
        else:
            t.outcomes[rcpt] = reply_outcome(reply.code, reply.message, t.conn.remote)

    async def _rset(self, t: _Transaction) -> None:
        t.stage = "RSET"
        self._trace(t.conn, "C", "RSET")
        reply = await t.conn.client.rset(timeout=self.delivery.command_timeout)
        self._trace_reply(t.conn, reply.code, reply.message)

    async def _data(self, t: _Transaction, reply: SMTPResponse, body: Body) -> None:
        """Given the reply to DATA: the body after a 354, and the outcome of every accepted recipient."""
        t.stage = "DATA"
        client, cfg = t.conn.client, self.delivery
        if reply.code == 354:
            reply = await client.send_body(body, timeout=data_timeout(t.size, cfg.command_timeout,
                                                                      cfg.data_timeout_per_mib))
            self._trace_reply(t.conn, reply.code, reply.message)
            result = self._final_outcome(reply.code, reply.message, t.conn.remote, t.dsn)
        else:
            result = _session_reply(reply.code, reply.message, t.conn.remote, client)
        self._log_reply(t.log, t.fields, "DATA", reply.code, reply.message, recipients=t.accepted)
        for rcpt in t.accepted:
            t.outcomes[rcpt] = result

    def _final_outcome(self, code: int, message: str, remote: str, dsn: bool) -> Outcome:
        """The outcome of a reply to the message (``reply_outcome``; ``dsn_passed`` when
        delivered to a peer that took the DSN request), kept for the next message:
        most peers give every message the same reply, and an Outcome never changes."""
        key = (code, message, remote, dsn)
        result = self._outcomes.get(key)
        if result is None:
            result = reply_outcome(code, message, remote)
            if result.ok and dsn:
                result = Outcome(True, False, result.status, result.diagnostic, result.remote, dsn_passed=True)
            if len(self._outcomes) >= OUTCOMES_KEPT:  # (replies naming a queue id are each new)
                self._outcomes.clear()
            self._outcomes[key] = result
        return result

    def _log_reply(self, log: Any, fields: dict[str, Any], command: str, code: int, message: str,
                   **extra: Any) -> None:
        positive = 200 <= code < 400
        enabled = getattr(log, "is_enabled_for", None)  # structlog's filtering loggers: skip the text when off
        if enabled is not None and not enabled(logging.DEBUG if positive else logging.INFO):
            return
        level = log.debug if positive else log.info
        level("delivery.smtp_reply", command=command, code=code, reply=reply_text(message)[:500], **fields, **extra)


# --------------------------------------------------------------------------- helpers


def _wire(message: bytes, known_clean: bool = False, known_dotless: bool = False) -> tuple[int, Body]:
    """(the SIZE of the message as sent, what follows the 354, in parts; a clean
    message without dot lines is not copied: only the message is checked.)"""
    wire = crlf_message(message, known_clean=known_clean)
    return len(wire), dot_stuffed_parts(wire, known_dotless=known_dotless)


def pipelined_stage(replies: int, rcpts: int) -> str:
    """The command of a pipelined MAIL, RCPT x ``rcpts``, DATA group whose reply is the
    first missing when ``replies`` came (``DATA`` when all came)."""
    if replies == 0:
        return "MAIL FROM"
    return "RCPT TO" if replies <= rcpts else "DATA"


def _all(rcpts: Iterable[str], outcome: Outcome) -> dict[str, Outcome]:
    return {r: outcome for r in rcpts}


def _session_reply(code: int, message: str, remote: str, client: PipeliningSMTP) -> Outcome:
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


async def outbound_password(auth: OutboundAuth, whose: str) -> str | None:
    """The password of outbound credentials, read now: the environment variable, the
    file's first line (off the loop), or the site file's own; None when there is none."""
    if auth.password_env:
        return os.environ.get(auth.password_env) or None
    if auth.password_file:
        try:
            text = await asyncio.to_thread(auth.password_file.read_text, encoding="utf-8")
        except OSError as exc:
            raise _SessionFailure(Outcome.temporary(
                "4.7.0", f"{whose}: the password file {auth.password_file} cannot be read "
                         f"({exc.strerror or type(exc).__name__})")) from None
        return text.splitlines()[0] if text.strip() else None
    return auth.password.reveal() if auth.password is not None else None


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
