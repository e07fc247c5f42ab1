"""Console log-in sessions: the admin token once, then an opaque session cookie.

Pure bookkeeping (no I/O): the server sets the cookie ``HttpOnly; SameSite=Strict``
and checks the session's CSRF token on every request that changes something.
The admin token itself is never stored in the browser and never in a URL.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "imsrelay_console"
CSRF_HEADER = "X-CSRF-Token"
IDLE_LIFETIME = 12 * 3600.0
MAX_SESSIONS = 64
LOGIN_WINDOW = 60.0  # seconds over which failed log-ins are counted
LOGIN_FAILURES_PER_CLIENT = 5  # failed log-ins per address in the window, then 429
LOGIN_FAILURES_TOTAL = 30  # failed log-ins from all addresses in the window, then 429 for every guess


@dataclass(frozen=True)
class Session:
    id: str
    csrf: str
    created: float
    last_seen: float


class Sessions:
    def __init__(self, token: str, *, clock: Callable[[], float] = time.time,
                 idle_lifetime: float = IDLE_LIFETIME) -> None:
        self._token = token.encode()
        self._clock = clock
        self._idle = idle_lifetime
        self._by_id: dict[str, Session] = {}

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), self._token)

    def log_in(self, given: str) -> Session | None:
        """A new session when ``given`` is the admin token, else None."""
        if not self.token_matches(given):
            return None
        now = self._clock()
        self._expire(now)
        while len(self._by_id) >= MAX_SESSIONS:  # the oldest goes first
            oldest = min(self._by_id.values(), key=lambda s: s.last_seen)
            del self._by_id[oldest.id]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now)
        self._by_id[session.id] = session
        return session

    def find(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        now = self._clock()
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if now - session.last_seen > self._idle:
            del self._by_id[session_id]
            return None
        session = Session(session.id, session.csrf, session.created, now)
        self._by_id[session_id] = session
        return session

    def log_out(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    @staticmethod
    def csrf_ok(session: Session, given: str | None) -> bool:
        return given is not None and given != "" and hmac.compare_digest(given.encode(), session.csrf.encode())

    def _expire(self, now: float) -> None:
        for sid in [s.id for s in self._by_id.values() if now - s.last_seen > self._idle]:
            del self._by_id[sid]


class LoginThrottle:
    """Failed console log-ins, per client address and in all (sliding windows).

    Beyond ``per_client`` failures in ``window`` seconds an address gets ``429`` without
    its token being looked at; beyond ``total`` failures from everyone, every log-in
    does, until the oldest failure is ``window`` old: 1,000 guesses from 50 addresses
    become ``total`` a minute.  A success clears nothing (an attacker's valid log-in
    must not reset the count of other guesses)."""

    def __init__(self, *, window: float = LOGIN_WINDOW, per_client: int = LOGIN_FAILURES_PER_CLIENT,
                 total: int = LOGIN_FAILURES_TOTAL, max_clients: int = 10_000) -> None:
        self.window = window
        self.per_client = per_client
        self.total = total
        self.max_clients = max_clients
        self._all: deque[float] = deque()
        self._by_client: OrderedDict[str, deque[float]] = OrderedDict()

    def _trim(self, times: deque[float], now: float) -> deque[float]:
        while times and now - times[0] >= self.window:
            times.popleft()
        return times

    def retry_after(self, client: str | None, now: float) -> float:
        """Seconds until ``client`` may try again (0: it may now)."""
        waits = []
        if len(self._trim(self._all, now)) >= self.total:
            waits.append(self._all[0] + self.window - now)
        mine = self._by_client.get(client or "")
        if mine is not None and len(self._trim(mine, now)) >= self.per_client:
            waits.append(mine[0] + self.window - now)
        return max(waits, default=0.0)

    def failure(self, client: str | None, now: float) -> None:
        self._all.append(now)
        key = client or ""
        mine = self._by_client.pop(key, None) or deque()
        mine.append(now)
        self._by_client[key] = self._trim(mine, now)  # the most recent client last
        while len(self._by_client) > self.max_clients:
            self._by_client.popitem(last=False)
        while len(self._all) > self.total:  # more is never looked at
            self._all.popleft()
