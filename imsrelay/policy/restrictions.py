"""Who may connect, relay and send to whom: the IMS's restriction pages (pure).

- **Routing Restrictions** (Q196626): relay for clients that authenticated, for
  listed IP/mask ranges, for clients that connected to listed internal addresses of
  the site; a never-relay list overrides them all.
- **Submission restriction** (Q262945): an authenticated client may only send as an
  address of its own mailbox.
- **Accept connections** (Connections tab, Q316205/Q188250): host/network reject and
  accept lists are applied when the client connects (``554 5.7.1``, then only QUIT);
  "only authenticated" / "only encrypted" at MAIL (``530 5.7.0``), the first moment
  a client can have done either.
- **Delivery Restrictions** per mailbox (accept from / reject from senders or
  domains) and **Message Filtering** (SP2, Q245465): senders or ``@domains`` whose
  mail is deleted, or kept in the turf directory.

Every decision returns what applied (``rule``) so that ``imsrelay route`` and the
logs can say why.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imsrelay.model.addresses import AddressError, normalise_domain, parse_address
from imsrelay.model.objects import SenderRules

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ACCEPT_MODES = ("all", "authenticated", "encrypted", "authenticated+encrypted")
FILTER_ACTIONS = ("delete", "turf")


@dataclass(frozen=True)
class Client:
    """What the SMTP edge knows about a session when it asks."""

    ip: str | None
    local_ip: str | None = None  # the site's address the client connected to
    authenticated: str | None = None  # the mailbox alias it authenticated as
    encrypted: bool = False
    addresses: tuple[str, ...] = ()  # the authenticated mailbox's SMTP addresses


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # which rule decided, in words


@dataclass(frozen=True)
class RelayRules:
    authenticated: bool = True  # relay for clients that authenticated
    networks: tuple[IPNetwork, ...] = ()  # relay for these client ranges (smtp.relay_networks)
    internal_addresses: tuple[IPNetwork, ...] = ()  # relay for clients connected to these site addresses
    never: tuple[IPNetwork, ...] = ()  # never relay for these clients, whatever else says


@dataclass(frozen=True)
class AcceptRules:
    mode: str = "all"  # one of ACCEPT_MODES
    accept_hosts: tuple[IPNetwork, ...] = ()  # when set: only these may connect
    reject_hosts: tuple[IPNetwork, ...] = ()  # never these (wins over accept_hosts)
    # the site's other servers ([[servers]]): their hops are the site's own traffic (Exchange's
    # MTA, not the IMS), so the IMS's connection restrictions and accept mode do not apply to them
    members: tuple[IPNetwork, ...] = ()


def ip_of(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address in ``text`` (an IPv4-mapped IPv6 address as IPv4), or None."""
    if not text:
        return None
    return _parsed_ip(text)


