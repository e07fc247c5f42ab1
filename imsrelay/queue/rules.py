"""The queue's state machine for one recipient (pure).

``after_attempt(recipient, outcome, now=..., received_at=..., policy=..., may_report=...)``
answers what an attempt's outcome means, by Exchange 5.5's rules (retry on the
IMS's schedule, the last interval repeating, until the message's lifetime expires;
then, or on a permanent failure, a non-delivery report) and docs/design.md invariant 2
(every recipient ends in exactly one terminal state; never an NDR to ``<>``):

===================  ===========================================  =====================
outcome              condition                                    next state, actions
===================  ===========================================  =====================
delivered            —                                            ``delivered``
permanent failure    a report may be sent                         NDR, then ``bounced``
permanent failure    null sender / automatic report               ``failed`` (logged)
temporary failure    lifetime over                                4.4.7 NDR, ``bounced``
                                                                  (``failed`` if no report)
temporary failure    within the lifetime                          ``pending``, retry at
                                                                  min(now + interval,
                                                                  received + lifetime)
temporary failure    … and ``delay_notice`` passed, not yet sent  + delay notice (once)
===================  ===========================================  =====================

``may_report`` is false, and a failure ends ``failed`` without a report, also when the
recipient's NOTIFY (RFC 3461) asks for no failure report (NEVER, or without FAILURE);
``may_warn`` says the same of delay notices (NOTIFY without DELAY; default: ``may_report``).

The queue manager applies the answer: it queues the reports durably first and only
then records the recipient's new state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from imsrelay.model.envelope import BOUNCED, DELIVERED, FAILED, PENDING, RecipientState
from imsrelay.model.outcome import Outcome
from imsrelay.queue.dsn import EXPIRED_TEXT

DEFAULT_RETRY = 900.0  # when no retry interval is configured at all

DELIVERED_EVENT = "delivery.delivered"
FAILED_EVENT = "delivery.failed"
EXPIRED_EVENT = "delivery.expired"
DEFERRED_EVENT = "delivery.deferred"


@dataclass(frozen=True)
class RetryPolicy:
    """``[delivery]`` settings the decisions use."""

    retry_intervals: tuple[float, ...]
    lifetime: float
    delay_notice: float | None = None


@dataclass(frozen=True)
class Transition:
    """What to do with one recipient after one attempt.

    ``recipient`` is its next state; with ``ndr`` that state (``bounced``) holds only
    once the report is durably queued.  ``delay_notice``: queue a delay notice (the
    recipient stays pending)."""

    recipient: RecipientState
    event: str  # delivery.delivered | delivery.failed | delivery.expired | delivery.deferred
    ndr: bool = False
    delay_notice: bool = False

    @property
    def suppressed(self) -> bool:
        """A permanent failure that gets no report (null sender, automatic report)."""
        return self.recipient.state == FAILED


def retry_delay(attempts: int, intervals: Sequence[float]) -> float:
    """Delay after the ``attempts``-th failed attempt; the last interval repeats."""
    if not intervals:
        return DEFAULT_RETRY
    return intervals[min(max(attempts, 1), len(intervals)) - 1]


def after_attempt(recipient: RecipientState, outcome: Outcome, *, now: float, received_at: float,
                  policy: RetryPolicy, may_report: bool, may_warn: bool | None = None) -> Transition:
    """The recipient's next state and the reports to send (see the module's table).
    ``may_report``: an NDR may go to the envelope sender (not ``<>``, not a report, and
    the recipient's NOTIFY asks for failure reports); ``may_warn``: a delay notice may
    (None: as ``may_report``)."""
    if recipient.state != PENDING:
        raise ValueError(f"{recipient.address} is already {recipient.state}")
    final = BOUNCED if may_report else FAILED
    if outcome.ok or outcome.permanent:  # (one copy: the common case, every delivered recipient)
        done = replace(recipient, attempts=recipient.attempts + 1, status=outcome.status,
                       diagnostic=outcome.diagnostic, remote=outcome.remote,
                       state=DELIVERED if outcome.ok else final)
        if outcome.ok:
            return Transition(done, DELIVERED_EVENT)
        return Transition(done, FAILED_EVENT, ndr=may_report)
    r = replace(recipient, attempts=recipient.attempts + 1, status=outcome.status,
                diagnostic=outcome.diagnostic, remote=outcome.remote, first_failure=recipient.first_failure or now)
    if now - received_at >= policy.lifetime:
        expired = replace(r, state=final, status="4.4.7",
                          diagnostic=f"{EXPIRED_TEXT} (last error: {outcome.diagnostic})")
        return Transition(expired, EXPIRED_EVENT, ndr=may_report)
    r = replace(r, next_attempt=min(now + retry_delay(r.attempts, policy.retry_intervals),
                                    received_at + policy.lifetime))
    notice_due = (policy.delay_notice is not None and not r.delay_notified
                  and now - received_at >= policy.delay_notice)
    if notice_due:
        r = replace(r, delay_notified=True)
    return Transition(r, DEFERRED_EVENT, delay_notice=notice_due and (may_report if may_warn is None else may_warn))


def after_internal_error(recipient: RecipientState, *, now: float, policy: RetryPolicy) -> RecipientState:
    """An attempt that broke inside imsrelay: nothing is recorded, try again later."""
    return replace(recipient, next_attempt=now + retry_delay(1, policy.retry_intervals))


def report_status(status: str | None, *, delay: bool) -> str:
    """The Status: field of a recipient in a report: a delay notice keeps the 4.x.x
    code; an NDR turns a temporary code permanent, except the 4.4.7 of an expiry."""
    s = status or ("4.0.0" if delay else "5.0.0")
    if not delay and s.startswith("4."):
        return "5." + s[2:] if s != "4.4.7" else "4.4.7"
    return s
