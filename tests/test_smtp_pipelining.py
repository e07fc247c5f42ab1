"""Outbound PIPELINING (RFC 2920) and the DATA body sent as queued, against a scripted
peer over real loopback sockets (tests/smtp_script_peer.py)."""

from __future__ import annotations

import asyncio
import random

import pytest
import structlog
from aiosmtplib.errors import SMTPServerDisconnected, SMTPTimeoutError
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from sitekit import config_of, site_mapping
from smtp_script_peer import ScriptPeer

from imsrelay.model.envelope import Envelope
from imsrelay.routing.dns import NextHop
from imsrelay.routing.router import RELAY, Route
from imsrelay.transport.pipelining import PipeliningProtocol, PipeliningSMTP
from imsrelay.transport.smtp import SmtpClient, pipelined_stage
from imsrelay.transport.smtp_body import crlf_clean, crlf_message, dot_stuffed

SENDER = "User1@SiteA.microsoft.com"
MESSAGE = b"From: User One <User1@SiteA.microsoft.com>\r\nTo: bob@partner.test\r\nSubject: hi\r\n\r\nhello\r\n"


class NoDns:
    """Every next hop here is an address literal: nothing may be looked up."""

    async def addresses(self, host):
        raise AssertionError(f"looked up {host}")

    async def next_hops(self, domain, port=25):
        raise AssertionError(f"looked up {domain}")


