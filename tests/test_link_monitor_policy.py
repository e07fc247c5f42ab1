"""The Link Monitor's pure parts: the per-target state machine (up, warning, alert,
back up), when a ping is due, which changes mail the administrator, the settings
loader's checks, the routing of the system attendant address, and how answers are
recognised."""

from __future__ import annotations

import pytest
from sitekit import config_of, site_mapping

from imsrelay.model.errors import ConfigErrors
from imsrelay.observe.link_monitor import parse_marker, quoted_ping
from imsrelay.policy import link_monitor as lm
from imsrelay.routing.router import ATTENDANT, DIRECTORY, route_for, routing_table_for

TH = lm.Thresholds(interval=60.0, warning_after=300.0, alert_after=600.0)


def test_a_target_is_unknown_until_its_first_answer_then_up():
    s = lm.initial("SiteB", 0.0)
    assert lm.due(s, 0.0, TH)
    s = lm.sent(s, 0.0)
    assert not lm.due(s, 59.0, TH) and lm.due(s, 60.0, TH)
    s, change = lm.tick(s, 10.0, TH)
    assert change is None and s.state == lm.UNKNOWN
    s, change = lm.answered(s, 0.0, 12.0, TH)
    assert s.state == lm.UP and s.last_rtt == 12.0 and s.outstanding == ()
    assert change == lm.Transition("SiteB", lm.UNKNOWN, lm.UP, 12.0, "answered in 12.0s")
    assert not lm.mails_administrator(change)  # unknown -> up is no recovery


def test_no_answer_goes_warning_then_alert_then_back_up_with_mail_on_alert_and_recovery():
    s, _ = lm.answered(lm.sent(lm.initial("SiteB", 0.0), 0.0), 0.0, 1.0, TH)
    s = lm.sent(s, 60.0)
    s = lm.sent(s, 120.0)  # two pings waiting; the oldest decides
    s, change = lm.tick(s, 359.0, TH)
    assert change is None and s.state == lm.UP
    s, change = lm.tick(s, 360.0, TH)
    assert change is not None and (change.previous, change.state) == (lm.UP, lm.WARNING)
    assert "waited 300.0s" in change.reason and not lm.mails_administrator(change)
    s, change = lm.tick(s, 660.0, TH)
    assert change is not None and change.state == lm.ALERT and lm.mails_administrator(change)
    assert s.since == 660.0
    # the late ping's answer arrives: its round trip is past the alert threshold, still alert
    s, change = lm.answered(s, 60.0, 700.0, TH)
    assert change is None and s.state == lm.ALERT and s.outstanding == (120.0,)
    # a newer ping answered in time: up again, and that is worth a mail
    s = lm.sent(s, 720.0)
    s, change = lm.answered(s, 720.0, 721.0, TH)
    assert s.state == lm.UP and s.outstanding == () and (s.pings, s.answers) == (4, 3)
    assert change is not None and change.previous == lm.ALERT and lm.mails_administrator(change)


def test_a_slow_round_trip_is_a_warning_and_an_older_answer_does_not_undo_a_newer_one():
    s = lm.sent(lm.sent(lm.initial("x@example.net", 0.0), 0.0), 100.0)
    s, change = lm.answered(s, 100.0, 101.0, TH)  # the newer one first: up
    assert s.state == lm.UP and s.outstanding == ()
    s, change = lm.answered(s, 0.0, 700.0, TH)  # the older one late: it does not set the round trip
    assert s.state == lm.UP and s.last_rtt == 1.0 and change is None
    s = lm.sent(s, 800.0)
    s, change = lm.answered(s, 800.0, 1200.0, TH)  # 400 s round trip
    assert s.state == lm.WARNING and change is not None and "round trip took 400.0s" in change.reason


def test_a_cut_link_does_not_pile_pings_up_in_the_queue():
    s = lm.initial("SiteB", 0.0)
    for t in (0.0, 60.0, 120.0):
        assert lm.due(s, t, TH)
        s = lm.sent(s, t)
    assert not lm.due(s, 180.0, TH) and not lm.due(s, 719.0, TH)  # three in flight
    assert lm.due(s, 720.0, TH)  # the newest has waited alert_after: one more probe
    s, _ = lm.answered(s, 120.0, 200.0, TH)
    assert lm.due(s, 200.0, TH)  # answered: polling goes on


def test_outstanding_pings_are_bounded_and_keep_the_oldest():
    s = lm.initial("SiteB", 0.0)
    for t in range(200):
        s = lm.sent(s, float(t))  # sent() keeps the books whatever due() says
    assert len(s.outstanding) == lm.MAX_OUTSTANDING and s.outstanding[0] == 0.0 and s.outstanding[-1] == 199.0
    assert lm.lateness_of_oldest(s, 250.0) == 250.0


def test_worst_state_of_a_monitor():
    assert lm.worst([lm.UP, lm.ALERT, lm.WARNING]) == lm.ALERT
    assert lm.worst([lm.UNKNOWN, lm.UP]) == lm.UP
    assert lm.worst([]) == lm.UNKNOWN


def test_answers_are_recognised_by_their_marker_or_the_ndr_that_quotes_the_ping():
    assert parse_marker("ping lm-0123456789abcdef0123") == ("ping", "lm-0123456789abcdef0123")
    assert parse_marker(" Reply  lm-0123456789ABCDEF0123 ") == ("reply", "lm-0123456789abcdef0123")
    assert parse_marker("ping lm-123") is None and parse_marker(None) is None
    ndr = (b"Content-Type: multipart/report\r\n\r\n--b\r\nAction: failed\r\nStatus: 5.1.1\r\n--b\r\n"
           b"X-Link-Monitor: ping lm-0123456789abcdef0123\r\n")
    assert quoted_ping(ndr) == "lm-0123456789abcdef0123"
    assert quoted_ping(ndr.replace(b"Action: failed", b"Action: delayed")) is None  # a delay is no answer
    assert quoted_ping(ndr.replace(b"Status: 5.1.1", b"Status: 4.4.7")) is None  # expired in a queue


