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
import errno
import re
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from email.utils import format_datetime
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, Session, TLSSetupException
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from imsrelay.addresses import AddressError, parse_address
from imsrelay.config import SiteConfig
from imsrelay.connection_limits import ConnectionCounter
from imsrelay.envelope import Envelope, RecipientState, new_queue_id
from imsrelay.loops import check_hops
from imsrelay.policy import (
    InboundPolicy,
    Reply,
    check_queue_depth,
    check_recipient,
    check_size,
    check_storage,
)
from imsrelay.rewrite import RewriteRules, header_addresses, rewrite_address, rewrite_message

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

    @property
    def addressing_domain(self) -> str: ...

    def queued_messages(self) -> int: ...

_UNPRINTABLE = re.compile("[\udc80-\udcff\x00-\x1f\x7f]")
_SIZE_VALUE = re.compile(r"SIZE=(\S*)", re.IGNORECASE)
_SIZE = re.compile(r"[0-9]{1,18}")
_BARE_LF = re.compile(rb"(?<!\r)\n")
MAX_REWRITE_LOOKUPS = 200  # distinct header addresses looked up per message (hostile headers)
BARE_NEWLINE_REPLY = "521 5.5.2 Error: bare <LF> received; lines must end with <CR><LF>"


class BareNewline(Exception):
    """A line ended in a bare LF and ``smtp.bare_newline = "reject"``."""


class LineReader(asyncio.StreamReader):
    """asyncio's StreamReader that can refuse lines ending in a bare LF (Postfix's
    ``smtpd_forbid_bare_newline``): commands end at LF, DATA lines at CRLF, so a
    bare LF is a command line without CR, or an LF inside a DATA line."""

    forbid_bare_lf = False

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        line = await super().readuntil(separator)
        if self.forbid_bare_lf:
            if separator == b"\n" and not line.endswith(b"\r\n"):
                raise BareNewline()
            if separator == b"\r\n" and b"\n" in line[:-2]:
                raise BareNewline()
        return line


def bad_size(arg: str) -> bool:
    """A SIZE= value aiosmtpd would take for digits (``str.isdigit``) that is not 1-18
    ASCII digits: ``int()`` would fail on it (``²``), or it is absurd."""
    return any(v.isdigit() and not _SIZE.fullmatch(v) for v in _SIZE_VALUE.findall(arg))


def printable_reply(reply: str) -> str:
    """A reply line that can always be encoded: bytes the client sent that were not
    UTF-8 (kept as surrogates by aiosmtpd) and control characters become ``?``."""
    return _UNPRINTABLE.sub("?", reply)


def normalise_bare_lf(raw: bytes) -> bytes:
    """Every bare LF in a message becomes CRLF (RFC 5321 §2.3.8)."""
    return _BARE_LF.sub(b"\r\n", raw) if b"\n" in raw else raw


