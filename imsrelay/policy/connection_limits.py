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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

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


T = TypeVar("T")
TALKER_AGE = 3  # a session connected this many busy_idle periods with nothing done may be closed for a newcomer


@dataclass(frozen=True)
class Holder:
    """What the eviction choice knows of a session holding a slot."""

    idle: float  # seconds since its last command
    errors: int  # 4xx/5xx replies it got (failed AUTH, bad commands)
    in_data: bool  # a message is arriving: never evicted
    age: float = 0.0  # seconds since it connected
    working: bool = False  # authenticated, or a mail transaction started


def evictable(holders: Iterable[tuple[T, Holder]], *, busy_idle: float) -> T | None:
    """The session a full listener closes to admit a new client (None: refuse the
    newcomer): first the one with the most failed commands; then the one idle
    longest, if idle ``busy_idle`` seconds; then the oldest that has been connected
    ``TALKER_AGE * busy_idle`` seconds without authenticating or starting a transaction.  Never
    one inside DATA.  Idle TLS connections, password guessers and clients that
    only talk cannot hold every slot against a client with work to do (as Postfix
    shortens its time-outs under stress)."""
    best: tuple[int, int, float] | None = None
    chosen: T | None = None
    for key, h in holders:
        if h.in_data:
            continue
        if h.errors > 0:
            rank = (2, h.errors, h.idle)
        elif h.idle >= busy_idle:
            rank = (1, 0, h.idle)
        elif h.age >= TALKER_AGE * busy_idle and not h.working:
            rank = (0, 0, h.age)
        else:
            continue
        if best is None or rank > best:
            best, chosen = rank, key
    return chosen


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

    def only_total_is_full(self, ip: str | None) -> bool:
        """The total cap refuses ``ip`` but its own cap would not (a slot freed by
        eviction would admit it)."""
        if self.total < self.caps.total:
            return False
        return refusal(Caps(self.caps.total + 1, self.caps.per_ip, self.caps.exempt), open_total=self.total,
                       open_from_ip=self.by_ip[ip] if ip else 0, ip=ip) is None

    def release(self, ip: str | None) -> None:
        self.total -= 1
        if ip:
            self.by_ip[ip] -= 1
            if self.by_ip[ip] <= 0:
                del self.by_ip[ip]
