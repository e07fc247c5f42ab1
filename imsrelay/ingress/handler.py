"""The site's SMTP handler: aiosmtpd's hooks between the wire and policy / rewrite / queue.

Nothing here decides anything on its own: RCPT asks ``policy.inbound.check_recipient``
with what the directory said; DATA asks ``mail_loops.check_hops`` and ``mail_loops.seen_before``
(through the site), rewrites with ``rewrite.rewrite_message`` and hands the bytes to
the queue's door.  ``250`` is answered only after the door says the message is
durable.  Any unexpected error answers ``451 4.3.0`` so the client retries
(docs/design.md invariant 3).  The Transfer mode is checked here, at connect, MAIL
and DATA; the protocol (``imsrelay.ingress.adapter``) asks.
"""

from __future__ import annotations

import asyncio
import errno
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from aiosmtpd.smtp import SMTP, Session, TLSSetupException
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from imsrelay.ingress.adapter import (
    _SIZE,
    BARE_NEWLINE_REPLY,
    BareNewline,
    ImsEnvelope,
    ImsSession,
    ImsSMTP,
    _peer_ip,
    _read_credentials,
)
from imsrelay.ingress.data_reader import line_ends_clean
from imsrelay.ingress.ports import Ingress
from imsrelay.model.addresses import AddressError, parse_address
from imsrelay.model.dsn_params import MailDsn, RcptDsn
from imsrelay.model.envelope import Envelope, RecipientState, new_queue_id
from imsrelay.model.header_date import header_date_now
from imsrelay.model.priority import priority_of
from imsrelay.model.settings import SiteConfig
from imsrelay.policy.auth import Identity
from imsrelay.policy.inbound import (
    Reply,
    check_recipient,
    check_size,
    check_storage,
)
from imsrelay.policy.mail_loops import check_hops
from imsrelay.policy.restrictions import (
    Client,
    FilterDecision,
    accept_mode,
    connect_decision,
    connect_reply,
    mail_requirement,
    recipient_verdict,
    sender_decision,
    sender_reply,
)
from imsrelay.policy.rewrite import RewriteRules, header_addresses, rewrite_address, rewrite_message
from imsrelay.policy.transfer_mode import REFUSAL, TRANSACTION_REFUSAL, accepts_inbound

_HELO_PRINTABLE = re.compile(r"[\x21-\x7e]*")

HEADER_WORK_ON_LOOP = 128 * 1024  # a message up to this size has its headers examined on the loop

