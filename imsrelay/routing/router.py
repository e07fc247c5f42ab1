"""Where each recipient goes, and why (pure).

Order of decisions, as the Exchange 5.5 IMS made them:

1. the site's directory service address (replication traffic) → the directory;
   its system attendant address (Link Monitor pings and their answers) → the attendant;
2. a mailbox in the directory: homed here → its Maildir (on a site of several
   servers, ``[[servers]]``: homed on another server of the site → an intra-site
   SMTP hop to that server, its home server); homed at another site →
   that site's routing address (Connected Sites, by exact directory name, or a site
   learned by replication once Check Now has run);
3. an unknown address in a domain this site owns → permanent failure (5.1.1);
4. a domain in a Connected Site's routing address → that site;
5. the E-Mail Domain table ("forward all messages for this domain to host"): whole
   sub-domain match, ``#`` = exact, the most specific entry wins;
6. the smart host ("forward all messages to host");
7. DNS MX for the domain.

A next hop may be several hosts (``host1,host2,host3``: an E-Mail Domain entry, the
smart host, a Connected Sites entry naming several servers): used in turn, round
robin by message (KB Q279323), a host that is down skipped (``hosts_in_turn``, at
delivery).  A site listed several times in Connected Sites is reached by its
cheapest entries first, equal costs sharing the load, and a dearer entry is used
only when the cheaper ones fail (KB Q262952); ``routing.least_cost_only`` (the
MTA's "use least-cost routes only", KB Q233081) drops that failover.

In a sealed lab (``[lab] sealed``) a next hop outside the lab's networks is refused
(5.7.1, ``imsrelay.policy.sealed``), MX needs the lab's own DNS, and a catch-all
mailbox (``lab.catch_all``, the lab's Internet host) keeps mail for every domain no
entry names in place of steps 6 and 7: "the rest of the Internet".

Every step taken is recorded in ``Route.steps`` for ``imsrelay route``.
"""

from __future__ import annotations

import functools
import ipaddress
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from imsrelay.model.addresses import (
    Address,
    AddressError,
    address_literal,
    domain_matches,
    most_specific,
    parse_address,
)
from imsrelay.model.objects import ATTENDANT_LOCAL, DIRSYNC_LOCAL, Mailbox
from imsrelay.model.settings import (
    ConnectedSite,
    DomainRoute,
    HostList,
    OutboundAuth,
    SiteConfig,
    SiteServer,
    hosts_text,
)
from imsrelay.policy.mail_loops import SelfEndpoints, points_at_self
from imsrelay.policy.sealed import SEALED_STATUS, Network, host_refusal, inside, networks_text

T = TypeVar("T")

LOCAL = "local"
DIRECTORY = "directory"
RELAY = "relay"  # a fixed next hop (E-Mail Domain table entry or smart host)
MX = "mx"  # next hops from DNS
FAIL = "fail"
ATTENDANT = "attendant"  # the site's system attendant: the Link Monitor's pings and answers


@dataclass(frozen=True)
class RoutingTable:
    site: str
    site_domain: str
    local_domains: tuple[str, ...]
    connected_sites: tuple[ConnectedSite, ...] = ()
    learned_sites: tuple[tuple[str, str], ...] = ()  # (site name, routing domain) known by KCC
    email_domains: tuple[DomainRoute, ...] = ()
    smart_hosts: HostList = ()  # delivery.smart_host: one or more hosts, used in turn
    smart_host_auth: OutboundAuth | None = None
    self_endpoints: SelfEndpoints = frozenset()
    starttls_default: str = "opportunistic"
    starttls_by_domain: tuple[tuple[str, str], ...] = ()
    smart_host_starttls: str | None = None
    service_domains: tuple[str, ...] = ()  # domains whose dirsync@ address is this site's directory
    mx_port: int = 25  # port of next hops found by DNS MX (delivery.mx_port)
    address_literals: str = "deliver"  # routing.address_literals: deliver | refuse
    sealed: tuple[Network, ...] | None = None  # a sealed lab's networks (lab.networks); None = not a lab
    lab_dns: bool = False  # the sealed lab has DNS servers of its own ([dns] nameservers)
    catch_all: str | None = None  # lab.catch_all: the mailbox keeping mail for the rest of the Internet
    least_cost_only: bool = False  # routing.least_cost_only: no failover to a dearer Connected Sites route
    server: str = ""  # this server's name (site.server)
    servers: tuple[SiteServer, ...] = ()  # the site's servers ([[servers]]); () = a site of one server


