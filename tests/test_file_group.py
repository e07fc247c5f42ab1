"""Maildir deliveries of one commit round made durable together (imsrelay.durable.file_group):
a file appears in new/ only complete and only after its data was flushed; the
directory is flushed before anyone hears "delivered"; a failing file never appears
and fails only its own request."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest

from imsrelay.durable import file_group
from imsrelay.durable.file_group import MAX_OPEN, FileGroup
from imsrelay.queue.spool import Spool
from imsrelay.transport.maildir import delivery_write, ensure_maildir, list_messages


def maildir(tmp_path: Path, name: str = "UserA") -> Path:
    path = tmp_path / "mailboxes" / name
    ensure_maildir(path)
    return path


def payload(i: int, size: int = 20_000) -> bytes:
    return (b"Subject: %d\r\n\r\n" % i) + b"x" * size + b"\r\nEND-%d\r\n" % i


class Syscalls:
    """Records the order of the durability calls (the real ones still run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_fd_of: str | None = None) -> None:
        self.events: list[tuple[str, str]] = []
        self.fd_names: dict[int, str] = {}
        self.fail_fd_of = fail_fd_of
        real_open, real_fdatasync, real_fsync, real_replace = os.open, os.fdatasync, os.fsync, os.replace
        self.open_now = 0
        self.most_open = 0
        self.created: set[int] = set()

        def opened(path, flags, mode=0o777, **kw):
            fd = real_open(path, flags, mode, **kw)
            self.fd_names[fd] = os.fspath(path)
            if flags & os.O_CREAT:
                self.created.add(fd)
                self.open_now += 1
                self.most_open = max(self.most_open, self.open_now)
            return fd

        def fdatasync(fd):
            name = self.fd_names.get(fd, "?")
            if self.fail_fd_of and self.fail_fd_of in Path(name).name:
                raise OSError(errno.EIO, "I/O error (test)")
            real_fdatasync(fd)
            self.events.append(("fdatasync", name))

        def fsync(fd):
            real_fsync(fd)
            self.events.append(("fsync", self.fd_names.get(fd, "?")))

        def replace(src, dst):
            real_replace(src, dst)
            self.events.append(("rename", os.fspath(src)))

        real_close = os.close

        def close(fd):
            self.fd_names.pop(fd, None)
            if fd in self.created:
                self.created.discard(fd)
                self.open_now -= 1
            real_close(fd)

        for name, fn in (("open", opened), ("fdatasync", fdatasync), ("fsync", fsync), ("replace", replace),
                         ("close", close)):
            monkeypatch.setattr(file_group.os, name, fn)


def test_files_appear_only_after_their_data_is_flushed_and_dirs_last(tmp_path, monkeypatch):
    box = maildir(tmp_path)
    calls = Syscalls(monkeypatch)
    group = FileGroup(tmp_path)
    for i in range(10):
        group.stage(i, box / "new" / f"m{i}", payload(i), tmp_dir=box / "tmp")
        assert list((box / "new").iterdir()) == []  # nothing visible while the round is under way
    assert group.finish() == {}
    kinds = [k for k, _ in calls.events]
    # every file's data is flushed before any file is renamed into new/; new/ is flushed last, once
    assert kinds == ["fdatasync"] * 10 + ["rename"] * 10 + ["fsync"], kinds
    assert calls.events[-1][1] == str(box / "new")
    flushed = {name for kind, name in calls.events if kind == "fdatasync"}
    assert flushed == {name for kind, name in calls.events if kind == "rename"}
    assert sorted(p.read_bytes() for p in (box / "new").iterdir()) == sorted(payload(i) for i in range(10))
    assert list((box / "tmp").iterdir()) == []


def test_a_file_whose_flush_fails_never_appears_and_fails_only_its_request(tmp_path, monkeypatch):
    box = maildir(tmp_path)
    Syscalls(monkeypatch, fail_fd_of="m3.")
    group = FileGroup(tmp_path)
    for i in range(6):
        group.stage(i, box / "new" / f"m{i}", payload(i), tmp_dir=box / "tmp")
    errors = group.finish()
    assert set(errors) == {3} and errors[3].errno == errno.EIO
    assert sorted(p.name for p in (box / "new").iterdir()) == [f"m{i}" for i in (0, 1, 2, 4, 5)]
    assert list((box / "tmp").iterdir()) == []  # its temporary file is gone too


