"""The one module that knows aiosmtpd's internals: the SMTP protocol of every listener.

``ImsSMTP`` is aiosmtpd's ``SMTP`` with what the IMS adds on the wire: enhanced
status codes on every reply, bounded sessions (idle time, total time, errors),
connection caps, the Connections tab's accept/reject lists and Transfer mode at
connect (asked of the handler), faults on demand, the protocol log, ETRN, DATA
read in chunks (``imsrelay.ingress.data_reader``), path parsing without the
email parser for plain ``<local@domain>``, and the DSN parameters of MAIL and RCPT
(RFC 3461: RET, ENVID, NOTIFY, ORCPT) taken off the command before aiosmtpd sees it
(which would upper-case their values and refuse them), kept in ``ImsEnvelope``.  ``server_factory`` builds a protocol
per connection by copying the first one's settings (aiosmtpd inspects the handler
on every connection otherwise).  What this relies on of aiosmtpd's private state is
checked by tests/test_aiosmtpd_internals.py.  Decisions are the handler's
(``imsrelay.ingress.handler``); this module only speaks SMTP.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import ssl
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any, Protocol, TypeVar, cast

from aiosmtpd.smtp import MISSING, SMTP, Session, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from imsrelay.ingress.data_reader import DataResult, DataScanner
from imsrelay.ingress.ports import Ingress
from imsrelay.model.dsn_params import (
    MAIL_PARAMS,
    RCPT_PARAMS,
    DsnSyntaxError,
    MailDsn,
    RcptDsn,
    mail_dsn,
    rcpt_dsn,
    split_params,
)
from imsrelay.model.settings import SiteConfig
from imsrelay.observe.faults import SessionFaults
from imsrelay.observe.protocol_log import session_id
from imsrelay.policy.auth import MECHANISMS, Credentials, Identity, decode_plain
from imsrelay.policy.connection_limits import ConnectionCounter, Holder, evictable
from imsrelay.policy.restrictions import Client

_D = TypeVar("_D")
_ENHANCED = re.compile(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}\b")

# Replies aiosmtpd writes itself, given the RFC 3463 code they lacked.
_FIXED_REPLIES: list[tuple[str, str]] = [
    ("552 Error: message size exceeds fixed maximum message size", "552 5.3.4 Message size exceeds fixed maximum message size"),
    ("552 Error: Too much mail data", "552 5.3.4 Message size exceeds fixed maximum message size"),
    ("500 Line too long", "500 5.5.2 Line too long (see RFC 5321 4.5.3.1.6)"),
    ("250 OK", "250 2.0.0 OK"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
    ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
    ("503 Error: nested MAIL command", "503 5.5.1 Error: nested MAIL command"),
    ("503 Error: send HELO first", "503 5.5.1 Error: send HELO first"),
    ("530 Must issue a STARTTLS command first", "530 5.7.0 Must issue a STARTTLS command first"),
]
_DEFAULT_STATUS = {2: "2.0.0", 4: "4.0.0", 5: "5.5.2"}
_BY_CODE = {500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 530: "5.7.0",
            553: "5.1.3", 554: "5.7.0", 555: "5.5.4", 421: "4.3.2", 451: "4.3.0", 452: "4.3.1"}

_UNPRINTABLE = re.compile("[\udc80-\udcff\x00-\x1f\x7f]")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"

_SIMPLE_PATH = re.compile(rf"[ \t]*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")

_SIZE_VALUE = re.compile(r"SIZE=(\S*)", re.IGNORECASE)
_SIZE = re.compile(r"[0-9]{1,18}")
DATA_ON_LOOP = 1024 * 1024  # a message up to this size is un-stuffed on the event loop (cheaper than a thread)

BARE_NEWLINE_REPLY = "521 5.5.2 Error: bare <LF> received; lines must end with <CR><LF>"

class BareNewline(Exception):
    """A line ended in a bare LF and ``smtp.bare_newline = "reject"``."""


class LineReader(asyncio.StreamReader):
    """asyncio's StreamReader that can refuse lines ending in a bare LF (Postfix's
    ``smtpd_forbid_bare_newline``): commands end at LF, DATA lines at CRLF, so a
    bare LF is a command line without CR, or an LF inside a DATA line."""

    forbid_bare_lf = False
    on_line: Callable[[bytes], None] | None = None  # each command line, for the SMTP protocol log
    on_end: Callable[[], None] | None = None  # the stream ended (EOF or an error): DATA read by data_received stops

    def feed_eof(self) -> None:
        super().feed_eof()
        if self.on_end is not None:
            self.on_end()

    def set_exception(self, exc: Exception) -> None:
        super().set_exception(exc)
        if self.on_end is not None:
            self.on_end()

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        line = await super().readuntil(separator)
        if self.on_line is not None and separator == b"\n":  # commands (DATA content is read by CRLF)
            self.on_line(line)
        if self.forbid_bare_lf:
            if separator == b"\n" and not line.endswith(b"\r\n"):
                raise BareNewline()
            if separator == b"\r\n" and b"\n" in line[:-2]:
                raise BareNewline()
        return line

    def unread(self, data: bytes) -> None:
        """Put back bytes read past the end of DATA: the next command reads them first."""
        if data:
            self._buffer[:0] = data  # type: ignore[attr-defined]  # asyncio.StreamReader's buffer (pinned by a test)

    def take_buffered(self) -> bytes:
        """Everything read but not yet consumed (the start of a message sent right after
        DATA), the buffer left empty and reading resumed if it was paused."""
        buffer: bytearray = self._buffer  # type: ignore[attr-defined]  # (pinned by a test)
        if not buffer:
            return b""
        data = bytes(buffer)
        buffer.clear()
        self._maybe_resume_transport()  # type: ignore[attr-defined]  # (pinned by a test)
        return data


def bad_size(arg: str) -> bool:
    """A SIZE= value aiosmtpd would take for digits (``str.isdigit``) that is not 1-18
    ASCII digits: ``int()`` would fail on it (``²``), or it is absurd."""
    return any(v.isdigit() and not _SIZE.fullmatch(v) for v in _SIZE_VALUE.findall(arg))


def printable_reply(reply: str) -> str:
    """A reply line that can always be encoded: bytes the client sent that were not
    UTF-8 (kept as surrogates by aiosmtpd) and control characters become ``?``."""
    if reply.isascii() and reply.isprintable():  # the usual case, without the regex
        return reply
    return _UNPRINTABLE.sub("?", reply)


def with_enhanced_status(reply: str) -> str:
    """Add an RFC 3463 code to a one-line reply that lacks one (not to 220/354/EHLO)."""
    if reply[:4] in ("220 ", "354 ", "214 ") or _ENHANCED.match(reply):  # left as they are (no fixed reply below
        return reply                                                     # is one of them)
    for old, new in _FIXED_REPLIES:
        if reply.startswith(old):
            return new
    if len(reply) < 4 or reply[3] != " " or not reply[:3].isdigit():
        return reply
    code = int(reply[:3])
    status = _BY_CODE.get(code) or _DEFAULT_STATUS.get(code // 100)
    return f"{reply[:3]} {status} {reply[4:]}" if status else reply


class SessionHandler(Protocol):
    """What the protocol asks of its handler besides aiosmtpd's ``handle_*`` hooks
    (``imsrelay.ingress.handler.SiteHandler``)."""

    config: SiteConfig
    site: Ingress
    log: Any

    def connect_refusal(self, peer_ip: str | None, listener: str) -> str | None:
        """The accept/reject lists' refusal at connect (None: welcome)."""
        ...

    def transfer_refusal(self, peer_ip: str | None, hostname: str) -> str | None:
        """The Transfer mode's refusal at connect (None: inbound mail is accepted)."""
        ...


