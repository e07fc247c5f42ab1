"""What a Maildir delivery writes: trace headers whose date is the moment of delivery
(formatted once per second, never stale) and the paths of the write (final name in
new/, temporary file in tmp/, the earlier-delivery names it checks)."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

from imsrelay.model import header_date
from imsrelay.queue.spool import Spool
from imsrelay.transport.maildir import delivery_write, ensure_maildir, trace_headers, unique_name


def received_date(headers: bytes) -> str:
    return headers.decode().rsplit("; ", 1)[1].rstrip("\r\n")


def test_the_received_date_follows_the_clock(monkeypatch):
    clock = [1796189373.9]
    monkeypatch.setattr(header_date.time, "time", lambda: clock[0])
    kw = dict(sender="a@example.org", recipient="b@example.net", hostname="mx.example.net", queue_id="Q1")
    first = trace_headers(**kw)
    assert received_date(first) == format_datetime(datetime.fromtimestamp(1796189373, UTC))
    clock[0] = 1796189373.2  # the same second: the same text
    assert trace_headers(**kw) == first
    for later in (1796189374.0, 1796189374.5, 1796193000.0, 1796189373.0):
        clock[0] = later
        date = received_date(trace_headers(**kw))
        assert parsedate_to_datetime(date) == datetime.fromtimestamp(int(later), UTC)


def test_an_explicit_moment_is_used_as_given():
    moment = datetime(2026, 12, 2, 5, 33, 6, 999_000, tzinfo=UTC)
    headers = trace_headers(sender="", recipient="b@example.net", hostname="h.example", queue_id="Q2", now=moment)
    assert headers == (b"Return-Path: <>\r\nDelivered-To: b@example.net\r\n"
                       b"Received: by h.example (imsrelay) with local id Q2\r\n"
                       b"\tfor <b@example.net>; Wed, 02 Dec 2026 05:33:06 +0000\r\n")


def test_the_write_names_its_maildir_and_no_other(tmp_path):
    boxes = [tmp_path / "mailboxes" / name for name in ("UserA", "UserB")]
    for i, box in enumerate(boxes * 2):
        w = delivery_write(box, queue_id=f"Q{i}", index=i % 3, message=b"m", sender="a@x.example",
                           recipient="u@y.example", hostname="h.example")
        unique = unique_name(f"Q{i}", i % 3)
        assert w.path == box / "new" / unique
        assert w.tmp_dir == box / "tmp"
        assert w.unless_exists == (box / "new" / unique, box / "cur" / unique, box / "cur" / f"{unique}:2,")
        data = b"".join(w.data) if isinstance(w.data, tuple) else w.data  # (written as parts)
        assert data.endswith(b"\r\nm") and b"with local id Q%d\r\n" % i in data


async def test_a_delivered_file_is_found_again_by_its_names(tmp_path):
    box = tmp_path / "mailboxes" / "UserA"
    ensure_maildir(box)
    spool = Spool(tmp_path)
    spool.recover()

    def write(text: bytes):
        return delivery_write(box, queue_id="Q7", index=0, message=text, sender="a@x.example",
                              recipient="u@y.example", hostname="h.example")

    await spool.committer.commit([write(b"first")])
    (delivered,) = (box / "new").iterdir()
    delivered.rename(box / "cur" / f"{delivered.name}:2,")  # a reader saw it
    await spool.committer.commit([write(b"again")])  # delivery repeated after a crash
    assert list((box / "new").iterdir()) == []
    assert [p.read_bytes().endswith(b"first") for p in (box / "cur").iterdir()] == [True]
    spool.close()
