"""The journal gives space back: an empty queue keeps no segment, a restart drops
finished segments, and a failed append (full disk) leaves no torn record behind."""

import errno
import os

import pytest
from test_spool import envelope

from imsrelay.durable.committer import Append
from imsrelay.durable.journal import DONE, ENQUEUE, Journal
from imsrelay.queue.spool import RECLAIM_AT, Spool


def journal_bytes(tmp_path):
    d = tmp_path / "queue" / "journal"
    return sum(p.stat().st_size for p in d.glob("*.log"))


async def test_an_empty_queue_gives_its_open_segment_back(tmp_path):
    spool = Spool(tmp_path)
    spool.recover()
    envs = [envelope() for _ in range(5)]
    for e in envs:
        await spool.enqueue(e, b"z" * (RECLAIM_AT // 3))
    for e in envs:
        await spool.remove(e.queue_id)
    assert journal_bytes(tmp_path) == 0, list((tmp_path / "queue" / "journal").iterdir())
    again = envelope()
    await spool.enqueue(again, b"after")  # a fresh segment
    spool.close()
    s2 = Spool(tmp_path)
    assert [e.queue_id for e in s2.recover()] == [again.queue_id]
    s2.close()


async def test_recover_drops_segments_of_finished_messages(tmp_path):
    spool = Spool(tmp_path)
    spool.recover()
    done = [envelope() for _ in range(3)]
    for e in done:
        await spool.enqueue(e, b"q" * 1000)
    await spool.committer.commit([Append(DONE, e.queue_id.encode()) for e in done])  # finished, segment kept open
    spool.close()
    assert journal_bytes(tmp_path) > 3000
    s2 = Spool(tmp_path)
    assert s2.recover() == []
    assert journal_bytes(tmp_path) == 0  # the closed segment had nothing queued: deleted at start-up
    s2.close()


async def test_a_mostly_finished_open_segment_is_closed_and_compacted(tmp_path):
    spool = Spool(tmp_path)
    spool.recover()
    stays = envelope()
    await spool.enqueue(stays, b"s" * 100)
    gone = [envelope() for _ in range(4)]
    for e in gone:
        await spool.enqueue(e, b"g" * (RECLAIM_AT // 2))
    for e in gone:
        await spool.remove(e.queue_id)
    before = journal_bytes(tmp_path)
    assert before > RECLAIM_AT  # pinned by the one message still queued
    assert await spool.compact({stays.queue_id: stays}) == 1
    assert journal_bytes(tmp_path) < 10_000
    spool.close()
    s2 = Spool(tmp_path)
    assert [e.queue_id for e in s2.recover()] == [stays.queue_id]
    assert s2.read_message(stays.queue_id) == b"s" * 100
    s2.close()


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs of our own (root only); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.system(f"mount -t tmpfs -o size=2m tmpfs {mnt}") != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        os.system(f"umount -l {mnt}")


def test_a_failed_append_leaves_no_torn_record(small_fs):
    journal = Journal(small_fs / "journal")
    journal.append([(ENQUEUE, b"a" * 1000)])
    size = (small_fs / "journal" / "00000001.log").stat().st_size
    with pytest.raises(OSError) as info:
        journal.append([(ENQUEUE, b"b" * (3 * 1024 * 1024))])  # more than the file system holds
    assert info.value.errno == errno.ENOSPC
    assert (small_fs / "journal" / "00000001.log").stat().st_size == size
    journal.append([(ENQUEUE, b"c" * 1000)])  # a new segment; the old one is intact
    records = [r.payload[:1] for r in journal.scan()]
    assert records == [b"a", b"c"]
    journal.close()