class ProtocolTrace:
    """The protocol log hook: (who, text) of every line, in order."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def line(self, *, direction, session, peer, queue_id, who, text) -> None:
        assert direction == "out" and queue_id in (None, "Q1")
        self.lines.append((who, text))


def smtp_client(trace: ProtocolTrace | None = None, **delivery) -> SmtpClient:
    config = config_of(site_mapping("SiteA", delivery={"command_timeout": 3, "connect_timeout": 2, **delivery}))
    return SmtpClient(config, NoDns(), frozenset(), structlog.get_logger("test"), protocol_log=trace)


def route(port: int) -> Route:
    return Route(recipient="bob@partner.test", kind=RELAY, steps=(), host="127.0.0.1", port=port,
                 domain="partner.test", starttls="none")


def envelope(**kw) -> Envelope:
    return Envelope(queue_id="Q1", sender=SENDER, recipients=[], received_at=0.0, **kw)


async def deliver(peer: ScriptPeer, rcpts: list[str], message: bytes = MESSAGE, *, trace=None,
                  env: Envelope | None = None, **delivery):
    port = await peer.start()
    client = smtp_client(trace, **delivery)
    try:
        return await client.deliver(route(port), env or envelope(), rcpts, message)
    finally:
        await client.close()
        peer.close()


def by_kind(outcomes) -> dict[str, tuple[str, str]]:
    return {r: ("delivered" if o.ok else "bounced" if o.permanent else "deferred", o.status)
            for r, o in outcomes.items()}


def rcpt_by_name(address: str) -> str:
    if address.startswith("bad"):
        return f"550 5.1.1 <{address}>: Recipient address rejected: unknown user"
    if address.startswith("later"):
        return f"450 4.2.0 <{address}>: mailbox busy"
    return "250 2.1.5 Ok"


# ------------------------------------------------------------------ the pipelined group


async def test_pipelined_group_is_one_write_read_before_any_reply():
    peer = ScriptPeer(withhold=True)  # no reply to MAIL or RCPT until DATA has been read
    trace = ProtocolTrace()
    rcpts = ["a@partner.test", "b@partner.test", "c@partner.test"]
    outcomes = await deliver(peer, rcpts, trace=trace)
    assert by_kind(outcomes) == {r: ("delivered", "2.0.0") for r in rcpts}
    session = peer.sessions[0]
    assert session.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "QUIT"]
    group = session.commands[1:6]
    assert len({chunk for chunk, _, _ in group}) == 1  # MAIL, RCPTs and DATA came in one read
    assert {written for _, written, _ in group} == {2}  # ... before any reply but the greeting and EHLO's
    assert session.bodies == [MESSAGE + b".\r\n"]
    # the protocol log shows every command, then every reply, then the body's reply
    texts = [f"{who}: {text}" for who, text in trace.lines]
    start = texts.index(f"C: MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}")
    assert texts[start:start + 11] == [
        f"C: MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}",
        "C: RCPT TO:<a@partner.test>", "C: RCPT TO:<b@partner.test>", "C: RCPT TO:<c@partner.test>",
        f"C: DATA (then the message, {len(MESSAGE)} bytes)",
        "S: 250 2.1.0 Ok", "S: 250 2.1.5 Ok", "S: 250 2.1.5 Ok", "S: 250 2.1.5 Ok",
        "S: 354 End data with <CR><LF>.<CR><LF>", "S: 250 2.0.0 Ok: queued"]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_mixed_rcpt_results_send_the_message_for_the_accepted_ones_only(pipelining):
    peer = ScriptPeer(rcpt=rcpt_by_name, pipelining=pipelining)
    outcomes = await deliver(peer, ["good@partner.test", "bad@partner.test", "later@partner.test",
                                    "fine@partner.test"])
    assert by_kind(outcomes) == {"good@partner.test": ("delivered", "2.0.0"),
                                 "bad@partner.test": ("bounced", "5.1.1"),
                                 "later@partner.test": ("deferred", "4.2.0"),
                                 "fine@partner.test": ("delivered", "2.0.0")}
    assert outcomes["bad@partner.test"].diagnostic == \
        "smtp; 550 5.1.1 <bad@partner.test>: Recipient address rejected: unknown user"
    assert outcomes["good@partner.test"].diagnostic == "smtp; 250 2.0.0 Ok: queued"
    assert len(peer.sessions[0].bodies) == 1


async def test_all_rcpts_refused_sends_no_body_and_resets():
    peer = ScriptPeer(rcpt=rcpt_by_name)
    trace = ProtocolTrace()
    outcomes = await deliver(peer, ["bad1@partner.test", "later@partner.test"], trace=trace)
    assert by_kind(outcomes) == {"bad1@partner.test": ("bounced", "5.1.1"), "later@partner.test": ("deferred", "4.2.0")}
    session = peer.sessions[0]
    assert session.bodies == []
    assert session.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "RSET", "QUIT"]
    assert ("S", "554 5.5.1 Error: no valid recipients") in trace.lines


async def test_all_rcpts_refused_but_data_accepted_ends_with_an_empty_message():
    peer = ScriptPeer(rcpt=rcpt_by_name, data_anyway=True)  # RFC 2920 §3.1: the client must check
    outcomes = await deliver(peer, ["bad@partner.test"])
    assert by_kind(outcomes) == {"bad@partner.test": ("bounced", "5.1.1")}
    session = peer.sessions[0]
    assert session.bodies == [b".\r\n"]  # a single dot, not the message
    assert session.verbs()[-1] == "QUIT"


@pytest.mark.parametrize(("mail", "kind", "status"), [
    ("550 5.7.1 <User1@SiteA.microsoft.com>: Sender address rejected", "bounced", "5.7.1"),
    ("451 4.3.0 Try again later", "deferred", "4.3.0"),
])
@pytest.mark.parametrize("pipelining", [True, False])
async def test_mail_refused_gives_every_recipient_its_outcome(mail, kind, status, pipelining):
    peer = ScriptPeer(mail=mail, pipelining=pipelining)
    outcomes = await deliver(peer, ["a@partner.test", "b@partner.test"])
    assert by_kind(outcomes) == {"a@partner.test": (kind, status), "b@partner.test": (kind, status)}
    assert outcomes["a@partner.test"].diagnostic == f"smtp; {mail}"
    assert peer.sessions[0].bodies == []


@pytest.mark.parametrize(("data", "kind", "status"), [
    ("554 5.7.1 Message refused", "bounced", "5.7.1"),
    ("451 4.3.0 Queue full", "deferred", "4.3.0"),
    ("250 2.0.0 Ok", "deferred", "4.5.0"),  # a 250 where 354 belongs delivers nothing
])
@pytest.mark.parametrize("pipelining", [True, False])
async def test_data_refused_applies_to_every_accepted_recipient(data, kind, status, pipelining):
    peer = ScriptPeer(rcpt=rcpt_by_name, data=data, pipelining=pipelining)
    outcomes = await deliver(peer, ["a@partner.test", "bad@partner.test"])
    assert by_kind(outcomes) == {"a@partner.test": (kind, status), "bad@partner.test": ("bounced", "5.1.1")}
    assert peer.sessions[0].bodies == []


@pytest.mark.parametrize("pipelining", [True, False])
async def test_final_reply_after_the_body_decides(pipelining):
    peer = ScriptPeer(final="552 5.3.4 Message too big for this mailbox", pipelining=pipelining)
    outcomes = await deliver(peer, ["a@partner.test"])
    assert by_kind(outcomes) == {"a@partner.test": ("bounced", "5.3.4")}
    assert len(peer.sessions[0].bodies) == 1


async def test_disconnect_after_the_rcpt_replies_defers_the_accepted_never_delivers():
    peer = ScriptPeer(rcpt=rcpt_by_name, hang_up_at_data=True)
    trace = ProtocolTrace()
    outcomes = await deliver(peer, ["a@partner.test", "bad@partner.test", "b@partner.test"], trace=trace)
    assert by_kind(outcomes) == {"a@partner.test": ("deferred", "4.4.2"), "bad@partner.test": ("bounced", "5.1.1"),
                                 "b@partner.test": ("deferred", "4.4.2")}
    assert "while sending DATA" in outcomes["a@partner.test"].diagnostic
    assert any(who == "S" and text.startswith("<connection lost during DATA") for who, text in trace.lines)


async def test_disconnect_before_any_reply_defers_everyone():
    peer = ScriptPeer(withhold=True, hang_up_at_data=True, answer_before_hang_up=False)
    outcomes = await deliver(peer, ["a@partner.test", "b@partner.test"])
    assert by_kind(outcomes) == {"a@partner.test": ("deferred", "4.4.2"), "b@partner.test": ("deferred", "4.4.2")}
    assert "lost connection with" in outcomes["a@partner.test"].diagnostic
    assert "while sending MAIL FROM" in outcomes["a@partner.test"].diagnostic


async def test_a_421_to_mail_defers_everyone():
    peer = ScriptPeer(mail="421 4.3.2 Shutting down")
    outcomes = await deliver(peer, ["a@partner.test", "b@partner.test"])
    assert by_kind(outcomes) == {"a@partner.test": ("deferred", "4.3.2"), "b@partner.test": ("deferred", "4.3.2")}


async def test_a_421_to_a_rcpt_ends_the_session_for_the_rest():
    def rcpt(address: str) -> str:
        return "421 4.4.2 Closing connection" if address.startswith("c") else rcpt_by_name(address)

    peer = ScriptPeer(rcpt=rcpt)
    outcomes = await deliver(peer, ["a@partner.test", "bad@partner.test", "c@partner.test", "d@partner.test"])
    kinds = by_kind(outcomes)
    assert kinds["bad@partner.test"] == ("bounced", "5.1.1")
    assert {kinds[r] for r in ("a@partner.test", "c@partner.test", "d@partner.test")} == {("deferred", "4.4.2")}
    assert peer.sessions[0].bodies == []


async def test_replies_split_across_packets_and_multiline_are_paired_in_order():
    def rcpt(address: str) -> str:
        if address.startswith("multi"):
            return "250 2.1.5 first line\n250 2.1.5 second line"
        return rcpt_by_name(address)

    peer = ScriptPeer(rcpt=rcpt, split=3, withhold=True)
    trace = ProtocolTrace()
    rcpts = ["multi@partner.test", "bad@partner.test", "later@partner.test", "ok@partner.test"]
    outcomes = await deliver(peer, rcpts, trace=trace)
    assert by_kind(outcomes) == {"multi@partner.test": ("delivered", "2.0.0"), "bad@partner.test": ("bounced", "5.1.1"),
                                 "later@partner.test": ("deferred", "4.2.0"), "ok@partner.test": ("delivered", "2.0.0")}
    assert ("S", "250-2.1.5 first line") in trace.lines and ("S", "250 2.1.5 second line") in trace.lines
    assert len(peer.sessions[0].bodies) == 1


async def test_a_client_that_waits_for_each_reply_gets_none_from_a_withholding_peer():
    """The withholding peer tells a pipelining client from one that is not (as before)."""
    peer = ScriptPeer(pipelining=False, withhold=True)
    outcomes = await deliver(peer, ["a@partner.test"], command_timeout=0.5)
    assert by_kind(outcomes) == {"a@partner.test": ("deferred", "4.4.2")}
    assert "timed out while sending MAIL FROM" in outcomes["a@partner.test"].diagnostic


async def test_connections_are_reused_after_pipelined_transactions():
    peer = ScriptPeer(rcpt=rcpt_by_name)
    port = await peer.start()
    client = smtp_client()
    try:
        for i in range(3):
            outcomes = await client.deliver(route(port), envelope(), [f"a{i}@partner.test", "bad@partner.test"],
                                            MESSAGE)
            assert by_kind(outcomes)[f"a{i}@partner.test"] == ("delivered", "2.0.0")
        outcomes = await client.deliver(route(port), envelope(), ["bad@partner.test"], MESSAGE)
        outcomes = await client.deliver(route(port), envelope(), ["z@partner.test"], MESSAGE)
        assert by_kind(outcomes) == {"z@partner.test": ("delivered", "2.0.0")}
    finally:
        await client.close()
        peer.close()
    assert len(peer.sessions) == 1 and client.connections_reused == 4
    assert len(peer.sessions[0].bodies) == 4


# ------------------------------------------------------------------ without PIPELINING


async def test_a_server_without_pipelining_gets_one_command_at_a_time():
    peer = ScriptPeer(pipelining=False, rcpt=rcpt_by_name)
    trace = ProtocolTrace()
    outcomes = await deliver(peer, ["a@partner.test", "bad@partner.test", "b@partner.test"], trace=trace)
    assert by_kind(outcomes) == {"a@partner.test": ("delivered", "2.0.0"), "bad@partner.test": ("bounced", "5.1.1"),
                                 "b@partner.test": ("delivered", "2.0.0")}
    session = peer.sessions[0]
    assert session.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "QUIT"]
    # each command was read only after the reply to the one before had been written
    assert [written for _, written, _ in session.commands] == [1, 2, 3, 4, 5, 6, 8]  # 354 + the body's reply
    assert session.bodies == [MESSAGE + b".\r\n"]
    texts = [f"{who}: {text}" for who, text in trace.lines]
    i = texts.index(f"C: DATA (then the message, {len(MESSAGE)} bytes)")
    assert texts[i + 1:i + 3] == ["S: 354 End data with <CR><LF>.<CR><LF>", "S: 250 2.0.0 Ok: queued"]


async def test_without_pipelining_all_refused_resets_without_data():
    peer = ScriptPeer(pipelining=False, rcpt=rcpt_by_name)
    outcomes = await deliver(peer, ["bad@partner.test"])
    assert by_kind(outcomes) == {"bad@partner.test": ("bounced", "5.1.1")}
    assert peer.sessions[0].verbs() == ["EHLO", "MAIL", "RCPT", "RSET", "QUIT"]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_mail_parameters_are_sent_as_before(pipelining):
    peer = ScriptPeer(pipelining=pipelining)
    body = "Subject: caf\u00e9\r\n\r\n\u00e9t\u00e9\r\n".encode()
    env = envelope(smtputf8=True, body_8bit=True)
    outcomes = await deliver(peer, ["b\u00f8b@partner.test"], body, env=env)
    assert by_kind(outcomes) == {"b\u00f8b@partner.test": ("delivered", "2.0.0")}
    session = peer.sessions[0]
    assert session.lines("MAIL") == [f"MAIL FROM:<{SENDER}> SIZE={len(body)} BODY=8BITMIME SMTPUTF8".encode()]
    assert session.lines("RCPT") == ["RCPT TO:<b\u00f8b@partner.test>".encode()]


async def test_a_peer_without_extensions_gets_no_parameters():
    peer = ScriptPeer(extensions=())
    outcomes = await deliver(peer, ["a@partner.test"], env=envelope(body_8bit=True))
    assert by_kind(outcomes) == {"a@partner.test": ("delivered", "2.0.0")}
    assert peer.sessions[0].lines("MAIL") == [f"MAIL FROM:<{SENDER}>".encode()]


# ------------------------------------------------------------------ the body, byte for byte


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize(("message", "sent"), [
    (b".leading dot\r\nmiddle\r\n.\r\n..two\r\nend", b"..leading dot\r\nmiddle\r\n..\r\n...two\r\nend\r\n.\r\n"),
    (b"Subject: x\r\n\r\n.\r\n", b"Subject: x\r\n\r\n..\r\n.\r\n"),
    (b"Subject: x\r\n\r\nno final line end", b"Subject: x\r\n\r\nno final line end\r\n.\r\n"),
    (b"Subject: x\r\n\r\nbare\nlf\n.dot\rlone cr\r\n", b"Subject: x\r\n\r\nbare\r\nlf\r\n..dot\r\nlone cr\r\n.\r\n"),
    (b"Subject: x\r\n\r\n\r\n\r\n", b"Subject: x\r\n\r\n\r\n\r\n.\r\n"),
])
async def test_the_body_goes_out_dot_stuffed_byte_for_byte(pipelining, message, sent):
    peer = ScriptPeer(pipelining=pipelining)
    outcomes = await deliver(peer, ["a@partner.test"], message)
    assert outcomes["a@partner.test"].ok
    assert peer.sessions[0].bodies == [sent]
    size = len(normalize_message_line_endings(message))  # SIZE: as sent, before dot-stuffing (RFC 1870)
    assert peer.sessions[0].lines("MAIL") == [f"MAIL FROM:<{SENDER}> SIZE={size}".encode()]


def test_a_queued_crlf_message_is_sent_as_it_is():
    wire = b"Subject: x\r\n\r\nline\r\n"
    assert crlf_clean(wire) and crlf_message(wire) is wire
    assert not crlf_clean(b"a\nb\r\n") and not crlf_clean(b"a\rb\r\n") and not crlf_clean(b"a\r\n\r")


def test_body_is_what_aiosmtplib_would_have_sent():
    """Our bytes operations against aiosmtplib's regexes on many random messages."""
    rng = random.Random(2920)
    alphabet = [b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b".."]
    for _ in range(5000):
        message = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"
        assert dot_stuffed(crlf_message(message)) == expected, message
        assert crlf_message(message) == normalize_message_line_endings(message), message


