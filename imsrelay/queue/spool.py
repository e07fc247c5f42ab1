"""The durable queue on disk (the spool); its writes go through the group committer
(``imsrelay.durable.committer``).

Layout under ``<data>/queue/``::

    journal/NNNNNNNN.log  the write-ahead journal (imsrelay.durable.journal): ENQUEUE
                          records (envelope + message bytes exactly as received),
                          STATE records (per-recipient progress), DONE records
    tmp/                  files being written (Maildir deliveries); garbage after a crash
    control/              requests from ``imsrelay queue`` to a running site
    lock                  held (flock) by the running site: one writer at a time

Durability (docs/design.md invariant 1): ``enqueue`` appends the message to the journal
and returns only after the journal is flushed (fdatasync); only then does the SMTP
server answer ``250``.  One writer thread takes every request waiting at that
moment and makes them durable with one write and one flush (group commit), so many
sessions share one flush and the event loop never blocks on the disk.

A message is queued from its ENQUEUE record until its DONE record; its latest
STATE record (if any) says which recipients are finished.  DONE is not flushed on
its own: if a crash loses it, the message is delivered again (at worst a duplicate,
and Maildir delivery recognises its own earlier file).  Segments are deleted oldest
first once nothing queued is left in them; a message that stays long (retrying) is
copied forward so old segments can go (compaction).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from imsrelay.durable.committer import Append, CloseSegment, DropSegments, GroupCommitter, Op
from imsrelay.durable.journal import (
    DONE,
    ENQUEUE,
    SEGMENT_SIZE,
    STATE,
    Journal,
    Location,
    segment_name,
)
from imsrelay.model.envelope import Envelope, check_queue_id

RECLAIM_AT = 1024 * 1024  # an empty queue's open segment is closed and deleted beyond this size


class SpoolLocked(Exception):
    """Another process (the running site) owns the spool."""


_MAGIC = b"IMSQ1 "


def queue_file_bytes(envelope: Envelope, message: bytes) -> bytes:
    """An ENQUEUE payload: ``IMSQ1 <n>\\n``, n bytes of envelope JSON, the message."""
    return b"".join(queue_file_parts(envelope, message))


def queue_file_parts(envelope: Envelope, message: bytes) -> tuple[bytes, bytes]:
    """``queue_file_bytes`` in two parts, the envelope's and the message itself: the
    journal writes them back to back (``writev``), so the message is never copied
    into a payload of its own."""
    envelope.size = len(message)
    header = envelope.to_json()
    return b"%s%d\n%s" % (_MAGIC, len(header), header), message


_MAX_PREFIX = len(_MAGIC) + 21  # the magic, a length of up to 20 digits, the newline


def parse_queue_file(data: bytes | memoryview) -> tuple[Envelope, int]:
    """(envelope, offset of the message bytes); ValueError when incomplete.  Only the
    envelope is copied out of ``data`` (a journal view at replay: the body stays put)."""
    view = memoryview(data)
    prefix = bytes(view[:_MAX_PREFIX])
    if not prefix.startswith(_MAGIC):
        raise ValueError("not a queue file")
    nl = prefix.index(b"\n")
    length = int(prefix[len(_MAGIC):nl])
    start = nl + 1 + length
    envelope = Envelope.from_json(bytes(view[nl + 1:start]))
    if len(view) - start != envelope.size:
        raise ValueError("queue file is incomplete")
    return envelope, start


T = TypeVar("T")


@dataclass(slots=True)
class _Queued:
    location: Location  # of the ENQUEUE payload
    envelope: Envelope  # the latest known (ENQUEUE, then STATE records)


def _replay(journal: Journal) -> dict[str, _Queued]:
    """What the journal says is queued now (oldest first)."""
    return _replay_as(journal, lambda location, env: _Queued(location, env))


def _replay_as(journal: Journal, keep: Callable[[Location, Envelope], T]) -> dict[str, T]:
    """Each queued message's ``keep(location of its ENQUEUE, latest envelope)``: what a
    caller keeps per message (a count keeps no envelopes: nothing to fragment the heap)."""
    queued: dict[str, T] = {}
    locations: dict[str, Location] = {}
    for record in journal.scan():
        try:
            if record.type == ENQUEUE:
                env, _ = parse_queue_file(record.payload)
                locations[env.queue_id] = record.location
                queued[env.queue_id] = keep(record.location, env)
            elif record.type == STATE:
                env = Envelope.from_json(bytes(record.payload))
                if env.queue_id in queued:
                    queued[env.queue_id] = keep(locations[env.queue_id], env)
            elif record.type == DONE:
                qid = bytes(record.payload).decode("ascii", "replace")
                queued.pop(qid, None)
                locations.pop(qid, None)
        except (ValueError, TypeError, KeyError):
            continue  # an intact but unreadable record (foreign version): skip it
    return queued


def _worker_suffix(worker: int) -> str:
    return "" if worker == 0 else f"-{worker}"


class Spool:
    """One worker's view of the queue: it writes its own journal
    (``journal/`` for worker 0, ``journal-N/`` for worker N of ``imsrelay serve
    --workers``); the read-only and operator methods see every worker's journal."""

    def __init__(self, data_dir: Path, *, worker: int = 0, segment_size: int = SEGMENT_SIZE) -> None:
        self.data_dir = Path(data_dir)
        self.worker = worker
        self.root = self.data_dir / "queue"
        suffix = _worker_suffix(worker)
        self.tmp = self.root / "tmp"
        self.control = self.root / f"control{suffix}"
        for d in (self.root, self.tmp, self.control):
            d.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.root / f"journal{suffix}", segment_size=segment_size)
        self.committer = GroupCommitter(self.tmp, self.journal)
        self._lock_path = self.root / f"lock{suffix}"
        self._index: dict[str, Location] = {}
        self._live: Counter[int] = Counter()
        self._inflight: Counter[int] = Counter()  # ENQUEUE appends under way, by lowest segment they can land in
        self._leaving: set[str] = set()  # removals under way (compaction must not copy them back)
        self._lock_fd: int | None = None
        self.lock_wait = 0.0  # seconds recover() waits for a previous owner (a stopping worker)

    def workers_on_disk(self) -> list[int]:
        """Workers that have a journal here (0 always counts)."""
        found = {0}
        for p in self.root.glob("journal-*"):
            if p.name[8:].isdigit():
                found.add(int(p.name[8:]))
        return sorted(found)

    def _peer(self, worker: int) -> Spool:
        return self if worker == self.worker else Spool(self.data_dir, worker=worker)

    def _replay_all(self) -> dict[str, tuple[int, _Queued]]:
        found: dict[str, tuple[int, _Queued]] = {}
        for w in self.workers_on_disk():
            journal = self.journal if w == self.worker else Journal(self.root / f"journal{_worker_suffix(w)}")
            for qid, q in _replay(journal).items():
                found[qid] = (w, q)
        return found

    def other_workers_envelopes(self) -> list[Envelope]:
        """Unfinished messages in the journals of the other workers (read from disk:
        ``GET /queue`` and ``/status`` of worker 0 show the whole site)."""
        found: list[Envelope] = []
        for w in self.workers_on_disk():
            if w != self.worker:
                journal = Journal(self.root / f"journal{_worker_suffix(w)}")
                found += [q.envelope for q in _replay(journal).values() if not q.envelope.finished]
        return found

    def other_workers_unfinished(self) -> set[str]:
        """Queue ids of the unfinished messages in the other workers' journals (``GET
        /status`` counts them; no envelope is kept, so the count costs no memory)."""
        found: set[str] = set()
        for w in self.workers_on_disk():
            if w != self.worker:
                journal = Journal(self.root / f"journal{_worker_suffix(w)}")
                done = _replay_as(journal, lambda _, env: env.finished)
                found.update(qid for qid, finished in done.items() if not finished)
        return found

    # ------------------------------------------------------------ ownership

    def acquire(self, wait: float = 0.0) -> None:
        """Become the spool's only writer (the running site); SpoolLocked if taken
        (after waiting up to ``wait`` seconds for a previous owner to finish)."""
        if self._lock_fd is not None:
            return
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise SpoolLocked(f"{self.root} is in use by a running site") from None
                time.sleep(0.1)
        self._lock_fd = fd

    def owned_by_another_process(self) -> bool:
        try:
            self.acquire()
        except SpoolLocked:
            return True
        self.release()
        return False

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        self.committer.stop()
        self.journal.close()
        self.release()

    # ------------------------------------------------------------ the running site

    def recover(self) -> list[Envelope]:
        """At start-up (as the owner): clear tmp/, replay the journal, drop segments
        with nothing queued, and return the unfinished messages."""
        self.acquire(wait=self.lock_wait)
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)
        queued = _replay(self.journal)
        self.journal.adopt_existing()  # nothing is appended to an old segment again
        finished = [qid for qid, q in queued.items() if q.envelope.finished]
        if finished:
            # every recipient done but no DONE record (a crash between the two, or a copy
            # an older compaction wrote after the DONE): finished now, or its segment stays
            self.committer.commit_sync([Append(DONE, qid.encode()) for qid in finished])
            self.journal.close_segment()  # that DONE's segment is dropped as soon as it can be
        self._index = {qid: q.location for qid, q in queued.items() if not q.envelope.finished}
        self._live = Counter(loc.segment for loc in self._index.values())
        envelopes = [q.envelope for q in queued.values() if not q.envelope.finished]
        self._drop_empty_segments(sync=True)
        return envelopes

    async def _commit_enqueue(self, ops: Sequence[Op]) -> list[Location]:
        """Commit ops holding an ENQUEUE: the segments it may land in stay protected
        from deletion until its location is known here."""
        floor = self.journal.first_writable()
        self._inflight[floor] += 1
        try:
            return await self.committer.commit(ops)
        finally:
            self._inflight[floor] -= 1
            if self._inflight[floor] <= 0:
                del self._inflight[floor]

    async def enqueue(self, envelope: Envelope, message: bytes) -> None:
        """Durably add a message; returns only when it is safe to answer 250."""
        (loc,) = await self._commit_enqueue([Append(ENQUEUE, queue_file_parts(envelope, message))])
        self._index[envelope.queue_id] = loc
        self._live[loc.segment] += 1

    async def enqueue_many(self, items: Sequence[tuple[Envelope, bytes]]) -> None:
        """Durably add several messages in one commit (one write, one flush): a message
        and its journal copy.  Records are appended in the order given; a torn tail
        after a crash loses only the last ones, so put the one that must not be
        missing without the others first."""
        locations = await self._commit_enqueue([Append(ENQUEUE, queue_file_bytes(e, m)) for e, m in items])
        for (envelope, _), loc in zip(items, locations, strict=True):
            self._index[envelope.queue_id] = loc
            self._live[loc.segment] += 1

    async def save_state(self, envelope: Envelope) -> None:
        await self.committer.commit([Append(STATE, envelope.to_json())])

    async def remove(self, queue_id: str) -> None:
        self._leaving.add(queue_id)
        try:
            await self.committer.commit([Append(DONE, queue_id.encode())], durable=False)
            self._forget(queue_id)
        finally:
            self._leaving.discard(queue_id)
        if not self._index and not self._inflight and self.journal.size >= RECLAIM_AT:
            # the queue is empty: give the open segment's space back too
            await self.committer.commit([CloseSegment()], durable=False)
        drop = self._droppable()
        if drop:
            await self.committer.commit([DropSegments(tuple(drop))], durable=False)

    def finish(self, queue_id: str, on_error: Callable[[BaseException], None] | None = None) -> None:
        """``remove`` for a message whose every recipient is done (the queue manager),
        without waiting: its DONE record, never flushed on its own anyway, is handed to
        the writer, which appends it with the next round (a crash that loses it
        delivers the message again, as before).  The message leaves the index at once,
        so a compaction copying it meanwhile cancels its copy (``compact``); segments
        with nothing queued left are dropped after the DONE, in the writer's order.
        ``on_error`` (on the loop): the DONE could not be written."""
        self.committer.post([Append(DONE, queue_id.encode())], on_error=on_error)
        self._forget(queue_id)
        if not self._index and not self._inflight and self.journal.size >= RECLAIM_AT:
            self.committer.post([CloseSegment()])  # the queue is empty: give the open segment's space back too
        drop = self._droppable()
        if drop:
            self.committer.post([DropSegments(tuple(drop))])

    def _forget(self, queue_id: str) -> None:
        loc = self._index.pop(queue_id, None)
        if loc is not None:
            self._live[loc.segment] -= 1
            if self._live[loc.segment] <= 0:
                del self._live[loc.segment]

    def _droppable(self) -> list[int]:
        """Oldest segments with nothing queued (deleted in order, so a DONE record is
        never lost while the ENQUEUE it cancels survives)."""
        limit = min([self.journal.first_writable(), *self._inflight])
        drop = []
        for n in self.journal.segments():
            if n >= limit or self._live.get(n):
                break
            drop.append(n)
        return drop

    def _drop_empty_segments(self, *, sync: bool) -> None:
        drop = self._droppable()
        if drop:
            self.journal.remove_segments(drop)

    def _live_bytes(self, segment: int) -> int:
        return sum(loc.length for loc in self._index.values() if loc.segment == segment)

    def segments_to_compact(self, keep: int = 2) -> list[str]:
        """Queue ids pinning the oldest closed segment when more than ``keep`` segments
        exist, or when less than a quarter of that segment is still queued."""
        segments = [n for n in self.journal.segments() if n < self.journal.first_writable()]
        if not segments:
            return []
        oldest = segments[0]
        if len(self.journal.segments()) <= keep:
            try:
                size = (self.journal.directory / segment_name(oldest)).stat().st_size
            except FileNotFoundError:
                return []
            if size < RECLAIM_AT or self._live_bytes(oldest) * 4 > size:
                return []
        return [qid for qid, loc in self._index.items() if loc.segment == oldest]

    async def compact(self, envelopes: dict[str, Envelope]) -> int:
        """Copy long-queued messages of the oldest segment forward; returns how many.
        An open segment that is large and mostly finished is closed first, so that
        a few messages retrying for days never pin a whole segment's space."""
        moved = 0
        open_size = self.journal.size
        if open_size >= RECLAIM_AT and self._live_bytes(self.journal.current_segment) * 4 < open_size:
            await self.committer.commit([CloseSegment()], durable=False)
        for qid in self.segments_to_compact():
            env = envelopes.get(qid)
            loc = self._index.get(qid)
            if env is None or loc is None or env.finished or qid in self._leaving:
                continue  # a finished message is about to be removed: never copy it
            payload = await asyncio.to_thread(self.journal.read, loc)
            (new_loc, _) = await self._commit_enqueue([Append(ENQUEUE, payload), Append(STATE, env.to_json())])
            if qid in self._leaving or self._index.get(qid) != loc:
                # removed while the copy was written (its DONE may be before the copy in
                # the journal): cancel the copy too, or it is queued again at restart
                await self.committer.commit([Append(DONE, qid.encode())], durable=False)
                continue
            self._forget(qid)
            self._index[qid] = new_loc
            self._live[new_loc.segment] += 1
            moved += 1
        drop = self._droppable()
        if drop:
            await self.committer.commit([DropSegments(tuple(drop))], durable=False)
        return moved

    def read_message(self, queue_id: str) -> bytes:
        check_queue_id(queue_id)
        loc = self._index.get(queue_id)
        journal = self.journal
        if loc is None:
            found = self._replay_all().get(queue_id)
            if found is None:
                raise FileNotFoundError(f"{queue_id} is not in the queue")
            worker, q = found
            loc = q.location
            journal = self._peer(worker).journal
        data = journal.read(loc)
        _, start = parse_queue_file(data)
        return data[start:]

    async def adopt_orphans(self, workers: int) -> list[Envelope]:
        """Worker 0 at start: take over the journals of workers that no longer run
        (``--workers`` was lowered): their messages move into this journal."""
        adopted: list[Envelope] = []
        for w in self.workers_on_disk():
            if w < workers or w == self.worker:
                continue
            orphan = Spool(self.data_dir, worker=w)
            try:
                envelopes = await asyncio.to_thread(orphan.recover)
            except SpoolLocked:
                continue  # still running (an older process): leave it
            for env in envelopes:
                message = await asyncio.to_thread(orphan.read_message, env.queue_id)
                await self.enqueue(env, message)
                adopted.append(env)
            orphan.close()
            await asyncio.to_thread(shutil.rmtree, orphan.journal.directory, True)
            await asyncio.to_thread(shutil.rmtree, orphan.control, True)
        return adopted

    # ------------------------------------------------------------ operator requests

    def take_control_requests(self) -> list[tuple[str, str]]:
        """(action, queue id or "*") requested by ``imsrelay queue`` beside us."""
        requests = []
        for p in sorted(self.control.iterdir()):
            action, _, rest = p.name.partition(".")
            qid = rest.split(".")[0] if rest else "*"
            if qid != "*" and not (qid.isalnum() and qid.isascii()):
                p.unlink(missing_ok=True)
                continue
            if p.name == "retry-all":
                action, qid = "retry", "*"
            if action in ("retry", "delete"):
                requests.append((action, qid))
            p.unlink(missing_ok=True)
        return requests

    def _request(self, action: str, queue_id: str) -> None:
        if queue_id != "*":
            check_queue_id(queue_id)
        name = f"{action}.{queue_id}.{secrets.token_hex(3)}"
        tmp = self.tmp / name
        tmp.write_text(f"{action} {queue_id}\n")
        os.replace(tmp, self.control / name)

    # ------------------------------------------------------------ offline tools

    def load(self, queue_id: str) -> Envelope | None:
        check_queue_id(queue_id)
        found = self._replay_all().get(queue_id)
        return found[1].envelope if found else None

    def exists(self, queue_id: str) -> bool:
        check_queue_id(queue_id)
        if queue_id in self._index:
            return True
        return queue_id in self._replay_all()

    def queue_ids(self) -> list[str]:
        return sorted(self._replay_all())

    def envelopes(self) -> Iterable[Envelope]:
        found = self._replay_all()
        return [found[qid][1].envelope for qid in sorted(found)]

    def remove_sync(self, queue_id: str) -> bool:
        """Delete a message: directly when its worker is stopped, else ask it."""
        check_queue_id(queue_id)
        found = self._replay_all().get(queue_id)
        if found is None:
            return False
        self._peer(found[0])._change_offline(queue_id, Append(DONE, queue_id.encode()), "delete")
        return True

    def save_state_sync(self, envelope: Envelope) -> None:
        """Record new progress (e.g. "retry now"): directly, or via the running worker."""
        found = self._replay_all().get(check_queue_id(envelope.queue_id))
        owner = self._peer(found[0]) if found else self
        owner._change_offline(envelope.queue_id, Append(STATE, envelope.to_json()), "retry")

    def _change_offline(self, queue_id: str, record: Append, request: str) -> None:
        if self.owned_by_another_process():
            self._request(request, queue_id)
            return
        self.acquire()
        try:
            self.committer.commit_sync([record])
        finally:
            self.journal.close()
            self.release()
