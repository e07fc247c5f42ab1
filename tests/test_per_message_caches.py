"""The per-message fast paths of routing, policy, tracking and the queue manager:
each cache answers what the uncached code did, and follows its inputs when they change."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
from sitekit import make_config, running_site, site_mapping

from imsrelay.model.addresses import AddressError, ip_literal, parse_address
from imsrelay.model.envelope import RecipientState
from imsrelay.observe import tracking
from imsrelay.observe.metrics import SiteMetrics
from imsrelay.observe.tracking import TrackingLog, TrackingQuery, message_id_of
from imsrelay.policy.restrictions import Client, RelayRules, _in, _parsed_ip, ip_of, relay_decision
from imsrelay.queue.manager import QueueManager, _assign
from imsrelay.routing.router import (
    RELAY,
    Route,
    RoutingTable,
    route_for,
    routing_table_for,
    self_addresses,
    shares_load,
)
from imsrelay.site import Site
from imsrelay.transport.smtp import smtp_path

# ------------------------------------------------------------------ pure memoised look-ups


def test_self_addresses_follow_the_endpoints():
    a = frozenset({("127.0.0.1", 25), ("relay.example", 25)})
    b = frozenset({("127.0.0.1", 25), ("192.0.2.7", 25), ("fe80::1%eth0", 25)})
    assert self_addresses(a) == {"127.0.0.1"}
    assert self_addresses(b) == {"127.0.0.1", "192.0.2.7", "fe80::1"}
    assert self_addresses(a) == {"127.0.0.1"}  # an interface that went away is gone again
    assert self_addresses(frozenset(a)) is self_addresses(a)  # equal endpoints: computed once


def test_client_addresses_are_parsed_once_and_as_before():
    assert str(ip_of("192.0.2.1")) == "192.0.2.1"
    assert str(ip_of("::ffff:192.0.2.1")) == "192.0.2.1"  # IPv4-mapped: the IPv4 address
    assert str(ip_of("[fe80::1%eth0]")) == "fe80::1"
    assert ip_of("not an address") is None and ip_of("") is None and ip_of(None) is None
    before = _parsed_ip.cache_info().hits
    assert ip_of("198.51.100.9") is ip_of("198.51.100.9")
    assert _parsed_ip.cache_info().hits > before


def test_an_empty_network_list_matches_nothing_and_decisions_are_unchanged():
    assert _in("192.0.2.1", ()) is None and _in("garbage", ()) is None
    rules = RelayRules(authenticated=True, networks=(__import__("ipaddress").ip_network("127.0.0.0/8"),))
    assert relay_decision(Client("127.0.0.5"), rules).rule == "client 127.0.0.5 is in relay range 127.0.0.0/8"
    assert not relay_decision(Client("192.0.2.1"), rules).allowed
    assert relay_decision(Client("192.0.2.1", authenticated="User1"), rules).allowed


def test_parse_address_keeps_refusing_what_it_refused():
    assert parse_address("<User1@SiteA.Microsoft.COM>") == parse_address("<User1@SiteA.Microsoft.COM>")
    assert parse_address("User1@SiteA.Microsoft.COM").domain == "sitea.microsoft.com"
    for _ in range(2):  # a refusal is not remembered as an answer
        with pytest.raises(AddressError):
            parse_address("no-at-sign")
    assert ip_literal("[IPv6:2001:DB8::1]") == "2001:db8::1" and ip_literal("mail.example") is None


@pytest.mark.parametrize("address", ["a b@example.com", "a\u00a0b@example.com", "a\u2003b@example.com",
                                     "a\u3000@example.com", "a@exa mple.com"])
def test_smtp_path_refuses_any_unicode_space(address):
    with pytest.raises(ValueError):
        smtp_path(address)


def test_smtp_path_allows_a_space_inside_a_quoted_local_part():
    assert smtp_path('"a b"@example.com') == '<"a b"@example.com>'
    assert smtp_path("b\u00f8b@example.com") == "<b\u00f8b@example.com>"


@pytest.mark.parametrize(("message", "expected"), [
    (b"From: a\r\nMessage-ID:\r\n <x@y>\r\n\r\nbody\r\n", "<x@y>"),
    (b"From: a\r\n\r\nMessage-ID: <body@no>\r\n", None),
    (b"From: a\n\nMessage-ID: <body@no>\n", None),
    (b"Subject: s\nmessage-id: <lf@only>\n\nx", "<lf@only>"),
    (b"Message-Id: <no-body@x>", "<no-body@x>"),
    (b"X: " + b"y" * 70_000 + b"\r\nMessage-ID: <too@far>\r\n\r\n", None),  # beyond the 64 KiB scanned
])
def test_message_id_is_found_in_the_header_only(message, expected):
    assert message_id_of(message) == expected


# ------------------------------------------------------------------ the site's live inputs


async def test_inbound_policy_is_rebuilt_only_when_an_input_changes(tmp_path):
    site = Site(make_config(tmp_path, site_mapping("SiteA")))
    try:
        first = site.inbound_policy()
        assert site.inbound_policy() is first
        # a site learned by Check Now
        site._learned_sites = (("SiteB", "siteb.microsoft.com"),)
        second = site.inbound_policy()
        assert second is not first and "siteb.microsoft.com" in second.org_routing_domains
        # the Site Addressing domain
        site._addressing = "@example.org"
        third = site.inbound_policy()
        assert "example.org" in third.local_domains and third is site.inbound_policy()
        # this host's interfaces changed: the endpoints were recomputed
        port = site.config.smtp.port
        site._endpoints = (port, time.monotonic(), frozenset({("192.0.2.7", port), ("127.0.0.1", port)}))
        fourth = site.inbound_policy()
        assert fourth.self_addresses == {"192.0.2.7", "127.0.0.1"} and fourth is not third
    finally:
        site.directory.close()
        site.spool.close()


async def test_a_literal_of_a_new_own_address_is_looked_up_as_this_site(tmp_path):
    cfg = make_config(tmp_path, site_mapping("SiteA"))
    async with running_site(cfg) as site:
        assert (await site.lookup_mailboxes(["User1@[192.0.2.7]"])) == [None]
        port = site.bound_port
        site._endpoints = (port, time.monotonic(), frozenset({("192.0.2.7", port), ("127.0.0.1", port)}))
        (found,) = await site.lookup_mailboxes(["User1@[192.0.2.7]"])
        assert found is not None and found.alias == "User1"


# ------------------------------------------------------------------ the queue manager


def test_assign_copies_every_field():
    new = RecipientState("a@x", "A@x", "delivered", 3, 5.0, 1.0, "2.0.0", "smtp; 250 ok", "h [1.2.3.4]:25",
                         True, "relay:h:25:none")
    live = RecipientState("a@x")
    _assign(live, new, keep_pending=False)
    assert all(getattr(live, f.name) == getattr(new, f.name) for f in fields(RecipientState))
    live = RecipientState("a@x")
    _assign(live, new, keep_pending=True)
    assert live.state == "pending" and live.attempts == 3


def _slots_owner(per_destination: int) -> SimpleNamespace:
    owner = SimpleNamespace(_destinations={}, delivery=SimpleNamespace(max_per_destination=per_destination))
    owner._leave_destination = lambda key: QueueManager._leave_destination(owner, key)
    return owner


def _relay(host: str) -> tuple[RecipientState, Route]:
    return RecipientState(f"r@{host}"), Route(f"r@{host}", RELAY, (), host=host, port=25, starttls="none")


async def test_destination_slots_are_given_back_also_when_cancelled_while_waiting():
    owner = _slots_owner(1)
    routed = [_relay("b.example"), _relay("a.example")]
    async with QueueManager._destination_slots(owner, routed):
        assert {k: users for k, (_, users) in owner._destinations.items()} == {
            "relay:a.example:25:none": 1, "relay:b.example:25:none": 1}
        waiting = asyncio.ensure_future(_enter(QueueManager._destination_slots(owner, routed[:1])))
        await asyncio.sleep(0.01)
        assert owner._destinations["relay:b.example:25:none"][1] == 2
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert owner._destinations["relay:b.example:25:none"][1] == 1
    assert owner._destinations == {}
    async with QueueManager._destination_slots(owner, routed):  # every slot was released
        pass
    assert owner._destinations == {}


async def _enter(cm) -> None:
    async with cm:
        pass


def test_delivery_outcome_counters_are_the_labelled_children():
    m = SiteMetrics()
    assert m.delivery_outcome("delivered") is m.deliveries.labels("delivered")
    m.delivery_outcome("delivered").inc()
    m.delivery_outcome("other").inc()
    assert m.deliveries.labels("delivered")._value.get() == 1 and m.deliveries.labels("other")._value.get() == 1


def test_retry_policy_by_priority_is_kept_per_priority(tmp_path):
    cfg = make_config(tmp_path, site_mapping("SiteA", delivery={"lifetime": "2d"}, priorities={
        "urgent_lifetime": "1h", "non_urgent_lifetime": "3d"}))
    site = Site(cfg)
    try:
        qmgr = site.qmgr
        assert qmgr.priorities is not None
        env = SimpleNamespace(extra={"priority": "urgent"})
        urgent = qmgr.policy_for(env)
        assert urgent.lifetime == 3600 and qmgr.policy_for(env) is urgent
        assert qmgr.policy_for(SimpleNamespace(extra={})).lifetime == qmgr.priorities.normal.lifetime
        assert qmgr.policy_for(SimpleNamespace(extra={"priority": "non-urgent"})).lifetime == 3 * 86400
        assert qmgr.policy_for(SimpleNamespace(extra={})).lifetime == 2 * 86400
    finally:
        site.directory.close()
        site.spool.close()


# ------------------------------------------------------------------ message tracking


async def _log(tmp_path: Path, **kw) -> TrackingLog:
    log = TrackingLog(tmp_path / "t.sqlite3", "SiteA", **kw)
    await log.start()
    return log


async def test_every_event_is_stored_in_order_with_its_detail(tmp_path):
    log = await _log(tmp_path)
    try:
        for i in range(2500):  # more than one commit's worth (MAX_BATCH)
            q = f"Q{i:05d}"
            log.record(tracking.RECEIVED, q, message_id=f"<{i}@x>", sender="a@x", recipients=["b@y"], size=i,
                       client=None)
            log.record(tracking.ROUTED, q, recipient="b@y", route="SMTP to h:25", why=None)
            log.record(tracking.DELETED, q)
        log.record(tracking.TRANSFERRED, "Q00007", recipient="b@y", when=Path("/x"))  # default=str
        events = await log.query(TrackingQuery(queue_id="Q00007"))
        assert [e.event for e in events] == ["received", "routed", "deleted", "transferred"]
        assert all(e.message_id == "<7@x>" and e.sender == "a@x" for e in events)
        assert events[0].detail == {"recipients": ["b@y"], "size": 7}  # None values are left out
        assert events[1].detail == {"route": "SMTP to h:25"} and events[2].detail == {}
        assert events[3].detail == {"when": "/x"}
    finally:
        await log.stop()
    db = sqlite3.connect(tmp_path / "t.sqlite3")
    try:
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 3 * 2500 + 1
        assert db.execute("SELECT detail FROM events WHERE event = 'deleted' LIMIT 1").fetchone()[0] == "{}"
        rows = db.execute("SELECT detail FROM events WHERE queue_id = 'Q00003' ORDER BY id").fetchall()
        assert [json.loads(r[0]) for r in rows] == [{"recipients": ["b@y"], "size": 3},
                                                     {"route": "SMTP to h:25"}, {}]
    finally:
        db.close()


async def test_a_flush_ends_the_gathering_window(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "BATCH_WINDOW", 30.0)  # a window far longer than the test may wait
    log = await _log(tmp_path)
    try:
        log.record(tracking.RECEIVED, "Q1", message_id="<m@x>", sender="a@x")
        started = time.monotonic()
        assert [e.event for e in await log.query(TrackingQuery(queue_id="Q1"))] == ["received"]
        assert time.monotonic() - started < 10
        log.record(tracking.ROUTED, "Q1", recipient="b@y")
        started = time.monotonic()
    finally:
        await log.stop()  # a stop too: the pending event is written first
    assert time.monotonic() - started < 10
    log = await _log(tmp_path)
    try:
        assert [e.event for e in await log.query(TrackingQuery(queue_id="Q1"))] == ["received", "routed"]
    finally:
        await log.stop()


async def test_the_table_is_asked_only_for_messages_this_process_did_not_receive(tmp_path):
    log = await _log(tmp_path)
    try:
        log.record(tracking.RECEIVED, "KNOWN", message_id=None, sender="a@x")  # a message without Message-ID
        log.record(tracking.ROUTED, "KNOWN", recipient="b@y")
        log.record(tracking.RECEIVED, "OLD", message_id="<old@x>", sender="o@x")
        await asyncio.to_thread(log.flush_sync)
        log._known.pop("OLD")  # as after a restart
        statements: list[str] = []
        db = sqlite3.connect(tmp_path / "t.sqlite3")
        db.set_trace_callback(statements.append)
        try:
            log._write(db, [(1.0, tracking.ROUTED, "KNOWN", None, "a@x", "b@y", None, {}, True),
                            (2.0, tracking.DELIVERED, "OLD", None, None, "b@y", None, {"mailbox": "m"}, False)])
        finally:
            db.close()
        asked = [s for s in statements if s.startswith("SELECT")]
        assert len(asked) == 1 and "'OLD'" in asked[0]
        log.record(tracking.DELIVERED, "OLD", recipient="b@y")  # through record(): filled in from the table
        (old,) = [e for e in await log.query(TrackingQuery(queue_id="OLD")) if e.time != 2.0 and e.event == "delivered"]
        assert old.message_id == "<old@x>" and old.sender == "o@x"
        known = await log.query(TrackingQuery(queue_id="KNOWN"))
        assert {(e.message_id, e.sender) for e in known} == {(None, "a@x")}
    finally:
        await log.stop()


async def test_listeners_get_every_event(tmp_path):
    log = await _log(tmp_path)
    seen: list[tracking.TrackingEvent] = []
    log.on_event(seen.append)
    try:
        log.record(tracking.RECEIVED, "Q1", message_id="<m@x>", sender="a@x", size=3)
        log.record(tracking.ROUTED, "Q1", recipient="b@y")
    finally:
        await log.stop()
    assert [(e.event, e.message_id, e.sender, e.site) for e in seen] == [
        ("received", "<m@x>", "a@x", "SiteA"), ("routed", "<m@x>", "a@x", "SiteA")]
    assert seen[0].detail == {"size": 3}


def _two_site_routes(cost_b: int) -> dict:
    return {"connected_sites": [
        {"name": "SiteC", "routing_address": "@SiteC.microsoft.com", "cost": 1, "host": "127.0.0.1", "port": 2601},
        {"name": "SiteC", "routing_address": "@SiteC.microsoft.com", "cost": cost_b, "host": "127.0.0.1",
         "port": 2602}]}


def table_of(site: Site) -> RoutingTable:
    """A routing table made afresh from the site's settings and live state."""
    return routing_table_for(site.config, addressing_domain=site.addressing_domain,
                             learned_sites=site.learned_sites, self_endpoints=site.self_endpoints())


