"""The bytes of the DATA phase, taken in chunks: where the message ends, what it says
once un-stuffed, and which of aiosmtpd's refusals it earns (pure; the reading is in
``imsrelay.ingress.adapter``).

aiosmtpd 1.4 reads DATA one CRLF-line at a time (an await and a buffer per line).
``DataScanner`` takes whatever the socket delivered and gives the same results with
``bytes`` operations.  The rules are aiosmtpd's, to the byte:

- lines end at CRLF only (a bare LF or CR is part of a line); the message ends at the
  first line that is exactly ``.`` CRLF, that is the first ``CRLF . CRLF`` in the stream
  with a CRLF imagined before its first byte (``.`` CRLF straight after DATA: empty);
- a line that starts with ``.`` loses that dot (RFC 5321 4.5.2; aiosmtpd removes any
  leading dot, not only a doubled one);
- the byte count is of the lines as sent (dots and CRLFs included, the final ``.``
  line not); past ``size_limit``: ``TOO_MUCH`` (552), read to the end all the same;
- a line longer than ``line_limit`` (CRLF included): ``TOO_LONG`` (500).  Whichever
  comes first in the stream wins; a line whose text alone is longer than
  ``line_limit`` counts as too long before its bytes count towards the size (aiosmtpd
  sees it as a ``LimitOverrunError`` before adding it up);
- ``forbid_bare_lf``: an LF not preceded by CR anywhere before the end is ``BARE_LF``
  (521, the connection closes), at once, whatever else was wrong.

``feed`` returns how many bytes of a chunk belong to DATA: what follows the final
``.`` CRLF is the client's next command (PIPELINING) and must be read as one.  Memory
stays bounded: past the size limit (or after a line too long) only a few bytes are
kept, to find the end."""

from __future__ import annotations

import bisect
import enum
import re

TERMINATOR = b"\r\n.\r\n"
DOT_LINE = b"\r\n."  # where a line starting with a dot starts (the final "." line too)
CRLF = b"\r\n"
SCAN_EVERY = 256 * 1024  # line checks on a long message as it comes (bounded memory with no size limit)


class DataResult(enum.Enum):
    """How a DATA phase ends: the message is taken (``OK``) or which refusal it earns."""

    OK = "ok"
    TOO_LONG = "too long"  # 500 5.5.2 Line too long
    TOO_MUCH = "too much"  # 552 5.3.4 message size
    BARE_LF = "bare lf"  # 521 5.5.2 (smtp.bare_newline = "reject")


