"""Unit tests for imsrelay.policy.restrictions: relay, connections, submission, delivery, filtering."""

from __future__ import annotations

import ipaddress

import pytest

from imsrelay.model.objects import SenderRules
from imsrelay.policy.restrictions import (
    AcceptRules,
    Client,
    check_entries,
    check_entry,
    connect_decision,
    delivery_decision,
    filter_decision,
    mail_requirement,
    matching_entry,
    relay_decision,
    sender_decision,
)
from imsrelay.policy.restrictions import RelayRules as R


def nets(*texts: str) -> tuple:
    return tuple(ipaddress.ip_network(t) for t in texts)


RULES = R(authenticated=True, networks=nets("192.0.2.0/24"), internal_addresses=nets("10.1.1.1/32"),
          never=nets("192.0.2.66/32", "203.0.113.0/24"))


@pytest.mark.parametrize(("client", "allowed", "words"), [
    (Client("198.51.100.7"), False, "no routing restriction"),
    (Client("198.51.100.7", authenticated="User1"), True, "authenticated as User1"),
    (Client("192.0.2.9"), True, "relay range 192.0.2.0/24"),
    (Client("::ffff:192.0.2.9"), True, "relay range"),
    (Client("198.51.100.7", local_ip="10.1.1.1"), True, "internal address 10.1.1.1"),
    (Client("198.51.100.7", local_ip="10.1.1.2"), False, "no routing restriction"),
    # the never-relay list wins over every allowing rule
    (Client("192.0.2.66"), False, "never-relay"),
    (Client("203.0.113.5", authenticated="User1"), False, "never-relay"),
    (Client("203.0.113.5", local_ip="10.1.1.1"), False, "never-relay"),
    (Client(None), False, "no routing restriction"),
    (Client("not-an-ip"), False, "no routing restriction"),
])
def test_relay_decision(client: Client, allowed: bool, words: str) -> None:
    d = relay_decision(client, RULES)
    assert d.allowed is allowed
    assert words in d.rule


def test_authenticated_relay_can_be_switched_off() -> None:
    rules = R(authenticated=False)
    assert not relay_decision(Client("198.51.100.7", authenticated="User1"), rules).allowed


def test_connect_decision_reject_wins_over_accept() -> None:
    rules = AcceptRules(accept_hosts=nets("192.0.2.0/24"), reject_hosts=nets("192.0.2.66/32"))
    assert connect_decision("192.0.2.1", rules).allowed
    assert not connect_decision("192.0.2.66", rules).allowed
    assert "reject list" in connect_decision("192.0.2.66", rules).rule
    assert not connect_decision("198.51.100.1", rules).allowed
    assert "not on the accept list" in connect_decision("198.51.100.1", rules).rule
    assert connect_decision("198.51.100.1", AcceptRules()).allowed


def test_mail_requirement() -> None:
    plain = Client("192.0.2.1")
    tls = Client("192.0.2.1", encrypted=True)
    both = Client("192.0.2.1", authenticated="User1", encrypted=True)
    assert mail_requirement(plain, "all") is None
    assert mail_requirement(plain, "encrypted").startswith("530 5.7.0 Must issue a STARTTLS")
    assert mail_requirement(tls, "encrypted") is None
    assert mail_requirement(tls, "authenticated").startswith("530 5.7.0 Authentication required")
    assert mail_requirement(tls, "authenticated+encrypted").startswith("530 5.7.0 Authentication required")
    assert mail_requirement(both, "authenticated+encrypted") is None


def test_sender_decision_q262945() -> None:
    me = Client("192.0.2.1", authenticated="User1",
                addresses=("User1@SiteA.microsoft.com", "User1@microsoft.com"))
    assert sender_decision("user1@microsoft.com", me, must_match=True).allowed
    assert sender_decision("USER1@sitea.microsoft.com", me, must_match=True).allowed
    refused = sender_decision("User2@microsoft.com", me, must_match=True)
    assert not refused.allowed and "User1 may not send as <User2@microsoft.com>" in refused.rule
    assert not sender_decision("<>", me, must_match=True).allowed
    assert sender_decision("User2@microsoft.com", me, must_match=False).allowed
    assert sender_decision("anyone@example.net", Client("192.0.2.1"), must_match=True).allowed  # not AUTH'd