def with_enhanced_status(reply: str) -> str:
    """Add an RFC 3463 code to a one-line reply that lacks one (not to 220/354/EHLO)."""
    for old, new in _FIXED_REPLIES:
        if reply.startswith(old):
            return new
    if len(reply) < 4 or reply[3] != " " or not reply[:3].isdigit() or _ENHANCED.match(reply):
        return reply
    code = int(reply[:3])
    if code in (220, 354, 214):
        return reply
    status = _BY_CODE.get(code) or _DEFAULT_STATUS.get(code // 100)
    return f"{reply[:3]} {status} {reply[4:]}" if status else reply


class ImsSMTP(SMTP):
    """aiosmtpd's protocol with enhanced status codes everywhere and bounded sessions:
    idle time (aiosmtpd's ``timeout``), total session time, and errors per session."""

    def __init__(self, handler: Any, *, session_timeout: float, max_errors: int,
                 limits: ConnectionCounter | None = None, forbid_bare_lf: bool = False, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._session_timeout = session_timeout
        self._max_errors = max_errors
        self._errors = 0
        self._session_timer: asyncio.TimerHandle | None = None
        self._in_ehlo = False
        self._ehlo_lines: list[bytes] = []
        self._limits = limits
        self._forbid_bare_lf = forbid_bare_lf
        self._admitted = False
        self._refused = False
        self._client_ip: str | None = None
        self.use_reader(LineReader(loop=self.loop, limit=self.line_length_limit))

    def use_reader(self, reader: LineReader) -> None:
        """(Re)initialise the stream plumbing with our own reader (per connection)."""
        reader.forbid_bare_lf = self._forbid_bare_lf
        asyncio.StreamReaderProtocol.__init__(self, reader, client_connected_cb=self._cb_client_connected,
                                              loop=self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._admitted:  # the first call (a STARTTLS upgrade calls again)
            peer = transport.get_extra_info("peername")
            self._client_ip = str(peer[0]) if isinstance(peer, tuple) and peer else None
            refused = self._limits.admit(self._client_ip) if self._limits is not None else None
            if refused is not None:
                self._refused = True
                transport.write(refused.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
                return
            self._admitted = True
        super().connection_made(transport)
        if self._session_timer is None:
            self._session_timer = self.loop.call_later(self._session_timeout, self._session_expired)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return  # never started a session
        if self._admitted and self._limits is not None:
            self._limits.release(self._client_ip)
            self._admitted = False
        if self._session_timer is not None:
            self._session_timer.cancel()
        super().connection_lost(error)
        closed = getattr(self, "_closed", None)  # asyncio keeps the error for a waiter nobody has
        if closed is not None and closed.done() and not closed.cancelled():
            closed.exception()  # retrieved: no "Future exception was never retrieved" at GC

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()

    def _session_expired(self) -> None:
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.write(b"421 4.4.2 Session time limit exceeded, closing connection\r\n")
            self.transport.close()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser without its per-call ``typing.Protocol`` class
        (about 50 µs per MAIL/RCPT); the same results."""
        if not arg:
            return "", ""
        address: Any
        try:
            if arg.lstrip().startswith("<"):
                address, rest = get_angle_addr(arg)
            else:
                address, rest = get_addr_spec(arg)
            addr = address.addr_spec
        except (HeaderParseError, IndexError, ValueError, TypeError, AttributeError):
            return None, None  # the email parser fails on "<", "<@a:" ...: a syntax error
        localpart = addr.rpartition("@")[0]
        if self.local_part_limit and len(localpart) > self.local_part_limit:
            return None, None
        return addr, rest

    async def smtp_EHLO(self, hostname: str) -> None:
        """The whole EHLO reply in one write (one TCP segment): clients and scanners
        that read it as one reply never fall out of step."""
        self._in_ehlo = True
        self._ehlo_lines = []
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False
            lines, self._ehlo_lines = self._ehlo_lines, []
            if lines and self.transport is not None:
                self._writer.write(b"".join(lines))
                await self._writer.drain()

    async def smtp_MAIL(self, arg: str | None) -> None:
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
        assert self.envelope is not None
        n, m = len(self.envelope.rcpt_tos), len(self.envelope.rcpt_options)
        try:
            await super().smtp_RCPT(arg)
        except BaseException:
            del self.envelope.rcpt_tos[n:]  # a failed RCPT adds no recipient
            del self.envelope.rcpt_options[m:]
            raise

    async def push(self, status: Any) -> None:
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
        if text[:1] in ("4", "5") and not text.startswith("421"):
            self._errors += 1
            if self._errors >= self._max_errors and self.transport is not None:
                await super().push("421 4.7.0 Too many errors in this session, closing connection")
                self.transport.close()


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
        return responses[:-1] + extra + responses[-1:]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, mail_options: list[str]) -> str:
        if address and address != "<>":  # aiosmtpd hands the null sender over as "<>"
            try:
                parse_address(address)
            except AddressError as exc:
                return f"553 5.1.7 Bad sender address syntax: {exc}"
        size = None
        for opt in mail_options:
            if opt.upper().startswith("SIZE=") and _SIZE.fullmatch(opt[5:]):
                size = int(opt[5:])
        cfg = self.config.smtp
        too_big = check_size(size, cfg.max_message_size)
        if too_big:
            return str(too_big)
        full = check_storage(self.site.free_space(), declared=size, max_message_size=cfg.max_message_size,
                             minfree=cfg.queue_minfree) or check_queue_depth(self.site.queued_messages(),
                                                                             cfg.max_queued_messages)
        if full:
            self.log.warning("message.deferred_storage", peer=_peer_ip(session), sender=address, reply=str(full))
            return str(full)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return f"250 2.1.0 <{'' if address == '<>' else address}> sender ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address.lower() == "postmaster":  # RFC 5321 4.5.1: accepted without a domain
            address = f"postmaster@{self.site.addressing_domain}"
        try:
            parsed = parse_address(address)
        except AddressError as exc:
            return f"553 5.1.3 {exc}"
        known = await self.site.recipient_known(address)
        reply: Reply = check_recipient(parsed, policy=self.site.inbound_policy(), client_ip=_peer_ip(session),
                                       known=known, accepted_so_far=len(envelope.rcpt_tos))
        if reply.ok:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        else:
            self.log.info("recipient.rejected", peer=_peer_ip(session), sender=envelope.mail_from,
                          recipient=address, reply=str(reply))
        return str(reply)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        raw: bytes = envelope.original_content or b""
        cfg = self.config
        rules: RewriteRules = await self.site.rewrite_rules()
        # Header work on a message of any size runs off the loop (DESIGN.md invariant 7).
        raw, refusal, header_addrs = await asyncio.to_thread(self._examine, raw, rules.active)
        if refusal is not None:
            self.log.warning("message.rejected", peer=_peer_ip(session), sender=envelope.mail_from, reason=refusal)
            return refusal
        queue_id = new_queue_id()
        sender = "" if envelope.mail_from in (None, "", "<>") else envelope.mail_from
        if rules.active:
            lookups = [sender] + header_addrs if sender else header_addrs
            primaries = await self.site.local_primaries(lookups)
            new_sender = rewrite_address(sender, rules, primaries)
            raw = await asyncio.to_thread(rewrite_message, raw, rules, primaries)
            if new_sender != sender:
                self.log.info("message.rewritten", queue_id=queue_id, sender=sender, rewritten=new_sender)
                sender = new_sender
        peer_ip = _peer_ip(session) or "unknown"
        first_rcpt = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None
        received = received_header(helo=session.host_name or "unknown", peer_ip=peer_ip, by=cfg.hostname,
                                   queue_id=queue_id, recipient=first_rcpt,
                                   protocol="UTF8SMTP" if envelope.smtp_utf8 else ("ESMTPS" if session.ssl else "ESMTP"))
        message = received + raw
        if len(message) > cfg.smtp.max_message_size + len(received):
            return "552 5.3.4 Message size exceeds fixed maximum message size"
        full = check_storage(self.site.free_space(), declared=len(message), max_message_size=len(message),
                             minfree=cfg.smtp.queue_minfree)
        if full:  # SIZE= may have understated the message: check what really came
            self.log.warning("message.deferred_storage", peer=peer_ip, sender=sender, reply=str(full))
            return str(full)
        body_8bit = any(o.upper() == "BODY=8BITMIME" for o in envelope.mail_options)
        env = Envelope(
            queue_id=queue_id, sender=sender,
            recipients=[RecipientState(address=r, original=r) for r in envelope.rcpt_tos],
            received_at=self.clock(), client=peer_ip, helo=session.host_name or "",
            smtputf8=bool(envelope.smtp_utf8), body_8bit=body_8bit, origin="smtp")
        try:
            await self.site.accept(env, message)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.log.warning("message.deferred_storage", peer=peer_ip, sender=sender, error=repr(exc),
                             reply="452 4.3.1")
            return "452 4.3.1 Insufficient system storage; please try again later"
        self.log.info("message.accepted", queue_id=queue_id, peer=peer_ip, sender=sender,
                      recipients=list(envelope.rcpt_tos), size=len(message))
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


def _peer_ip(session: Session) -> str | None:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


def received_header(*, helo: str, peer_ip: str, by: str, queue_id: str, recipient: str | None,
                    protocol: str = "ESMTP", now: datetime | None = None) -> bytes:
    now = now or datetime.now(UTC)
    for_part = f"\r\n\tfor <{recipient}>" if recipient else ""
    helo = re.sub(r"[^\x21-\x7e]", "?", helo)[:255]
    return (f"Received: from {helo} ([{peer_ip}])\r\n\tby {by} (imsrelay) with {protocol} id {queue_id}"
            f"{for_part}; {format_datetime(now)}\r\n").encode("utf-8", "surrogateescape")


def server_factory(handler: SiteHandler, tls_context: ssl.SSLContext | None,
                   limits: ConnectionCounter | None = None) -> Callable[[], ImsSMTP]:
    """A protocol factory for the site's listening socket (``limits``: the inbound
    connection caps its sessions count against).

    aiosmtpd's ``SMTP.__init__`` inspects the handler and the protocol class on every
    connection (``inspect.getmembers``, ``dir``, ``inspect.signature``: about 150 µs).
    The result is the same for every connection of a site, so the first protocol is
    built normally and later ones copy its settings and rebind its method tables;
    only the per-connection stream state is made afresh."""
    cfg = handler.config.smtp
    template: dict[str, Any] | None = None

    def full() -> ImsSMTP:
        return ImsSMTP(handler, session_timeout=cfg.session_timeout, max_errors=cfg.max_errors,
                       limits=limits, forbid_bare_lf=cfg.bare_newline == "reject",
                       data_size_limit=cfg.max_message_size, enable_SMTPUTF8=True, decode_data=False,
                       hostname=handler.config.hostname, ident=handler.config.smtp.banner,
                       tls_context=tls_context, timeout=cfg.idle_timeout,
                       command_call_limit={"*": 100000, "NOOP": 10000, "RSET": 200, "VRFY": 20, "HELP": 20, "EHLO": 20,
                                           "HELO": 20})

    def copy_of(state: dict[str, Any]) -> ImsSMTP:
        proto = ImsSMTP.__new__(ImsSMTP)
        proto.__dict__.update(state)
        proto._ehlo_lines = []
        proto.use_reader(LineReader(loop=proto.loop, limit=proto.line_length_limit))
        proto._smtp_methods = {k: getattr(proto, m.__name__) for k, m in state["_smtp_methods"].items()}
        proto._auth_methods = {k: type(a)(getattr(proto, a.method.__name__) if a.is_builtin else a.method,
                                          a.is_builtin) for k, a in state["_auth_methods"].items()}
        return proto

    def factory() -> ImsSMTP:
        nonlocal template
        if template is None:
            proto = full()
            template = dict(proto.__dict__)
            return proto
        return copy_of(template)

    return factory
