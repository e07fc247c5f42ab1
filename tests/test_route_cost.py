"""Route cost (Q156063): least cost first, equal costs share the load, a dearer route
when the cheaper one fails; `imsrelay route` shows the choice."""

from __future__ import annotations

import asyncio

from ims_kit import Peer, message, queued, spread_over_two_peers, start_peer, submit
from sitekit import free_port, running_site, site_mapping, wait_for, write_site_file

from imsrelay.cli import main
from imsrelay.model.settings import ConnectedSite, DomainRoute
from imsrelay.routing.router import RELAY, RoutingTable, order_by_cost, route_for


def two_routes(cheap: int, dear: int, cost_b: int = 2) -> dict:
    """SiteC at cost 1 through the E-Mail Domain table, and at ``cost_b`` via another host."""
    return {"connected_sites": [
        {"name": "SiteC", "routing_address": "@SiteC.microsoft.com", "cost": 1},
        {"name": "SiteC", "routing_address": "@SiteC.microsoft.com", "cost": cost_b, "host": "127.0.0.1",
         "port": dear}],
        "email_domains": [{"domain": "SiteC.microsoft.com", "host": "127.0.0.1", "port": cheap}]}


async def test_least_cost_first_then_failover_to_the_dearer_route(tmp_path, capsys):
    cheap_port, dear_port = free_port(), free_port()
    cheap, dear = Peer("cheap.test"), Peer("dear.test")
    cheap_server = await start_peer("127.0.0.1", cheap_port, cheap)
    dear_server = await start_peer("127.0.0.1", dear_port, dear)
    path, config = write_site_file(tmp_path, site_mapping(
        "SiteA", delivery={"retry_intervals": [0.3], "connect_timeout": 2}, **two_routes(cheap_port, dear_port)))
    try:
        assert await asyncio.to_thread(main, ["route", "User3@SiteC.microsoft.com", "--config", str(path)]) == 0
        out = capsys.readouterr().out
        assert "site SiteC has 2 route(s): cost 1 @SiteC.microsoft.com, cost 2 @SiteC.microsoft.com via host" in out
        assert f"=> SMTP to 127.0.0.1:{cheap_port} (STARTTLS opportunistic) (cost 1)" in out
        assert f"if that fails: SMTP to 127.0.0.1:{dear_port} (cost 2)" in out
        async with running_site(config) as site:
            for i in range(3):
                await submit(site, ["User3@SiteC.microsoft.com"], message(f"cheap {i}"))
            await wait_for(lambda: len(cheap.messages) == 3)
            await wait_for(lambda: not queued(site))
            assert dear.messages == []

            cheap_server.close()  # the cheaper route fails: the dearer one carries the mail
            cheap.hang_up()
            await cheap_server.wait_closed()
            for i in range(3):
                await submit(site, ["User3@SiteC.microsoft.com"], message(f"dear {i}"))
            await wait_for(lambda: len(dear.messages) == 3)
            await wait_for(lambda: not queued(site))
            assert len(cheap.messages) == 3
            assert sorted(dear.subjects()) == ["dear 0", "dear 1", "dear 2"]
    finally:
        cheap_server.close()
        dear_server.close()


async def test_equal_costs_share_the_load(tmp_path):
    one, two = await spread_over_two_peers(tmp_path, lambda p1, p2: two_routes(p1, p2, cost_b=1))
    assert one.messages and two.messages  # both routes carried mail (crc32 of 16 ids: never all on one)


def table(*sites: ConnectedSite) -> RoutingTable:
    return RoutingTable(site="SiteA", site_domain="SiteA.microsoft.com", local_domains=("#sitea.microsoft.com",),
                        connected_sites=sites,
                        email_domains=(DomainRoute("SiteC.microsoft.com", "10.0.0.20", 25),))


def test_route_choice_is_pure_and_explained():
    direct = ConnectedSite("SiteC", "@SiteC.microsoft.com", 1)
    via_b = ConnectedSite("SiteC", "@SiteC.microsoft.com", 5, "10.0.0.15", 25)
    route = route_for("User3@SiteC.microsoft.com", None, table(via_b, direct), "Q1")
    assert (route.kind, route.host, route.cost) == (RELAY, "10.0.0.20", 1)
    assert [(a.host, a.cost) for a in route.alternatives] == [("10.0.0.15", 5)]
    # one entry: as before, no alternatives
    single = route_for("User3@SiteC.microsoft.com", None, table(direct), "Q1")
    assert single.alternatives == () and single.cost is None and single.host == "10.0.0.20"
    # equal costs: the queue id picks the first, deterministically, and both get used
    a = ConnectedSite("SiteC", "@SiteC.microsoft.com", 1, "10.0.0.1", 25)
    b = ConnectedSite("SiteC", "@SiteC.microsoft.com", 1, "10.0.0.2", 25)
    firsts = {order_by_cost([a, b, via_b], f"Q{i}")[0].host for i in range(20)}
    assert firsts == {"10.0.0.1", "10.0.0.2"}
    assert all(order_by_cost([a, b, via_b], f"Q{i}")[-1] is via_b for i in range(20))
    assert order_by_cost([a, b], "Q7") == order_by_cost([a, b], "Q7")


def test_replication_connector_default_schedule_is_every_3_hours(tmp_path):
    from sitekit import make_config

    cfg = make_config(tmp_path, site_mapping("SiteA", replication={"connectors": [
        {"site": "SiteB"}, {"site": "SiteC", "schedule": "always"}]}))
    assert [c.schedule for c in cfg.replication.connectors] == [3 * 3600.0, 15 * 60.0]
