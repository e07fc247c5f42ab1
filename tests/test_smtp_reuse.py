"""A pooled connection's RSET check pipelined with the next transaction, and the
protocol's reply deadline (one timer per connection instead of ``wait_for`` per reply)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiosmtplib.errors import SMTPReadTimeoutError, SMTPServerDisconnected
from smtp_script_peer import ScriptPeer, _Session
from test_smtp_pipelining import MESSAGE, by_kind, envelope, route, smtp_client

from imsrelay.transport.pipelining import PipeliningProtocol

SILENT = "silent"  # the peer answers nothing more (a half-open connection)


class ResetPeer(ScriptPeer):
    """A scripted peer whose sessions answer RSET as told by ``rset(session number)``:
    a reply, None to hang up without one, or SILENT to answer nothing from then on."""

    def __init__(self, rset, **kw: Any) -> None:
        super().__init__(**kw)
        self.rset = rset

    async def start(self, host: str = "127.0.0.1") -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _ResetSession(self), host=host, port=0)
        return int(self.server.sockets[0].getsockname()[1])


class _ResetSession(_Session):
    silent = False

    def _send(self, reply: str | list[str]) -> None:
        if not self.silent:
            super()._send(reply)

    def _command(self, line: bytes) -> None:
        if line.upper() != b"RSET":
            super()._command(line)
            return
        reply = self.peer.rset(len(self.peer.sessions))
        if reply is None:
            self.out.put_nowait(None)  # close, no reply; what follows in the group is never answered
            self.buffer = b""
        elif reply == SILENT:
            self.silent = True
        else:
            if reply.startswith("250"):
                self.mail_ok, self.accepted = False, 0
            self._send(reply)


async def two_deliveries(peer: ScriptPeer, **delivery):
    port = await peer.start()
    client = smtp_client(**delivery)
    try:
        first = await client.deliver(route(port), envelope(), ["a@partner.test"], MESSAGE)
        second = await client.deliver(route(port), envelope(), ["b@partner.test"], MESSAGE)
    finally:
        await client.close()
        peer.close()
    return client, first, second


async def test_the_check_of_a_pooled_connection_goes_in_the_transactions_write():
    peer = ScriptPeer(withhold=True)  # replies to MAIL and RCPT only after DATA: one write or nothing
    client, first, second = await two_deliveries(peer)
    assert by_kind(first) == {"a@partner.test": ("delivered", "2.0.0")}
    assert by_kind(second) == {"b@partner.test": ("delivered", "2.0.0")}
    (session,) = peer.sessions
    assert session.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "QUIT"]
    group = session.commands[4:8]
    assert len({chunk for chunk, _, _ in group}) == 1  # RSET, MAIL, RCPT and DATA in one read
    assert len(session.bodies) == 2
    assert client.connections_opened == 1 and client.connections_reused == 1


async def test_without_pipelining_the_check_is_answered_before_the_transaction():
    peer = ScriptPeer(pipelining=False)
    client, first, second = await two_deliveries(peer)
    assert by_kind(second) == {"b@partner.test": ("delivered", "2.0.0")}
    (session,) = peer.sessions
    assert session.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "QUIT"]
    rset, mail = session.commands[4], session.commands[5]
    assert mail[1] == rset[1] + 1  # MAIL came after RSET's reply was written
    assert client.connections_reused == 1


@pytest.mark.parametrize("reply", [
    None,  # the connection is gone: no reply at all
    "421 4.3.2 Service shutting down",
    "500 5.5.1 Huh?",  # refused, yet MAIL, RCPT and DATA are answered (DATA with 354)
])
async def test_a_failed_check_sends_the_transaction_over_a_new_connection(reply):
    peer = ResetPeer(lambda session: reply if session == 1 else "250 2.0.0 Ok")
    client, first, second = await two_deliveries(peer)
    assert by_kind(first) == {"a@partner.test": ("delivered", "2.0.0")}
    assert by_kind(second) == {"b@partner.test": ("delivered", "2.0.0")}
    old, new = peer.sessions
    assert len(old.bodies) == 1 and len(new.bodies) == 1  # the second message went once, on the new one
    assert new.verbs()[:4] == ["EHLO", "MAIL", "RCPT", "DATA"]
    assert client.connections_opened == 2 and client.connections_reused == 0


async def test_a_pooled_connection_that_never_answers_its_check_costs_the_check_time_out():
    peer = ResetPeer(lambda session: SILENT if session == 1 else "250 2.0.0 Ok")
    client, first, second = await two_deliveries(peer, command_timeout=0.5)
    assert by_kind(second) == {"b@partner.test": ("delivered", "2.0.0")}
    old, new = peer.sessions
    assert len(old.bodies) == 1 and len(new.bodies) == 1
    assert client.connections_opened == 2


# ------------------------------------------------------------------ the reply deadline


class _Timer:
    def __init__(self, when: float, callback) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class ClockLoop:
    """The running loop with a clock the test moves and timers it fires."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self.now, self.timers = loop, 0.0, []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback, *args):
        timer = _Timer(when, lambda: callback(*args))
        self.timers.append(timer)
        return timer

    def live(self) -> list[float]:
        return [t.when for t in self.timers if not t.cancelled]

    async def advance(self, to: float) -> None:
        self.now = to
        for timer in sorted(self.timers, key=lambda t: t.when):
            if not timer.cancelled and timer.when <= to:
                timer.cancelled = True
                timer.callback()
        for _ in range(3):
            await asyncio.sleep(0)

    def __getattr__(self, name: str):
        return getattr(self._loop, name)


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def write(self, data) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name, default=None):
        return default


