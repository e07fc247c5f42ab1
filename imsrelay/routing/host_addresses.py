"""This host's own interface addresses (I/O: an ioctl per interface, /proc/net/if_inet6).

A site listening on a wildcard address uses them to recognise mail coming back to
itself (``imsrelay.policy.mail_loops.endpoints_for``); no name lookups.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

from imsrelay.model.settings import SiteConfig
from imsrelay.policy.mail_loops import WILDCARDS, SelfEndpoints, endpoints_for


def local_addresses() -> set[str]:
    """This host's interface addresses (Linux: IPv4 via SIOCGIFADDR, IPv6 from
    /proc/net/if_inet6); no name lookups.  Empty where neither is available."""
    found = {"127.0.0.1", "::1"}
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue  # no IPv4 address on this interface
            found.add(socket.inet_ntoa(packed[20:24]))
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                raw = line.split()[0]
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    except (OSError, ValueError):
        pass
    return found


def site_endpoints(config: SiteConfig, port: int) -> SelfEndpoints:
    """Where a site listens (``mail_loops.endpoints_for``); with a wildcard listen address
    every address of this host's interfaces too."""
    listen = config.smtp.listen
    return endpoints_for(listen, config.hostname, port, local_addresses() if listen.lower() in WILDCARDS else ())