WAITING_PER_SLOT = 4  # newcomers that may wait for a slot of a full listener, per slot
CLOSE_GRACE = 5.0  # seconds a closing session's unsent replies may take before the socket is aborted


class Slots:
    """One listener's inbound connection caps (``ConnectionCounter``) and the
    sessions holding its slots.  A full listener closes a session that has failed
    commands or has been idle ``busy_idle`` seconds to admit a newcomer
    (``imsrelay.policy.connection_limits.evictable``)."""

    def __init__(self, counter: ConnectionCounter, *, busy_idle: float, max_wait: float) -> None:
        self.counter = counter
        self.busy_idle = busy_idle
        self.max_wait = max_wait
        self.evicted = 0
        self.waited = 0
        self._holders: dict[ImsSMTP, str | None] = {}
        self._waiting: dict[ImsSMTP, asyncio.TimerHandle] = {}  # FIFO: newcomers waiting for a slot

    def __len__(self) -> int:
        return len(self._holders)

    def admit(self, ip: str | None, session: ImsSMTP) -> str | None:
        """Take a slot for ``session`` (None) or the ``421`` refusal."""
        if self.counter.only_total_is_full(ip):
            now = session.loop.time()
            victim = evictable(((s, s.holder(now)) for s in self._holders), busy_idle=self.busy_idle)
            if victim is not None:
                self.evicted += 1
                victim.evict()
        refused = self.counter.admit(ip)
        if refused is None:
            self._holders[session] = ip
        return refused

    def wait(self, session: ImsSMTP, ip: str | None, refusal: str) -> bool:
        """A newcomer refused only by the total cap waits (before its greeting, at most
        ``max_wait`` seconds: smtp.handshake_timeout; first come first served) for a slot instead of taking
        ``421`` at once: slots that turn over fast serve everyone in turn, however many
        connections an attacker opens.  False: no room to wait (WAITING_PER_SLOT times
        as many waiting as there are slots), or the client already holds a slot or waits
        for one: only a client with nothing yet may wait (a flood from one address gets
        ``421`` at once, and holds no descriptors waiting)."""
        if not self.counter.only_total_is_full(ip) or len(self._waiting) >= WAITING_PER_SLOT * self.counter.caps.total:
            return False
        if ip is not None and (self.counter.by_ip.get(ip) or any(w.client_ip == ip for w in self._waiting)):
            return False
        self.waited += 1
        self._waiting[session] = session.loop.call_later(self.max_wait, self._expired, session, refusal)
        return True

    def make_room(self, session: ImsSMTP) -> None:
        """``session`` has just failed (a wrong password): if newcomers are waiting,
        it makes room for the first of them now."""
        if self._waiting and session in self._holders:
            self.evicted += 1
            session.evict()

    def _expired(self, session: ImsSMTP, refusal: str) -> None:
        if self._waiting.pop(session, None) is not None:
            session.refuse(refusal)

    def forget(self, session: ImsSMTP) -> None:
        """A waiting newcomer hung up."""
        handle = self._waiting.pop(session, None)
        if handle is not None:
            handle.cancel()

    def release(self, session: ImsSMTP) -> None:
        """Give ``session``'s slot back (once; a session that holds none is ignored);
        the first newcomer waiting takes it."""
        if session not in self._holders:
            return
        self.counter.release(self._holders.pop(session))
        while self._waiting:
            waiter = next(iter(self._waiting))
            ip = waiter.client_ip
            if self.counter.admit(ip) is not None:
                break
            self._waiting.pop(waiter).cancel()
            self._holders[waiter] = ip
            waiter.loop.call_soon(waiter.admitted)
            break


