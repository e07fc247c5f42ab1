"""The durable queue on disk (the spool) and its group-commit writer.

Layout under ``<data>/queue/``::

    active/ID.q       the queue file: one line ``IMSQ1 <n>``, the envelope as
                      accepted (n bytes of JSON: sender, recipients, …), then the
                      message bytes exactly as received; never changed afterwards
    active/ID.state   per-recipient progress (rewritten as delivery advances)
    tmp/              files being written; anything here after a crash is garbage
    retry-now         touched by ``imsrelay queue retry`` so a running site rescans

Durability (DESIGN.md invariant 1): ``enqueue`` writes the queue file to ``tmp/``,
fsyncs it, renames it into ``active/`` and fsyncs the directory; only then does it
return, and only then does the SMTP server answer ``250``.  One file and one fsync
per message, as in Postfix.  A message is in the queue exactly when its ``.q`` file
is in ``active/`` and is complete (its envelope's ``size`` matches); anything else
was never acknowledged and is removed at recovery.  If a ``.state`` is unreadable,
the envelope in the ``.q`` file is used: every unfinished recipient is tried again
(at worst a duplicate, never a loss).  Removing a finished message is not fsynced:
if a crash undoes the removal, the message is delivered again (Maildir delivery
recognises its own earlier file).

All file work runs on one writer thread that takes every request waiting at the
moment and makes them durable together (group commit): many sessions share one
round of directory fsyncs, and the event loop never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import queue as stdqueue
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PENDING = "pending"
DELIVERED = "delivered"
BOUNCED = "bounced"  # failed, NDR queued to the sender
FAILED = "failed"  # failed, no NDR possible (null sender) or suppressed: logged
TERMINAL = frozenset({DELIVERED, BOUNCED, FAILED})


_ID_PREFIX = secrets.token_hex(2).upper()
_ID_COUNTER = itertools.count(secrets.randbelow(1 << 16))


def new_queue_id() -> str:
    """Sortable and unique: 13 hex digits of microseconds, 4 of this process's random
    prefix, 4 of a per-process counter (no system call per id)."""
    return f"{int(time.time() * 1_000_000):013X}{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFF:04X}"


@dataclass
class RecipientState:
    address: str
    original: str | None = None
    state: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    first_failure: float | None = None
    status: str | None = None  # RFC 3463 code of the last outcome
    diagnostic: str | None = None  # last reply / reason
    remote: str | None = None  # the host that gave the last answer
    delay_notified: bool = False
    route: str | None = None


@dataclass
class Envelope:
    queue_id: str
    sender: str  # "" = null sender <>
    recipients: list[RecipientState]
    received_at: float
    client: str = ""
    helo: str = ""
    smtputf8: bool = False
    body_8bit: bool = False
    size: int = 0
    origin: str = "smtp"  # smtp | ndr | dirsync | local
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.state not in TERMINAL]

    @property
    def finished(self) -> bool:
        return not self.pending

    def next_due(self) -> float | None:
        pending = self.pending
        return min(r.next_attempt for r in pending) if pending else None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        d = json.loads(raw)
        d["recipients"] = [RecipientState(**r) for r in d["recipients"]]
        return cls(**d)


# ----------------------------------------------------------------- group commit


@dataclass(frozen=True)
class Write:
    """Create or replace ``path`` with ``data`` atomically (via a temporary file in
    ``tmp_dir``, default the spool's tmp/, on the same file system).  Skipped when one
    of ``unless_exists`` is already there (idempotent Maildir delivery)."""

    path: Path
    data: bytes
    tmp_dir: Path | None = None
    unless_exists: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Unlink:
    path: Path


class GroupCommitter:
    """One writer thread; each round makes every waiting request durable together."""

    def __init__(self, tmp_dir: Path, *, max_batch: int = 256) -> None:
        self.tmp_dir = tmp_dir
        self.max_batch = max_batch
        self._requests: stdqueue.SimpleQueue[Any] = stdqueue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.rounds = 0
        self.requests = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._requests.put(None)
            self._thread.join()
            self._thread = None

    async def commit(self, ops: Sequence[Write | Unlink], *, durable: bool = True) -> None:
        self.start()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._requests.put((ops, durable, loop, fut))
        await fut

    def commit_sync(self, ops: Sequence[Write | Unlink]) -> None:
        """For offline tools (no loop): do the same work on the calling thread."""
        _apply_batch([(ops, True)], self.tmp_dir)

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
            results = _apply_batch([(ops, durable) for ops, durable, _, _ in batch], self.tmp_dir)
            self.rounds += 1
            self.requests += len(batch)
            for (_, _, loop, fut), error in zip(batch, results, strict=True):
                loop.call_soon_threadsafe(_settle, fut, error)
            if stop:
                return


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def _apply_batch(batch: list[tuple[Sequence[Write | Unlink], bool]], tmp_dir: Path) -> list[BaseException | None]:
    """Write every file to tmp (fsynced), rename into place, then fsync each touched
    directory once. Returns one error (or None) per request."""
    results: list[BaseException | None] = []
    dirs: set[Path] = set()
    for ops, durable in batch:
        try:
            for op in ops:
                if isinstance(op, Write):
                    if op.unless_exists and any(p.exists() for p in op.unless_exists):
                        continue
                    tmp = (op.tmp_dir or tmp_dir) / f"{op.path.name}.{secrets.token_hex(4)}"
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        view = memoryview(op.data)
                        while view:
                            view = view[os.write(fd, view):]
                        if durable:
                            os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.replace(tmp, op.path)
                else:
                    try:
                        os.unlink(op.path)
                    except FileNotFoundError:
                        pass
                if durable:
                    dirs.add(op.path.parent)
            results.append(None)
        except OSError as exc:
            results.append(exc)
    for d in dirs:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return results


# ----------------------------------------------------------------- the spool


_MAGIC = b"IMSQ1 "


def queue_file_bytes(envelope: Envelope, message: bytes) -> bytes:
    envelope.size = len(message)
    header = envelope.to_json()
    return _MAGIC + str(len(header)).encode() + b"\n" + header + message


def parse_queue_file(data: bytes) -> tuple[Envelope, int]:
    """(envelope, offset of the message bytes); ValueError when incomplete."""
    if not data.startswith(_MAGIC):
        raise ValueError("not a queue file")
    nl = data.index(b"\n")
    length = int(data[len(_MAGIC):nl])
    start = nl + 1 + length
    envelope = Envelope.from_json(data[nl + 1:start])
    if len(data) - start != envelope.size:
        raise ValueError("queue file is incomplete")
    return envelope, start


class Spool:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "queue"
        self.active = self.root / "active"
        self.tmp = self.root / "tmp"
        self.active.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.committer = GroupCommitter(self.tmp)
        self.retry_flag = self.root / "retry-now"

    def close(self) -> None:
        self.committer.stop()

    def _paths(self, queue_id: str) -> tuple[Path, Path]:
        if not queue_id.isalnum():
            raise ValueError(f"{queue_id!r} is not a queue id")
        base = self.active / queue_id
        return base.with_suffix(".q"), base.with_suffix(".state")

    async def enqueue(self, envelope: Envelope, message: bytes) -> None:
        """Durably add a message; returns only when it is safe to answer 250."""
        qfile, _ = self._paths(envelope.queue_id)
        await self.committer.commit([Write(qfile, queue_file_bytes(envelope, message))])

    async def save_state(self, envelope: Envelope) -> None:
        _, state = self._paths(envelope.queue_id)
        await self.committer.commit([Write(state, envelope.to_json())])

    async def remove(self, queue_id: str) -> None:
        qfile, state = self._paths(queue_id)
        await self.committer.commit([Unlink(qfile), Unlink(state)], durable=False)

    def remove_sync(self, queue_id: str) -> bool:
        qfile, state = self._paths(queue_id)
        if not qfile.exists():
            return False
        self.committer.commit_sync([Unlink(qfile), Unlink(state)])
        return True

    def save_state_sync(self, envelope: Envelope) -> None:
        _, state = self._paths(envelope.queue_id)
        self.committer.commit_sync([Write(state, envelope.to_json())])

    def exists(self, queue_id: str) -> bool:
        return self._paths(queue_id)[0].exists()

    def read_message(self, queue_id: str) -> bytes:
        data = self._paths(queue_id)[0].read_bytes()
        _, start = parse_queue_file(data)
        return data[start:]

    def load(self, queue_id: str) -> Envelope | None:
        """The latest envelope of a queued message, or None if it is not (fully) queued."""
        qfile, state = self._paths(queue_id)
        try:
            original, _ = parse_queue_file(qfile.read_bytes())
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            return None
        try:
            latest = Envelope.from_json(state.read_bytes())
            if latest.queue_id == original.queue_id:
                return latest
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            pass
        return original

    def queue_ids(self) -> list[str]:
        return sorted(p.stem for p in self.active.glob("*.q"))

    def envelopes(self) -> Iterable[Envelope]:
        for qid in self.queue_ids():
            env = self.load(qid)
            if env is not None:
                yield env

    def recover(self) -> list[Envelope]:
        """At start-up: clear tmp/, drop never-acknowledged leftovers, return the queue."""
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)
        envelopes = []
        ids = {p.stem for p in self.active.iterdir()}
        for qid in sorted(ids):
            env = self.load(qid) if qid.isalnum() else None
            if env is None:
                for p in self.active.glob(f"{qid}.*"):
                    p.unlink(missing_ok=True)
                continue
            if env.finished:
                self.remove_sync(qid)
                continue
            envelopes.append(env)
        return envelopes

    def request_retry(self) -> None:
        self.retry_flag.touch()

    def take_retry_request(self) -> bool:
        try:
            self.retry_flag.unlink()
            return True
        except FileNotFoundError:
            return False
