"""The chunked DATA reader over real sockets: the same replies and content as
aiosmtpd's line reader for the same bytes (a differential test of the two paths),
and a site's Maildir holding exactly what was meant — dot-stuffing, bare CR/LF,
pipelined commands after the final dot, oversized messages, line limits, clients
that hang up or stall mid-DATA."""

from __future__ import annotations

import asyncio
import random
import re
import socket
from typing import Any

import pytest
import structlog
from sitekit import maildir_messages, make_config, running_site, site_mapping, wait_for
from smtp_script_peer import ScriptPeer
from smtp_wire import Wire, code

from imsrelay.ingress.adapter import (
    BARE_NEWLINE_REPLY,
    DATA_ON_LOOP,
    BareNewline,
    ImsSMTP,
    LineReader,
)
from imsrelay.ingress.data_reader import DataScanner

USER1 = b"User1@SiteA.microsoft.com"
_PREFIX = re.compile(rb"Return-Path: [^\r]*\r\nDelivered-To: [^\r]*\r\nReceived: by [^\r]*\r\n\t[^\r]*\r\n"
                     rb"Received: from [^\r]*\r\n\tby [^\r]*\r\n\tfor [^\r]*\r\n")


def start_data(w: Wire, rcpt: bytes, *, greeted: bool = False) -> None:
    """Greeting and EHLO (unless ``greeted``), MAIL, RCPT and DATA, up to the 354."""
    if not greeted:
        w.reply()
        w.cmd(b"EHLO client.example")
    w.cmd(b"MAIL FROM:<a@example.org>")
    w.cmd(b"RCPT TO:<" + rcpt + b">")
    assert code(w.cmd(b"DATA")) == 354


class Recorder:
    """A handler that keeps what DATA hands it."""

    def __init__(self) -> None:
        self.got: list[tuple[Any, bytes]] = []

    def connect_refusal(self, peer_ip: str | None, listener: str) -> None:
        return None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        assert envelope.content is envelope.original_content or envelope.content == envelope.original_content
        self.got.append((envelope.mail_from, envelope.original_content))
        return "250 2.0.0 Ok: kept"

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, BareNewline):
            return BARE_NEWLINE_REPLY
        return "451 4.3.0 Internal error"


class LineAtATime(ImsSMTP):
    """ImsSMTP with aiosmtpd's own DATA loop: the behaviour the chunked reader keeps."""

    async def _data(self, arg: str | None) -> None:
        await ImsSMTP.__mro__[1].smtp_DATA(self, arg)  # type: ignore[attr-defined]


async def _serve(cls: type[ImsSMTP], handler: Recorder, *, forbid: bool, limit: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: cls(handler, session_timeout=60, max_errors=1000, forbid_bare_lf=forbid, data_size_limit=limit,
                    enable_SMTPUTF8=True, decode_data=False, hostname="test.example"),
        "127.0.0.1", 0)


def _transcript(port: int, stream: bytes) -> bytes:
    """EHLO, MAIL, RCPT, DATA, then ``stream`` and QUIT in one write: every reply after 354."""
    with Wire(port, timeout=10) as w:
        start_data(w, b"b@example.org")
        w.send(stream + b"QUIT\r\n")
        out = w.buffer
        w.sock.settimeout(10)
        while True:
            try:
                chunk = w.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out


TOKENS = [b"x", b"hello ", b".", b"..", b"\r\n", b"\r\n", b"\r\n", b"\r", b"\n", b"\r\n.", b"\r\n..",
          b"\r\n.x", b" . ", b"\r\r\n", b"\n\r"]
NEXT = [b"", b"NOOP\r\n", b"MAIL FROM:<c@example.org>\r\nRCPT TO:<d@example.org>\r\nDATA\r\nsecond\r\n..\r\n.\r\n",
        b"RSET\r\n"]


def _long_line_with_bare_lf(stream: bytes) -> bool:
    """aiosmtpd checks a line longer than its limit for bare LF or not depending on how
    it arrived (timing): such streams are left out of the reject-mode comparison."""
    return any(len(line) > 1001 and b"\n" in line for line in stream.split(b"\r\n"))


