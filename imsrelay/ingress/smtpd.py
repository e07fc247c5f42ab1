"""The SMTP ingress: aiosmtpd glue between the wire and policy / rewrite / queue.

Nothing here decides anything on its own: RCPT asks ``policy.check_recipient`` with
what the directory said; DATA asks ``loops.check_hops`` and ``loops.seen_before``
(through the site), rewrites with
``rewrite.rewrite_message`` and hands the bytes to the spool.  ``250`` is answered
only after the spool says the message is durable.  Any unexpected error answers
``451 4.3.0`` so the client retries (DESIGN.md invariant 3).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import ipaddress
import re
import ssl
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from email.utils import format_datetime
from typing import Any, Protocol

from aiosmtpd.smtp import MISSING, SMTP, Session, TLSSetupException, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from imsrelay.ingress.data_reader import DataScanner, Outcome, normalise_bare_lf
from imsrelay.ingress.flow_gate import FlowGate
from imsrelay.model.addresses import AddressError, parse_address
from imsrelay.model.envelope import Envelope, RecipientState, new_queue_id
from imsrelay.model.header_date import header_date_now
from imsrelay.model.objects import Mailbox
from imsrelay.model.priority import priority_of
from imsrelay.model.settings import SiteConfig
from imsrelay.observe.faults import FaultBook, SessionFaults
from imsrelay.observe.metrics import SiteMetrics
from imsrelay.observe.protocol_log import ProtocolLog, session_id
from imsrelay.policy.auth import MECHANISMS, Credentials, FailureLimiter, Identity, decode_plain
from imsrelay.policy.connection_limits import ConnectionCounter
from imsrelay.policy.inbound import (
    InboundPolicy,
    Reply,
    check_recipient,
    check_size,
    check_storage,
)
from imsrelay.policy.loops import check_hops
from imsrelay.policy.restrictions import (
    AcceptRules,
    Client,
    FilterDecision,
    connect_decision,
    connect_reply,
    mail_requirement,
    recipient_verdict,
    sender_decision,
    sender_reply,
)
from imsrelay.policy.rewrite import RewriteRules, header_addresses, rewrite_address, rewrite_message
from imsrelay.policy.transfer_mode import (
    REFUSAL,
    TRANSACTION_REFUSAL,
    TransferMode,
    accepts_inbound,
)

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



class Ingress(Protocol):
    """What the SMTP handler asks its site (``imsrelay.site.Site``): live inputs for
    the decisions, and the queue's door."""

    def free_space(self) -> int: ...

    async def recipient_known(self, address: str) -> bool: ...

    def inbound_policy(self) -> InboundPolicy: ...

    def seen_before(self, raw: bytes) -> bool: ...

    async def rewrite_rules(self) -> RewriteRules: ...

    async def local_primaries(self, addresses: list[str]) -> dict[str, str]: ...

    async def accept(self, env: Envelope, message: bytes) -> None: ...

    # AUTH and the restrictions (imsrelay.policy.auth, imsrelay.policy.restrictions)
    auth_failures: FailureLimiter

    def accept_rules(self) -> AcceptRules: ...

    async def authenticate(self, login: str, password: bytes) -> Identity | None: ...

    async def lookup_mailboxes(self, addresses: list[str]) -> list[Mailbox | None]: ...

    async def keep_filtered(self, queue_id: str, sender: str, filtered: dict[str, FilterDecision],
                            message: bytes, client: Client) -> None: ...
    @property
    def addressing_domain(self) -> str: ...

    flow: FlowGate  # backpressure at MAIL FROM

    # the IMS's connection controls: Transfer mode, faults on demand, counters, protocol log, ETRN
    @property
    def transfer_mode(self) -> TransferMode: ...

    @property
    def faults(self) -> FaultBook: ...

    @property
    def metrics(self) -> SiteMetrics: ...

    @property
    def protocol_log(self) -> ProtocolLog | None: ...

    def release_etrn(self, node: str) -> int: ...

