"""Every delivery is a transport: the one protocol the queue manager delivers through.

Like Postfix's local(8), virtual(8), smtp(8) and error(8) behind qmgr, each agent
delivers one message to a group of recipients that share a route, and answers one
``Outcome`` per recipient address.  The queue manager (``imsrelay.queue.manager``)
picks the agent by the route's kind (``imsrelay.routing.router``: LOCAL, DIRECTORY,
RELAY, MX, FAIL) from the ``Transports`` the composition root hands it; it never
touches a socket, a Maildir or the directory itself.  The agents live in
``imsrelay.transport`` (``maildir.MaildirTransport``, ``directory.DirectoryTransport``,
``costed.CostedTransport`` over ``smtp.SmtpClient``, ``error.ErrorTransport``) and
match this protocol by shape: neither package imports the other (an import
contract), and mypy checks each agent where ``imsrelay.site`` hands it over.

An agent never raises for a delivery problem it understands: it answers an
outcome (temporary or permanent).  Anything it raises is an internal error, which
the queue manager records as ``4.3.0`` and retries (docs/design.md invariant 3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from imsrelay.model.envelope import Envelope, RecipientState
from imsrelay.model.outcome import Outcome
from imsrelay.routing.router import Route


class Transport(Protocol):
    """One delivery agent."""

    async def deliver(self, route: Route, env: Envelope, recipients: Sequence[RecipientState],
                      message: bytes) -> dict[str, Outcome]:
        """Deliver ``message`` to ``recipients`` (all on ``route``); an outcome per
        recipient address (a missing one is recorded as a temporary failure)."""
        ...

    def forget_unreachable(self) -> None:
        """An operator asked for a retry: forget what was learned about next hops
        that did not answer, so the retry really tries them."""
        ...


Transports = Mapping[str, Transport]  # route kind -> the agent that delivers it
