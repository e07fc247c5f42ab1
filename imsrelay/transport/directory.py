"""The agent for replication mail: a dirsync message handed to the directory service.

Messages addressed to the site's directory service (the route kind DIRECTORY) are
not stored in a mailbox: the replicator (``imsrelay.directory.replication``) verifies
and applies them.  This agent gets that one call from the composition root, so the
transport package does not depend on the directory package.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from imsrelay.model.envelope import Envelope, RecipientState
from imsrelay.model.outcome import Outcome
from imsrelay.routing.router import Route


class DirectoryTransport:
    def __init__(self, apply: Callable[[Envelope, bytes], Awaitable[None]], *, log: Any) -> None:
        self.apply = apply
        self.log = log

    async def deliver(self, route: Route, env: Envelope, recipients: Sequence[RecipientState],
                      message: bytes) -> dict[str, Outcome]:
        try:
            await self.apply(env, message)
            outcome = Outcome.delivered("directory service")
        except Exception as exc:
            self.log.error("replication.internal_error", queue_id=env.queue_id, error=repr(exc), exc_info=exc)
            outcome = Outcome.temporary("4.3.0", f"directory service error: {exc}")
        return {r.address: outcome for r in recipients}

    def forget_unreachable(self) -> None:
        pass
