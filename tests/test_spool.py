"""The spool: durable enqueue through the journal, state, removal, recovery."""

import asyncio
import os

import pytest

from imsrelay.durable.journal import Journal
from imsrelay.model.envelope import DELIVERED, Envelope, RecipientState, new_queue_id
from imsrelay.queue.spool import Spool, SpoolLocked


def envelope(n_rcpts=2):
    return Envelope(queue_id=new_queue_id(), sender="a@example.org",
                    recipients=[RecipientState(f"r{i}@example.net") for i in range(n_rcpts)], received_at=1.0)


def body(i):
    return b"Subject: x\r\n\r\nbody %d \xe9\r\n" % i


async def test_group_commit_then_recover(tmp_path):
    spool = Spool(tmp_path)
    spool.recover()
    envs = [envelope() for _ in range(50)]
    await asyncio.gather(*(spool.enqueue(e, body(i)) for i, e in enumerate(envs)))
    assert spool.committer.rounds < 50  # sessions share flushes
    spool.close()
    again = Spool(tmp_path)
    recovered = again.recover()
    assert sorted(e.queue_id for e in recovered) == sorted(e.queue_id for e in envs)
    assert again.read_message(envs[3].queue_id) == body(3)  # bytes exactly as given
    again.close()


async def test_state_and_done_survive_restart(tmp_path):
    spool = Spool(tmp_path)
    spool.recover()
    e1, e2 = envelope(), envelope()
    await spool.enqueue(e1, b"m1")
    await spool.enqueue(e2, b"m2")
    e1.recipients[0].state = DELIVERED
    await spool.save_state(e1)
    await spool.remove(e2.queue_id)
    spool.close()
    again = Spool(tmp_path)
    recovered = {e.queue_id: e for e in again.recover()}
    assert list(recovered) == [e1.queue_id]
    assert [r.state for r in recovered[e1.queue_id].recipients] == [DELIVERED, "pending"]
    again.close()


async def test_torn_tail_is_ignored(tmp_path):
    spool = Spool(tmp_path)
    spool.recover()
    kept = envelope()
    await spool.enqueue(kept, b"kept")
    spool.close()
    seg = sorted((tmp_path / "queue" / "journal").glob("*.log"))[-1]
    with open(seg, "ab") as f:  # a crash in the middle of the next append
        f.write(b"IMSJ\x01\x00\x00\x10\x00\x00\x00\x00\x00partial")
    again = Spool(tmp_path)
    assert [e.queue_id for e in again.recover()] == [kept.queue_id]
    again.close()


async def test_segments_are_deleted_and_compacted(tmp_path):
    spool = Spool(tmp_path, segment_size=2000)
    spool.recover()
    long_lived = envelope()
    await spool.enqueue(long_lived, b"x" * 1500)  # segment 1
    others = [envelope() for _ in range(6)]
    for e in others:
        await spool.enqueue(e, b"y" * 1500)  # a new segment each time
    for e in others:
        await spool.remove(e.queue_id)
    journal = Journal(tmp_path / "queue" / "journal")
    assert journal.segments()[0] == 1  # pinned by the long-lived message
    moved = await spool.compact({long_lived.queue_id: long_lived})
    assert moved == 1
    assert 1 not in journal.segments()
    assert len(journal.segments()) <= 3
    spool.close()
    again = Spool(tmp_path)
    assert [e.queue_id for e in again.recover()] == [long_lived.queue_id]
    assert again.read_message(long_lived.queue_id) == b"x" * 1500
    again.close()


async def test_one_writer_and_offline_requests(tmp_path):
    site_spool = Spool(tmp_path)
    site_spool.recover()
    e = envelope()
    await site_spool.enqueue(e, b"m")
    cli = Spool(tmp_path)  # another "process" view
    with pytest.raises(SpoolLocked):
        cli.acquire()
    assert cli.queue_ids() == [e.queue_id]  # read-only views work while the site runs
    assert cli.remove_sync(e.queue_id)  # becomes a request to the running site
    assert site_spool.take_control_requests() == [("delete", e.queue_id)]
    site_spool.close()
    # site stopped: the tool changes the journal itself
    assert cli.remove_sync(e.queue_id)
    assert Spool(tmp_path).recover() == []


def test_new_queue_ids_are_unique_and_sortable():
    ids = [new_queue_id() for _ in range(2000)]
    assert len(set(ids)) == 2000 and all(i.isalnum() for i in ids)
    assert os.path.basename(ids[0]) == ids[0]


async def test_other_workers_unfinished_counts_by_their_journals(tmp_path):
    """Worker 0's count of worker 1's queue (GET /status): enqueued, minus what a
    STATE record finished and what a DONE record removed; its own journal not read."""
    peer = Spool(tmp_path, worker=1)
    peer.recover()
    waiting, finished, removed = envelope(), envelope(1), envelope()
    for i, e in enumerate((waiting, finished, removed)):
        await peer.enqueue(e, body(i))
    finished.recipients[0].state = DELIVERED
    await peer.save_state(finished)
    await peer.remove(removed.queue_id)
    peer.close()
    own = Spool(tmp_path)
    own.recover()
    mine = envelope()
    await own.enqueue(mine, body(9))
    assert own.other_workers_unfinished() == {waiting.queue_id}
    assert Spool(tmp_path, worker=1).other_workers_unfinished() == {mine.queue_id}
    own.close()
