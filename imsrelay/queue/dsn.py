"""RFC 3464 delivery status notifications: NDRs and delay notices, IMS style.

`build_report` returns a complete message (CRLF line ends, ready for DATA) with
three parts: a human text in the Exchange 5.5 IMS manner, the machine-readable
message/delivery-status, and the original headers (or the whole original).
`may_send_report` says whether a report may be sent at all (never to `<>`,
never about a report or auto-reply — so reports never loop).

What the sender asked for (RFC 3461, ``imsrelay.model.dsn_params``) decides the rest:
`report_wanted` (NOTIFY: NEVER, SUCCESS, FAILURE, DELAY; without it failure and delay
reports only), `success_action` (``delivered`` here, ``relayed`` to a next hop without
DSN, nothing when the next hop took the request) and `returns_full_message` (RET=FULL
for failure reports); `build_report` gives ENVID back as Original-Envelope-Id.

The original is kept byte for byte. When it holds 8-bit bytes the parts that
carry it, and the report itself, are labelled `Content-Transfer-Encoding: 8bit`
(as Postfix does): the report then needs a peer offering 8BITMIME.
"""

from __future__ import annotations

import email.utils
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from email.generator import BytesGenerator
from email.header import decode_header, make_header
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesHeaderParser
from typing import Any, cast

from imsrelay.model.dsn_params import DELAY, FAILURE, SUCCESS, notify_wants
from imsrelay.model.message import split_message

ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
SUCCESS_ACTIONS = frozenset({"delivered", "relayed", "expanded"})
_NOTIFY_KIND = {"failed": FAILURE, "delayed": DELAY, "delivered": SUCCESS, "relayed": SUCCESS, "expanded": SUCCESS}
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_TYPED = re.compile(r"[A-Za-z][A-Za-z0-9-]*;")  # "smtp; 550 ..." — RFC 3464 diagnostic-type
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")  # all that may break a line
_LINE_END = re.compile(rb"\r\n|\r|\n")

EXPIRED_TEXT = "The maximum time for delivering the message expired"

# status → (the line a user reads, the IMS text after "MSEXCH:IMC:<org>:<site>:<server>")
_IMS_TEXTS: dict[str, tuple[str, str]] = {
    "5.1.1": ("The recipient name is not recognized", "3553 553 5.1.1 unknown or illegal user"),
    "5.1.2": ("The recipient's e-mail domain could not be found", "5.1.2 host unknown"),
    "5.1.10": ("The recipient's e-mail domain does not accept mail", "5.1.10 null MX"),
    "5.2.2": ("The recipient's mailbox is full", "552 5.2.2 mailbox full"),
    "5.3.4": ("The message is too large for the recipient", "552 5.3.4 message too large"),
    "5.4.4": ("No route to the recipient's e-mail domain was found", "5.4.4 unable to route"),
    "5.4.6": ("A routing loop was detected", "554 5.4.6 routing loop detected"),
    "4.4.7": (EXPIRED_TEXT, "4.4.7 delivery time expired"),
    "5.4.7": (EXPIRED_TEXT, "5.4.7 delivery time expired"),
    "5.7.1": ("The message was refused: relaying or sending is not allowed", "550 5.7.1 refused"),
}


_Policy = Any  # email.policy.SMTP / SMTPUTF8 (typeshed's policy generics do not fit MIMEPart)


@dataclass(frozen=True)
class RecipientStatus:
    """What happened to one recipient, as the report tells it."""

    final_recipient: str
    original_recipient: str | None  # ORCPT, "rfc822;addr" or a bare address
    action: str  # "failed" | "delayed" | "delivered" (also "relayed", "expanded")
    status: str  # RFC 3463, e.g. "5.1.1"
    diagnostic: str  # "smtp; 550 5.1.1 User unknown" or human text
    remote_mta: str | None = None
    last_attempt: datetime | None = None
    will_retry_until: datetime | None = None


@dataclass(frozen=True)
class ReportingSite:
    """The IMS that writes the report: names its org, site and server."""

    organisation: str
    site: str
    server: str
    hostname: str

    @property
    def ims_prefix(self) -> str:
        return f"MSEXCH:IMC:{self.organisation}:{self.site}:{self.server}"


