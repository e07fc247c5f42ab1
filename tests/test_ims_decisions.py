"""Unit tests of the pure decisions: Transfer mode, faults, and the new config sections."""

from __future__ import annotations

import pytest
from sitekit import make_config, site_mapping

from imsrelay.model.errors import ConfigError
from imsrelay.observe.faults import (
    Fault,
    FaultBook,
    FaultError,
    fault_from_request,
    fires,
    matches_client,
    matches_link,
)
from imsrelay.policy.transfer_mode import TransferMode, accepts_inbound, holds, parse_mode


def test_transfer_modes():
    assert parse_mode("Inbound & Outbound".replace(" & ", "&")) is TransferMode.INBOUND_OUTBOUND
    assert parse_mode("both") is TransferMode.INBOUND_OUTBOUND
    assert parse_mode("outbound only") is TransferMode.OUTBOUND
    with pytest.raises(ValueError, match="not a transfer mode"):
        parse_mode("sideways")
    table = {(m, remote): holds(m, remote=remote) for m in TransferMode for remote in (True, False)}
    assert table == {
        (TransferMode.INBOUND_OUTBOUND, True): False, (TransferMode.INBOUND_OUTBOUND, False): False,
        (TransferMode.INBOUND, True): True, (TransferMode.INBOUND, False): False,
        (TransferMode.OUTBOUND, True): False, (TransferMode.OUTBOUND, False): False,
        (TransferMode.NONE, True): True, (TransferMode.NONE, False): True}
    assert [m for m in TransferMode if accepts_inbound(m)] == [TransferMode.INBOUND_OUTBOUND, TransferMode.INBOUND]


def fault(**kw) -> Fault:
    return fault_from_request(kw, fault_id="f1", now=100.0)


def test_fault_requests_are_validated():
    f = fault(stage="rcpt", reply="451 4.3.0 later", probability=0.25, sessions=3, expires="10m", peer="10.0.0.0/8")
    assert (f.code, f.text, f.probability, f.sessions, f.expires_at, f.peer) == (451, "4.3.0 later", 0.25, 3, 700.0,
                                                                                  "10.0.0.0/8")
    assert fault(stage="mail", code=550).reply_line() == "550 fault f1 injected by the administrator"
    assert fault(kind="latency", delay="2s").stage == "any"
    assert fault(kind="link", peer="SiteB").describe() == "refuse outbound traffic to SiteB"
    for bad, message in (({"stage": "rcpt", "reply": "250 ok"}, "4xx or 5xx"),
                         ({"stage": "quit", "code": 451}, "stage must be one of"),
                         ({"stage": "rcpt"}, "needs reply"),
                         ({"kind": "link"}, "needs peer"),
                         ({"kind": "latency", "delay": 0}, "delay must be"),
                         ({"stage": "rcpt", "code": 451, "probability": 0}, "probability"),
                         ({"stage": "rcpt", "code": 451, "sessions": 0}, "sessions"),
                         ({"stage": "rcpt", "code": 451, "expires": "30d"}, "expires"),
                         ({"stage": "rcpt", "code": 451, "peer": "nowhere"}, "not a client address"),
                         ({"stage": "rcpt", "code": 451, "colour": "red"}, "not a fault setting"),
                         ({"stage": "rcpt", "code": True}, "wrong type")):
        with pytest.raises(FaultError, match=message):
            fault(**bad)


def test_does_this_fault_fire():
    f = fault(stage="rcpt", code=451, probability=0.5)
    assert fires(f, stage="rcpt", roll=0.49) and not fires(f, stage="rcpt", roll=0.5)
    assert not fires(f, stage="mail", roll=0.0)
    lat = fault(kind="latency", delay=1)
    assert fires(lat, stage="helo", roll=0.0) and fires(lat, stage="data", roll=0.0)
    scoped = fault(stage="mail", code=451, peer="127.0.0.32")
    assert matches_client(scoped, "127.0.0.32") and not matches_client(scoped, "127.0.0.31")
    assert not matches_client(scoped, None) and matches_client(f, None)
    link = fault(kind="link", peer="SiteB")
    assert matches_link(link, site="siteb", host=None, port=None, domain=None)
    assert not matches_link(link, site="SiteC", host="10.0.0.15", port=25, domain="SiteC.microsoft.com")
    hostport = fault(kind="link", peer="10.0.0.15:2525")
    assert matches_link(hostport, site=None, host="10.0.0.15", port=2525, domain=None)
    assert not matches_link(hostport, site=None, host="10.0.0.15", port=25, domain=None)


