"""The Link Monitor's decisions, per target (pure; KB Q246674).

Exchange 5.5's Link Monitor sent a test message to a remote server's system
attendant (or to a foreign address, whose NDR came back) every polling interval and
watched how long the answer took: a ping waiting longer than the warning threshold
(or a round trip longer than it) put the link in *warning*, longer than the alert
threshold in *alert*; an answer in time brought it back *up*.

A target's ``TargetStatus`` is a value; ``sent``, ``answered`` and ``tick`` return
the next one and, when the state changed, a ``Transition`` (the I/O side,
``imsrelay.observe.link_monitor``, logs it and mails the administrator on alert and
on recovery).  The state is decided by the *lateness*: how long the oldest
unanswered ping has waited, or the last round trip, whichever is longer.

=========  =====================================================================
state      meaning
=========  =====================================================================
``unknown``  no answer yet, and no ping late enough for a warning
``up``       the last answer came within the warning threshold, nothing is late
``warning``  lateness at least ``warning_after``
``alert``    lateness at least ``alert_after``
=========  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace

UNKNOWN = "unknown"
UP = "up"
WARNING = "warning"
ALERT = "alert"
STATES = (UNKNOWN, UP, WARNING, ALERT)
MAX_OUTSTANDING = 64  # unanswered pings remembered per target (the oldest is always kept)
MAX_IN_FLIGHT = 3  # unanswered pings per target before the monitor stops adding more to the queue


@dataclass(frozen=True)
class Thresholds:
    interval: float
    warning_after: float
    alert_after: float


@dataclass(frozen=True)
class Transition:
    target: str
    previous: str
    state: str
    at: float
    reason: str


@dataclass(frozen=True)
class TargetStatus:
    target: str
    state: str = UNKNOWN
    since: float = 0.0  # when the state was entered
    last_sent: float | None = None
    last_answer: float | None = None  # when the last answer arrived
    last_rtt: float | None = None  # the round trip of the newest answered ping
    answered_sent: float | None = None  # when the newest answered ping was sent
    outstanding: tuple[float, ...] = ()  # send times of pings not answered yet, oldest first
    pings: int = 0
    answers: int = 0

    def as_dict(self, now: float) -> dict[str, object]:
        return {"target": self.target, "state": self.state, "since": self.since,
                "last_sent": self.last_sent, "last_answer": self.last_answer, "last_rtt": self.last_rtt,
                "waiting": len(self.outstanding), "oldest_wait": lateness_of_oldest(self, now),
                "pings": self.pings, "answers": self.answers}


def initial(target: str, now: float) -> TargetStatus:
    return TargetStatus(target, since=now)


def lateness_of_oldest(status: TargetStatus, now: float) -> float | None:
    """How long the oldest unanswered ping has waited (None: none is waiting)."""
    return max(0.0, now - status.outstanding[0]) if status.outstanding else None


def level(lateness: float, thresholds: Thresholds) -> str:
    if lateness >= thresholds.alert_after:
        return ALERT
    if lateness >= thresholds.warning_after:
        return WARNING
    return UP


def due(status: TargetStatus, now: float, thresholds: Thresholds) -> bool:
    """Whether the next ping to this target is due (the first one at once).  While
    ``MAX_IN_FLIGHT`` pings wait (a cut link), no more pile up in the queue: one more
    goes only once the newest has waited ``alert_after`` (a ping that was lost)."""
    if status.last_sent is None:
        return True
    if now - status.last_sent < thresholds.interval:
        return False
    return len(status.outstanding) < MAX_IN_FLIGHT or now - status.outstanding[-1] >= thresholds.alert_after


def sent(status: TargetStatus, now: float) -> TargetStatus:
    """A ping left for the target at ``now``."""
    outstanding = (*status.outstanding, now)
    if len(outstanding) > MAX_OUTSTANDING:
        outstanding = (outstanding[0], *outstanding[-(MAX_OUTSTANDING - 1):])
    return replace(status, last_sent=now, outstanding=outstanding, pings=status.pings + 1)


def answered(status: TargetStatus, sent_at: float, now: float,
             thresholds: Thresholds) -> tuple[TargetStatus, Transition | None]:
    """The answer to the ping sent at ``sent_at`` arrived at ``now``: every ping sent
    up to then counts as answered (the link carried a later one), and the round trip
    is the newest answered ping's.  An answer older than one already seen only clears."""
    outstanding = tuple(t for t in status.outstanding if t > sent_at)
    newer = status.answered_sent is None or sent_at >= status.answered_sent
    status = replace(status, outstanding=outstanding, answers=status.answers + 1, last_answer=now)
    if newer:
        status = replace(status, last_rtt=max(0.0, now - sent_at), answered_sent=sent_at)
    return _decide(status, now, thresholds)


def tick(status: TargetStatus, now: float, thresholds: Thresholds) -> tuple[TargetStatus, Transition | None]:
    """Time passed: a ping waiting too long moves the target to warning or alert."""
    return _decide(status, now, thresholds)


def _decide(status: TargetStatus, now: float, thresholds: Thresholds) -> tuple[TargetStatus, Transition | None]:
    waited = lateness_of_oldest(status, now)
    rtt = status.last_rtt
    candidates = [x for x in (waited, rtt) if x is not None]
    if not candidates:
        return status, None
    lateness = max(candidates)
    new = level(lateness, thresholds)
    if new == UP and status.last_rtt is None:
        new = UNKNOWN  # nothing answered yet and nothing late: not known to be up
    if new == status.state:
        return status, None
    if waited is not None and waited >= lateness:
        reason = f"a ping has waited {waited:.1f}s for its answer"
    else:
        reason = f"the last round trip took {rtt:.1f}s"
    if new == UP:
        reason = f"answered in {rtt:.1f}s" if rtt is not None else "answered"
    transition = Transition(status.target, status.state, new, now, reason)
    return replace(status, state=new, since=now), transition


def worst(states: list[str]) -> str:
    """A monitor's state: its worst target's (``unknown`` only when nothing is known)."""
    order = {UNKNOWN: 0, UP: 1, WARNING: 2, ALERT: 3}
    return max(states, key=order.__getitem__) if states else UNKNOWN


def mails_administrator(transition: Transition) -> bool:
    """Alert mail on entering alert; recovery mail when a target that was in warning
    or alert comes back up (Exchange's notification on alert, and its "back up")."""
    return transition.state == ALERT or (transition.state == UP and transition.previous in (WARNING, ALERT))