async def clocked_protocol() -> tuple[PipeliningProtocol, ClockLoop]:
    clock = ClockLoop(asyncio.get_running_loop())
    protocol = PipeliningProtocol(loop=clock)  # type: ignore[arg-type]
    protocol.connection_made(_Transport())
    return protocol, clock


async def greeted(protocol: PipeliningProtocol, *, timeout: float) -> None:
    """The greeting read while awaited (the reply comes after the read armed its deadline)."""
    read = asyncio.ensure_future(protocol.read_response(timeout=timeout))
    await asyncio.sleep(0)
    protocol.data_received(b"220 ready\r\n")
    assert (await read).code == 220


async def test_a_reply_within_its_time_out_leaves_one_timer_that_follows_the_next_read():
    protocol, clock = await clocked_protocol()
    read = asyncio.ensure_future(protocol.read_response(timeout=5))
    await asyncio.sleep(0)
    assert clock.live() == [5.0]
    await clock.advance(1.0)
    protocol.data_received(b"220 ready\r\n")
    assert (await read).code == 220
    read = asyncio.ensure_future(protocol.read_response(timeout=5))  # due at 6: the timer at 5 re-arms
    await asyncio.sleep(0)
    assert clock.live() == [5.0]
    await clock.advance(5.0)
    assert not read.done() and clock.live() == [6.0]
    await clock.advance(5.9)
    protocol.data_received(b"250 ok\r\n")
    assert (await read).code == 250
    await clock.advance(6.0)  # nobody waits: the timer ends without a new one
    assert clock.live() == []


async def test_a_read_that_outlives_its_time_out_fails_as_aiosmtplib_said():
    protocol, clock = await clocked_protocol()
    await greeted(protocol, timeout=10)
    read = asyncio.ensure_future(protocol.read_response(timeout=2))  # sooner than the timer: a new one
    await asyncio.sleep(0)
    assert clock.live() == [2.0]
    await clock.advance(1.99)
    assert not read.done()
    await clock.advance(2.0)
    with pytest.raises(SMTPReadTimeoutError):
        await read
    assert isinstance(read.exception().__cause__, TimeoutError)
    protocol.data_received(b"250 late\r\n")  # a late reply is not handed to the next read
    read = asyncio.ensure_future(protocol.read_response(timeout=2))
    await asyncio.sleep(0)
    assert not read.done()
    read.cancel()


async def test_a_reply_already_there_needs_no_timer_and_a_lost_connection_cancels_it():
    protocol, clock = await clocked_protocol()
    await greeted(protocol, timeout=3)
    group = asyncio.ensure_future(protocol.execute_pipelined([b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>"], timeout=3))
    await asyncio.sleep(0)
    protocol.data_received(b"250 ok\r\n250 ok\r\n")
    replies, error = await group
    assert [r.code for r in replies] == [250, 250] and error is None
    read = asyncio.ensure_future(protocol.read_response(timeout=3))
    await asyncio.sleep(0)
    assert clock.live()
    protocol.connection_lost(None)
    assert clock.live() == []
    with pytest.raises(SMTPServerDisconnected):
        await read


async def test_a_time_out_of_zero_fails_at_once_unless_the_reply_is_there():
    protocol, _ = await clocked_protocol()
    protocol.data_received(b"220 ready\r\n")
    assert (await protocol.read_response(timeout=0)).code == 220
    with pytest.raises(SMTPReadTimeoutError):
        await protocol.read_response(timeout=0)