@functools.lru_cache(maxsize=8)
def self_addresses(endpoints: frozenset[tuple[str, int]]) -> frozenset[str]:
    """This site's own IP addresses (normalised), from where it listens.  Memoised by
    the endpoints themselves: a new set of endpoints (another port, an interface
    that came or went) is a new key, so the answer always follows them."""
    found = set()
    for host, _ in endpoints:
        try:
            found.add(str(ipaddress.ip_address(host.split("%")[0])))
        except ValueError:
            continue  # the host name
    return frozenset(found)


def directory_lookup_address(recipient: str, site_domain: str, own: frozenset[str]) -> str:
    """The address to look up in the directory: ``user@[this site's own address]`` is
    ``user@site domain`` (RFC 5321 §4.1.3: a literal naming this host is this host)."""
    try:
        address = parse_address(recipient)
        ip = address_literal(address.domain)
    except AddressError:
        return recipient
    if ip is not None and str(ip) in own:
        return f"{address.local}@{site_domain}"
    return recipient


@dataclass(frozen=True)
class Route:
    recipient: str
    kind: str
    steps: tuple[str, ...]
    mailbox: str | None = None  # alias, for LOCAL
    host: str | None = None  # RELAY next hop
    port: int = 25
    domain: str | None = None  # MX domain, or the domain the relay entry matched
    starttls: str = "opportunistic"
    permanent: bool = False  # FAIL: permanent (NDR now) or temporary (retry)
    status: str | None = None  # FAIL: RFC 3463 code
    reason: str | None = None
    site: str | None = None  # the remote site when routed to one
    cost: int | None = None  # Connected Sites cost of this route to the site
    alternatives: tuple[Route, ...] = ()  # dearer (or equal-cost) routes, tried in order when this one fails
    etrn: str | None = None  # E-Mail Domain entry holding this mail until the peer issues ETRN
    server: str | None = None  # RELAY: the home server of the site this hop goes to (an intra-site hop)
    hosts: HostList = ()  # RELAY with several hosts: all of them, in this message's turn ((host, port) first)
    auth: OutboundAuth | None = None  # RELAY: the Security tab's credentials for these hosts (Q174754)
    auth_for: str | None = None  # whose credentials: "E-Mail Domain x", "the smart host"

    @property
    def relay_hosts(self) -> HostList:
        """A RELAY route's hosts in the order to try them."""
        return self.hosts or (((self.host, self.port),) if self.host else ())

    @property
    def destination(self) -> str:
        """Key grouping recipients that share a delivery (one SMTP transaction): the
        same hosts (whatever the turn), TLS level and credentials."""
        if self.kind == RELAY:
            hosts = ",".join(sorted(f"{h}:{p}" for h, p in self.relay_hosts)) if self.hosts else f"{self.host}:{self.port}"
            user = f":auth={self.auth.username}" if self.auth else ""
            return f"relay:{hosts}:{self.starttls}{user}"
        if self.kind == MX:
            return f"mx:{self.domain}:{self.port}:{self.starttls}"
        return f"{self.kind}:{self.mailbox or ''}"

    def explain(self) -> str:
        lines = [f"recipient: {self.recipient}"]
        lines += [f"  {i}. {s}" for i, s in enumerate(self.steps, 1)]
        if self.kind == LOCAL and self.domain:
            lines.append(f"=> left the organisation to {self.domain}: kept in the lab's catch-all mailbox "
                         f"{self.mailbox} (the rest of the Internet)")
        elif self.kind == LOCAL:
            lines.append(f"=> local delivery to mailbox {self.mailbox}")
        elif self.kind == DIRECTORY:
            lines.append("=> this site's directory service (replication)")
        elif self.kind == ATTENDANT:
            lines.append("=> this site's system attendant (Link Monitor pings and answers)")
        elif self.kind == RELAY and len(self.relay_hosts) > 1:
            lines.append(f"=> SMTP to {hosts_text(self.relay_hosts)}, in this order (STARTTLS {self.starttls})")
        elif self.kind == RELAY:
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            lines.append(f"=> SMTP to {host}:{self.port} (STARTTLS {self.starttls})"
                         + (f", the mailbox's home server {self.server}" if self.server else ""))
        elif self.kind == MX:
            lines.append(f"=> SMTP to the MX hosts of {self.domain}, port {self.port} (STARTTLS {self.starttls})")
        else:
            kind = "permanent" if self.permanent else "temporary"
            lines.append(f"=> {kind} failure {self.status}: {self.reason}")
        if self.cost is not None and self.alternatives:
            lines[-1] += f" (cost {self.cost})"
            for alt in self.alternatives:
                lines.append(f"   if that fails: {alt.next_hop_text()} (cost {alt.cost})")
        if self.etrn:
            lines.append(f"   held until the peer issues ETRN for {self.etrn} (E-Mail Domain entry)")
        if self.auth is not None and self.kind == RELAY:
            lines.append(f"   AUTH as {self.auth.username} ({self.auth_for}'s credentials, Security tab; "
                         f"password from {self.auth.password_source})")
        return "\n".join(lines)

    def next_hop_text(self) -> str:
        if self.kind == RELAY:
            return f"SMTP to {hosts_text(self.relay_hosts)}"
        if self.kind == MX:
            return f"SMTP to the MX hosts of {self.domain}, port {self.port}"
        return self.kind


