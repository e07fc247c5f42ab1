"""What a sender asks of Delivery Status Notifications (RFC 3461): the DSN parameters
of MAIL FROM (``RET``, ``ENVID``) and RCPT TO (``NOTIFY``, ``ORCPT``), and xtext.

Pure values and parsing (no I/O): the ingress parses the parameters here
(``imsrelay.ingress.adapter``; a ``DsnSyntaxError`` is answered ``501 5.5.4`` with its
text), the envelope keeps them (``imsrelay.model.envelope``: ``ret`` and ``envid`` per
message, ``notify`` and ``orcpt`` per recipient), the SMTP transport passes them on
(``xtext_encode``), and the queue decides which reports to send
(``imsrelay.queue.dsn.report_wanted``).  Exchange 5.5's IMS honoured NOTIFY and RET
(KB Q156063, 2.2.14-15).

Stored forms: ``notify`` is ``"NEVER"`` or a comma list of ``SUCCESS``, ``FAILURE`` and
``DELAY`` in that order (None: not given, the default: failure and delay reports);
``ret`` is ``"FULL"`` or ``"HDRS"`` (None: not given); ``envid`` is the decoded text;
``orcpt`` is ``addr-type;address`` with the address decoded (``rfc822;user@host``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
DELAY = "DELAY"
NEVER = "NEVER"
NOTIFY_ORDER = (SUCCESS, FAILURE, DELAY)
RET_VALUES = ("FULL", "HDRS")

MAIL_PARAMS = ("RET", "ENVID")
RCPT_PARAMS = ("NOTIFY", "ORCPT")

MAX_ENVID = 100  # characters of the ENVID parameter's value, as sent (RFC 3461 4.4)
MAX_ORCPT = 500  # characters of the ORCPT parameter's value, as sent (RFC 3461 4.2)

_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})*")  # RFC 3461 4: xchar / "+" HEXCHAR HEXCHAR
_HEXCHAR = re.compile(rb"\+([0-9A-Fa-f]{2})")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")  # RFC 5322 atext


class DsnSyntaxError(ValueError):
    """A DSN parameter that breaks RFC 3461's syntax; its text says what is wrong."""


@dataclass(frozen=True)
class MailDsn:
    """MAIL FROM's DSN parameters (None: not given)."""

    ret: str | None = None
    envid: str | None = None


@dataclass(frozen=True)
class RcptDsn:
    """One RCPT TO's DSN parameters (None: not given)."""

    notify: str | None = None
    orcpt: str | None = None


def xtext_decode(text: str) -> str:
    """The text an xtext stands for (``+2B`` is ``+``; bytes that are not UTF-8 kept as
    surrogates); DsnSyntaxError when it is not xtext."""
    if not _XTEXT.fullmatch(text):
        raise DsnSyntaxError("not xtext (printable ASCII; '+' and '=' written as +2B and +3D)")
    raw = _HEXCHAR.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("ascii"))
    return raw.decode("utf-8", "surrogateescape")


def xtext_encode(text: str) -> str:
    """``text`` as xtext: anything but printable ASCII, ``+`` and ``=`` as ``+XX`` (the
    UTF-8 bytes of a non-ASCII character, each so)."""
    out = []
    for ch in text:
        if "!" <= ch <= "~" and ch not in "+=":
            out.append(ch)
        else:
            out.extend(f"+{b:02X}" for b in ch.encode("utf-8", "surrogateescape"))
    return "".join(out)


def parse_notify(value: str) -> str:
    """``NEVER``, or SUCCESS/FAILURE/DELAY as a comma list, in the stored form."""
    items = [v.strip().upper() for v in value.split(",")]
    if items == [NEVER]:
        return NEVER
    if NEVER in items:
        raise DsnSyntaxError("NOTIFY=NEVER cannot be combined with SUCCESS, FAILURE or DELAY")
    unknown = [v for v in items if v not in NOTIFY_ORDER]
    if unknown or not value:
        raise DsnSyntaxError("NOTIFY takes NEVER, or a comma list of SUCCESS, FAILURE and DELAY")
    return ",".join(v for v in NOTIFY_ORDER if v in items)


def parse_ret(value: str) -> str:
    upper = value.upper()
    if upper not in RET_VALUES:
        raise DsnSyntaxError("RET takes FULL or HDRS")
    return upper


def parse_envid(value: str) -> str:
    if not value or len(value) > MAX_ENVID:
        raise DsnSyntaxError(f"ENVID takes 1 to {MAX_ENVID} characters of xtext")
    try:
        envid = xtext_decode(value)
    except DsnSyntaxError as exc:
        raise DsnSyntaxError(f"ENVID is {exc}") from None
    if not all(" " <= c <= "~" for c in envid):
        raise DsnSyntaxError("ENVID must stand for printable US-ASCII text")
    return envid


def parse_orcpt(value: str) -> str:
    """``addr-type;xtext`` as ``addr-type;decoded address``."""
    kind, semi, encoded = value.partition(";")
    if not semi or not _ATOM.fullmatch(kind) or not encoded:
        raise DsnSyntaxError("ORCPT takes addr-type;xtext, e.g. ORCPT=rfc822;user@example.com")
    if len(value) > MAX_ORCPT:
        raise DsnSyntaxError(f"ORCPT is longer than {MAX_ORCPT} characters")
    try:
        address = xtext_decode(encoded)
    except DsnSyntaxError as exc:
        raise DsnSyntaxError(f"ORCPT's address is {exc}") from None
    if any(c < " " or c == "\x7f" or "\udc80" <= c <= "\udcff" for c in address):
        raise DsnSyntaxError("ORCPT's address holds control characters or bytes that are not UTF-8")
    return f"{kind.lower() if kind.lower() in ('rfc822', 'utf-8') else kind};{address}"


def orcpt_param(orcpt: str) -> str:
    """A stored ``addr-type;address`` as the ORCPT parameter's value (xtext)."""
    kind, _, address = orcpt.partition(";")
    return f"{kind};{xtext_encode(address)}"


def split_params(params: str, names: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """(the parameters that are not ``names``, as given; ``names`` found → value as
    given).  A name given twice, or without a value, is a DsnSyntaxError."""
    rest: list[str] = []
    found: dict[str, str] = {}
    for token in params.split():
        key, eq, value = token.partition("=")
        name = key.upper()
        if name not in names:
            rest.append(token)
            continue
        if name in found:
            raise DsnSyntaxError(f"{name} given twice")
        if not eq or not value:
            raise DsnSyntaxError(f"{name} needs a value ({name}=...)")
        found[name] = value
    return rest, found


def mail_dsn(found: dict[str, str]) -> MailDsn:
    """MAIL FROM's DSN parameters (from ``split_params(..., MAIL_PARAMS)``)."""
    return MailDsn(ret=parse_ret(found["RET"]) if "RET" in found else None,
                   envid=parse_envid(found["ENVID"]) if "ENVID" in found else None)


def rcpt_dsn(found: dict[str, str]) -> RcptDsn:
    """RCPT TO's DSN parameters (from ``split_params(..., RCPT_PARAMS)``)."""
    return RcptDsn(notify=parse_notify(found["NOTIFY"]) if "NOTIFY" in found else None,
                   orcpt=parse_orcpt(found["ORCPT"]) if "ORCPT" in found else None)


def notify_wants(notify: str | None, kind: str) -> bool:
    """Whether a recipient's NOTIFY asks for ``kind`` (SUCCESS, FAILURE or DELAY)
    reports.  Not given: failure and delay reports, no success report (RFC 3461 4.1)."""
    if notify is None:
        return kind in (FAILURE, DELAY)
    return kind in notify.split(",")