def test_the_stage_of_a_missing_pipelined_reply():
    assert [pipelined_stage(n, 2) for n in range(5)] == ["MAIL FROM", "RCPT TO", "RCPT TO", "DATA", "DATA"]


async def test_the_client_speaks_over_the_pipelining_protocol():
    peer = ScriptPeer()
    port = await peer.start()
    client = smtp_client()
    hop = NextHop("127.0.0.1", "127.0.0.1", port, 0)
    try:
        conn = await client._acquire(hop, "none", client._state(hop), structlog.get_logger("test"))
        assert isinstance(conn.client, PipeliningSMTP) and isinstance(conn.client.protocol, PipeliningProtocol)
        assert conn.client.supports_extension("pipelining")
        conn.client.close()
    finally:
        await client.close()
        peer.close()


# ------------------------------------------------------------------ the protocol, chunk by chunk


class FakeTransport(asyncio.Transport):
    def __init__(self, protocol: PipeliningProtocol) -> None:
        super().__init__()
        self.protocol, self.written, self.closing = protocol, [], False

    def write(self, data) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def get_extra_info(self, name, default=None):
        return default


async def connected_protocol() -> tuple[PipeliningProtocol, FakeTransport]:
    protocol = PipeliningProtocol(loop=asyncio.get_running_loop())
    transport = FakeTransport(protocol)
    protocol.connection_made(transport)
    protocol.data_received(b"220 peer ready\r\n")
    assert (await protocol.read_response(timeout=1)).code == 220
    return protocol, transport