@functools.lru_cache(maxsize=1024)
def _parsed_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Memoised: a peer's address is parsed once, not once per check (the answer is
    an immutable value of the text alone)."""
    try:
        ip = ipaddress.ip_address(text.split("%")[0].strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def _in(ip_text: str | None, networks: Sequence[IPNetwork]) -> IPNetwork | None:
    if not networks:
        return None
    ip = ip_of(ip_text)
    if ip is None:
        return None
    for net in networks:
        if ip.version == net.version and ip in net:
            return net
    return None


# ------------------------------------------------------------------ relay


def relay_decision(client: Client, rules: RelayRules) -> Decision:
    """May this client relay (send to a domain that is not the organisation's)?"""
    never = _in(client.ip, rules.never)
    if never is not None:
        return Decision(False, f"never-relay list: client {client.ip} is in {never}")
    if client.authenticated and rules.authenticated:
        return Decision(True, f"client authenticated as {client.authenticated}")
    listed = _in(client.ip, rules.networks)
    if listed is not None:
        return Decision(True, f"client {client.ip} is in relay range {listed}")
    internal = _in(client.local_ip, rules.internal_addresses)
    if internal is not None:
        return Decision(True, f"client connected to internal address {client.local_ip} ({internal})")
    return Decision(False, "no routing restriction allows relaying for this client")


# ------------------------------------------------------------------ connections


_ALL_HOSTS = Decision(True, "connections accepted from all hosts")  # (a value: one for every session)


def connect_decision(client_ip: str | None, rules: AcceptRules) -> Decision:
    """Checked when a client connects: the host reject and accept lists (another server
    of the site is always accepted)."""
    member = _in(client_ip, rules.members)
    if member is not None:
        return Decision(True, f"client {client_ip} is another server of this site ([[servers]])")
    rejected = _in(client_ip, rules.reject_hosts)
    if rejected is not None:
        return Decision(False, f"client {client_ip} is on the reject list ({rejected})")
    if rules.accept_hosts:
        accepted = _in(client_ip, rules.accept_hosts)
        if accepted is None:
            return Decision(False, f"client {client_ip} is not on the accept list")
        return Decision(True, f"client {client_ip} is on the accept list ({accepted})")
    return _ALL_HOSTS


def connect_reply(decision: Decision) -> str:
    return f"554 5.7.1 Connection refused: {decision.rule}"


def accept_mode(client_ip: str | None, rules: AcceptRules) -> str:
    """The accept mode for a client: the site's, but ``all`` for another server of the site."""
    return "all" if _in(client_ip, rules.members) is not None else rules.mode


def mail_requirement(client: Client, mode: str) -> str | None:
    """The reply to MAIL when the accept mode wants authentication or encryption."""
    if mode in ("encrypted", "authenticated+encrypted") and not client.encrypted:
        return "530 5.7.0 Must issue a STARTTLS command first (this server accepts only encrypted sessions)"
    if mode in ("authenticated", "authenticated+encrypted") and not client.authenticated:
        return "530 5.7.0 Authentication required (this server accepts mail only from authenticated clients)"
    return None


# ------------------------------------------------------------------ submission


def sender_decision(sender: str, client: Client, *, must_match: bool) -> Decision:
    """Q262945: an authenticated client sends only as one of its mailbox's addresses."""
    if not client.authenticated or not must_match:
        return Decision(True, "no submission restriction applies")
    if sender and sender != "<>":
        try:
            key = parse_address(sender).key
        except AddressError:
            key = sender.lower()
        for a in client.addresses:
            try:
                if parse_address(a).key == key:
                    return Decision(True, f"{sender} is an address of mailbox {client.authenticated}")
            except AddressError:
                continue
    return Decision(False, f"{client.authenticated} may not send as <{sender.strip('<>')}> "
                           "(only as an address of its own mailbox)")


def sender_reply(decision: Decision) -> str:
    return f"550 5.7.1 {decision.rule}"


# ------------------------------------------------------------------ sender lists


def check_entry(entry: str) -> str:
    """Normalise a sender-list entry: an address ``user@domain``, ``@domain`` (that
    domain and its sub-domains) or ``<>`` (the null sender); ValueError otherwise."""
    entry = entry.strip()
    if entry == "<>":
        return entry
    if entry.startswith("@"):
        try:
            return "@" + normalise_domain(entry[1:].rstrip("."))
        except AddressError as exc:
            raise ValueError(f"{entry!r}: {exc}") from None
    try:
        return parse_address(entry).key
    except AddressError as exc:
        raise ValueError(f"{entry!r}: {exc}") from None


def rules_from_data(data: Mapping[str, Any]) -> SenderRules:
    """A mailbox object's rules as stored (and replicated): entries that are not valid
    sender-list entries are dropped, an unknown filter action reads as ``turf``, so
    a malformed object from a peer never breaks a decision."""
    def entries(key: str) -> tuple[str, ...]:
        value = data.get(key, ())
        if not isinstance(value, list | tuple):
            return ()
        out = []
        for item in value[:1000]:
            if isinstance(item, str):
                try:
                    out.append(check_entry(item))
                except ValueError:
                    continue
        return tuple(out)

    action = data.get("filter_action", "turf")
    return SenderRules(entries("accept_from"), entries("reject_from"), entries("filter_senders"),
                       action if action in FILTER_ACTIONS else "turf")


def check_entries(entries: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for e in entries:
        n = check_entry(str(e))
        if n not in out:
            out.append(n)
    return tuple(out)


def matching_entry(sender: str, entries: Sequence[str]) -> str | None:
    """The first entry that matches the envelope sender (``""``/``<>`` = null sender)."""
    if not entries:  # (the common case: no list)
        return None
    if not sender or sender == "<>":
        return "<>" if "<>" in entries else None
    try:
        addr = parse_address(sender)
    except AddressError:
        return None
    key = addr.key
    domain = addr.domain.lower()
    for entry in entries:
        if entry == "<>":
            continue
        if entry.startswith("@"):
            d = entry[1:].lower()
            if domain == d or domain.endswith("." + d):
                return entry
        elif entry.lower() == key.lower():
            return entry
    return None


def delivery_decision(sender: str, recipient: str, rules: SenderRules) -> Decision:
    """A mailbox's Delivery Restrictions: reject-from wins, then accept-from (if any)."""
    rejected = matching_entry(sender, rules.reject_from)
    if rejected is not None:
        return Decision(False, f"delivery restrictions of <{recipient}>: reject from {rejected}")
    if rules.accept_from:
        accepted = matching_entry(sender, rules.accept_from)
        if accepted is None:
            return Decision(False, f"delivery restrictions of <{recipient}>: accepts only from "
                                   f"{', '.join(rules.accept_from)}")
        return Decision(True, f"delivery restrictions of <{recipient}>: accept from {accepted}")
    return Decision(True, "no delivery restrictions")


def delivery_reply(sender: str, decision: Decision) -> str:
    return f"550 5.7.1 Sender <{sender.strip('<>')}> not allowed: {decision.rule}"


@dataclass(frozen=True)
class FilterDecision:
    action: str  # "deliver" | "delete" | "turf"
    rule: str


def filter_decision(sender: str, *, site_entries: Sequence[str], site_action: str,
                    mailbox: SenderRules | None) -> FilterDecision:
    """Message Filtering: the site's list first, then the recipient mailbox's."""
    hit = matching_entry(sender, site_entries)
    if hit is not None:
        return FilterDecision(site_action, f"site message filter: {hit} ({site_action})")
    if mailbox is not None:
        hit = matching_entry(sender, mailbox.filter_senders)
        if hit is not None:
            return FilterDecision(mailbox.filter_action, f"mailbox message filter: {hit} ({mailbox.filter_action})")
    return FilterDecision("deliver", "no message filter applies")


@dataclass(frozen=True)
class RecipientVerdict:
    """Delivery Restrictions and Message Filtering for one accepted recipient."""

    refusal: str | None  # the RCPT reply when the sender may not send to it
    rule: str
    filter: FilterDecision


def recipient_verdict(sender: str, recipient: str, mailbox: SenderRules | None, *,
                      site_filter: Sequence[str], site_action: str) -> RecipientVerdict:
    """What happens to mail from ``sender`` for a recipient RCPT already accepted
    (``mailbox``: its rules when the directory has it)."""
    if mailbox is not None:
        allowed = delivery_decision(sender, recipient, mailbox)
        if not allowed.allowed:
            return RecipientVerdict(delivery_reply(sender, allowed), allowed.rule,
                                    FilterDecision("deliver", "refused before filtering"))
        rule = allowed.rule
    else:
        rule = "no delivery restrictions"
    return RecipientVerdict(None, rule, filter_decision(sender, site_entries=site_filter, site_action=site_action,
                                                        mailbox=mailbox))
