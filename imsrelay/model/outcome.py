"""The result of one delivery attempt for one recipient (shared by all transports)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    ok: bool
    permanent: bool = False  # for failures: NDR now (True) or retry later (False)
    status: str = "2.0.0"  # RFC 3463 enhanced status code
    diagnostic: str = ""  # e.g. "smtp; 550 5.1.1 <x@y>: user unknown", or a human reason
    remote: str | None = None  # the host that answered ("mx.example.net [192.0.2.1]:25")
    dsn_passed: bool = False  # delivered to a next hop that took the DSN request (RFC 3461): it reports success

    @classmethod
    def delivered(cls, diagnostic: str = "", remote: str | None = None) -> Outcome:
        return cls(True, False, "2.0.0", diagnostic, remote)

    @classmethod
    def temporary(cls, status: str, diagnostic: str, remote: str | None = None) -> Outcome:
        return cls(False, False, status, diagnostic, remote)

    @classmethod
    def permanent_failure(cls, status: str, diagnostic: str, remote: str | None = None) -> Outcome:
        return cls(False, True, status, diagnostic, remote)