def test_a_discarded_request_leaves_nothing(tmp_path):
    box = maildir(tmp_path)
    group = FileGroup(tmp_path)
    group.stage(0, box / "new" / "keep", b"a")
    group.stage(1, box / "new" / "drop", b"b", tmp_dir=box / "tmp")
    group.discard(1)
    assert group.finish() == {}
    assert [p.name for p in (box / "new").iterdir()] == ["keep"]
    assert list((box / "tmp").iterdir()) == []


def test_an_earlier_delivery_is_not_written_again(tmp_path):
    box = maildir(tmp_path)
    (box / "cur" / "m0:2,").write_bytes(b"read already")
    group = FileGroup(tmp_path)
    group.stage(0, box / "new" / "m0", b"again", unless_exists=(box / "new" / "m0", box / "cur" / "m0:2,"))
    assert group.finish() == {}
    assert list((box / "new").iterdir()) == []


def test_a_big_round_holds_at_most_max_open_descriptors(tmp_path, monkeypatch):
    box = maildir(tmp_path)
    calls = Syscalls(monkeypatch)
    group = FileGroup(tmp_path)
    n = MAX_OPEN * 2 + 5
    for i in range(n):
        group.stage(i, box / "new" / f"m{i}", payload(i, 100), tmp_dir=box / "tmp")
    assert group.finish() == {}
    assert calls.most_open <= MAX_OPEN
    assert len(list((box / "new").iterdir())) == n
    # still: each file renamed only after its own flush
    seen: set[str] = set()
    for kind, name in calls.events:
        if kind == "fdatasync":
            seen.add(name)
        elif kind == "rename":
            assert name in seen


async def test_a_reader_of_new_only_ever_sees_complete_messages(tmp_path):
    """Deliveries through the spool's group commit while another thread reads new/
    as fast as it can: every file it opens is whole (the trailer is there)."""
    spool = Spool(tmp_path)
    spool.recover()
    box = maildir(tmp_path)
    stop = threading.Event()
    seen: dict[str, int] = {}
    torn: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            for p in list_messages(box):
                try:
                    data = p.read_bytes()
                except FileNotFoundError:
                    continue
                if not data.endswith(b"\r\nEND-%d\r\n" % int(p.name.split(".")[0][1:])):
                    torn.append(p.name)
                seen[p.name] = len(data)

    t = threading.Thread(target=reader)
    t.start()
    try:
        async def deliver(i: int) -> None:
            w = delivery_write(box, queue_id=f"Q{i:05d}", index=0, message=payload(i, 200_000), sender="a@x.example",
                               recipient="usera@y.example", hostname="host.example")
            # the name starts with the queue id: the reader checks for END-<i>
            await spool.committer.commit([w])

        await asyncio.gather(*(deliver(i) for i in range(150)))
    finally:
        stop.set()
        t.join()
        spool.close()
    assert torn == []
    assert len(list_messages(box)) == 150 and seen
    assert list((box / "tmp").iterdir()) == []


async def test_in_one_round_a_failing_delivery_fails_alone(tmp_path):
    """Through the spool's writer: one delivery cannot be written (its Maildir is
    gone), the others of the same round are delivered and their callers told so."""
    spool = Spool(tmp_path)
    spool.recover()
    good, gone = maildir(tmp_path, "Good"), tmp_path / "mailboxes" / "Gone"

    def write(box: Path, i: int):
        return delivery_write(box, queue_id=f"Q{i:05d}", index=0, message=payload(i, 10), sender="a@x.example",
                              recipient="r@y.example", hostname="host.example")

    try:
        results = await asyncio.gather(*(spool.committer.commit([write(gone if i == 4 else good, i)])
                                         for i in range(8)), return_exceptions=True)
    finally:
        spool.close()
    assert [isinstance(r, OSError) for r in results] == [i == 4 for i in range(8)]
    assert len(list_messages(good)) == 7
