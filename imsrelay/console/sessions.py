"""Console log-in sessions: the admin token once, then an opaque session cookie.

Pure bookkeeping (no I/O): the server sets the cookie ``HttpOnly; SameSite=Strict``
and checks the session's CSRF token on every request that changes something.
The admin token itself is never stored in the browser and never in a URL.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "imsrelay_console"
CSRF_HEADER = "X-CSRF-Token"
IDLE_LIFETIME = 12 * 3600.0
MAX_SESSIONS = 64


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
        return hmac.compare_digest(given.strip().encode(), self._token)

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
