"""The queue's per-message fast paths, each against the plain path it stands for:

- a delivered recipient set in place (``manager.delivered``) is what
  ``rules.after_attempt`` + ``manager._assign`` make of it;
- ``Spool.finish`` (the DONE record handed to the writer without waiting) leaves the
  same journal behind as ``Spool.remove``: the same records replayed, the same
  segments dropped, and an error is reported;
- ``GroupCommitter.post`` keeps its turn among awaited commits;
- the ``routed`` tracking fields made once per route are the fields of each route.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import structlog

from imsrelay.durable.committer import Append
from imsrelay.durable.journal import DONE, ENQUEUE, STATE, Journal
from imsrelay.model.envelope import DELIVERED, PENDING, Envelope, RecipientState, new_queue_id
from imsrelay.model.outcome import Outcome
from imsrelay.queue.manager import QueueManager, _assign, delivered
from imsrelay.queue.rules import RetryPolicy, after_attempt
from imsrelay.queue.spool import Spool
from imsrelay.routing.router import ATTENDANT, DIRECTORY, FAIL, LOCAL, MX, RELAY, Route

MESSAGE = b"From: a@example.org\r\nSubject: t\r\n\r\n" + b"x" * 2000 + b"\r\n"


# ------------------------------------------------------------ delivered, in place


RECIPIENTS = [
    RecipientState("a@example.net", "a@example.net"),
    RecipientState("b@example.net", None, attempts=3, next_attempt=50.0, first_failure=10.0, status="4.4.1",
                   diagnostic="451 try later", remote="mx.example.net", delay_notified=True,
                   route="relay:h:25:none", notify="SUCCESS,FAILURE", orcpt="rfc822;b@example.net"),
]
OUTCOMES = [Outcome.delivered("250 2.0.0 Ok: queued as X", remote="h.example"), Outcome.delivered(""),
            dataclasses.replace(Outcome.delivered("250 ok"), dsn_passed=True)]


@pytest.mark.parametrize("recipient", RECIPIENTS)
@pytest.mark.parametrize("outcome", OUTCOMES)
def test_a_delivered_recipient_set_in_place_is_what_the_rules_make_of_it(recipient: RecipientState,
                                                                        outcome: Outcome) -> None:
    plain, fast = dataclasses.replace(recipient), dataclasses.replace(recipient)
    step = after_attempt(plain, outcome, now=100.0, received_at=1.0, policy=RetryPolicy((60.0,), 3600.0),
                         may_report=True)
    _assign(plain, step.recipient, keep_pending=step.ndr)
    delivered(fast, outcome)
    assert dataclasses.asdict(fast) == dataclasses.asdict(plain)
    assert fast.state == DELIVERED and fast.attempts == recipient.attempts + 1


# ------------------------------------------------------------ DONE without waiting


def _journal_records(directory: Path) -> list[tuple[int, bytes]]:
    journal = Journal(directory)
    try:
        return [(r.type, bytes(r.payload)) for r in journal.scan()]
    finally:
        journal.close()


async def _fill_and_finish(data: Path, finish: bool) -> tuple[list[int], list[str]]:
    """Queue 12 messages in small segments, finish 9 of them (in a fixed order);
    the segments left on disk and the queue ids queued after a restart."""
    spool = Spool(data, segment_size=8 * 1024)
    spool.recover()
    envs = [Envelope(queue_id=f"Q{i:03d}", sender="a@example.org", recipients=[RecipientState("b@example.net")],
                     received_at=1.0) for i in range(12)]
    for env in envs:
        await spool.enqueue(env, MESSAGE)
    await spool.save_state(envs[4])
    for env in envs[:9]:
        if finish:
            spool.finish(env.queue_id)
        else:
            await spool.remove(env.queue_id)
    await spool.committer.commit([])  # (the posted records are written before this round's end)
    spool.close()
    again = Spool(data)
    return again.journal.segments(), again.queue_ids()


async def test_finish_leaves_the_journal_remove_leaves(tmp_path: Path) -> None:
    plain = await _fill_and_finish(tmp_path / "plain", finish=False)
    fast = await _fill_and_finish(tmp_path / "fast", finish=True)
    assert fast == plain
    assert plain[1] == ["Q009", "Q010", "Q011"]
    assert plain[0][0] > 1  # segments with nothing queued were dropped
    records = {name: [(t, p if t == DONE else b"") for t, p in _journal_records(tmp_path / name / "queue" / "journal")]
               for name in ("plain", "fast")}
    assert records["fast"] == records["plain"]


async def test_a_finished_message_is_replayed_as_gone_once_its_done_is_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.recover()
    env = Envelope(queue_id=new_queue_id(), sender="", recipients=[RecipientState("b@example.net")], received_at=1.0)
    await spool.enqueue(env, MESSAGE)
    spool.finish(env.queue_id)
    assert env.queue_id not in spool._index  # left the index at once
    await spool.committer.commit([])
    types = [t for t, _ in _journal_records(tmp_path / "queue" / "journal")]
    assert types == [ENQUEUE, DONE]
    spool.close()
    assert Spool(tmp_path).queue_ids() == []


async def test_a_done_that_cannot_be_written_is_reported_on_the_loop(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    spool = Spool(tmp_path)
    spool.recover()
    env = Envelope(queue_id=new_queue_id(), sender="", recipients=[RecipientState("b@example.net")], received_at=1.0)
    await spool.enqueue(env, MESSAGE)
    original = spool.journal.append

    def failing(records: Any, *, durable: bool = True) -> Any:
        if any(t == DONE for t, _ in records):
            raise OSError(28, "No space left on device")
        return original(records, durable=durable)

    monkeypatch.setattr(spool.journal, "append", failing)
    reported: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    spool.finish(env.queue_id, reported.set_result)
    error = await asyncio.wait_for(reported, 10)
    assert isinstance(error, OSError) and error.errno == 28
    monkeypatch.undo()
    spool.close()
    assert Spool(tmp_path).queue_ids() == [env.queue_id]  # delivered again after a restart, as before


async def test_posted_records_keep_their_turn_among_commits(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.recover()
    committer = spool.committer
    await committer.commit([Append(STATE, b"1")])
    committer.post([Append(DONE, b"2")])
    waiting = [asyncio.ensure_future(committer.commit([Append(STATE, b"3")]))]
    await asyncio.sleep(0)  # (a commit hands its request over when its task first runs)
    committer.post([Append(DONE, b"4")])
    waiting.append(asyncio.ensure_future(committer.commit([Append(STATE, b"5")])))
    await asyncio.gather(*waiting)
    spool.close()
    assert [p for _, p in _journal_records(tmp_path / "queue" / "journal")] == [b"1", b"2", b"3", b"4", b"5"]


# ------------------------------------------------------------ routed tracking fields, once per route


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def record(self, event: str, queue_id: str, **fields: Any) -> None:
        self.events.append((event, queue_id, fields))


ROUTES = [
    Route("u@x", LOCAL, ("a", "b"), mailbox="User1"),
    Route("u@x", LOCAL, ("c",), mailbox="Catch", domain="example.net"),
    Route("u@x", DIRECTORY, ()),
    Route("u@x", ATTENDANT, ()),
    Route("u@x", RELAY, ("smart host",), host="h", port=2525, starttls="none", server="Server1", site="SiteB"),
    Route("u@x", RELAY, ("e-mail domain",), host="h", port=25),
    Route("u@x", MX, ("mx",), domain="example.net"),
    Route("u@x", FAIL, ("no route",), permanent=True, status="5.1.2", reason="no such domain"),
]


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.kind}-{r.mailbox or r.host or r.domain}")
def test_routed_fields_are_the_same_from_the_cache(route: Route) -> None:
    qmgr = QueueManager.__new__(QueueManager)
    recorder = _Recorder()
    qmgr.tracking = recorder  # type: ignore[assignment]
    qmgr._route_notes = {}
    env = Envelope(queue_id="Q1", sender="", recipients=[RecipientState("u@x")], received_at=1.0)
    for _ in range(2):
        qmgr._track_route(env, env.recipients[0], route)
    other = dataclasses.replace(route, steps=(*route.steps, "another decision"))  # an equal-looking new route
    qmgr._track_route(env, env.recipients[0], other)
    first, second, third = recorder.events
    assert first == second
    assert first[2]["recipient"] == "u@x" and first[2]["kind"] == route.kind
    assert first[2]["why"] == "; ".join(route.steps)
    assert third[2]["why"] == "; ".join(other.steps)
    assert {k: v for k, v in first[2].items() if k != "why"} == {k: v for k, v in third[2].items() if k != "why"}


def test_a_new_routing_table_starts_the_routed_fields_afresh() -> None:
    qmgr = QueueManager.__new__(QueueManager)
    qmgr._routes, qmgr._route_notes, qmgr._routes_table, qmgr._routes_shared = {}, {1: (ROUTES[0], {})}, None, False
    from imsrelay.routing.router import RoutingTable

    qmgr.route_for_cached("u@example.net", None, RoutingTable(site="S", site_domain="s.example", local_domains=("s.example",)), "Q1")
    assert qmgr._route_notes == {}


async def test_a_delivered_message_leaves_the_spool_and_its_done_is_on_disk(tmp_path: Path) -> None:
    """The queue manager's whole fast path: delivered in place, finished without waiting."""
    from test_qmgr_unit import Agent, Inputs

    from imsrelay.model.settings import DeliveryConfig

    spool = Spool(tmp_path)
    agent = Agent()
    ref: list[QueueManager] = []
    inputs = Inputs(ref, spool)
    qmgr = QueueManager(spool, inputs=inputs, transports={LOCAL: agent, RELAY: agent, MX: agent, FAIL: agent},
                        delivery=DeliveryConfig(), log=structlog.get_logger())
    ref.append(qmgr)
    await qmgr.start()
    try:
        env = Envelope(queue_id=new_queue_id(), sender="a@example.org",
                       recipients=[RecipientState("bob@example.net", "bob@example.net")], received_at=1.0)
        await spool.enqueue(env, MESSAGE)
        qmgr.submit(env, MESSAGE)
        for _ in range(1000):
            if env.queue_id not in qmgr.envelopes:
                break
            await asyncio.sleep(0.01)
        assert env.recipients[0].state == DELIVERED and env.recipients[0].attempts == 1
        assert env.recipients[0].state != PENDING
    finally:
        await qmgr.stop()
        spool.close()
    assert Spool(tmp_path).queue_ids() == []
    assert [t for t, _ in _journal_records(tmp_path / "queue" / "journal")][-1] == DONE