@dataclass
class _Trail:
    steps: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.steps.append(text)


def is_service_address(address: Address, table: RoutingTable) -> bool:
    return address.local.lower() == DIRSYNC_LOCAL and any(
        address.domain == d.lower() for d in (table.site_domain, *table.service_domains))


def is_attendant_address(address: Address, table: RoutingTable) -> bool:
    """Whether ``address`` is this site's system attendant (``attendant@`` a domain of
    the site's directory service address)."""
    return address.local.lower() == ATTENDANT_LOCAL and any(
        address.domain == d.lower() for d in (table.site_domain, *table.service_domains))


def _starttls_for(domain: str, table: RoutingTable, override: str | None = None) -> str:
    if override:
        return override
    match = most_specific(domain, [(d, p) for d, p in table.starttls_by_domain])
    return match[1] if match else table.starttls_default


def _fail(recipient: str, trail: _Trail, status: str, reason: str, *, permanent: bool) -> Route:
    trail.add(f"no route: {reason}")
    return Route(recipient, FAIL, tuple(trail.steps), permanent=permanent, status=status, reason=reason)


def rotate(items: Sequence[T], share_key: str) -> list[T]:
    """``items`` rotated by a stable hash of ``share_key`` (the queue id): messages take
    turns over them (round robin by message, Q279323), the same message always the same turn."""
    shift = zlib.crc32(share_key.encode()) % len(items) if share_key and len(items) > 1 else 0
    return [*items[shift:], *items[:shift]]


def hosts_in_turn(hosts: HostList, down_until: Mapping[tuple[str, int], float],
                  now: float) -> tuple[HostList, HostList]:
    """(the hosts to try, in order; the hosts skipped because they are down) for a next
    hop of several hosts, given when each host that failed recently may be tried again
    (KB Q279323: mail goes only to the hosts that are available).  A single host is
    always tried (its own hold answers at once)."""
    if len(hosts) <= 1:
        return hosts, ()
    up = tuple(h for h in hosts if down_until.get(h, 0.0) <= now)
    return up, tuple(h for h in hosts if h not in up)