class DataScanner:
    """One DATA phase: feed it the stream after ``354`` until ``done``.

    The chunks are kept as they came (no copy while the message arrives; one join at
    the end), and one search per chunk finds both the end and whether a line starts
    with a dot: it looks for ``CRLF .``, which is where a dot line and the final
    ``.`` CRLF both start."""

    def __init__(self, *, size_limit: int | None, line_limit: int, forbid_bare_lf: bool) -> None:
        self.size_limit = size_limit or None  # aiosmtpd: 0 or None is no limit
        self.line_limit = line_limit
        self.forbid_bare_lf = forbid_bare_lf
        self.outcome = DataResult.OK
        self.done = False
        self._parts: list[bytes] = []  # the chunks so far, while every line is still acceptable
        self._starts: list[int] = []  # offset in the stream of each part
        self._held = 0  # bytes of the stream kept (of _parts: the last one may hold more, after the end)
        self._seen = 0  # bytes of the stream taken
        self._tail = CRLF  # the last (up to 4) bytes taken: a CRLF before the first line
        self._checked = 0  # lines of the stream before this offset are known to be fine
        self._counted = 0  # their bytes (aiosmtpd's num_bytes)
        self._end: int | None = None  # offset of the final "." line
        self._doubt = False  # a CRLF "." met a chunk's edge: content() looks again
        self._content: bytes | None = None  # the message, once content() has joined the chunks
        self.dot_lines = False  # whether a line of the message starts with a dot (exact once content() ran)

    def feed(self, chunk: bytes) -> int:
        """Take the next bytes; how many of them belong to DATA (``len(chunk)`` unless
        this chunk holds the end: the rest is the next command's)."""
        if self.done or not chunk:
            return 0
        tail = self._tail
        end_at = self._find_end(tail, chunk)  # where the terminator starts in chunk (< 0: in the tail)
        found = end_at is not None
        used = len(chunk) if end_at is None else end_at + len(TERMINATOR)
        if self.forbid_bare_lf and _has_bare_lf(tail[-1], chunk if used == len(chunk) else chunk[:used]):
            self.outcome, self.done = DataResult.BARE_LF, True
            self._drop()
            return used
        start = self._seen
        self._seen += used
        if self.outcome is DataResult.OK:
            self._parts.append(chunk)  # (past the end: the next command's bytes, never read as DATA)
            self._starts.append(start)
            self._held += used
        self._tail = (tail + chunk[:used])[-4:] if used < 4 else chunk[used - 4:used]
        if found:
            self.done = True
            end = start + used - 3  # the final "." line starts here
            if self.outcome is DataResult.OK:
                self._end = end
                self._check_lines(end)
            if self.outcome is not DataResult.OK:
                self._drop()
            return used
        if self.outcome is DataResult.OK and self._due():
            self._check_growing()
        return used

    def _find_end(self, tail: bytes, chunk: bytes) -> int | None:
        """Where the first CRLF.CRLF of ``tail + chunk`` starts, counted from chunk's
        first byte (negative: in the tail), or None; notes dot lines on the way."""
        head = tail + chunk[:4]
        f = head.find(TERMINATOR)
        if f >= 0:
            return f - len(tail)
        if self.dot_lines or self.outcome is not DataResult.OK:
            i = -1 if chunk.rfind(TERMINATOR) < 0 else chunk.find(TERMINATOR)  # (backwards: faster)
            return None if i < 0 else i
        g = head.find(DOT_LINE, max(0, len(tail) - 2))
        if 0 <= g < len(tail):
            self._doubt = True  # a CRLF "." across the edge (or before the first line): content() looks
        last = chunk.rfind(DOT_LINE)  # (searching backwards is several times faster)
        if last < 0:  # most chunks: no dot line, no end
            return None
        i = last if chunk.rfind(DOT_LINE, 0, last + 2) < 0 else chunk.find(DOT_LINE)  # the first one
        after = chunk[i + 3:i + 5]
        if after == CRLF:
            return i
        if after in (b"", b"\r"):  # the chunk ends before telling whether this is the end
            self._doubt = True
            return None
        self.dot_lines = True  # a line starting with a dot; from now on only the end is looked for
        i = -1 if chunk.rfind(TERMINATOR, i + 1) < 0 else chunk.find(TERMINATOR, i + 1)
        return None if i < 0 else i

    @property
    def held(self) -> int:
        """Bytes of the message kept so far (0 once it was refused)."""
        return self._held

    def _drop(self) -> None:
        self._parts, self._starts, self._held = [], [], 0

    def content(self) -> bytes:
        """The message as the client meant it (dots un-stuffed): aiosmtpd's
        ``envelope.original_content``.  Only when ``done`` with ``DataResult.OK``."""
        if not self.done or self.outcome is not DataResult.OK or self._end is None:
            raise ValueError("no message: DATA is not over, or it was refused")
        if self._content is not None:
            return self._content
        end = self._end
        pieces: list[bytes | memoryview] = []
        for part, start in zip(self._parts, self._starts, strict=True):
            if start >= end:
                break
            pieces.append(part if start + len(part) <= end else memoryview(part)[:end - start])
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            raw = pieces[0]
        else:
            raw = b"".join(pieces)
        if self._doubt and not self.dot_lines:
            self.dot_lines = raw[:1] == b"." or raw.find(b"\r\n.") >= 0
        # When no line starts with a dot there is nothing to un-stuff here, nor to stuff on the way out.
        self._content = unstuff(raw) if self.dot_lines else raw
        self._parts, self._starts = [], []  # the chunks go now: the message is held once, not twice
        return self._content

    # -- the line checks (aiosmtpd's TOO_LONG / TOO_MUCH, first in the stream wins)
    def _due(self) -> bool:
        grown = self._held - self._checked
        return grown >= SCAN_EVERY or (self.size_limit is not None
                                       and self._held >= self.size_limit + self.line_limit + 2)

    def _check_growing(self) -> None:
        """Check the complete lines so far; then the line still arriving, whose text
        may already be longer than the limit.  Past size_limit + line_limit + 2 bytes
        this always settles TOO_MUCH or TOO_LONG (and the kept bytes are dropped)."""
        last = self._rfind_crlf(self._checked, self._held)
        complete = self._checked if last < 0 else last + 2
        self._check_lines(complete)
        if self.outcome is DataResult.OK and self._held - complete >= self.line_limit + 2:
            self.outcome = DataResult.TOO_LONG  # its text passed line_limit: aiosmtpd's LimitOverrunError
        if self.outcome is not DataResult.OK:
            self._drop()

    def _check_lines(self, end: int) -> None:
        """The complete lines from ``_checked`` up to ``end`` (just after a CRLF)."""
        start = self._checked
        if end <= start:
            return
        fits = self.size_limit is None or self._counted + (end - start) <= self.size_limit
        if fits and self._lines_fit(start, end):
            self._counted += end - start
            self._checked = end
            return
        self.outcome = _first_refusal(b"".join(self._parts), start, end, self._counted, self.size_limit,
                                      self.line_limit)  # (the parts start at offset 0: nothing was dropped)
        self._checked = end
        self._counted += end - start

    def _lines_fit(self, start: int, end: int) -> bool:
        """``_lines_fit`` over the parts: every window of ``line_limit`` bytes from a
        line's start holds a CRLF.  A window inside one part is searched there; one
        across parts (a few per message) by ``_rfind_crlf``."""
        parts, starts, limit = self._parts, self._starts, self.line_limit
        k = bisect.bisect_right(starts, start) - 1
        pos = start
        while pos < end:
            while starts[k] + len(parts[k]) <= pos:
                k += 1
            base = starts[k]
            part = parts[k]
            stop_part = min(end, base + len(part)) - base
            p = pos - base
            while p < stop_part:  # windows inside this part
                stop = p + limit
                if stop > stop_part:
                    if base + stop_part >= end:  # the last window: it stops at end, inside this part
                        stop = stop_part
                    else:
                        break  # the window crosses into the next part
                crlf = part.rfind(CRLF, p, stop)
                if crlf < 0:
                    return False
                p = crlf + 2
            pos = base + p
            if pos >= end:
                return True
            if pos < base + len(part) and pos + limit > base + len(part):  # across the edge
                crlf = self._rfind_crlf(pos, min(pos + limit, end))
                if crlf < 0:
                    return False
                pos = crlf + 2
        return True

    def _rfind_crlf(self, start: int, stop: int) -> int:
        """The offset in the stream of the last CRLF wholly within ``[start, stop)`` of
        the kept parts (-1: none), a CRLF split between two parts included."""
        parts, starts = self._parts, self._starts
        if stop - start < 2 or not parts:
            return -1
        k = bisect.bisect_right(starts, stop - 1) - 1
        while k >= 0:
            base = starts[k]
            found = parts[k].rfind(CRLF, max(start - base, 0), stop - base)
            if found >= 0:
                return base + found
            if base - 1 < start or k == 0:
                return -1
            if parts[k - 1][-1:] == b"\r" and parts[k][:1] == b"\n" and base + 1 <= stop:
                return base - 1
            k -= 1
        return -1


