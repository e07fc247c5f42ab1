"""Backpressure (docs/design.md invariant 9): the pure decision, the gate where sessions
wait, its [queue] settings, and a real site whose delivery is blocked — slowed at
MAIL FROM, refused with 452 4.3.1 at the hard bound, open again once the queue drains."""

from __future__ import annotations

import asyncio
import time

import pytest
from ims_kit import admin, admin_section
from sitekit import config_of, make_config, running_site, site_mapping, wait_for
from smtp_sink import SmtpSink
from smtp_wire import Wire

from imsrelay.ingress.flow_gate import FlowGate
from imsrelay.model.errors import ConfigErrors
from imsrelay.policy.backpressure import ADMIT, REFUSE, WAIT, Backlog, Limits, decide, state

LIMITS = Limits(backpressure_at=10, refuse_at=100, max_delay=1.0)


# ------------------------------------------------------------------ the decision


@pytest.mark.parametrize(("queued", "incoming", "action"), [
    (0, 0, ADMIT), (50, 9, ADMIT),            # delivery keeps up
    (50, 10, WAIT), (99, 99, WAIT),           # delivery is behind: slow down
    (100, 0, REFUSE), (5000, 50, REFUSE),     # the hard bound, deferred mail included
    (99, 0, ADMIT),                           # deferred mail alone never slows senders
])
def test_decide(queued, incoming, action):
    assert decide(Backlog(queued=queued, incoming=incoming), LIMITS).action == action


def test_the_refusal_is_a_temporary_452_4_3_1():
    d = decide(Backlog(queued=100, incoming=0), LIMITS)
    assert d.reply is not None and (d.reply.code, d.reply.status) == (452, "4.3.1")
    assert str(d.reply).startswith("452 4.3.1 ") and "100" in str(d.reply)
    assert decide(Backlog(queued=3, incoming=50), LIMITS).reply is None


def test_no_delay_configured_never_waits():
    limits = Limits(backpressure_at=1, refuse_at=10, max_delay=0.0)
    assert decide(Backlog(queued=5, incoming=5), limits).action == ADMIT
    assert decide(Backlog(queued=10, incoming=5), limits).action == REFUSE


def test_state_names():
    assert [state(Backlog(q, i), LIMITS) for q, i in ((0, 0), (20, 10), (100, 0))] == ["open", "slowing", "refusing"]


# ------------------------------------------------------------------ the gate


class Counts:
    def __init__(self, incoming: int = 0) -> None:
        self.queued = 0
        self.incoming = incoming

    def __call__(self) -> Backlog:
        return Backlog(self.queued, self.incoming)


def behind(max_delay: float = 5.0) -> tuple[Counts, FlowGate]:
    """A gate whose delivery is behind (incoming at the bound of 10)."""
    counts = Counts(incoming=10)
    return counts, FlowGate(Limits(10, 100, max_delay), counts)


async def test_the_gate_admits_at_once_below_the_bound():
    counts = Counts()
    gate = FlowGate(LIMITS, counts)
    assert await gate.admit() is None
    assert gate.delayed == 0 and gate.delayed_seconds == 0.0


async def test_a_waiting_session_goes_on_when_delivery_takes_one():
    counts, gate = behind()
    waiter = asyncio.create_task(gate.admit())
    await asyncio.sleep(0.1)
    assert not waiter.done() and gate.waiting == 1
    gate.progressed()  # delivery took a message, but the backlog is still at the bound
    await asyncio.sleep(0.05)
    assert not waiter.done()
    counts.incoming = 9
    gate.progressed()
    assert await asyncio.wait_for(waiter, 1.0) is None
    assert gate.delayed == 1 and gate.timed_out == 0 and gate.waiting == 0


async def test_one_progress_lets_one_session_go_oldest_first():
    counts, gate = behind()
    first = asyncio.create_task(gate.admit())
    await asyncio.sleep(0.02)
    second = asyncio.create_task(gate.admit())
    await asyncio.sleep(0.02)
    counts.incoming = 9
    gate.progressed()
    await asyncio.sleep(0.05)
    assert first.done() and not second.done()
    gate.progressed()
    assert await asyncio.wait_for(second, 1.0) is None


async def test_a_session_waits_at_most_max_delay():
    counts, gate = behind(max_delay=0.3)
    started = time.monotonic()
    assert await gate.admit() is None  # delivery still behind: it goes on anyway (Postfix's in_flow_delay)
    waited = time.monotonic() - started
    assert 0.25 <= waited < 5.0, waited  # (it did not wait for a progress that never comes)
    assert gate.timed_out == 1 and gate.delayed_seconds >= 0.25


async def test_the_hard_bound_refuses_also_a_waiting_session():
    counts, gate = behind()
    waiter = asyncio.create_task(gate.admit())
    await asyncio.sleep(0.05)
    counts.queued = 100
    counts.incoming = 0
    gate.progressed()
    reply = await asyncio.wait_for(waiter, 1.0)
    assert reply is not None and reply.code == 452 and gate.refused == 1


# ------------------------------------------------------------------ settings


def test_queue_settings_and_defaults():
    default = config_of(site_mapping()).queue
    assert default.backpressure_at >= 1 and default.refuse_at > default.backpressure_at and default.max_delay == 1.0
    cfg = config_of(site_mapping(queue={"backpressure_at": 7, "refuse_at": 70, "max_delay": "250ms"})).queue
    assert (cfg.backpressure_at, cfg.refuse_at, cfg.max_delay) == (7, 70, 0.25)
    assert config_of(site_mapping(queue={"max_delay": "off"})).queue.max_delay == 0.0