_UNPRINTABLE = re.compile("[\udc80-\udcff\x00-\x1f\x7f]")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# "<local@domain>" with a dot-atom local part and a plain domain: the address aiosmtpd's
# parser (email._header_value_parser.get_angle_addr) finds, without its token tree
_SIMPLE_PATH = re.compile(rf"[ \t]*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")
_HELO_PRINTABLE = re.compile(r"[\x21-\x7e]*")
_SIZE_VALUE = re.compile(r"SIZE=(\S*)", re.IGNORECASE)
_SIZE = re.compile(r"[0-9]{1,18}")
DATA_CHUNK = 256 * 1024  # bytes taken from the stream at a time in DATA (what one recv can bring)
HEADER_WORK_ON_LOOP = 128 * 1024  # a message up to this size has its headers examined on the loop
DATA_ON_LOOP = 1024 * 1024  # a message up to this size is un-stuffed on the event loop (cheaper than a thread)
MAX_REWRITE_LOOKUPS = 200  # distinct header addresses looked up per message (hostile headers)
BARE_NEWLINE_REPLY = "521 5.5.2 Error: bare <LF> received; lines must end with <CR><LF>"


class BareNewline(Exception):
    """A line ended in a bare LF and ``smtp.bare_newline = "reject"``."""


class LineReader(asyncio.StreamReader):
    """asyncio's StreamReader that can refuse lines ending in a bare LF (Postfix's
    ``smtpd_forbid_bare_newline``): commands end at LF, DATA lines at CRLF, so a
    bare LF is a command line without CR, or an LF inside a DATA line."""

    forbid_bare_lf = False
    on_line: Callable[[bytes], None] | None = None  # each command line, for the SMTP protocol log

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


