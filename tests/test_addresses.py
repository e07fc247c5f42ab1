"""Addresses, proxy addresses and Exchange domain matching (pure)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imsrelay.model.addresses import (
    AddressError,
    domain_matches,
    most_specific,
    normalise_domain,
    parse_address,
    parse_proxy,
    primary_smtp,
)


def test_parse_and_key():
    a = parse_address("<User1@SiteA.Microsoft.COM>")
    assert a.local == "User1" and a.domain == "sitea.microsoft.com"
    assert a.key == "user1@sitea.microsoft.com"


@pytest.mark.parametrize("bad", ["", "user", "@x.com", "user@", "a..b@x.com", "user@-x.com", "user@x..com"])
def test_bad_addresses(bad):
    with pytest.raises(AddressError):
        parse_address(bad)


def test_idna_domain():
    assert normalise_domain("bücher.example") == "xn--bcher-kva.example"


def test_proxy_addresses():
    p = parse_proxy("SMTP:User1@microsoft.com")
    assert p.primary and p.type == "SMTP"
    assert not parse_proxy("smtp:user1@SiteA.microsoft.com").primary
    assert primary_smtp(["smtp:a@x.com", "SMTP:b@y.com", "X400:c=US"]) == "b@y.com"


def test_subdomain_matching_is_whole_labels():
    assert domain_matches("sea.com", "x.sea.com")
    assert domain_matches("sea.com", "SEA.com")
    assert not domain_matches("sea.com", "chelsea.com")
    assert not domain_matches("#sea.com", "x.sea.com")
    assert domain_matches("#sea.com", "sea.com")


def test_most_specific_wins():
    entries = [("microsoft.com", "company"), ("SiteB.microsoft.com", "siteB")]
    assert most_specific("siteb.microsoft.com", entries)[1] == "siteB"
    assert most_specific("x.siteb.microsoft.com", entries)[1] == "siteB"
    assert most_specific("sitec.microsoft.com", entries)[1] == "company"
    assert most_specific("example.org", entries) is None
    assert most_specific("a.com", [("a.com", 1), ("#a.com", 2)])[1] == 2


label = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)


@given(st.lists(label, min_size=1, max_size=3), st.lists(label, min_size=0, max_size=2), label)
def test_property_subdomain_match(base_labels, prefix, other):
    base = ".".join(base_labels)
    assert domain_matches(base, ".".join(prefix + [base]) if prefix else base)
    # gluing letters onto the first label never matches (chelsea.com vs sea.com)
    assert not domain_matches(base, other + base)