def test_the_older_name_of_refuse_at_still_works():
    assert config_of(site_mapping(smtp={"max_queued_messages": 33})).queue.refuse_at == 33
    with pytest.raises(ConfigErrors) as err:
        config_of(site_mapping(smtp={"max_queued_messages": 33}, queue={"refuse_at": 44}))
    assert "smtp.max_queued_messages" in str(err.value) and "queue.refuse_at" in str(err.value)


@pytest.mark.parametrize(("setting", "word"), [
    ({"backpressure_at": 0}, "queue.backpressure_at"), ({"refuse_at": "many"}, "queue.refuse_at"),
    ({"max_delay": "10m"}, "queue.max_delay"), ({"refuse": 5}, "queue.refuse")])
def test_bad_queue_settings_name_their_key(setting, word):
    with pytest.raises(ConfigErrors) as err:
        config_of(site_mapping(queue=setting))
    assert word in str(err.value)


# ------------------------------------------------------------------ a real site


def transaction(w: Wire, rcpt: bytes) -> tuple[bytes, bytes | None, float]:
    """(MAIL reply, final DATA reply or None, seconds the MAIL reply took)."""
    started = time.monotonic()
    mail = w.cmd(b"MAIL FROM:<a@example.org>")
    took = time.monotonic() - started
    if not mail.startswith(b"250"):
        return mail, None, took
    w.cmd(b"RCPT TO:<" + rcpt + b">")
    w.cmd(b"DATA")
    return mail, w.cmd(b"Subject: q\r\n\r\nx\r\n."), took


async def test_blocked_delivery_slows_then_refuses_then_resumes(tmp_path):
    """Delivery to down.example stalls (a peer that accepts and never greets): messages
    wait for its one slot, MAIL FROM is slowed from queue.backpressure_at of them,
    refused with 452 4.3.1 at queue.refuse_at, and accepted at once again when the
    destination comes back and the queue drains."""
    held: list[asyncio.StreamWriter] = []

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    hole = await asyncio.start_server(stalls, "127.0.0.1", 0)
    port = hole.sockets[0].getsockname()[1]
    cfg = make_config(tmp_path, site_mapping(
        queue={"backpressure_at": 2, "refuse_at": 5, "max_delay": "400ms"},
        delivery={"retry_intervals": ["1h"], "max_per_destination": 1, "connect_timeout": 60,
                  "command_timeout": 60},
        email_domains=[{"domain": "down.example", "host": "127.0.0.1", "port": port}], **admin_section()))
    sink = None
    try:
        async with running_site(cfg) as site:
            def session(count: int) -> list[tuple[bytes, bytes | None, float]]:
                with Wire(site.bound_port) as w:
                    w.reply()
                    w.cmd(b"EHLO me.example")
                    return [transaction(w, b"r%d@down.example" % i) for i in range(count)]

            first = await asyncio.to_thread(session, 3)  # one stalls in delivery, two wait for its slot
            assert [(m[:3], d[:3] if d else None) for m, d, _ in first] == [(b"250", b"250")] * 3, first
            await wait_for(lambda: site.qmgr.incoming == 2)
            status = await admin(site, "GET", "/status")
            assert status["queue"]["backpressure"]["state"] == "slowing"
            assert status["queue"]["backpressure"]["incoming"] == 2

            delayed, timed_out = site.flow.delayed, site.flow.timed_out
            slowed = await asyncio.to_thread(session, 2)  # delivery is behind: each MAIL waits max_delay
            assert [(m[:3], d[:3] if d else None) for m, d, _ in slowed] == [(b"250", b"250")] * 2, slowed
            assert all(took >= 0.35 for _, _, took in slowed), slowed
            assert (site.flow.delayed - delayed, site.flow.timed_out - timed_out) == (2, 2)

            refused = await asyncio.to_thread(session, 1)  # 5 queued: the hard bound
            assert refused[0][0].startswith(b"452 4.3.1"), refused
            status = await admin(site, "GET", "/status")
            bp = status["queue"]["backpressure"]
            assert (bp["state"], bp["queued"], bp["refused"]) == ("refusing", 5, 1)
            assert status["queue"]["messages"] == 5

            # the destination comes back: a real SMTP server on its port; the stalled
            # attempt is let go and the queue drains
            hole.close()
            for w in held:
                w.close()
            await hole.wait_closed()
            sink = await asyncio.to_thread(SmtpSink, "127.0.0.1", port)
            await wait_for(lambda: site.qmgr.incoming == 0, timeout=30)
            site.qmgr.forget_unreachable()  # as `imsrelay queue retry` does
            site.qmgr.retry_now()
            await wait_for(lambda: site.qmgr.backlog == 0, timeout=30)
            assert site.flow.state() == "open"
            delayed = site.flow.delayed
            again = await asyncio.to_thread(session, 2)
            assert [(m[:3], d[:3] if d else None) for m, d, _ in again] == [(b"250", b"250")] * 2, again
            assert site.flow.delayed == delayed  # nothing waits: delivery keeps up again
            await wait_for(lambda: site.qmgr.backlog == 0, timeout=30)
            assert len(sink.messages()) == 7
    finally:
        hole.close()
        for w in held:
            w.close()
        if sink is not None:
            sink.stop()
