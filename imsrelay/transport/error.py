"""The agent for routes that fail (Postfix's error(8)): the router's verdict as the outcome.

A recipient the router could not place (no such mailbox, relaying denied, a loop,
a temporary routing problem) still goes through the queue like any other, so its
failure is recorded, retried or reported by the same rules (``imsrelay.queue.rules``).
"""

from __future__ import annotations

from collections.abc import Sequence

from imsrelay.model.envelope import Envelope, RecipientState
from imsrelay.model.outcome import Outcome
from imsrelay.routing.router import Route


class ErrorTransport:
    async def deliver(self, route: Route, env: Envelope, recipients: Sequence[RecipientState],
                      message: bytes) -> dict[str, Outcome]:
        outcome = Outcome(False, route.permanent, route.status or "5.0.0", route.reason or "no route")
        return {r.address: outcome for r in recipients}

    def forget_unreachable(self) -> None:
        pass
