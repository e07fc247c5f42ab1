"""Addresses: parsing, normalising, proxy addresses and domain matching (pure).

Exchange conventions kept here:
- proxy addresses carry a type prefix; upper-case ``SMTP:`` is the primary (reply)
  address, exactly one per type; lower-case ``smtp:`` marks a secondary one;
- routing/accepted domains match a whole sub-domain tree (``sea.com`` matches
  ``x.sea.com`` but not ``chelsea.com``); a ``#`` prefix means "this domain only";
  when several entries match, the most specific (longest) one wins.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_LOCAL_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")


class AddressError(ValueError):
    """An address or domain that cannot be used."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_literal(domain: str) -> IPAddress | None:
    """The IP address of an RFC 5321 §4.1.3 address literal (``[192.0.2.1]``,
    ``[IPv6:2001:db8::1]``); None when ``domain`` is a name; ``AddressError`` when it
    is bracketed but not a valid IPv4 or IPv6 literal."""
    d = domain.strip()
    if not d.startswith("["):
        return None
    if not d.endswith("]"):
        raise AddressError(f"{domain!r} is not a valid address literal (e.g. [192.0.2.1] or [IPv6:2001:db8::1])")
    inner = d[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return ipaddress.IPv6Address(inner[5:])
        return ipaddress.IPv4Address(inner)
    except ValueError:
        raise AddressError(f"{domain!r} is not a valid address literal "
                           "(e.g. [192.0.2.1] or [IPv6:2001:db8::1])") from None


def literal_text(ip: IPAddress) -> str:
    """The canonical address literal for an IP address: ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``."""
    return f"[IPv6:{ip.compressed}]" if ip.version == 6 else f"[{ip}]"


def normalise_domain(domain: str) -> str:
    """Lower-case a domain, drop a trailing dot, check its labels; IDNA to A-labels.
    An address literal is checked and written canonically (``[IPv6:...]`` compressed)."""
    d = domain.strip().rstrip(".")
    literal = address_literal(d)
    if literal is not None:
        return literal_text(literal)
    if not d:
        raise AddressError("empty domain")
    if not d.isascii():
        try:
            d = d.encode("idna").decode("ascii")
        except UnicodeError:
            raise AddressError(f"{domain!r} is not a valid domain") from None
    labels = d.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise AddressError(f"{domain!r} is not a valid domain")
    return d.lower()


@dataclass(frozen=True)
class Address:
    local: str
    domain: str  # normalised (lower case)

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def key(self) -> str:
        """Case-insensitive lookup key (local parts are treated case-insensitively, as Exchange did)."""
        return f"{self.local.lower()}@{self.domain}"


_UNSAFE = re.compile("[\udc80-\udcff\x00-\x1f\x7f]")  # undecodable bytes (surrogateescape), controls


@functools.lru_cache(maxsize=1024)
def parse_address(text: str) -> Address:
    """Parse ``local@domain`` (angle brackets allowed). Raise ``AddressError``.
    Memoised (an immutable answer of the text alone; a refusal is not kept): one
    message asks about the same recipient at RCPT, in routing and in delivery."""
    t = text.strip()
    if _UNSAFE.search(t):
        raise AddressError(f"{text!r} is not valid UTF-8 text (or holds control characters)")
    if t.startswith("<") and t.endswith(">"):
        t = t[1:-1].strip()
    if ":" in t and t.startswith("@"):  # source route "@a,@b:user@host" (RFC 5321 §C)
        t = t.split(":", 1)[1]
    local, at, domain = t.rpartition("@")
    if not at or not local or not domain:
        raise AddressError(f"{text!r} is not an address of the form user@domain")
    if not (local.startswith('"') and local.endswith('"')):
        if not local.isascii():
            pass  # SMTPUTF8 local parts are allowed; kept as given
        elif not _LOCAL_ATOM.match(local) or ".." in local or local.startswith(".") or local.endswith("."):
            raise AddressError(f"{text!r} has an invalid local part")
    return Address(local, normalise_domain(domain))


# ------------------------------------------------------------------ proxy addresses


@dataclass(frozen=True)
class ProxyAddress:
    type: str  # "SMTP", "X400", ... (upper case)
    address: str
    primary: bool

    def __str__(self) -> str:
        prefix = self.type.upper() if self.primary else self.type.lower()
        return f"{prefix}:{self.address}"


def parse_proxy(text: str) -> ProxyAddress:
    prefix, sep, rest = text.partition(":")
    if not sep or not prefix or not rest:
        raise AddressError(f"{text!r} is not a proxy address like SMTP:user@domain")
    return ProxyAddress(prefix.upper(), rest, primary=prefix.isupper())


def primary_smtp(proxies: Iterable[str]) -> str | None:
    for p in proxies:
        proxy = parse_proxy(p)
        if proxy.type == "SMTP" and proxy.primary:
            return proxy.address
    return None


def smtp_addresses(proxies: Iterable[str]) -> list[str]:
    return [parse_proxy(p).address for p in proxies if parse_proxy(p).type == "SMTP"]


# ------------------------------------------------------------------ domain matching


def domain_matches(pattern: str, domain: str) -> bool:
    """Exchange-style match: whole sub-domain tree, or exactly with a ``#`` prefix."""
    d = domain.lower().rstrip(".")
    if pattern.startswith("#"):
        return d == pattern[1:].lower()
    p = pattern.lower().lstrip("*.").rstrip(".")
    return d == p or d.endswith("." + p)


T = TypeVar("T")


def most_specific(domain: str, entries: Iterable[tuple[str, T]]) -> tuple[str, T] | None:
    """The matching (pattern, value) with the longest pattern; an exact ``#`` entry
    beats a sub-domain entry of the same name."""
    best: tuple[tuple[int, int], tuple[str, T]] | None = None
    for pattern, value in entries:
        if domain_matches(pattern, domain):
            score = (len(pattern.lstrip("#")), 1 if pattern.startswith("#") else 0)
            if best is None or score > best[0]:
                best = (score, (pattern, value))
    return best[1] if best else None


@functools.lru_cache(maxsize=1024)
def ip_literal(text: str) -> str | None:
    """The IP address in `text` ("192.0.2.1", "[192.0.2.1]", "[IPv6:2001:db8::1]",
    "2001:db8::1"), normalised; None when `text` is not an address literal.
    Memoised (a next hop's host is asked about once per delivery)."""
    inner = text.strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
        if inner[:5].lower() == "ipv6:":
            inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def parse_host_port(text: str, default_port: int, *, ip_only: bool = False) -> tuple[str, int]:
    """``host``, ``host:port``, ``[address]:port`` or a bare IPv6 address → (host,
    port); ``ip_only``: the host must be an IP address (never a name to resolve).
    ValueError (one line) for anything else.  The one parser of host:port in imsrelay."""
    value = text.strip()
    host, port_text = value, ""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not host or host:port (expected [address]:port)")
        port_text = rest[1:]
        if rest == ":":
            raise ValueError(f"{text!r}: the port is missing after the colon")
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
        if not port_text:
            raise ValueError(f"{text!r}: the port is missing after the colon")
    if not host or "[" in host or "]" in host:
        raise ValueError(f"{text!r} is not host or host:port")
    if ip_only and ip_literal(host) is None:
        raise ValueError(f"{text!r}: {host!r} is not an IP address")
    if ip_literal(host) is None:
        try:
            normalise_domain(host)
        except AddressError:
            raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a host name") from None
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)
