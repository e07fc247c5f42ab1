"""Backpressure: when acceptance outruns delivery, new mail is slowed, then refused
(docs/design.md invariant 9).

Two measures of the queue, two bounds (``[queue]`` in the site's TOML file):

- **incoming** — messages accepted whose first delivery attempt has not finished
  (waiting for it or under way): the work delivery has not caught up with.  From
  ``queue.backpressure_at`` of them, a new transaction waits at ``MAIL FROM`` for
  delivery to take one (each finished first attempt lets one waiting session go),
  at most ``queue.max_delay`` seconds, then goes on — Postfix's ``in_flow_delay``.
  Senders are slowed to the delivery rate instead of the queue growing.  Mail
  deferred to a destination that is down does not count here: it would otherwise
  slow every sender for as long as that destination stays down.
- **queued** — every message in the queue, deferred ones too (their envelopes are
  in memory, their bodies on disk).  From ``queue.refuse_at`` of them, ``MAIL FROM``
  is answered ``452 4.3.1`` (clients retry later): the hard bound on memory and disk.

Why slow first and refuse only at the hard bound: a delayed reply is honoured by
every client (RFC 5321 gives MAIL five minutes) and costs the sender a second at
most; a 4xx sends the message back to the client's own queue for minutes (its retry
interval), which is far worse latency — and a refusal does nothing that a short
wait would not, while delivery keeps up on average.

``decide`` is the pure decision; ``imsrelay.ingress.flow_gate.FlowGate`` is the edge where
sessions wait on the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from imsrelay.policy.inbound import Reply

ADMIT = "admit"
WAIT = "wait"
REFUSE = "refuse"


@dataclass(frozen=True)
class Limits:
    backpressure_at: int  # incoming messages from which new transactions wait
    refuse_at: int  # queued messages from which MAIL gets 452 4.3.1
    max_delay: float  # seconds a transaction waits at most before it goes on


@dataclass(frozen=True)
class Backlog:
    queued: int  # every message in the queue
    incoming: int  # accepted, first attempt not finished


@dataclass(frozen=True)
class Decision:
    action: str  # ADMIT | WAIT | REFUSE
    reply: Reply | None = None  # REFUSE: the answer to MAIL FROM


def decide(backlog: Backlog, limits: Limits) -> Decision:
    """What a new transaction gets now: go on, wait for delivery, or a 452."""
    if backlog.queued >= limits.refuse_at:
        return Decision(REFUSE, Reply(452, "4.3.1",
                                      f"Too much mail is queued here ({backlog.queued}); please try again later"))
    if backlog.incoming >= limits.backpressure_at and limits.max_delay > 0:
        return Decision(WAIT)
    return Decision(ADMIT)


def state(backlog: Backlog, limits: Limits) -> str:
    """``open`` | ``slowing`` | ``refusing``, as /status shows it."""
    action = decide(backlog, limits).action
    return {ADMIT: "open", WAIT: "slowing", REFUSE: "refusing"}[action]
