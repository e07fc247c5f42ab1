"""Group commit: many requests made durable with one write and one flush.

One writer thread takes every request waiting at that moment: all journal records
of the round go out in one write and one flush (``imsrelay.durable.journal``), then
the round's files are written, flushed and renamed together with one fsync of each
directory they touched (``imsrelay.durable.file_group``).  The spool (queue files,
``imsrelay.queue.spool``) and the Maildir transport (``imsrelay.transport.maildir``)
share one committer per site, handed to both by the composition root, so a local
delivery's file and the queue's state record can ride the same round.
"""

from __future__ import annotations

import asyncio
import os
import queue as stdqueue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imsrelay.durable.file_group import FileGroup
from imsrelay.durable.journal import Journal, Location


@dataclass(frozen=True)
class Write:
    """Create or replace ``path`` with ``data`` atomically (via a temporary file in
    ``tmp_dir``, default the spool's tmp/, on the same file system).  Skipped when one
    of ``unless_exists`` is already there (idempotent Maildir delivery)."""

    path: Path
    data: bytes | tuple[bytes, ...]  # in parts: written back to back (a delivered file's header, the message)
    tmp_dir: Path | None = None
    unless_exists: tuple[Path, ...] = ()
    owner: tuple[int, int] | None = None  # (uid, gid) the file is given (a Maildir read by another user)


@dataclass(frozen=True)
class Unlink:
    path: Path


@dataclass(frozen=True)
class Append:
    """A journal record; its payload in one piece or in parts written back to back."""

    type: int
    payload: bytes | tuple[bytes, ...]


@dataclass(frozen=True)
class DropSegments:
    numbers: tuple[int, ...]


@dataclass(frozen=True)
class CloseSegment:
    """Close the journal's open segment (the queue is empty: its space can go)."""


Op = Write | Unlink | Append | DropSegments | CloseSegment


class GroupCommitter:
    """One writer thread; each round makes every waiting request durable together:
    all journal records of the round in one write + one flush, then the round's
    files — all written, then all flushed, then renamed into place — and one fsync
    of each directory they touched (``imsrelay.durable.file_group``).  A request's Unlink
    and segment ops run in its order; its files appear at the end of the round."""

    def __init__(self, tmp_dir: Path, journal: Journal | None = None, *, max_batch: int = 512) -> None:
        self.tmp_dir = tmp_dir
        self.journal = journal
        self.max_batch = max_batch
        self._requests: stdqueue.SimpleQueue[Any] = stdqueue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.rounds = 0
        self.requests = 0
        self.on_flush: Any = None  # called (in the writer thread) with the seconds each journal flush took

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._requests.put(None)
            self._thread.join()
            self._thread = None

    async def commit(self, ops: Sequence[Op], *, durable: bool = True) -> list[Location]:
        """Apply ``ops``; returns the journal locations of its Append ops."""
        self.start()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Location]] = loop.create_future()
        self._requests.put((ops, durable, loop, fut))
        return await fut

    def post(self, ops: Sequence[Op], *, durable: bool = False,
             on_error: Callable[[BaseException], None] | None = None) -> None:
        """Apply ``ops`` in their turn (after every request handed over before them, as
        ``commit`` would) without waiting for them: no future, no wake-up of the
        caller.  For records nothing waits on (a DONE, a segment drop); ``on_error`` is
        called on the caller's loop if they fail."""
        self.start()
        self._requests.put((ops, durable, asyncio.get_running_loop() if on_error else None, on_error))

    def commit_sync(self, ops: Sequence[Op]) -> list[Location]:
        """For offline tools (no loop): the same work on the calling thread."""
        result, error = _apply_batch([(ops, True)], self.tmp_dir, self.journal)[0]
        if error is not None:
            raise error
        return result

    def _run(self) -> None:
        while True:
            first = self._requests.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._requests.get_nowait()
                except stdqueue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            started = time.perf_counter()
            results = _apply_batch([(ops, durable) for ops, durable, _, _ in batch], self.tmp_dir, self.journal)
            if self.on_flush is not None:
                try:
                    self.on_flush(time.perf_counter() - started)
                except Exception:  # a metrics problem never stops the writer
                    pass
            self.rounds += 1
            self.requests += len(batch)
            # one wake-up of each waiting loop per round, not one per request
            settled: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[list[Location]], Any]]] = {}
            for (_, _, loop, fut), outcome in zip(batch, results, strict=True):
                if isinstance(fut, asyncio.Future):
                    settled.setdefault(loop, []).append((fut, outcome))
                elif fut is not None and outcome[1] is not None:  # a posted request's error handler
                    loop.call_soon_threadsafe(fut, outcome[1])
            for loop, futures in settled.items():
                loop.call_soon_threadsafe(_settle_all, futures)
            if stop:
                return


def _settle_all(futures: list[tuple[asyncio.Future[list[Location]], tuple[list[Location], BaseException | None]]],
                ) -> None:
    for fut, (result, error) in futures:
        if fut.cancelled():
            continue
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)


def _apply_batch(batch: list[tuple[Sequence[Op], bool]], tmp_dir: Path,
                 journal: Journal | None) -> list[tuple[list[Location], BaseException | None]]:
    results: list[tuple[list[Location], BaseException | None]] = [([], None) for _ in batch]
    # 1. every journal record of the round: one write, one flush
    appends: list[tuple[int, Append]] = []
    others = False  # any op besides journal records (most rounds have none)
    durable = False
    for i, (ops, request_durable) in enumerate(batch):
        for op in ops:
            if isinstance(op, Append):
                appends.append((i, op))
                durable = durable or request_durable
            else:
                others = True
    if appends:
        try:
            assert journal is not None, "this spool has no journal"
            locations = journal.append([(op.type, op.payload) for _, op in appends], durable=durable)
            for (i, _), loc in zip(appends, locations, strict=True):
                results[i][0].append(loc)
        except OSError as exc:
            for i in {i for i, _ in appends}:
                results[i] = ([], exc)
    if not others:
        return results
    # 2. the other ops; the round's files are written, then made durable together
    #    (imsrelay.durable.file_group): one file's data never waits for the next file's write
    group = FileGroup(tmp_dir)
    for i, (ops, durable) in enumerate(batch):
        if results[i][1] is not None:
            continue
        try:
            for op in ops:
                if isinstance(op, Write):
                    group.stage(i, op.path, op.data, tmp_dir=op.tmp_dir, durable=durable,
                                unless_exists=op.unless_exists, owner=op.owner)
                elif isinstance(op, Unlink):
                    try:
                        os.unlink(op.path)
                    except FileNotFoundError:
                        pass
                    if durable:
                        group.touched(i, op.path.parent)
                elif isinstance(op, DropSegments) and journal is not None:
                    journal.remove_segments(op.numbers)
                elif isinstance(op, CloseSegment) and journal is not None:
                    journal.close_segment()
        except OSError as exc:
            results[i] = ([], exc)
            group.discard(i)
    for i, error in group.finish().items():
        if results[i][1] is None:
            results[i] = ([], error)
    return results


# ----------------------------------------------------------------- the spool
