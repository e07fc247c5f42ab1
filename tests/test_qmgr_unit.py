"""The queue manager on its own: it schedules, asks a delivery agent by route kind, and
applies the queue rules — with test agents and a real spool on disk, no sockets.

Every delivery goes through ``imsrelay.queue.agents.Transport``: these tests hand the
queue manager agents that record what they were given and answer what the test says."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import structlog

from imsrelay.model.envelope import Envelope, RecipientState, new_queue_id
from imsrelay.model.objects import Mailbox
from imsrelay.model.outcome import Outcome
from imsrelay.model.settings import DeliveryConfig
from imsrelay.observe.metrics import SiteMetrics
from imsrelay.queue import dsn
from imsrelay.queue.agents import Transport
from imsrelay.queue.manager import QueueManager
from imsrelay.queue.spool import Spool
from imsrelay.routing.router import DIRECTORY, FAIL, LOCAL, MX, RELAY, Route, RoutingTable

SITE = "SiteA"
MESSAGE = b"From: a@example.org\r\nTo: User1@microsoft.com\r\nSubject: t\r\n\r\nbody\r\n"


class Agent:
    """A test delivery agent: records each call, answers with ``answer(address)``."""

    def __init__(self, answer: Any = None) -> None:
        self.calls: list[tuple[str, str, list[str]]] = []
        self.answer = answer or (lambda address: Outcome.delivered("test agent"))
        self.forgot = 0

    async def deliver(self, route: Route, env: Envelope, recipients: Sequence[RecipientState],
                      message: bytes) -> dict[str, Outcome]:
        self.calls.append((route.kind, env.queue_id, [r.address for r in recipients]))
        return {r.address: self.answer(r.address) for r in recipients}

    def forget_unreachable(self) -> None:
        self.forgot += 1


class Inputs:
    """The site as the queue manager sees it: User1 is homed here, User2 at SiteB,
    anything else goes by MX; reports are queued through ``enqueue_local``."""

    def __init__(self, qmgr_ref: list[QueueManager], spool: Spool) -> None:
        self.qmgr_ref = qmgr_ref
        self.spool = spool
        self.metrics = SiteMetrics()
        self.reports: list[Envelope] = []
        self.table = RoutingTable(site=SITE, site_domain="SiteA.microsoft.com", local_domains=("microsoft.com",),
                                  learned_sites=(("SiteB", "SiteB.microsoft.com"),))

    async def lookup_mailboxes(self, addresses: list[str]) -> list[Mailbox | None]:
        homes = {"user1": SITE, "user2": "SiteB"}
        out: list[Mailbox | None] = []
        for a in addresses:
            home = homes.get(a.split("@")[0].lower())
            out.append(Mailbox(a.split("@")[0], a, home, (f"SMTP:{a}",)) if home else None)
        return out

    async def routing_table(self) -> RoutingTable:
        return self.table

    def reporting_site(self) -> dsn.ReportingSite:
        return dsn.ReportingSite("ExchangeORG", SITE, "ServerA", "servera.sitea.microsoft.com")

    def postmaster_address(self) -> str:
        return "postmaster@microsoft.com"

    async def enqueue_local(self, env: Envelope, message: bytes) -> None:
        self.reports.append(env)
        await self.spool.enqueue(env, message)
        self.qmgr_ref[0].submit(env, message)

    def hold_reason(self, queue_id: str, route: Route) -> str | None:
        return None

    async def ndr_copy_address(self) -> str | None:
        return None


def envelope(sender: str, *recipients: str) -> Envelope:
    return Envelope(queue_id=new_queue_id(), sender=sender, recipients=[RecipientState(r, r) for r in recipients],
                    received_at=1_000_000.0, client="192.0.2.1", helo="test", origin="smtp")


@pytest.fixture
async def queue(tmp_path):
    """(queue manager, agents by kind, inputs, clock): started, stopped at the end."""
    now = [1_000_000.0]
    spool = Spool(tmp_path)
    local, smtp, directory, error = Agent(), Agent(), Agent(), Agent()
    agents: dict[str, Transport] = {LOCAL: local, RELAY: smtp, MX: smtp, DIRECTORY: directory, FAIL: error}
    ref: list[QueueManager] = []
    inputs = Inputs(ref, spool)
    qmgr = QueueManager(spool, inputs=inputs, transports=agents,
                        delivery=DeliveryConfig(retry_intervals=(60.0,), lifetime=3600.0),
                        log=structlog.get_logger(), clock=lambda: now[0])
    ref.append(qmgr)
    await qmgr.start()
    try:
        yield qmgr, {"local": local, "smtp": smtp, "directory": directory, "error": error}, inputs, now
    finally:
        await qmgr.stop()
        spool.close()


async def submit(qmgr: QueueManager, env: Envelope) -> None:
    await qmgr.spool.enqueue(env, MESSAGE)
    qmgr.submit(env, MESSAGE)


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_each_route_kind_goes_to_its_agent_and_the_message_leaves_the_queue(queue):
    qmgr, agents, _, _ = queue
    env = envelope("a@example.org", "User1@microsoft.com", "User2@microsoft.com", "bob@example.net")
    await submit(qmgr, env)
    await until(lambda: env.queue_id not in qmgr.envelopes)
    assert agents["local"].calls == [(LOCAL, env.queue_id, ["User1@microsoft.com"])]
    assert sorted(c[2][0] for c in agents["smtp"].calls) == ["User2@microsoft.com", "bob@example.net"]
    assert {c[0] for c in agents["smtp"].calls} == {MX}  # SiteB learned by Check Now: its domain by MX
    assert not qmgr.spool.exists(env.queue_id)
    assert all(r.state == "delivered" for r in env.recipients)


async def test_a_temporary_failure_is_retried_on_the_schedule(queue):
    qmgr, agents, _, now = queue
    answers = iter([Outcome.temporary("4.4.1", "no answer"), Outcome.delivered("ok")])
    agents["local"].answer = lambda address: next(answers)
    env = envelope("a@example.org", "User1@microsoft.com")
    await submit(qmgr, env)
    await until(lambda: env.recipients[0].attempts == 1)
    r = env.recipients[0]
    assert r.state == "pending" and r.next_attempt == now[0] + 60.0 and r.status == "4.4.1"
    assert env.queue_id in qmgr.envelopes and qmgr.spool.exists(env.queue_id)
    now[0] += 61.0
    qmgr.retry_now()  # (wakes the loop; the due time has come anyway)
    await until(lambda: env.queue_id not in qmgr.envelopes)
    assert len(agents["local"].calls) == 2 and r.state == "delivered"


async def test_a_permanent_failure_sends_one_ndr_to_the_sender(queue):
    qmgr, agents, inputs, _ = queue
    agents["smtp"].answer = lambda address: Outcome(False, True, "5.1.1", "550 5.1.1 no such user")
    env = envelope("a@example.org", "bob@example.net")
    await submit(qmgr, env)
    await until(lambda: env.queue_id not in qmgr.envelopes and inputs.reports)
    (ndr,) = inputs.reports
    assert ndr.sender == "" and [r.address for r in ndr.recipients] == ["a@example.org"]
    assert ndr.extra["report_for"] == env.queue_id and env.recipients[0].state == "bounced"


async def test_no_ndr_for_a_null_sender(queue):
    qmgr, agents, inputs, _ = queue
    agents["smtp"].answer = lambda address: Outcome(False, True, "5.1.1", "no such user")
    env = envelope("", "bob@example.net")
    await submit(qmgr, env)
    await until(lambda: env.queue_id not in qmgr.envelopes)
    assert inputs.reports == [] and env.recipients[0].state == "failed"


async def test_an_agent_that_raises_is_an_internal_error_retried_later(queue):
    qmgr, agents, _, now = queue

    def boom(address: str) -> Outcome:
        raise RuntimeError("agent broke")

    agents["local"].answer = boom
    env = envelope("a@example.org", "User1@microsoft.com")
    await submit(qmgr, env)
    await until(lambda: env.recipients[0].attempts == 1)
    r = env.recipients[0]
    assert r.state == "pending" and r.status == "4.3.0" and "transport error: agent broke" in (r.diagnostic or "")
    assert qmgr.running  # the queue manager carries on


async def test_an_unroutable_recipient_goes_to_the_error_agent(queue):
    qmgr, agents, inputs, _ = queue
    inputs.table = RoutingTable(site=SITE, site_domain="SiteA.microsoft.com", local_domains=("microsoft.com",))
    env = envelope("a@example.org", "User2@microsoft.com")  # homed at SiteB, which is not known here
    await submit(qmgr, env)
    await until(lambda: agents["error"].calls)
    assert agents["error"].calls[0][0] == FAIL and agents["smtp"].calls == []


async def test_an_operator_retry_asks_each_agent_once_to_forget_unreachable_hosts(queue):
    qmgr, agents, _, _ = queue
    qmgr.forget_unreachable()
    assert [a.forgot for a in agents.values()] == [1, 1, 1, 1]  # smtp serves RELAY and MX: asked once