def _streams(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        parts = [b"y" * rng.randint(995, 1006) if rng.random() < 0.05 else rng.choice(TOKENS)
                 for _ in range(rng.randint(0, 80))]
        if rng.random() < 0.1:
            parts.append(b"z" * rng.randint(2000, 70000))
        out.append(b"".join(parts) + b"\r\n.\r\n" + rng.choice(NEXT))
    return out


@pytest.mark.parametrize("forbid", [False, True])
async def test_the_chunked_reader_answers_as_aiosmtpd_s_line_reader(forbid):
    rng = random.Random(1605 + forbid)
    streams = [b".\r\n", b"..\r\n.\r\n", b"a\r\n.\r\nNOOP\r\n", b"a\nb\r\n.\r\n", b"\n.\r\n.\r\n"]
    streams += _streams(rng, 120)
    if forbid:
        streams = [s for s in streams if not _long_line_with_bare_lf(s)]
    for limit in (300, 100_000):
        new, old = Recorder(), Recorder()
        fast = await _serve(ImsSMTP, new, forbid=forbid, limit=limit)
        slow = await _serve(LineAtATime, old, forbid=forbid, limit=limit)
        try:
            fast_port, slow_port = (s.sockets[0].getsockname()[1] for s in (fast, slow))
            for stream in streams:
                got = await asyncio.to_thread(_transcript, fast_port, stream)
                want = await asyncio.to_thread(_transcript, slow_port, stream)
                assert got == want, stream
                assert new.got == old.got, stream
        finally:
            fast.close()
            slow.close()
        assert len(new.got) > 10, "the streams should include accepted messages"


def _strip_trace(delivered: bytes) -> bytes:
    m = _PREFIX.match(delivered)
    assert m, delivered[:400]
    return delivered[m.end():]


async def test_maildir_holds_exactly_the_unstuffed_message(tmp_path):
    cfg = make_config(tmp_path, site_mapping())
    body = (b"Subject: dots\r\n\r\n..leading dot\r\n.\r\r\nmid . dot.\r\n...\r\n.. \r\nbare\rcr\r\n"
            + b"".join(b"line %d .\r\n..%d\r\n" % (i, i) for i in range(3000)))
    expected = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in body.split(b"\r\n"))
    assert b"\r\n.leading dot\r\n\r\r\nmid . dot.\r\n..\r\n. \r\nbare\rcr\r\nline 0 .\r\n.0\r\n" in expected
    async with running_site(cfg) as site:
        def send() -> bytes:
            with Wire(site.bound_port) as w:
                start_data(w, USER1)
                return w.cmd(body + b".")

        reply = await asyncio.to_thread(send)
        assert reply.startswith(b"250 2.0.0 Ok: queued as"), reply
        (got,) = await wait_for(lambda: maildir_messages(cfg.data_dir, "User1"))
        assert _strip_trace(got) == expected


