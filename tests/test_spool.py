"""The spool: durable enqueue, state updates, recovery of what was acknowledged."""

import asyncio

from imsrelay.spool import (
    DELIVERED,
    Envelope,
    RecipientState,
    Spool,
    new_queue_id,
    queue_file_bytes,
)


def envelope(n_rcpts=2):
    return Envelope(queue_id=new_queue_id(), sender="a@example.org",
                    recipients=[RecipientState(f"r{i}@example.net") for i in range(n_rcpts)], received_at=1.0)


async def test_enqueue_then_recover(tmp_path):
    spool = Spool(tmp_path)
    envs = [envelope() for _ in range(20)]
    await asyncio.gather(*(spool.enqueue(e, b"Subject: x\r\n\r\nbody %d\r\n" % i) for i, e in enumerate(envs)))
    assert spool.committer.rounds <= 20  # group commit: requests share rounds
    spool.close()
    again = Spool(tmp_path)
    recovered = again.recover()
    assert sorted(e.queue_id for e in recovered) == sorted(e.queue_id for e in envs)
    assert again.read_message(envs[3].queue_id) == b"Subject: x\r\n\r\nbody 3\r\n"
    again.close()


async def test_state_survives_and_finished_messages_are_dropped(tmp_path):
    spool = Spool(tmp_path)
    e1, e2 = envelope(), envelope()
    await spool.enqueue(e1, b"m1")
    await spool.enqueue(e2, b"m2")
    e1.recipients[0].state = DELIVERED
    await spool.save_state(e1)
    for r in e2.recipients:
        r.state = DELIVERED
    await spool.save_state(e2)
    spool.close()
    again = Spool(tmp_path)
    recovered = {e.queue_id: e for e in again.recover()}
    assert list(recovered) == [e1.queue_id]
    assert [r.state for r in recovered[e1.queue_id].recipients] == [DELIVERED, "pending"]
    assert not again.exists(e2.queue_id)


def test_unacknowledged_leftovers_removed(tmp_path):
    spool = Spool(tmp_path)
    (spool.tmp / "half-written").write_bytes(b"x")
    (spool.active / "ABC123.q").write_bytes(b"garbage, not a queue file")
    (spool.active / "ABC124.state").write_bytes(b"{}")  # progress without a message
    e = envelope()
    full = queue_file_bytes(e, b"Subject: x\r\n\r\nbody\r\n")
    (spool.active / f"{e.queue_id}.q").write_bytes(full[:-3])  # torn write: never acknowledged
    assert spool.recover() == []
    assert list(spool.active.iterdir()) == [] and list(spool.tmp.iterdir()) == []


async def test_corrupt_state_falls_back_to_envelope(tmp_path):
    spool = Spool(tmp_path)
    e = envelope()
    await spool.enqueue(e, b"m")
    (spool.active / f"{e.queue_id}.state").write_bytes(b"{not json")
    spool.close()
    recovered = Spool(tmp_path).recover()
    assert [r.state for r in recovered[0].recipients] == ["pending", "pending"]
