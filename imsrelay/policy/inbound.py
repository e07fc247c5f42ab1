"""Who may send what to whom: the IMS's Routing tab and Routing Restrictions (pure).

Every function here is a pure decision (hop counts and other loops: ``imsrelay.policy.mail_loops``) over values the SMTP edge gathered (client
address, what the directory said about a recipient, counts).  Replies carry RFC 5321
codes and RFC 3463 enhanced status codes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from imsrelay.model.addresses import Address, AddressError, address_literal, most_specific
from imsrelay.policy.restrictions import Client, Decision, RelayRules, relay_decision

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Reply:
    code: int
    status: str
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


@dataclass(frozen=True)
class InboundPolicy:
    local_domains: tuple[str, ...]  # delivered here or by the directory; "#x" = exact
    org_routing_domains: tuple[str, ...]  # other sites' routing domains: forwarded to them
    relay_networks: tuple[IPNetwork, ...]
    max_recipients: int
    max_message_size: int
    max_hops: int
    address_literals: str = "deliver"  # routing.address_literals: deliver | refuse
    self_addresses: frozenset[str] = frozenset()  # this site's own IP addresses
    relay: RelayRules | None = None  # Routing Restrictions; None: relay_networks only
    # Answers of the pure steps of ``check_recipient`` that depend only on this policy and one
    # input (a domain, a client), kept with it (a new policy starts empty): RCPT after RCPT
    # asks about the same few domains and clients.  At most MEMO_SIZE entries each.
    domain_memo: dict[str, tuple[str, str] | None] = field(default_factory=dict, init=False, compare=False,
                                                           hash=False, repr=False)
    relay_memo: dict[Client, Decision] = field(default_factory=dict, init=False, compare=False,
                                               hash=False, repr=False)


def client_may_relay(client_ip: str | None, networks: Sequence[IPNetwork]) -> bool:
    if not client_ip:
        return False
    try:
        ip = ipaddress.ip_address(client_ip.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def check_size(declared: int | None, limit: int) -> Reply | None:
    if declared is not None and declared > limit:
        return Reply(552, "5.3.4", f"Message size exceeds fixed maximum message size ({limit} bytes)")
    return None


def check_recipient(address: Address, *, policy: InboundPolicy, client_ip: str | None,
                    known: bool, accepted_so_far: int, client: Client | None = None) -> Reply:
    """RCPT TO decision. ``known``: the directory (or a service address) owns it.
    ``client`` (authentication, the address it connected to) feeds the Routing
    Restrictions; without it only ``client_ip`` and ``relay_networks`` count."""
    if accepted_so_far >= policy.max_recipients:
        return Reply(452, "4.5.3", f"Too many recipients (at most {policy.max_recipients} per message)")
    if known:
        return Reply(250, "2.1.5", f"<{address}> recipient ok")
    try:
        literal = address_literal(address.domain)
    except AddressError:
        return Reply(553, "5.1.3", f"<{address}> is not a valid address literal")
    if literal is not None:
        if policy.address_literals == "refuse":
            return Reply(550, "5.7.1", f"<{address}> address literals are not accepted here")
        if str(literal) in policy.self_addresses:
            return Reply(550, "5.1.1", f"<{address}> unknown or illegal user")
        if client_may_relay(client_ip, policy.relay_networks):
            return Reply(250, "2.1.5", f"<{address}> recipient ok (relayed to the address literal)")
        return Reply(554, "5.7.1", f"<{address}> relaying denied: this server accepts mail only for its own domains")
    match = _domain_match(policy, address.domain)
    if match is not None:
        if match[1] == "local":
            return Reply(550, "5.1.1", f"<{address}> unknown or illegal user")
        return Reply(250, "2.1.5", f"<{address}> recipient ok (forwarded to its site)")
    decision = _relay(policy, client or Client(client_ip))
    if decision.allowed:
        return Reply(250, "2.1.5", f"<{address}> recipient ok (relayed: {decision.rule})")
    if decision.rule.startswith("never-relay"):
        return Reply(554, "5.7.1", f"<{address}> relaying denied: {decision.rule}")
    return Reply(554, "5.7.1", f"<{address}> relaying denied: this server accepts mail only for its own domains")


MEMO_SIZE = 1024  # answers kept per policy and step (hostile clients may name any number of domains)


def _domain_match(policy: InboundPolicy, domain: str) -> tuple[str, str] | None:
    """The most specific of the policy's local domains ("local") and other sites'
    routing domains ("site") that ``domain`` falls under, or None (memoised in the policy)."""
    memo = policy.domain_memo
    if domain in memo:
        return memo[domain]
    entries = [(d, "local") for d in policy.local_domains] + [(d, "site") for d in policy.org_routing_domains]
    match = most_specific(domain, entries)
    if len(memo) < MEMO_SIZE:
        memo[domain] = match
    return match


def _relay(policy: InboundPolicy, client: Client) -> Decision:
    """``relay_decision`` under the policy's Routing Restrictions (memoised in the policy)."""
    memo = policy.relay_memo
    decision = memo.get(client)
    if decision is None:
        decision = relay_decision(client, policy.relay or RelayRules(authenticated=False,
                                                                     networks=policy.relay_networks))
        if len(memo) < MEMO_SIZE:
            memo[client] = decision
    return decision


def tracking_reserve(*, max_message_size: int, minfree: int) -> int:
    """Free bytes below which message tracking stops writing: twice what the queue
    needs to accept a message (``check_storage``), so tracking never fills the disk
    the queue needs."""
    return 2 * max(minfree, int(1.5 * max_message_size))


def check_storage(free_bytes: int, *, declared: int | None, max_message_size: int, minfree: int) -> Reply | None:
    """Refuse new mail for now (452 4.3.1) when the queue's file system is nearly
    full: it must keep ``minfree`` bytes and room for 1.5 times the message (its
    declared SIZE=, else the size limit), as Postfix's queue_minfree rule does."""
    needed = max(minfree, int(1.5 * (declared if declared is not None else max_message_size)))
    if free_bytes < needed:
        return Reply(452, "4.3.1", "Insufficient system storage; please try again later")
    return None
