"""A raw message's parts (pure): ``split_message``, the package's one splitter of a
message into its header block and its body."""

from __future__ import annotations

import re

_HEADER_END = re.compile(rb"\r?\n\r?\n")


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """(header block including its final line break, rest) of a raw message."""
    m = _HEADER_END.search(message)
    if not m:
        return message, b""
    cut = m.start() + (2 if message[m.start():m.start() + 2] == b"\r\n" else 1)
    return message[:cut], message[cut:]
