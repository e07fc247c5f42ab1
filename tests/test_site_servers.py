"""A site of several servers (issue 24): the home server decision (pure), intra-site
directory replication (pure halves, then two real servers), and mail accepted by
any server of the site reaching the home server's Maildir."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import smtplib

import aiohttp
import pytest
from sitekit import (
    config_of,
    free_port,
    maildir_messages,
    run_cli,
    send_mail,
    simple_message,
    site_mapping,
    wait_for,
    write_site_file,
)

from imsrelay.directory.intrasite import apply_changes, changes_since, peer_state
from imsrelay.directory.store import Directory
from imsrelay.model.envelope import Envelope, RecipientState
from imsrelay.model.objects import Mailbox
from imsrelay.model.settings import intrasite_interval
from imsrelay.observe.tracking import ROUTED, TrackingQuery
from imsrelay.policy.transfer_mode import TransferMode
from imsrelay.routing.host_addresses import site_endpoints
from imsrelay.routing.router import FAIL, LOCAL, RELAY, route_for, routing_table_for, sent_back
from imsrelay.site import Site

TOKEN = "intrasite-test-token"
SERVERS = [{"name": "ServerA", "host": "127.10.10.10", "port": 2525, "admin": "http://127.10.10.10:8025"},
           {"name": "Server1", "host": "127.10.10.11", "port": 2525, "admin": "http://127.10.10.11:8025"}]


def two_server_table(server: str = "ServerA", **extra):
    mapping = site_mapping("SiteA", listen="127.10.10.10" if server == "ServerA" else "127.10.10.11", port=2525,
                           servers=SERVERS, **extra)
    mapping["site"]["server"] = server
    config = config_of(mapping)
    return routing_table_for(config, addressing_domain="sitea.microsoft.com", learned_sites=(),
                             self_endpoints=site_endpoints(config, 2525))


def box(alias: str, home_server: str, site: str = "SiteA") -> Mailbox:
    return Mailbox(alias, alias, site, (f"SMTP:{alias}@SiteA.microsoft.com",), home_server=home_server)


# ------------------------------------------------------------------ the home server (pure)


def test_a_mailbox_homed_on_this_server_is_delivered_here():
    route = route_for("User1@SiteA.microsoft.com", box("User1", "ServerA"), two_server_table())
    assert route.kind == LOCAL and route.mailbox == "User1"
    assert "home server: ServerA (this server)" in route.explain()


def test_a_mailbox_homed_on_another_server_is_an_intra_site_hop():
    route = route_for("User1@SiteA.microsoft.com", box("User1", "server1"), two_server_table())
    assert (route.kind, route.host, route.port, route.server) == (RELAY, "127.10.10.11", 2525, "Server1")
    assert "intra-site hop" in route.explain() and "home server Server1" in route.explain()
    # seen from Server1, the same mailbox is local: the hop ends there, no loop
    assert route_for("User1@SiteA.microsoft.com", box("User1", "Server1"), two_server_table("Server1")).kind == LOCAL


def test_no_home_server_or_a_site_of_one_server_is_local():
    assert route_for("U@SiteA.microsoft.com", box("U", ""), two_server_table()).kind == LOCAL
    single = config_of(site_mapping("SiteA", listen="127.10.10.10", port=2525))
    table = routing_table_for(single, addressing_domain="sitea.microsoft.com", learned_sites=())
    assert route_for("U@SiteA.microsoft.com", box("U", "Server1"), table).kind == LOCAL


def test_an_unknown_home_server_waits_and_a_server_pointing_at_itself_fails():
    route = route_for("U@SiteA.microsoft.com", box("U", "Gone"), two_server_table())
    assert (route.kind, route.permanent, route.status) == (FAIL, False, "4.4.0")
    assert "not among this site's [[servers]]" in route.reason
    servers = [dict(SERVERS[0]), dict(SERVERS[1], host="127.10.10.10")]  # Server1 listed at ServerA's address
    mapping = site_mapping("SiteA", listen="127.10.10.10", port=2525, servers=servers)
    config = config_of(mapping)
    table = routing_table_for(config, addressing_domain="sitea.microsoft.com", learned_sites=(),
                              self_endpoints=site_endpoints(config, 2525))
    looped = route_for("U@SiteA.microsoft.com", box("U", "Server1"), table)
    assert (looped.kind, looped.status, looped.permanent) == (FAIL, "4.4.6", False)


def test_mail_for_another_sites_mailbox_ignores_home_servers():
    route = route_for("User2@SiteB.microsoft.com", box("User2", "ServerB", site="SiteB"), two_server_table(
        connected_sites=[{"name": "SiteB", "routing_address": "@SiteB.microsoft.com"}],
        email_domains=[{"domain": "SiteB.microsoft.com", "host": "127.10.10.15", "port": 2525}]))
    assert (route.kind, route.host, route.server) == (RELAY, "127.10.10.15", None)


def test_a_hop_back_to_the_server_that_handed_the_mail_over_is_recognised():
    table = two_server_table()
    servers = config_of(site_mapping("SiteA", servers=SERVERS)).servers
    hop = route_for("User1@SiteA.microsoft.com", box("User1", "Server1"), table)
    assert sent_back("127.10.10.11", hop, servers)  # Server1 gave it to us and we would give it back
    assert not sent_back("127.0.0.1", hop, servers)  # a client: the hop is the way
    local = route_for("User1@SiteA.microsoft.com", box("User1", "ServerA"), table)
    assert not sent_back("127.10.10.11", local, servers)


def test_the_backstop_is_exchanges_300_s_plus_30_s_per_server_unless_set():
    config = config_of(site_mapping("SiteA", servers=SERVERS))
    assert intrasite_interval(config.replication, 2) == 360.0
    config = config_of(site_mapping("SiteA", servers=SERVERS, replication={"intrasite_interval": "2s"}))
    assert intrasite_interval(config.replication, 2) == 2.0


def test_imsrelay_route_shows_the_intra_site_hop(tmp_path):
    mapping = site_mapping("SiteA", listen="127.10.10.10", port=2525, servers=SERVERS,
                           mailboxes=[{"alias": "User1"}, {"alias": "User4", "home_server": "server1"}])
    path, _ = write_site_file(tmp_path, mapping)
    code, out, _ = run_cli("route", "User4@SiteA.microsoft.com", "--config", str(path))
    assert code == 0 and "intra-site hop to 127.10.10.11:2525" in out and "home server Server1" in out
    code, out, _ = run_cli("route", "User1@SiteA.microsoft.com", "--config", str(path))
    assert code == 0 and "home server: ServerA (this server)" in out and "local delivery" in out


def test_bridgehead_must_be_a_server_of_the_site():
    from imsrelay.model.errors import ConfigErrors

    with pytest.raises(ConfigErrors) as errors:
        config_of(site_mapping("SiteA", servers=SERVERS, replication={"bridgehead": "Elsewhere"}))
    assert "replication.bridgehead" in str(errors.value) and "'Elsewhere' is not one of [[servers]]" in str(errors.value)


def test_bridgehead_is_configured_or_the_first_server():
    first = config_of(site_mapping("SiteA", servers=SERVERS))
    assert first.bridgehead
    other = site_mapping("SiteA", servers=SERVERS)
    other["site"]["server"] = "Server1"
    assert not config_of(other).bridgehead
    other["replication"]["bridgehead"] = "Server1"
    assert config_of(other).bridgehead


# ------------------------------------------------------------------ intra-site replication (two databases)


def _pull(into: Directory, peer: str, source: Directory) -> dict:
    state = peer_state(into, peer)
    answer = json.loads(json.dumps(changes_since(source, peer, state["high_water"], state["invocation"], limit=2,
                                                 passwords_after=state["passwords_after"])))
    return apply_changes(into, peer, answer, receiving_site="SiteA", now=0.0)


def _pull_all(into: Directory, peer: str, source: Directory) -> int:
    applied = 0
    for _ in range(50):
        result = _pull(into, peer, source)
        applied += result["applied"]
        if not result["more"]:
            return applied
    raise AssertionError("pull did not finish")


def _site_dirs(tmp_path, clock_a=None, clock_b=None):
    a = Directory(tmp_path / "a.sqlite3", "SiteA", **({"clock": clock_a} if clock_a else {}))
    b = Directory(tmp_path / "b.sqlite3", "SiteA", **({"clock": clock_b} if clock_b else {}))
    for d, server in ((a, "ServerA"), (b, "Server1")):
        d.provision(organisation="ExchangeORG", server=server, site_domain="SiteA.microsoft.com",
                    hostname=f"{server}.SiteA.microsoft.com",
                    mailboxes=[("User1", "User One", (), "ServerA"), ("User4", "User Four", (), "Server1")])
    return a, b


def _view(d: Directory) -> list:
    return sorted((o.object_id, o.deleted, json.dumps(o.data, sort_keys=True)) for o in d.all_objects())


def test_two_servers_converge_in_batches_and_pulling_twice_changes_nothing(tmp_path):
    a, b = _site_dirs(tmp_path)
    for i in range(5):
        a.add_mailbox(f"New{i}", home_server="ServerA")
    b.add_mailbox("OnB", home_server="Server1")
    _pull_all(b, "ServerA", a)
    _pull_all(a, "Server1", b)
    assert _view(a) == _view(b)
    assert b.mailbox("New3").home_server == "ServerA" and a.mailbox("OnB").home_server == "Server1"
    assert _pull_all(b, "ServerA", a) == 0  # what ServerA merged from Server1 is no news to Server1
    assert peer_state(b, "ServerA")["high_water"] == a.highest_usn


def test_concurrent_changes_resolve_by_stamp_in_any_order(tmp_path):
    """The same mailbox changed on both servers: the greater stamp wins on both, whoever pulls first."""
    results = []
    for first in ("a", "b"):
        ticks_a, ticks_b = itertools.count(1000.0), itertools.count(2000.0)  # Server1's change is the later one
        a, b = _site_dirs(tmp_path / first, ticks_a.__next__, ticks_b.__next__)
        _pull_all(b, "ServerA", a)
        _pull_all(a, "Server1", b)
        a.set_mailbox_properties("User1", display_name="Changed on ServerA")
        b.set_mailbox_properties("User1", display_name="Changed on Server1")
        order = [(b, "ServerA", a), (a, "Server1", b)]
        for into, peer, source in (order if first == "a" else order[::-1]):
            _pull_all(into, peer, source)
        assert _view(a) == _view(b)
        assert a.mailbox("User1").display_name == "Changed on Server1"
        results.append(_view(a))
        a.close()
        b.close()
    assert results[0] == results[1]


def test_a_rebuilt_peer_database_is_pulled_again_from_zero(tmp_path):
    a, b = _site_dirs(tmp_path)
    _pull_all(b, "ServerA", a)
    a.close()
    (tmp_path / "a.sqlite3").unlink()
    a = Directory(tmp_path / "a.sqlite3", "SiteA")
    a.provision(organisation="ExchangeORG", server="ServerA", site_domain="SiteA.microsoft.com",
                hostname="h", mailboxes=[])
    a.add_mailbox("AfterRebuild", home_server="ServerA")
    _pull_all(b, "ServerA", a)
    assert b.mailbox("AfterRebuild") is not None
    assert peer_state(b, "ServerA")["invocation"] == a.invocation


def test_passwords_set_on_one_server_reach_the_other_and_the_later_one_wins(tmp_path):
    ticks_a, ticks_b = itertools.count(1000.0), itertools.count(2000.0)
    a, b = _site_dirs(tmp_path, ticks_a.__next__, ticks_b.__next__)
    a.set_password_hash("User1", "scrypt$hash-set-on-A")
    _pull_all(b, "ServerA", a)
    found = b.credential("User1")
    assert found is not None and found[1] == "scrypt$hash-set-on-A"
    assert peer_state(b, "ServerA")["passwords_after"] > 0
    b.set_password_hash("User1", "scrypt$later-on-B")  # B's clock is later: B's wins on both
    _pull_all(a, "Server1", b)
    _pull_all(b, "ServerA", a)
    assert a.credential("User1")[1] == b.credential("User1")[1] == "scrypt$later-on-B"


def test_a_malformed_object_from_a_peer_is_refused(tmp_path):
    a, b = _site_dirs(tmp_path)
    answer = changes_since(a, "ServerA", 0, "")
    answer["objects"][-1]["data"]["alias"] = "../escape"
    result = apply_changes(b, "ServerA", answer, receiving_site="SiteA", now=0.0)
    assert result["refused"] and "bad alias" in result["refused"][0][1]


# ------------------------------------------------------------------ two real servers of SiteA


@contextlib.asynccontextmanager
async def two_servers(tmp_path, **extra):
    hosts = {"ServerA": "127.10.10.10", "Server1": "127.10.10.11"}
    ports = {n: free_port(h) for n, h in hosts.items()}
    admin = {n: free_port(h) for n, h in hosts.items()}
    servers = [{"name": n, "host": h, "port": ports[n], "admin": f"http://{h}:{admin[n]}"} for n, h in hosts.items()]
    mailboxes = [{"alias": "User1", "display_name": "User One", "home_server": "ServerA"},
                 {"alias": "User4", "display_name": "User Four", "home_server": "Server1"}]
    configs = {}
    for n, h in hosts.items():
        mapping = site_mapping("SiteA", listen=h, port=ports[n], mailboxes=mailboxes, servers=servers,
                               admin={"listen": h, "port": admin[n], "token": TOKEN},
                               replication={"intrasite_interval": "30s"}, **extra)
        mapping["site"]["server"] = n
        (tmp_path / n).mkdir(parents=True, exist_ok=True)
        configs[n] = write_site_file(tmp_path / n, mapping)[1]
    sites = {n: Site(c) for n, c in configs.items()}
    try:
        for s in sites.values():
            await s.start()
        yield sites
    finally:
        for s in sites.values():
            await s.stop()


async def test_any_server_accepts_mail_for_the_site_and_the_home_server_delivers_it(tmp_path):
    async with two_servers(tmp_path) as sites:
        a, one = sites["ServerA"], sites["Server1"]
        msg = simple_message("alice@example.net", "User4@SiteA.microsoft.com", "via ServerA")
        await asyncio.to_thread(send_mail, "127.10.10.10", a.bound_port, "alice@example.net",
                                "User4@SiteA.microsoft.com", msg)
        delivered = await wait_for(lambda: maildir_messages(one.config.data_dir, "User4"))
        assert b"via ServerA" in delivered[0]
        assert not maildir_messages(a.config.data_dir, "User4")  # never kept on the server that accepted it
        assert b"ServerA.SiteA.microsoft.com" in delivered[0] and b"Server1.SiteA.microsoft.com" in delivered[0]
        a.tracking.flush_sync()
        events = await a.tracking.query(TrackingQuery(recipient="User4@SiteA.microsoft.com"))
        routed = [e for e in events if e.event == ROUTED]
        assert routed and routed[0].detail["to_server"] == "Server1" and "intra-site hop" in routed[0].detail["route"]
        # and the other way: a User1 mail given to Server1 ends up on ServerA
        await asyncio.to_thread(send_mail, "127.10.10.11", one.bound_port, "alice@example.net",
                                "User1@SiteA.microsoft.com", simple_message("a@example.net", "User1", "via Server1"))
        assert b"via Server1" in (await wait_for(lambda: maildir_messages(a.config.data_dir, "User1")))[0]


async def test_the_hop_ignores_the_transfer_mode_and_never_ping_pongs(tmp_path):
    async with two_servers(tmp_path) as sites:
        a, one = sites["ServerA"], sites["Server1"]
        await a.set_transfer_mode(TransferMode.INBOUND)  # the IMS's outbound held: the site's own hops go on
        await asyncio.to_thread(send_mail, "127.10.10.10", a.bound_port, "alice@example.net",
                                "User4@SiteA.microsoft.com", simple_message("a@example.net", "User4", "inbound only"))
        await wait_for(lambda: maildir_messages(one.config.data_dir, "User4"))
        # a message Server1 handed to ServerA, which thinks its mailbox lives on Server1: held, not sent back
        table = await a.routing_table()
        mbx = await a.directory.run(a.directory.mailbox, "User4")
        route = route_for("User4@SiteA.microsoft.com", mbx, table)
        env = Envelope(queue_id="Q1", sender="x@example.net", received_at=0.0, client="127.10.10.11",
                       recipients=[RecipientState("User4@SiteA.microsoft.com", "User4@SiteA.microsoft.com")])
        a.qmgr.envelopes["Q1"] = env
        try:
            assert a.hold_reason("Q1", route) == "intrasite:Server1"
            env.client = "127.0.0.1"
            assert a.hold_reason("Q1", route) is None
        finally:
            del a.qmgr.envelopes["Q1"]


async def test_a_change_on_one_server_reaches_the_other_by_notification(tmp_path):
    async with two_servers(tmp_path) as sites:
        a, one = sites["ServerA"], sites["Server1"]
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{one.config.servers[0].admin}/directory/mailboxes", headers=headers,
                                 json={"alias": "NewOnA", "display_name": "New"}) as r:
                assert r.status == 201 and (await r.json())["home_server"] == "ServerA"
            # the backstop is 30 s: only the notification brings it over within the wait
            found = await wait_for(lambda: one.directory.run(one.directory.mailbox, "NewOnA"), timeout=8)
            assert found.home_server == "ServerA"
            # mail given to Server1 for the new mailbox goes to ServerA
            await asyncio.to_thread(send_mail, "127.10.10.11", one.bound_port, "bob@example.net",
                                    "NewOnA@SiteA.microsoft.com", simple_message("b@example.net", "NewOnA", "new one"))
            await wait_for(lambda: maildir_messages(a.config.data_dir, "NewOnA"))
            # a password set on ServerA works on Server1 too (the notification carries it over)
            async with http.post(f"{one.config.servers[0].admin}/directory/mailboxes/User1/password", headers=headers,
                                 json={"password": "site-wide secret"}) as r:
                assert r.status == 200
            identity = await wait_for(lambda: one.authenticate("User1", b"site-wide secret"), timeout=8)
            assert identity.alias == "User1"
            assert await one.authenticate("User1", b"wrong") is None
            async with http.get(f"{a.config.servers[1].admin}/directory/intrasite", headers=headers) as r:
                status = await r.json()
            assert status["server"] == "Server1" and status["peers"][0]["server"] == "ServerA"
            assert status["peers"][0]["applied"] >= 1
            async with http.post(f"{a.config.servers[0].admin}/directory/intrasite/notify", headers=headers,
                                 json={"server": "Stranger"}) as r:
                assert r.status == 400
            async with http.get(f"{a.config.servers[0].admin}/directory/intrasite/changes?since=0") as r:
                assert r.status == 401  # the site's admin token only
            for bad in ("x", "-1"):
                async with http.get(f"{a.config.servers[0].admin}/directory/intrasite/changes?since={bad}",
                                    headers=headers) as r:
                    assert r.status == 400




async def test_a_cut_link_between_two_servers_holds_the_hop_until_it_is_back(tmp_path):
    async with two_servers(tmp_path) as sites:
        a, one = sites["ServerA"], sites["Server1"]
        fault = a.faults.add({"kind": "link", "peer": "Server1"})
        await asyncio.to_thread(send_mail, "127.10.10.10", a.bound_port, "alice@example.net",
                                "User4@SiteA.microsoft.com", simple_message("a@example.net", "User4", "cut link"))

        def deferred() -> bool:
            return any(r.status == "4.4.1" for env in a.qmgr.envelopes.values() for r in env.recipients)
        await wait_for(deferred)
        assert not maildir_messages(one.config.data_dir, "User4")
        a.faults.clear([fault.id])  # the link is back: what waited goes now
        assert b"cut link" in (await wait_for(lambda: maildir_messages(one.config.data_dir, "User4")))[0]


async def test_the_cli_runs_check_now_at_every_server_and_pulls_within_the_site(tmp_path):
    async with two_servers(tmp_path) as sites:
        a = sites["ServerA"]
        path = str(a.config.path)
        code, out, err = await asyncio.to_thread(run_cli, "kcc", "check-now", "--all-servers", "--config", path)
        assert code == 0, err
        assert "Check Now at SiteA/ServerA" in out and "Check Now at SiteA/Server1" in out
        code, out, err = await asyncio.to_thread(run_cli, "replicate", "servers", "--pull-now", "--config", path)
        assert code == 0, err
        assert "ServerA: pulled from Server1:" in out and "not the bridgehead" not in out
        assert "Server1 " in out.splitlines()[-1]
        await sites["Server1"].stop()  # a server that is down: the site-wide command says so
        sites["Server1"] = Site(sites["Server1"].config)
        try:
            code, out, err = await asyncio.to_thread(run_cli, "kcc", "check-now", "--all-servers", "--config", path)
            assert code == 3 and "127.10.10.11" in err
        finally:
            await sites["Server1"].start()


def test_lab_servers_option_and_addresses():
    from imsrelay.lab.embedded import SITES, parse_servers, site_servers
    from imsrelay.testing import lab_server_addresses

    assert parse_servers(["SiteA=2"]) == {"SiteA": 2} and parse_servers(["sitea=2,SiteC=3"]) == {"SiteA": 2, "SiteC": 3}
    for bad in (["SiteZ=2"], ["SiteA"], ["SiteA=0"], ["SiteA=9"]):
        with pytest.raises(ValueError):
            parse_servers(bad)
    a = site_servers(SITES[0], 2)
    assert [(v.name, v.address, v.key) for v in a] == [("ServerA", "127.10.10.10", "SiteA"),
                                                      ("Server1", "127.10.10.11", "SiteA-Server1")]
    assert [v.address for v in site_servers(SITES[2], 3)[1:]] == lab_server_addresses({"SiteC": 3})
    assert lab_server_addresses({"SiteA": 2}) == ["127.10.10.11"]
    code, _, err = run_cli("lab", "--servers", "SiteQ=2", "--data", "/nonexistent-imsrelay-lab")
    assert code != 0 and "SITE=N" in err


async def test_the_ims_connection_restrictions_do_not_stop_the_sites_own_hops(tmp_path):
    """Accept connections only from 127.0.0.1 (the users' workstations): the site's other
    server still hands its mail over (Exchange moved it by MTA, not through the IMS)."""
    async with two_servers(tmp_path, restrictions={"accept_hosts": ["127.0.0.1/32"]}) as sites:
        a, one = sites["ServerA"], sites["Server1"]
        await asyncio.to_thread(send_mail, "127.10.10.10", a.bound_port, "alice@example.net",
                                "User4@SiteA.microsoft.com", simple_message("a@example.net", "User4", "restricted"),
                                source="127.0.0.1")
        assert b"restricted" in (await wait_for(lambda: maildir_messages(one.config.data_dir, "User4")))[0]
        with pytest.raises(smtplib.SMTPConnectError):  # anyone else is still refused
            await asyncio.to_thread(send_mail, "127.10.10.11", one.bound_port, "alice@example.net",
                                    "User4@SiteA.microsoft.com", b"Subject: x\r\n\r\nx\r\n", source="127.0.0.2")
