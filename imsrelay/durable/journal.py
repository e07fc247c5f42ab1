"""An append-only, checksummed segment log: the spool's write-ahead journal.

Why: on the disks this runs on, one flush costs about as much as twenty small
files' worth of data, so "one file and one fsync per message" caps a relay at a
few hundred messages a second.  The journal makes a whole group of messages
durable with one ``write`` and one ``fdatasync``.

Format: ``<data>/queue/journal/00000001.log``, ``00000002.log``, …  Each record is
a 13-byte header — magic ``IMSJ``, a type byte, the payload length and the CRC-32
of the payload (big-endian) — followed by the payload.  A torn write (crash in the
middle of an append) shows up as a short or mismatching record at the end of the
newest segment; reading stops there, and since a write is acknowledged only after
its flush, nothing after that point was ever acknowledged.  After a restart, new
records go to a fresh segment, never after a torn tail.

A ``Journal`` is used by exactly one thread at a time (the spool's writer).

The list of segments: while a ``Journal`` owns its directory (from ``adopt_existing``
or its first new segment until ``close``; the spool's lock keeps every other process
out meanwhile) it is kept in memory and changed only by this object's own segment
creation and removal: ``segments()`` is asked once or twice per message and a
directory listing each time cost more than the rest of the bookkeeping.  A journal
that does not own its directory (a reader: ``imsrelay queue``, another worker's
journal) lists it on every call, since someone else may be writing there.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"IMSJ"
HEADER = struct.Struct(">4sBII")
ENQUEUE = 1  # payload: a queue file (envelope + message)
STATE = 2  # payload: the envelope JSON with per-recipient progress
DONE = 3  # payload: the queue id; the message has left the queue
SEGMENT_SIZE = 64 * 1024 * 1024
try:
    IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError):
    IOV_MAX = 16  # POSIX's minimum (_XOPEN_IOV_MAX)


@dataclass(frozen=True, slots=True)
class Location:
    segment: int
    offset: int  # of the payload
    length: int


@dataclass(frozen=True, slots=True)
class Record:
    type: int
    location: Location
    payload: memoryview  # a view of the segment read by ``scan`` (no copy per record)


def write_chunks(fd: int, chunks: Sequence[bytes | memoryview], total: int | None = None) -> None:
    """Write ``chunks`` (``total`` bytes, when the caller knows) back to back with
    ``writev`` (no joined copy of a round's messages: at 50 KB a message, joining cost
    more than the checksums), at most IOV_MAX at a time; a short write goes on from
    where it stopped.  The usual case, one call writing everything, looks at no chunk."""
    if total is None:
        total = sum(map(len, chunks))
    if len(chunks) <= IOV_MAX:
        written = os.writev(fd, chunks)
        if written == total:
            return
        pending = _unwritten(chunks, written)
    else:
        pending = list(chunks)
    while pending:
        pending = _unwritten(pending, os.writev(fd, pending[:IOV_MAX]))


def _unwritten(chunks: Sequence[bytes | memoryview], written: int) -> list[bytes | memoryview]:
    """What is left of ``chunks`` once their first ``written`` bytes are out."""
    done = 0
    while done < len(chunks) and written >= len(chunks[done]):
        written -= len(chunks[done])
        done += 1
    rest = list(chunks[done:])
    if written and rest:
        rest[0] = memoryview(rest[0])[written:]
    return rest


def segment_name(number: int) -> str:
    return f"{number:08d}.log"


class Journal:
    def __init__(self, directory: Path, *, segment_size: int = SEGMENT_SIZE) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_size = segment_size
        self._fd: int | None = None
        self._segment = 0
        self._size = 0
        self._lock = threading.Lock()  # segment switches vs. first_writable() from the loop
        self._known: list[int] | None = None  # the segments on disk, sorted, while we own them

    # ------------------------------------------------------------ reading

    def segments(self) -> list[int]:
        """The segment numbers on disk, oldest first."""
        with self._lock:
            if self._known is not None:
                return list(self._known)
        return self._list_segments()

    def _list_segments(self) -> list[int]:
        numbers = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                stem, dot, ext = entry.name.partition(".")
                if dot and ext == "log" and stem.isdigit():
                    numbers.append(int(stem))
        return sorted(numbers)

    def _own_segments(self) -> list[int]:
        """(Holding ``_lock``) the kept segment list, read from disk the first time."""
        if self._known is None:
            self._known = self._list_segments()
        return self._known

    def scan(self) -> Iterator[Record]:
        """Every intact record, oldest first; each segment is read up to its first
        damaged record (the torn tail of an interrupted append).  Payloads are views
        of the segment's bytes, not copies: at replay, a queued message's body is
        checked (CRC) but never copied, and nothing of it stays in memory unless the
        caller keeps the view (``bytes(record.payload)`` for a copy of its own).  A
        segment listed but gone when read was dropped by the running site meanwhile
        (it drops only segments with nothing queued left): skipped."""
        for number in self.segments():
            try:
                data = memoryview((self.directory / segment_name(number)).read_bytes())
            except FileNotFoundError:
                continue  # a reader beside the running site: the owner dropped it (nothing queued in it)
            pos = 0
            while pos + HEADER.size <= len(data):
                magic, rtype, length, crc = HEADER.unpack_from(data, pos)
                start = pos + HEADER.size
                end = start + length
                if magic != MAGIC or end > len(data):
                    break
                payload = data[start:end]
                if zlib.crc32(payload) != crc:
                    break
                yield Record(rtype, Location(number, start, length), payload)
                pos = end

    def read(self, location: Location) -> bytes:
        with open(self.directory / segment_name(location.segment), "rb") as f:
            f.seek(location.offset)
            data = f.read(location.length)
        if len(data) != location.length:
            raise OSError(f"journal segment {location.segment} is shorter than expected")
        return data

    # ------------------------------------------------------------ writing

    @property
    def current_segment(self) -> int:
        return self._segment

    @property
    def size(self) -> int:
        """Bytes written to the open segment (0 when none is open)."""
        return self._size if self._fd is not None else 0

    def first_writable(self) -> int:
        """The lowest segment number a record appended from now on can land in: the
        open segment, or (none open) one above every segment seen so far."""
        with self._lock:
            return self._segment if self._fd is not None else self._segment + 1

    def adopt_existing(self) -> None:
        """At recovery: every segment on disk is closed (new records go to a fresh one)."""
        with self._lock:
            self._segment = max([self._segment, *self._own_segments()])

    def _open_next(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            known = self._own_segments()
            self._segment = max([self._segment, *known]) + 1
            path = self.directory / segment_name(self._segment)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            self._size = 0
            known.append(self._segment)  # the highest number so far: the list stays sorted
        dfd = os.open(self.directory, os.O_RDONLY)  # the new segment's name is durable
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def append(self, records: Sequence[tuple[int, bytes | tuple[bytes, ...]]], *,
               durable: bool = True) -> list[Location]:
        """Append records with one write (and one flush when ``durable``).  A payload
        may come in parts (a queue file's envelope and its message): they are written
        back to back as one record, never joined in memory first."""
        if not records:
            return []
        if self._fd is None or self._size >= self.segment_size:
            self._open_next()
        assert self._fd is not None
        chunks: list[bytes] = []
        locations: list[Location] = []
        segment, pos, head = self._segment, self._size, HEADER.size
        for rtype, payload in records:
            if isinstance(payload, tuple):
                length, crc = 0, 0
                for part in payload:
                    length += len(part)
                    crc = zlib.crc32(part, crc)
                chunks += (HEADER.pack(MAGIC, rtype, length, crc), *payload)
            else:
                length = len(payload)
                chunks += (HEADER.pack(MAGIC, rtype, length, zlib.crc32(payload)), payload)
            locations.append(Location(segment, pos + head, length))
            pos += head + length
        try:
            write_chunks(self._fd, chunks, pos - self._size)
            if durable:
                os.fdatasync(self._fd)
        except OSError:
            # Cut the partial records off (a full disk must not keep their space), then
            # never write after this point again.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            self._abandon_segment()
            raise
        self._size = pos
        return locations

    def close_segment(self) -> None:
        """Stop appending to the open segment; the next record starts a new one (so
        the old one can be deleted once nothing in it is queued)."""
        self._abandon_segment()

    def _abandon_segment(self) -> None:
        with self._lock:
            if self._fd is not None:
                try:
                    os.close(self._fd)
                except OSError:
                    pass
                self._fd = None

    def flush(self) -> None:
        if self._fd is not None:
            os.fdatasync(self._fd)

    def remove_segments(self, numbers: Sequence[int]) -> None:
        for n in numbers:
            if n == self._segment and self._fd is not None:
                continue
            try:
                os.unlink(self.directory / segment_name(n))
            except FileNotFoundError:
                pass
            with self._lock:
                if self._known is not None and n in self._known:
                    self._known.remove(n)

    def close(self) -> None:
        """Stop writing; from now on ``segments()`` lists the directory again (another
        process may become its writer)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._known = None