def test_routing_decisions_are_kept_for_the_table_they_were_made_with(tmp_path):
    site = Site(make_config(tmp_path, site_mapping("SiteA", email_domains=[
        {"domain": "partner.test", "host": "127.0.0.1", "port": 2600}], **_two_site_routes(2))))
    try:
        qmgr, table = site.qmgr, table_of(site)
        first = qmgr.route_for_cached("bob@partner.test", None, table, "Q1")
        assert first == route_for("bob@partner.test", None, table, "Q1") and first.port == 2600
        assert qmgr.route_for_cached("bob@partner.test", None, table, "Q2") is first  # the same decision again
        assert qmgr.route_for_cached("eve@partner.test", None, table, "Q3").recipient == "eve@partner.test"
        # different costs: the queue id plays no part, the decision is kept too
        c = qmgr.route_for_cached("User3@SiteC.microsoft.com", None, table, "Q1")
        assert c.port == 2601 and qmgr.route_for_cached("User3@SiteC.microsoft.com", None, table, "Q2") is c
        # a new table (the site refreshed it): decided afresh
        newer = table_of(site)
        again = qmgr.route_for_cached("bob@partner.test", None, newer, "Q4")
        assert again == first and again is not first
    finally:
        site.directory.close()
        site.spool.close()


def test_equal_cost_routes_are_decided_per_message(tmp_path):
    site = Site(make_config(tmp_path, site_mapping("SiteA", **_two_site_routes(1))))
    try:
        qmgr, table = site.qmgr, table_of(site)
        assert shares_load(table)
        ports = {qid: qmgr.route_for_cached("User3@SiteC.microsoft.com", None, table, qid).port
                 for qid in (f"Q{i}" for i in range(40))}
        assert set(ports.values()) == {2601, 2602}  # the load is shared, message by message
        assert all(port == route_for("User3@SiteC.microsoft.com", None, table, qid).port
                   for qid, port in ports.items())
    finally:
        site.directory.close()
        site.spool.close()
