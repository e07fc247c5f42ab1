"""imsrelay.routing.dns: pure MX ordering, and lookups against a real nsd on 127.0.0.1.

No test here uses the system resolver: every MailResolver is given the address
of an nsd this module started (or a loopback port that never answers).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nsd_server import NsdServer
from sitekit import free_port

from imsrelay.routing.dns import (
    DnsFailure,
    MailResolver,
    MxHost,
    NextHop,
    ip_literal,
    order_mx,
    parse_nameserver,
)

ZONE = "example.test"
ZONE_TEXT = """\
$ORIGIN example.test.
$TTL 300
@           IN SOA   ns1 hostmaster 2024010101 3600 600 86400 60
@           IN NS    ns1
ns1         IN A     127.0.0.1

ordered     IN MX    20 mx-b
ordered     IN MX    10 mx-a
ordered     IN MX    30 mx-c
mx-a        IN A     192.0.2.1
mx-a        IN AAAA  2001:db8::1
mx-b        IN A     192.0.2.2
mx-c        IN A     192.0.2.3
mx-d        IN A     192.0.2.4

equal       IN MX    10 mx-a
equal       IN MX    10 mx-b
equal       IN MX    10 mx-c
equal       IN MX    10 mx-d

implicit    IN A     192.0.2.10
implicit    IN AAAA  2001:db8::10

nullmx      IN MX    0 .
nullmx      IN A     192.0.2.11

nomail      IN TXT   "exists, but has no MX, A or AAAA"

