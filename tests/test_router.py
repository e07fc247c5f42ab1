"""The router (pure): one decision per recipient, each step recorded for ``imsrelay route``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sitekit import config_of, site_mapping

from imsrelay.model.objects import Mailbox
from imsrelay.model.settings import ConnectedSite, DomainRoute
from imsrelay.routing.host_addresses import local_addresses, site_endpoints
from imsrelay.routing.router import (
    DIRECTORY,
    FAIL,
    LOCAL,
    MX,
    RELAY,
    RoutingTable,
    route_for,
    routing_table_for,
)


def table(*, addressing: str = "sitea.microsoft.com", learned=(), **extra) -> RoutingTable:
    """SiteA of the seed as a running site would build its table (config + directory facts)."""
    mapping = site_mapping("SiteA", listen="127.10.10.10", port=2525, **{
        "connected_sites": [{"name": "SiteB", "routing_address": "@SiteB.microsoft.com"},
                            {"name": "SiteC", "routing_address": "@SiteC.microsoft.com"}],
        "email_domains": [{"domain": "SiteB.microsoft.com", "host": "127.10.10.15", "port": 2525},
                          {"domain": "SiteC.microsoft.com", "host": "127.10.10.20", "port": 2525}],
        **extra})
    config = config_of(mapping)
    return routing_table_for(config, addressing_domain=addressing, learned_sites=tuple(learned),
                             self_endpoints=site_endpoints(config, 2525))


def mailbox(alias: str, home: str, *addresses: str) -> Mailbox:
    return Mailbox(alias, alias, home, tuple(f"SMTP:{addresses[0]}" if i == 0 else f"smtp:{a}"
                                             for i, a in enumerate(addresses)))


def test_local_mailbox():
    r = route_for("User1@SiteA.microsoft.com", mailbox("User1", "SiteA", "User1@SiteA.microsoft.com"), table())
    assert (r.kind, r.mailbox) == (LOCAL, "User1")
    assert r.steps == ("directory: User1@SiteA.microsoft.com is mailbox User1 (User1), home site SiteA",)


def test_mailbox_of_a_connected_site_by_exact_directory_name():
    user2 = mailbox("User2", "SiteB", "User2@microsoft.com")
    r = route_for("User2@microsoft.com", user2, table())
    assert (r.kind, r.host, r.port, r.site) == (RELAY, "127.10.10.15", 2525, "SiteB")
    assert "Connected Sites: site SiteB has routing address SMTP @SiteB.microsoft.com" in r.steps
    # the remote site name must match exactly (the directory name, not a display name)
    r = route_for("User2@microsoft.com", mailbox("User2", "siteb", "User2@microsoft.com"), table())
    assert (r.kind, r.permanent, r.status) == (FAIL, False, "4.4.0")
    assert "no route to site siteb" in r.reason


def test_mailbox_of_a_site_learned_by_check_now():
    t = table(learned=[("SiteD", "SiteD.microsoft.com")],
              email_domains=[{"domain": "SiteD.microsoft.com", "host": "127.10.10.25", "port": 2525}])
    r = route_for("User4@microsoft.com", mailbox("User4", "SiteD", "User4@microsoft.com"), t)
    assert (r.kind, r.host, r.site) == (RELAY, "127.10.10.25", "SiteD")
    assert any("a site learned by replication (Check Now)" in s for s in r.steps)


def test_unknown_address_in_a_connected_sites_domain_goes_to_that_site():
    r = route_for("someone@SiteC.microsoft.com", None, table())
    assert (r.kind, r.host, r.site) == (RELAY, "127.10.10.20", "SiteC")
    assert r.steps[1] == "Connected Sites: sitec.microsoft.com is in the routing address of site SiteC"


@pytest.mark.parametrize("address", ["nobody@SiteA.microsoft.com", "nobody@microsoft.com"])
def test_unknown_user_in_our_own_domains_is_5_1_1(address):
    # once Site Addressing is @microsoft.com, both the install-time site domain and
    # the company domain are this site's
    r = route_for(address, None, table(addressing="microsoft.com"))
    assert (r.kind, r.permanent, r.status) == (FAIL, True, "5.1.1")
    assert "unknown or illegal user" in r.reason


def test_company_domain_is_not_ours_before_site_addressing_changes():
    assert route_for("nobody@microsoft.com", None, table()).kind == MX


def test_email_domain_table_subdomain_exact_and_most_specific():
    t = table(email_domains=[
        {"domain": "partner.example", "host": "10.0.0.1", "port": 25},
        {"domain": "sales.partner.example", "host": "10.0.0.2", "port": 2526},
        {"domain": "#exact.example", "host": "10.0.0.3", "port": 25}])
    hosts = {a: route_for(a, None, t).host for a in
             ("a@partner.example", "a@mail.partner.example", "a@sales.partner.example",
              "a@x.sales.partner.example", "a@exact.example", "a@sub.exact.example", "a@notpartner.example")}
    assert hosts == {"a@partner.example": "10.0.0.1", "a@mail.partner.example": "10.0.0.1",
                     "a@sales.partner.example": "10.0.0.2", "a@x.sales.partner.example": "10.0.0.2",
                     "a@exact.example": "10.0.0.3", "a@sub.exact.example": None, "a@notpartner.example": None}
    r = route_for("a@x.sales.partner.example", None, t)
    assert (r.kind, r.port, r.domain) == (RELAY, 2526, "x.sales.partner.example")
    assert r.steps[-1] == ("E-Mail Domain table: x.sales.partner.example matches entry sales.partner.example "
                           "→ forward to host 10.0.0.2:2526")
    assert route_for("a@sub.exact.example", None, t).kind == MX  # "#" = this domain only


def test_smart_host_after_the_table_and_before_dns():
    t = table(delivery={"smart_host": "relay.isp.example:587"})
    r = route_for("someone@example.net", None, t)
    assert (r.kind, r.host, r.port) == (RELAY, "relay.isp.example", 587)
    assert r.steps[-1] == "smart host: forward all messages to host relay.isp.example:587"
    assert route_for("x@SiteB.microsoft.com", None, t).host == "127.10.10.15"  # the table wins


def test_dns_mx_last():
    r = route_for("someone@Example.NET", None, table(delivery={"mx_port": 2500}))
    assert (r.kind, r.domain, r.port, r.starttls) == (MX, "example.net", 2500, "opportunistic")
    assert r.steps == ("directory: no mailbox has the address someone@Example.NET",
                       "E-Mail Domain table: no entry matches example.net",
                       "DNS: deliver to the MX hosts of example.net")


def test_routes_back_to_this_site_are_loops():
    t = table(email_domains=[{"domain": "partner.example", "host": "127.10.10.10", "port": 2525}])
    r = route_for("a@partner.example", None, t)
    assert (r.kind, r.permanent, r.status) == (FAIL, True, "5.4.6")
    t = table(delivery={"smart_host": "ServerA.SiteA.microsoft.com:2525"})
    r = route_for("a@example.net", None, t)
    assert (r.kind, r.status) == (FAIL, "5.4.6") and "loop" in r.reason


def test_directory_service_address_and_bad_addresses():
    t = table(addressing="microsoft.com")
    assert route_for("dirsync@SiteA.microsoft.com", None, t).kind == DIRECTORY
    assert route_for("dirsync@microsoft.com", None, t).kind == DIRECTORY
    r = route_for("not an address", None, t)
    assert (r.kind, r.permanent, r.status) == (FAIL, True, "5.1.3")


def test_starttls_policy_per_domain_and_per_entry():
    t = table(delivery={"starttls": "none", "tls": [{"domain": "secure.example", "starttls": "require"}]},
              email_domains=[{"domain": "partner.example", "host": "10.0.0.1", "starttls": "require"}])
    assert route_for("a@example.net", None, t).starttls == "none"
    assert route_for("a@mx.secure.example", None, t).starttls == "require"
    assert route_for("a@partner.example", None, t).starttls == "require"


def test_recipients_of_one_destination_share_a_group():
    t = table()
    a, b = route_for("a@example.net", None, t), route_for("b@EXAMPLE.net", None, t)
    c = route_for("c@SiteB.microsoft.com", None, t)
    assert a.destination == b.destination == "mx:example.net:25:opportunistic"
    assert c.destination == "relay:127.10.10.15:2525:opportunistic"


def test_explain_text():
    text = route_for("User2@SiteB.microsoft.com", None, table()).explain()
    assert text.splitlines() == [
        "recipient: User2@SiteB.microsoft.com",
        "  1. directory: no mailbox has the address User2@SiteB.microsoft.com",
        "  2. Connected Sites: siteb.microsoft.com is in the routing address of site SiteB",
        "  3. E-Mail Domain table: siteb.microsoft.com matches entry SiteB.microsoft.com → forward to host "
        "127.10.10.15:2525",
        "=> SMTP to 127.10.10.15:2525 (STARTTLS opportunistic)",
    ]
    fail = route_for("nobody@SiteA.microsoft.com", None, table()).explain()
    assert fail.splitlines()[-1].startswith("=> permanent failure 5.1.1: nobody@SiteA.microsoft.com: unknown")


# A direct RoutingTable: the most specific E-Mail Domain entry wins, whatever the order.
labels = st.lists(st.sampled_from(["a", "b", "sea", "chelsea", "x"]), min_size=1, max_size=4)


@given(st.lists(labels, min_size=1, max_size=6, unique_by=tuple), labels, st.randoms())
def test_property_most_specific_entry_wins(patterns, domain_labels, rnd):
    entries = [DomainRoute(".".join(p) + ".test", f"10.0.0.{i}", 25) for i, p in enumerate(patterns)]
    rnd.shuffle(entries)
    t = RoutingTable(site="S", site_domain="s.invalid", local_domains=("#s.invalid",), email_domains=tuple(entries),
                     connected_sites=(ConnectedSite("T", "@t.invalid"),))
    domain = ".".join(domain_labels) + ".test"
    r = route_for(f"u@{domain}", None, t)
    matching = [e for e in entries if domain == e.domain or domain.endswith("." + e.domain)]
    if not matching:
        assert r.kind == MX
    else:
        best = max(matching, key=lambda e: len(e.domain))
        assert (r.kind, r.host) == (RELAY, best.host)


def test_a_wildcard_listener_knows_every_local_address_as_itself():
    """With listen = 0.0.0.0 (containers), an entry pointing at any of this host's
    addresses is this site: a loop (5.4.6), not a peer."""
    config = config_of(site_mapping(
        "SiteA", listen="0.0.0.0", port=25,
        email_domains=[{"domain": "partner.test", "host": "127.0.0.1", "port": 25}]))
    mine = site_endpoints(config, 25)
    assert {("127.0.0.1", 25), ("servera.sitea.microsoft.com", 25)} <= mine
    assert {(a, 25) for a in local_addresses()} <= mine
    table = routing_table_for(config, addressing_domain="sitea.microsoft.com", learned_sites=(),
                              self_endpoints=mine)
    route = route_for("bob@partner.test", None, table)
    assert (route.kind, route.status, route.permanent) == ("fail", "5.4.6", True)


# ------------------------------------------------------------------ address literals (RFC 5321 §4.1.3, §5.1)


def test_an_address_literal_goes_to_that_address_never_through_the_table_smart_host_or_mx():
    t = table(delivery={"smart_host": "127.10.10.100:2525", "mx_port": 2600},
              email_domains=[{"domain": "microsoft.com", "host": "127.10.10.15", "port": 2525}])
    r = route_for("someone@[192.0.2.7]", None, t)
    assert (r.kind, r.host, r.port, r.domain) == (RELAY, "192.0.2.7", 2600, "[192.0.2.7]")
    assert r.steps[-1] == ("address literal [192.0.2.7]: deliver to 192.0.2.7 directly, no E-Mail Domain "
                           "table, smart host or MX (RFC 5321 §5.1)")
    assert not any("smart host:" in s or "DNS" in s for s in r.steps)
    v6 = route_for("someone@[IPv6:2001:DB8::0:7]", None, t)
    assert (v6.kind, v6.host, v6.domain) == (RELAY, "2001:db8::7", "[IPv6:2001:db8::7]")


def test_an_address_literal_of_this_site_is_this_site():
    t = table()
    user1 = mailbox("User1", "SiteA", "User1@SiteA.microsoft.com")
    assert route_for("User1@[127.10.10.10]", user1, t).kind == LOCAL
    r = route_for("nobody@[127.10.10.10]", None, t)
    assert (r.kind, r.status, r.permanent) == (FAIL, "5.1.1", True)
    assert "address literal [127.10.10.10] is this site's own address" in r.steps
    from imsrelay.routing.router import directory_lookup_address, self_addresses
    assert directory_lookup_address("User1@[127.10.10.10]", "SiteA.microsoft.com",
                                    self_addresses(t.self_endpoints)) == "User1@SiteA.microsoft.com"
    assert directory_lookup_address("User1@[192.0.2.1]", "SiteA.microsoft.com",
                                    self_addresses(t.self_endpoints)) == "User1@[192.0.2.1]"


def test_address_literals_refused_by_policy():
    t = table(routing={"address_literals": "refuse"})
    r = route_for("someone@[192.0.2.7]", None, t)
    assert (r.kind, r.status, r.permanent) == (FAIL, "5.7.1", True)
    assert 'routing.address_literals = "refuse"' in r.steps[-2]


def test_a_malformed_address_literal_is_a_bad_address():
    for bad in ("x@[999.0.0.1]", "x@[1.2.3]", "x@[::1]", "x@[IPv6:1.2.3.4]", "x@[tag:content]"):
        r = route_for(bad, None, table())
        assert (r.kind, r.status) == (FAIL, "5.1.3"), bad
