"""Check Now (knowledge consistency check): the pure decision ``kcc.plan``."""

from imsrelay.directory.kcc import ERROR, INFO, WARNING, plan
from imsrelay.model.objects import SiteObject
from imsrelay.model.settings import ConnectedSite, ReplicationConnector


def site(name, smtp=None, routing=None):
    return SiteObject(name, f"Server{name[-1]}", "ExchangeORG", smtp or f"@{name}.microsoft.com",
                      routing if routing is not None else f"@{name}.microsoft.com")


def test_learns_replicated_sites_not_in_connected_sites():
    r = plan("SiteA", [site("SiteA"), site("SiteB"), site("SiteC")],
             [ConnectedSite("SiteB", "@SiteB.microsoft.com")], [ReplicationConnector("SiteB")])
    assert r.learned == (("SiteC", "SiteC.microsoft.com"),)
    assert r.findings == ()
    assert r.known_sites == ("SiteA", "SiteB", "SiteC")


def test_seed_site_addressing_change_is_a_note_not_an_error():
    r = plan("SiteA", [site("SiteA"), site("SiteB", smtp="@microsoft.com")],
             [ConnectedSite("SiteB", "@SiteB.microsoft.com")], [])
    assert [(f.severity, f.site) for f in r.findings] == [(INFO, "SiteB")]
    assert "its routing address stays @SiteB.microsoft.com" in r.findings[0].message


def test_mismatched_routing_address_is_a_q180401_warning():
    r = plan("SiteA", [site("SiteA"), site("SiteB")], [ConnectedSite("SiteB", "@old.SiteB.microsoft.com")], [])
    assert [(f.severity, f.site) for f in r.findings] == [(WARNING, "SiteB")]
    assert "KB Q180401" in r.findings[0].message
    # letter case is not a mismatch
    assert plan("SiteA", [site("SiteB")], [ConnectedSite("SiteB", "@siteb.MICROSOFT.com")], []).findings == ()


def test_unknown_connectors_sites_without_route_homeless_mailboxes_and_conflicts():
    r = plan("SiteA", [site("SiteA"), site("SiteD", routing="")], [],
             [ReplicationConnector("SiteZ"), ReplicationConnector("SiteA"), ReplicationConnector("SiteD")],
             mailbox_homes={"SiteA": 3, "SiteD": 2, "SiteQ": 1},
             address_conflicts=[("x@microsoft.com", "mailbox:SiteB:x", ["mailbox:SiteC:x"])])
    got = [(f.severity, f.site) for f in r.findings]
    assert got == [(ERROR, "SiteD"),  # no routing address
                   (ERROR, "SiteZ"), (ERROR, "SiteA"), (ERROR, "SiteD"),  # connectors
                   (WARNING, "SiteD"), (WARNING, "SiteQ"),  # mailboxes homed where no route goes
                   (WARNING, "SiteA")]  # the address conflict
    assert r.learned == ()
    assert "connector to unknown site SiteZ" in r.findings[1].message
    assert "x@microsoft.com is claimed by several mailboxes: it belongs to mailbox:SiteB:x" in r.findings[-1].message