def test_link_monitors_load_with_exchange_defaults_and_checks():
    cfg = config_of(site_mapping(link_monitors=[{"name": "Sites", "targets": ["SiteB", "x@example.net"]}]))
    (m,) = cfg.link_monitors
    assert (m.interval, m.warning_after, m.alert_after, m.notify) == (900.0, 1800.0, 3600.0, None)
    assert m.targets == ("SiteB", "x@example.net")
    with pytest.raises(ConfigErrors) as err:
        config_of(site_mapping(link_monitors=[
            {"name": "A", "targets": []},
            {"name": "B", "targets": ["not a site!"], "warning_after": "10m", "alert_after": "5m"},
            {"name": "b", "targets": ["SiteB", "SiteB"], "interval": "0s", "colour": "red"}]))
    text = "\n".join(str(e) for e in err.value.errors)
    assert "link_monitors[0].targets: a link monitor needs at least one target" in text
    assert "link_monitors[1].targets[0]: 'not a site!' is neither a site name nor an address" in text
    assert "link_monitors[1].alert_after: must be longer than warning_after (600s)" in text
    assert "link_monitors[2].name: a link monitor named 'b' is already defined" in text
    assert "link_monitors[2].targets[1]: 'SiteB' is listed twice" in text
    assert "link_monitors[2].interval: must be more than 0" in text
    assert "link_monitors[2].colour" in text


def test_the_system_attendant_address_is_routed_to_the_attendant_not_a_mailbox():
    cfg = config_of(site_mapping(connected_sites=[{"name": "SiteB", "routing_address": "@SiteB.microsoft.com"}]))
    table = routing_table_for(cfg, addressing_domain="microsoft.com", learned_sites=())
    route = route_for("attendant@SiteA.microsoft.com", None, table)
    assert route.kind == ATTENDANT and "system attendant" in route.explain()
    assert route_for("dirsync@SiteA.microsoft.com", None, table).kind == DIRECTORY
    remote = route_for("attendant@SiteB.microsoft.com", None, table)
    assert remote.site == "SiteB" and remote.kind != ATTENDANT


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **kw) -> None:
        self.events.append((event, kw))

    debug = warning = info


async def test_the_attendant_answers_only_the_organisations_pings_and_matches_answers():
    from imsrelay.model.envelope import Envelope, RecipientState
    from imsrelay.model.settings import LinkMonitorConfig
    from imsrelay.observe.link_monitor import LinkMonitors
    from imsrelay.observe.metrics import SiteMetrics

    queued: list[tuple[Envelope, bytes]] = []
    now = [1000.0]

    async def enqueue(env, raw):
        queued.append((env, raw))

    async def resolve(target):
        return f"attendant@{target}.microsoft.com"

    async def notify(name):
        return None

    async def answers_to(sender):
        return sender.lower() == "attendant@siteb.microsoft.com"

    log = _Log()
    monitors = LinkMonitors(
        (LinkMonitorConfig("M", ("SiteB",), interval=60.0, warning_after=300.0, alert_after=600.0),),
        site="SiteA", attendant="attendant@SiteA.microsoft.com", hostname="ServerA.SiteA.microsoft.com",
        resolve=resolve, enqueue=enqueue, notify_address=notify, answers_to=answers_to, metrics=SiteMetrics(),
        log=log, clock=lambda: now[0])

    def env(sender: str) -> Envelope:
        return Envelope("q1", sender, [RecipientState("attendant@SiteA.microsoft.com")], now[0])

    ping = b"Subject: p\r\nX-Link-Monitor: ping lm-0123456789abcdef0123\r\n\r\nx\r\n"
    assert "not answered" in await monitors.receive(env("mallory@example.net"), ping)
    assert "not answered" in await monitors.receive(env(""), ping)
    assert queued == []  # no reflection to a forged or null sender
    assert "answered" in await monitors.receive(env("attendant@SiteB.microsoft.com"), ping)
    (reply_env, reply), = queued
    assert reply_env.sender == "" and [r.address for r in reply_env.recipients] == ["attendant@SiteB.microsoft.com"]
    assert b"X-Link-Monitor: reply lm-0123456789abcdef0123" in reply and b"Auto-Submitted: auto-replied" in reply

    # our own ping goes out, its reply comes back 2.5 s later: the target is up with that round trip
    queued.clear()
    await monitors.poll()
    (ping_env, raw), = queued
    assert ping_env.sender == "attendant@SiteA.microsoft.com" and ping_env.recipients[0].notify == "FAILURE"
    ping_id = parse_marker(email_header(raw))[1]
    now[0] += 2.5
    answer = f"X-Link-Monitor: reply {ping_id}\r\n\r\n".encode()
    assert await monitors.receive(env(""), answer) == f"reply to ping {ping_id}"
    (target,) = monitors.snapshot()[0]["targets"]
    assert (target["state"], target["last_rtt"], target["answers"]) == ("up", 2.5, 1)
    assert monitors.summary() == {"M: SiteB": "up"}
    assert "unknown ping" in await monitors.receive(env(""), answer)  # answered already
    assert "discarded" in await monitors.receive(env("someone@example.net"), b"Subject: hi\r\n\r\nhello\r\n")


def email_header(raw: bytes) -> str:
    from email.parser import BytesHeaderParser
    return str(BytesHeaderParser().parsebytes(raw)["X-Link-Monitor"])