dangling    IN MX    10 missing
partly      IN MX    10 missing
partly      IN MX    20 mx-c
dup         IN MX    10 MX-A
dup         IN MX    20 mx-a.example.test.
viacname    IN MX    10 alias
alias       IN CNAME mx-b
MixedCase   IN MX    10 Mx-B
shared      IN MX    10 mx-b
shared      IN MX    20 alias
tempfail    IN MX    10 host.elsewhere.invalid.
tempfail    IN MX    20 missing
tempskip    IN MX    10 host.elsewhere.invalid.
tempskip    IN MX    20 mx-c
short       300 IN MX 10 mx-a
capped      86400 IN MX 10 mx-a
"""

# ---------------------------------------------------------------- pure ordering


def test_order_mx_lowest_preference_first() -> None:
    hosts = order_mx([(20, "b.test"), (10, "a.test"), (30, "c.test")], random.Random(0))
    assert hosts == [MxHost("a.test", 10), MxHost("b.test", 20), MxHost("c.test", 30)]


def test_order_mx_dedupes_case_insensitively_keeping_lowest_preference() -> None:
    hosts = order_mx(
        [(20, "MX.Example.test."), (10, "mx.example.test"), (5, "other.test")], random.Random(0)
    )
    assert hosts == [MxHost("other.test", 5), MxHost("mx.example.test", 10)]


def test_order_mx_empty() -> None:
    assert order_mx([], random.Random(0)) == []


def test_order_mx_shuffles_equal_preference_from_the_rng() -> None:
    records = [(10, f"mx{i}.test") for i in range(5)]
    firsts = {order_mx(records, random.Random(seed))[0].name for seed in range(200)}
    assert firsts == {f"mx{i}.test" for i in range(5)}


_names = st.from_regex(r"[a-zA-Z][a-zA-Z0-9-]{0,8}\.test\.?", fullmatch=True)
_records = st.lists(st.tuples(st.integers(0, 65535), _names), max_size=12)


@given(records=_records, seed=st.integers(0, 2**32), shuffle_seed=st.integers(0, 2**32))
def test_order_mx_properties(records: list[tuple[int, str]], seed: int, shuffle_seed: int) -> None:
    hosts = order_mx(records, random.Random(seed))
    best: dict[str, int] = {}
    for preference, name in records:
        key = name.rstrip(".").lower()
        best[key] = min(preference, best.get(key, preference))
    # every distinct name once, at its lowest preference, in non-decreasing preference
    assert sorted(h.name for h in hosts) == sorted(best)
    assert all(best[h.name] == h.preference for h in hosts)
    assert [h.preference for h in hosts] == sorted(h.preference for h in hosts)
    assert not any(h.implicit for h in hosts)
    # deterministic for a given rng state, whatever the order of the input
    shuffled = list(records)
    random.Random(shuffle_seed).shuffle(shuffled)
    assert order_mx(shuffled, random.Random(seed)) == hosts


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
    ],
)
def test_parse_nameserver(entry: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(entry) == expected


@pytest.mark.parametrize("entry", ["ns1.example.test", "127.0.0.1:0", "127.0.0.1:x", "[::1]x", ""])
def test_parse_nameserver_rejects(entry: str) -> None:
    with pytest.raises(ValueError, match="bad nameserver"):
        parse_nameserver(entry)


def test_ip_literal() -> None:
    assert ip_literal("192.0.2.1") == "192.0.2.1"
    assert ip_literal("[192.0.2.1]") == "192.0.2.1"
    assert ip_literal("[IPv6:2001:DB8::1]") == "2001:db8::1"
    assert ip_literal("mx.example.test") is None


# ---------------------------------------------------------------- against nsd


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def nsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsdServer]:
    with NsdServer({ZONE: ZONE_TEXT}, tmp_path_factory.mktemp("dns")) as server:
        yield server


@pytest.fixture
def own_nsd(tmp_path: Path) -> Iterator[NsdServer]:
    """A server this test alone uses, so that it may stop it."""
    with NsdServer({ZONE: ZONE_TEXT}, tmp_path) as server:
        yield server


def resolver_for(server: NsdServer, **kwargs: object) -> MailResolver:
    kwargs.setdefault("timeout", 2.0)
    return MailResolver([server.address], **kwargs)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_mx_in_preference_order(nsd: NsdServer) -> None:
    hosts = await resolver_for(nsd).mx_hosts("ordered.example.test")
    assert hosts == [
        MxHost("mx-a.example.test", 10),
        MxHost("mx-b.example.test", 20),
        MxHost("mx-c.example.test", 30),
    ]


@pytest.mark.asyncio
async def test_next_hops_every_address_in_mx_order(nsd: NsdServer) -> None:
    hops = await resolver_for(nsd).next_hops("ordered.example.test", port=2525)
    assert hops == [
        NextHop("mx-a.example.test", "192.0.2.1", 2525, 10),
        NextHop("mx-a.example.test", "2001:db8::1", 2525, 10),
        NextHop("mx-b.example.test", "192.0.2.2", 2525, 20),
        NextHop("mx-c.example.test", "192.0.2.3", 2525, 30),
    ]


@pytest.mark.asyncio
async def test_equal_preference_order_comes_from_the_seeded_rng(nsd: NsdServer) -> None:
    expected_names = {f"mx-{c}.example.test" for c in "abcd"}
    orders = []
    for seed in range(40):
        hosts = await resolver_for(nsd, rng=random.Random(seed)).mx_hosts("equal.example.test")
        assert {h.name for h in hosts} == expected_names
        assert {h.preference for h in hosts} == {10}
        # same seed, same order — and exactly what the pure function gives
        again = await resolver_for(nsd, rng=random.Random(seed)).mx_hosts("equal.example.test")
        assert again == hosts
        assert hosts == order_mx([(10, n) for n in expected_names], random.Random(seed))
        orders.append(tuple(h.name for h in hosts))
    assert {order[0] for order in orders} == expected_names  # load is spread


@pytest.mark.asyncio
async def test_implicit_mx_when_domain_has_only_addresses(nsd: NsdServer) -> None:
    resolver = resolver_for(nsd)
    assert await resolver.mx_hosts("implicit.example.test") == [
        MxHost("implicit.example.test", 0, implicit=True)
    ]
    assert await resolver.next_hops("implicit.example.test") == [
        NextHop("implicit.example.test", "192.0.2.10", 25, 0),
        NextHop("implicit.example.test", "2001:db8::10", 25, 0),
    ]


@pytest.mark.asyncio
async def test_null_mx_is_permanent(nsd: NsdServer) -> None:
    with pytest.raises(DnsFailure) as failure:
        await resolver_for(nsd).next_hops("nullmx.example.test")
    assert failure.value.permanent
    assert failure.value.status == "5.1.10"
    assert "null MX" in failure.value.reason


@pytest.mark.asyncio
async def test_nxdomain_is_permanent(nsd: NsdServer) -> None:
    resolver = resolver_for(nsd)
    with pytest.raises(DnsFailure) as failure:
        await resolver.mx_hosts("nosuch.example.test")
    assert (failure.value.permanent, failure.value.status) == (True, "5.1.2")
    with pytest.raises(DnsFailure) as failure:
        await resolver.addresses("nosuch.example.test")
    assert (failure.value.permanent, failure.value.status) == (True, "5.1.2")


@pytest.mark.asyncio
async def test_domain_without_mx_or_address_is_permanent(nsd: NsdServer) -> None:
    with pytest.raises(DnsFailure) as failure:
        await resolver_for(nsd).next_hops("nomail.example.test")
    assert (failure.value.permanent, failure.value.status) == (True, "5.1.2")


@pytest.mark.asyncio
async def test_mx_host_without_address_is_skipped_if_another_works(nsd: NsdServer) -> None:
    resolver = resolver_for(nsd)
    assert await resolver.next_hops("partly.example.test") == [
        NextHop("mx-c.example.test", "192.0.2.3", 25, 20)
    ]
    with pytest.raises(DnsFailure) as failure:
        await resolver.next_hops("dangling.example.test")
    assert (failure.value.permanent, failure.value.status) == (True, "5.4.4")
    assert "missing.example.test" in failure.value.reason


@pytest.mark.asyncio
async def test_temporary_mx_host_failure_wins_over_permanent(nsd: NsdServer) -> None:
    # nsd refuses elsewhere.invalid (not its zone): that host's lookup fails temporarily
    resolver = resolver_for(nsd)
    assert await resolver.next_hops("tempskip.example.test") == [
        NextHop("mx-c.example.test", "192.0.2.3", 25, 20)
    ]
    with pytest.raises(DnsFailure) as failure:
        await resolver.next_hops("tempfail.example.test")
    assert (failure.value.permanent, failure.value.status) == (False, "4.4.3")


@pytest.mark.asyncio
async def test_an_address_is_listed_once(nsd: NsdServer) -> None:
    hops = await resolver_for(nsd).next_hops("shared.example.test")
    assert hops == [NextHop("mx-b.example.test", "192.0.2.2", 25, 10)]


@pytest.mark.asyncio
async def test_duplicate_and_cname_mx_targets(nsd: NsdServer) -> None:
    resolver = resolver_for(nsd)
    assert await resolver.mx_hosts("dup.example.test") == [MxHost("mx-a.example.test", 10)]
    assert await resolver.next_hops("viacname.example.test") == [
        NextHop("alias.example.test", "192.0.2.2", 25, 10)
    ]


@pytest.mark.asyncio
async def test_names_compare_case_insensitively(own_nsd: NsdServer) -> None:
    clock = FakeClock()
    resolver = resolver_for(own_nsd, timeout=0.5, clock=clock)
    assert await resolver.mx_hosts("mixedcase.EXAMPLE.test") == [MxHost("mx-b.example.test", 10)]
    lower = await resolver.next_hops("ordered.example.test.")
    own_nsd.stop()
    # the cache is keyed by the name as a name: other letter case, same entry
    assert await resolver.next_hops("ORDERED.Example.Test") == lower
    assert await resolver.mx_hosts("MixedCase.example.test") == [MxHost("mx-b.example.test", 10)]


@pytest.mark.asyncio
async def test_ip_literal_needs_no_query() -> None:
    resolver = MailResolver([f"127.0.0.1:{free_port(udp=True)}"], timeout=0.2)  # nothing listens there
    assert await resolver.addresses("[192.0.2.7]") == ["192.0.2.7"]
    assert await resolver.next_hops("[IPv6:2001:db8::7]", port=26) == [
        NextHop("2001:db8::7", "2001:db8::7", 26, 0)
    ]


@pytest.mark.asyncio
async def test_zone_the_server_does_not_serve_is_temporary(nsd: NsdServer) -> None:
    # nsd answers REFUSED for a zone it is not authoritative for: not the domain's fault
    with pytest.raises(DnsFailure) as failure:
        await resolver_for(nsd).mx_hosts("elsewhere.invalid")
    assert (failure.value.permanent, failure.value.status) == (False, "4.4.3")


@pytest.mark.asyncio
async def test_closed_port_is_temporary() -> None:
    resolver = MailResolver([f"127.0.0.1:{free_port(udp=True)}"], timeout=0.5)
    with pytest.raises(DnsFailure) as failure:
        await resolver.next_hops("ordered.example.test")
    assert (failure.value.permanent, failure.value.status) == (False, "4.4.3")


@pytest.mark.asyncio
async def test_silent_nameserver_times_out_temporarily() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blackhole:
        blackhole.bind(("127.0.0.1", 0))  # receives queries, never answers
        port = blackhole.getsockname()[1]
        resolver = MailResolver([f"127.0.0.1:{port}"], timeout=0.3)
        with pytest.raises(DnsFailure) as failure:
            await resolver.mx_hosts("ordered.example.test")
    assert (failure.value.permanent, failure.value.status) == (False, "4.4.3")
    assert "timed out" in failure.value.reason


@pytest.mark.asyncio
async def test_answers_are_cached_for_their_ttl(own_nsd: NsdServer) -> None:
    clock = FakeClock()
    resolver = resolver_for(own_nsd, timeout=0.5, clock=clock)
    first = await resolver.next_hops("short.example.test")
    own_nsd.stop()
    clock.now += 299
    assert await resolver.next_hops("short.example.test") == first  # served from the cache
    clock.now += 2  # TTL 300 has run out: the next lookup asks the (stopped) server
    with pytest.raises(DnsFailure) as failure:
        await resolver.next_hops("short.example.test")
    assert not failure.value.permanent


@pytest.mark.asyncio
async def test_negative_answers_are_cached_for_the_soa_minimum(own_nsd: NsdServer) -> None:
    clock = FakeClock()
    resolver = resolver_for(own_nsd, timeout=0.5, clock=clock)
    for domain in ("nosuch.example.test", "nullmx.example.test"):
        with pytest.raises(DnsFailure):
            await resolver.next_hops(domain)
    own_nsd.stop()
    clock.now += 59
    with pytest.raises(DnsFailure) as failure:
        await resolver.mx_hosts("nosuch.example.test")
    assert (failure.value.permanent, failure.value.status) == (True, "5.1.2")
    clock.now += 2  # SOA minimum 60 has run out
    with pytest.raises(DnsFailure) as failure:
        await resolver.mx_hosts("nosuch.example.test")
    assert (failure.value.permanent, failure.value.status) == (False, "4.4.3")
    # the null MX answer is a positive answer with the zone's TTL of 300
    with pytest.raises(DnsFailure) as failure:
        await resolver.mx_hosts("nullmx.example.test")
    assert failure.value.status == "5.1.10"


@pytest.mark.asyncio
async def test_cache_ttl_is_capped(own_nsd: NsdServer) -> None:
    clock = FakeClock()
    resolver = resolver_for(own_nsd, timeout=0.5, clock=clock, max_cache_ttl=10)
    await resolver.mx_hosts("capped.example.test")  # TTL 86400 in the zone
    own_nsd.stop()
    clock.now += 9
    assert await resolver.mx_hosts("capped.example.test") == [MxHost("mx-a.example.test", 10)]
    clock.now += 2
    with pytest.raises(DnsFailure) as failure:
        await resolver.mx_hosts("capped.example.test")
    assert not failure.value.permanent


@pytest.mark.asyncio
async def test_temporary_failures_are_not_cached(tmp_path: Path) -> None:
    clock = FakeClock()
    port = free_port(udp=True)
    resolver = MailResolver([f"127.0.0.1:{port}"], timeout=0.5, clock=clock)
    with pytest.raises(DnsFailure) as failure:
        await resolver.mx_hosts("ordered.example.test")
    assert not failure.value.permanent
    # a server comes up on that port: the same resolver, same instant, gets the answer
    with NsdServer({ZONE: ZONE_TEXT}, tmp_path, port=port):
        hosts = await resolver.mx_hosts("ordered.example.test")
    assert hosts[0] == MxHost("mx-a.example.test", 10)
