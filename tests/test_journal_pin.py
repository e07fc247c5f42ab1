"""Issue 27 item 2: a finished message must never pin a journal segment.

The pin seen after a 60,000-message soak: compaction (``Spool.compact``) copied a
message forward while its delivery finished; the copy (ENQUEUE + a STATE that said
"finished") landed after the message's DONE record, at the start of the segment
opened by compaction's rollover.  On replay the copy was queued again, finished,
unknown to the queue manager (``recover`` hands it only unfinished messages), so
nothing ever removed it or moved it: its segment stayed for good.  These tests
reproduce that (small segments, many messages, rollovers, compaction racing the
removals) and check the space comes back while idle, at restart and by compaction.
"""

import asyncio
import random

from test_spool import envelope

from imsrelay.durable.committer import Append
from imsrelay.durable.journal import ENQUEUE, STATE
from imsrelay.model.envelope import DELIVERED
from imsrelay.queue.spool import Spool, queue_file_bytes


def journal_bytes(tmp_path):
    return sum(p.stat().st_size for p in (tmp_path / "queue" / "journal").glob("*.log"))


def finish(env):
    for r in env.recipients:
        r.state = DELIVERED
    return env


async def test_compaction_racing_a_removal_leaves_nothing_queued(tmp_path):
    """The race exactly: compaction reads a message, its delivery finishes and removes
    it, then compaction writes the copy.  Nothing may stay queued, on disk or in memory."""
    spool = Spool(tmp_path, segment_size=64 * 1024)
    spool.recover()
    env = envelope()
    await spool.enqueue(env, b"p" * 80_000)  # segment 1, over the segment size
    others = [envelope() for _ in range(3)]
    for e in others:
        await spool.enqueue(e, b"o" * 70_000)  # a rollover each
    for e in others:
        await spool.remove(e.queue_id)
    real_read = spool.journal.read
    removed = asyncio.Event()

    def slow_read(loc):  # compaction's read of the payload (in a thread): the removal happens meanwhile
        data = real_read(loc)
        finish(env)  # delivered meanwhile, and removed
        asyncio.run_coroutine_threadsafe(spool.remove(env.queue_id), loop).result()
        removed.set()
        return data

    loop = asyncio.get_running_loop()
    spool.journal.read = slow_read
    await spool.compact({env.queue_id: env})
    spool.journal.read = real_read
    assert removed.is_set()
    assert spool.queue_ids() == [], "a removed message is queued again after compaction"
    assert journal_bytes(tmp_path) < 64 * 1024
    spool.close()
    again = Spool(tmp_path)
    assert again.recover() == []
    assert again.queue_ids() == []
    again.close()


async def test_copy_written_after_removal_does_not_come_back(tmp_path):
    """The removal lands while compaction's copy is being committed (the other order)."""
    spool = Spool(tmp_path, segment_size=64 * 1024)
    spool.recover()
    env = envelope()
    await spool.enqueue(env, b"p" * 80_000)
    for e in [envelope() for _ in range(3)]:
        await spool.enqueue(e, b"o" * 70_000)
        await spool.remove(e.queue_id)
    real_commit = spool._commit_enqueue

    async def commit_after_removal(ops):
        await spool.remove(env.queue_id)  # DONE is written first, the copy after it
        return await real_commit(ops)

    spool._commit_enqueue = commit_after_removal
    await spool.compact({env.queue_id: env})  # not finished yet when compaction looked
    spool._commit_enqueue = real_commit
    assert spool.queue_ids() == []
    assert env.queue_id not in spool._index
    spool.close()
    again = Spool(tmp_path)
    assert again.recover() == []
    assert again.queue_ids() == []
    assert journal_bytes(tmp_path) == 0
    again.close()


async def test_soak_with_rollovers_and_compaction_pins_nothing(tmp_path):
    """The soak-and-rollover pattern, short: small segments, many messages, deliveries
    finishing (STATE "finished", then DONE) while compaction runs over and over."""
    rng = random.Random(27)
    spool = Spool(tmp_path, segment_size=128 * 1024)
    spool.recover()
    envelopes: dict[str, object] = {}

    async def deliver(env):
        await asyncio.sleep(rng.random() * 0.01)
        finish(env)
        await spool.save_state(env)
        await asyncio.sleep(0)
        await spool.remove(env.queue_id)
        envelopes.pop(env.queue_id, None)  # the manager forgets it after the removal

    async def compactor(stop):
        while not stop.is_set():
            await spool.compact(dict(envelopes))
            await asyncio.sleep(0)

    stop = asyncio.Event()
    task = asyncio.create_task(compactor(stop))
    deliveries = []
    for i in range(600):
        env = envelope(1)
        await spool.enqueue(env, bytes([65 + i % 26]) * rng.randint(2_000, 9_000))
        envelopes[env.queue_id] = env
        deliveries.append(asyncio.create_task(deliver(env)))
    await asyncio.gather(*deliveries)
    stop.set()
    await task
    await spool.compact({})  # idle: nothing queued
    assert spool.queue_ids() == []
    assert journal_bytes(tmp_path) < 128 * 1024 + 10_000  # at most the open segment
    spool.close()
    again = Spool(tmp_path)
    assert again.recover() == []
    assert again.queue_ids() == []
    assert journal_bytes(tmp_path) == 0
    again.close()


async def test_a_finished_copy_already_on_disk_is_cleared_at_restart(tmp_path):
    """Journals pinned by the old race: a finished message with no DONE after it is
    finished at start-up (a DONE record), and its segment goes."""
    spool = Spool(tmp_path, segment_size=64 * 1024)
    spool.recover()
    env = envelope()
    await spool.enqueue(env, b"p" * 1000)
    await spool.remove(env.queue_id)
    finish(env)
    await spool.committer.commit([Append(ENQUEUE, queue_file_bytes(env, b"p" * 100_000)),
                                  Append(STATE, env.to_json())])  # the pinned copy
    spool.close()
    assert [q for q in Spool(tmp_path).queue_ids()] == [env.queue_id]  # what `queue list` showed
    again = Spool(tmp_path)
    assert again.recover() == []
    assert again.queue_ids() == []
    assert journal_bytes(tmp_path) == 0
    again.close()
