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
import re
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from email.utils import format_datetime
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from imsrelay.addresses import AddressError, parse_address
from imsrelay.config import SiteConfig
from imsrelay.envelope import Envelope, RecipientState, new_queue_id
from imsrelay.loops import check_hops
from imsrelay.policy import InboundPolicy, Reply, check_recipient, check_size, check_storage
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

    def __init__(self, handler: Any, *, session_timeout: float, max_errors: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._session_timeout = session_timeout
        self._max_errors = max_errors
        self._errors = 0
        self._session_timer: asyncio.TimerHandle | None = None
        self._in_ehlo = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._session_timer = self.loop.call_later(self._session_timeout, self._session_expired)

    def connection_lost(self, error: Exception | None) -> None:
        if self._session_timer is not None:
            self._session_timer.cancel()
        super().connection_lost(error)

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
        except HeaderParseError:
            return None, None
        addr = address.addr_spec
        localpart = addr.rpartition("@")[0]
        if self.local_part_limit and len(localpart) > self.local_part_limit:
            return None, None
        return addr, rest

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    async def push(self, status: Any) -> None:
        if isinstance(status, str) and not self._in_ehlo:
            status = with_enhanced_status(status)
        await super().push(status)
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
            if opt.upper().startswith("SIZE=") and opt[5:].isdigit():
                size = int(opt[5:])
        cfg = self.config.smtp
        too_big = check_size(size, cfg.max_message_size)
        if too_big:
            return str(too_big)
        full = check_storage(self.site.free_space(), declared=size, max_message_size=cfg.max_message_size,
                             minfree=cfg.queue_minfree)
        if full:
            self.log.warning("message.deferred_storage", peer=_peer_ip(session), sender=address, reply=str(full))
            return str(full)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return f"250 2.1.0 <{address}> sender ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
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
        hops = check_hops(raw, cfg.smtp.max_hops)
        if hops:
            self.log.warning("message.rejected", peer=_peer_ip(session), sender=envelope.mail_from, reason=str(hops))
            return str(hops)
        if self.site.seen_before(raw):
            return "554 5.4.6 Routing loop detected: this message already passed through this site"
        queue_id = new_queue_id()
        sender = "" if envelope.mail_from in (None, "", "<>") else envelope.mail_from
        rules: RewriteRules = await self.site.rewrite_rules()
        if rules.active:
            lookups = [sender] + header_addresses(raw) if sender else header_addresses(raw)
            primaries = await self.site.local_primaries(lookups)
            new_sender = rewrite_address(sender, rules, primaries)
            raw = rewrite_message(raw, rules, primaries)
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
        body_8bit = any(o.upper() == "BODY=8BITMIME" for o in envelope.mail_options)
        env = Envelope(
            queue_id=queue_id, sender=sender,
            recipients=[RecipientState(address=r, original=r) for r in envelope.rcpt_tos],
            received_at=self.clock(), client=peer_ip, helo=session.host_name or "",
            smtputf8=bool(envelope.smtp_utf8), body_8bit=body_8bit, origin="smtp")
        await self.site.accept(env, message)
        self.log.info("message.accepted", queue_id=queue_id, peer=peer_ip, sender=sender,
                      recipients=list(envelope.rcpt_tos), size=len(message))
        return f"250 2.0.0 Ok: queued as {queue_id}"

    async def handle_exception(self, error: Exception) -> str:
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


def server_factory(handler: SiteHandler, tls_context: ssl.SSLContext | None) -> Callable[[], ImsSMTP]:
    """A protocol factory for the site's listening socket.

    aiosmtpd's ``SMTP.__init__`` inspects the handler and the protocol class on every
    connection (``inspect.getmembers``, ``dir``, ``inspect.signature``: about 150 µs).
    The result is the same for every connection of a site, so the first protocol is
    built normally and later ones copy its settings and rebind its method tables;
    only the per-connection stream state is made afresh."""
    cfg = handler.config.smtp
    template: dict[str, Any] | None = None

    def full() -> ImsSMTP:
        return ImsSMTP(handler, session_timeout=cfg.session_timeout, max_errors=cfg.max_errors,
                       data_size_limit=cfg.max_message_size, enable_SMTPUTF8=True, decode_data=False,
                       hostname=handler.config.hostname, ident=handler.config.smtp.banner,
                       tls_context=tls_context, timeout=cfg.idle_timeout,
                       command_call_limit={"*": 100000, "NOOP": 50, "RSET": 200, "VRFY": 20, "HELP": 20, "EHLO": 20,
                                           "HELO": 20})

    def copy_of(state: dict[str, Any]) -> ImsSMTP:
        proto = ImsSMTP.__new__(ImsSMTP)
        proto.__dict__.update(state)
        asyncio.StreamReaderProtocol.__init__(
            proto, asyncio.StreamReader(loop=proto.loop, limit=proto.line_length_limit),
            client_connected_cb=proto._cb_client_connected, loop=proto.loop)
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
