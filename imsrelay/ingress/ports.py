"""What the ingress asks of its site: the ``Ingress`` protocol.

The composition root (``imsrelay.site.Site``) satisfies it from its parts: live
inputs for the decisions (policy, rewrite rules, directory look-ups), AUTH, the
restrictions and Message Filtering, the IMS's connection controls, and the queue's
door (``accept``).
"""

from __future__ import annotations

from typing import Protocol

from imsrelay.ingress.flow_gate import FlowGate
from imsrelay.model.envelope import Envelope
from imsrelay.model.objects import Mailbox
from imsrelay.observe.faults import FaultBook
from imsrelay.observe.metrics import SiteMetrics
from imsrelay.observe.protocol_log import ProtocolLog
from imsrelay.policy.auth import GuessGuard, Identity
from imsrelay.policy.inbound import (
    InboundPolicy,
)
from imsrelay.policy.restrictions import (
    AcceptRules,
    Client,
    FilterDecision,
)
from imsrelay.policy.rewrite import RewriteRules
from imsrelay.policy.transfer_mode import (
    TransferMode,
)


class Ingress(Protocol):
    """What the SMTP handler asks its site (``imsrelay.site.Site``): live inputs for
    the decisions, and the queue's door."""

    def free_space(self) -> int: ...

    async def recipient_known(self, address: str) -> bool: ...

    async def directory_refusal(self, sender: str, address: str) -> str | None:
        """A reply deferring replication mail for this site's directory service, or None."""
        ...

    def inbound_policy(self) -> InboundPolicy: ...

    def seen_before(self, raw: bytes) -> bool: ...

    async def rewrite_rules(self) -> RewriteRules: ...

    async def local_primaries(self, addresses: list[str]) -> dict[str, str]: ...

    async def accept(self, env: Envelope, message: bytes) -> None: ...

    # AUTH and the restrictions (imsrelay.policy.auth, imsrelay.policy.restrictions)
    auth_guard: GuessGuard

    async def account_of(self, login: str) -> str: ...

    def accept_rules(self) -> AcceptRules: ...

    async def authenticate(self, login: str, password: bytes) -> Identity | None: ...

    async def lookup_mailboxes(self, addresses: list[str]) -> list[Mailbox | None]: ...

    async def keep_filtered(self, queue_id: str, sender: str, filtered: dict[str, FilterDecision],
                            message: bytes, client: Client) -> None: ...
    @property
    def addressing_domain(self) -> str: ...

    flow: FlowGate  # backpressure at MAIL FROM

    # the IMS's connection controls: Transfer mode, faults on demand, counters, protocol log, ETRN
    @property
    def transfer_mode(self) -> TransferMode: ...

    @property
    def faults(self) -> FaultBook: ...

    @property
    def metrics(self) -> SiteMetrics: ...

    @property
    def protocol_log(self) -> ProtocolLog | None: ...

    def release_etrn(self, node: str) -> int: ...
