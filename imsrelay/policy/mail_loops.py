"""Mail loops: every decision that recognises mail going round in circles (pure).

One place for all of them, used by the edges that see the evidence:

* ``endpoints_for`` — where this site itself listens: (address, port) and (host
  name, port); with a wildcard listen address every address of the host (which the
  caller reads from the interfaces, ``imsrelay.routing.host_addresses``);
* ``points_at_self`` — an E-Mail Domain table entry or the smart host that is this
  site (the router fails such a route with 5.4.6);
* ``is_self`` / ``without_self`` — a next hop from DNS that is this site; RFC 5321
  §5.1: only MX hosts more preferred than ourselves may be tried (the SMTP client);
* ``seen_before`` — our own ``Received:`` line is already in the header (the
  ingress answers 554 5.4.6);
* ``count_hops`` / ``check_hops`` — too many ``Received:`` lines (554 5.4.6).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

from imsrelay.model.message import header_block
from imsrelay.policy.expansion import EXPANDED_HEADER
from imsrelay.policy.inbound import Reply

SelfEndpoints = frozenset[tuple[str, int]]
WILDCARDS = ("", "0.0.0.0", "::")

_RECEIVED = re.compile(rb"\nreceived[ \t]*:")  # in the lowered header after a line break (see count_hops)
_SPACE = re.compile(rb"\s+")
_EXPANDED = re.compile(rb"^" + re.escape(EXPANDED_HEADER.lower().encode()) + rb":", re.MULTILINE)
_OURS = b"(imsrelay)"  # the end of every marker (``received_marker``): it holds no white space


class Hop(Protocol):
    """A next hop as the SMTP client knows it (``imsrelay.routing.dns.NextHop``)."""

    @property
    def host(self) -> str: ...

    @property
    def address(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def preference(self) -> int: ...


H = TypeVar("H", bound=Hop)


def endpoints_for(listen: str, hostname: str, port: int, host_addresses: Iterable[str] = ()) -> SelfEndpoints:
    """Where this site listens; ``host_addresses`` count too when it listens on the
    wildcard address (0.0.0.0, ::), so that an MX or table entry pointing back here
    is recognised as a loop."""
    listen = listen.lower()
    addresses = {listen}
    if listen in WILDCARDS:
        addresses |= {a.lower() for a in host_addresses}
    return frozenset({(a, port) for a in addresses} | {(hostname.lower(), port)})


def points_at_self(host: str, port: int, endpoints: SelfEndpoints) -> bool:
    """A configured next hop (table entry, smart host) that is this site."""
    return (host.lower().rstrip("."), port) in endpoints or (host.lower(), port) in endpoints


def is_self(hop: Hop, endpoints: SelfEndpoints) -> bool:
    """Whether a next hop is this site: its address or name at our port, or any
    loopback address when we listen on every address."""
    if (hop.address.lower(), hop.port) in endpoints or (hop.host.lower().rstrip("."), hop.port) in endpoints:
        return True
    if {(w, hop.port) for w in WILDCARDS} & endpoints:
        return _is_loopback(hop.address)
    return False


def without_self(hops: Sequence[H], endpoints: SelfEndpoints) -> tuple[list[H], bool]:
    """RFC 5321 §5.1: when this host is one of the MX hosts, only the more preferred
    ones may be tried.  Returns the usable hops and whether this host was found."""
    mine = [h.preference for h in hops if is_self(h, endpoints)]
    if not mine:
        return list(hops), False
    cutoff = min(mine)
    return [h for h in hops if h.preference < cutoff], True


def received_marker(hostname: str) -> bytes:
    """What this site's own ``Received:`` line says (``by <hostname> (imsrelay)``)."""
    return f"by {hostname} {_OURS.decode()}".encode().lower()


def seen_before(message: bytes, marker: bytes) -> bool:
    """Our own Received: line is already in the header: the message came back.  Not
    when a distribution list was expanded since it passed here (an ``X-IMS-Expanded-DL``
    trace line above ours, KB Q185194): a list's expansion site sends its members' copies
    on, to their home sites, this one included; a list is never expanded twice, and
    ``smtp.max_hops`` still bounds the path."""
    header = header_block(message).lower()
    if _OURS not in header and marker.endswith(_OURS):  # no marker of any host here (the common case)
        return False
    expanded = _EXPANDED.search(header)
    if expanded is not None:
        header = header[:expanded.start()]  # only what was added since the latest expansion
    return marker in _SPACE.sub(b" ", header)


def count_hops(message: bytes) -> int:
    """Number of ``Received:`` fields in the header block."""
    # (a line break put first: the first line starts after one too; a search of the lowered header
    # for a fixed first byte is faster than a case-blind one of every line start)
    return len(_RECEIVED.findall(b"\n" + header_block(message).lower()))


def check_hops(message: bytes, max_hops: int) -> Reply | None:
    hops = count_hops(message)
    if hops > max_hops:
        return Reply(554, "5.4.6", f"Too many hops ({hops} Received: lines, at most {max_hops}): routing loop?")
    return None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
