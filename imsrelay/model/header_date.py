"""The date-time of a trace header (RFC 5322 §3.3), formatted once per second.

A header's date has a resolution of one second, so every message accepted or
delivered within the same second shares one formatting (``email.utils.format_datetime``
costs ~25 µs): ``Received:`` at ingress, the trace headers of a Maildir delivery.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import lru_cache


@lru_cache(maxsize=4)
def date_of_second(second: int) -> str:
    """The RFC 5322 date-time of a Unix second, in UTC."""
    return format_datetime(datetime.fromtimestamp(second, UTC))


def header_date_now(clock: float | None = None) -> str:
    """The date-time of now (or of ``clock``, a Unix time) for a trace header."""
    return date_of_second(int(time.time() if clock is None else clock))
