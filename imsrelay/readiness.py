"""Readiness: a list of named checks, each ok or not with a reason (pure).

``GET /ready`` on the admin endpoint answers 200 when every check is ok, else 503
with the failing checks' reasons; ``GET /health`` answers 200 while the process
serves HTTP at all.  Neither needs the admin token (load balancers, probes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    reason: str = ""


def ready_response(checks: list[Check]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for ``GET /ready``."""
    failing = [c for c in checks if not c.ok]
    body: dict[str, Any] = {"ready": not failing,
                            "checks": [{"name": c.name, "ok": c.ok, "reason": c.reason} for c in checks]}
    if failing:
        body["reason"] = "; ".join(f"{c.name}: {c.reason}" for c in failing)
    return (200 if not failing else 503), body