REPLIES = (b"250 2.1.0 Ok\r\n250-2.1.5 first\r\n250 2.1.5 second\r\n550 5.1.1 unknown\r\n"
           b"354 go ahead\r\n")
LINES = [b"MAIL FROM:<a@b>", b"RCPT TO:<x@y>", b"RCPT TO:<z@y>", b"DATA"]


async def test_replies_in_any_chunking_are_handed_out_in_order():
    rng = random.Random(16)
    for _ in range(200):
        protocol, transport = await connected_protocol()
        group = asyncio.ensure_future(protocol.execute_pipelined(LINES, timeout=2))
        await asyncio.sleep(0)
        assert transport.written == [b"".join(line + b"\r\n" for line in LINES)]  # one write
        cuts = sorted(rng.sample(range(1, len(REPLIES)), rng.randrange(0, 8)))
        for a, b in zip([0, *cuts], [*cuts, len(REPLIES)], strict=True):
            protocol.data_received(REPLIES[a:b])
            for _ in range(rng.randrange(0, 3)):
                await asyncio.sleep(0)
        replies, error = await group
        assert error is None
        assert [(r.code, r.message) for r in replies] == [
            (250, "2.1.0 Ok"), (250, "2.1.5 first\n2.1.5 second"), (550, "5.1.1 unknown"), (354, "go ahead")]
        protocol.data_received(b"250 unsolicited\r\n")  # after the group: aiosmtplib's rules again
        assert not protocol._buffer


