"""The lean outbound exchange (``PipeliningProtocol.exchange``) against the plain path it
replaced (``execute_pipelined`` / ``execute_body``: one awaited read per reply).

Three levels, each comparing the two on the same input:

- the reply parser: ``_parse_reply`` (a shortcut for one-line replies) and aiosmtplib's
  ``_read_response_from_buffer`` on any buffer: the same reply, the same error, the same
  bytes left;
- one exchange over a real loopback socket with a scripted server (hypothesis: replies
  of every shape, cut anywhere, fewer or more than due, malformed, then a hang-up or
  silence): the same bytes on the wire, the same replies, the same error;
- whole deliveries by ``SmtpClient`` against ``ScriptPeer`` with ``PipeliningSMTP.lean``
  on and off: the same outcomes, the same commands and bodies at the peer, the same
  protocol log.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smtp_script_peer import ScriptPeer
from test_smtp_pipelining import ProtocolTrace, envelope, rcpt_by_name, route, smtp_client

from imsrelay.transport.pipelining import PipeliningProtocol, PipeliningSMTP

MESSAGE = b"From: a@partner.test\r\nTo: bob@partner.test\r\nSubject: hi\r\n\r\n.dot line\r\nhello\r\n"


# ------------------------------------------------------------------ the parser


def _parsed(buffer: bytes, lean: bool) -> tuple[Any, bytes]:
    loop = asyncio.new_event_loop()
    try:
        protocol = PipeliningProtocol(loop=loop)
        protocol._buffer.extend(buffer)
        try:
            reply: Any = protocol._parse_reply() if lean else protocol._read_response_from_buffer()
        except Exception as exc:  # noqa: BLE001 (compared, not handled)
            reply = (type(exc).__name__, str(exc))
        return reply, bytes(protocol._buffer)
    finally:
        loop.close()


reply_line = st.builds(
    lambda code, sep, text, end: code + sep + text + end,
    st.sampled_from([b"250", b"354", b"421", b"550", b"451", b"25", b"2x0", b" 25", b"", b"9999"]),
    st.sampled_from([b" ", b"-", b"", b"\t"]),
    st.one_of(st.binary(max_size=20), st.text(max_size=12).map(lambda t: t.encode("utf-8")),
              st.sampled_from([b"2.1.0 Ok  ", b"\xff\xfe bytes", b" \t padded \t"])),
    st.sampled_from([b"\r\n", b"\n", b"\r", b""]))


@settings(max_examples=400, deadline=None)
@given(st.lists(reply_line, max_size=4), st.sampled_from([0, 8192, 8200]))
def test_parser_shortcut_gives_what_aiosmtplib_gives(lines, long_line):
    buffer = b"".join(lines)
    if long_line:  # a line around aiosmtplib's MAX_LINE_LENGTH
        buffer = b"250 " + b"x" * (long_line - 6) + b"\r\n" + buffer
    assert _parsed(buffer, lean=True) == _parsed(buffer, lean=False)


# ------------------------------------------------------------------ one exchange on the wire


class _Scripted(asyncio.Protocol):
    """Greets, reads until ``until`` has come (the group's lines, or a body's end), then
    writes ``chunks`` with pauses and hangs up or stays silent."""

    def __init__(self, until: bytes, count: int, chunks: list[bytes], hang_up: bool, got: list[bytes]) -> None:
        self.until, self.count, self.chunks, self.hang_up, self.got = until, count, chunks, hang_up, got
        self.received = b""
        self.started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 scripted ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.got[:] = [self.received]
        if not self.started and self.received.count(self.until) >= self.count:
            self.started = True
            asyncio.ensure_future(self._answer())

    async def _answer(self) -> None:
        for chunk in self.chunks:
            await asyncio.sleep(0.004)
            self.transport.write(chunk)
        if self.hang_up:
            await asyncio.sleep(0.004)
            self.transport.close()


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


async def _one_exchange(lean: bool, *, lines: list[bytes] | None, body: bytes | None, script: bytes,
                        cuts: list[int], hang_up: bool, timeout: float) -> tuple[Any, bytes]:
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    until, count = (b"\r\n", len(lines)) if lines is not None else (b"\r\n.\r\n", 1)
    server = await loop.create_server(lambda: _Scripted(until, count, _cut(script, cuts), hang_up, got),
                                      "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = PipeliningSMTP(hostname="127.0.0.1", port=port, start_tls=False, use_tls=False, timeout=5)
    client.lean = lean
    try:
        await client.connect()
        result: Any
        if lines is not None:
            replies, error = await client.pipeline(lines, timeout=timeout)
            result = ([tuple(r) for r in replies], error and (type(error).__name__, str(error)))
        else:
            assert body is not None
            try:
                result = tuple(await client.send_body((body, b".\r\n"), timeout=timeout))
            except Exception as exc:  # noqa: BLE001
                result = (type(exc).__name__, str(exc))
        result = (result, client.is_connected)
    finally:
        client.close()
        server.close()
    return result, got[0] if got else b""


def _whole_reply(code: bytes, texts: list[bytes]) -> bytes:
    return b"".join(code + (b"-" if i < len(texts) - 1 else b" ") + t + b"\r\n" for i, t in enumerate(texts))


replies_strategy = st.lists(st.one_of(
    st.builds(_whole_reply, st.sampled_from([b"250", b"251", b"354", b"421", b"450", b"550", b"554"]),
              st.lists(st.sampled_from([b"2.1.0 Ok", b"", b"caf\xc3\xa9 \xff", b"  spaced  ", b"x" * 300]),
                       min_size=1, max_size=3)),
    st.sampled_from([b"2x0 malformed\r\n", b"250-first\r\nxyz bad continuation\r\n", b"25\n", b"354 bare lf\n"])),
    max_size=5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 4), replies_strategy, st.lists(st.integers(0, 10_000), max_size=4), st.booleans())
def test_pipelined_group_lean_and_plain_agree(rcpts, replies, cuts, hang_up):
    lines = [b"MAIL FROM:<a@partner.test> SIZE=10", *(b"RCPT TO:<r%d@partner.test>" % i for i in range(rcpts)),
             b"DATA"]
    script = b"".join(replies)
    if not hang_up and len(replies) < len(lines):
        hang_up = True  # (silence would only cost the time-out; time-outs are compared below)
    runs = [asyncio.run(_one_exchange(lean, lines=lines, body=None, script=script, cuts=cuts, hang_up=hang_up,
                                      timeout=3)) for lean in (False, True)]
    assert runs[0] == runs[1]
    assert runs[1][1] == b"".join(line + b"\r\n" for line in lines)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies_strategy, st.lists(st.integers(0, 10_000), max_size=3), st.booleans())
def test_body_lean_and_plain_agree(replies, cuts, hang_up):
    script = b"".join(replies)
    if not hang_up and not replies:
        hang_up = True
    runs = [asyncio.run(_one_exchange(lean, lines=None, body=MESSAGE, script=script, cuts=cuts, hang_up=hang_up,
                                      timeout=3)) for lean in (False, True)]
    assert runs[0] == runs[1]
    assert runs[1][1] == MESSAGE + b".\r\n"


@pytest.mark.parametrize("replies", [b"", b"250 2.1.0 Ok\r\n", b"250 2.1.0 Ok\r\n250-more to come\r\n"])
async def test_time_outs_agree(replies):
    """Replies that stop coming: the same SMTPReadTimeoutError, after the replies that came."""
    lines = [b"MAIL FROM:<a@partner.test>", b"RCPT TO:<b@partner.test>", b"DATA"]
    group = [await _one_exchange(lean, lines=lines, body=None, script=replies, cuts=[], hang_up=False,
                                 timeout=0.2) for lean in (False, True)]
    assert group[0] == group[1]
    (replies_got, error), connected = group[1][0]
    assert error == ("SMTPReadTimeoutError", "Timed out waiting for server response") and not connected
    body = [await _one_exchange(lean, lines=None, body=MESSAGE, script=replies[:0], cuts=[], hang_up=False,
                                timeout=0.2) for lean in (False, True)]
    assert body[0] == body[1] and body[1][0][0] == ("SMTPReadTimeoutError", "Timed out waiting for server response")


async def test_no_time_at_all_agrees():
    """``timeout=0``: nothing may be waited for (a reply not already in hand is a time-out)."""
    lines = [b"MAIL FROM:<a@partner.test>", b"DATA"]
    runs = [await _one_exchange(lean, lines=lines, body=None, script=b"250 ok\r\n354 go\r\n", cuts=[],
                                hang_up=True, timeout=0) for lean in (False, True)]
    assert runs[0] == runs[1]
    assert runs[1][0] == (([], ("SMTPReadTimeoutError", "Timed out waiting for server response")), False)


async def test_first_timeout_and_none_agree():
    """``first_timeout`` bounds the first reply only; ``timeout=None`` waits as long as it takes."""
    lines = [b"RSET", b"MAIL FROM:<a@partner.test>", b"DATA"]
    for timeout, first in ((None, 0.2), (0.2, None)):
        runs = []
        for lean in (False, True):
            loop = asyncio.get_running_loop()
            got: list[bytes] = []
            server = await loop.create_server(lambda got=got: _Scripted(b"\r\n", 3, [], False, got), "127.0.0.1", 0)
            client = PipeliningSMTP(hostname="127.0.0.1", port=server.sockets[0].getsockname()[1],
                                    start_tls=False, use_tls=False, timeout=5)
            client.lean = lean
            await client.connect()
            try:
                replies, error = await asyncio.wait_for(client.pipeline(lines, timeout=timeout, first_timeout=first),
                                                        1.0)
                runs.append((replies, type(error).__name__))
            except TimeoutError:
                runs.append("still waiting")
            finally:
                client.close()
                server.close()
        assert runs[0] == runs[1]
        assert runs[1] == ([], "SMTPReadTimeoutError")


# ------------------------------------------------------------------ whole deliveries


SCENARIOS: dict[str, dict[str, Any]] = {
    "plain": {},
    "mixed recipients": {"rcpt": rcpt_by_name},
    "withheld replies": {"withhold": True},
    "split replies": {"split": 3, "rcpt": rcpt_by_name},
    "hang-up at DATA": {"hang_up_at_data": True},
    "hang-up at DATA, nothing answered": {"hang_up_at_data": True, "answer_before_hang_up": False},
    "no recipient, DATA taken anyway": {"data_anyway": True, "rcpt": lambda a: "550 5.1.1 no such user"},
    "no recipient, DATA refused": {"rcpt": lambda a: "550 5.1.1 no such user"},
    "MAIL refused": {"mail": "553 5.7.1 sender refused"},
    "421 at RCPT": {"rcpt": lambda a: "421 4.3.2 closing" if a.startswith("b") else "250 2.1.5 Ok"},
    "multi-line RCPT reply": {"rcpt": lambda a: "250-2.1.5 fine\n250 2.1.5 really"},
    "body refused": {"final": "554 5.6.0 content refused"},
    "body deferred": {"final": "451 4.3.0 try later"},
    "DATA refused": {"data": "451 4.3.0 not now"},
    "without PIPELINING": {"pipelining": False, "rcpt": rcpt_by_name},
}


async def _deliveries(lean: bool, monkeypatch: pytest.MonkeyPatch, peer_args: dict[str, Any]) -> Any:
    monkeypatch.setattr(PipeliningSMTP, "lean", lean)
    peer = ScriptPeer(**peer_args)
    port = await peer.start()
    trace = ProtocolTrace()
    client = smtp_client(trace)
    outcomes = []
    try:  # twice: the second reuses the pooled connection (its RSET check goes with the group)
        for rcpts in (["a@partner.test", "bad@partner.test", "later@partner.test", "c@partner.test"],
                      ["b@partner.test", "d@partner.test"]):
            outcomes.append(await client.deliver(route(port), envelope(), rcpts, MESSAGE))
    finally:
        await client.close()
        peer.close()
    sessions = [([line for _, _, line in s.commands], s.bodies) for s in peer.sessions]
    result = (outcomes, sessions, trace.lines, client.connections_opened, client.connections_reused)
    return repr(result).replace(f":{port}", ":PORT")  # (each run has its own peer port)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_deliveries_lean_and_plain_agree(scenario, monkeypatch):
    plain = await _deliveries(False, monkeypatch, SCENARIOS[scenario])
    lean = await _deliveries(True, monkeypatch, SCENARIOS[scenario])
    assert lean == plain
    assert "Outcome(" in lean  # (the scenario delivered or refused something: it was exercised)