def _relay(recipient: str, trail: _Trail, table: RoutingTable, hosts: HostList, share_key: str, *, what: str,
           domain: str, starttls: str, site: str | None, auth: OutboundAuth | None = None,
           etrn: str | None = None) -> Route:
    """A RELAY route to ``hosts`` (one or more, ``what`` names their entry), checked for
    loops and a sealed lab's walls; several hosts take turns by message."""
    for host, port in hosts:
        if points_at_self(host, port, table.self_endpoints):
            return _fail(recipient, trail, "5.4.6", f"{what} points back at this site ({host}:{port}): loop",
                         permanent=True)
        refused = _sealed_refusal(host, table)
        if refused:
            return _fail(recipient, trail, SEALED_STATUS, f"{what}: {refused}", permanent=True)
    turn = tuple(rotate(hosts, share_key))
    if len(hosts) > 1:
        trail.add(f"{what}: {len(hosts)} hosts used in turn, round robin by message (KB Q279323): this message "
                  f"tries {hosts_text(turn)}; a host that is down is skipped")
    return Route(recipient, RELAY, tuple(trail.steps), host=turn[0][0], port=turn[0][1], domain=domain,
                 starttls=starttls, site=site, etrn=etrn, hosts=turn if len(turn) > 1 else (),
                 auth=auth, auth_for=what if auth else None)


def _route_domain(recipient: str, domain: str, table: RoutingTable, trail: _Trail, site: str | None,
                  share_key: str = "") -> Route:
    """Steps 5–7 for a domain: E-Mail Domain table, smart host, DNS MX."""
    entry = most_specific(domain, [(r.domain, r) for r in table.email_domains])
    if entry is not None:
        pattern, r = entry
        trail.add(f"E-Mail Domain table: {domain} matches entry {pattern} → forward to host {hosts_text(r.hosts)}")
        if r.etrn:
            trail.add(f"E-Mail Domain table: entry {pattern} holds its mail until the peer issues ETRN")
        return _relay(recipient, trail, table, r.hosts, share_key, what=f"E-Mail Domain entry {pattern}",
                      domain=domain, starttls=_starttls_for(domain, table, r.starttls), site=site, auth=r.auth,
                      etrn=r.domain.lstrip("#") if r.etrn else None)
    trail.add(f"E-Mail Domain table: no entry matches {domain}")
    if table.catch_all is not None:
        return _catch_all(recipient, domain, table.catch_all, trail)
    if table.smart_hosts:
        trail.add(f"smart host: forward all messages to host {hosts_text(table.smart_hosts)}")
        return _relay(recipient, trail, table, table.smart_hosts, share_key, what="the smart host", domain=domain,
                      starttls=_starttls_for(domain, table, table.smart_host_starttls), site=site,
                      auth=table.smart_host_auth)
    if table.sealed is not None and not table.lab_dns:
        return _fail(recipient, trail, SEALED_STATUS,
                     f"{domain} is outside this sealed lab, which has no DNS of its own to find its MX hosts "
                     "and no smart host; no connection leaves the lab", permanent=True)
    trail.add(f"DNS: deliver to the MX hosts of {domain}"
              + (" (found with the lab's own DNS; only hosts inside the lab are tried)" if table.sealed is not None
                 else ""))
    return Route(recipient, MX, tuple(trail.steps), domain=domain, port=table.mx_port,
                 starttls=_starttls_for(domain, table), site=site)


def _sealed_refusal(host: str, table: RoutingTable) -> str | None:
    if table.sealed is None:
        return None
    return host_refusal(host, table.sealed, lab_dns=table.lab_dns)


def _catch_all(recipient: str, domain: str, mailbox: str, trail: _Trail) -> Route:
    trail.add(f"the rest of the Internet: {domain} is outside the organisation and the lab; its mail is kept "
              f"in the lab's catch-all mailbox {mailbox} (lab.catch_all), no connection leaves the lab")
    return Route(recipient, LOCAL, tuple(trail.steps), mailbox=mailbox, domain=domain)


def order_by_cost(entries: Sequence[ConnectedSite], share_key: str) -> list[ConnectedSite]:
    """Least cost first; entries of equal cost share the load (KB Q262952): each group is
    rotated by a stable hash of ``share_key`` (the queue id), so messages spread over them."""
    out: list[ConnectedSite] = []
    for cost in sorted({c.cost for c in entries}):
        out += rotate([c for c in entries if c.cost == cost], share_key)
    return out


