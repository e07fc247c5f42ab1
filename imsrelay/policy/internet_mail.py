"""The IMS Internet Mail tab by E-Mail Domain (pure): what may leave for a remote domain.

Exchange 5.5's IMS kept, per remote domain with a "Default" entry (Q262126), the check
boxes "Disable out of office responses to the Internet", "Disable automatic replies
to the Internet" (in 5.5 it disables automatic forwards too, Q176161), "Disable
sending display names to the Internet", and a maximum message size; SP3 added an
IMS-wide outbound size limit next to the inbound one (Q231303).  Here:

- ``settings_for(domain, entries)``: the effective settings for a recipient's domain
  (the most specific ``[[internet_mail]]`` entry; keys it leaves out come from the
  ``*`` entry, then the defaults);
- ``classify(header)``: what kind of automatic message a message is (the table
  below);
- ``outbound_verdict(...)``: go, discard (no NDR: the IMS "discards the Auto Reply
  message", Q176161; tracked as ``discarded``) or fail with ``5.3.4`` (an NDR);
- ``strip_display_names(message)``: ``From:``/``To:``/``Cc:`` with bare addresses.

How a message is recognised (first match wins; header names and keywords ignore case):

==============  ==========================================================================
kind            the message carries
==============  ==========================================================================
out-of-office   a ``Subject:`` starting ``Out of Office AutoReply:`` (Exchange 4.0–5.5's
                OOF subject); or an automatic-reply mark (below) with a ``Subject:``
                starting ``Out of Office`` (later Exchange and Outlook)
auto-reply      ``Auto-Submitted: auto-replied`` (RFC 3834); ``X-Autoreply: yes``,
                ``X-Autorespond`` (vacation programs); ``Precedence: auto_reply``
auto-forward    ``Autoforwarded: TRUE`` (RFC 2156, X.400's auto-forwarded, Exchange's
                PR_AUTO_FORWARDED on the envelope); ``Auto-Submitted: auto-forwarded``;
                ``X-MS-Exchange-Inbox-Rules-Loop`` (an Inbox rule forwarded it)
==============  ==========================================================================

``X-Auto-Response-Suppress`` asks *others* not to answer a message: it says nothing of
what the message is, and is ignored here.  ``Auto-Submitted: auto-generated`` (reports,
notifications) is none of the three: those switches never stop it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from imsrelay.model.addresses import most_specific
from imsrelay.model.message import split_message
from imsrelay.model.settings import INTERNET_MAIL_DEFAULT, InternetMailDomain
from imsrelay.policy.rewrite import getaddresses, header_fields

OUT_OF_OFFICE = "out-of-office"
AUTO_REPLY = "auto-reply"
AUTO_FORWARD = "auto-forward"

DISCARD = "discard"
FAIL = "fail"

DISPLAY_NAME_FIELDS = ("from", "to", "cc")
MAX_FIELDS = 200  # header fields examined (hostile input)

_SWITCH = {OUT_OF_OFFICE: ("out_of_office", "out-of-office replies"),
           AUTO_REPLY: ("auto_replies", "automatic replies"),
           AUTO_FORWARD: ("auto_forwards", "automatically forwarded messages")}


@dataclass(frozen=True)
class DomainMailSettings:
    """The effective Internet Mail settings for one remote domain."""

    entry: str = INTERNET_MAIL_DEFAULT  # the [[internet_mail]] entry that matched ("*": the default)
    out_of_office: bool = True
    auto_replies: bool = True
    auto_forwards: bool = True
    display_names: bool = True
    max_message_size: int = 0  # bytes; 0 = no limit

    @property
    def restricts(self) -> bool:
        """Anything here can change or stop a message."""
        return not (self.out_of_office and self.auto_replies and self.auto_forwards and self.display_names
                    and not self.max_message_size)


@dataclass(frozen=True)
class Verdict:
    action: str  # DISCARD (no NDR) | FAIL (permanent failure: an NDR)
    status: str
    text: str
    kind: str | None = None  # the automatic message's kind, for a discard


@dataclass(frozen=True)
class OutboundRules:
    """What the queue manager checks before mail leaves: the ``[[internet_mail]]``
    entries and the IMS's outbound size limit (``delivery.max_message_size``)."""

    domains: tuple[InternetMailDomain, ...] = ()
    max_message_size: int = 0

    @property
    def active(self) -> bool:
        return bool(self.domains or self.max_message_size)

    def settings_for(self, domain: str) -> DomainMailSettings:
        return settings_for(domain, self.domains)


def settings_for(domain: str, entries: Sequence[InternetMailDomain]) -> DomainMailSettings:
    """The settings for mail to ``domain``: its most specific entry, each key left out
    there taken from the ``*`` entry, then from the defaults (everything allowed)."""
    default = next((e for e in entries if e.domain == INTERNET_MAIL_DEFAULT), None)
    match = most_specific(domain.lower(), [(e.domain, e) for e in entries if e.domain != INTERNET_MAIL_DEFAULT])
    return _effective(match[1] if match else None, default)


