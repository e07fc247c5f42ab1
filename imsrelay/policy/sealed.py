"""A sealed lab: which hosts a lab site may connect to (pure).

A lab (``[lab] sealed = true``) keeps every connection inside its own networks
(``lab.networks``: loopback for the embedded lab, loopback and the compose network
for the Docker lab).  The router refuses a route whose next hop is outside them,
the configuration loader refuses such a host in a lab file, and the SMTP transport
checks every address it is about to connect to, so no lab process reaches a real
host whatever the recipient (docs/design.md, "The Internet in a box").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
SEALED_STATUS = "5.7.1"  # RFC 3463: delivery not authorized (the lab refuses to send it out)


def networks_text(networks: Sequence[Network]) -> str:
    return ", ".join(str(n) for n in networks) or "none"


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def inside(address: str, networks: Sequence[Network]) -> bool:
    """Whether an IP address is in one of the lab's networks (a name is not)."""
    ip = _ip(address)
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in networks)


def host_refusal(host: str, networks: Sequence[Network], *, lab_dns: bool) -> str | None:
    """Why a sealed lab may not use ``host`` as a next hop, or None when it may: an
    address outside the lab's networks, or a name when the lab has no DNS of its own."""
    if _ip(host) is not None:
        if inside(host, networks):
            return None
        return (f"{host.strip('[]')} is outside this sealed lab (lab.networks: {networks_text(networks)}); "
                "no connection leaves the lab")
    if lab_dns:
        return None
    return (f"host name {host}: a sealed lab resolves names only with its own DNS ([dns] nameservers) "
            "and has none; give the host's lab address")


__all__ = ["Network", "SEALED_STATUS", "host_refusal", "inside", "networks_text"]