class ImsSession(Session):
    """aiosmtpd's session plus the site address the client connected to and the
    authenticated identity."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.local_ip: str | None = None
        self.identity: Identity | None = None  # the mailbox account AUTH proved


class ImsSMTP(SMTP):
    """aiosmtpd's protocol with enhanced status codes everywhere and bounded sessions:
    idle time (aiosmtpd's ``timeout``), total session time, and errors per session."""

    def __init__(self, handler: Any, *, session_timeout: float, max_errors: int, listener: str = "smtp",
                 implicit_tls: bool = False, limits: ConnectionCounter | None = None, forbid_bare_lf: bool = False,
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
        self._forbid_bare_lf = forbid_bare_lf
        self._admitted = False
        self._refused = False
        self._client_ip: str | None = None
        self.listener = listener  # "smtp" | "submission" (587, STARTTLS) | "smtps" (465, implicit TLS)
        self._implicit_tls = implicit_tls
        self._refusal: str | None = None
        self.use_reader(LineReader(loop=self.loop, limit=self.line_length_limit))

    def use_reader(self, reader: LineReader) -> None:
        """(Re)initialise the stream plumbing with our own reader (per connection)."""
        reader.forbid_bare_lf = self._forbid_bare_lf
        asyncio.StreamReaderProtocol.__init__(self, reader, client_connected_cb=self._cb_client_connected,
                                              loop=self.loop)

    def _create_session(self) -> Session:
        return ImsSession(self.loop)

    @property
    def encrypted(self) -> bool:
        """TLS is on: STARTTLS done, or the implicit-TLS port."""
        return self._implicit_tls or self._tls_protocol is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self._original_transport is not None
        if not self._admitted:  # the first call (a STARTTLS upgrade calls again)
            peer = transport.get_extra_info("peername")
            self._client_ip = str(peer[0]) if isinstance(peer, tuple) and peer else None
            refused = self._limits.admit(self._client_ip) if self._limits is not None else None
            if refused is not None:
                if self._site is not None:
                    self._site.metrics.conn_rejected.labels("connection_cap").inc()
                self._refused = True
                transport.write(refused.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
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

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return  # never started a session
        if self._admitted and self._limits is not None:
            self._limits.release(self._client_ip)
            self._admitted = False
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
        if self._refused:
            return False
        return super().eof_received()

    # -- the protocol log: client lines as read, our replies as sent
    def _command_line(self, line: bytes) -> None:
        """A command line as read (the protocol log); never AUTH credentials."""
        text = line.decode("utf-8", "replace")
        if text[:5].upper() == "AUTH ":
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
        if not accepts_inbound(site.transfer_mode):
            site.metrics.conn_rejected.labels("transfer_mode").inc()
            self._log.info("smtp.refused", peer=self._client_ip, reason="transfer mode",
                           mode=site.transfer_mode.value)
            return REFUSAL.format(host=self.hostname, mode=site.transfer_mode.value)
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
            while not scanner.done:
                chunk = await reader.read(DATA_CHUNK)
                if not chunk:  # the client closed mid-DATA (aiosmtpd's eof_received cancels us first, as a rule)
                    raise asyncio.CancelledError()  # as that cancellation would: nothing queued, no reply
                used = scanner.feed(chunk)
                if used < len(chunk):  # the commands after the final "." (PIPELINING)
                    reader.unread(chunk[used:])
        except asyncio.CancelledError:  # the connection was lost during DATA
            self._writer.close()
            raise
        if scanner.outcome is Outcome.BARE_LF:
            raise BareNewline()
        if scanner.outcome is not Outcome.OK:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)" if scanner.outcome is Outcome.TOO_LONG
                            else "552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        # a big message is joined and un-stuffed off the loop (DESIGN.md invariant 7)
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
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

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
        self._timeout_cb()  # type: ignore[no-untyped-call]  # aiosmtpd's: closes the transport

    def _session_expired(self) -> None:
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.write(b"421 4.4.2 Session time limit exceeded, closing connection\r\n")
            self.transport.close()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser without its per-call ``typing.Protocol`` class
        (about 50 µs per MAIL/RCPT); the same results (``parse_path``)."""
        return parse_path(arg, self.local_part_limit)

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
        finally:
            self._in_ehlo = False
            lines, self._ehlo_lines = self._ehlo_lines, []
            if lines and self.transport is not None:
                for line in lines:
                    self._log_line("S", line.decode("utf-8", "replace"))
                self._writer.write(b"".join(lines))
                await self._writer.drain()

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._faulted("mail"):
            return
        if arg and bad_size(arg):  # "SIZE=²" passes isdigit() but not int()
            await self.push("501 5.5.4 Syntax error in the SIZE parameter (digits only)")
            return
        assert self.envelope is not None
        had_sender = self.envelope.mail_from is not None
        try:
            await super().smtp_MAIL(arg)
        except BaseException:
            if not had_sender:  # a failed MAIL leaves no sender behind
                self.envelope.mail_from = None
                self.envelope.mail_options.clear()
            raise

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._faulted("rcpt"):
            return
        assert self.envelope is not None
        n, m = len(self.envelope.rcpt_tos), len(self.envelope.rcpt_options)
        try:
            await super().smtp_RCPT(arg)
        except BaseException:
            del self.envelope.rcpt_tos[n:]  # a failed RCPT adds no recipient
            del self.envelope.rcpt_options[m:]
            raise

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


class SiteHandler:
    """aiosmtpd handler for one site. ``site`` supplies the live inputs (policy,
    rewrite rules, directory lookups) and the queue (``accept``)."""

    def __init__(self, site: Ingress, config: SiteConfig, log: Any, clock: Callable[[], float]) -> None:
        self.site = site
        self.config = config
        self.clock = clock
        self.log = log.bind(component="smtpd")

    # -- EHLO: advertise what we do beyond aiosmtpd's own list
    async def handle_EHLO(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        extra = ["250-ENHANCEDSTATUSCODES", "250-PIPELINING"]
        responses = [r for r in responses if r.rstrip() != "250-AUTH"]  # no mechanism left: no AUTH
        if self.config.etrn.allowed_hosts:
            extra.append("250-ETRN")
        return responses[:-1] + extra + responses[-1:]

    # -- connections: the accept / reject host lists
    def connect_refusal(self, peer_ip: str | None, listener: str) -> str | None:
        decision = connect_decision(peer_ip, self.site.accept_rules())
        if decision.allowed:
            return None
        self.log.warning("connection.refused", peer=peer_ip, listener=listener, reason=decision.rule)
        return connect_reply(decision)

    # -- AUTH (RFC 4954): PLAIN and LOGIN against the directory's accounts
    async def handle_AUTH(self, server: ImsSMTP, session: Session, envelope: SmtpEnvelope,
                          args: list[str]) -> str | None:
        mechanism = args[0].upper()
        peer = _peer_ip(session) or "unknown"
        limiter = self.site.auth_failures
        locked = limiter.locked_for(peer, time.monotonic())
        if locked > 0:
            self.log.warning("auth.refused", peer=peer, mechanism=mechanism, reason="too many failed attempts",
                             retry_after=int(locked) + 1)
            await server.push(f"421 4.7.0 Too many failed authentication attempts from {peer}; "
                              f"try again in {int(locked) + 1} s")
            if server.transport is not None:
                server.transport.close()
            return None
        try:
            creds = await _read_credentials(server, mechanism, args[1] if len(args) > 1 else None)
        except ValueError as exc:
            return f"501 5.5.2 {exc}"
        if creds is None:
            return None  # the client cancelled ("*"); aiosmtpd answered 501
        try:
            identity: Identity | None = None
            if not creds.authzid or creds.authzid.lower() == creds.login.lower():
                identity = await self.site.authenticate(creds.login, creds.password)
        except Exception as exc:
            self.log.error("auth.internal_error", peer=peer, mechanism=mechanism, error=repr(exc), exc_info=exc)
            return "454 4.7.0 Temporary authentication failure; please try again later"
        if identity is None:
            failures = limiter.failure(peer, time.monotonic())
            locked_out = limiter.locked_for(peer, time.monotonic()) > 0
            self.log.warning("auth.failed", peer=peer, mechanism=mechanism, login=creds.login[:100],
                             failures=failures, locked_out=locked_out)
            await asyncio.sleep(limiter.delay(failures))
            return "535 5.7.8 Authentication credentials invalid"
        limiter.success(peer)
        session.authenticated = True
        if isinstance(session, ImsSession):
            session.identity = identity
        self.log.info("auth.succeeded", peer=peer, mechanism=mechanism, user=identity.alias,
                      encrypted=server.encrypted, listener=server.listener)
        return "235 2.7.0 Authentication successful"

    def _client(self, server: ImsSMTP, session: Session) -> Client:
        ims = session if isinstance(session, ImsSession) else None
        identity = ims.identity if ims is not None and session.authenticated else None
        return Client(_peer_ip(session), ims.local_ip if ims is not None else None,
                      identity.alias if identity else None, server.encrypted,
                      identity.addresses if identity else ())

    async def handle_MAIL(self, server: ImsSMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, mail_options: list[str]) -> str:
        if not accepts_inbound(self.site.transfer_mode):
            return TRANSACTION_REFUSAL.format(mode=self.site.transfer_mode.value)
        if address and address != "<>":  # aiosmtpd hands the null sender over as "<>"
            try:
                parse_address(address)
            except AddressError as exc:
                return f"553 5.1.7 Bad sender address syntax: {exc}"
        client = self._client(server, session)
        need = mail_requirement(client, self.site.accept_rules().mode) if server.listener == "smtp" else None
        if need:
            self.log.info("sender.rejected", peer=client.ip, sender=address, reply=need)
            return need
        as_sender = sender_decision(address, client, must_match=self.config.restrictions.sender_must_match)
        if not as_sender.allowed:
            self.log.warning("sender.rejected", peer=client.ip, sender=address, user=client.authenticated,
                             reply=sender_reply(as_sender))
            return sender_reply(as_sender)
        size = None
        for opt in mail_options:
            if opt.upper().startswith("SIZE=") and _SIZE.fullmatch(opt[5:]):
                size = int(opt[5:])
        cfg = self.config.smtp
        too_big = check_size(size, cfg.max_message_size)
        if too_big:
            return str(too_big)
        full = check_storage(self.site.free_space(), declared=size, max_message_size=cfg.max_message_size,
                             minfree=cfg.queue_minfree) or await self.site.flow.admit()  # imsrelay.policy.backpressure
        if full:
            self.log.warning("message.deferred_storage", peer=_peer_ip(session), sender=address, reply=str(full))
            return str(full)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return f"250 2.1.0 <{'' if address == '<>' else address}> sender ok"

    async def handle_RCPT(self, server: ImsSMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address.lower() == "postmaster":  # RFC 5321 4.5.1: accepted without a domain
            address = f"postmaster@{self.site.addressing_domain}"
        try:
            parsed = parse_address(address)
        except AddressError as exc:
            return f"553 5.1.3 {exc}"
        known = await self.site.recipient_known(address)
        client = self._client(server, session)
        reply: Reply = check_recipient(parsed, policy=self.site.inbound_policy(), client_ip=client.ip,
                                       known=known, accepted_so_far=len(envelope.rcpt_tos), client=client)
        if reply.ok:
            sender = envelope.mail_from or "<>"
            mailbox = (await self.site.lookup_mailboxes([address]))[0] if known else None
            rcfg = self.config.restrictions
            verdict = recipient_verdict(sender, address, mailbox.sender_rules if mailbox is not None else None,
                                        site_filter=rcfg.filter_senders, site_action=rcfg.filter_action)
            if verdict.refusal:
                self.log.info("recipient.restricted", peer=client.ip, sender=sender, recipient=address,
                              reason=verdict.rule, reply=verdict.refusal)
                return verdict.refusal
            if verdict.filter.action != "deliver":
                if not hasattr(envelope, "filtered"):
                    envelope.filtered = {}  # type: ignore[attr-defined]
                envelope.filtered[address] = verdict.filter  # type: ignore[attr-defined]
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        else:
            self.log.info("recipient.rejected", peer=_peer_ip(session), sender=envelope.mail_from,
                          recipient=address, reply=str(reply))
        return str(reply)

    async def handle_DATA(self, server: ImsSMTP, session: Session, envelope: SmtpEnvelope) -> str:
        raw: bytes = envelope.original_content or b""
        cfg = self.config
        rules: RewriteRules = await self.site.rewrite_rules()
        # Header work on a large message runs off the loop (DESIGN.md invariant 7); on a
        # small one it takes microseconds, less than the hop to a thread and back.
        small = len(raw) <= HEADER_WORK_ON_LOOP
        raw, refusal, header_addrs = (self._examine(raw, rules.active) if small
                                      else await asyncio.to_thread(self._examine, raw, rules.active))
        if refusal is not None:
            self.log.warning("message.rejected", peer=_peer_ip(session), sender=envelope.mail_from, reason=refusal)
            return refusal
        if not accepts_inbound(self.site.transfer_mode):  # switched while the message was on its way
            return TRANSACTION_REFUSAL.format(mode=self.site.transfer_mode.value)
        queue_id = new_queue_id()
        sender = "" if envelope.mail_from in (None, "", "<>") else envelope.mail_from
        if rules.active:
            lookups = [sender] + header_addrs if sender else header_addrs
            primaries = await self.site.local_primaries(lookups)
            new_sender = rewrite_address(sender, rules, primaries)
            if needs_header_rewrite(header_addrs, rules, primaries):
                raw = (rewrite_message(raw, rules, primaries) if small
                       else await asyncio.to_thread(rewrite_message, raw, rules, primaries))
            if new_sender != sender:
                self.log.info("message.rewritten", queue_id=queue_id, sender=sender, rewritten=new_sender)
                sender = new_sender
        peer_ip = _peer_ip(session) or "unknown"
        client = self._client(server, session)
        first_rcpt = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None
        received = received_header(helo=session.host_name or "unknown", peer_ip=peer_ip, by=cfg.hostname,
                                   queue_id=queue_id, recipient=first_rcpt, date=header_date_now(self.clock()),
                                   protocol=received_protocol(utf8=bool(envelope.smtp_utf8), tls=client.encrypted,
                                                              authenticated=client.authenticated is not None))
        message = received + raw
        if len(message) > cfg.smtp.max_message_size + len(received):
            return "552 5.3.4 Message size exceeds fixed maximum message size"
        full = check_storage(self.site.free_space(), declared=len(message), max_message_size=len(message),
                             minfree=cfg.smtp.queue_minfree)
        if full:  # SIZE= may have understated the message: check what really came
            self.log.warning("message.deferred_storage", peer=peer_ip, sender=sender, reply=str(full))
            return str(full)
        filtered: dict[str, FilterDecision] = getattr(envelope, "filtered", {})
        if filtered:
            await self.site.keep_filtered(queue_id, sender, filtered, message, client)
        recipients = [r for r in envelope.rcpt_tos if r not in filtered]
        if not recipients:
            return f"250 2.0.0 Ok: queued as {queue_id}"
        body_8bit = any(o.upper() == "BODY=8BITMIME" for o in envelope.mail_options)
        extra = {"auth": client.authenticated} if client.authenticated else {}
        env = Envelope(
            queue_id=queue_id, sender=sender,
            recipients=[RecipientState(address=r, original=r) for r in recipients],
            received_at=self.clock(), client=peer_ip, helo=session.host_name or "",
            smtputf8=bool(envelope.smtp_utf8), body_8bit=body_8bit, origin="smtp",
            extra={**extra, "priority": priority_of(raw)})
        try:
            await self.site.accept(env, message)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.log.warning("message.deferred_storage", peer=peer_ip, sender=sender, error=repr(exc),
                             reply="452 4.3.1")
            return "452 4.3.1 Insufficient system storage; please try again later"
        self.log.info("message.accepted", queue_id=queue_id, peer=peer_ip, sender=sender,
                      recipients=recipients, size=len(message), auth=client.authenticated,
                      tls=client.encrypted, listener=server.listener)
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _examine(self, raw: bytes, rewriting: bool) -> tuple[bytes, str | None, list[str]]:
        """(message, refusal or None, header addresses to look up) — in a thread."""
        if not self.forbid_bare_lf:
            raw = normalise_bare_lf(raw)
        hops = check_hops(raw, self.config.smtp.max_hops)
        if hops:
            return raw, str(hops), []
        if self.site.seen_before(raw):
            return raw, "554 5.4.6 Routing loop detected: this message already passed through this site", []
        if not rewriting:
            return raw, None, []
        distinct = list(dict.fromkeys(a.lower() for a in header_addresses(raw)))[:MAX_REWRITE_LOOKUPS]
        return raw, None, distinct

    @property
    def forbid_bare_lf(self) -> bool:
        return self.config.smtp.bare_newline == "reject"

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, BareNewline):
            self.log.info("smtp.bare_newline", reply=BARE_NEWLINE_REPLY)
            return BARE_NEWLINE_REPLY
        if isinstance(error, TLSSetupException):  # the client's handshake failed: not our error
            self.log.info("smtp.tls_failed", error=repr(error.__cause__ or error))
            return "454 4.7.0 TLS negotiation failed"
        if isinstance(error, UnicodeError):  # undecodable client input that slipped through
            self.log.info("smtp.bad_input", error=repr(error))
            return "501 5.5.2 Syntax error: the command is not valid UTF-8"
        self.log.error("smtp.internal_error", error=repr(error), exc_info=error)
        return "451 4.3.0 Internal error; the message was not accepted, please try again later"


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


def needs_header_rewrite(header_addrs: list[str], rules: RewriteRules, primaries: dict[str, str]) -> bool:
    """Whether ``rewrite_message`` could change the headers whose addresses ``_examine``
    found (lower-cased, at most ``MAX_REWRITE_LOOKUPS``): a mailbox's primary address
    (maybe only a change of case), or the site domain becoming the addressing domain.
    When the list was cut short, or a local mailbox is involved, the answer is yes."""
    if len(header_addrs) >= MAX_REWRITE_LOOKUPS or primaries:
        return True
    return any(rewrite_address(a, rules, primaries) != a for a in header_addrs)


def _peer_ip(session: Session) -> str | None:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


def received_protocol(*, utf8: bool, tls: bool, authenticated: bool) -> str:
    """The ``with`` of a Received: line: RFC 3848 ESMTP/ESMTPS/ESMTPA/ESMTPSA, RFC 6531 UTF8SMTP…"""
    return ("UTF8SMTP" if utf8 else "ESMTP") + ("S" if tls else "") + ("A" if authenticated else "")


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


def received_header(*, helo: str, peer_ip: str, by: str, queue_id: str, recipient: str | None,
                    protocol: str = "ESMTP", now: datetime | None = None, date: str | None = None) -> bytes:
    """The Received: line of a message accepted now (or at ``now``; ``date``: that
    moment already formatted as RFC 5322 date-time)."""
    if date is None:
        date = format_datetime(now or datetime.now(UTC))
    for_part = f"\r\n\tfor <{recipient}>" if recipient else ""
    if not _HELO_PRINTABLE.fullmatch(helo):
        helo = re.sub(r"[^\x21-\x7e]", "?", helo)
    return (f"Received: from {helo[:255]} ([{peer_ip}])\r\n\tby {by} (imsrelay) with {protocol} id {queue_id}"
            f"{for_part}; {date}\r\n").encode("utf-8", "surrogateescape")



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


def server_factory(handler: SiteHandler, tls_context: ssl.SSLContext | None,
                   limits: ConnectionCounter | None = None, *, listener: str = "smtp") -> Callable[[], ImsSMTP]:
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
        with warnings.catch_warnings():  # 465: AUTH without STARTTLS is fine, TLS is on from the start
            warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
            return _protocol()

    def _protocol() -> ImsSMTP:
        return ImsSMTP(handler, session_timeout=cfg.session_timeout, max_errors=cfg.max_errors,
                       listener=listener, implicit_tls=listener == "smtps", **auth_options,
                       limits=limits, forbid_bare_lf=cfg.bare_newline == "reject", site=handler.site,
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
