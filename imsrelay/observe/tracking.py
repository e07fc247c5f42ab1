"""Message tracking, after Exchange 5.5's Message Tracking Center.

Every site records what happened to each message it handled — received (from
which client or peer, with its Message-ID, queue id and size), routed (the
router's decision and why), transferred (next hop and the queue id in the peer's
``250`` reply), delivered (to a mailbox, or to the directory service for
replication mail), deferred (with the reason and the next attempt), failed,
expired, NDR sent, deleted by an operator — in ``<data>/tracking.sqlite3``, kept
``tracking.days`` days and at most ``tracking.max_bytes`` (the oldest events go
first); the file shrinks after deletions (SQLite's incremental vacuum, the WAL
truncated).  It shares the queue's disk, so it never takes the queue's room:
below ``min_free`` free bytes (more than the queue needs to accept mail) events are
not written and old ones are deleted; ``paused`` and ``dropped`` say so (metrics,
``/status``), and the change is logged.

Recording never blocks the event loop: ``record`` puts the event on a queue that
one writer thread drains in batches (and purges old events from).  Queries run
in a thread on their own connection.

``follow`` (pure) joins the events of several sites into one message's story:
the hop chain from site to site and, for each recipient, where it ended or
stopped and why.  ``imsrelay track``, ``GET /api/v1/tracking`` and the lab
endpoint share it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import queue
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RECEIVED = "received"
ROUTED = "routed"
TRANSFERRED = "transferred"
DELIVERED = "delivered"
DEFERRED = "deferred"
FAILED = "failed"
EXPIRED = "expired"
NDR_SENT = "ndr_sent"
DELAY_NOTICE_SENT = "delay_notice_sent"
DSN_SENT = "dsn_sent"  # a success report (RFC 3461 NOTIFY=SUCCESS): delivered, or relayed to a host without DSN
DELETED = "deleted"
JOURNALED = "journaled"  # a journal copy was queued with the message (Message Journaling, Q239427)
DISCARDED = "discarded"  # not sent, without an NDR: the Internet Mail tab disables it for the domain

INCREMENTAL = 2  # PRAGMA auto_vacuum
BOUNDS_EVERY = 5.0  # seconds between looks at the database's size and the free disk

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    site TEXT NOT NULL,
    event TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    message_id TEXT,
    sender TEXT,
    recipient TEXT,
    related TEXT,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_time ON events(time);
CREATE INDEX IF NOT EXISTS events_queue ON events(queue_id);
CREATE INDEX IF NOT EXISTS events_msgid ON events(message_id);
CREATE INDEX IF NOT EXISTS events_related ON events(related);
"""

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_QUEUED_AS = re.compile(r"queued as ([A-Za-z0-9._-]+)", re.IGNORECASE)
_HEADER_SCAN = 64 * 1024
BATCH_WINDOW = 0.05  # seconds the writer gathers events before one commit
MAX_BATCH = 1000  # events in one commit at most
_DETAIL_JSON = json.JSONEncoder(default=str)  # json.dumps(detail, default=str), without a new encoder per event


def message_id_of(message: bytes) -> str | None:
    """The Message-ID header of a message (looked for in its first 64 KiB of header)."""
    end = message.find(b"\r\n\r\n", 0, _HEADER_SCAN)  # (no copy of the header: search within bounds)
    if end < 0:
        end = message.find(b"\n\n", 0, _HEADER_SCAN)
    endpos = end + 1 if end >= 0 else _HEADER_SCAN
    # Where the first Message-ID line starts, found in a lower-cased copy of the header
    # (the regex's case-insensitive search tried every line of it: ~5x slower); the
    # regex then reads the value from there, exactly as its search would have.
    head = message[:endpos].lower()
    if head.startswith(b"message-id:"):
        start = 0
    else:
        start = head.find(b"\nmessage-id:") + 1
        if not start:
            return None
    m = _MESSAGE_ID.match(message, start, endpos)
    if not m:
        return None
    value = b"".join(m.group(1).split()).decode("utf-8", "replace")  # (bytes.split(): regex's \s, ASCII)
    return value[:998] or None


