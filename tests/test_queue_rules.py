"""The queue's state machine for one recipient (imsrelay.queue.rules), without I/O:
every transition Exchange's retry / expiry / NDR rules and docs/design.md invariant 2 need."""

from __future__ import annotations

import pytest

from imsrelay.model.envelope import BOUNCED, DELIVERED, FAILED, PENDING, TERMINAL, RecipientState
from imsrelay.model.outcome import Outcome
from imsrelay.queue.dsn import EXPIRED_TEXT
from imsrelay.queue.rules import (
    DEFAULT_RETRY,
    RetryPolicy,
    after_attempt,
    after_internal_error,
    report_status,
    retry_delay,
)

T0 = 1_000_000.0
HOUR = 3600.0
POLICY = RetryPolicy(retry_intervals=(900.0, 1800.0, 3600.0, 14400.0), lifetime=2 * 86400.0,
                     delay_notice=4 * HOUR)
TEMP = Outcome.temporary("4.4.1", "connect to mx [192.0.2.1]:25: Connection refused", "mx [192.0.2.1]:25")
PERM = Outcome.permanent_failure("5.1.1", "smtp; 550 5.1.1 <x@y>: unknown user", "mx [192.0.2.1]:25")
OK = Outcome.delivered("smtp; 250 2.0.0 queued", "mx [192.0.2.1]:25")


def fresh(**kw: object) -> RecipientState:
    return RecipientState("user@example.net", "user@example.net", **kw)  # type: ignore[arg-type]


def step(r: RecipientState, outcome: Outcome, *, now: float, may_report: bool = True,
         policy: RetryPolicy = POLICY):
    return after_attempt(r, outcome, now=now, received_at=T0, policy=policy, may_report=may_report)


def test_delivered_is_terminal_and_sends_nothing():
    t = step(fresh(), OK, now=T0 + 1)
    assert t.recipient.state == DELIVERED and t.recipient.state in TERMINAL
    assert (t.ndr, t.delay_notice, t.suppressed) == (False, False, False)
    assert t.event == "delivery.delivered"
    assert t.recipient.attempts == 1 and t.recipient.remote == "mx [192.0.2.1]:25"


def test_input_is_not_changed():
    r = fresh()
    step(r, PERM, now=T0 + 1)
    assert r.state == PENDING and r.attempts == 0


def test_permanent_failure_ndr_then_bounced():
    t = step(fresh(), PERM, now=T0 + 1)
    assert t.ndr and t.recipient.state == BOUNCED and t.event == "delivery.failed"
    assert t.recipient.status == "5.1.1" and "unknown user" in (t.recipient.diagnostic or "")


def test_permanent_failure_without_report_is_failed_never_an_ndr_to_null_sender():
    t = step(fresh(), PERM, now=T0 + 1, may_report=False)
    assert not t.ndr and t.suppressed and t.recipient.state == FAILED


def test_temporary_failure_retries_on_the_schedule_last_interval_repeating():
    r = fresh()
    now = T0
    waits = []
    for _ in range(6):
        t = step(r, TEMP, now=now)
        assert t.recipient.state == PENDING and t.event == "delivery.deferred" and not t.ndr
        waits.append(t.recipient.next_attempt - now)
        r, now = t.recipient, t.recipient.next_attempt
    assert waits == [900.0, 1800.0, 3600.0, 14400.0, 14400.0, 14400.0]
    assert r.attempts == 6 and r.first_failure == T0


def test_retry_never_scheduled_after_the_lifetime():
    near_end = T0 + POLICY.lifetime - 60.0
    t = step(fresh(attempts=10), TEMP, now=near_end)
    assert t.recipient.next_attempt == T0 + POLICY.lifetime


def test_expiry_sends_4_4_7_ndr_with_the_last_error():
    t = step(fresh(attempts=12), TEMP, now=T0 + POLICY.lifetime)
    assert t.ndr and t.recipient.state == BOUNCED and t.event == "delivery.expired"
    assert t.recipient.status == "4.4.7"
    assert t.recipient.diagnostic == f"{EXPIRED_TEXT} (last error: {TEMP.diagnostic})"


def test_expiry_without_report_is_failed():
    t = step(fresh(), TEMP, now=T0 + POLICY.lifetime + 1, may_report=False)
    assert t.suppressed and t.recipient.state == FAILED and not t.ndr


def test_delay_notice_once_after_the_delay():
    before = step(fresh(), TEMP, now=T0 + HOUR)
    assert not before.delay_notice and not before.recipient.delay_notified
    due = step(before.recipient, TEMP, now=T0 + 4 * HOUR)
    assert due.delay_notice and due.recipient.delay_notified and due.recipient.state == PENDING
    again = step(due.recipient, TEMP, now=T0 + 8 * HOUR)
    assert not again.delay_notice


def test_no_delay_notice_when_off_or_to_null_sender():
    off = RetryPolicy(POLICY.retry_intervals, POLICY.lifetime, None)
    assert not step(fresh(), TEMP, now=T0 + 10 * HOUR, policy=off).delay_notice
    t = step(fresh(), TEMP, now=T0 + 10 * HOUR, may_report=False)
    assert not t.delay_notice and t.recipient.delay_notified  # not attempted again later either


def test_first_failure_kept():
    t = step(fresh(first_failure=T0 + 5), TEMP, now=T0 + 100)
    assert t.recipient.first_failure == T0 + 5


def test_terminal_recipient_cannot_move_again():
    with pytest.raises(ValueError):
        step(fresh(state=DELIVERED), OK, now=T0)


def test_internal_error_retries_after_the_first_interval_without_counting():
    r = after_internal_error(fresh(attempts=3), now=T0, policy=POLICY)
    assert r.next_attempt == T0 + 900.0 and r.attempts == 3 and r.state == PENDING


def test_retry_delay_edges():
    assert retry_delay(0, (10.0, 20.0)) == 10.0
    assert retry_delay(99, (10.0, 20.0)) == 20.0
    assert retry_delay(3, ()) == DEFAULT_RETRY


@pytest.mark.parametrize(("status", "delay", "expected"), [
    ("4.4.1", False, "5.4.1"), ("4.4.7", False, "4.4.7"), ("5.1.1", False, "5.1.1"),
    (None, False, "5.0.0"), ("4.4.1", True, "4.4.1"), (None, True, "4.0.0")])
def test_report_status(status, delay, expected):
    assert report_status(status, delay=delay) == expected


def test_every_path_ends_terminal_within_the_lifetime():
    """Invariant 2: retrying a recipient that always fails temporarily ends in exactly
    one terminal state (bounced, with an NDR) once the lifetime is over."""
    r, now, ndrs = fresh(), T0, 0
    for _ in range(1000):
        t = step(r, TEMP, now=now)
        ndrs += t.ndr
        r = t.recipient
        if r.state in TERMINAL:
            break
        now = r.next_attempt
    assert r.state == BOUNCED and ndrs == 1 and now <= T0 + POLICY.lifetime
