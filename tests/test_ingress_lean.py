"""The lean SMTP session (``imsrelay.ingress.adapter.LEAN_SESSION``) answers exactly as
aiosmtpd's own command loop does.

The same byte scripts — valid sessions, pipelined groups, commands split across
packets, lower case, bad syntax, out of order, unknown commands, lines too long, bare
LFs, NUL and 8-bit bytes, DATA with and without content, errors up to the session's
limit — are played against one running site with the lean path on and with it off
(aiosmtpd's ``SMTP._handle_client``): the reply streams must be byte-identical (queue
ids and dates aside), and so must the messages the site queued (envelope and bytes) and
the SMTP protocol log's lines.
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

import pytest
from sitekit import make_config, running_site, site_mapping

from imsrelay.ingress import adapter

USER = b"User1@SiteA.microsoft.com"
QUEUE_ID = re.compile(rb"queued as \S+")
RECEIVED = re.compile(rb"id \S+(\r\n\tfor <[^>]*>)?; [^\r\n]+\r\n")
PLOG_ID = re.compile(r"queued as \S+")

MESSAGE = b"Subject: lean\r\nFrom: <a@example.org>\r\n\r\nhello\r\n..dot\r\n\r\n"

HAND_PICKED: list[list[bytes]] = [
    # the common session, one command per packet
    [b"EHLO client.example\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<" + USER + b">\r\n",
     b"DATA\r\n", MESSAGE + b".\r\n", b"QUIT\r\n"],
    # HELO, lower case, RSET, NOOP
    [b"helo client.example\r\n", b"noop\r\n", b"mail from:<a@example.org>\r\n", b"rset\r\n",
     b"mail FROM:<a@example.org>\r\n", b"rcpt to:<" + USER + b">\r\n", b"data\r\n", MESSAGE + b".\r\n", b"quit\r\n"],
    # everything pipelined in one packet, DATA content included
    [b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<" + USER + b">\r\nRCPT TO:<nobody@SiteA.microsoft.com>\r\n"
     b"DATA\r\n" + MESSAGE + b".\r\nNOOP\r\nQUIT\r\n"],
    # commands split across packets, in the middle of a word and between CR and LF
    [b"EH", b"LO c\r", b"\nMAIL FR", b"OM:<a@example.org>\r\nRC", b"PT TO:<" + USER + b">\r\nDA", b"TA\r\n",
     MESSAGE[:7], MESSAGE[7:] + b".\r", b"\nQUI", b"T\r\n"],
    # out of order and bad syntax
    [b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<" + USER + b">\r\n", b"DATA\r\n", b"EHLO c\r\n", b"DATA\r\n",
     b"RCPT TO:<" + USER + b">\r\n", b"MAIL FROM:<a@example.org>\r\n", b"MAIL FROM:<b@example.org>\r\n",
     b"MAIL FROM:a\r\n", b"RCPT TO:\r\n", b"RCPT\r\n", b"MAIL\r\n", b"HELO\r\n", b"EHLO\r\n", b"DATA x\r\n",
     b"RSET x\r\n", b"QUIT x\r\n", b"NOOP anything\r\n", b"QUIT\r\n"],
    # unknown and other commands between common ones (handed to aiosmtpd's loop and back)
    [b"EHLO c\r\nXYZZY\r\nHELP\r\nNOOP\r\nVRFY <a@b.c>\r\nMAIL FROM:<a@example.org>\r\nEXPN x\r\n"
     b"RCPT TO:<" + USER + b">\r\nETRN x\r\nDATA\r\n" + MESSAGE + b".\r\nQUIT\r\n"],
    # empty lines, spaces, tabs, NUL and 8-bit bytes, a bare LF
    [b"\r\n", b" \r\n", b"EHLO c\r\n", b"NOOP\x00\r\n", b"\xff\xfe\r\n", b"MA\xc3\xa9L FROM:<a@b.c>\r\n",
     b"MAIL FROM:<\xc3\xa9@example.org> SMTPUTF8\r\n", b"RSET\n", b"MAIL\tFROM:<a@example.org>\r\n",
     b"NOOP\r\r\n", b"QUIT\r\n"],
    # lines too long, as a command and as an argument
    [b"EHLO c\r\n", b"NOOP " + b"x" * 600 + b"\r\n", b"MAIL FROM:<" + b"a" * 1100 + b"@example.org>\r\n",
     b"X" * 3000 + b"\r\n", b"RCPT TO:<" + b"b" * 300 + b"@example.org>\r\n", b"NOOP\r\n", b"QUIT\r\n"],
    # DSN, SIZE and BODY parameters, good and bad
    [b"EHLO c\r\nMAIL FROM:<a@example.org> RET=HDRS ENVID=Xy1 SIZE=100 BODY=8BITMIME\r\n"
     b"RCPT TO:<" + USER + b"> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;x@y.z\r\nRCPT TO:<" + USER + b"> NOTIFY=BOGUS\r\n"
     b"DATA\r\n" + MESSAGE + b".\r\nMAIL FROM:<a@example.org> SIZE=99999999999\r\n"
     b"MAIL FROM:<a@example.org> SIZE=\xc2\xb2\r\nMAIL FROM:<a@example.org> FOO=1\r\nQUIT\r\n"],
    # two transactions in one session, the second without QUIT until the end
    [b"EHLO c\r\n", b"MAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\n", MESSAGE + b".\r\n",
     b"MAIL FROM:<a@example.org>\r\nRCPT TO:<" + USER + b">\r\nDATA\r\n", MESSAGE + b".\r\nQUIT\r\n"],
    # QUIT with commands pipelined after it
    [b"EHLO c\r\nQUIT\r\nNOOP\r\nMAIL FROM:<a@example.org>\r\n"],
    # a DATA line too long, a message with a bare LF inside
    [b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<" + USER + b">\r\nDATA\r\n", b"x" * 1200 + b"\r\n.\r\n",
     b"MAIL FROM:<a@example.org>\r\nRCPT TO:<" + USER + b">\r\nDATA\r\n", b"a\nb\r\n.\r\n", b"QUIT\r\n"],
]

WORDS = [b"EHLO c", b"HELO c", b"ehlo", b"MAIL FROM:<a@example.org>", b"mail from:<b@example.org> SIZE=10",
         b"MAIL FROM:<>", b"MAIL FROM:<bad", b"RCPT TO:<" + USER + b">", b"rcpt to:<postmaster>",
         b"RCPT TO:<nobody@SiteA.microsoft.com>", b"RCPT TO:<a b>", b"DATA", b"data", b"RSET", b"NOOP", b"noop x",
         b"QUIT x", b"HELP", b"XYZZY", b"", b"VRFY x", b"AUTH PLAIN", b"STARTTLS", b"MAIL FROM:<a@example.org> RET=FULL",
         b"DATA\r\n" + MESSAGE + b".", b"\xe9\xe9", b"NOOP" + b" x" * 300]


def generated(n: int, seed: int = 28) -> list[list[bytes]]:
    """Random sessions of the words above, cut into packets at random places."""
    rnd = random.Random(seed)
    scripts = []
    for _ in range(n):
        stream = b"".join(rnd.choice(WORDS) + rnd.choice([b"\r\n"] * 8 + [b"\n", b"\r\r\n"])
                          for _ in range(rnd.randint(1, 12)))
        cuts = sorted(rnd.sample(range(1, len(stream)), min(len(stream) - 1, rnd.randint(0, 4))))
        scripts.append([stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)])
    return scripts


async def play(port: int, packets: list[bytes]) -> bytes:
    """Send each packet (letting the site answer between them), then end any DATA and
    QUIT; every reply the site wrote until it closed (read as they come: a site that
    closes early — too many errors — loses none of them to the client's later writes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = bytearray()

    async def read_all() -> None:
        try:
            while chunk := await reader.read(65536):
                got.extend(chunk)
        except ConnectionError:
            pass

    try:
        got += await reader.readuntil(b"\r\n")
        reading = asyncio.create_task(read_all())
        try:
            for packet in [*packets, b"\r\n.\r\nQUIT\r\n"]:
                writer.write(packet)
                await writer.drain()
                await asyncio.sleep(0.005)  # (not timed: gives the packet a segment of its own)
        except ConnectionError:
            pass  # the site closed first
        await asyncio.wait_for(reading, 20)
    finally:
        writer.close()
    return QUEUE_ID.sub(b"queued as <id>", bytes(got))


class Recorder:
    """What a site queued (``site.accept``) and wrote to its protocol log."""

    def __init__(self, site: Any) -> None:
        self.queued: list[tuple[Any, ...]] = []
        self.plog: list[tuple[str, str]] = []
        accept = site.accept

        async def recording_accept(env: Any, message: bytes) -> None:
            self.queued.append((env.sender, [(r.address, r.notify, r.orcpt) for r in env.recipients], env.helo,
                                env.smtputf8, env.body_8bit, env.ret, env.envid,
                                {k: v for k, v in env.extra.items()}, RECEIVED.sub(b"<received>", message)))
            await accept(env, message)

        site.accept = recording_accept
        if site.protocol_log is not None:
            line = site.protocol_log.line

            def recording_line(**kw: Any) -> None:
                self.plog.append((kw["who"], PLOG_ID.sub("queued as <id>", kw["text"])))
                line(**kw)

            site.protocol_log.line = recording_line

    def take(self) -> tuple[list[tuple[Any, ...]], list[tuple[str, str]]]:
        """What was recorded since the last take.  The protocol log without the client
        lines at its end that got no reply: lines a session still reads from its buffer
        after it closed the connection (QUIT, too many errors, a bare LF) depend on
        when the client's last packets arrived, not on the path."""
        queued, plog = self.queued, self.plog
        self.queued, self.plog = [], []
        while plog and plog[-1][0] == "C":
            plog.pop()
        return queued, plog


async def both_ways(site: Any, recorder: Recorder, packets: list[bytes], monkeypatch: pytest.MonkeyPatch
                    ) -> tuple[tuple[bytes, Any, Any], tuple[bytes, Any, Any]]:
    out = []
    for lean in (True, False):
        monkeypatch.setattr(adapter, "LEAN_SESSION", lean)
        replies = await play(site.bound_port, packets)
        await asyncio.sleep(0.05)  # the session's own end (its last log lines) after the close
        out.append((replies, *recorder.take()))
    return out[0], out[1]


SETTINGS = {
    "plain": {},
    "protocol log, bare LF refused, few errors": {
        "smtp": {"bare_newline": "reject", "max_errors": 6},
        "diagnostics": {"smtp_protocol_log": "maximum"},
    },
}


@pytest.mark.parametrize("settings", list(SETTINGS))
async def test_the_lean_session_answers_as_aiosmtpd_s_loop(tmp_path, monkeypatch, settings):
    cfg = make_config(tmp_path, site_mapping(**SETTINGS[settings]))
    async with running_site(cfg) as site:
        recorder = Recorder(site)
        queued_somewhere = False
        for packets in HAND_PICKED + generated(60):
            lean, plain = await both_ways(site, recorder, packets, monkeypatch)
            assert lean[0] == plain[0], packets
            assert lean[1] == plain[1], packets
            assert lean[2] == plain[2], packets
            queued_somewhere = queued_somewhere or bool(lean[1])
            if settings != "plain":
                assert lean[2], "the protocol log got the session"
        assert queued_somewhere


async def test_the_lean_path_takes_the_common_commands_and_hands_the_rest_over(tmp_path, monkeypatch):
    """The lean path really runs (the differential test above would pass with it idle):
    the common commands go through ``_lean_pump``; an unknown command goes through
    aiosmtpd's loop, and the lean path takes the next common one again."""
    taken: list[str] = []
    pump = adapter.ImsSMTP._lean_pump

    def counting_pump(self: adapter.ImsSMTP) -> Any:
        before = bytes(self._reader._buffer)  # type: ignore[attr-defined]
        step = pump(self)
        after = bytes(self._reader._buffer)  # type: ignore[attr-defined]
        if len(after) < len(before):
            taken.append(before[:len(before) - len(after)].decode())
        return step

    monkeypatch.setattr(adapter.ImsSMTP, "_lean_pump", counting_pump)
    cfg = make_config(tmp_path, site_mapping())
    async with running_site(cfg) as site:
        replies = await play(site.bound_port, [b"EHLO c\r\n", b"XYZZY\r\n", b"NOOP\r\n", b"QUIT\r\n"])
    assert b'500 5.5.2 Error: command "XYZZY" not recognized\r\n' in replies
    assert "EHLO c\r\n" in taken[0] and "XYZZY" not in "".join(taken) and "NOOP\r\n" in "".join(taken)


async def test_a_command_that_waits_is_finished_by_the_session_task(tmp_path, monkeypatch):
    """A handler hook that really waits (here: MAIL held up) is taken over by the
    session's task; the commands after it wait their turn and are answered in order."""
    cfg = make_config(tmp_path, site_mapping())
    async with running_site(cfg) as site:
        gate = asyncio.Event()
        admit = site.flow.admit

        async def slow_admit() -> Any:
            await gate.wait()
            return await admit()

        monkeypatch.setattr(site.flow, "admit", slow_admit)
        play_task = asyncio.create_task(play(site.bound_port, [
            b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<" + USER + b">\r\nNOOP\r\n"]))
        await asyncio.sleep(0.2)
        assert not play_task.done()
        gate.set()
        replies = await play_task
    lines = replies.split(b"\r\n")
    codes = [ln[:4] for ln in lines if ln[:3].isdigit() and ln[3:4] == b" "]
    assert codes == [b"220 ", b"250 ", b"250 ", b"250 ", b"250 ", b"500 ", b"500 ", b"221 "], replies
