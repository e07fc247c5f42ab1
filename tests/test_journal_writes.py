"""The journal writes a round's records with writev (no joined copy): short writes
and rounds of more records than IOV_MAX still give every record intact."""

from __future__ import annotations

import os

from imsrelay.durable import journal as journal_module
from imsrelay.durable.journal import ENQUEUE, IOV_MAX, STATE, Journal, write_chunks


def records(n: int) -> list[tuple[int, bytes]]:
    return [(ENQUEUE if i % 2 else STATE, (b"record %d " % i) * (i % 7 + 1)) for i in range(n)]


def test_a_round_larger_than_iov_max_reads_back_intact(tmp_path):
    j = Journal(tmp_path)
    given = records(IOV_MAX + 37)  # two iovecs a record: several writev calls
    locations = j.append(given)
    j.close()
    assert [(r.type, r.payload) for r in Journal(tmp_path).scan()] == given
    assert [Journal(tmp_path).read(loc) for loc in locations] == [p for _, p in given]


def test_short_writes_go_on_where_they_stopped(tmp_path, monkeypatch):
    real = os.writev
    calls = []

    def stingy(fd, buffers):  # at most 3 buffers and 7 bytes a call, as a disk near full might
        calls.append(len(buffers))
        head = b"".join(bytes(b) for b in buffers[:3])[:7]
        return real(fd, [head])

    monkeypatch.setattr(journal_module.os, "writev", stingy)
    j = Journal(tmp_path)
    given = records(40)
    j.append(given)
    j.close()
    monkeypatch.undo()
    assert len(calls) > 40
    assert [(r.type, r.payload) for r in Journal(tmp_path).scan()] == given


def test_write_chunks_writes_them_back_to_back(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        write_chunks(fd, [b"ab", b"", memoryview(b"cdef")[1:], b"g" * 100_000])
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abdef" + b"g" * 100_000


def test_a_reader_beside_the_site_skips_a_segment_dropped_after_listing(tmp_path, monkeypatch):
    """``imsrelay queue`` and tests read a running site's journal: a segment the site
    drops between the listing and the read is skipped, the others read in full."""
    j = Journal(tmp_path)
    given = records(5)
    j.append(given)
    j.close()
    reader = Journal(tmp_path)
    listed = reader.segments()
    monkeypatch.setattr(reader, "segments", lambda: [*listed, listed[-1] + 1])  # listed, then gone
    assert [(r.type, r.payload) for r in reader.scan()] == given
