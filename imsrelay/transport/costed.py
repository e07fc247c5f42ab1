"""The SMTP delivery agent: outbound SMTP by route cost, with the lab's cut links
(the transport for the RELAY and MX route kinds).

A route to a site can carry dearer (or equal-cost) alternatives (Connected Sites
``cost``; dearer routes only when the cheaper ones fail, KB Q262952): a delivery that
fails temporarily on one is tried on the next at once.  With ``routing.least_cost_only``
(the MTA's "use least-cost routes only", KB Q233081) the router gives no dearer
alternative and the mail waits for the cheapest routes.  A ``link`` fault on demand (``imsrelay faults``) makes a route's deliveries
fail with ``4.4.1`` without a connection, as a cut link would.  Messages and bytes
that leave by SMTP are counted here (PerfMon's "messages/bytes out").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imsrelay.model.envelope import Envelope, RecipientState
from imsrelay.model.outcome import Outcome
from imsrelay.observe.faults import FaultBook
from imsrelay.observe.metrics import SiteMetrics
from imsrelay.routing.router import Route
from imsrelay.transport.smtp import SmtpClient


class CostedTransport:
    def __init__(self, client: SmtpClient, *, faults: FaultBook, metrics: SiteMetrics, log: Any) -> None:
        self.client = client
        self.faults = faults
        self.metrics = metrics
        self.log = log.bind(component="smtp")

    async def deliver(self, route: Route, env: Envelope, recipients: Sequence[RecipientState],
                      message: bytes) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        pending = [r.address for r in recipients]
        for choice in (route, *route.alternatives):  # least cost first; a dearer route when it fails
            if choice is not route:
                self.log.info("delivery.route_failover", queue_id=env.queue_id, site=route.site,
                              failed=route.destination, cost=choice.cost, next=choice.destination)
            cut = self.faults.link_cut(site=choice.site or choice.server, host=choice.host,  # a site, or a server of this site
                                       port=choice.port if choice.host else None, domain=choice.domain)
            if cut is not None:
                result = {r: Outcome.temporary("4.4.1", f"link to {cut.peer} is cut (fault {cut.id})")
                          for r in pending}
            else:
                result = await self.client.deliver(choice, env, pending, message)
            outcomes.update(result)
            if any(o.ok for o in result.values()):
                self.metrics.messages_out.inc()
                self.metrics.bytes_out.inc(len(message))
            pending = [r for r in pending if not result[r].ok and not result[r].permanent]
            if not pending:
                break
        return outcomes

    def forget_unreachable(self) -> None:
        self.client.forget_unreachable()