async def test_replies_that_came_before_the_connection_closed_still_count():
    protocol, transport = await connected_protocol()
    group = asyncio.ensure_future(protocol.execute_pipelined(LINES, timeout=2))
    await asyncio.sleep(0)
    protocol.data_received(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1")  # the third is cut off
    protocol.eof_received()
    protocol.connection_lost(None)
    replies, error = await group
    assert [r.code for r in replies] == [250, 250]
    assert isinstance(error, SMTPServerDisconnected)


async def test_a_flood_of_reply_bytes_closes_the_connection():
    protocol, transport = await connected_protocol()
    group = asyncio.ensure_future(protocol.execute_pipelined(LINES[:2], timeout=2))
    await asyncio.sleep(0)
    protocol.data_received(b"250 Ok\r\n" + b"250-" + b"x" * 70_000)
    replies, error = await group
    assert [r.code for r in replies] == [250] and error is not None and transport.closing


async def test_a_timeout_ends_the_group_with_the_replies_so_far():
    protocol, _ = await connected_protocol()
    group = asyncio.ensure_future(protocol.execute_pipelined(LINES, timeout=0.2))
    await asyncio.sleep(0)
    protocol.data_received(b"250 2.1.0 Ok\r\n")
    replies, error = await group
    assert [r.code for r in replies] == [250] and isinstance(error, SMTPTimeoutError)
