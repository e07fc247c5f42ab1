"""Where SMTP sessions wait for delivery to catch up (the edge of
``imsrelay.policy.backpressure``, whose ``decide`` says admit, wait or refuse)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from imsrelay.observe.metrics import SiteMetrics
from imsrelay.policy.backpressure import REFUSE, WAIT, Backlog, Limits, decide, state
from imsrelay.policy.inbound import Reply


class FlowGate:
    """Where a session waits for delivery: ``admit()`` at MAIL FROM; the queue
    manager calls ``progressed()`` each time a first attempt finishes or a message
    leaves the queue, which lets the longest-waiting session re-check."""

    def __init__(self, limits: Limits, backlog: Callable[[], Backlog], *, metrics: SiteMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.backlog = backlog
        self.metrics = metrics
        self.clock = clock
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.delayed = 0  # transactions that waited
        self.delayed_seconds = 0.0
        self.timed_out = 0  # of those, went on after max_delay with delivery still behind
        self.refused = 0

    def _refuse(self, reply: Reply | None) -> Reply | None:
        self.refused += 1
        if self.metrics is not None:
            self.metrics.backpressure.labels("refused").inc()
        return reply

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def state(self) -> str:
        return state(self.backlog(), self.limits)

    def progressed(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def admit(self) -> Reply | None:
        """None: go on (at once, or after waiting); else the refusal to answer."""
        decision = decide(self.backlog(), self.limits)
        if decision.action == REFUSE:
            return self._refuse(decision.reply)
        if decision.action != WAIT:
            return None
        started = self.clock()
        deadline = started + self.limits.max_delay
        loop = asyncio.get_running_loop()
        self.delayed += 1
        try:
            while decision.action == WAIT:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    self.timed_out += 1
                    return None
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append(fut)
                try:
                    await asyncio.wait_for(fut, remaining)
                except TimeoutError:
                    pass
                finally:
                    if not fut.done():
                        fut.cancel()
                decision = decide(self.backlog(), self.limits)
            if decision.action == REFUSE:
                return self._refuse(decision.reply)
            return None
        finally:
            waited = self.clock() - started
            self.delayed_seconds += waited
            if self.metrics is not None:
                self.metrics.backpressure.labels("delayed").inc()
                self.metrics.backpressure_delay.inc(waited)


def backpressure_status(gate: FlowGate) -> dict[str, object]:
    """The ``queue.backpressure`` part of ``GET /status`` (this worker process)."""
    backlog = gate.backlog()
    return {"state": state(backlog, gate.limits), "incoming": backlog.incoming, "queued": backlog.queued,
            "backpressure_at": gate.limits.backpressure_at, "refuse_at": gate.limits.refuse_at,
            "max_delay": gate.limits.max_delay, "waiting_sessions": gate.waiting, "delayed": gate.delayed,
            "delayed_seconds": round(gate.delayed_seconds, 3), "went_on_after_max_delay": gate.timed_out,
            "refused": gate.refused}
