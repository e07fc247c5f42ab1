"""Next hops of several hosts (`host1,host2,host3`, KB Q279323: used in turn, a host
that is down skipped), a Connected Sites entry naming several servers (equal cost
shares the load, KB Q262952) and the MTA's "use least-cost routes only" (KB Q233081):
the pure decisions, the settings, and real SMTP peers on loopback."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import structlog
from ims_kit import Peer, message, queued, spread_over_two_peers, start_peer, submit
from sitekit import (
    config_of,
    free_port,
    run_cli,
    running_site,
    site_mapping,
    wait_for,
    write_site_file,
)

from imsrelay.model.errors import ConfigErrors
from imsrelay.model.settings import ConnectedSite, DomainRoute, OutboundAuth, Secret
from imsrelay.routing.router import (
    FAIL,
    RELAY,
    RoutingTable,
    hosts_in_turn,
    rotate,
    route_for,
    shares_load,
)

A, B, C = ("10.0.0.1", 25), ("10.0.0.2", 2525), ("10.0.0.3", 25)


def table(**kw: object) -> RoutingTable:
    return RoutingTable(site="SiteA", site_domain="SiteA.microsoft.com", local_domains=("#sitea.microsoft.com",),
                        **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- pure


def test_hosts_take_turns_by_message_and_a_message_keeps_its_turn():
    firsts = [rotate([A, B, C], f"Q{i}")[0] for i in range(30)]
    assert set(firsts) == {A, B, C}
    assert rotate([A, B, C], "Q7") == rotate([A, B, C], "Q7")
    for i in range(30):  # a rotation: every host once, in the written cyclic order
        turn = rotate([A, B, C], f"Q{i}")
        start = [A, B, C].index(turn[0])
        assert turn == [*[A, B, C][start:], *[A, B, C][:start]]
    assert rotate([A], "Q1") == [A] and rotate([A, B], "") == [A, B]


def test_a_host_that_is_down_is_skipped_until_its_hold_ends():
    assert hosts_in_turn((A, B, C), {}, 100.0) == ((A, B, C), ())
    assert hosts_in_turn((A, B, C), {A: 130.0}, 100.0) == ((B, C), (A,))
    assert hosts_in_turn((A, B, C), {A: 130.0}, 130.0) == ((A, B, C), ())  # the hold is over
    assert hosts_in_turn((A, B), {A: 130.0, B: 140.0}, 100.0) == ((), (A, B))  # all down: nothing to try
    assert hosts_in_turn((A,), {A: 130.0}, 100.0) == ((A,), ())  # a single host: its own hold answers


def test_an_email_domain_of_several_hosts_is_one_destination_whatever_the_turn():
    auth = OutboundAuth("ims", Secret("pw"))
    t = table(email_domains=(DomainRoute("partner.test", A[0], A[1], more_hosts=(B, C), auth=auth),))
    routes = [route_for("bob@partner.test", None, t, f"Q{i}") for i in range(20)]
    assert {r.kind for r in routes} == {RELAY}
    assert {r.relay_hosts[0] for r in routes} == {A, B, C}
    assert all(sorted(r.relay_hosts) == [A, B, C] and (r.host, r.port) == r.relay_hosts[0] for r in routes)
    assert len({r.destination for r in routes}) == 1 and "auth=ims" in routes[0].destination
    assert "pw" not in routes[0].destination and "pw" not in repr(routes[0])
    text = routes[0].explain()
    assert "3 hosts used in turn, round robin by message (KB Q279323)" in text
    assert "AUTH as ims (E-Mail Domain entry partner.test's credentials" in text
    assert shares_load(t)


def test_the_smart_host_takes_several_hosts_and_a_loop_among_them_is_refused():
    t = table(smart_hosts=(A, B))
    route = route_for("bob@elsewhere.test", None, t, "Q1")
    assert route.kind == RELAY and sorted(route.relay_hosts) == [A, B]
    assert "SMTP to 10.0.0." in route.next_hop_text()
    looped = route_for("bob@elsewhere.test", None, replace(t, self_endpoints=frozenset({B})), "Q1")
    assert looped.kind == FAIL and looped.status == "5.4.6" and "10.0.0.2:2525" in (looped.reason or "")


def test_a_connected_site_naming_several_servers_shares_the_load_and_dearer_is_failover():
    servers = ConnectedSite("SiteC", "@SiteC.microsoft.com", 1, A[0], A[1], more_hosts=(B,))
    dear = ConnectedSite("SiteC", "@SiteC.microsoft.com", 5, C[0], C[1])
    t = table(connected_sites=(dear, servers))
    routes = [route_for("User3@SiteC.microsoft.com", None, t, f"Q{i}") for i in range(20)]
    assert {r.relay_hosts[0] for r in routes} == {A, B}  # the two servers of cost 1 take turns
    assert all(r.cost == 1 and [(a.host, a.cost) for a in r.alternatives] == [(C[0], 5)] for r in routes)
    assert "a dearer one is used when the cheaper ones fail (KB Q262952)" in routes[0].explain()
    only = replace(t, least_cost_only=True)
    cheapest = route_for("User3@SiteC.microsoft.com", None, only, "Q1")
    assert cheapest.cost == 1 and cheapest.alternatives == ()  # no failover to the dearer route
    assert "least-cost routes are used, never a dearer one (routing.least_cost_only, KB Q233081)" in \
        cheapest.explain()
    equal = ConnectedSite("SiteC", "@SiteC.microsoft.com", 1, C[0], C[1])
    both = route_for("User3@SiteC.microsoft.com", None, replace(only, connected_sites=(servers, equal)), "Q1")
    assert len(both.alternatives) == 1 and both.alternatives[0].cost == 1  # equal cost: still least cost


def test_host_lists_and_credentials_in_the_settings(tmp_path, monkeypatch):
    cfg = config_of(site_mapping(
        "SiteA", delivery={"smart_host": "10.0.0.1, 10.0.0.2:2525",
                           "smart_host_auth": {"username": "u", "password_env": "PW_ENV"}},
        email_domains=[{"domain": "p.test", "host": "10.0.0.5,10.0.0.6:26", "port": 2600,
                        "auth": {"username": "v", "password_file": "pw.txt", "allow_plaintext": True}}],
        connected_sites=[{"name": "SiteC", "routing_address": "@SiteC.microsoft.com", "host": "10.0.0.7,[::1]:27"}],
        routing={"least_cost_only": True}))
    assert cfg.delivery.smart_hosts == (("10.0.0.1", 25), ("10.0.0.2", 2525))
    assert cfg.delivery.smart_host_auth == OutboundAuth("u", password_env="PW_ENV")
    (entry,) = cfg.email_domains
    assert entry.hosts == (("10.0.0.5", 2600), ("10.0.0.6", 26))
    assert entry.auth is not None and entry.auth.allow_plaintext and entry.auth.password_file is not None
    assert entry.auth.password_file.name == "pw.txt"
    assert cfg.connected_sites[0].hosts == (("10.0.0.7", 25), ("::1", 27))
    assert cfg.routing.least_cost_only
    secret = OutboundAuth("w", Secret("hunter2"))
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret.password)
    bad = [({"delivery": {"smart_host": "10.0.0.1,,10.0.0.2"}}, "delivery.smart_host", "an empty host"),
           ({"delivery": {"smart_host": "10.0.0.1,10.0.0.1:25"}}, "delivery.smart_host", "the same host twice"),
           ({"email_domains": [{"domain": "p.test", "host": "10.0.0.1", "auth": {"username": "u"}}]},
            "email_domains[0].auth.password_env", "exactly one of"),
           ({"email_domains": [{"domain": "p.test", "host": "10.0.0.1",
                                "auth": {"username": "u", "password": "x", "password_env": "E"}}]},
            "email_domains[0].auth.password_env", "not password and password_env"),
           ({"delivery": {"smart_host_auth": {"password_env": "E"}}}, "delivery.smart_host_auth.username",
            "required")]
    for extra, key, text in bad:
        with pytest.raises(ConfigErrors) as caught:
            config_of(site_mapping("SiteA", **extra))
        assert any(e.key == key and text in e.message for e in caught.value.errors), caught.value.errors


# ----------------------------------------------------------------------------- real peers


async def test_host1_down_host2_carries_the_mail_and_host1_is_skipped_after(tmp_path):
    dead, live = free_port(), free_port()  # nothing listens on `dead`
    peer = Peer()
    server = await start_peer("127.0.0.1", live, peer)
    path, config = write_site_file(tmp_path, site_mapping(
        "SiteA", delivery={"retry_intervals": [30], "connect_timeout": 2,
                           "smart_host": f"127.0.0.1:{dead},127.0.0.1:{live}"},
        diagnostics={"smtp_interface_events": "medium"}))  # (its info events, whatever the suite's level)

    def refused() -> list[dict]:
        return [e for e in logs if e["event"] == "delivery.connect_failed" and e["peer"].endswith(f":{dead}")]

    try:
        with structlog.testing.capture_logs() as logs:  # (before the start: the site's logger is made then)
            async with running_site(config) as site:
                sent = 0
                while not refused() and sent < 16:  # until a message's turn put the dead host first
                    await submit(site, ["bob@elsewhere.test"], message(f"m{sent}"))
                    sent += 1
                    await wait_for(lambda n=sent: len(peer.messages) == n)
                for i in range(2):  # then it is skipped, whatever the turn
                    await submit(site, ["bob@elsewhere.test"], message(f"after {i}"))
                await wait_for(lambda: len(peer.messages) == sent + 2)
                await wait_for(lambda: not queued(site))
        code, out, _ = await asyncio.to_thread(run_cli, "route", "bob@elsewhere.test", "--config", str(path))
    finally:
        server.close()
    assert len(refused()) == 1  # one connection refused, then the host was remembered as down
    skipped = [e for e in logs if e["event"] == "delivery.hosts_skipped"]
    assert len(skipped) >= 2 and all(e["hosts"] == f"127.0.0.1:{dead}" for e in skipped)
    assert {"after 0", "after 1"} <= set(peer.subjects())  # no message waited for a retry (30 s)
    assert code == 0 and f"SMTP to 127.0.0.1:{dead}, 127.0.0.1:{live}, in this order" in out
    assert "2 hosts used in turn, round robin by message (KB Q279323)" in out


async def test_equal_cost_servers_of_a_connected_site_share_the_load(tmp_path):
    one, two = await spread_over_two_peers(tmp_path, lambda p1, p2: {"connected_sites": [
        {"name": "SiteC", "routing_address": "@SiteC.microsoft.com", "host": f"127.0.0.1:{p1},127.0.0.1:{p2}"}]})
    assert one.messages and two.messages  # both servers carried mail (crc32 of 16 queue ids: never all on one)


async def test_least_cost_only_keeps_mail_off_the_dearer_route(tmp_path):
    dead, dear_port = free_port(), free_port()
    dear = Peer()
    server = await start_peer("127.0.0.1", dear_port, dear)
    sites = [{"name": "SiteC", "routing_address": "@SiteC.microsoft.com", "cost": 1, "host": f"127.0.0.1:{dead}"},
             {"name": "SiteC", "routing_address": "@SiteC.microsoft.com", "cost": 2, "host": f"127.0.0.1:{dear_port}"}]
    (tmp_path / "failover").mkdir()
    (tmp_path / "least").mkdir()
    _, failover = write_site_file(tmp_path / "failover", site_mapping(
        "SiteA", delivery={"retry_intervals": [0.3], "connect_timeout": 2}, connected_sites=sites))
    path, least = write_site_file(tmp_path / "least", site_mapping(
        "SiteA", delivery={"retry_intervals": [0.3], "connect_timeout": 2}, connected_sites=sites,
        routing={"least_cost_only": True}))
    try:
        async with running_site(least) as site:
            await submit(site, ["User3@SiteC.microsoft.com"], message("least cost only"))
            held = await wait_for(lambda: [r for e in queued(site) for r in e.recipients if r.attempts >= 2])
            assert dear.messages == []  # tried twice on the cheapest route, never the dearer one
        assert held[0].status == "4.4.1" and str(dead) in (held[0].diagnostic or "")
        async with running_site(failover) as site:  # the default: the dearer route carries it (Q262952)
            await submit(site, ["User3@SiteC.microsoft.com"], message("failover"))
            await wait_for(lambda: dear.messages)
        code, out, _ = await asyncio.to_thread(run_cli, "route", "User3@SiteC.microsoft.com", "--config", str(path))
    finally:
        server.close()
    assert dear.subjects() == ["failover"]
    assert code == 0 and "routing.least_cost_only, KB Q233081" in out and "if that fails" not in out


def test_the_property_pages_never_show_the_password_and_keep_the_security_tab_on_a_change():
    from imsrelay.admin.property_routes import email_domain_entry, without_secrets

    old = {"domain": "p.test", "host": "10.0.0.1", "starttls": "require",
           "auth": {"username": "ims", "password": "hunter2"}}
    shown = without_secrets(old)
    assert shown is not None and shown["auth"] == {"username": "ims", "password": "********"}
    assert old["auth"]["password"] == "hunter2"  # (the file's data is not changed)
    changed = email_domain_entry({"host": "10.0.0.2,10.0.0.3:2525"}, "p.test", old)
    assert changed == {"domain": "p.test", "host": "10.0.0.2,10.0.0.3:2525", "starttls": "require",
                       "auth": {"username": "ims", "password": "hunter2"}}
