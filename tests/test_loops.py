"""Loop detection (imsrelay.policy.mail_loops, pure): the one owner of every "this came back" decision."""

from imsrelay.policy.mail_loops import (
    endpoints_for,
    is_self,
    points_at_self,
    received_marker,
    seen_before,
    without_self,
)
from imsrelay.routing.dns import NextHop

ME = endpoints_for("127.10.10.10", "ServerA.SiteA.microsoft.com", 2525)


def test_endpoints_are_listen_address_and_host_name_at_the_port():
    assert ME == {("127.10.10.10", 2525), ("servera.sitea.microsoft.com", 2525)}
    wild = endpoints_for("0.0.0.0", "h.example", 25, ["10.0.0.5", "127.0.0.1"])
    assert {("10.0.0.5", 25), ("127.0.0.1", 25), ("0.0.0.0", 25), ("h.example", 25)} == wild
    assert endpoints_for("127.0.0.1", "h", 25, ["10.0.0.5"]) == {("127.0.0.1", 25), ("h", 25)}


def test_configured_next_hop_pointing_back():
    assert points_at_self("ServerA.SiteA.microsoft.com.", 2525, ME)
    assert points_at_self("127.10.10.10", 2525, ME)
    assert not points_at_self("127.10.10.10", 25, ME)
    assert not points_at_self("127.10.10.15", 2525, ME)


def test_dns_next_hops_that_are_this_site():
    assert is_self(NextHop("other.name", "127.10.10.10", 2525, 10), ME)
    assert is_self(NextHop("ServerA.SiteA.microsoft.com.", "192.0.2.9", 2525, 10), ME)
    assert not is_self(NextHop("mx.example", "192.0.2.9", 2525, 10), ME)
    wildcard = frozenset({("0.0.0.0", 25)})
    assert is_self(NextHop("x", "127.3.4.5", 25, 0), wildcard) and not is_self(NextHop("x", "192.0.2.1", 25, 0), wildcard)
    hops = [NextHop("a", "192.0.2.1", 2525, 5), NextHop("b", "127.10.10.10", 2525, 10),
            NextHop("c", "192.0.2.3", 2525, 10), NextHop("d", "192.0.2.4", 2525, 20)]
    assert without_self(hops, ME) == ([hops[0]], True)


def test_own_received_line_marks_a_message_that_came_back():
    marker = received_marker("ServerA.SiteA.microsoft.com")
    came_back = (b"Received: from x ([127.0.0.1])\r\n\tby ServerA.SiteA.microsoft.com\r\n (imsrelay) with ESMTP id Q1;"
                 b" now\r\nSubject: hi\r\n\r\nby ServerB (imsrelay)\r\n")
    assert seen_before(came_back, marker)
    only_in_body = b"Subject: hi\r\n\r\nby ServerA.SiteA.microsoft.com (imsrelay)\r\n"
    assert not seen_before(only_in_body, marker)
    assert not seen_before(b"Received: by ServerB.SiteB.microsoft.com (imsrelay)\r\n\r\n", marker)