def unstuff(raw: bytes) -> bytes:
    """Remove the dot that starts a line (RFC 5321 4.5.2), as aiosmtpd does: any
    leading dot, at the start and after every CRLF (bare LF or CR start no line)."""
    if raw[:1] == b".":
        raw = raw[1:]
    return raw.replace(b"\r\n.", CRLF)


_NOT_LINE_ENDS = bytes(c for c in range(256) if c not in (10, 13))  # bytes.translate deletes these
_BARE_CR = re.compile(rb"\r(?!\n)")  # (the regex engine skips to each CR: faster than counting CRLFs)


def line_ends_clean(raw: bytes, *, bare_lf_possible: bool = True) -> tuple[bytes, bool]:
    """(the message with every bare LF made CRLF, whether every CR and LF of it now
    belongs to a CRLF pair).  Outbound delivery must send CRLF line ends
    (``imsrelay.transport.smtp_body``); knowing this at ingress spares it three
    whole-message passes.  ``bare_lf_possible=False`` (the DATA reader refused bare LFs
    already) skips the slow two-byte count.  The CRs and LFs are counted in one pass
    (``translate`` keeps only them: a few bytes a line), not one count each."""
    ends = raw.translate(None, _NOT_LINE_ENDS)
    lfs = ends.count(b"\n")
    crs = len(ends) - lfs
    if bare_lf_possible and lfs:
        # with no CR alone (one fast search), every CR starts a CRLF: they are as many
        crlfs = crs if not crs or _BARE_CR.search(raw) is None else raw.count(CRLF)
        if crlfs != lfs:
            raw = raw.replace(CRLF, b"\n").replace(b"\n", CRLF)
            return raw, raw.count(b"\r") == lfs  # (the LFs are as many as before)
    return raw, crs == lfs


def _has_bare_lf(previous: int, data: bytes) -> bool:
    """An LF in ``data`` with no CR before it (``previous``: the byte before ``data``)."""
    lfs = data.count(b"\n")
    if not lfs:
        return False
    crlfs = data.count(CRLF) + (1 if previous == 13 and data[:1] == b"\n" else 0)
    return lfs != crlfs


def _first_refusal(buf: bytes, start: int, end: int, counted: int, size_limit: int | None,
                   line_limit: int) -> DataResult:
    """aiosmtpd's loop over the lines of ``buf[start:end]``, line by line (only when a
    limit is crossed in them): the first refusal, or OK."""
    pos = start
    while pos < end:
        nxt = buf.find(CRLF, pos, end) + 2
        length = nxt - pos
        if length - 2 > line_limit:  # its text alone is too long: refused before it is counted
            return DataResult.TOO_LONG
        counted += length
        if size_limit is not None and counted > size_limit:
            return DataResult.TOO_MUCH
        if length > line_limit:
            return DataResult.TOO_LONG
        pos = nxt
    return DataResult.OK
