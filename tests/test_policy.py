"""Inbound policy: accepted domains, relay control, limits (pure)."""

import ipaddress

from imsrelay.model.addresses import parse_address
from imsrelay.policy.inbound import (
    InboundPolicy,
    check_recipient,
    check_size,
    check_storage,
    client_may_relay,
)
from imsrelay.policy.mail_loops import check_hops, count_hops
from imsrelay.routing.router import local_domains_for

POLICY = InboundPolicy(
    local_domains=local_domains_for("SiteA.microsoft.com", "microsoft.com", ()),
    org_routing_domains=("siteb.microsoft.com", "sitec.microsoft.com"),
    relay_networks=(ipaddress.ip_network("10.0.0.0/8"),),
    max_recipients=3, max_message_size=1000, max_hops=3)


def rcpt(addr, ip="192.0.2.1", known=False, n=0):
    return check_recipient(parse_address(addr), policy=POLICY, client_ip=ip, known=known, accepted_so_far=n)


def test_known_recipient_accepted_from_anyone():
    r = rcpt("User1@microsoft.com", known=True)
    assert (r.code, r.status) == (250, "2.1.5")


def test_unknown_local_user():
    assert (rcpt("nobody@SiteA.microsoft.com").code, rcpt("nobody@SiteA.microsoft.com").status) == (550, "5.1.1")
    assert rcpt("nobody@microsoft.com").status == "5.1.1"


def test_other_site_domain_forwarded_not_rejected():
    assert rcpt("User2@SiteB.microsoft.com").code == 250


def test_relay_denied_outside_relay_networks():
    r = rcpt("someone@example.org", ip="192.0.2.1")
    assert (r.code, r.status) == (554, "5.7.1")
    assert rcpt("someone@example.org", ip="10.1.2.3").code == 250
    assert rcpt("someone@example.org", ip="::ffff:10.1.2.3").code == 250
    assert not client_may_relay(None, POLICY.relay_networks)


def test_too_many_recipients():
    r = rcpt("User1@microsoft.com", known=True, n=3)
    assert (r.code, r.status) == (452, "4.5.3")


def test_size():
    assert check_size(None, 1000) is None
    assert check_size(1000, 1000) is None
    r = check_size(1001, 1000)
    assert (r.code, r.status) == (552, "5.3.4")


def test_hops_count_only_header_received_lines():
    msg = b"Received: a\r\nreceived: b\r\n\tcontinued\r\nSubject: x\r\n\r\nReceived: in body\r\n"
    assert count_hops(msg) == 2
    assert check_hops(msg, 2) is None
    over = b"Received: x\r\n" * 4 + b"\r\nbody"
    r = check_hops(over, 3)
    assert (r.code, r.status) == (554, "5.4.6")


def test_storage_check_like_postfix_queue_minfree():
    mib = 1024 * 1024
    assert check_storage(100 * mib, declared=None, max_message_size=10 * mib, minfree=0) is None
    r = check_storage(14 * mib, declared=None, max_message_size=10 * mib, minfree=0)  # < 1.5 x limit
    assert (r.code, r.status) == (452, "4.3.1")
    assert check_storage(14 * mib, declared=1 * mib, max_message_size=10 * mib, minfree=0) is None
    assert check_storage(14 * mib, declared=1 * mib, max_message_size=10 * mib, minfree=20 * mib).code == 452


def test_address_literals_at_rcpt():
    import dataclasses

    mine = dataclasses.replace(POLICY, self_addresses=frozenset({"10.10.10.10"}))
    check = lambda addr, ip="192.0.2.1", p=mine: check_recipient(  # noqa: E731
        parse_address(addr), policy=p, client_ip=ip, known=False, accepted_so_far=0)
    assert (check("x@[192.0.2.9]").code, check("x@[192.0.2.9]").status) == (554, "5.7.1")  # relaying
    assert check("x@[192.0.2.9]", ip="10.1.1.1").code == 250  # a relay client may
    assert check("x@[IPv6:2001:db8::9]", ip="10.1.1.1").code == 250
    assert check("nobody@[10.10.10.10]").status == "5.1.1"  # this site's own address
    refuse = dataclasses.replace(mine, address_literals="refuse")
    r = check("x@[192.0.2.9]", ip="10.1.1.1", p=refuse)
    assert (r.code, r.status) == (550, "5.7.1") and "address literals" in r.text