def may_send_report(envelope_sender: str, original_headers: Message | bytes) -> bool:
    """False when a report would go nowhere or could loop.

    No report to the null sender; none about a message that is itself automatic
    (Auto-Submitted other than "no", RFC 3834) or a delivery/disposition report.
    """
    if not _bare_sender(envelope_sender):
        return False
    headers = (
        _parse_headers(original_headers)
        if isinstance(original_headers, bytes | bytearray)
        else original_headers
    )
    for value in headers.get_all("Auto-Submitted", []):
        if str(value).split(";", 1)[0].strip().lower() not in ("", "no"):
            return False
    if headers.get_content_type() == "multipart/report":
        report_type = str(headers.get_param("report-type", "")).lower()
        if report_type in ("delivery-status", "disposition-notification"):
            return False
    return True


def report_wanted(notify: str | None, action: str) -> bool:
    """Whether a recipient whose RCPT TO said ``notify`` (RFC 3461 NOTIFY; None: not
    given) gets a report with ``action``: NEVER, none; without NOTIFY, failure and
    delay reports as always, no success report."""
    return notify_wants(notify, _NOTIFY_KIND[action])


def success_action(*, final: bool, passed_on: bool) -> str | None:
    """The report on a delivery that succeeded (RFC 3461 6.2.1, RFC 3464 2.3.3):
    ``delivered`` when it ended here (a mailbox, the directory service); ``relayed``
    when it went to a next hop that does not offer DSN; None when the next hop took
    the DSN request (``passed_on``): reporting is its job from then on."""
    if final:
        return "delivered"
    return None if passed_on else "relayed"


def returns_full_message(ret: str | None, action: str) -> bool:
    """RET=FULL: a failure report carries the whole message; any other report (and
    RET=HDRS, or no RET) only its headers (RFC 3461 4.3)."""
    return ret == "FULL" and action == "failed"


def build_report(
    *,
    original: bytes,
    envelope_sender: str,
    recipients: Sequence[RecipientStatus],
    reporter: ReportingSite,
    queue_id: str,
    arrival_date: datetime,
    now: datetime,
    postmaster: str,
    include_full_message: bool = False,
    max_original_bytes: int = 256 * 1024,
    envid: str | None = None,
) -> bytes:
    """A multipart/report (RFC 6522) DSN about `original`, as bytes with CRLF line ends.

    ``envid``: the sender's ENVID (RFC 3461), given back as Original-Envelope-Id.
    Naive datetimes are taken as UTC. Raises ValueError for the null sender, no
    recipients, or an action/status that RFC 3464 does not allow.
    """
    sender = _bare_sender(envelope_sender)
    postmaster = _one_line(postmaster)
    if not sender:
        raise ValueError("a report is never sent to the null sender <>")
    if not recipients:
        raise ValueError("a report needs at least one recipient")
    for r in recipients:
        if r.action not in ACTIONS:
            raise ValueError(f"bad DSN action {r.action!r} for {r.final_recipient}")
        if not _STATUS.fullmatch(r.status):
            raise ValueError(f"bad DSN status {r.status!r} for {r.final_recipient}")

    original = _LINE_END.sub(b"\r\n", original)
    head, body = split_message(original)
    headers = head[:-2] if body else head  # without the line break that ends the last field
    if original.startswith(b"\r\n"):
        headers = b""
    subject = _original_subject(headers)
    addresses = [sender, postmaster, *(r.final_recipient for r in recipients)]
    policy = email_policy.SMTPUTF8 if not all(a.isascii() for a in addresses) else email_policy.SMTP

    kind = _report_kind(recipients)
    report = EmailMessage(policy=policy)
    report["From"] = f"Postmaster <{postmaster}>"
    report["To"] = f"<{sender}>"
    report["Subject"] = f"{kind}: {subject or '(no subject)'}"
    report["Date"] = email.utils.format_datetime(_utc(now))
    report["Message-ID"] = email.utils.make_msgid(domain=reporter.hostname)
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report; report-type=delivery-status"
    report.preamble = "This is a MIME-formatted delivery status notification."

    report.attach(cast(EmailMessage, _human_part(kind, recipients, reporter, subject, arrival_date, policy)))
    report.attach(cast(EmailMessage, _status_part(recipients, reporter, queue_id, arrival_date, policy, envid)))
    returned = _returned_part(original, headers, include_full_message, max_original_bytes, policy)
    report.attach(cast(EmailMessage, returned))
    if returned["Content-Transfer-Encoding"] == "8bit":
        report["Content-Transfer-Encoding"] = "8bit"

    out = io.BytesIO()
    _VerbatimGenerator(out, policy=policy).flatten(report)
    return out.getvalue()