def test_entries() -> None:
    assert check_entry(" Bad@Example.NET ") == "bad@example.net"  # the lookup key (case-insensitive)
    assert check_entry("@Spam.Example.") == "@spam.example"
    assert check_entry("<>") == "<>"
    for bad in ("", "@", "no-at-sign", "a@b@c"):
        with pytest.raises(ValueError):
            check_entry(bad)
    assert check_entries(["@x.example", "@X.example", "A@x.example"]) == ("@x.example", "a@x.example")


def test_matching_entry() -> None:
    entries = ("@spam.example", "boss@corp.example", "<>")
    assert matching_entry("any@spam.example", entries) == "@spam.example"
    assert matching_entry("any@mx.spam.example", entries) == "@spam.example"  # sub-domains too
    assert matching_entry("any@notspam.example", entries) is None
    assert matching_entry("BOSS@Corp.Example", entries) == "boss@corp.example"
    assert matching_entry("", entries) == "<>"
    assert matching_entry("<>", ("@spam.example",)) is None
    assert matching_entry("not an address", entries) is None


def test_delivery_decision() -> None:
    rules = SenderRules(accept_from=("@corp.example",), reject_from=("mallory@corp.example",))
    assert delivery_decision("alice@corp.example", "User1@x", rules).allowed
    d = delivery_decision("mallory@corp.example", "User1@x", rules)
    assert not d.allowed and "reject from mallory@corp.example" in d.rule
    d = delivery_decision("eve@example.net", "User1@x", rules)
    assert not d.allowed and "accepts only from @corp.example" in d.rule
    assert delivery_decision("eve@example.net", "User1@x", SenderRules()).allowed
    assert not delivery_decision("eve@example.net", "User1@x", SenderRules(reject_from=("@example.net",))).allowed


def test_filter_decision_site_first_then_mailbox() -> None:
    box = SenderRules(filter_senders=("@junk.example",), filter_action="delete")
    d = filter_decision("x@spam.example", site_entries=("@spam.example",), site_action="turf", mailbox=box)
    assert (d.action, d.rule) == ("turf", "site message filter: @spam.example (turf)")
    d = filter_decision("x@junk.example", site_entries=("@spam.example",), site_action="turf", mailbox=box)
    assert d.action == "delete" and "mailbox message filter" in d.rule
    assert filter_decision("x@ok.example", site_entries=(), site_action="turf", mailbox=box).action == "deliver"
    assert filter_decision("x@ok.example", site_entries=(), site_action="turf", mailbox=None).action == "deliver"


def test_recipient_verdict_restrictions_before_filtering() -> None:
    from imsrelay.policy.restrictions import recipient_verdict

    box = SenderRules(reject_from=("@bad.example",), filter_senders=("@junk.example",), filter_action="delete")
    v = recipient_verdict("x@bad.example", "Boss@x", box, site_filter=("@bad.example",), site_action="turf")
    assert v.refusal and v.refusal.startswith("550 5.7.1 Sender <x@bad.example> not allowed")
    v = recipient_verdict("x@junk.example", "Boss@x", box, site_filter=(), site_action="turf")
    assert v.refusal is None and v.filter.action == "delete"
    v = recipient_verdict("x@spam.example", "far@example.org", None, site_filter=("@spam.example",),
                          site_action="turf")
    assert (v.refusal, v.filter.action) == (None, "turf")  # relayed mail is filtered too


def test_rules_from_replicated_data_tolerate_junk() -> None:
    from imsrelay.policy.restrictions import rules_from_data

    r = rules_from_data({"accept_from": ["@Corp.Example", 7, "no at", None], "reject_from": "x@y.example",
                         "filter_senders": ["<>"], "filter_action": "bounce"})
    assert r == SenderRules(accept_from=("@corp.example",), reject_from=(), filter_senders=("<>",),
                            filter_action="turf")
    assert rules_from_data({}) == SenderRules()