class ImsSession(Session):
    """aiosmtpd's session plus the site address the client connected to and the
    authenticated identity."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.local_ip: str | None = None
        self.identity: Identity | None = None  # the mailbox account AUTH proved
        self.client_memo: tuple[object, Client] | None = None  # (SiteHandler._client: its inputs, its answer)

class ImsEnvelope(SmtpEnvelope):
    """aiosmtpd's envelope plus the DSN parameters (RFC 3461) of its MAIL FROM and of
    each accepted RCPT TO (``rcpt_dsn[i]`` belongs to ``rcpt_tos[i]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.dsn = MailDsn()
        self.rcpt_dsn: list[RcptDsn] = []


def without_dsn_params(arg: str, keyword: str, names: tuple[str, ...], local_part_limit: int = 0
                       ) -> tuple[str, dict[str, str]] | None:
    """(``arg`` of MAIL/RCPT without the DSN parameters ``names``, those parameters
    with their values as given: case kept, aiosmtpd upper-cases the rest), or None when
    ``arg`` has none of them or cannot be parsed (aiosmtpd answers it as before).
    DsnSyntaxError for a parameter given twice or without a value."""
    upper = arg.upper()
    if not upper.startswith(keyword) or not any(name in upper for name in names):
        return None  # (the usual MAIL/RCPT: no second look at its path)
    stripped = arg[len(keyword):].strip()
    address, rest = parse_path(stripped, local_part_limit)
    if not address or not rest:
        return None
    kept, found = split_params(rest, names)
    if not found:
        return None
    path = stripped[:len(stripped) - len(rest)].rstrip()
    return " ".join([keyword + path, *kept]), found


class ImsSMTP(SMTP):
    """aiosmtpd's protocol with enhanced status codes everywhere and bounded sessions:
    idle time (aiosmtpd's ``timeout``), total session time, and errors per session."""

    def __init__(self, handler: Any, *, session_timeout: float, max_errors: int, listener: str = "smtp",
                 implicit_tls: bool = False, limits: Slots | None = None, forbid_bare_lf: bool = False,
                 handshake_timeout: float | None = None,
                 site: Ingress | None = None, config: SiteConfig | None = None, log: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._session_timeout = session_timeout
        self._max_errors = max_errors
        self._errors = 0
        self._session_timer: asyncio.TimerHandle | None = None
        self._idle_deadline = 0.0  # loop time the idle timer (aiosmtpd's _timeout_handle) is for
        self._in_ehlo = False
        self._site = site  # the Transfer mode, faults, metrics, protocol log, ETRN (None: plain aiosmtpd use)
        self._config = config
        self._log = log
        self._plog: Any = None
        self._started = False  # per-connection state is set in connection_made (protocols are copied)

        self._ehlo_lines: list[bytes] = []
        self._limits = limits
        self._handshake_timeout = handshake_timeout  # until HELO/EHLO (None: the idle timeout)
        self._last_command = 0.0  # loop time of the last command (eviction of idle sessions)
        self._auth_failures = 0
        self._connected_at = 0.0
        self._waiting_transport: asyncio.BaseTransport | None = None  # waiting for a slot (Slots.wait)
        self._abort_handle: asyncio.TimerHandle | None = None
        self._forbid_bare_lf = forbid_bare_lf
        self._admitted = False
        self._refused = False
        self._client_ip: str | None = None
        self.listener = listener  # "smtp" | "submission" (587, STARTTLS) | "smtps" (465, implicit TLS)
        self._implicit_tls = implicit_tls
        self._refusal: str | None = None
        self._reading_secret = False  # an AUTH continuation line is due: never logged
        self._data_sink: Callable[[bytes], None] | None = None  # inside DATA: where data_received goes
        self.use_reader(LineReader(loop=self.loop, limit=self.line_length_limit))

    def use_reader(self, reader: LineReader) -> None:
        """(Re)initialise the stream plumbing with our own reader (per connection)."""
        reader.forbid_bare_lf = self._forbid_bare_lf
        asyncio.StreamReaderProtocol.__init__(self, reader, client_connected_cb=self._cb_client_connected,
                                              loop=self.loop)

    def _create_session(self) -> Session:
        return ImsSession(self.loop)

    def _create_envelope(self) -> SmtpEnvelope:
        return ImsEnvelope()

    def _dsn_split(self, arg: str | None, keyword: str, names: tuple[str, ...],
                   build: Callable[[dict[str, str]], _D]) -> tuple[str, _D] | str | None:
        """The DSN parameters of an ESMTP MAIL/RCPT in a transaction aiosmtpd would go
        on with: (the rest of ``arg``, ``build(the parameters)``), a ``501 5.5.4`` reply,
        or None (none here: aiosmtpd answers ``arg`` itself, refusals included)."""
        session = self.session
        if not arg or session is None or not session.extended_smtp or not session.host_name:
            return None
        if self._auth_required and not session.authenticated:
            return None  # (aiosmtpd answers 530 first)
        try:
            split = without_dsn_params(arg, keyword, names, self.local_part_limit)
            return None if split is None else (split[0], build(split[1]))
        except DsnSyntaxError as exc:
            return f"501 5.5.4 Syntax error in the DSN parameters (RFC 3461): {exc}"

    @property
    def encrypted(self) -> bool:
        """TLS is on: STARTTLS done, or the implicit-TLS port."""
        return self._implicit_tls or self._tls_protocol is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self._original_transport is not None
        if not self._admitted:  # the first call (a STARTTLS upgrade calls again)
            peer = transport.get_extra_info("peername")
            self._client_ip = str(peer[0]) if isinstance(peer, tuple) and peer else None
            self._last_command = self._connected_at = self.loop.time()
            refused = self._limits.admit(self._client_ip, self) if self._limits is not None else None
            if refused is not None:
                self._waiting_transport = transport
                if self._limits is not None and self._limits.wait(self, self._client_ip, refused):
                    return  # reading goes on: a client that hangs up (or talks first) leaves the line
                self.refuse(refused)
                return
            self._admitted = True
        first = not self._started
        super().connection_made(transport)
        sock = transport.get_extra_info("sockname")
        session = self.session
        assert isinstance(session, ImsSession)
        session.local_ip = str(sock[0]) if isinstance(sock, tuple) and sock else None
        if starttls:
            return
        self._refusal = self.event_handler.connect_refusal(_peer_ip(session), self.listener)
        if self._session_timer is None:
            self._session_timer = self.loop.call_later(self._session_timeout, self._session_expired)
        if first:
            self._start_session(transport)

    @property
    def client_ip(self) -> str | None:
        return self._client_ip

    def refuse(self, refusal: str) -> None:
        """``421`` at connect: no slot (now, or after waiting for one)."""
        transport = self._waiting_transport
        self._waiting_transport = None
        if self._site is not None:
            self._site.metrics.conn_rejected.labels("connection_cap").inc()
        self._refused = True
        if transport is not None and not transport.is_closing():  # (uvloop's transports are no asyncio.Transport)
            cast(asyncio.WriteTransport, transport).write(refusal.encode("ascii") + b"\r\n")
            transport.close()

    def admitted(self) -> None:
        """A slot came free for this waiting newcomer: the session starts (greeting)."""
        transport = self._waiting_transport
        self._waiting_transport = None
        if transport is None or transport.is_closing():
            self._release_slot()
            return
        self._admitted = True
        self._last_command = self._connected_at = self.loop.time()  # its time starts now
        self.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        sink = self._data_sink
        if sink is not None:  # inside DATA: straight to the scanner, not through the reader's buffer
            sink(data)
            return
        if self._waiting_transport is not None:  # talked before its greeting (RFC 5321 3.1): no wait for it
            if self._limits is not None:
                self._limits.forget(self)
            self.refuse("554 5.5.1 Error: SMTP protocol violation (data before the greeting)")
            return
        super().data_received(data)

    def _start_session(self, transport: asyncio.BaseTransport) -> None:
        """Per-session state of the IMS controls (Transfer mode, faults, counters, protocol log)."""
        self._started = True
        self._greeted = False
        self._in_data = False
        self._close_after_data = False
        site = self._site
        if site is None:
            return
        peer = transport.get_extra_info("peername")
        self._fault_session: SessionFaults | None = None  # made when a fault is first looked at
        self._plog = site.protocol_log
        self._plog_id = session_id() if self._plog is not None else ""
        self._plog_peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "-"
        self._plog_queue: str | None = None
        site.metrics.conn_in.inc()
        site.metrics.conn_in_now.inc()
        if self._plog is not None and isinstance(self._reader, LineReader):
            self._reader.on_line = self._command_line

    async def _handle_client(self) -> None:
        """A client the accept/reject lists refuse gets ``554 5.7.1`` instead of the
        greeting; then only QUIT is answered (RFC 5321 3.1), for a few commands."""
        if self._refusal is None:
            await super()._handle_client()
            return
        try:
            await SMTP.push(self, self._refusal)
            for _ in range(self._max_errors):
                line = await self._reader.readline()
                if not line:
                    break
                if line.strip().upper() == b"QUIT":
                    await SMTP.push(self, "221 2.0.0 Bye")
                    break
                await SMTP.push(self, "503 5.5.1 No SMTP service here: only QUIT is accepted")
        except (ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            if self.transport is not None:
                self.transport.close()

    # -- slots: given back the moment the session is over for us, not when the socket is
    def _release_slot(self) -> None:
        if self._limits is not None:
            self._limits.release(self)  # once: Slots knows whether this session holds one

    def _abort_later(self) -> None:
        """A closing session's socket goes within CLOSE_GRACE seconds even if the client
        reads nothing (a full send buffer) or never answers TLS's close_notify."""
        transport = self._original_transport or self.transport
        if self._abort_handle is None and transport is not None and hasattr(transport, "abort"):
            self._abort_handle = self.loop.call_later(CLOSE_GRACE, transport.abort)

    def _close_session(self, reply: bytes | None = None) -> None:
        """Close the session for good (time-outs, eviction): slot back at once."""
        self._release_slot()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if reply:
                cast(asyncio.WriteTransport, transport).write(reply)
            transport.close()
        self._abort_later()

    def holder(self, now: float) -> Holder:
        """What the eviction choice needs to know of this session."""
        envelope, session = self.envelope, self.session
        working = bool(session is not None and session.authenticated
                       or envelope is not None and envelope.mail_from is not None)
        return Holder(idle=now - self._last_command, errors=self._errors + self._auth_failures,
                      in_data=self.in_transaction_data, age=now - self._connected_at, working=working)

    def note_auth_failure(self) -> None:  # (not auth_*: aiosmtpd takes those for SASL mechanisms)
        """A failed AUTH (told before its delayed ``535``): evictable from now on."""
        self._auth_failures += 1
        if self._limits is not None:
            self._limits.make_room(self)

    def evict(self) -> None:
        """A full listener needs this slot (idle or failing session)."""
        if self._log is not None:
            self._log.info("smtp.evicted", peer=self._client_ip, listener=self.listener, errors=self._errors,
                           idle=round(self.loop.time() - self._last_command, 1))
        self._log_line("S", "421 4.7.0 Too many connections: closing an idle session")
        self._close_session(b"421 4.7.0 Too many connections: closing an idle session\r\n")

    def connection_lost(self, error: Exception | None) -> None:
        if self._waiting_transport is not None:  # hung up while waiting for a slot
            self._waiting_transport = None
            if self._limits is not None:
                self._limits.forget(self)
                self._limits.release(self)  # (admitted in this very loop turn)
            return
        if self._refused:
            return  # never started a session
        self._release_slot()
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        if self._session_timer is not None:
            self._session_timer.cancel()
        if self._site is not None and self._started:
            self._site.metrics.conn_in_now.dec()
            self._started = False
        super().connection_lost(error)
        closed = getattr(self, "_closed", None)  # asyncio keeps the error for a waiter nobody has
        if closed is not None and closed.done() and not closed.cancelled():
            closed.exception()  # retrieved: no "Future exception was never retrieved" at GC

    def eof_received(self) -> bool | None:
        if self._waiting_transport is not None:
            if self._limits is not None:
                self._limits.forget(self)  # hung up while waiting: out of the line
            self._waiting_transport = None
            self._refused = True
            return False
        if self._refused:
            return False
        self._release_slot()  # the client has gone: its slot is free now, whatever we still write
        self._abort_later()
        return super().eof_received()

    # -- the protocol log: client lines as read, our replies as sent
    def _command_line(self, line: bytes) -> None:
        """A command line as read (the protocol log); never AUTH credentials."""
        if self._reading_secret:  # AUTH LOGIN's user name and password, PLAIN's blob after "334 "
            self._reading_secret = False
            self._log_line("C", "<credentials not logged>")
            return
        text = line.decode("utf-8", "replace")
        if text.lstrip()[:4].upper() == "AUTH":
            text = " ".join(text.split()[:2]) + " <credentials not logged>"
        self._log_line("C", text)

    def _log_line(self, who: str, text: str) -> None:
        if self._plog is not None:
            self._plog.line(direction="in", session=self._plog_id, peer=self._plog_peer, queue_id=self._plog_queue,
                            who=who, text=text)

    # -- faults on demand and the Transfer mode
    async def _refused_at_connect(self) -> str | None:
        """The reply that ends the session at once ("" = hang up without one), or None."""
        site = self._site
        if site is None:
            return None
        refusal = self.event_handler.transfer_refusal(self._client_ip, self.hostname)
        if refusal is not None:
            return str(refusal)
        if not site.faults:
            return None
        for f in site.faults.firing(self._faults(), "connect"):
            if f.kind == "latency":
                await asyncio.sleep(f.delay)
            elif f.kind == "reply":
                site.metrics.conn_rejected.labels("fault").inc()
                return str(f.reply_line())
            elif f.kind == "drop":
                site.metrics.conn_rejected.labels("fault").inc()
                return ""
        return None

    def _faults(self) -> Any:
        if self._fault_session is None:
            assert self._site is not None
            self._fault_session = self._site.faults.session(self._client_ip)
        return self._fault_session

    async def _late_connect_fault(self) -> bool:
        """A ``connect`` fault added while this connection was already open: its reply
        answers this transaction's MAIL and the connection closes (True), as if the
        client had connected now."""
        site = self._site
        if site is None or not site.faults:
            return False
        for f in site.faults.late_connect(self._faults()):
            if f.kind == "latency":
                await asyncio.sleep(f.delay)
                continue
            site.metrics.conn_rejected.labels("fault").inc()
            if f.kind == "reply":
                await self.push(f.reply_line())
                self.close_now()
            else:
                self._log_line("S", "<connection dropped by fault>")
                if isinstance(self.transport, asyncio.Transport):
                    self.transport.abort()
            return True
        return False

    async def _faulted(self, stage: str) -> bool:
        """Apply the faults that fire at ``stage``; True when one answered or hung up."""
        site = self._site
        if site is None or not site.faults:
            return False
        for f in site.faults.firing(self._faults(), stage):
            if f.kind == "latency":
                await asyncio.sleep(f.delay)
            elif f.kind == "reply":
                await self.push(f.reply_line())
                return True
            elif f.kind == "drop":
                if stage == "data" and self.transport is not None and self.envelope is not None \
                        and self.envelope.rcpt_tos:
                    await super().push("354 End data with <CR><LF>.<CR><LF>")
                    try:  # let the message start arriving, then hang up mid-DATA
                        await asyncio.wait_for(self._reader.readuntil(b"\r\n"), 10.0)
                    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                        pass
                self._log_line("S", "<connection dropped by fault>")
                if isinstance(self.transport, asyncio.Transport):
                    self.transport.abort()
                return True
        return False

    async def smtp_HELO(self, hostname: str) -> None:
        if not await self._faulted("helo"):
            await super().smtp_HELO(hostname)
            self._greeted_by_client()

    def _greeted_by_client(self) -> None:
        """HELO/EHLO done: from now on the idle time-out, not the handshake time-out."""
        if self.session is not None and self.session.host_name and self.transport is not None:
            self._reset_timeout()

    async def smtp_DATA(self, arg: str | None) -> None:
        if not await self._faulted("data"):
            self._in_data = True
            try:
                if isinstance(self._reader, LineReader) and "DATA" in self._handle_hooks:
                    await self._data(arg)
                else:  # a handler of the deprecated process_message API: aiosmtpd's own reader
                    await super().smtp_DATA(arg)
            finally:
                self._in_data = False
                if self._close_after_data:
                    self.close_now()

    def close_when_transaction_done(self) -> bool:
        """The site is stopping: close this session now, or — when it is inside DATA
        (the message may already be durable, its ``250`` not yet written) — right after
        its reply is written, so the client hears the outcome of what it handed over
        instead of retrying a message already accepted.  True: closing later."""
        if self.in_transaction_data:
            self._close_after_data = True
            return True
        self.close_now()
        return False

    def close_now(self) -> None:
        if self.transport is not None:
            self.transport.close()  # what was written (the reply) still goes out first

    @property
    def in_transaction_data(self) -> bool:
        return bool(getattr(self, "_in_data", False))

    async def _data(self, arg: str | None) -> None:
        """aiosmtpd's ``smtp_DATA`` (1.4.6) with the content read in chunks
        (``imsrelay.ingress.data_reader``) rather than one await per line: the same checks,
        replies, envelope fields and handler hook."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        scanner = DataScanner(size_limit=self.data_size_limit, line_limit=self.line_length_limit,
                              forbid_bare_lf=self._forbid_bare_lf)
        reader = self._reader
        assert isinstance(reader, LineReader)
        try:
            await self._read_data(scanner, reader)
        except asyncio.CancelledError:  # the connection was lost during DATA
            self._writer.close()
            raise
        if scanner.outcome is DataResult.BARE_LF:
            raise BareNewline()
        if scanner.outcome is not DataResult.OK:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)" if scanner.outcome is DataResult.TOO_LONG
                            else "552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        # a big message is joined and un-stuffed off the loop (docs/design.md invariant 7)
        original_content = (scanner.content() if scanner.held < DATA_ON_LOOP
                            else await asyncio.to_thread(scanner.content))
        content: str | bytes = original_content
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original_content.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original_content.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.push("500 Error: strict ASCII mode")
                    return
        self.envelope.content = content
        self.envelope.original_content = original_content
        self.envelope.dot_lines = scanner.dot_lines  # type: ignore[attr-defined]  # (read by the handler)
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self, scanner: DataScanner, reader: LineReader) -> None:
        """Feed the message to ``scanner`` until its end: first what the reader holds
        already, then each chunk as the transport delivers it (``data_received`` hands
        it over directly: no copy into the reader's buffer and out again, no await per
        chunk).  What follows the final "." (PIPELINING) goes back to the reader for
        the command loop.  The client closing mid-DATA cancels this (aiosmtpd's
        ``eof_received`` / ``connection_lost``): nothing queued, no reply."""
        done: asyncio.Future[None] = self.loop.create_future()

        def take(data: bytes) -> None:
            used = scanner.feed(data)
            if scanner.done:
                self._data_sink = None
                reader.unread(data[used:])  # the commands after the final "."
                if not done.done():
                    done.set_result(None)

        take(reader.take_buffered())
        if scanner.done:
            return
        if reader.at_eof():  # the client closed before the end: as aiosmtpd's cancellation would
            raise asyncio.CancelledError()
        def ended() -> None:  # the end of the stream mid-DATA: as aiosmtpd's cancellation would
            done.cancel()

        self._data_sink = take
        reader.on_end = ended
        try:
            await done
        finally:
            self._data_sink = None
            reader.on_end = None

    @syntax("ETRN node")
    async def smtp_ETRN(self, arg: str | None) -> None:
        """RFC 1985: start delivery of the mail held for ``node`` (``@node``: and its sub-domains)."""
        site, cfg = self._site, self._config
        if site is None or cfg is None or not cfg.etrn.allowed_hosts and not cfg.etrn.requests:
            await self.push("502 5.5.1 ETRN is not enabled at this site")
            return
        if self.session is None or not self.session.host_name:
            await self.push("503 5.5.1 Error: send HELO first")
            return
        if self.envelope is not None and self.envelope.mail_from is not None:
            await self.push("503 5.5.1 ETRN is not allowed during a mail transaction")
            return
        node = (arg or "").strip()
        if not node or not re.fullmatch(r"[@#]?[A-Za-z0-9.-]+", node):
            await self.push("501 5.5.4 Syntax: ETRN node")
            return
        ip = self._client_ip
        allowed = False
        try:
            allowed = ip is not None and any(ipaddress.ip_address(ip) in net for net in cfg.etrn.allowed_hosts)
        except ValueError:
            allowed = False
        if not allowed:
            self._log.info("etrn.refused", peer=ip, node=node)
            await self.push(f"459 4.7.1 Node {node} not allowed: this host may not issue ETRN")
            return
        started = site.release_etrn(node)
        self._log.info("etrn.received", peer=ip, node=node, messages=started)
        if started == 0:
            await self.push(f"251 2.0.0 OK, no messages waiting for node {node}")
        else:
            await self.push(f"253 2.0.0 OK, {started} pending messages for node {node} started")

    def _reset_timeout(self, duration: float | None = None) -> None:
        """The idle timer, once per command: aiosmtpd cancels its timer and makes a new
        one every time; here the armed timer stays when it fires no later than the new
        deadline, and on firing early re-arms for what is left (the same deadline)."""
        now = self.loop.time()
        self._last_command = now
        if duration is None and self._handshake_timeout is not None and self.session is not None \
                and not self.session.host_name:
            duration = min(self._handshake_timeout, self._timeout_duration)  # no HELO/EHLO yet
        deadline = now + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled() and now < handle.when() <= deadline:
            return
        if handle is not None:
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._idle_timer_fired)

    def _idle_timer_fired(self) -> None:
        if self.loop.time() < self._idle_deadline - IDLE_TIMER_SLACK:  # a command came meanwhile
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_timer_fired)
            return
        self._log_line("S", "<idle time-out: connection closed>")
        self._close_session()  # aiosmtpd's _timeout_cb, with the slot back at once

    def _session_expired(self) -> None:
        self._close_session(b"421 4.4.2 Session time limit exceeded, closing connection\r\n")

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser without its per-call ``typing.Protocol`` class
        (about 50 µs per MAIL/RCPT); the same results (``parse_path``)."""
        return parse_path(arg, self.local_part_limit)

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> Any:
        """aiosmtpd's "334" challenge; the line that answers it carries credentials
        (AUTH LOGIN, PLAIN without an initial response): the protocol log gets
        ``<credentials not logged>`` for it, whatever it holds (docs/design.md)."""
        self._reading_secret = True
        try:
            return await super().challenge_auth(challenge, encode_to_b64, False)
        finally:
            self._reading_secret = False

    async def smtp_AUTH(self, arg: str) -> None:
        """SASL mechanism names are case-insensitive (RFC 4954 4)."""
        mechanism, sep, rest = (arg or "").partition(" ")
        await super().smtp_AUTH(mechanism.upper() + sep + rest)

    async def smtp_EHLO(self, hostname: str) -> None:
        """The whole EHLO reply in one write (one TCP segment): clients and scanners
        that read it as one reply never fall out of step."""
        if await self._faulted("helo"):
            return
        self._in_ehlo = True
        self._ehlo_lines = []
        try:
            await super().smtp_EHLO(hostname)
            self._greeted_by_client()
        finally:
            self._in_ehlo = False
            lines, self._ehlo_lines = self._ehlo_lines, []
            if lines and self.transport is not None:
                for line in lines:
                    self._log_line("S", line.decode("utf-8", "replace"))
                self._writer.write(b"".join(lines))
                await self._writer.drain()

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._late_connect_fault() or await self._faulted("mail"):
            return
        if arg and bad_size(arg):  # "SIZE=²" passes isdigit() but not int()
            await self.push("501 5.5.4 Syntax error in the SIZE parameter (digits only)")
            return
        envelope = self.envelope
        assert envelope is not None
        had_sender = envelope.mail_from is not None
        dsn = MailDsn()
        if not had_sender:
            split = self._dsn_split(arg, "FROM:", MAIL_PARAMS, mail_dsn)
            if isinstance(split, str):
                await self.push(split)
                return
            if split is not None:
                arg, dsn = split
        try:
            await super().smtp_MAIL(arg)
        except BaseException:
            if not had_sender:  # a failed MAIL leaves no sender behind
                envelope.mail_from = None
                envelope.mail_options.clear()
            raise
        if not had_sender and envelope.mail_from is not None and isinstance(envelope, ImsEnvelope):
            envelope.dsn = dsn

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._faulted("rcpt"):
            return
        envelope = self.envelope
        assert envelope is not None
        n, m = len(envelope.rcpt_tos), len(envelope.rcpt_options)
        dsn = RcptDsn()
        if envelope.mail_from:
            split = self._dsn_split(arg, "TO:", RCPT_PARAMS, rcpt_dsn)
            if isinstance(split, str):
                await self.push(split)
                return
            if split is not None:
                arg, dsn = split
        try:
            await super().smtp_RCPT(arg)
        except BaseException:
            del envelope.rcpt_tos[n:]  # a failed RCPT adds no recipient
            del envelope.rcpt_options[m:]
            raise
        if isinstance(envelope, ImsEnvelope) and len(envelope.rcpt_tos) > n:
            del envelope.rcpt_dsn[n:]
            envelope.rcpt_dsn.extend([dsn] * (len(envelope.rcpt_tos) - n))

    async def push(self, status: Any) -> None:
        if self._site is not None and not self._greeted:
            self._greeted = True  # the first push is the greeting
            refusal = await self._refused_at_connect()
            if refusal is not None:
                if refusal:
                    refusal = printable_reply(with_enhanced_status(refusal))
                    self._log_line("S", refusal)
                    await super().push(refusal)
                else:
                    self._log_line("S", "<connection dropped by fault>")
                if self.transport is not None:
                    self.transport.close()
                return
        if isinstance(status, str):
            if not self._in_ehlo or status[:1] in ("4", "5"):  # EHLO's 250 lines stay as they are
                status = with_enhanced_status(status)
            status = printable_reply(status)
        if self._in_ehlo:
            self._ehlo_lines.append((status.encode("utf-8") if isinstance(status, str) else status) + b"\r\n")
            return
        await super().push(status)
        if isinstance(status, str) and status.startswith("521") and self.transport is not None:
            self.transport.close()
            return
        text = status.decode("ascii", "replace") if isinstance(status, bytes) else status
        if self._site is not None and self._plog is not None:
            if self._in_data and text[:3] != "354":
                self._log_line("C", "<message content>")
            if text.startswith("250 2.0.0 Ok: queued as "):
                self._plog_queue = text.rsplit(" ", 1)[-1].strip()
            self._log_line("S", text)
        if text[:1] in ("4", "5") and not text.startswith("421"):
            self._errors += 1
            if self._errors >= self._max_errors and self.transport is not None:
                await super().push("421 4.7.0 Too many errors in this session, closing connection")
                self.transport.close()


for _name in ("smtp_HELO", "smtp_EHLO", "smtp_MAIL", "smtp_RCPT", "smtp_DATA"):
    getattr(ImsSMTP, _name).__dict__.update(getattr(SMTP, _name).__dict__)


IDLE_TIMER_SLACK = 0.001  # seconds: an idle timer firing this close to its deadline has expired
STOP_GRACE = 5.0  # seconds a stopping site gives sessions inside DATA to write their reply


async def close_sessions(sessions: list[Any], *, grace: float = STOP_GRACE) -> int:
    """Close every session of a stopping site: idle ones at once, those inside DATA
    right after their reply (at most ``grace`` seconds, then they are closed anyway).
    Returns how many had to be cut off at the deadline."""
    waiting = [p for p in sessions if isinstance(p, ImsSMTP) and p.close_when_transaction_done()]
    for p in sessions:
        if not isinstance(p, ImsSMTP) and getattr(p, "transport", None) is not None:
            p.transport.close()
    deadline = time.monotonic() + grace
    while waiting and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        waiting = [p for p in waiting if p.in_transaction_data and p.transport is not None
                   and not p.transport.is_closing()]
    for p in waiting:
        p.close_now()
    return len(waiting)

def parse_path(arg: str, local_part_limit: int = 0) -> tuple[str | None, str | None]:
    """(address, rest) of a MAIL FROM / RCPT TO argument as aiosmtpd 1.4.6 parses it
    (``email._header_value_parser``): ``("", "")`` for nothing, ``(None, None)`` for a
    syntax error or a local part over ``local_part_limit``.  A plain
    ``<dot-atom@domain>`` is matched by a regular expression instead of the parser's
    token tree (about 100 µs less per command); anything else goes to the parser."""
    if not arg:
        return "", ""
    fast = _SIMPLE_PATH.match(arg)
    if fast is not None:
        rest = arg[fast.end():]
        if not rest or (rest[0] in " \t" and rest.lstrip(" \t")[:1] != "("):  # no comment (CFWS) after it
            addr = fast.group(1)
            if local_part_limit and len(addr.rpartition("@")[0]) > local_part_limit:
                return None, None
            return addr, rest.lstrip(" \t")
    return parse_path_with_email_parser(arg, local_part_limit)


def parse_path_with_email_parser(arg: str, local_part_limit: int = 0) -> tuple[str | None, str | None]:
    """``parse_path`` by the email parser alone (aiosmtpd's own way)."""
    if not arg:
        return "", ""
    address: Any
    try:
        if arg.lstrip().startswith("<"):
            address, rest = get_angle_addr(arg)
        else:
            address, rest = get_addr_spec(arg)
        addr = address.addr_spec
    except (HeaderParseError, IndexError, ValueError, TypeError, AttributeError, UnboundLocalError):
        # the email parser fails on "<", "<@a:" ... and crashes on "a@[ " (UnboundLocalError
        # in Python 3.11's get_dtext): a syntax error, never an internal error
        return None, None
    if local_part_limit and len(addr.rpartition("@")[0]) > local_part_limit:
        return None, None
    return addr, rest

def _peer_ip(session: Session) -> str | None:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None

async def _read_credentials(server: SMTP, mechanism: str, initial: str | None) -> Credentials | None:
    """The login and password a client sends for PLAIN or LOGIN (None: it cancelled)."""
    def b64(text: str) -> bytes:
        if text == "=":  # RFC 4954: an empty initial response
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("Can't decode base64") from None

    if mechanism == "PLAIN":
        blob = b64(initial) if initial is not None else await server.challenge_auth("")
        if blob is MISSING:
            return None
        return decode_plain(blob)
    if mechanism == "LOGIN":
        login = b64(initial) if initial is not None else await server.challenge_auth("Username:")
        if login is MISSING:
            return None
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return None
        try:
            return Credentials(login.decode("utf-8"), password)
        except UnicodeDecodeError:
            raise ValueError("the login is not UTF-8") from None
    raise ValueError(f"unsupported mechanism {mechanism}")

class BoundMethods(Mapping[str, Any]):
    """A protocol's command table (aiosmtpd's ``_smtp_methods``: command → bound
    ``smtp_*`` method) that binds a method only when it is looked up, instead of
    binding all of them for every connection."""

    __slots__ = ("_names", "_proto")

    def __init__(self, proto: Any, names: dict[str, str]) -> None:
        self._proto = proto
        self._names = names  # command → method name, shared by every connection of a listener

    def __getitem__(self, command: str) -> Any:
        return getattr(self._proto, self._names[command])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _no_smtps_auth_warning(record: logging.LogRecord) -> bool:
    return "auth_required == True but auth_require_tls == False" not in record.getMessage()


def server_factory(handler: SessionHandler, tls_context: ssl.SSLContext | None,
                   limits: Slots | None = None, *, listener: str = "smtp") -> Callable[[], ImsSMTP]:
    """A protocol factory for one of the site's listening sockets (``limits``: the
    inbound connection caps its sessions count against; ``listener``: ``smtp``, or
    ``submission`` (587) / ``smtps`` (465)).

    aiosmtpd's ``SMTP.__init__`` inspects the handler and the protocol class on every
    connection (``inspect.getmembers``, ``dir``, ``inspect.signature``: about 150 µs).
    The result is the same for every connection of a site, so the first protocol is
    built normally and later ones copy its settings and rebind its method tables;
    only the per-connection stream state is made afresh."""
    cfg = handler.config.smtp
    auth = handler.config.auth
    template: dict[str, Any] | None = None
    mechanisms = auth.mechanisms if auth.enabled else ()
    # the main port: AUTH after STARTTLS (or before, with auth.allow_plaintext); 587: STARTTLS,
    # then AUTH before MAIL (RFC 6409); 465: TLS from the start, AUTH before MAIL (RFC 8314)
    auth_options = {
        "auth_required": listener != "smtp",
        "auth_require_tls": listener == "submission" or (listener == "smtp" and not auth.allow_plaintext),
        "auth_exclude_mechanism": [m for m in MECHANISMS if m not in mechanisms],
    }

    def full() -> ImsSMTP:
        # 465: AUTH without STARTTLS is fine, TLS is on from the start: neither aiosmtpd's
        # warning nor the log line it also writes (mail.log) reaches the site's console
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
            aiosmtpd_log = logging.getLogger("mail.log")
            aiosmtpd_log.addFilter(_no_smtps_auth_warning)
            try:
                return _protocol()
            finally:
                aiosmtpd_log.removeFilter(_no_smtps_auth_warning)

    def _protocol() -> ImsSMTP:
        return ImsSMTP(handler, session_timeout=cfg.session_timeout, max_errors=cfg.max_errors,
                       listener=listener, implicit_tls=listener == "smtps", **auth_options,
                       limits=limits, forbid_bare_lf=cfg.bare_newline == "reject", site=handler.site,
                       handshake_timeout=cfg.handshake_timeout,
                       config=handler.config, log=handler.log,
                       data_size_limit=cfg.max_message_size, enable_SMTPUTF8=True, decode_data=False,
                       hostname=handler.config.hostname, ident=handler.config.smtp.banner,
                       tls_context=None if listener == "smtps" else tls_context, timeout=cfg.idle_timeout,
                       command_call_limit={"*": 100000, "NOOP": 10000, "RSET": 200, "VRFY": 20, "HELP": 20, "EHLO": 20,
                                           "HELO": 20})

    def copy_of(state: dict[str, Any]) -> ImsSMTP:
        proto = ImsSMTP.__new__(ImsSMTP)
        proto.__dict__.update(state)
        proto._ehlo_lines = []
        proto.use_reader(LineReader(loop=proto.loop, limit=proto.line_length_limit))
        proto._smtp_methods = BoundMethods(proto, command_names)  # type: ignore[assignment]  # read as a mapping
        proto._auth_methods = {k: type(a)(getattr(proto, a.method.__name__) if a.is_builtin else a.method,
                                          a.is_builtin) for k, a in state["_auth_methods"].items()}
        return proto

    command_names: dict[str, str] = {}

    def factory() -> ImsSMTP:
        nonlocal template
        if template is None:
            proto = full()
            template = dict(proto.__dict__)
            command_names.update({k: m.__name__ for k, m in proto._smtp_methods.items()})
            return proto
        return copy_of(template)

    return factory
