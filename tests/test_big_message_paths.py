"""Issue 28's fast paths for big messages, each against the plain path it replaces:
the header without the body's copy, line ends counted in one pass, a queue file and
an outbound body written in parts instead of joined, a DATA chunk handed straight
to the scanner (tests/test_data_reader.py and test_data_wire.py hold the scanner's
own comparisons with aiosmtpd's line reader)."""

from __future__ import annotations

import asyncio
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from smtp_wire import Wire

from imsrelay.durable.committer import Append, GroupCommitter
from imsrelay.durable.journal import ENQUEUE, STATE, Journal
from imsrelay.ingress.data_reader import line_ends_clean
from imsrelay.model.envelope import Envelope, RecipientState
from imsrelay.model.message import header_block, split_message
from imsrelay.queue.spool import Spool, parse_queue_file, queue_file_bytes, queue_file_parts
from imsrelay.transport.smtp import _wire
from imsrelay.transport.smtp_body import crlf_clean, crlf_message, dot_stuffed, dot_stuffed_parts

TOKENS = [b"a", b"Subject: x", b":", b" ", b".", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\n\n", b"\r\r\n", b"\n\r"]
messages = st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join)


@given(messages)
def test_header_block_is_split_message_s_header(message: bytes) -> None:
    assert header_block(message) == split_message(message)[0]


def plain_line_ends_clean(raw: bytes, bare_lf_possible: bool) -> tuple[bytes, bool]:
    """The three whole-message counts line_ends_clean replaced."""
    lfs = raw.count(b"\n")
    if bare_lf_possible and raw.count(b"\r\n") != lfs:
        raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return raw, raw.count(b"\r") == lfs


@given(messages, st.booleans())
def test_line_ends_clean_is_the_three_counts(raw: bytes, bare_lf_possible: bool) -> None:
    if not bare_lf_possible and re.search(rb"(?<!\r)\n", raw):
        raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # (the DATA reader refused bare LFs)
    assert line_ends_clean(raw, bare_lf_possible=bare_lf_possible) == plain_line_ends_clean(raw, bare_lf_possible)


def envelope(size: int = 0) -> Envelope:
    return Envelope(queue_id="ABCDEF123456", sender="a@example.org",
                    recipients=[RecipientState(address="b@example.net", original="b@example.net")],
                    received_at=1.0, extra={"crlf": True})


@given(messages)
def test_a_queue_file_in_parts_is_the_queue_file(message: bytes) -> None:
    head, body = queue_file_parts(envelope(), message)
    assert body is message  # the message itself, not a copy
    assert head + body == queue_file_bytes(envelope(), message)
    env, start = parse_queue_file(head + body)
    assert (head + body)[start:] == message and env.size == len(message)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.lists(st.binary(max_size=300), min_size=1, max_size=4)), min_size=1,
                max_size=6))
def test_a_record_written_in_parts_reads_back_as_the_joined_record(tmp_path_factory, records) -> None:  # type: ignore[no-untyped-def]
    """A journal record whose payload comes in parts has the bytes, length and CRC of
    the same payload joined (a plain journal written with joined payloads is identical)."""
    parted, joined = tmp_path_factory.mktemp("parted"), tmp_path_factory.mktemp("joined")
    as_parts = [(ENQUEUE if split else STATE, tuple(parts) if split else b"".join(parts)) for split, parts in records]
    as_bytes = [(t, p if isinstance(p, bytes) else b"".join(p)) for t, p in as_parts]
    a, b = Journal(parted), Journal(joined)
    assert a.append(as_parts) == b.append(as_bytes)
    a.close()
    b.close()
    assert (parted / "00000001.log").read_bytes() == (joined / "00000001.log").read_bytes()
    assert [(r.type, bytes(r.payload)) for r in Journal(parted).scan()] == as_bytes


async def test_the_spool_replays_a_message_enqueued_in_parts(tmp_path) -> None:
    spool = Spool(tmp_path)
    spool.acquire()
    message = b"Subject: big\r\n\r\n" + b"0123456789abcdef\r\n" * 70_000
    env = envelope()
    await spool.enqueue(env, message)
    assert spool.read_message(env.queue_id) == message
    spool.close()
    again = Spool(tmp_path)
    (found,) = again.recover()
    assert found.queue_id == env.queue_id and again.read_message(env.queue_id) == message
    again.close()


async def test_the_committer_takes_a_record_in_parts(tmp_path) -> None:
    journal = Journal(tmp_path / "j")
    committer = GroupCommitter(tmp_path, journal)
    try:
        (loc,) = await committer.commit([Append(ENQUEUE, (b"head|", b"body"))])
    finally:
        committer.stop()
    assert journal.read(loc) == b"head|body"