def test_fault_book_sessions_and_expiry():
    now = [0.0]
    book = FaultBook(clock=lambda: now[0], rng=lambda: 0.0)
    f = book.add({"stage": "mail", "code": 451, "sessions": 2, "expires": 60})
    s1, s2 = book.session(None), book.session(None)
    # an attempt is a transaction: a client retrying on its open connection meets exactly 2 refusals
    assert book.firing(s1, "mail") == [f]
    assert book.listing()[0]["sessions_left"] == 1 and "next 2 attempt(s)" in book.listing()[0]["description"]
    assert book.firing(s1, "mail") == [f]
    assert book.listing() == []  # used up: it leaves the list
    assert book.firing(s1, "mail") == [] and book.firing(s2, "mail") == []
    assert not book
    # a rcpt fault refuses every recipient of its transaction, and counts the transaction once
    r = book.add({"stage": "rcpt", "code": 451, "sessions": 1})
    assert book.firing(s1, "mail") == [] and book.firing(s1, "rcpt") == [r] and book.firing(s1, "rcpt") == [r]
    assert book.firing(s1, "mail") == [] and book.firing(s1, "rcpt") == [] and not book
    # a connect fault added while a connection is open fires at its next transaction, once
    now[0] = 1.0
    c = book.add({"stage": "connect", "code": 421, "text": "4.3.2 going away", "sessions": 2})
    assert book.late_connect(s1) == [c] and book.late_connect(s1) == []
    assert book.firing(book.session(None), "connect") == [c]
    assert book.listing() == []
    book.add({"stage": "mail", "code": 451, "expires": 60})
    now[0] = 62.0
    assert book.faults() == []
    g = book.add({"kind": "link", "peer": "SiteB"})
    assert book.link_cut(site="SiteB", host=None, port=None, domain=None) == g
    assert [x.id for x in book.clear()] == [g.id]
    with pytest.raises(FaultError, match="no fault f9"):
        book.clear(["f9"])


def test_new_config_sections(tmp_path):
    cfg = make_config(tmp_path, site_mapping(
        "SiteA", transfer={"mode": "outbound-only"},
        connections={"max_outbound": 5, "max_outbound_per_host": 2, "messages_per_connection": 10},
        delivery={"lifetime": "48h", "delay_notice": "4h"},
        priorities={"urgent_lifetime": "1h", "non_urgent_delay_notice": "never"},
        notifications={"administrator": "Administrator", "copy_ndrs": True},
        etrn={"allowed_hosts": ["10.0.0.0/8"], "requests": [{"host": "10.0.0.1:2525", "domain": "SiteA.example"}]},
        diagnostics={"addressing": "Maximum", "smtp_protocol_log": "medium"},
        metrics={"require_token": True}))
    assert cfg.transfer.mode == "outbound"
    assert (cfg.connections.max_outbound, cfg.connections.max_outbound_per_host,
            cfg.connections.messages_per_connection) == (5, 2, 10)
    p = cfg.priorities
    assert (p.urgent.lifetime, p.urgent.delay_notice) == (3600.0, 4 * 3600.0)
    assert (p.normal.lifetime, p.normal.delay_notice) == (48 * 3600.0, 4 * 3600.0)
    assert (p.non_urgent.lifetime, p.non_urgent.delay_notice) == (72 * 3600.0, None)
    assert cfg.etrn.requests[0].port == 2525 and cfg.etrn.requests[0].schedule == 3600.0
    assert cfg.diagnostics.level("addressing", "medium") == "maximum"
    assert cfg.diagnostics.level("internal_processing", "medium") == "medium"
    assert cfg.metrics.require_token and cfg.notifications.copy_ndrs
    defaults = make_config(tmp_path, site_mapping("SiteA"))
    assert defaults.transfer.mode == "inbound-outbound" and defaults.connections.messages_per_connection == 0
    assert defaults.priorities.normal.lifetime == 48 * 3600.0  # the IMS's normal time-out
    for extra, key in (({"transfer": {"mode": "half"}}, "transfer.mode"),
                       ({"connections": {"max_outbound": 0}}, "connections.max_outbound"),
                       ({"priorities": {"urgent_lifetime": "soon"}}, "priorities.urgent_lifetime"),
                       ({"notifications": {"copy_ndrs": True}}, "notifications.administrator"),
                       ({"diagnostics": {"addressing": "loud"}}, "diagnostics.addressing"),
                       ({"diagnostics": {"colour": "red"}}, "diagnostics.colour"),
                       ({"connected_sites": [{"name": "SiteB", "routing_address": "@b.example", "host": "a:b"}]},
                        "connected_sites[0].host")):
        with pytest.raises(ConfigError) as err:
            make_config(tmp_path, site_mapping("SiteA", **extra))
        assert err.value.key == key