# ------------------------------------------------------------ the Message-ID, found in a lower-cased header


def _message_id_by_regex(message: bytes) -> str | None:
    """The plain path: the case-insensitive regex searched over the header."""
    import re

    from imsrelay.observe.tracking import _HEADER_SCAN, _MESSAGE_ID

    end = message.find(b"\r\n\r\n", 0, _HEADER_SCAN)
    if end < 0:
        end = message.find(b"\n\n", 0, _HEADER_SCAN)
    m = _MESSAGE_ID.search(message, 0, end + 1 if end >= 0 else _HEADER_SCAN)
    if not m:
        return None
    value = re.sub(rb"\s+", b"", m.group(1)).decode("utf-8", "replace")
    return value[:998] or None


def _headers() -> list[bytes]:
    import random

    rng = random.Random(28)
    names = [b"Message-ID", b"message-id", b"MESSAGE-ID", b"Message-Id", b"mEsSaGe-iD", b"X-Message-ID",
             b"Resent-Message-ID", b"Message-IDs", b"Message-ID "]
    values = [b" <a@b>", b"<a@b>", b"\t<a b@c>", b"", b" ", b"\r\n <folded@x>", b" <x@y>\r\n\t<more>",
              b" <\xc3\xa9@x>", b" <" + b"z" * 1200 + b">", b" <a@b>\x0b\x0c"]
    found = []
    for _ in range(600):
        lines = [rng.choice([b"From: a@b", b"To: c@d", b"Subject: message-id: no", b"Received: x\r\n\tmessage-id: y"])
                 for _ in range(rng.randrange(4))]
        for _ in range(rng.randrange(3)):
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(names) + b":" + rng.choice(values))
        eol = rng.choice([b"\r\n", b"\n"])
        body = rng.choice([b"Message-ID: <body@no>", b"x" * 10, b""])
        found.append(eol.join(lines) + eol + rng.choice([eol, b""]) + body + eol)
    return found