dot_free = st.lists(st.sampled_from([b"a", b"b.c", b"\r\n", b" ", b"x."]), max_size=30).map(b"".join).filter(
    lambda m: not m.startswith(b".") and b"\r\n." not in m)


@given(messages | dot_free, st.booleans())
def test_the_outbound_body_in_parts_is_the_dot_stuffed_body(message: bytes, trust: bool) -> None:
    """What follows the 354, sent as parts, is byte for byte the plain path's
    ``dot_stuffed(crlf_message(message))``; ``known_dotless`` only when true."""
    clean = crlf_clean(message)
    dotless = not crlf_message(message).startswith(b".") and b"\r\n." not in crlf_message(message)
    size, parts = _wire(message, trust and clean, trust and dotless)
    wire = crlf_message(message)
    assert size == len(wire)
    assert b"".join(parts) == dot_stuffed(wire)
    if trust and clean and dotless and message.endswith(b"\r\n"):
        assert parts[0] is message  # sent as it is: no copy to add the final dot
    assert b"".join(dot_stuffed_parts(wire)) == dot_stuffed(wire)


async def test_a_message_arriving_with_data_in_one_write_is_taken_whole(tmp_path) -> None:
    """DATA, the message, the final dot and QUIT in one segment (everything already in
    the reader's buffer when DATA starts) and a message split across many segments
    are read alike (ImsSMTP._read_data: what the reader holds, then data_received)."""
    from imsrelay.ingress.adapter import ImsSMTP

    got: list[bytes] = []

    class Keep:
        def connect_refusal(self, peer_ip: str | None, listener: str) -> None:
            return None

        async def handle_DATA(self, server, session, env):  # type: ignore[no-untyped-def]
            got.append(env.original_content)
            return "250 2.0.0 Ok: kept"

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: ImsSMTP(Keep(), session_timeout=60, max_errors=10, hostname="h", data_size_limit=10_000_000,
                        enable_SMTPUTF8=True, decode_data=False),
        "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = b"Subject: s\r\n\r\n" + b"..dot line\r\n" + b"line\r\n" * 50_000

    def talk() -> tuple[bytes, bytes]:
        with Wire(port) as w:
            w.reply()
            w.send(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n" + body + b".\r\nNOOP\r\n")
            first = b"".join(w.reply() for _ in range(6))
            w.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
            b"".join(w.reply() for _ in range(3))
            for i in range(0, len(body), 1400):
                w.send(body[i:i + 1400])
            w.send(b".\r\nQUIT\r\n")
            second = w.reply() + w.reply()
            return first, second

    try:
        first, second = await asyncio.to_thread(talk)
    finally:
        server.close()
    assert first.endswith(b"250 2.0.0 Ok: kept\r\n250 2.0.0 OK\r\n"), first
    assert second.startswith(b"250 2.0.0 Ok: kept\r\n221"), second
    want = body.replace(b"\r\n..", b"\r\n.")
    assert got == [want, want]


def test_the_chunks_are_let_go_once_the_message_is_joined() -> None:
    """While the handler works (the flush before 250), a session holds its message
    once: content() drops the chunks it joined, and gives the same bytes again."""
    from imsrelay.ingress.data_reader import DataScanner

    s = DataScanner(size_limit=None, line_limit=1001, forbid_bare_lf=False)
    block = b"0123456789" * 7 + b"\r\n"
    for _ in range(100):
        s.feed(block * 100)
    assert s.feed(b".\r\nQUIT\r\n") == 3 and s.done
    first = s.content()
    assert first == block * 10_000 and s._parts == []
    assert s.content() is first


def test_a_maildir_delivery_in_parts_writes_the_joined_file(tmp_path) -> None:
    """A delivered file is written from its trace header and the message as parts
    (writev), with the bytes the joined file had."""
    from imsrelay.durable.file_group import FileGroup
    from imsrelay.transport.maildir import delivery_write, ensure_maildir, trace_headers

    box = tmp_path / "box"
    ensure_maildir(box)
    message = b"Subject: x\r\n\r\n" + b"y" * 300_000 + b"\r\n"
    write = delivery_write(box, queue_id="Q1", index=0, message=message, sender="a@b.example",
                           recipient="c@d.example", hostname="h.example")
    assert isinstance(write.data, tuple) and write.data[1] is message
    group = FileGroup(tmp_path)
    group.stage(1, write.path, write.data, tmp_dir=write.tmp_dir)
    assert group.finish() == {}
    written = write.path.read_bytes()
    assert written == b"".join(write.data) and written.endswith(message)
    assert written.startswith(trace_headers(sender="a@b.example", recipient="c@d.example", hostname="h.example",
                                            queue_id="Q1")[:40])
