"""The agent for a site's service addresses: mail handed to a service, not a mailbox.

Messages addressed to the site's directory service (the route kind DIRECTORY) are
not stored in a mailbox: the replicator (``imsrelay.directory.replication``) verifies
and applies them.  Messages to the site's system attendant (the route kind
ATTENDANT: Link Monitor pings and their answers) go to the Link Monitor
(``imsrelay.observe.link_monitor``).  This agent gets that one call from the
composition root, so the transport package depends on neither.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from imsrelay.model.envelope import Envelope, RecipientState
from imsrelay.model.outcome import Outcome
from imsrelay.routing.router import Route


class DirectoryTransport:
    def __init__(self, apply: Callable[[Envelope, bytes], Awaitable[object]], *, log: Any,
                 service: str = "directory service", error_event: str = "replication.internal_error") -> None:
        self.apply = apply
        self.log = log
        self.service = service
        self.error_event = error_event

    async def deliver(self, route: Route, env: Envelope, recipients: Sequence[RecipientState],
                      message: bytes) -> dict[str, Outcome]:
        try:
            what = await self.apply(env, message)
            outcome = Outcome.delivered(f"{self.service}: {what}" if isinstance(what, str) else self.service)
        except Exception as exc:
            self.log.error(self.error_event, queue_id=env.queue_id, error=repr(exc), exc_info=exc)
            outcome = Outcome.temporary("4.3.0", f"{self.service} error: {exc}")
        return {r.address: outcome for r in recipients}

    def forget_unreachable(self) -> None:
        pass