class _VerbatimGenerator(BytesGenerator):
    """BytesGenerator that writes a message/rfc822 payload kept as surrogate-escaped
    text (an 8-bit original) back as its exact bytes, where the stock one insists
    on ASCII."""

    def _encode(self, s: str) -> bytes:
        return s.encode("ascii", "surrogateescape")


def _bare_sender(envelope_sender: str) -> str:
    """The reverse-path without angle brackets; "" for the null sender <>."""
    return _one_line(envelope_sender).strip("<>").strip()


def _parse_headers(data: bytes | bytearray) -> Message:
    return BytesHeaderParser(policy=email_policy.compat32).parsebytes(bytes(data))


def _original_subject(headers: bytes) -> str:
    """The original Subject as text: RFC 2047 decoded, raw UTF-8 accepted, one line."""
    parsed = _parse_headers(headers + b"\r\n\r\n")
    text = next((str(v) for k, v in parsed.raw_items() if k.lower() == "subject"), "")
    try:  # raw 8-bit bytes arrive as surrogates: read them as UTF-8
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    if "=?" in text:
        try:
            text = str(make_header(decode_header(text)))
        except (ValueError, LookupError, UnicodeError):
            pass  # keep the undecoded text
    return _one_line(text)[:200]


def _report_kind(recipients: Sequence[RecipientStatus]) -> str:
    actions = {r.action for r in recipients}
    if "failed" in actions:
        return "Undeliverable"
    if "delayed" in actions:
        return "Delivery delayed"
    if actions == {"relayed"}:
        return "Relayed"
    return "Delivered"


def _human_part(
    kind: str,
    recipients: Sequence[RecipientStatus],
    reporter: ReportingSite,
    subject: str,
    arrival_date: datetime,
    policy: _Policy,
) -> MIMEPart:
    lines = [
        {
            "Undeliverable": "Your message did not reach some or all of the intended recipients.",
            "Delivery delayed": "Your message has not yet reached some of the intended recipients.",
            "Delivered": "Your message was delivered to the following recipient(s).",
            "Relayed": "Your message was passed on to a server that sends no delivery reports.",
        }[kind],
        "",
        f"      Subject:  {subject}",
        f"      Sent:     {email.utils.format_datetime(_utc(arrival_date))}",
        "",
    ]
    sections = [
        ("failed", "The following recipient(s) could not be reached:"),
        ("delayed", "Delivery to the following recipient(s) has been delayed:"),
        ("delivered", "The message was delivered to the following recipient(s):"),
        ("relayed", "The message was passed on to the following recipient(s):"),
        ("expanded", "The following recipient(s) were expanded into a list:"),
    ]
    for action, heading in sections:
        chosen = [r for r in recipients if r.action == action]
        if not chosen:
            continue
        lines += [heading, ""]
        for r in chosen:
            when = (
                f" on {email.utils.format_datetime(_utc(r.last_attempt))}" if r.last_attempt else ""
            )
            friendly, ims_text = _texts_for(r)
            lines.append(f"      {r.final_recipient}{when}")
            lines.append(f"            {friendly}")
            if action in ("failed", "delayed"):
                lines.append(f"            {reporter.ims_prefix} {ims_text}")
            detail = _diagnostic_text(r.diagnostic)
            if r.remote_mta and detail and detail != friendly and detail not in ims_text:
                lines.append(f"            {_one_line(r.remote_mta)} said: {detail}")
            if r.will_retry_until and action == "delayed":
                until = email.utils.format_datetime(_utc(r.will_retry_until))
                lines.append(f"            The server will keep trying until {until}.")
            lines.append("")
    lines += _explanation({r.action for r in recipients})
    text = "\n".join(lines) + "\n"
    # Plain 7bit when it can be (long address lines would make the stdlib pick quoted-printable).
    plain = text.isascii() and max(map(len, lines)) <= 998
    part = MIMEPart(policy=policy)
    part.set_content(text, subtype="plain", charset="utf-8", cte="7bit" if plain else None)
    return part


def _texts_for(r: RecipientStatus) -> tuple[str, str]:
    """(what the user reads, the IMS diagnostic) for one recipient."""
    detail = _diagnostic_text(r.diagnostic)
    known = _IMS_TEXTS.get(r.status)
    if known is not None and r.action in ("failed", "delayed"):
        return known
    ims_text = detail if r.status in detail else f"{r.status} {detail}".strip()
    if r.action == "delayed":
        return ("The message has not been delivered yet", ims_text)
    if r.action == "failed":
        return (detail or "The message could not be delivered", ims_text)
    return ({"relayed": "Passed on", "expanded": "Expanded"}.get(r.action, "Delivered"), "")