INSERT_CHUNK = 100  # rows per INSERT statement (9 parameters each: within SQLite's oldest limit of 999)


@functools.lru_cache(maxsize=16)
def _insert_sql(rows: int) -> str:
    return ("INSERT INTO events (time, site, event, queue_id, message_id, sender, recipient, related, detail) "
            "VALUES " + ",".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * rows))


def insert_rows(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert ``rows`` (in order: the same ids as ``executemany`` gives them) with a few
    multi-row INSERTs, chunks of ``INSERT_CHUNK`` and the rest in chunks of powers of
    two (a handful of statement texts).  ``executemany`` ran one statement per row, and
    the sqlite3 module lets go of the GIL around every statement: one tracking row
    was one hand-over of the GIL between the writer and the event loop, now a batch
    of events is a few."""
    done, total = 0, len(rows)
    while done < total:
        left = total - done
        size = INSERT_CHUNK if left >= INSERT_CHUNK else 1 << (left.bit_length() - 1)
        db.execute(_insert_sql(size), [value for row in rows[done:done + size] for value in row])
        done += size


def remote_queue_id(reply: str) -> str | None:
    """The queue id a peer gave in its ``250`` reply (``250 2.0.0 Ok: queued as X``)."""
    m = _QUEUED_AS.search(reply or "")
    return m.group(1).rstrip(".") if m else None


def normalise_message_id(value: str) -> str:
    value = value.strip()
    if value and not value.startswith("<"):
        value = f"<{value}>"
    return value


@dataclass(frozen=True)
class TrackingEvent:
    time: float
    site: str
    event: str
    queue_id: str
    message_id: str | None = None
    sender: str | None = None
    recipient: str | None = None
    related: str | None = None  # an NDR's original queue id
    detail: dict[str, Any] = field(default_factory=dict)
    server: str | None = None  # the server of a site of several servers whose log holds it (None: one server)

    @property
    def place(self) -> str:
        """Where it happened: the site, or ``Site/Server`` on a site of several servers."""
        return f"{self.site}/{self.server}" if self.server else self.site

    def as_dict(self) -> dict[str, Any]:
        d = {"time": self.time, "time_iso": iso(self.time), "site": self.site, "event": self.event,
             "queue_id": self.queue_id, "message_id": self.message_id, "sender": self.sender,
             "recipient": self.recipient, "related": self.related, "detail": self.detail}
        if self.server:
            d["server"] = self.server
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrackingEvent:
        return cls(float(d["time"]), str(d["site"]), str(d["event"]), str(d["queue_id"]), d.get("message_id"),
                   d.get("sender"), d.get("recipient"), d.get("related"), dict(d.get("detail") or {}),
                   str(d["server"]) if d.get("server") else None)


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class TrackingQuery:
    """Which messages to find: every given criterion must hold (AND)."""

    message_id: str | None = None
    queue_id: str | None = None
    sender: str | None = None
    recipient: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 200  # messages (queue ids) at one site

    @property
    def empty(self) -> bool:
        return not (self.message_id or self.queue_id or self.sender or self.recipient or self.since or self.until)


class TrackingLog:
    """One site's tracking events in SQLite, written by one thread."""

    def __init__(self, path: Path, site: str, *, days: float = 7.0, enabled: bool = True,
                 clock: Callable[[], float] = time.time, max_bytes: int = 0,
                 free_space: Callable[[], int] | None = None, min_free: int = 0, log: Any = None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes  # 0: no size limit
        self.free_space = free_space  # bytes free on its file system (None: not watched)
        self.min_free = min_free
        self.log = log
        self.paused: str | None = None  # why events are not written now ("disk")
        self.dropped = 0  # events not written while paused
        self.size = 0  # bytes of the database (with its WAL) when last looked at
        self.site = site
        self.days = days
        self.enabled = enabled
        self.clock = clock
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._urgent = threading.Event()  # a flush or stop waits: the writer ends its gathering window now
        self._thread: threading.Thread | None = None
        self._known: OrderedDict[str, tuple[str | None, str | None]] = OrderedDict()  # queue id → (msgid, sender)
        self._listeners: list[Callable[[TrackingEvent], None]] = []

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        await asyncio.to_thread(self._create)
        self._thread = threading.Thread(target=self._run, name=f"tracking-{self.site}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            self._urgent.set()
            await asyncio.to_thread(thread.join, 30.0)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        try:
            if db.execute("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL:
                db.execute(f"PRAGMA auto_vacuum={INCREMENTAL}")  # deleted pages can go back to the disk
                db.execute("VACUUM")  # (an existing file switches mode only by a VACUUM)
            db.executescript(_SCHEMA)
            self._purge(db)
            self._keep_bounds(db)
        finally:
            db.close()

    def _purge(self, db: sqlite3.Connection) -> None:
        with db:
            gone = db.execute("DELETE FROM events WHERE time < ?", (self.clock() - self.days * 86400.0,)).rowcount
        if gone:
            self._shrink(db)

    def _shrink(self, db: sqlite3.Connection) -> None:
        """Give the pages of deleted events back to the file system."""
        db.executescript("PRAGMA incremental_vacuum;")  # (sqlite3_exec: every step; execute() frees one page)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += Path(f"{self.path}{suffix}").stat().st_size
            except FileNotFoundError:
                pass
        return total

    def _keep_bounds(self, db: sqlite3.Connection) -> None:
        """Within ``max_bytes``, and off the queue's room: the oldest events go first."""
        low_disk = self.free_space is not None and self.free_space() < self.min_free
        paused = "disk" if low_disk else None
        if paused != self.paused:
            if self.log is not None:
                if paused:
                    self.log.warning("tracking.paused", reason="the disk is nearly full: the queue needs the room",
                                     min_free=self.min_free)
                else:
                    self.log.info("tracking.resumed", dropped=self.dropped)
            self.paused = paused
        self.size = self._bytes()
        over = self.max_bytes and self.size > self.max_bytes
        if not over and not low_disk:
            return
        rows = db.execute("SELECT count(*) FROM events").fetchone()[0]
        keep = int(rows * 0.8 * self.max_bytes / self.size) if over else rows // 2  # low disk: half goes
        with db:
            db.execute("DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?)",
                       (max(0, rows - keep),))
        self._shrink(db)
        self.size = self._bytes()
        if self.log is not None:
            self.log.info("tracking.trimmed", deleted=rows - keep, bytes=self.size, max_bytes=self.max_bytes,
                          reason="low disk" if low_disk else "max_bytes")

    # ------------------------------------------------------------ recording

    def status(self) -> dict[str, Any]:
        """Its bounds and state (``/status``, metrics)."""
        return {"enabled": self.enabled, "bytes": self.size, "max_bytes": self.max_bytes, "paused": self.paused,
                "dropped": self.dropped, "min_free": self.min_free}

    def on_event(self, listener: Callable[[TrackingEvent], None]) -> None:
        """Call ``listener`` (on the loop) with every event recorded from now on."""
        self._listeners.append(listener)

    def record(self, event: str, queue_id: str, *, message_id: str | None = None, sender: str | None = None,
               recipient: str | None = None, related: str | None = None, **detail: Any) -> None:
        """Record one event (never blocks: the writer thread stores it).  On the loop
        only a tuple is built; the writer makes the row (and the detail's JSON)."""
        known = self._known
        if event == RECEIVED:
            known[queue_id] = (message_id, sender)
            while len(known) > 10_000:
                known.popitem(last=False)
            resolved = True
        else:
            found = known.get(queue_id)
            resolved = found is not None or message_id is not None  # else the writer asks the table
            if found is not None:
                message_id = message_id or found[0]
                sender = sender if sender is not None else found[1]
        if detail:
            detail = {k: v for k, v in detail.items() if v is not None}
        now = self.clock()
        if self._thread is not None:
            self._queue.put((now, event, queue_id, message_id, sender, recipient, related, detail, resolved))
        if self._listeners:
            ev = TrackingEvent(now, self.site, event, queue_id, message_id, sender, recipient, related, detail)
            for listener in self._listeners:
                listener(ev)

    def _run(self) -> None:
        db = self._connect()
        next_purge = time.monotonic() + 3600.0
        next_bounds = time.monotonic() + BOUNDS_EVERY
        gather = True
        try:
            while True:
                first = self._queue.get()
                if gather and isinstance(first, tuple):
                    # A short window: fewer, larger commits.  The writer waits on its
                    # own event, not on the queue, so the events recorded meanwhile
                    # wake no thread; a flush or stop ends the window early.
                    self._urgent.wait(BATCH_WINDOW)
                self._urgent.clear()
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                gather = len(batch) < MAX_BATCH  # a backlog is written without waiting
                events = [e for e in batch if isinstance(e, tuple)]
                if time.monotonic() > next_bounds:  # (before writing: a full disk gets no more rows)
                    next_bounds = time.monotonic() + BOUNDS_EVERY
                    try:
                        self._keep_bounds(db)
                    except (sqlite3.Error, OSError):
                        pass  # tracking is a record, never a reason to stop mail
                if events and self.paused:
                    self.dropped += len(events)
                elif events:
                    self._write(db, events)
                for e in batch:
                    if isinstance(e, threading.Event):
                        e.set()
                if time.monotonic() > next_purge:
                    next_purge = time.monotonic() + 3600.0
                    self._purge(db)
                if any(e is None for e in batch):
                    return
        finally:
            db.close()

    def _write(self, db: sqlite3.Connection, events: list[tuple[Any, ...]]) -> None:
        rows = []
        site = self.site
        encode = _DETAIL_JSON.encode
        for when, event, queue_id, message_id, sender, recipient, related, detail, resolved in events:
            if not resolved:  # e.g. after a restart: ask the table
                found = db.execute("SELECT message_id, sender FROM events WHERE queue_id = ? AND event = ? "
                                   "ORDER BY id LIMIT 1", (queue_id, RECEIVED)).fetchone()
                if found:
                    message_id, sender = found[0], sender if sender is not None else found[1]
            rows.append((when, site, event, queue_id, message_id, sender, recipient, related,
                         encode(detail) if detail else "{}"))
        try:
            with db:
                insert_rows(db, rows)
        except sqlite3.Error:
            pass  # tracking is a record, never a reason to stop mail; the next batch tries again

    def flush_sync(self, timeout: float = 10.0) -> None:
        """Wait until every event recorded so far is in the table."""
        if self._thread is None:
            return
        done = threading.Event()
        self._queue.put(done)
        self._urgent.set()
        done.wait(timeout)

    # ------------------------------------------------------------ queries

    async def query(self, q: TrackingQuery) -> list[TrackingEvent]:
        return await asyncio.to_thread(self.query_sync, q)

    def query_sync(self, q: TrackingQuery) -> list[TrackingEvent]:
        """Every event of the messages matching ``q`` (and of the NDRs about them)."""
        if not self.enabled or not self.path.exists():
            return []
        self.flush_sync()
        where: list[str] = []
        args: list[Any] = []
        if q.message_id:
            where.append("message_id = ?")
            args.append(normalise_message_id(q.message_id))
        if q.queue_id:
            where.append("queue_id = ?")
            args.append(q.queue_id)
        if q.sender is not None:
            where.append("sender = ? COLLATE NOCASE")
            args.append("" if q.sender in ("<>", "") else q.sender)
        if q.recipient:
            where.append("queue_id IN (SELECT queue_id FROM events WHERE recipient = ? COLLATE NOCASE)")
            args.append(q.recipient)
        if q.since is not None:
            where.append("time >= ?")
            args.append(q.since)
        if q.until is not None:
            where.append("time <= ?")
            args.append(q.until)
        sql = ("SELECT DISTINCT queue_id FROM events" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY time DESC LIMIT ?")
        db = self._connect()
        try:
            qids = [r[0] for r in db.execute(sql, [*args, max(1, min(q.limit, 10_000))])]
            if not qids:
                return []
            marks = ",".join("?" * len(qids))
            ndrs = [r[0] for r in db.execute(f"SELECT DISTINCT queue_id FROM events WHERE related IN ({marks})", qids)]
            all_ids = list(dict.fromkeys(qids + ndrs))
            marks = ",".join("?" * len(all_ids))
            rows = db.execute("SELECT time, site, event, queue_id, message_id, sender, recipient, related, detail "
                              f"FROM events WHERE queue_id IN ({marks}) ORDER BY time, id", all_ids).fetchall()
        finally:
            db.close()
        return [TrackingEvent(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], json.loads(r[8] or "{}"))
                for r in rows]


# ------------------------------------------------------------------ following a message (pure)


@dataclass(frozen=True)
class Hop:
    site: str
    queue_id: str
    received_at: float | None
    origin: str | None
    client: str | None
    events: tuple[TrackingEvent, ...]
    server: str | None = None  # on a site of several servers: the server it passed

    @property
    def place(self) -> str:
        return f"{self.site}/{self.server}" if self.server else self.site


@dataclass(frozen=True)
class RecipientResult:
    recipient: str
    state: str  # delivered | bounced | failed | expired | deferred | held | in-transit | queued | deleted | discarded
    site: str
    detail: str
    path: tuple[str, ...]  # sites it went through
    mailbox: str | None = None  # delivered: the mailbox (alias)
    left_to: str | None = None  # delivered into a lab's catch-all: the domain it left the organisation to
    report: str | None = None  # the success report (RFC 3461) sent about it: "delivered" | "relayed"

    def as_dict(self) -> dict[str, Any]:
        return {"recipient": self.recipient, "state": self.state, "site": self.site, "detail": self.detail,
                "path": list(self.path), "mailbox": self.mailbox, "left_to": self.left_to, "report": self.report}

    def end_text(self) -> str:
        """Where this recipient's branch ends, for a path: ``mailbox User2``, or its
        state; `` (DSN: delivered)`` when a success report went to the sender."""
        return self._end() + (f" (DSN: {self.report})" if self.report else "")

    def _end(self) -> str:
        if self.left_to:
            return f"{self.left_to} (the rest of the Internet)"
        if self.state == "delivered" and self.mailbox:
            return f"mailbox {self.mailbox}"
        return f"{self.recipient} {self.state}"


@dataclass(frozen=True)
class Branch:
    """One site of a message's path and where the message went from it: the sites it
    was transferred to (a fan-out has several) and the recipients whose way ended here."""

    site: str
    queue_id: str | None
    next: tuple[Branch, ...]
    ends: tuple[RecipientResult, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"site": self.site, "queue_id": self.queue_id, "next": [b.as_dict() for b in self.next],
                "recipients": [{"recipient": r.recipient, "state": r.state, "mailbox": r.mailbox,
                                "left_to": r.left_to, "report": r.report} for r in self.ends]}

    def text(self) -> str:
        """``SiteA -> {SiteB -> mailbox User2, SiteC -> mailbox User3}``; one way is one chain."""
        items = [b.text() for b in self.next] + [r.end_text() for r in self.ends]
        if not items:
            return self.site
        if len(items) == 1:
            return f"{self.site} -> {items[0]}"
        return f"{self.site} -> {{{', '.join(items)}}}"


def branches(hops: tuple[Hop, ...], recipients: tuple[RecipientResult, ...]) -> Branch | None:
    """The message's path as a tree, from each recipient's way through the sites (pure)."""
    if not hops:
        return None
    queue_ids: dict[str, str] = {}
    for h in hops:
        queue_ids.setdefault(h.place, h.queue_id)
    root: dict[str, Any] = {"site": hops[0].place, "next": {}, "ends": []}
    for r in recipients:
        node = root
        for site in r.path[1:] if r.path and r.path[0] == root["site"] else ():
            node = node["next"].setdefault(site, {"site": site, "next": {}, "ends": []})
        node["ends"].append(r)

    def build(node: dict[str, Any]) -> Branch:
        return Branch(node["site"], queue_ids.get(node["site"]), tuple(build(n) for n in node["next"].values()),
                      tuple(node["ends"]))

    return build(root)


def trunk(hops: tuple[Hop, ...], recipients: tuple[RecipientResult, ...]) -> list[str]:
    """The sites every recipient's way went through (the whole path when there is one
    way; the fan-out's common start otherwise)."""
    paths = [list(r.path) for r in recipients if r.path]
    if not paths:
        return [h.place for h in hops]
    common = paths[0]
    for p in paths[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return common


@dataclass(frozen=True)
class Story:
    message_id: str | None
    sender: str | None
    hops: tuple[Hop, ...]
    recipients: tuple[RecipientResult, ...]

    def as_dict(self) -> dict[str, Any]:
        tree = branches(self.hops, self.recipients)
        return {"message_id": self.message_id, "sender": self.sender,
                "chain": trunk(self.hops, self.recipients),
                "tree": tree.as_dict() if tree else None,
                "path": tree.text() if tree else "",
                "hops": [_hop_dict(h) for h in self.hops],
                "recipients": [r.as_dict() for r in self.recipients]}


def _hop_dict(h: Hop) -> dict[str, Any]:
    d = {"site": h.site, "queue_id": h.queue_id, "received_at": h.received_at,
         "received_at_iso": iso(h.received_at) if h.received_at else None,
         "origin": h.origin, "client": h.client, "events": [e.as_dict() for e in h.events]}
    if h.server:
        d["server"] = h.server
    return d


def follow(events: Iterable[TrackingEvent]) -> list[Story]:
    """Join the events of all sites into stories, one per message (Message-ID, or
    queue id when it has none), hops linked by the peers' queue ids, oldest first."""
    by_hop: dict[tuple[str, str], list[TrackingEvent]] = {}
    for e in sorted(events, key=lambda e: e.time):
        by_hop.setdefault((e.place, e.queue_id), []).append(e)
    hops: dict[tuple[str, str], Hop] = {}
    for key, evs in by_hop.items():
        rec = next((e for e in evs if e.event == RECEIVED), None)
        hops[key] = Hop(evs[0].site, key[1], rec.time if rec else None, rec.detail.get("origin") if rec else None,
                        rec.detail.get("client") if rec else None, tuple(evs), evs[0].server)
    # group hops into messages
    groups: dict[str, list[Hop]] = {}
    for hop in hops.values():
        mid = next((e.message_id for e in hop.events if e.message_id), None)
        groups.setdefault(mid or f"queue:{hop.place}:{hop.queue_id}", []).append(hop)
    by_queue = {h.queue_id: h for h in hops.values()}
    stories = []
    for gkey, group in groups.items():
        group.sort(key=lambda h: (h.received_at or min(e.time for e in h.events)))
        mid = None if gkey.startswith("queue:") else gkey
        sender = next((e.sender for h in group for e in h.events if e.event == RECEIVED), None)
        stories.append(Story(mid, sender, tuple(group), tuple(_results(group, by_queue))))
    stories.sort(key=lambda s: s.hops[0].received_at or 0.0)
    return stories


def _results(group: list[Hop], by_queue: dict[str, Hop]) -> list[RecipientResult]:
    first = group[0]
    rcpts = list(dict.fromkeys(
        [r for e in first.events if e.event == RECEIVED for r in e.detail.get("recipients", [])]
        + [e.recipient for e in first.events if e.recipient]))
    return [_result(r, first, by_queue) for r in rcpts]


def _result(rcpt: str, hop: Hop, by_queue: dict[str, Hop], path: tuple[str, ...] = ()) -> RecipientResult:
    path = (*path, hop.place)
    mine = [e for e in hop.events if (e.recipient or "").lower() == rcpt.lower()
            or (e.event == DELETED and e.recipient is None)]  # an operator deletes the whole message
    if not mine:
        return RecipientResult(rcpt, "queued", hop.place, f"received at {hop.place} (queue id {hop.queue_id}), "
                               "not routed yet", path)
    last = mine[-1]
    d = last.detail
    result = _result_of(rcpt, hop, by_queue, path, mine, last, d)
    success = _success_report(rcpt, hop)
    if success is None or result.site != hop.place:
        return result
    action, dsn_id = success
    return dataclasses.replace(result, report=action,
                               detail=f"{result.detail}; '{action}' report {dsn_id} sent to {hop.events[0].sender or '<>'}")


def _success_report(rcpt: str, hop: Hop) -> tuple[str, str] | None:
    """(action, report queue id) of the success report sent about ``rcpt`` at ``hop``."""
    for e in hop.events:
        if e.event == DSN_SENT:
            actions = {k.lower(): v for k, v in (e.detail.get("actions") or {}).items()}
            if rcpt.lower() in actions:
                return str(actions[rcpt.lower()]), str(e.detail.get("dsn_id"))
    return None


def _result_of(rcpt: str, hop: Hop, by_queue: dict[str, Hop], path: tuple[str, ...], mine: list[TrackingEvent],
               last: TrackingEvent, d: dict[str, Any]) -> RecipientResult:
    if last.event == DELIVERED:
        where = d.get("mailbox") or "the mailbox"
        alias = where[len("mailbox "):] if where.startswith("mailbox ") else None
        routed = next((e for e in reversed(mine) if e.event == ROUTED), None)
        left_to = routed.detail.get("left_to") if routed is not None else None
        if left_to:
            return RecipientResult(rcpt, "delivered", hop.place,
                                   f"left the organisation to {left_to}: kept at {hop.place} in the lab's catch-all "
                                   f"{where} (the rest of the Internet)", path, alias, str(left_to))
        return RecipientResult(rcpt, "delivered", hop.place, f"delivered at {hop.place} to {where}", path, alias)
    if last.event == TRANSFERRED:
        nxt = by_queue.get(d.get("remote_queue_id") or "")
        if nxt is not None and nxt.place not in path:
            return _result(rcpt, nxt, by_queue, path)
        to = d.get("next_hop") or "the next hop"
        return RecipientResult(rcpt, "in-transit", hop.place,
                               f"transferred by {hop.place} to {to} (their queue id "
                               f"{d.get('remote_queue_id') or 'unknown'}); not tracked beyond it", path)
    if last.event in (FAILED, EXPIRED):
        ndr = next((e for e in hop.events if e.event == NDR_SENT and rcpt.lower()
                    in [x.lower() for x in e.detail.get("recipients", [])]), None)
        what = "expired" if last.event == EXPIRED else "bounced"
        tail = (f"; NDR {ndr.detail.get('ndr_id')} sent to {ndr.sender or '<>'}" if ndr
                else f"; no NDR (the sender asked for none: NOTIFY={d['notify']})" if d.get("notify")
                and "FAILURE" not in str(d["notify"]) else "; no NDR (null sender or automatic report)")
        return RecipientResult(rcpt, what if ndr else "failed", hop.place,
                               f"stopped at {hop.place}: {d.get('status')} {d.get('diagnostic')}{tail}", path)
    if last.event == DEFERRED and d.get("held"):
        return RecipientResult(rcpt, "held", hop.place, f"held at {hop.place}: {d.get('diagnostic')} "
                               "(no attempt until the hold ends)", path)
    if last.event == DEFERRED:
        nxt = d.get("next_attempt")
        when = f"; next attempt {iso(nxt)}" if isinstance(nxt, int | float) else ""
        return RecipientResult(rcpt, "deferred", hop.place,
                               f"waiting at {hop.place} after attempt {d.get('attempts')}: {d.get('status')} "
                               f"{d.get('diagnostic')}{when}", path)
    if last.event == DISCARDED:
        return RecipientResult(rcpt, "discarded", hop.site, f"discarded at {hop.site} without an NDR: "
                               f"{d.get('diagnostic')}", path)
    if last.event == DELETED:
        return RecipientResult(rcpt, "deleted", hop.place, f"deleted from the queue at {hop.place} by an operator", path)
    if last.event == ROUTED:
        return RecipientResult(rcpt, "queued", hop.place,
                               f"in the queue at {hop.place}, routed {d.get('route')} (not attempted yet)", path)
    return RecipientResult(rcpt, last.event, hop.place, f"{last.event} at {hop.place}", path)


def gather(fetch: Callable[[TrackingQuery], list[TrackingEvent]], q: TrackingQuery, *,
           max_rounds: int = 6, per_round: int = 100) -> list[TrackingEvent]:
    """Events of the messages ``q`` finds (``fetch`` asks one or many sites), then of
    every message sharing their Message-IDs anywhere (and of the NDRs about them),
    de-duplicated, oldest first."""
    seen: dict[tuple[Any, ...], TrackingEvent] = {}

    def add(events: list[TrackingEvent]) -> None:
        for e in events:
            seen.setdefault((e.site, e.server, e.queue_id, e.time, e.event, e.recipient), e)

    add(fetch(q))
    asked: set[str] = set()
    for _ in range(max_rounds):
        ids = {e.message_id for e in seen.values() if e.message_id} - asked
        if not ids:
            break
        for mid in sorted(ids)[:per_round]:
            asked.add(mid)
            add(fetch(TrackingQuery(message_id=mid, limit=1000)))
    return sorted(seen.values(), key=lambda e: (e.time, e.site))


def tracking_body(events: list[TrackingEvent]) -> dict[str, Any]:
    """``GET /api/v1/tracking``'s answer: the events and each message's story."""
    return {"events": [e.as_dict() for e in events], "messages": [s.as_dict() for s in follow(events)]}


def describe_event(e: TrackingEvent) -> str:
    d = e.detail
    if e.event == RECEIVED:
        origin = d.get("origin") or "smtp"
        source = (f"from {d.get('client')} (EHLO {d.get('helo') or '?'})" if origin == "smtp"
                  else f"generated here ({origin})")
        if d.get("auth"):
            source += f", authenticated as {d.get('auth')}"
        extra = f", report about {e.related}" if e.related else ""
        return (f"received {source}, queue id {e.queue_id}, {d.get('size')} bytes, "
                f"for {', '.join(d.get('recipients', []))}{extra}")
    if e.event == ROUTED:
        return f"routed {e.recipient}: {d.get('route')} — {d.get('why')}"
    if e.event == TRANSFERRED:
        return (f"transferred {e.recipient} to {d.get('next_hop')}, their queue id "
                f"{d.get('remote_queue_id') or 'unknown'} ({d.get('reply')})")
    if e.event == DELIVERED:
        return f"delivered {e.recipient} to {d.get('mailbox')}"
    if e.event == DEFERRED:
        nxt = d.get("next_attempt")
        return (f"deferred {e.recipient} (attempt {d.get('attempts')}): {d.get('status')} {d.get('diagnostic')}"
                + (f"; retry at {iso(nxt)}" if isinstance(nxt, int | float) else ""))
    if e.event in (FAILED, EXPIRED):
        return f"{e.event} {e.recipient}: {d.get('status')} {d.get('diagnostic')}"
    if e.event == NDR_SENT:
        return f"NDR {d.get('ndr_id')} queued to {e.sender or '<>'} for {', '.join(d.get('recipients', []))}"
    if e.event == DELAY_NOTICE_SENT:
        return f"delay notice {d.get('ndr_id')} queued to {e.sender or '<>'} for {', '.join(d.get('recipients', []))}"
    if e.event == DSN_SENT:
        actions = d.get("actions") or {}
        envid = f" (ENVID {d['envid']})" if d.get("envid") else ""
        return (f"delivery report {d.get('dsn_id')} queued to {e.sender or '<>'}{envid}: "
                + ", ".join(f"{r} {a}" for r, a in actions.items()))
    if e.event == DELETED:
        return "deleted from the queue by an operator"
    return e.event


def format_story(story: Story) -> str:
    """The hop chain with times, as ``imsrelay track`` prints it."""
    tree = branches(story.hops, story.recipients)
    lines = [f"message {story.message_id or '(no Message-ID)'} from {story.sender or '<>'}",
             "  path: " + (tree.text() if tree else "(no hop)")]
    for hop in story.hops:
        lines.append(f"  {hop.place} (queue id {hop.queue_id})")
        for e in hop.events:
            stamp = datetime.fromtimestamp(e.time, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
            lines.append(f"    {stamp}  {describe_event(e)}")
    for r in story.recipients:
        lines.append(f"  => {r.recipient}: {r.state} — {r.detail} (via {' -> '.join(r.path)})")
    return "\n".join(lines)
