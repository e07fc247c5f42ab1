"""Mail-routing DNS: MX and address lookups in RFC 5321 §5.1 order.

The pure part (`order_mx`) sorts MX records; `MailResolver` asks a real DNS
server through dnspython's async stub resolver, classifies failures as
permanent (5.x.x, bounce now) or temporary (4.x.x, try again later) and caches
answers — positive and negative — for their TTL, using an injected clock.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import structlog

from imsrelay.model.addresses import ip_literal, parse_host_port

log = structlog.get_logger("imsrelay.routing.dns")

# RFC 3463 codes used here.
STATUS_BAD_DOMAIN = "5.1.2"  # bad destination system address (NXDOMAIN, no address)
STATUS_NULL_MX = "5.1.10"  # RFC 7505 null MX: the domain accepts no mail
STATUS_NO_ROUTE = "5.4.4"  # unable to route: no MX host of the domain has an address
STATUS_DNS_TEMPORARY = "4.4.3"  # directory (DNS) server failure


class DnsFailure(Exception):
    """A lookup that gave no usable answer.

    `permanent` is True when asking again will not help (bounce the recipient
    with `status`), False when the message should be deferred and retried.
    """

    def __init__(self, *, permanent: bool, status: str, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.permanent = permanent
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class MxHost:
    """One mail exchanger of a domain; `implicit` when the domain has no MX RRset."""

    name: str
    preference: int
    implicit: bool = False


@dataclass(frozen=True)
class NextHop:
    """One IP address of one MX host, in the order delivery should try them."""

    host: str
    address: str
    port: int
    preference: int


def order_mx(records: Sequence[tuple[int, str]], rng: random.Random) -> list[MxHost]:
    """Order MX records (preference, exchange) as RFC 5321 §5.1 asks.

    Lowest preference first; hosts of equal preference in random order (drawn
    from `rng`); a name listed more than once (compared case-insensitively,
    trailing dot ignored) is kept once, at its lowest preference. The result
    depends only on the set of records and the rng state, not on input order.
    """
    best: dict[str, int] = {}
    for preference, exchange in records:
        name = _normal_name(exchange)
        if name not in best or preference < best[name]:
            best[name] = preference
    ordered: list[MxHost] = []
    for preference in sorted(set(best.values())):
        group = sorted(name for name, pref in best.items() if pref == preference)
        rng.shuffle(group)
        ordered.extend(MxHost(name, preference) for name in group)
    return ordered


def _normal_name(name: str) -> str:
    """Lower case, no final dot; the root name stays "."."""
    return name.rstrip(".").lower() or "."


def parse_nameserver(entry: str) -> tuple[str, int]:
    """'127.0.0.1' | '127.0.0.1:5353' | '::1' | '[::1]:5353' → (address, port)."""
    try:
        return parse_host_port(entry, 53, ip_only=True)
    except ValueError as exc:
        raise ValueError(f"bad nameserver: {exc}") from None


def system_resolver() -> dns.asyncresolver.Resolver:
    """The only place that reads the host's /etc/resolv.conf."""
    return dns.asyncresolver.Resolver(configure=True)


@dataclass(frozen=True)
class _Result:
    """One query's outcome: records (as text), 'nodata' or 'nxdomain'; and its TTL."""

    kind: Literal["answer", "nodata", "nxdomain"]
    records: tuple[tuple[int, str], ...]  # MX: (preference, exchange); A/AAAA: (0, address)
    ttl: int