def test_the_message_id_is_what_the_regex_search_finds() -> None:
    from imsrelay.observe.tracking import message_id_of

    messages = _headers() + [b"Message-ID: <first@line>\r\n\r\n", b"message-id:<x>", b"", b"\r\n\r\nMessage-ID: <b>",
                             b"From: a\r\n" * 8000 + b"Message-ID: <beyond@64k>\r\n\r\n"]
    assert sum(_message_id_by_regex(m) is not None for m in messages) > 100  # (the cases do find ids)
    for message in messages:
        assert message_id_of(message) == _message_id_by_regex(message), message[:200]


# ------------------------------------------------------------ tracking rows, a few statements per batch


@pytest.mark.parametrize("count", [0, 1, 2, 7, 99, 100, 101, 163, 250, 1000])
def test_tracking_rows_inserted_in_chunks_are_the_rows_executemany_inserts(tmp_path: Path, count: int) -> None:
    import sqlite3

    from imsrelay.observe.tracking import _SCHEMA, insert_rows

    rows = [(1_700_000_000.0 + i / 7, "SiteA", ["received", "routed", "transferred"][i % 3], f"Q{i // 3:05d}",
             f"<{i // 3}@x>" if i % 5 else None, "" if i % 4 == 0 else "a@example.org",
             None if i % 3 == 0 else f"r{i}@example.net", None if i % 11 else "Q00000",
             '{"size":4096}' if i % 2 else "{}") for i in range(count)]
    tables = []
    for name, write in (("plain", None), ("chunked", insert_rows)):
        db = sqlite3.connect(tmp_path / f"{name}.sqlite3")
        db.executescript(_SCHEMA)
        db.execute("INSERT INTO events (time, site, event, queue_id) VALUES (1.0, 'SiteA', 'received', 'Q')")
        with db:
            if write is None:
                db.executemany("INSERT INTO events (time, site, event, queue_id, message_id, sender, recipient, "
                               "related, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            else:
                write(db, rows)
        tables.append(db.execute("SELECT id, time, typeof(time), site, event, queue_id, message_id, sender, recipient, "
                                 "related, detail FROM events ORDER BY id").fetchall())
        db.close()
    assert tables[1] == tables[0]
    assert len(tables[0]) == count + 1
