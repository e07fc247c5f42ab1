"""Time-outs by priority (IMS Connections tab, Time-outs button; KB Q184051, Q166587).

A message's priority is read once, when it is accepted, from its header:

1. ``Priority:`` (RFC 2156, the X.400 priority the IMS time-outs are named after):
   ``urgent`` / ``normal`` / ``non-urgent``;
2. else ``Importance:`` (RFC 2156): ``high`` → urgent, ``low`` → non-urgent;
3. else ``X-Priority:`` (Outlook, Eudora): 1–2 → urgent, 3 → normal, 4–5 → non-urgent;
4. else normal.

Each priority has its own lifetime (time before an undeliverable message is returned
with an NDR) and delay-notice time.  Pure functions: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

URGENT = "urgent"
NORMAL = "normal"
NON_URGENT = "non-urgent"
MAX_HEADER_SCAN = 64 * 1024  # the priority headers are read from the first 64 KiB of the header (runs on the loop)

_HEADER = re.compile(rb"^(priority|importance|x-priority)[ \t]*:[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)",
                     re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Timeouts:
    lifetime: float  # seconds after arrival before the NDR
    delay_notice: float | None  # seconds after arrival before a delay notice (None: none)


@dataclass(frozen=True)
class PriorityTimeouts:
    urgent: Timeouts
    normal: Timeouts
    non_urgent: Timeouts

    def for_priority(self, priority: str) -> Timeouts:
        if priority == URGENT:
            return self.urgent
        if priority == NON_URGENT:
            return self.non_urgent
        return self.normal


def _from_priority(value: str) -> str | None:
    v = value.strip().lower()
    if v.startswith("urgent"):
        return URGENT
    if v.startswith("non-urgent") or v.startswith("non urgent") or v.startswith("nonurgent"):
        return NON_URGENT
    if v.startswith("normal"):
        return NORMAL
    return None


def _from_importance(value: str) -> str | None:
    v = value.strip().lower()
    if v.startswith("high"):
        return URGENT
    if v.startswith("low"):
        return NON_URGENT
    if v.startswith("normal"):
        return NORMAL
    return None


def _from_x_priority(value: str) -> str | None:
    m = re.match(r"\s*([1-5])\b", value)
    if not m:
        return None
    n = int(m.group(1))
    return URGENT if n <= 2 else NORMAL if n == 3 else NON_URGENT


def priority_of(message: bytes) -> str:
    """The priority of a message from its header block (urgent, normal, non-urgent)."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    header = (message if end < 0 else message[:end + 2])[:MAX_HEADER_SCAN]
    lowered = header.lower()
    if b"priority" not in lowered and b"importance" not in lowered:  # none of the fields (the common case)
        return NORMAL
    found: dict[str, str] = {}
    for m in _HEADER.finditer(header):
        name = m.group(1).decode("ascii").lower()
        found.setdefault(name, re.sub(r"\s+", " ", m.group(2).decode("latin-1")))
    for name, parse in (("priority", _from_priority), ("importance", _from_importance),
                        ("x-priority", _from_x_priority)):
        if name in found:
            value = parse(found[name])
            if value is not None:
                return value
    return NORMAL