MAX_REWRITE_LOOKUPS = 200  # distinct header addresses looked up per message (hostile headers)
_NO_RCPT_DSN = RcptDsn()  # (an immutable value: one for every recipient that gave no DSN parameters)

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
        extra = ["250-ENHANCEDSTATUSCODES", "250-PIPELINING", "250-DSN"]
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
    def transfer_refusal(self, peer_ip: str | None, hostname: str) -> str | None:
        """The Transfer mode's refusal at connect (None: inbound mail is accepted)."""
        mode = self.site.transfer_mode
        if accepts_inbound(mode):
            return None
        self.site.metrics.conn_rejected.labels("transfer_mode").inc()
        self.log.info("smtp.refused", peer=peer_ip, reason="transfer mode", mode=mode.value)
        return REFUSAL.format(host=hostname, mode=mode.value)

    def _transaction_refusal(self) -> str | None:
        """The Transfer mode's refusal of a transaction (MAIL, and DATA if it changed since)."""
        mode = self.site.transfer_mode
        return None if accepts_inbound(mode) else TRANSACTION_REFUSAL.format(mode=mode.value)

    async def handle_AUTH(self, server: ImsSMTP, session: Session, envelope: SmtpEnvelope,
                          args: list[str]) -> str | None:
        mechanism = args[0].upper()
        peer = _peer_ip(session) or "unknown"
        guard = self.site.auth_guard
        try:
            creds = await _read_credentials(server, mechanism, args[1] if len(args) > 1 else None)
        except ValueError as exc:
            return f"501 5.5.2 {exc}"
        if creds is None:
            return None  # the client cancelled ("*"); aiosmtpd answered 501
        try:
            account = await self.site.account_of(creds.login)
            refused = guard.refusal(account, peer, time.monotonic())
            if refused is not None:  # not even checked: a guess costs the guesser, not us
                self.log.warning("auth.refused", peer=peer, mechanism=mechanism, login=creds.login[:100],
                                 reason=f"too many failed attempts ({refused.reason})",
                                 retry_after=int(refused.retry_after) + 1)
                if not refused.close:
                    return refused.reply
                await server.push(refused.reply)
                if server.transport is not None:
                    server.transport.close()
                return None
            identity: Identity | None = None
            if not creds.authzid or creds.authzid.lower() == creds.login.lower():
                identity = await self.site.authenticate(creds.login, creds.password)
        except Exception as exc:
            self.log.error("auth.internal_error", peer=peer, mechanism=mechanism, error=repr(exc), exc_info=exc)
            return "454 4.7.0 Temporary authentication failure; please try again later"
        if identity is None:
            now = time.monotonic()
            failures = guard.failure(account, peer, now)
            server.note_auth_failure()  # while it waits for its 535, a full listener may close it
            self.log.warning("auth.failed", peer=peer, mechanism=mechanism, login=creds.login[:100],
                             failures=failures, locked_out=guard.refusal(account, peer, now) is not None)
            await asyncio.sleep(guard.delay(failures))
            return "535 5.7.8 Authentication credentials invalid"
        guard.success(account, peer, time.monotonic())
        session.authenticated = True
        if isinstance(session, ImsSession):
            session.identity = identity
        self.log.info("auth.succeeded", peer=peer, mechanism=mechanism, user=identity.alias,
                      encrypted=server.encrypted, listener=server.listener)
        return "235 2.7.0 Authentication successful"

    def _client(self, server: ImsSMTP, session: Session) -> Client:
        ims = session if isinstance(session, ImsSession) else None
        identity = ims.identity if ims is not None and session.authenticated else None
        if ims is None:
            return _client_of(session, None, identity, server.encrypted)
        key = (session.peer, ims.local_ip, identity, server.encrypted)  # what the answer is made of
        memo = ims.client_memo  # (the same answer for every command of a session, until AUTH or STARTTLS)
        if memo is None or memo[0] != key:
            memo = ims.client_memo = (key, _client_of(session, ims.local_ip, identity, server.encrypted))
        return memo[1]

    async def handle_MAIL(self, server: ImsSMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, mail_options: list[str]) -> str:
        refusal = self._transaction_refusal()
        if refusal is not None:
            return refusal
        if address and address != "<>":  # aiosmtpd hands the null sender over as "<>"
            try:
                parse_address(address)
            except AddressError as exc:
                return f"553 5.1.7 Bad sender address syntax: {exc}"
        client = self._client(server, session)
        need = mail_requirement(client, accept_mode(client.ip, self.site.accept_rules())) \
            if server.listener == "smtp" else None
        if need:
            self.log.info("sender.rejected", peer=client.ip, sender=address, reply=need)
            return need
        must_match = self.config.restrictions.sender_must_match or (
            server.listener != "smtp" and self.config.submission.sender_must_match)
        as_sender = sender_decision(address, client, must_match=must_match)
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
        held = await self.site.directory_refusal(envelope.mail_from or "", address) if known else None
        if held is not None:
            self.log.info("recipient.deferred", peer=_peer_ip(session), sender=envelope.mail_from,
                          recipient=address, reply=held)
            return held
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
        # Header work on a large message runs off the loop (docs/design.md invariant 7); on a
        # small one it takes microseconds, less than the hop to a thread and back.
        small = len(raw) <= HEADER_WORK_ON_LOOP
        rewriting = rules.active
        raw, refusal, header_addrs, crlf = (self._examine(raw, rewriting) if small
                                            else await asyncio.to_thread(self._examine, raw, rewriting))
        if refusal is not None:
            self.log.warning("message.rejected", peer=_peer_ip(session), sender=envelope.mail_from, reason=refusal)
            return refusal
        refusal = self._transaction_refusal()  # (switched while the message was on its way)
        if refusal is not None:
            return refusal
        queue_id = new_queue_id()
        sender = "" if envelope.mail_from in (None, "", "<>") else envelope.mail_from
        if rewriting:
            lookups = [sender] + header_addrs if sender else header_addrs
            primaries = await self.site.local_primaries(lookups)
            new_sender = rewrite_address(sender, rules, primaries)
            if needs_header_rewrite(header_addrs, rules, primaries):
                raw = (rewrite_message(raw, rules, primaries) if small
                       else await asyncio.to_thread(rewrite_message, raw, rules, primaries))
                crlf = False  # (the rewritten header was not counted: outbound checks the message)
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
        dsn, asked = (envelope.dsn, envelope.rcpt_dsn) if isinstance(envelope, ImsEnvelope) else (MailDsn(), [])
        queued = [RecipientState(address=r, original=r, notify=d.notify, orcpt=d.orcpt)
                  for i, r in enumerate(envelope.rcpt_tos) if r not in filtered
                  for d in [asked[i] if i < len(asked) else _NO_RCPT_DSN]]
        recipients = [r.address for r in queued]
        if not recipients:
            return f"250 2.0.0 Ok: queued as {queue_id}"
        body_8bit = any(o.upper() == "BODY=8BITMIME" for o in envelope.mail_options)
        extra: dict[str, object] = {"auth": client.authenticated} if client.authenticated else {}
        if crlf:
            extra["crlf"] = True  # every line ends with CRLF (our Received: line too): outbound need not look
            if getattr(envelope, "dot_lines", True) is False:
                extra["dotless"] = True  # no line starts with a dot: outbound has nothing to stuff
        env = Envelope(
            queue_id=queue_id, sender=sender,
            recipients=queued,
            received_at=self.clock(), client=peer_ip, helo=session.host_name or "",
            smtputf8=bool(envelope.smtp_utf8), body_8bit=body_8bit, origin="smtp",
            extra={**extra, "priority": priority_of(raw)}, ret=dsn.ret, envid=dsn.envid)
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

    def _examine(self, raw: bytes, rewriting: bool) -> tuple[bytes, str | None, list[str], bool]:
        """(message, refusal or None, header addresses to look up, whether its line ends
        are all CRLF) — in a thread for a large message.  Bare LFs become CRLF
        (``smtp.bare_newline = "normalize"``; with "reject" the DATA reader refused them)."""
        raw, crlf = line_ends_clean(raw, bare_lf_possible=not self.forbid_bare_lf)
        hops = check_hops(raw, self.config.smtp.max_hops)
        if hops:
            return raw, str(hops), [], crlf
        if self.site.seen_before(raw):
            return raw, "554 5.4.6 Routing loop detected: this message already passed through this site", [], crlf
        if not rewriting:
            return raw, None, [], crlf
        distinct = list(dict.fromkeys(a.lower() for a in header_addresses(raw)))[:MAX_REWRITE_LOOKUPS]
        return raw, None, distinct, crlf

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

def _client_of(session: Session, local_ip: str | None, identity: Identity | None, encrypted: bool) -> Client:
    return Client(_peer_ip(session), local_ip, identity.alias if identity else None, encrypted,
                  identity.addresses if identity else ())

def needs_header_rewrite(header_addrs: list[str], rules: RewriteRules, primaries: dict[str, str]) -> bool:
    """Whether ``rewrite_message`` could change the headers whose addresses ``_examine``
    found (lower-cased, at most ``MAX_REWRITE_LOOKUPS``): a mailbox's primary address
    (maybe only a change of case), or the site domain becoming the addressing domain.
    When the list was cut short, or a local mailbox is involved, the answer is yes."""
    if len(header_addrs) >= MAX_REWRITE_LOOKUPS or primaries:
        return True
    return any(rewrite_address(a, rules, primaries) != a for a in header_addrs)

def received_protocol(*, utf8: bool, tls: bool, authenticated: bool) -> str:
    """The ``with`` of a Received: line: RFC 3848 ESMTP/ESMTPS/ESMTPA/ESMTPSA, RFC 6531 UTF8SMTP…"""
    return ("UTF8SMTP" if utf8 else "ESMTP") + ("S" if tls else "") + ("A" if authenticated else "")

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