def shares_load(table: RoutingTable) -> bool:
    """Whether a route depends on the ``share_key``: some site has several Connected
    Sites entries of one cost (``order_by_cost``), or a next hop names several hosts
    (``rotate``)."""
    groups = [(c.name, c.cost) for c in table.connected_sites]
    return (len(groups) != len(set(groups)) or len(table.smart_hosts) > 1
            or any(len(c.more_hosts) for c in table.connected_sites)
            or any(len(r.more_hosts) for r in table.email_domains))


def _route_site(recipient: str, domain: str | None, site: str, table: RoutingTable, trail: _Trail,
                share_key: str) -> Route:
    """A remote site by its Connected Sites entries (one or more, by cost); ``domain``
    None = each entry's routing domain (mail for a mailbox homed there)."""
    entries = [c for c in table.connected_sites if c.name == site]
    if len(entries) <= 1 and not any(c.host for c in entries):
        routing = domain or (entries[0].routing_domain if entries else None)
        assert routing is not None
        return _route_domain(recipient, routing, table, trail, site, share_key)
    ordered = order_by_cost(entries, share_key)
    dearer = ("only the least-cost routes are used, never a dearer one (routing.least_cost_only, KB Q233081)"
              if table.least_cost_only else "a dearer one is used when the cheaper ones fail (KB Q262952)")
    trail.add(f"Connected Sites: site {site} has {len(entries)} route(s): " + ", ".join(
        f"cost {c.cost} @{c.routing_domain}" + (f" via host {hosts_text(c.hosts)}" if c.host else "") for c in ordered)
        + f"; least cost first, equal costs share the load, {dearer}")
    routes: list[Route] = []
    for c in ordered:
        branch = _Trail(list(trail.steps))
        target = domain or c.routing_domain
        if c.host:
            branch.add(f"route of cost {c.cost}: forward to host {hosts_text(c.hosts)}")
            hosts = tuple(h for h in c.hosts if (h[0].lower(), h[1]) not in table.self_endpoints)
            if not hosts:
                continue
            route = _relay(recipient, branch, table, hosts, share_key, what=f"Connected Sites entry {site} "
                           f"(cost {c.cost})", domain=target, starttls=_starttls_for(target, table), site=site)
        else:
            branch.add(f"route of cost {c.cost}: routing address @{c.routing_domain}")
            route = _route_domain(recipient, target, table, branch, site, share_key)
        routes.append(replace(route, cost=c.cost))
    usable = [r for r in routes if r.kind != FAIL] or routes
    if not usable:
        return _fail(recipient, trail, "5.4.6", f"every route to site {site} points back at this site", permanent=True)
    first, rest = usable[0], usable[1:]
    if table.least_cost_only:
        rest = [r for r in rest if r.cost == first.cost]
    return replace(first, alternatives=tuple(rest))


def home_server_of(mailbox: Mailbox, table: RoutingTable) -> SiteServer | None:
    """The server of this site holding ``mailbox``'s Maildir when it is another server
    than this one (None: this server delivers it: a site of one server, a mailbox with
    no home server, or homed here).  ``KeyError`` when its home server is none of the
    site's servers."""
    name = mailbox.home_server.lower()
    if not table.servers or not name or name == table.server.lower():
        return None
    for s in table.servers:
        if s.name.lower() == name:
            return s
    raise KeyError(mailbox.home_server)