def _explanation(actions: set[str]) -> list[str]:
    paragraphs: list[list[str]] = []
    if "failed" in actions:
        paragraphs.append(
            [
                "The message could not be delivered to the recipient(s) that could not be",
                "reached and will not be retried for them. Check each address for spelling and",
                "send the message again; if it still fails, show this report to your e-mail",
                "administrator.",
            ]
        )
    if "delayed" in actions:
        paragraphs.append(
            [
                "For delayed recipient(s) this is a warning only: you do not need to send the",
                "message again. The server keeps trying, and you will get another report if it",
                "finally gives up.",
            ]
        )
    if actions & {"delivered", "relayed", "expanded"}:
        paragraphs.append(["Delivery confirmations need no action."])
    return [line for paragraph in paragraphs for line in [*paragraph, ""]][:-1]


def _status_part(
    recipients: Sequence[RecipientStatus],
    reporter: ReportingSite,
    queue_id: str,
    arrival_date: datetime,
    policy: _Policy,
    envid: str | None = None,
) -> MIMEPart:
    per_message = Message(policy=policy)
    if envid:
        per_message["Original-Envelope-Id"] = _one_line(envid)
    per_message["Reporting-MTA"] = f"dns; {reporter.hostname}"
    per_message["X-IMS-Queue-ID"] = _one_line(queue_id)
    per_message["Arrival-Date"] = email.utils.format_datetime(_utc(arrival_date))
    blocks = [per_message]
    for r in recipients:
        block = Message(policy=policy)
        if r.original_recipient:
            block["Original-Recipient"] = _typed_address(r.original_recipient)
        block["Final-Recipient"] = _typed_address(r.final_recipient)
        block["Action"] = r.action
        block["Status"] = r.status
        if r.remote_mta:
            block["Remote-MTA"] = f"dns; {_one_line(r.remote_mta)}"
        diagnostic = _one_line(r.diagnostic)
        if diagnostic:
            block["Diagnostic-Code"] = (
                diagnostic if _TYPED.match(diagnostic) else f"X-IMS; {diagnostic}"
            )
        if r.last_attempt:
            block["Last-Attempt-Date"] = email.utils.format_datetime(_utc(r.last_attempt))
        if r.will_retry_until and r.action == "delayed":
            block["Will-Retry-Until"] = email.utils.format_datetime(_utc(r.will_retry_until))
        blocks.append(block)
    part = MIMEPart(policy=policy)
    part["Content-Type"] = "message/delivery-status"
    part.set_payload(cast(list[Message | str], blocks))
    return part


def _returned_part(
    original: bytes,
    headers: bytes,
    include_full_message: bool,
    max_original_bytes: int,
    policy: _Policy,
) -> MIMEPart:
    """The original as message/rfc822, or its headers as text/rfc822-headers, byte for byte."""
    part = MIMEPart(policy=policy)
    if include_full_message and len(original) <= max_original_bytes:
        data = original if original.endswith(b"\r\n") else original + b"\r\n"
        part["Content-Type"] = "message/rfc822"
    else:
        data = _truncate_lines(headers + b"\r\n", max_original_bytes) if headers else b""
        part["Content-Type"] = "text/rfc822-headers"
    if not data.isascii():
        part["Content-Transfer-Encoding"] = "8bit"
    # A str payload is written out verbatim (see _VerbatimGenerator): no refolding, no re-encoding.
    part.set_payload(data.decode("ascii", "surrogateescape"))
    return part


def _truncate_lines(data: bytes, limit: int) -> bytes:
    """At most `limit` bytes of `data`, cut after a whole line."""
    if len(data) <= limit:
        return data
    cut = data.rfind(b"\r\n", 0, limit - 1)
    return data[: cut + 2] if cut >= 0 else b""


def _typed_address(address: str) -> str:
    text = _one_line(address)
    if _TYPED.match(text) and "@" not in text.split(";", 1)[0]:
        return text  # already "rfc822; user@host" (e.g. an ORCPT)
    return f"rfc822; {text}"


def _diagnostic_text(diagnostic: str) -> str:
    text = _one_line(diagnostic)
    if _TYPED.match(text):
        text = text.split(";", 1)[1].strip()
    return text


def _one_line(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
