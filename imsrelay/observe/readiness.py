"""Readiness: a list of named checks a site (or a lab) must pass before it is ready.

Each part of a site that must be working before the site can do what it announces
adds a check: a name and a function answering ``None`` when satisfied, or a short
reason when not.  ``GET /ready`` on the admin endpoint (and on the lab endpoint)
answers 200 only when every check passes, 503 with the reasons otherwise
(docs/design.md invariant 10: a site or lab is ready when it listens).

The site adds ``listening``, ``spool recovered`` and ``directory provisioned``;
the embedded lab adds ``lab stage reached``; other parts add their own (e.g. the
queue manager's supervisor: ``queue manager running``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Check = Callable[[], "str | None"]
Detail = Callable[[], object]  # what a part reports beside the checks (never fails readiness)


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    reason: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "ok": self.ok, "reason": self.reason}


@dataclass(frozen=True)
class ReadinessReport:
    checks: tuple[CheckResult, ...]
    details: tuple[tuple[str, object], ...] = ()  # (name, value): shown, never a reason for 503

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.reason}" for c in self.checks if not c.ok]

    def as_dict(self) -> dict[str, object]:
        body: dict[str, object] = {"ready": self.ready, "reasons": self.reasons,
                                   "checks": [c.as_dict() for c in self.checks]}
        if self.details:
            body["details"] = dict(self.details)
        return body


class Readiness:
    """Named readiness checks, evaluated in the order they were added."""

    def __init__(self) -> None:
        self._checks: list[tuple[str, Check]] = []
        self._details: list[tuple[str, Detail]] = []

    def add_detail(self, name: str, detail: Detail) -> None:
        """Add (or replace, by name) a detail: shown in ``/ready``, never failing it
        (e.g. the Link Monitor's states: a link down does not make the site unready)."""
        self._details = [(n, d) for n, d in self._details if n != name]
        self._details.append((name, detail))

    def add(self, name: str, check: Check) -> None:
        """Add (or replace, by name) a check."""
        self._checks = [(n, c) for n, c in self._checks if n != name]
        self._checks.append((name, check))

    def remove(self, name: str) -> None:
        self._checks = [(n, c) for n, c in self._checks if n != name]

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self._checks]

    def report(self) -> ReadinessReport:
        results = []
        for name, check in self._checks:
            try:
                reason = check()
            except Exception as exc:  # a failing check is a reason, never a crash of /ready
                reason = f"check failed: {exc!r}"
            results.append(CheckResult(name, reason is None, reason))
        details = []
        for name, detail in self._details:
            try:
                value = detail()
            except Exception as exc:  # a failing detail is shown as such, never a crash of /ready
                value = f"detail failed: {exc!r}"
            details.append((name, value))
        return ReadinessReport(tuple(results), tuple(details))


def combined(reports: dict[str, ReadinessReport]) -> ReadinessReport:
    """Several sites' reports as one (the lab endpoint): check names get the site's name."""
    return ReadinessReport(tuple(CheckResult(f"{site} {c.name}", c.ok, c.reason)
                                 for site, r in reports.items() for c in r.checks),
                           tuple((f"{site} {name}", value) for site, r in reports.items() for name, value in r.details))