class MailResolver:
    """Looks up where mail for a domain goes. One per site; safe to share across tasks."""

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        timeout: float = 5.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_cache_ttl: int = 3600,
        max_cache_entries: int = 10_000,
        system: bool = True,
    ) -> None:
        """``nameservers`` empty: the system resolver, unless ``system`` is False (a
        sealed lab: no DNS at all, every look-up fails as "no nameservers")."""
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._max_cache_ttl = max_cache_ttl
        self._max_cache_entries = max_cache_entries
        self._cache: dict[tuple[str, str], tuple[float, _Result]] = {}
        self._resolver: dns.asyncresolver.Resolver | None
        if nameservers:
            servers = [parse_nameserver(entry) for entry in nameservers]
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(address, port) for address, port in servers
            ]
        elif not system:
            self._resolver = None
        else:
            try:
                self._resolver = system_resolver()
            except dns.resolver.NoResolverConfiguration:
                log.warning("dns.no_nameservers")
                self._resolver = None
        if self._resolver is not None:
            self._resolver.timeout = timeout
            self._resolver.lifetime = timeout

    async def mx_hosts(self, domain: str) -> list[MxHost]:
        """The domain's mail exchangers in delivery order (implicit MX if it has none)."""
        literal = ip_literal(domain)
        if literal is not None:
            return [MxHost(literal, 0, implicit=True)]
        name = _query_name(domain)
        result = await self._lookup(name, "MX")
        if result.kind == "nxdomain":
            raise DnsFailure(
                permanent=True, status=STATUS_BAD_DOMAIN, reason=f"domain {name} does not exist"
            )
        if result.kind == "nodata":  # RFC 5321 §5.1: the domain itself is the implicit MX
            try:
                await self.addresses(name)
            except DnsFailure as failure:
                if not failure.permanent:
                    raise
                raise DnsFailure(
                    permanent=True,
                    status=STATUS_BAD_DOMAIN,
                    reason=f"domain {name} has no MX, A or AAAA record",
                ) from None
            return [MxHost(name, 0, implicit=True)]
        real = [(pref, exchange) for pref, exchange in result.records if exchange != "."]
        if not real:  # RFC 7505 null MX ("MX 0 ."): this domain accepts no mail
            raise DnsFailure(
                permanent=True,
                status=STATUS_NULL_MX,
                reason=f"domain {name} accepts no mail (null MX)",
            )
        return order_mx(real, self._rng)

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of `host`; an IP literal is returned as is."""
        literal = ip_literal(host)
        if literal is not None:
            return [literal]
        name = _query_name(host)
        outcomes = await asyncio.gather(
            self._lookup(name, "A"), self._lookup(name, "AAAA"), return_exceptions=True
        )
        found = [
            address
            for outcome in outcomes
            if isinstance(outcome, _Result)
            for _, address in outcome.records
        ]
        if found:
            return found
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # a temporary DnsFailure (or something unexpected)
        if any(isinstance(o, _Result) and o.kind == "nxdomain" for o in outcomes):
            reason = f"host {name} does not exist"
        else:
            reason = f"host {name} has no A or AAAA record"
        raise DnsFailure(permanent=True, status=STATUS_BAD_DOMAIN, reason=reason)

    async def next_hops(self, domain: str, port: int = 25) -> list[NextHop]:
        """Every address of every MX host of `domain`, in the order to try them.

        The hosts' addresses are looked up concurrently. An MX host whose lookup
        fails is skipped while another has an address; an address already listed
        for a more preferred host is not repeated. If no host has an address the
        failure is temporary when any lookup was.
        """
        hosts = await self.mx_hosts(domain)
        outcomes = await asyncio.gather(
            *(self.addresses(mx.name) for mx in hosts), return_exceptions=True
        )
        hops: list[NextHop] = []
        failures: list[DnsFailure] = []
        for mx, outcome in zip(hosts, outcomes, strict=True):
            if isinstance(outcome, DnsFailure):
                log.info("dns.mx_host_unusable", domain=domain, host=mx.name, reason=outcome.reason)
                failures.append(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                seen = {hop.address for hop in hops}
                hops += [NextHop(mx.name, a, port, mx.preference) for a in outcome if a not in seen]
        if hops:
            return hops
        temporary = [f for f in failures if not f.permanent]
        if temporary:
            raise temporary[0]
        if len(hosts) == 1 and hosts[0].implicit:
            raise failures[0]
        reasons = "; ".join(f.reason for f in failures)
        raise DnsFailure(
            permanent=True,
            status=STATUS_NO_ROUTE,
            reason=f"no mail exchanger of {domain} has an address ({reasons})",
        )

    async def _lookup(self, name: str, rtype: str) -> _Result:
        key = (name, rtype)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            log.debug("dns.lookup", domain=name, rtype=rtype, result=cached[1].kind, cached=True)
            return cached[1]
        result = await self._query(name, rtype)
        ttl = min(result.ttl, self._max_cache_ttl)
        log.debug(
            "dns.lookup",
            domain=name,
            rtype=rtype,
            result=result.kind,
            ttl=ttl,
            records=len(result.records),
        )
        if ttl > 0:
            self._remember(key, self._clock() + ttl, result)
        return result

    def _remember(self, key: tuple[str, str], expires: float, result: _Result) -> None:
        if len(self._cache) >= self._max_cache_entries:
            now = self._clock()
            for old_key in [k for k, (exp, _) in self._cache.items() if exp <= now]:
                del self._cache[old_key]
            while len(self._cache) >= self._max_cache_entries:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (expires, result)

    async def _query(self, name: str, rtype: str) -> _Result:
        if self._resolver is None:
            raise _temporary(name, rtype, "no nameservers configured")
        try:
            answer = await self._resolver.resolve(
                name, rtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as nx:
            return _Result("nxdomain", (), _negative_ttl(nx))
        except dns.exception.Timeout:
            raise _temporary(name, rtype, "timed out") from None
        except dns.resolver.NoNameservers:
            raise _temporary(
                name, rtype, "no nameserver gave an answer (SERVFAIL or refused)"
            ) from None
        except dns.resolver.YXDOMAIN:
            return _Result("nxdomain", (), 0)
        except dns.exception.DNSException as error:
            raise _temporary(name, rtype, f"{type(error).__name__}: {error}") from None
        ttl = answer.chaining_result.minimum_ttl
        if answer.rrset is None:
            return _Result("nodata", (), ttl)
        if rtype == "MX":
            records = tuple(
                (rd.preference, _normal_name(rd.exchange.to_text(omit_final_dot=True)))
                for rd in answer.rrset
            )
        else:
            records = tuple((0, rd.address) for rd in answer.rrset)
        return _Result("answer", records, ttl)


def _query_name(domain: str) -> str:
    """Absolute, lower-case, ASCII (IDNA) form of a domain, without the final dot."""
    try:
        name = dns.name.from_text(domain.strip().rstrip(".") or ".")
    except (dns.exception.DNSException, UnicodeError) as error:
        raise DnsFailure(
            permanent=True, status=STATUS_BAD_DOMAIN, reason=f"invalid domain {domain!r}: {error}"
        ) from None
    if name == dns.name.root:
        raise DnsFailure(permanent=True, status=STATUS_BAD_DOMAIN, reason="empty domain")
    return name.to_text(omit_final_dot=True).lower()


def _negative_ttl(nx: dns.resolver.NXDOMAIN) -> int:
    """RFC 2308 negative TTL from the SOA in the NXDOMAIN response (dnspython's default without one)."""
    ttls = []
    for response in nx.responses().values():  # type: ignore[no-untyped-call]
        try:
            ttls.append(response.resolve_chaining().minimum_ttl)
        except dns.exception.DNSException:
            ttls.append(0)
    return min(ttls, default=0)


def _temporary(name: str, rtype: str, why: str) -> DnsFailure:
    return DnsFailure(
        permanent=False,
        status=STATUS_DNS_TEMPORARY,
        reason=f"DNS lookup of {name} {rtype} failed: {why}",
    )
