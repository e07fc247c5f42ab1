"""Message Journaling (pure): which messages get a journal copy, and the copy itself.

Exchange 5.5 SP1's Message Journaling (KB Q239427) sends a copy of every message to
a journal recipient (a mailbox, public folder or custom recipient), at server, site
or organisation level; at site level a message between two sites is journaled at
both.  imsrelay journals at site level: every message accepted at this site gets
one copy, once per message (not per recipient), queued through the queue door in
the same durable commit as the message itself (``imsrelay.queue.door``).

The copy wraps the original (``message/rfc822``, byte for byte) with its envelope,
as Exchange's journal envelope lists the sender and the recipients: in the header
fields ``X-IMS-Journal-Sender:`` and ``X-IMS-Journal-Recipients:``, and in a text
part a person reads.  ``journal_wanted`` decides:

- a journal copy is never journaled again (made here: its origin; from another site
  journaling to the same recipient: it carries ``X-IMS-Journal-Report:`` and goes
  only to the journal recipient);
- directory replication mail (origin ``dirsync``, or sent only to directory service
  addresses) is not journaled: it is the directory's traffic, not users' mail;
- reports this site writes (NDRs, delay notices) are journaled unless
  ``journaling.reports = false``: they are mail the site sends to users.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from imsrelay.model.message import split_message
from imsrelay.model.objects import DIRSYNC_LOCAL

JOURNAL_HEADER = "X-IMS-Journal-Report"
SENDER_HEADER = "X-IMS-Journal-Sender"
RECIPIENTS_HEADER = "X-IMS-Journal-Recipients"
ORIGIN = "journal"  # the envelope origin of a journal copy
NOT_JOURNALED = ("dirsync", ORIGIN)  # origins never journaled
REPORT_ORIGINS = ("ndr",)  # origins journaled only with journaling.reports

_JOURNAL_MARK = re.compile(rb"^" + JOURNAL_HEADER.encode() + rb"[ \t]*:", re.IGNORECASE | re.MULTILINE)
_SUBJECT = re.compile(rb"^subject[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class JournalEnvelope:
    """What the journal copy records of the original's envelope."""

    queue_id: str
    sender: str  # "" = <>
    recipients: tuple[tuple[str, str | None], ...]  # (address, the original recipient as given, if another)
    site: str
    hostname: str
    received: str  # RFC 5322 date-time of acceptance
    client: str = ""
    helo: str = ""
    origin: str = "smtp"


def _local_part(address: str) -> str:
    return address.rpartition("@")[0].lower()


def journal_wanted(*, origin: str, recipients: Sequence[str], message: bytes, journal_address: str,
                   reports: bool = True) -> bool:
    """Does a message entering the queue get a journal copy (see the module's rules)?"""
    if origin in NOT_JOURNALED or not recipients:
        return False
    if origin in REPORT_ORIGINS and not reports:
        return False
    if all(_local_part(r) == DIRSYNC_LOCAL for r in recipients):
        return False
    journal = journal_address.lower()
    if all(r.lower() == journal for r in recipients):
        header, _ = split_message(message)
        if _JOURNAL_MARK.search(header):
            return False  # another site's journal copy for the same journal recipient
    return True


def _unfolded(match: re.Match[bytes] | None) -> str:
    if match is None:
        return ""
    return re.sub(r"\r?\n[ \t]", " ", match.group(1).decode("utf-8", "replace")).strip()


def _folded(name: str, items: Sequence[str]) -> str:
    """``name: a,\\r\\n b`` (one item a line: a header line stays short)."""
    return f"{name}: " + ",\r\n ".join(items) if items else f"{name}: (none)"


def build_journal_copy(original: bytes, envelope: JournalEnvelope, *, journal_address: str, from_address: str,
                       date: str) -> bytes:
    """The journal copy of ``original``: a ``multipart/mixed`` message to the journal
    recipient whose first part lists the envelope and whose second part is the
    original as received (``message/rfc822``)."""
    header, _ = split_message(original)
    subject = _unfolded(_SUBJECT.search(header))
    message_id = _unfolded(_MESSAGE_ID.search(header))
    boundary = "=_journal_" + secrets.token_hex(12)
    while boundary.encode() in original:
        boundary = "=_journal_" + secrets.token_hex(12)
    sender = f"<{envelope.sender}>"
    recipients = [f"<{a}>" for a, _ in envelope.recipients]
    listed = [f"  {a}" + (f" (given as {o})" if o and o.lower() != a.lower() else "") for a, o in envelope.recipients]
    text = "\r\n".join([
        f"Message journaled at site {envelope.site} ({envelope.hostname}), Exchange 5.5 Message Journaling "
        "(KB Q239427).",
        "",
        f"Sender: {sender}",
        f"Message-ID: {message_id or '(none)'}",
        f"Queue-ID: {envelope.queue_id}",
        f"Received: {envelope.received}",
        f"Origin: {envelope.origin}",
        *([f"Client: {envelope.client} (HELO {envelope.helo or '-'})"] if envelope.client else []),
        f"Recipients ({len(envelope.recipients)}):",
        *listed,
        ""])
    eight_bit = not original.isascii()
    lines = [
        f"From: Message Journaling <{from_address}>",
        f"To: <{journal_address}>",
        f"Subject: Journal: {subject}" if subject else "Subject: Journal",
        f"Date: {date}",
        f"Message-ID: <journal.{envelope.queue_id}@{envelope.hostname}>",
        "MIME-Version: 1.0",
        "Auto-Submitted: auto-generated",
        f"{JOURNAL_HEADER}: {envelope.queue_id}; site={envelope.site}; origin={envelope.origin}",
        f"{SENDER_HEADER}: {sender}",
        _folded(RECIPIENTS_HEADER, recipients),
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit" if not text.isascii() else "Content-Transfer-Encoding: 7bit",
        "",
        text,
        f"--{boundary}",
        "Content-Type: message/rfc822",
        "Content-Transfer-Encoding: 8bit" if eight_bit else "Content-Transfer-Encoding: 7bit",
        "Content-Disposition: inline",
        "",
        ""]
    head = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    body = original if original.endswith(b"\n") else original + b"\r\n"
    return head + body + f"--{boundary}--\r\n".encode()
