"""``imsrelay route ADDRESS`` — where would this site send mail for ADDRESS, and why.

The same pure router the queue manager uses (``imsrelay.routing.router.route_for``), fed
from the same inputs: the site's TOML file and its directory database.  Works
whether the site runs or not.  Before the site's first start there is no
directory yet: the mailboxes of the config file are then provisioned into a
throw-away in-memory directory, exactly as the first start would, and nothing is
written to disk.  ``--resolve`` also looks up the next hops in DNS (through the
configured ``dns.nameservers``, else the system resolver).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import structlog

from imsrelay.config.loader import load_config
from imsrelay.directory.kcc import learned_sites
from imsrelay.directory.restrictions_report import Question, explain, inbound_policy_for
from imsrelay.directory.store import Directory, DirectoryError
from imsrelay.model.addresses import AddressError, ip_literal, parse_address
from imsrelay.model.errors import UserError
from imsrelay.model.settings import SiteConfig, hosts_text
from imsrelay.observe.logs import configure_logging
from imsrelay.policy.mail_loops import is_self, without_self
from imsrelay.routing.dns import DnsFailure, MailResolver, NextHop
from imsrelay.routing.host_addresses import site_endpoints
from imsrelay.routing.router import (
    MX,
    RELAY,
    Route,
    directory_lookup_address,
    route_for,
    routing_table_for,
    self_addresses,
)
from imsrelay.transport.smtp import remote_name


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "route", help="explain where mail for an address goes (the routing decision chain)",
        description="Print each routing decision for ADDRESS at this site: directory, Connected Sites, "
                    "E-Mail Domain table, smart host, DNS MX.  Works whether the site runs or not.")
    p.add_argument("address", help="recipient address, e.g. User2@SiteB.microsoft.com")
    p.add_argument("--config", "-c", required=True, type=Path, help="the site's TOML file")
    p.add_argument("--data", type=Path, help="data directory (overrides site.data_dir)")
    p.add_argument("--resolve", action="store_true",
                   help="also look up the next hops in DNS (the configured dns.nameservers)")
    p.add_argument("--from", dest="sender", metavar="SENDER",
                   help="also explain the restrictions for mail from SENDER (use '<>' for the null sender)")
    p.add_argument("--client", metavar="IP", help="the client's address (default: any; for --from)")
    p.add_argument("--auth", metavar="MAILBOX", help="the client authenticated as this mailbox (alias or address)")
    p.add_argument("--local-address", metavar="IP", help="the site address the client connected to")
    p.add_argument("--tls", action="store_true", help="the session is encrypted (STARTTLS or port 465)")
    p.set_defaults(func=cmd_route)


def open_directory_for_routing(config: SiteConfig) -> tuple[Directory, str]:
    """The site's directory, or (before its first start) an in-memory one provisioned
    from the config file.  Returns it and a line saying which."""
    db = config.data_dir / "directory.sqlite3"
    if db.exists():
        return Directory(db, config.site), f"directory {db}"
    memory = Directory(Path(":memory:"), config.site)
    memory.provision(organisation=config.organisation, server=config.server, site_domain=config.site_domain,
                     hostname=config.hostname,
                     mailboxes=config.provisioned_mailboxes())
    return memory, f"no directory yet at {db} (site never started): using the mailboxes of the config file"


def decide(config: SiteConfig, address: str) -> tuple[Route, str]:
    """The route for ``address`` and a line naming the directory it came from."""
    directory, source = open_directory_for_routing(config)
    try:
        site = directory.site_object()
        addressing = (site.smtp_address if site else config.site_address).lstrip("@").lower()
        table = routing_table_for(config, addressing_domain=addressing,
                                  learned_sites=tuple(learned_sites(directory)),
                                  self_endpoints=site_endpoints(config, config.smtp.port))
        mailbox = directory.find_recipient(directory_lookup_address(address, config.site_domain,
                                                                    self_addresses(table.self_endpoints)))
    finally:
        directory.close()
    return route_for(address, mailbox, table), source


async def next_hop_lines(config: SiteConfig, route: Route) -> list[str]:
    """The next hops of an SMTP route as the SMTP client would try them."""
    servers = ", ".join(config.dns.nameservers) or ("no DNS (a sealed lab)" if config.lab.sealed
                                                    else "the system resolver")
    resolver = MailResolver(config.dns.nameservers, timeout=config.dns.timeout, system=not config.lab.sealed)
    me = site_endpoints(config, config.smtp.port)
    try:
        if route.kind == RELAY:
            lines = []
            if len(route.relay_hosts) > 1:
                lines.append(f"hosts in this message's turn (KB Q279323; one that is down is skipped): "
                             f"{hosts_text(route.relay_hosts)}")
            for host, port in route.relay_hosts:
                literal = ip_literal(host)
                if literal is not None:
                    lines.append(f"next hop: {host} [{literal}]:{port} (fixed host, no DNS)")
                    continue
                lines.append(f"next hops: A/AAAA of {host} via {servers}:")
                hops = [NextHop(host, a, port, 0) for a in await resolver.addresses(host)]
                lines += [f"  {i}. {remote_name(h)}{'  (this site: loop)' if is_self(h, me) else ''}"
                          for i, h in enumerate(hops, 1)]
            return lines
        assert route.domain is not None
        hops = await resolver.next_hops(route.domain, port=route.port)
    except DnsFailure as failure:
        kind = "permanent" if failure.permanent else "temporary"
        return [f"DNS via {servers}: {kind} failure {failure.status}: {failure.reason}"]
    lines = [f"next hops: MX of {route.domain} via {servers}, in the order they are tried:"]
    usable, looped = without_self(hops, me)
    for i, h in enumerate(usable, 1):
        lines.append(f"  {i}. {remote_name(h)} (MX preference {h.preference})")
    if looped:
        skipped = [h for h in hops if h not in usable]
        lines.append(f"  skipped (this site and less preferred): {', '.join(remote_name(h) for h in skipped)}")
        if not usable:
            lines.append(f"=> permanent failure 5.4.6: mail for {route.domain} loops back to this site")
    return lines


def restriction_lines(config: SiteConfig, args: argparse.Namespace) -> list[str]:
    """Who may send this mail (``imsrelay.directory.restrictions_report.explain``): the same
    RCPT policy and routing table as the running site."""
    directory, _ = open_directory_for_routing(config)
    try:
        own = directory.site_object()
        addressing = (own.smtp_address if own else config.site_address).lstrip("@").lower()
        learned = tuple(learned_sites(directory))
        table = routing_table_for(config, addressing_domain=addressing, learned_sites=learned,
                                  self_endpoints=site_endpoints(config, config.smtp.port))
        policy = inbound_policy_for(config, addressing_domain=addressing, learned_sites=learned,
                                    own_addresses=self_addresses(table.self_endpoints))
        return explain(config, directory, Question(
            recipient=args.address, sender=args.sender, client=args.client, auth=args.auth,
            local_address=args.local_address, encrypted=args.tls), table=table, policy=policy)
    finally:
        directory.close()


def cmd_route(args: argparse.Namespace) -> int:
    config = load_config(args.config, data_dir=args.data)
    if not structlog.is_configured():  # the explanation is the output: log only problems, on stderr
        configure_logging("warning", "console")
    try:
        parse_address(args.address)
    except AddressError as exc:
        raise UserError(str(exc)) from None
    if args.sender not in (None, "", "<>"):
        try:  # as the site's MAIL FROM does (ingress/handler.py): refused before any recipient
            parse_address(args.sender)
        except AddressError as exc:
            raise UserError(f"--from {args.sender!r}: the site answers MAIL FROM with "
                            f"553 5.1.7 Bad sender address syntax: {exc}") from None
    try:
        route, source = decide(config, args.address)
    except DirectoryError as exc:
        raise UserError(str(exc)) from None
    print(f"site {config.site} ({config.hostname}), {source}")
    print(route.explain())
    if args.sender is not None or args.client or args.auth or args.local_address:
        for line in restriction_lines(config, args):
            print(line)
    if route.kind in (RELAY, MX):
        if args.resolve:
            for line in asyncio.run(next_hop_lines(config, route)):
                print(line)
        elif route.kind == MX:
            print("(add --resolve to look up the MX hosts)")
    return 0