def effective_entries(entries: Sequence[InternetMailDomain]) -> list[DomainMailSettings]:
    """Each entry as it applies (keys left out filled from ``*`` and the defaults), the
    ``*`` entry first, always present: what the console shows."""
    default = next((e for e in entries if e.domain == INTERNET_MAIL_DEFAULT), None)
    return [_effective(None, default)] + [_effective(e, default) for e in entries
                                          if e.domain != INTERNET_MAIL_DEFAULT]


def _effective(entry: InternetMailDomain | None, default: InternetMailDomain | None) -> DomainMailSettings:
    layers = [e for e in (entry, default) if e is not None]

    def pick(name: str) -> bool | int | None:
        return next((v for e in layers if (v := getattr(e, name)) is not None), None)

    auto_replies = pick("auto_replies")
    auto_forwards = pick("auto_forwards")
    return DomainMailSettings(
        entry=entry.domain if entry else INTERNET_MAIL_DEFAULT,
        out_of_office=_true_unless(pick("out_of_office")),
        auto_replies=_true_unless(auto_replies),
        auto_forwards=_true_unless(auto_forwards if auto_forwards is not None else auto_replies),  # Q176161
        display_names=_true_unless(pick("display_names")),
        max_message_size=int(pick("max_message_size") or 0))


def _true_unless(value: bool | int | None) -> bool:
    return True if value is None else bool(value)


def _fields(header: bytes) -> dict[str, list[str]]:
    """Header field name (lower case) -> its values, unfolded."""
    found: dict[str, list[str]] = {}
    for i, f in enumerate(header_fields(header)):
        if i >= MAX_FIELDS:
            break
        name, sep, value = f.partition(b":")
        if sep:
            text = re.sub(r"\r?\n[ \t]", " ", value.decode("utf-8", "replace")).strip()
            found.setdefault(name.strip().lower().decode("ascii", "replace"), []).append(text)
    return found


def _first_word(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def classify(message: bytes) -> str | None:
    """``OUT_OF_OFFICE``, ``AUTO_REPLY``, ``AUTO_FORWARD`` or None (see the module's table)."""
    header, _ = split_message(message)
    f = _fields(header)
    submitted = {_first_word(v) for v in f.get("auto-submitted", [])}
    subject = (f.get("subject") or [""])[0].lower()
    replied = ("auto-replied" in submitted
               or any(_first_word(v) in ("yes", "true", "1") for v in f.get("x-autoreply", []))
               or "x-autorespond" in f
               or any(_first_word(v) == "auto_reply" for v in f.get("precedence", [])))
    if (subject.startswith("out of office autoreply:")
            or (replied and subject.startswith("out of office"))):
        return OUT_OF_OFFICE
    if replied:
        return AUTO_REPLY
    if ("auto-forwarded" in submitted or "x-ms-exchange-inbox-rules-loop" in f
            or any(_first_word(v) == "true" for v in f.get("autoforwarded", []))):
        return AUTO_FORWARD
    return None


def outbound_verdict(*, kind: str | None, size: int, domain: str, settings: DomainMailSettings | None,
                     outbound_limit: int) -> Verdict | None:
    """May a message of ``kind`` (``classify``) and ``size`` bytes leave for ``domain``?
    None: yes.  ``settings`` None: the recipient is no Internet recipient (another
    site of the organisation): only the IMS's outbound limit applies."""
    if settings is not None and kind is not None:
        switch, what = _SWITCH[kind]
        if not getattr(settings, switch):
            return Verdict(DISCARD, "5.7.1", f"{what} to {domain} are disabled (Internet Mail tab, entry "
                           f"{settings.entry!r}): discarded without an NDR (Q262126, Q176161)", kind)
    if outbound_limit and size > outbound_limit:
        return Verdict(FAIL, "5.3.4", f"message size {size} bytes exceeds the outbound size limit of "
                       f"{outbound_limit} bytes (Q231303)")
    if settings is not None and settings.max_message_size and size > settings.max_message_size:
        return Verdict(FAIL, "5.3.4", f"message size {size} bytes exceeds the limit of {settings.max_message_size} "
                       f"bytes for {domain} (Internet Mail tab, entry {settings.entry!r})")
    return None


def strip_display_names(message: bytes) -> bytes:
    """The message with ``From:``, ``To:`` and ``Cc:`` carrying bare addresses
    (``a@example.net, b@example.net``): "Disable sending display names to the
    Internet".  A field that does not parse as addresses stays as it was; every
    other byte is kept."""
    header, body = split_message(message)
    fields = header_fields(header)
    changed = False
    for i, f in enumerate(fields[:MAX_FIELDS]):
        name, sep, value = f.partition(b":")
        if not sep or name.strip().lower().decode("ascii", "replace") not in DISPLAY_NAME_FIELDS:
            continue
        text = value.decode("utf-8", "surrogateescape")
        pairs = getaddresses([re.sub(r"\r?\n[ \t]", " ", text)])
        if not pairs or any(not addr or "@" not in addr for _, addr in pairs):
            continue  # a group, an empty or undisclosed list: leave it
        if not any(display for display, _ in pairs):
            continue
        ending = b"\r\n" if f.endswith(b"\r\n") else b"\n"
        fields[i] = name + b": " + ", ".join(addr for _, addr in pairs).encode("utf-8", "surrogateescape") + ending
        changed = True
    return b"".join(fields) + body if changed else message
