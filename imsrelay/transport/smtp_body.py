"""The DATA body of an outbound message, made with bytes operations (RFC 5321 §4.5.2).

Queued messages already have CRLF line ends (``smtpd`` turns a bare LF into CRLF at
ingress, or refuses it with ``smtp.bare_newline = "reject"``), so the usual message
needs no regex: counting CR, LF and CRLF tells that every line end is a CRLF, and the
bytes go out as they are, only dot-stuffed.  A message with a lone CR or LF (one made
on this site, or queued by an older version) is made CRLF exactly as aiosmtplib did.
"""

from __future__ import annotations

import re

# aiosmtplib's own rule (protocol.LINE_ENDINGS_REGEX): CRLF, a lone LF, a lone CR
_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")


def crlf_clean(message: bytes) -> bool:
    """Every CR and every LF in ``message`` belongs to a CRLF pair (three counts, no regex)."""
    pairs = message.count(b"\r\n")
    return message.count(b"\n") == pairs and message.count(b"\r") == pairs


def crlf_message(message: bytes, *, known_clean: bool = False) -> bytes:
    """The message as it is sent and as SIZE counts it: CRLF line ends, a CRLF at the end.
    Returns ``message`` itself when it is already so.  ``known_clean``: the ingress
    found every line end a CRLF (the envelope's ``crlf``), so it is not counted again."""
    if not known_clean and not crlf_clean(message):
        message = _LINE_ENDS.sub(b"\r\n", message)
    return message if message.endswith(b"\r\n") else message + b"\r\n"


Body = tuple[bytes, ...]  # what follows the 354, in parts written back to back


def dot_stuffed_parts(wire: bytes, *, known_dotless: bool = False) -> Body:
    """``dot_stuffed`` in parts: a message known to have no line starting with a dot
    goes out as it is, followed by the ``.CRLF`` — never copied to add three bytes."""
    if known_dotless:
        return wire, LONE_DOT
    return (dot_stuffed(wire),)


def dot_stuffed(wire: bytes, *, known_dotless: bool = False) -> bytes:
    """What follows the 354: ``wire`` (from ``crlf_message``) with a dot added before
    every line that starts with one (RFC 5321 §4.5.2), then the terminating ``.CRLF``.
    ``known_dotless``: the ingress found no line starting with a dot (the envelope's
    ``dotless``), so the message is not searched again."""
    if known_dotless:
        return wire + b".\r\n"
    body = wire.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body + b".\r\n"


LONE_DOT = b".\r\n"  # an empty message: ends a DATA the server accepted when nothing is to be sent
