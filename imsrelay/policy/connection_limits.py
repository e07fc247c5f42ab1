"""Inbound connection caps: the total per site and per client IP (pure decision +
a small counter the SMTP listener keeps).

Exchange 5.5's IMS accepted 30 inbound connections by default; Postfix limits each
client to part of its processes and exempts ``$mynetworks`` from per-client limits
(``smtpd_client_event_limit_exceptions``).  We do the same: ``smtp.relay_networks``
are exempt from the per-IP cap, never from the total.  A refused connection gets
``421 4.7.0`` at connect and is closed at once (RFC 5321 §3.8)."""

from __future__ import annotations

import ipaddress
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from imsrelay.policy.inbound import client_may_relay


@dataclass(frozen=True)
class Caps:
    total: int
    per_ip: int
    exempt: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()

    def for_workers(self, workers: int) -> Caps:
        """Each of ``workers`` processes sharing the port gets its share (rounded up)."""
        if workers <= 1:
            return self
        return Caps(math.ceil(self.total / workers), math.ceil(self.per_ip / workers), self.exempt)


def refusal(caps: Caps, *, open_total: int, open_from_ip: int, ip: str | None) -> str | None:
    """The ``421`` line for a new connection, or None to admit it."""
    if open_total >= caps.total:
        return f"421 4.7.0 Too many connections ({caps.total}); try again later"
    if ip is not None and open_from_ip >= caps.per_ip and not client_may_relay(ip, caps.exempt):
        return f"421 4.7.0 Too many connections from {ip} ({caps.per_ip}); try again later"
    return None


class ConnectionCounter:
    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self.total = 0
        self.by_ip: Counter[str] = Counter()
        self.refused = 0

    def admit(self, ip: str | None) -> str | None:
        reply = refusal(self.caps, open_total=self.total, open_from_ip=self.by_ip[ip] if ip else 0, ip=ip)
        if reply is not None:
            self.refused += 1
            return reply
        self.total += 1
        if ip:
            self.by_ip[ip] += 1
        return None

    def release(self, ip: str | None) -> None:
        self.total -= 1
        if ip:
            self.by_ip[ip] -= 1
            if self.by_ip[ip] <= 0:
                del self.by_ip[ip]