def home_server_route(recipient: str, mailbox: Mailbox, table: RoutingTable, trail: _Trail) -> Route:
    """A mailbox of this site: its Maildir here, or an intra-site SMTP hop to its home
    server (any server of a site accepts mail for every user of the site, KB Q199354)."""
    try:
        home = home_server_of(mailbox, table)
    except KeyError:
        return _fail(recipient, trail, "4.4.0", f"mailbox {mailbox.alias} is homed on server {mailbox.home_server}, "
                     f"which is not among this site's [[servers]] ({', '.join(s.name for s in table.servers)}): "
                     "waits for the server list or the directory to name it", permanent=False)
    if home is None:
        if table.servers:
            trail.add(f"home server: {mailbox.home_server or table.server} (this server)")
        return Route(recipient, LOCAL, tuple(trail.steps), mailbox=mailbox.alias)
    trail.add(f"home server: {home.name}, another server of site {table.site}: intra-site hop to "
              f"{home.host}:{home.port}")
    if points_at_self(home.host, home.port, table.self_endpoints):
        return _fail(recipient, trail, "4.4.6", f"server {home.name}'s address {home.host}:{home.port} is this "
                     "server's own: check [[servers]]", permanent=False)
    refused = _sealed_refusal(home.host, table)
    if refused:
        return _fail(recipient, trail, SEALED_STATUS, f"server {home.name}: {refused}", permanent=True)
    return Route(recipient, RELAY, tuple(trail.steps), host=home.host, port=home.port, domain=table.site_domain,
                 starttls=table.starttls_default, server=home.name)


def sent_back(client: str, route: Route, servers: Sequence[SiteServer]) -> bool:
    """Whether an intra-site hop would return a message to the server of the site that
    handed it here (the two servers' directories disagree on the mailbox's home server
    until replication settles): such mail waits rather than bouncing between them."""
    if not route.server or not client:
        return False
    host = client.split("%")[0].lower()
    return any(s.name.lower() == route.server.lower() and s.host.lower() == host for s in servers)


def _route_literal(recipient: str, address: Address, ip: object, table: RoutingTable, trail: _Trail) -> Route:
    """An address literal goes to that address — never through the tables or MX
    (RFC 5321 §5.1) — or is refused by policy; this site's own address is this site."""
    literal = address.domain
    if table.address_literals == "refuse":
        trail.add(f"address literal {literal}: this site refuses address literals (routing.address_literals = \"refuse\")")
        return _fail(recipient, trail, "5.7.1", f"address literals such as {literal} are not accepted here",
                     permanent=True)
    if str(ip) in self_addresses(table.self_endpoints):
        trail.add(f"address literal {literal} is this site's own address")
        return _fail(recipient, trail, "5.1.1", f"{recipient}: unknown or illegal user (no mailbox {address.local} "
                     "at this site)", permanent=True)
    if table.sealed is not None and not inside(str(ip), table.sealed):
        if table.catch_all is not None:
            return _catch_all(recipient, literal, table.catch_all, trail)
        trail.add(f"address literal {literal}: outside this sealed lab (lab.networks: {networks_text(table.sealed)})")
        return _fail(recipient, trail, SEALED_STATUS, f"{literal} is outside this sealed lab; no connection leaves "
                     "the lab", permanent=True)
    trail.add(f"address literal {literal}: deliver to {ip} directly, no E-Mail Domain table, smart host or MX "
              "(RFC 5321 §5.1)")
    return Route(recipient, RELAY, tuple(trail.steps), host=str(ip), port=table.mx_port, domain=address.domain,
                 starttls=table.starttls_default)


def site_routing_domain(site: str, table: RoutingTable) -> tuple[str, str] | None:
    """(routing domain, where it was found) for a remote site, by exact directory name."""
    for c in table.connected_sites:
        if c.name == site:
            return c.routing_domain, "Connected Sites"
    for name, domain in table.learned_sites:
        if name == site:
            return domain, "a site learned by replication (Check Now)"
    return None