async def test_pipelined_commands_after_the_final_dot_are_answered(tmp_path):
    cfg = make_config(tmp_path, site_mapping())
    async with running_site(cfg) as site:
        def pipelined() -> list[bytes]:
            with Wire(site.bound_port) as w:
                w.reply()
                w.cmd(b"EHLO client.example")
                w.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<" + USER1 + b">\r\nDATA\r\n")
                replies = [w.reply(), w.reply(), w.reply()]
                w.send(b"Subject: one\r\n\r\n..first\r\n.\r\nMAIL FROM:<b@example.org>\r\nRCPT TO:<" + USER1
                       + b">\r\nDATA\r\n")
                replies += [w.reply(), w.reply(), w.reply(), w.reply()]
                w.send(b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
                replies += [w.reply(), w.reply()]
                return replies

        r = await asyncio.to_thread(pipelined)
        assert [code(x) for x in r] == [250, 250, 354, 250, 250, 250, 354, 250, 221], r
        got = await wait_for(lambda: (lambda m: m if len(m) == 2 else None)(maildir_messages(cfg.data_dir, "User1")))
        bodies = sorted(_strip_trace(m) for m in got)
        assert bodies == [b"Subject: one\r\n\r\n.first\r\n", b"Subject: two\r\n\r\nsecond\r\n"]


async def test_an_oversized_message_is_read_to_the_end_then_552_and_the_session_goes_on(tmp_path):
    cfg = make_config(tmp_path, site_mapping(smtp={"max_message_size": 4096}))
    async with running_site(cfg) as site:
        def big() -> list[bytes]:
            with Wire(site.bound_port) as w:
                start_data(w, USER1)
                w.send(b"Subject: big\r\n\r\n" + b"0123456789abcdef\r\n" * 50_000)  # 900 KB, no reply yet
                r = [w.cmd(b"."), w.cmd(b"NOOP")]
                start_data(w, USER1, greeted=True)
                r.append(w.cmd(b"Subject: long\r\n\r\n" + b"x" * 1500 + b"\r\n."))
                r.append(w.cmd(b"NOOP"))
                return r

        r = await asyncio.to_thread(big)
        assert r[0].startswith(b"552 5.3.4"), r
        assert r[1].startswith(b"250"), r  # the rest of the message was not taken for commands
        assert r[2].startswith(b"500 5.5.2 Line too long"), r
        assert r[3].startswith(b"250"), r
        assert site.qmgr.backlog == 0 and maildir_messages(cfg.data_dir, "User1") == []


@pytest.mark.parametrize("mode", ["normalize", "reject"])
async def test_bare_newlines_in_each_mode(tmp_path, mode):
    cfg = make_config(tmp_path, site_mapping(smtp={"bare_newline": mode}))
    async with running_site(cfg) as site:
        def send(body: bytes) -> tuple[bytes, bool]:
            with Wire(site.bound_port) as w:
                start_data(w, USER1)
                w.send(body[:5])  # the bare LF arrives in another segment than its line's end
                r = w.cmd(body[5:] + b".")
                return r, r.startswith(b"521") and w.closed()

        r, _ = await asyncio.to_thread(send, b"Subject: cr\r\n\r\nbare\rcr\r\n")
        assert code(r) == 250, r  # a bare CR is data in both modes
        r, closed = await asyncio.to_thread(send, b"Subj\nect: lf\r\n\r\n.dot\nbody\r\n")
        if mode == "reject":
            assert r.startswith(b"521 5.5.2") and closed, r
        else:
            assert code(r) == 250, r
        want = [b"Subject: cr\r\n\r\nbare\rcr\r\n"] + ([b"Subj\r\nect: lf\r\n\r\ndot\r\nbody\r\n"]
                                                      if mode == "normalize" else [])
        got = await wait_for(lambda: (lambda m: m if len(m) == len(want) else None)(
            maildir_messages(cfg.data_dir, "User1")))
        assert sorted(_strip_trace(m) for m in got) == sorted(want)


async def test_a_client_that_hangs_up_mid_data_leaves_nothing_queued(tmp_path):
    cfg = make_config(tmp_path, site_mapping())
    async with running_site(cfg) as site:
        def hang_up(reset: bool) -> None:
            w = Wire(site.bound_port)
            start_data(w, USER1)
            w.send(b"Subject: cut\r\n\r\n" + b"part of it\r\n" * 5000 + b"\r\n.")  # no CRLF after the dot
            if reset:
                w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            w.close()

        with structlog.testing.capture_logs() as logs:
            for reset in (False, True):
                await asyncio.to_thread(hang_up, reset)
            await wait_for(lambda: not [p for p in site.listeners.sessions if p.transport is not None])
            r = await asyncio.to_thread(lambda: Wire(site.bound_port).reply())  # the site still serves
            assert code(r) == 220
        assert site.qmgr.backlog == 0 and maildir_messages(cfg.data_dir, "User1") == []
        assert not [e for e in logs if e.get("log_level") == "error"], logs


async def test_a_client_that_stalls_mid_data_is_timed_out(tmp_path):
    cfg = make_config(tmp_path, site_mapping(smtp={"idle_timeout": "1s"}))
    async with running_site(cfg) as site:
        def stall() -> bool:
            with Wire(site.bound_port) as w:
                start_data(w, USER1)
                w.send(b"Subject: slow\r\n\r\nand then nothing")
                return w.closed()

        assert await asyncio.to_thread(stall)
        assert site.qmgr.backlog == 0 and maildir_messages(cfg.data_dir, "User1") == []


async def test_a_message_is_read_in_chunks_not_an_await_per_line(monkeypatch):
    """The point of the chunked reader: a 50 KB message of 700 lines costs a few reads,
    not aiosmtpd's readuntil per line."""
    calls: list[bytes] = []
    original = LineReader.readuntil
    reads = {"n": 0}
    original_feed = DataScanner.feed

    async def counting_readuntil(self: LineReader, separator: Any = b"\n") -> bytes:
        calls.append(separator)
        return await original(self, separator)

    def counting_feed(self: DataScanner, chunk: bytes) -> int:
        reads["n"] += 1
        return original_feed(self, chunk)

    monkeypatch.setattr(LineReader, "readuntil", counting_readuntil)
    monkeypatch.setattr(DataScanner, "feed", counting_feed)  # each chunk as delivered (data_received)
    handler = Recorder()
    server = await _serve(ImsSMTP, handler, forbid=False, limit=1_000_000)
    body = b"".join(b"line %04d of a fifty kilobyte message, more or less...\r\n" % i for i in range(800))
    try:
        port = server.sockets[0].getsockname()[1]
        replies = await asyncio.to_thread(_transcript, port, body + b".\r\n")
    finally:
        server.close()
    assert replies.startswith(b"250 2.0.0 Ok: kept\r\n221"), replies
    assert handler.got == [("a@example.org", body)]
    assert b"\r\n" not in calls, "DATA was read line by line"
    assert len(calls) <= 6 and 1 <= reads["n"] < 100, (len(calls), reads)  # the commands; DATA in a few reads


async def test_a_big_message_is_whole_and_byte_identical(tmp_path):
    """Past DATA_ON_LOOP the message is un-stuffed on a thread: the same bytes."""
    cfg = make_config(tmp_path, site_mapping())
    rng = random.Random(3)
    meant = [b"Subject: big", b""] + [bytes(rng.choice(b"ab. \r") for _ in range(rng.randint(0, 200)))
                                     for _ in range(30000)]
    expected = b"".join(line + b"\r\n" for line in meant)
    body = b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n" for line in meant)  # stuffed
    assert len(body) > DATA_ON_LOOP and b"\r\n..\r\n" in body
    async with running_site(cfg) as site:
        def send() -> bytes:
            with Wire(site.bound_port, timeout=30) as w:
                start_data(w, USER1)
                return w.cmd(body + b".")

        assert (await asyncio.to_thread(send)).startswith(b"250 2.0.0 Ok: queued as")
        (got,) = await wait_for(lambda: maildir_messages(cfg.data_dir, "User1"), timeout=30)
        assert _strip_trace(got) == expected


class NoCancelOnEof(ImsSMTP):
    """aiosmtpd cancels the session when the client's side closes; without that, the
    reader itself sees the end of the stream mid-DATA."""

    def eof_received(self) -> bool | None:
        return asyncio.StreamReaderProtocol.eof_received(self)


async def test_the_end_of_the_stream_mid_data_queues_nothing_and_answers_nothing():
    handler = Recorder()
    server = await _serve(NoCancelOnEof, handler, forbid=False, limit=100_000)

    def half_close(port: int) -> bytes:
        with Wire(port) as w:
            start_data(w, b"b@example.org")
            w.send(b"Subject: cut\r\n\r\nno end")
            w.sock.shutdown(socket.SHUT_WR)
            return w.reply()

    try:
        with structlog.testing.capture_logs() as logs:
            after = await asyncio.to_thread(half_close, server.sockets[0].getsockname()[1])
    finally:
        server.close()
    assert after == b"" and handler.got == [], after
    assert not [e for e in logs if e.get("log_level") == "error"], logs


@pytest.mark.parametrize("mode", ["normalize", "reject"])
async def test_the_ingress_tells_outbound_delivery_whether_line_ends_are_clean(tmp_path, mode):
    """A message whose every line ends in CRLF is queued with ``crlf``: outbound delivery
    sends it without counting again.  One with a lone CR is not, and is sent with CRLF
    line ends as before (the plain path)."""
    peer = ScriptPeer()
    port = await peer.start()
    cfg = make_config(tmp_path, site_mapping(smtp={"bare_newline": mode}, email_domains=[
        {"domain": "partner.test", "host": "127.0.0.1", "port": port}]))
    messages = {"clean": b"Subject: clean\r\n\r\nline\r\n", "lone cr": b"Subject: cr\r\n\r\nlone\rcr\r\n",
                "dot": b"Subject: dot\r\n\r\n..dot line\r\n"}
    queued: list[dict[str, Any]] = []
    try:
        async with running_site(cfg) as site:
            accept = site.accept

            async def recording(env: Any, message: bytes) -> None:
                queued.append(dict(env.extra))
                await accept(env, message)

            site.accept = recording  # type: ignore[method-assign]

            def send(body: bytes) -> bytes:
                with Wire(site.bound_port, timeout=30) as w:
                    start_data(w, b"bob@partner.test")
                    return w.cmd(body + b".")

            for body in messages.values():
                assert (await asyncio.to_thread(send, body)).startswith(b"250 ")
            await wait_for(lambda: sum(len(s.bodies) for s in peer.sessions) == 3, timeout=30)
    finally:
        peer.close()
    assert [(e.get("crlf"), e.get("dotless")) for e in queued] == [(True, True), (None, None), (True, None)]
    bodies = sorted(b[b.index(b"Subject:"):] for s in peer.sessions for b in s.bodies)
    assert bodies == [b"Subject: clean\r\n\r\nline\r\n.\r\n", b"Subject: cr\r\n\r\nlone\r\ncr\r\n.\r\n",
                      b"Subject: dot\r\n\r\n..dot line\r\n.\r\n"]  # the dot line stuffed again
