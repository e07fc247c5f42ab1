"""Explaining the restrictions: which rule applies to a client, sender and recipient.

``explain`` answers, line by line, what the SMTP edge would answer at connect, MAIL
and RCPT for a given client (address, authenticated mailbox, the site address it
connected to) and which Delivery Restriction or Message Filter rule applies.  It
calls the same pure decisions (``imsrelay.policy.restrictions``, ``imsrelay.policy.inbound``) with
the same inputs (config file, directory); ``imsrelay route --from`` and the admin
endpoint ``POST /restrictions/explain`` print it.  ``site_rules`` lists the site's
rules (``GET /restrictions``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from imsrelay.directory.store import Directory
from imsrelay.model.addresses import AddressError, parse_address
from imsrelay.model.settings import SiteConfig
from imsrelay.policy.inbound import InboundPolicy, check_recipient
from imsrelay.policy.restrictions import (
    AcceptRules,
    Client,
    RelayRules,
    accept_mode,
    connect_decision,
    connect_reply,
    mail_requirement,
    recipient_verdict,
    relay_decision,
    sender_decision,
    sender_reply,
)
from imsrelay.routing.router import (
    RoutingTable,
    is_attendant_address,
    is_service_address,
    local_domains_for,
)


@dataclass(frozen=True)
class Question:
    recipient: str
    sender: str | None = None
    client: str | None = None  # the client's IP address
    auth: str | None = None  # the mailbox it authenticated as (alias or address)
    local_address: str | None = None  # the site's address it connected to
    encrypted: bool = False


def relay_rules_for(config: SiteConfig) -> RelayRules:
    """Routing Restrictions from the config file."""
    r = config.restrictions
    return RelayRules(authenticated=r.relay_authenticated, networks=config.smtp.relay_networks,
                      internal_addresses=r.relay_internal_addresses, never=r.never_relay)


def accept_rules_for(config: SiteConfig) -> AcceptRules:
    r = config.restrictions
    members = []
    for s in config.peer_servers:
        try:
            members.append(ipaddress.ip_network(s.host))
        except ValueError:
            continue  # a host name: its address is not known here
    return AcceptRules(r.accept, r.accept_hosts, r.reject_hosts, tuple(members))


def inbound_policy_for(config: SiteConfig, *, addressing_domain: str, learned_sites: tuple[tuple[str, str], ...],
                       own_addresses: frozenset[str] = frozenset()) -> InboundPolicy:
    """What RCPT TO is checked against; shared by the site and ``imsrelay route``."""
    locals_ = local_domains_for(config.site_domain, addressing_domain, config.smtp.accepted_domains)
    org = tuple(c.routing_domain for c in config.connected_sites) + tuple(d for _, d in learned_sites)
    smtp = config.smtp
    return InboundPolicy(local_domains=locals_, org_routing_domains=org, relay_networks=smtp.relay_networks,
                         max_recipients=smtp.max_recipients, max_message_size=smtp.max_message_size,
                         max_hops=smtp.max_hops, relay=relay_rules_for(config),
                         address_literals=config.routing.address_literals, self_addresses=own_addresses)


def site_rules(config: SiteConfig) -> dict[str, Any]:
    r, a, sub = config.restrictions, config.auth, config.submission

    def nets(items: Iterable[object]) -> list[str]:
        return [str(n) for n in items]

    return {
        "site": config.site,
        "routing_restrictions": {"relay_authenticated": r.relay_authenticated,
                                 "relay_networks": nets(config.smtp.relay_networks),
                                 "relay_internal_addresses": nets(r.relay_internal_addresses),
                                 "never_relay": nets(r.never_relay)},
        "submission_restriction": {"sender_must_match": r.sender_must_match},
        "accept_connections": {"accept": r.accept, "accept_hosts": nets(r.accept_hosts),
                               "reject_hosts": nets(r.reject_hosts)},
        "message_filtering": {"filter_senders": list(r.filter_senders), "filter_action": r.filter_action,
                              "turf_dir": str(config.turf_dir)},
        "auth": {"enabled": a.enabled, "mechanisms": list(a.mechanisms), "allow_plaintext": a.allow_plaintext,
                 "replicate_credentials": a.replicate_credentials, "max_failures": a.max_failures,
                 "lockout": a.lockout},
        "submission": {"listen": sub.listen or config.smtp.listen, "port": sub.port, "tls_port": sub.tls_port},
    }


def explain(config: SiteConfig, directory: Directory, q: Question, *, table: RoutingTable,
            policy: InboundPolicy) -> list[str]:
    """What the site would answer this client for this sender and recipient, and why
    (``table`` and ``policy``: the site's routing table and RCPT policy, as it runs)."""
    identity = directory.credential(q.auth, replicated=True) if q.auth else None
    addresses = tuple(identity[0].smtp_addresses) if identity else ()
    alias = identity[0].alias if identity else q.auth
    client = Client(q.client, q.local_address, alias, q.encrypted, addresses)
    who = f"client {q.client or '(any address)'}"
    if q.local_address:
        who += f" connected to {q.local_address}"
    if q.auth:
        who += f", authenticated as {alias}" + ("" if identity else " (no such account: AUTH would fail)")
    lines = [f"who may send: {who}"]

    conn = connect_decision(q.client, accept_rules_for(config))
    lines.append(f"  connect: {'accepted' if conn.allowed else connect_reply(conn)} ({conn.rule})")
    if not conn.allowed:
        return lines
    sender = q.sender if q.sender not in (None, "") else "<>"
    need = mail_requirement(client, accept_mode(q.client, accept_rules_for(config)))
    as_sender = sender_decision(sender, client, must_match=config.restrictions.sender_must_match)
    if q.sender is not None:
        if need:
            lines.append(f"  MAIL FROM:<{sender.strip('<>')}>: {need}")
            return lines
        if not as_sender.allowed:
            lines.append(f"  MAIL FROM:<{sender.strip('<>')}>: {sender_reply(as_sender)}")
            return lines
        lines.append(f"  MAIL FROM:<{sender.strip('<>')}>: accepted ({as_sender.rule})")
    try:
        parsed = parse_address(q.recipient)
    except AddressError as exc:
        return lines + [f"  RCPT TO:<{q.recipient}>: 553 5.1.3 {exc}"]
    mailbox = directory.find_recipient(q.recipient)
    known = mailbox is not None or is_service_address(parsed, table) or is_attendant_address(parsed, table) or (
        parsed.local.lower() == "postmaster" and any(parsed.domain == d.lstrip("#") for d in table.local_domains))
    reply = check_recipient(parsed, policy=policy, client_ip=q.client, known=known, accepted_so_far=0, client=client)
    lines.append(f"  RCPT TO:<{q.recipient}>: {reply}")
    if reply.code == 554 or "relayed" in reply.text:
        relay = relay_decision(client, relay_rules_for(config))
        lines.append(f"  routing restrictions: {'relay allowed' if relay.allowed else 'no relay'}: {relay.rule}")
    if mailbox is not None:
        rules = mailbox.sender_rules
        lines.append(f"  delivery restrictions of {mailbox.alias}: accept from "
                     f"{', '.join(rules.accept_from) or '(everyone)'}; reject from "
                     f"{', '.join(rules.reject_from) or '(nobody)'}")
    if q.sender is None or not reply.ok:
        return lines
    r = config.restrictions
    verdict = recipient_verdict(sender, q.recipient, mailbox.sender_rules if mailbox else None,
                                site_filter=r.filter_senders, site_action=r.filter_action)
    if mailbox is not None:
        lines.append(f"    => {verdict.refusal}" if verdict.refusal else f"    => allowed ({verdict.rule})")
    if verdict.refusal is None:
        f = verdict.filter
        where = f" (kept in {config.turf_dir})" if f.action == "turf" else ""
        lines.append(f"  message filtering: {f.action}{where}: {f.rule}")
    return lines