def route_for(recipient: str, mailbox: Mailbox | None, table: RoutingTable, share_key: str = "") -> Route:
    """The route for one recipient; ``share_key`` (the queue id) spreads messages over
    equal-cost routes to a site."""
    trail = _Trail()
    try:
        address = parse_address(recipient)
    except AddressError as exc:
        return _fail(recipient, trail, "5.1.3", str(exc), permanent=True)

    if is_service_address(address, table):
        trail.add(f"{recipient} is the directory service address of site {table.site}")
        return Route(recipient, DIRECTORY, tuple(trail.steps))
    if is_attendant_address(address, table):
        trail.add(f"{recipient} is the system attendant address of site {table.site} (Link Monitor)")
        return Route(recipient, ATTENDANT, tuple(trail.steps))

    if mailbox is not None:
        trail.add(f"directory: {recipient} is mailbox {mailbox.alias} ({mailbox.display_name}), home site {mailbox.home_site}")
        if mailbox.home_site == table.site:
            return home_server_route(recipient, mailbox, table, trail)
        found = site_routing_domain(mailbox.home_site, table)
        if found is None:
            return _fail(recipient, trail, "4.4.0",
                         f"no route to site {mailbox.home_site}: add it to Connected Sites or run Check Now",
                         permanent=False)
        routing_domain, source = found
        trail.add(f"{source}: site {mailbox.home_site} has routing address SMTP @{routing_domain}")
        if source == "Connected Sites":
            return _route_site(recipient, None, mailbox.home_site, table, trail, share_key)
        return _route_domain(recipient, routing_domain, table, trail, mailbox.home_site, share_key)

    trail.add(f"directory: no mailbox has the address {recipient}")
    literal = address_literal(address.domain)
    if literal is not None:
        return _route_literal(recipient, address, literal, table, trail)
    entries = [(d, ("local", d)) for d in table.local_domains]
    entries += [(c.routing_domain, ("site", c.name)) for c in table.connected_sites]
    entries += [(domain, ("site", name)) for name, domain in table.learned_sites]
    match = most_specific(address.domain, entries)
    if match is not None and match[1][0] == "local":
        return _fail(recipient, trail, "5.1.1", f"{recipient}: unknown or illegal user (domain {match[0]} is this site's)",
                     permanent=True)
    if match is not None:
        site = match[1][1]
        trail.add(f"Connected Sites: {address.domain} is in the routing address of site {site}")
        return _route_site(recipient, address.domain, site, table, trail, share_key)
    return _route_domain(recipient, address.domain, table, trail, None, share_key)


def local_domains_for(site_domain: str, addressing_domain: str, accepted: Sequence[str]) -> tuple[str, ...]:
    """The domains a site owns: its install-time site domain, its current Site
    Addressing domain (the company domain once the article's last step is done) and
    any extra accepted domains.  An unknown user there is refused (5.1.1).  The site
    domain is kept exact (``#``) so other sites' sub-domains are not swallowed.
    Mailboxes of other sites are accepted because the directory knows them, whatever
    their domain (the shared address space)."""
    domains = ["#" + site_domain, addressing_domain, *accepted]
    seen: list[str] = []
    for d in domains:
        if d and d.lower() not in (s.lower() for s in seen):
            seen.append(d.lower())
    return tuple(seen)


def routing_table_for(config: SiteConfig, *, addressing_domain: str, learned_sites: tuple[tuple[str, str], ...],
                      self_endpoints: SelfEndpoints = frozenset()) -> RoutingTable:
    """The router's input from the site's settings and what the directory says: its
    Site Addressing domain and the sites learned by Check Now (pure); shared by the
    running site and ``imsrelay route``."""
    d = config.delivery
    locals_ = local_domains_for(config.site_domain, addressing_domain,
                                config.smtp.accepted_domains)
    return RoutingTable(
        site=config.site, site_domain=config.site_domain, local_domains=locals_,
        connected_sites=config.connected_sites, learned_sites=tuple(learned_sites),
        email_domains=config.email_domains,
        smart_hosts=d.smart_hosts, smart_host_auth=d.smart_host_auth,
        self_endpoints=self_endpoints, starttls_default=d.starttls,
        starttls_by_domain=tuple((p.domain, p.starttls) for p in d.tls_policies),
        smart_host_starttls=d.smart_host_starttls,
        service_domains=(addressing_domain,), mx_port=d.mx_port,
        address_literals=config.routing.address_literals,
        sealed=config.lab.networks if config.lab.sealed else None, lab_dns=bool(config.dns.nameservers),
        catch_all=config.lab.catch_all if config.lab.sealed else None,
        least_cost_only=config.routing.least_cost_only,
        server=config.server, servers=config.servers)


__all__ = ["route_for", "home_server_of", "sent_back", "Route", "RoutingTable", "local_domains_for", "routing_table_for", "domain_matches",
           "is_service_address", "is_attendant_address", "ATTENDANT", "hosts_in_turn", "rotate"]
