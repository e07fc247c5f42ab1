"""The spool write path's shortcuts give the same results as the long way round:
the envelope encoder writes the bytes ``dataclasses.asdict`` + ``json.dumps`` wrote
(and old queue files still load), the journal's in-memory segment list always
matches the directory while it owns it (and is not trusted when it does not), and
one wake-up per loop per round settles every request of the round."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import threading
from pathlib import Path

import pytest

from imsrelay.durable import journal as journal_module
from imsrelay.durable.committer import Append, GroupCommitter
from imsrelay.durable.journal import DONE, ENQUEUE, IOV_MAX, STATE, Journal
from imsrelay.model.envelope import DELIVERED, Envelope, RecipientState, new_queue_id
from imsrelay.queue.spool import Spool, parse_queue_file, queue_file_bytes

# ------------------------------------------------------------------ envelope JSON

# Written by the encoder before this one (json.dumps(asdict(envelope), sort_keys=True,
# separators=(",", ":"))), for the envelope ``sample()`` builds.
OLD_JSON = (
    b'{"body_8bit":true,"client":"192.0.2.7","envid":null,"extra":{"auth":"alice","priority":"urgent"},'
    b'"helo":"client.example",'
    b'"origin":"smtp","queue_id":"18A2B3C4D5E6F0A1B0001","received_at":1796189373.153502,"recipients":['
    b'{"address":"rcpt@example.net","attempts":0,"delay_notified":false,"diagnostic":null,"first_failure":null,'
    b'"next_attempt":0.0,"notify":null,"orcpt":null,"original":"Rcpt@Example.NET","remote":null,"route":null,'
    b'"state":"pending","status":null},'
    b'{"address":"other@example.org","attempts":2,"delay_notified":false,'
    b'"diagnostic":"250 2.0.0 Ok: queued as 4X\\u00e9","first_failure":1796189300.5,"next_attempt":1796189400.25,'
    b'"notify":null,"orcpt":null,'
    b'"original":null,"remote":"mx.example.org","route":"mx","state":"delivered","status":"2.0.0"}],'
    b'"ret":null,"sender":"sender@example.com","size":0,"smtputf8":true}'
)
OLD_QUEUE_FILE = b"IMSQ1 820\n" + OLD_JSON.replace(b'"size":0', b'"size":21') + b"Subject: hi\r\n\r\nbody\r\n"


def sample() -> Envelope:
    return Envelope(
        "18A2B3C4D5E6F0A1B0001", "sender@example.com",
        [RecipientState("rcpt@example.net", original="Rcpt@Example.NET"),
         RecipientState("other@example.org", state=DELIVERED, attempts=2, next_attempt=1796189400.25,
                        first_failure=1796189300.5, status="2.0.0", diagnostic="250 2.0.0 Ok: queued as 4X\u00e9",
                        remote="mx.example.org", route="mx")],
        received_at=1796189373.153502, client="192.0.2.7", helo="client.example", smtputf8=True, body_8bit=True,
        origin="smtp", extra={"priority": "urgent", "auth": "alice"})


def asdict_json(env: Envelope) -> bytes:
    """The encoding the spool used before (the reference)."""
    return json.dumps(dataclasses.asdict(env), separators=(",", ":"), sort_keys=True).encode()


@dataclasses.dataclass
class Note:
    text: str
    level: int


VARIED = [
    Envelope(new_queue_id(), "", [], received_at=0.0),
    Envelope(new_queue_id(), "a@example.org", [RecipientState("b@example.net")], received_at=1.5, origin="ndr",
             extra={"report_for": "ABC"}),
    Envelope(new_queue_id(), "\u00e9l\u00e8ve@exemple.fr", [RecipientState("\u2603@example.net", delay_notified=True)],
             received_at=1e-7, smtputf8=True, size=123456789,
             extra={"z": [1, 2.5, None, True], "a": {"nested": {"y": 1, "b": [("t", "u")]}}, "m": "\udcff"}),
    Envelope(new_queue_id(), "x@example.org", [RecipientState(f"r{i}@example.net", attempts=i) for i in range(30)],
             received_at=1796189373.0, extra={"note": Note("dataclass in extra", 3)}),
]


@pytest.mark.parametrize("env", [sample(), *VARIED])
def test_to_json_writes_what_the_asdict_encoder_wrote(env):
    assert env.to_json() == asdict_json(env)


def test_to_json_reproduces_old_bytes_exactly():
    assert sample().to_json() == OLD_JSON


@pytest.mark.parametrize("env", [sample(), *VARIED[:2]])
def test_envelope_round_trip(env):
    assert Envelope.from_json(env.to_json()) == env


def test_old_queue_file_bytes_still_load():
    env, start = parse_queue_file(OLD_QUEUE_FILE)
    expected = sample()
    expected.size = 21
    assert env == expected
    assert OLD_QUEUE_FILE[start:] == b"Subject: hi\r\n\r\nbody\r\n"
    assert queue_file_bytes(sample(), b"Subject: hi\r\n\r\nbody\r\n") == OLD_QUEUE_FILE


def test_old_envelope_without_newer_fields_still_loads():
    old = json.loads(OLD_JSON)
    for r in old["recipients"]:
        del r["route"], r["notify"], r["orcpt"]  # fields added later: an old STATE record has none
    del old["extra"], old["ret"], old["envid"]
    env = Envelope.from_json(json.dumps(old).encode())
    assert [r.route for r in env.recipients] == [None, None] and env.extra == {}
    assert [r.notify for r in env.recipients] == [None, None] and env.ret is None and env.envid is None


def test_unencodable_extra_is_still_an_error():
    env = Envelope(new_queue_id(), "a@example.org", [], received_at=1.0, extra={"x": object()})
    with pytest.raises(TypeError):
        env.to_json()


async def test_a_journal_written_with_old_bytes_replays(tmp_path):
    """A queue left by the old encoder: ENQUEUE and STATE records as it wrote them."""
    j = Journal(tmp_path / "queue" / "journal")
    state = sample()
    state.size = 21
    state.recipients[0].attempts, state.recipients[0].status = 1, "4.4.1"
    j.append([(ENQUEUE, OLD_QUEUE_FILE), (STATE, asdict_json(state))])
    j.close()
    spool = Spool(tmp_path)
    (env,) = spool.recover()
    assert env == state
    assert spool.read_message(env.queue_id) == b"Subject: hi\r\n\r\nbody\r\n"
    spool.close()


# ------------------------------------------------------------------ segment list


def on_disk(directory: Path) -> list[int]:
    return sorted(int(name[:-4]) for name in os.listdir(directory) if name.endswith(".log"))


class ListingCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = os.scandir

        def counting(path):
            self.calls += 1
            return real(path)

        monkeypatch.setattr(journal_module.os, "scandir", counting)


def test_an_owning_journal_keeps_its_segment_list_without_listing(tmp_path, monkeypatch):
    d = tmp_path / "journal"
    j = Journal(d, segment_size=100)
    j.adopt_existing()
    listings = ListingCounter(monkeypatch)
    for i in range(5):
        j.append([(ENQUEUE, b"x" * 150)])  # each append fills a segment: the next opens a new one
        assert j.segments() == on_disk(d) == list(range(1, i + 2))
    j.remove_segments([1, 3])
    assert j.segments() == on_disk(d) == [2, 4, 5]
    j.remove_segments([5])  # the open segment is never removed
    assert j.segments() == on_disk(d) == [2, 4, 5]
    j.close_segment()
    j.remove_segments([5])
    assert j.segments() == on_disk(d) == [2, 4]
    assert listings.calls <= 1  # at most the first look at the directory
    j.close()


def test_a_segment_already_gone_leaves_the_list(tmp_path):
    d = tmp_path / "journal"
    j = Journal(d, segment_size=10)
    j.adopt_existing()
    j.append([(DONE, b"A" * 20)])
    j.append([(DONE, b"B" * 20)])
    os.unlink(d / "00000001.log")  # someone else removed it
    j.remove_segments([1])
    assert j.segments() == on_disk(d) == [2]
    j.close()


def test_a_failed_removal_keeps_the_segment_listed(tmp_path, monkeypatch):
    d = tmp_path / "journal"
    j = Journal(d, segment_size=10)
    j.adopt_existing()
    j.append([(DONE, b"A" * 20)])
    j.append([(DONE, b"B" * 20)])

    def failing(path):
        raise OSError(errno.EIO, "I/O error (test)")

    monkeypatch.setattr(journal_module.os, "unlink", failing)
    with pytest.raises(OSError):
        j.remove_segments([1])
    monkeypatch.undo()
    assert j.segments() == on_disk(d) == [1, 2]
    j.close()


def test_a_journal_that_does_not_own_its_directory_looks_every_time(tmp_path):
    d = tmp_path / "journal"
    reader = Journal(d)
    assert reader.segments() == []
    writer = Journal(d, segment_size=10)
    writer.adopt_existing()
    writer.append([(DONE, b"A" * 20)])
    assert reader.segments() == [1]
    writer.append([(DONE, b"B" * 20)])
    assert reader.segments() == [1, 2]
    assert [bytes(r.payload) for r in reader.scan()] == [b"A" * 20, b"B" * 20]
    writer.close()


def test_after_close_the_list_comes_from_disk_again(tmp_path):
    """Closed, a journal no longer owns its directory: the next writer (another
    process) may add segments, and this object must see them."""
    d = tmp_path / "journal"
    first = Journal(d, segment_size=10)
    first.adopt_existing()
    first.append([(DONE, b"A" * 20)])
    assert first.segments() == [1]
    first.close()
    second = Journal(d, segment_size=10)
    second.adopt_existing()
    second.append([(DONE, b"B" * 20)])
    second.close()
    assert first.segments() == [1, 2]
    first.adopt_existing()  # owning again: picks up from what is on disk
    first.append([(DONE, b"C" * 20)])
    assert first.segments() == on_disk(d) == [1, 2, 3]
    first.close()


async def test_the_running_spool_segment_list_matches_the_directory(tmp_path):
    """Through enqueue, removal, segment drops and compaction, the kept list is what
    a listing of the directory would say."""
    spool = Spool(tmp_path, segment_size=2000)
    spool.recover()
    d = spool.journal.directory

    def check() -> None:
        assert spool.journal.segments() == on_disk(d)

    long_lived = Envelope(new_queue_id(), "a@example.org", [RecipientState("b@example.net")], received_at=1.0)
    await spool.enqueue(long_lived, b"x" * 1500)
    check()
    others = []
    for _ in range(6):
        e = Envelope(new_queue_id(), "a@example.org", [RecipientState("b@example.net")], received_at=1.0)
        await spool.enqueue(e, b"y" * 1500)
        others.append(e)
        check()
    for e in others:
        await spool.remove(e.queue_id)
        check()
    assert spool.journal.segments()[0] == 1  # pinned by the long-lived message
    assert await spool.compact({long_lived.queue_id: long_lived}) == 1
    check()
    assert 1 not in spool.journal.segments()
    await spool.remove(long_lived.queue_id)
    check()
    spool.close()
    again = Spool(tmp_path)
    assert again.recover() == []
    assert again.journal.segments() == on_disk(d)
    again.close()


# ------------------------------------------------------------------ writev


def test_short_writes_of_a_round_larger_than_iov_max(tmp_path, monkeypatch):
    real = os.writev

    def stingy(fd, buffers):
        head = b"".join(bytes(b) for b in buffers[:5])[:1000]
        return real(fd, [head])

    monkeypatch.setattr(journal_module.os, "writev", stingy)
    j = Journal(tmp_path)
    given = [(ENQUEUE, b"%d " % i * (i % 50 + 1)) for i in range(IOV_MAX + 37)]
    locations = j.append(given)
    j.close()
    monkeypatch.undo()
    assert [(r.type, bytes(r.payload)) for r in Journal(tmp_path).scan()] == given
    assert [Journal(tmp_path).read(loc) for loc in locations] == [p for _, p in given]


# ------------------------------------------------------------------ settling a round


async def test_one_round_settles_requests_of_several_loops(tmp_path):
    """Requests of two event loops (and a cancelled one) in one round: each gets its
    own locations, the cancelled one does not keep the others waiting."""
    j = Journal(tmp_path / "journal")
    j.adopt_existing()
    committer = GroupCommitter(tmp_path, j)
    hold, held = threading.Event(), threading.Event()

    def on_flush(_seconds: float) -> None:  # the writer thread, after each round
        if not held.is_set():
            held.set()
            assert hold.wait(10)

    committer.on_flush = on_flush
    first = asyncio.ensure_future(committer.commit([Append(DONE, b"first")]))
    assert await asyncio.to_thread(held.wait, 10)  # round 1 is under way: the rest queue up
    mine = [asyncio.ensure_future(committer.commit([Append(DONE, b"a%d" % i)])) for i in range(3)]
    cancelled = asyncio.ensure_future(committer.commit([Append(DONE, b"gone")]))
    await asyncio.sleep(0)  # every request is queued
    cancelled.cancel()

    other_loop_results: list[list] = []
    queued = threading.Event()

    def other_loop() -> None:
        async def run():
            task = asyncio.ensure_future(committer.commit([Append(DONE, b"b0"), Append(STATE, b"b1")]))
            await asyncio.sleep(0)
            queued.set()
            other_loop_results.append(await task)
        asyncio.run(run())

    thread = threading.Thread(target=other_loop)
    thread.start()
    assert await asyncio.to_thread(queued.wait, 10)
    hold.set()
    results = await asyncio.gather(*mine)
    await first
    await asyncio.to_thread(thread.join, 10)
    assert committer.rounds == 2  # everything after the first request: one round
    (locs_b,) = other_loop_results
    assert [j.read(loc) for loc in locs_b] == [b"b0", b"b1"]
    assert [j.read(loc) for (loc,) in results] == [b"a0", b"a1", b"a2"]
    assert cancelled.cancelled()
    committer.stop()
    j.close()
