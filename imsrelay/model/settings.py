"""A site's settings as frozen values (no I/O): what ``imsrelay.config.loader`` loads
from the site's TOML file.  Each default is written once, here."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imsrelay.model.priority import PriorityTimeouts, Timeouts

# Exchange 5.5 IMC retry intervals: .25, .5, 1, 4 hours (the last one repeats).
DEFAULT_RETRY_INTERVALS = (900.0, 1800.0, 3600.0, 14400.0)
DEFAULT_LIFETIME = 2 * 86400.0
REPLICATION_ALWAYS = 15 * 60.0
REPLICATION_DEFAULT_SCHEDULE = 3 * 3600.0  # a connector's default schedule: every 3 hours (Q195918)
# IMS Time-outs button (Q184051, Q166587): normal is delivery.lifetime (48 h); [I] urgent 24 h, non-urgent 72 h
DEFAULT_URGENT_LIFETIME = 86400.0
DEFAULT_NON_URGENT_LIFETIME = 3 * 86400.0
SMTP_PORT = 25  # a next hop's port when none is given (smart host, connected site, domain route, ETRN, MX)
# Diagnostics Logging (Q146669): the categories of logged events (each defaults to logging.level) ...
EVENT_CATEGORIES = ("initialization_termination", "addressing", "message_archival",
                    "smtp_interface_events", "internal_processing")
# ... and the per-session SMTP protocol log (off unless its level is set)
PROTOCOL_LOG_CATEGORY = "smtp_protocol_log"
PROTOCOL_LOG_DEFAULT = "none"
# ... and the IMAP4 and POP3 protocol logs (Exchange 5.5: IMAP4/POP3 protocol logging), off by default
ACCESS_LOG_CATEGORIES = ("imap4_protocol_log", "pop3_protocol_log")
DIAGNOSTIC_CATEGORIES = (*EVENT_CATEGORIES, PROTOCOL_LOG_CATEGORY, *ACCESS_LOG_CATEGORIES)
DIAGNOSTIC_LEVELS = ("none", "minimum", "medium", "maximum")
DEFAULT_BANNER = "Microsoft Exchange Internet Mail Service 5.5 (imsrelay)"
ADDRESS_LITERAL_POLICIES = ("deliver", "refuse")

class DefaultText(str):
    """A default told in words (``KEY_DOCS``): what a key left out means."""


def secret_from(value: str | None, env: str | None) -> str | None:
    """A secret given in the file, else in the environment variable named ``env``."""
    if value:
        return value
    if env:
        return os.environ.get(env) or None
    return None


class Secret:
    """A secret (a password) that never shows: its repr and str are stars, it is no
    string (``json.dumps`` refuses it), and ``reveal()`` is the one way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    def __str__(self) -> str:
        return "********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self


@dataclass(frozen=True)
class OutboundAuth:
    """The IMS Security tab's outbound SASL/AUTH (KB Q174754): credentials given to a
    next hop (an E-Mail Domain's host or the smart host)."""

    username: str
    """the user name given to the next hop (AUTH PLAIN or LOGIN, as the peer offers)"""
    password: Secret | None = field(default=None, repr=False)
    """the password in the file itself (better: `password_env` or `password_file`; never shown in
    logs, `check-config`, the admin API or the console)"""
    password_env: str | None = None
    """the environment variable holding the password (preferred for `serve`)"""
    password_file: Path | None = None
    """a file holding the password (its first line; relative to the site file): a Docker or
    Kubernetes secret"""
    allow_plaintext: bool = False
    """send the credentials over a connection without TLS (else the message waits with `4.7.0`
    when the peer offers no STARTTLS); a lab switch"""

    @property
    def password_source(self) -> str:
        """Where the password comes from, in words (never the password)."""
        if self.password_env:
            return f"environment variable {self.password_env}"
        if self.password_file:
            return f"file {self.password_file}"
        return "the site file" if self.password is not None else "none"


HostList = tuple[tuple[str, int], ...]


def hosts_text(hosts: HostList) -> str:
    """``host1:25, [::1]:2525``: a host list as the CLI, the console and logs show it."""
    return ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in hosts)


@dataclass(frozen=True)
class MailboxConfig:
    alias: str
    """the mailbox's alias (letters, digits, `. _ -`); mailboxes are provisioned on the first start,
    then the directory is the truth"""
    display_name: str
    """the mailbox's display name (left out: the alias)"""
    extra_addresses: tuple[str, ...] = ()
    """secondary proxy addresses (`smtp:x@y`), besides the primary `alias@` the Site Addressing domain"""
    password_hash: str | None = None
    """an scrypt hash (`imsrelay directory hash-password`) set as the mailbox's SMTP AUTH password
    when it has none yet; never a password in clear"""
    home_server: str | None = None
    """the server of a multi-server site the mailbox is homed on (its Maildir lives there; one of
    `[[servers]]`); left out: the server whose file lists it"""


@dataclass(frozen=True)
class CustomRecipientConfig:
    """A custom recipient (`[[custom_recipients]]`, KB Q258203): mail to its addresses goes to `target`."""
    alias: str
    """the custom recipient's alias; it gets `alias@` the Site Addressing domain like a mailbox; created on
    the first start that lists it, then the directory is the truth"""
    target: str
    """the external address its mail is redirected to (e.g. `partner@example.net`)"""
    display_name: str = ""
    """its display name (left out: the alias)"""
    extra_addresses: tuple[str, ...] = ()
    """secondary proxy addresses (`smtp:x@y`)"""


@dataclass(frozen=True)
class DistributionListConfig:
    """A distribution list (`[[distribution_lists]]`, KB Q185194)."""
    alias: str
    """the list's alias; it gets `alias@` the Site Addressing domain like a mailbox; created on the first
    start that lists it, then the directory is the truth"""
    members: tuple[str, ...] = ()
    """its members by address: mailboxes, custom recipients, other lists (of any site)"""
    display_name: str = ""
    """its display name (left out: the alias)"""
    owner: str = ""
    """the address NDRs for its members go to (left out: the message's sender)"""
    expansion_site: str = ""
    """the site that expands it; mail for it arriving elsewhere is sent there (left out: any site)"""
    extra_addresses: tuple[str, ...] = ()
    """secondary proxy addresses (`smtp:x@y`)"""


@dataclass(frozen=True)
class SiteServer:
    """One server of a site made of several servers (`[[servers]]`). In Exchange 5.5 a site was a
    set of servers, each with a full directory replica and its own MTA, queue, store and tracking
    log (KB Q199354, Q170334)."""
    name: str
    """the server's NetBIOS name (e.g. `Server1`); its SMTP host name is `name.email_domain`"""
    host: str
    """the address the site's other servers reach its SMTP listener at"""
    port: int = SMTP_PORT
    """its SMTP port"""
    admin: str | None = None
    """its admin endpoint's base URL (`http://host:port`): intra-site directory replication and
    the site's federated views (message API, tracking, queues, console) go there"""


@dataclass(frozen=True)
class ConnectedSite:
    """Connected Sites tab: a remote site by directory name and its routing address."""

    name: str
    """Connected Sites tab: the remote site's directory name (exact, e.g. `SiteB`)"""
    routing_address: str
    """its routing address, type SMTP (`@SiteB.microsoft.com`)"""
    cost: int = 1
    """the same site may be listed several times: least cost first, equal costs share the load, a
    dearer entry is used when the cheaper ones fail (KB Q262952; `routing.least_cost_only` turns
    that failover off)"""
    host: str | None = None
    """this route's next hop (e.g. through another site) instead of the E-Mail Domain table; several
    servers of the site as `host1,host2:2525`: equal cost, they share the load, one that is down is
    skipped"""
    port: int = SMTP_PORT
    """the port of `host` (and of each listed server without its own)"""
    more_hosts: HostList = ()
    """the servers after the first of `host = "host1,host2"` (read from `host`)"""

    @property
    def hosts(self) -> HostList:
        """Every server of the entry, in the order written."""
        return ((self.host, self.port), *self.more_hosts) if self.host else ()

    @property
    def routing_domain(self) -> str:
        return self.routing_address.lstrip("@")


@dataclass(frozen=True)
class DomainRoute:
    """E-Mail Domain table: "forward all messages for this domain to host"."""

    domain: str
    """E-Mail Domain table: forward this domain and its sub-domains (`#domain`: the domain only) to
    `host`"""
    host: str
    """the host mail for `domain` is forwarded to (a name is looked up by A/AAAA, never MX); several
    as `host1,host2:2525,host3`: used in turn (round robin by message), a host that is down is
    skipped (KB Q279323)"""
    port: int = SMTP_PORT
    """the port of `host` (and of each listed host without its own)"""
    starttls: str | None = None
    """outbound TLS level for this domain: `none`, `opportunistic`, `require` or `verify` (unset: as
    `[[delivery.tls]]` or `delivery.starttls` say); a required level the peer cannot meet defers
    the mail (`4.7.4`/`4.7.5`)"""
    etrn: bool = False
    """hold the domain's mail until the peer issues ETRN (RFC 1985)"""
    more_hosts: HostList = ()
    """the hosts after the first of `host = "host1,host2"` (read from `host`)"""
    auth: OutboundAuth | None = None
    """Security tab (KB Q174754): AUTH to this domain's hosts, `{ username = "…", password_env =
    "…" }` (or `password_file`, or `password`)"""

    @property
    def hosts(self) -> HostList:
        """Every host of the entry, in the order written."""
        return ((self.host, self.port), *self.more_hosts)


@dataclass(frozen=True)
class TlsPolicy:
    domain: str
    """per-domain outbound STARTTLS (`[[delivery.tls]]`): the domain (and its sub-domains)"""
    starttls: str
    """the STARTTLS level for that domain (see `delivery.starttls`)"""


@dataclass(frozen=True)
class SmtpConfig:
    listen: str = "127.0.0.1"
    """where the SMTP server listens: an IP address (`0.0.0.0` / `::` = every address), never a host
    name (that would ask the system resolver)"""
    port: int = 2525
    """the SMTP port (0: any free port)"""
    hostname: str = ""
    """name in the greeting and `Received:` lines (empty: `server.email_domain`, e.g.
    `ServerA.SiteA.microsoft.com`)"""
    max_message_size: int = 10 * 1024 * 1024
    """the inbound size limit in bytes (Exchange 5.5 SP3's InboundSizeLimit, Q231303): advertised in
    SIZE, a bigger message gets `552 5.3.4`; the outbound limit is `delivery.max_message_size`"""
    max_hops: int = 15
    """`Received:` lines allowed before `554 5.4.6`"""
    max_recipients: int = 100
    """per message, then `452 4.5.3`"""
    relay_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """client networks allowed to relay to other domains"""
    accepted_domains: tuple[str, ...] = ()
    """extra domains owned by this site (`#domain` = exact only)"""
    idle_timeout: float = 300.0
    """a session idle this long is closed (`421`)"""
    session_timeout: float = 1800.0
    """a session is closed after this long in all (`421`)"""
    max_errors: int = 20
    """a session is closed after this many error replies (`421`)"""
    tls_cert: Path | None = None
    """PEM certificate (chain) for STARTTLS, relative to the file; with `tls_key`, STARTTLS is
    offered"""
    tls_key: Path | None = None
    """PEM private key of `tls_cert`"""
    tls_generate: bool = False
    """without `tls_cert`: make a throwaway CA and a certificate for this site in `<data>/tls` (labs
    only; trust `<data>/tls/ca.crt`)"""
    workers: int = 1
    """processes serving the site (`serve --workers N` overrides): they share the port
    (SO_REUSEPORT), the directory and the Maildirs, each with its own queue journal; about one
    per core for throughput"""
    queue_minfree: int = 0
    """bytes the queue's file system must keep free besides room for 1.5 × the message; below that,
    MAIL gets `452 4.3.1` (as Postfix's `queue_minfree`)"""
    max_inbound_connections: int = 30
    """SMTP sessions at once on port 25 (Exchange 5.5 IMS's default); beyond, a new client waits
    up to `handshake_timeout` for a slot (a full listener closes an idle session for it), then
    `421 4.7.0`. With `--workers N` each process takes its share"""
    max_connections_per_ip: int = 10
    """sessions at once from one client address (`421 4.7.0`); clients in `smtp.relay_networks` are
    exempt, as Postfix exempts `$mynetworks`"""
    handshake_timeout: float = 30.0
    """a client must say HELO/EHLO (and finish the TLS handshake on 465) within this; then
    `idle_timeout` applies. A new client holding no slot waits this long in line for a free one"""
    busy_idle_timeout: float = 10.0
    """when a listener is full, a new client may take the slot of a session with failed commands,
    one idle this long, or one connected 3 × this long without authenticating or starting a
    transaction (`421 4.7.0 Too many connections: closing an idle session`)"""
    bare_newline: str = "normalize"
    """a bare LF (no CR): `normalize` stores it as CRLF; `reject` answers `521 5.5.2` and closes
    (Postfix's `smtpd_forbid_bare_newline`)"""
    postmaster: str = "Administrator"
    """the mailbox that receives `postmaster@` any local domain and `RCPT TO:<Postmaster>` (RFC 5321
    §4.5.1)"""
    banner: str = DEFAULT_BANNER
    """the greeting after `220 <hostname>` (Postfix's `smtpd_banner`); the lab's Internet host says
    `ESMTP`"""
    listen_backlog: int = 0
    """the accept queue of every listening socket of the site (SMTP, submission, implicit TLS,
    admin, console); 0 = the kernel's maximum (`net.core.somaxconn`), which listen(2) caps any
    larger value to anyway: a burst of clients is queued by the kernel, not dropped"""


@dataclass(frozen=True)
class DeliveryConfig:
    retry_intervals: tuple[float, ...] = DEFAULT_RETRY_INTERVALS
    """Exchange IMC retry schedule (.25, .5, 1, 4 hours); the last interval repeats"""
    lifetime: float = DEFAULT_LIFETIME
    """time before an undeliverable (normal-priority) message is returned with an NDR (`4.4.7`); see
    `[priorities]`"""
    delay_notice: float | None = None
    """send a delay DSN after this long"""
    smart_host: str | None = None
    """"forward all messages to host" (`host[:port]`); several as `host1,host2:2525,host3`: used in
    turn (round robin by message), a host that is down is skipped (KB Q279323)"""
    smart_host_port: int = SMTP_PORT
    smart_host_more: HostList = ()
    """the smart hosts after the first (read from `smart_host`)"""
    smart_host_auth: OutboundAuth | None = None
    """Security tab (KB Q174754): AUTH to the smart host, `{ username = "…", password_env = "…" }`
    (or `password_file`, or `password`)"""
    starttls: str = "opportunistic"
    """outbound STARTTLS: `none`, `opportunistic` (when offered, unchecked), `require` (encrypt,
    unchecked), `verify` (encrypt; the certificate must chain to a trusted CA and name the host,
    else the message waits with `4.7.5`); per domain with `[[delivery.tls]] domain/starttls` or
    `[[email_domains]] starttls`"""
    tls_policies: tuple[TlsPolicy, ...] = ()
    max_per_destination: int = 20
    """deliveries at once to one destination (a relay host or an MX domain), kept by the queue
    manager (Postfix's `default_destination_concurrency_limit`)"""
    max_deliveries: int = 100
    """deliveries at once, all destinations"""
    connect_timeout: float = 30.0
    """outbound: connection and greeting"""
    command_timeout: float = 300.0
    """outbound: each command's reply"""
    data_timeout_per_mib: float = 60.0
    """outbound: DATA may take `command_timeout` plus this per MiB of the message"""
    connection_idle: float = 30.0
    """an idle pooled outbound connection is closed (`QUIT`) after this long"""
    mx_port: int = SMTP_PORT
    """port used for next hops found by DNS MX (a zone cannot carry a port; tests and labs use
    another)"""
    max_active_messages: int = 2000
    """messages being attempted or waiting for a slot at once (the rest wait in the queue on disk,
    as Postfix's active queue); a destination already holding twice its slots in waiting attempts
    gets no more"""
    smart_host_starttls: str | None = None
    """the STARTTLS level for the smart host (unset: as for the recipient's domain)"""

    @property
    def smart_hosts(self) -> HostList:
        """Every smart host, in the order written."""
        return ((self.smart_host, self.smart_host_port), *self.smart_host_more) if self.smart_host else ()
    tls_ca_file: Path | None = None
    """CA bundle (PEM) for `starttls = "verify"` (unset: the system's store)"""
    max_message_size: int = 0
    """the IMS's outbound size limit in bytes (Exchange 5.5 SP3's OutboundSizeLimit, Q231303): a
    bigger message leaving by SMTP (to other sites and the Internet) is returned with an NDR,
    `5.3.4`; 0 = no limit. The inbound limit is `smtp.max_message_size`; per remote domain:
    `[[internet_mail]] max_message_size`"""


@dataclass(frozen=True)
class QueueConfig:
    """[queue]: backpressure when acceptance outruns delivery (imsrelay.policy.backpressure)."""

    backpressure_at: int = 50
    """messages accepted here and still waiting for their first delivery attempt (for the queue
    manager or a delivery slot; deferred mail and attempts under way do not count) from which a
    new transaction waits at `MAIL FROM` until delivery takes one — each started first attempt
    lets the longest-waiting session go. Lower keeps latency lower under load (queue wait ≈ this
    ÷ the delivery rate); with `--workers N` each process counts its own"""
    refuse_at: int = 50_000
    """messages queued (deferred ones included) from which `MAIL FROM` gets `452 4.3.1` — the hard
    bound on queue memory and disk; per worker process"""
    max_delay: float = 1.0
    """the longest a `MAIL FROM` reply waits for delivery, then the transaction goes on (Postfix's
    `in_flow_delay`); at most `5m` (RFC 5321's MAIL time-out); `0`/`"off"`: never wait"""


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()
    """resolvers for MX lookups: IP addresses, optionally with a port (`"127.0.0.1:5353"`,
    `"[::1]:53"`); a host name is refused at load; empty: the system's resolver"""
    timeout: float = 5.0
    """time-out of one DNS lookup"""


def schedule_text(seconds: float | None) -> str:
    """A replication connector's schedule, the one way the CLI, the API
    (``schedule_text``) and the console write it: ``always (every 15 min)``,
    ``every 3 h``, ``every 20 min``, ``every 30 s``, ``never``."""
    if seconds is None:
        return "never"
    if seconds == REPLICATION_ALWAYS:
        return f"always (every {REPLICATION_ALWAYS / 60:g} min)"
    if seconds % 3600 == 0:
        return f"every {seconds / 3600:g} h"
    if seconds % 60 == 0:
        return f"every {seconds / 60:g} min"
    return f"every {seconds:g} s"


@dataclass(frozen=True)
class ReplicationConnector:
    site: str
    """Directory Replication Connector to this site (directory name)"""
    schedule: float | None = REPLICATION_DEFAULT_SCHEDULE
    """how often it requests updates: `"always"` (every 15 minutes), `"never"`, or a duration; the
    default is Exchange's every 3 hours (Q195918); the labs and `config/*.toml` say `"always"`
    explicitly"""
    server: str | None = None
    """the remote bridgehead's server name (the New dialog's "server name"; informational)"""


@dataclass(frozen=True)
class ReplicationConfig:
    key: str | None = None
    """organisation key that signs directory replication (HMAC-SHA256: any holder can speak for any
    site; only objects homed at the receiving site are protected); prefer `signing_key`"""
    key_env: str | None = "IMSRELAY_ORG_KEY"
    """the environment variable read for `key` when the file does not give it"""
    connectors: tuple[ReplicationConnector, ...] = ()
    startup_delay: float = 300.0
    """the first replication requests go this long after the start"""
    batch_size: int = 500
    """directory objects per replication update message"""
    max_age: float = 7 * 86400.0
    """a replication message older than this is rejected (replay protection)"""
    keep_old_address: bool = True
    """Site Addressing keeps the old primary address as a secondary one (Exchange 5.5 did not:
    `false`)"""
    kcc_interval: float = 3 * 3600.0
    """Check Now (knowledge consistency check) runs this often, and on demand"""
    signing_key: Path | None = None
    """this site's Ed25519 private key (PEM, from `imsrelay replicate keygen`; relative to the
    file): per-site replication keys instead of the organisation key"""
    trusted_keys: tuple[tuple[str, str], ...] = ()
    """the organisation's public keys, every site (this one too), provisioned at set-up: `SiteA =
    "ed25519:…"`; with them a message verifies only with its sender's key and each object needs
    its home site's signature"""
    bridgehead: str | None = None
    """the server of this site that runs the Directory Replication Connectors to other sites (one of
    `[[servers]]`; configured, not elected, as in Exchange 5.5, KB Q182963); left out: the first of
    `[[servers]]`. The site's other servers get remote sites' objects by intra-site replication"""
    intrasite_interval: float | None = None
    """how often each server of a site pulls the changes of the site's other servers by USN, the
    backstop behind the notification they send at every change; left out: Exchange's 300 s + 30 s
    per server (KB Q199354)"""

    @property
    def enabled(self) -> bool:
        return bool(self.resolved_key() or self.signing_key)

    def resolved_key(self) -> str | None:
        return secret_from(self.key, self.key_env)


INTRASITE_BASE = 300.0  # KB Q199354: intra-site replication latency, 300 s + 30 s per server
INTRASITE_PER_SERVER = 30.0


def intrasite_interval(replication: ReplicationConfig, servers: int) -> float:
    """The intra-site backstop: ``replication.intrasite_interval``, else 300 s + 30 s per server."""
    if replication.intrasite_interval is not None:
        return replication.intrasite_interval
    return INTRASITE_BASE + INTRASITE_PER_SERVER * max(servers, 1)


@dataclass(frozen=True)
class AdminConfig:
    listen: str = "127.0.0.1"
    """the admin endpoint's address: an IP address (loopback unless you mean it)"""
    port: int = 0
    """the admin endpoint's port (0: no admin endpoint); a site with an admin port and no token
    refuses to start"""
    token: str | None = None
    """the bearer token every admin request needs (better: `token_env`)"""
    token_env: str | None = "IMSRELAY_ADMIN_TOKEN"
    """the environment variable read for `token` when the file does not give it"""

    def resolved_token(self) -> str | None:
        return secret_from(self.token, self.token_env)


@dataclass(frozen=True)
class ConsoleConfig:
    """``[console]``: the web console of ``serve`` (it talks to this site's admin endpoint)."""

    enabled: bool = False
    """`serve` also runs the web console for this site (needs `admin.port` and a token; log in with
    the admin token)"""
    listen: str = "127.0.0.1"
    """the console's address (an IP address)"""
    port: int = 8080
    """the console's port"""


@dataclass(frozen=True)
class RoutingConfig:
    """``[routing]``: how recipients at address literals (``user@[192.0.2.1]``) are
    treated: ``deliver`` straight to that address, never through MX (RFC 5321 §5.1;
    Postfix's behaviour), or ``refuse`` them (Exim's ``allow_domain_literals = false``).
    A literal naming this site's own address is this site."""

    address_literals: str = "deliver"
    """recipients at an address literal (`user@[192.0.2.1]`, `user@[IPv6:2001:db8::1]`): `deliver`
    straight to that address — never the E-Mail Domain table, smart host or MX (RFC 5321 §5.1;
    Postfix's behaviour) — or `refuse` them (`550 5.7.1` at RCPT, as Exim's
    `allow_domain_literals = false`). A literal of this site's own address is this site; relaying
    to other literals needs `smtp.relay_networks`"""
    least_cost_only: bool = False
    """the MTA's "use least-cost routes only" (KB Q233081; the IMS alone behaved so, Q156063 §3.2.5):
    mail for a site goes only by its cheapest Connected Sites routes (equal-cost ones still share
    the load) and waits for them, never failing over to a dearer route; off (the default): a
    dearer route carries the mail when the cheaper ones fail (KB Q262952)"""


LAB_NETWORKS_DEFAULT = ("127.0.0.0/8",)  # a sealed lab's own networks unless lab.networks says more


@dataclass(frozen=True)
class LabConfig:
    """``[lab]``: a sealed lab (``imsrelay lab`` and the Docker lab write it).  A sealed
    site opens no connection outside ``networks``: next hops, address literals and the
    DNS servers must be inside them; host names and MX are resolved only with the
    lab's own DNS (``[dns] nameservers``), never the system resolver.  ``catch_all``:
    the mailbox (alias) that keeps mail for every domain no route names, "the rest
    of the Internet" (the lab's Internet host).  Unsealed (the default, ``imsrelay
    serve``): real DNS and real next hops."""

    sealed: bool = False
    """a lab: no connection outside `lab.networks` (next hops, address literals, DNS servers),
    names resolved only by `[dns] nameservers` (none: no DNS at all), never the system resolver"""
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
        ipaddress.ip_network(n) for n in LAB_NETWORKS_DEFAULT)
    """the lab's own networks: the only addresses a sealed site connects to"""
    catch_all: str | None = None
    """a sealed lab's mailbox (alias) keeping the mail for every domain no route names: the rest
    of the Internet (the lab's Internet host)"""


@dataclass(frozen=True)
class TrackingConfig:
    """``[tracking]``: message tracking (Exchange 5.5's Message Tracking Center)."""

    enabled: bool = True
    """message tracking in `<data>/tracking.sqlite3` (`imsrelay track`, `/api/v1/tracking`)"""
    days: int = 7
    """tracking events older than this many days are deleted"""
    max_bytes: int = 256 * 1024 * 1024
    """the tracking database's own quota (0: none): beyond it the oldest events go, and the file
    shrinks after deletions; tracking also pauses while free disk is below twice what the queue
    needs to accept a message"""


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    """the lowest level logged"""
    format: str = "auto"
    """`auto` = JSON when stderr is not a terminal, key=value lines on one; `IMSRELAY_LOG_FORMAT`
    overrides it"""


@dataclass(frozen=True)
class AuthConfig:
    """[auth]: SMTP AUTH (RFC 4954) against the mailboxes' accounts in the directory."""

    enabled: bool = True
    """SMTP AUTH (RFC 4954) against the mailboxes' accounts in the directory"""
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    """the SASL mechanisms offered (of `PLAIN`, `LOGIN`)"""
    allow_plaintext: bool = False
    """offer AUTH before STARTTLS on the main port (a lab switch; else `538 5.7.11`); port 587
    always wants STARTTLS first"""
    replicate_credentials: bool = False
    """the organisation lets password hashes replicate with their mailboxes (set it at every site);
    off: a hash stays at its home site"""
    max_failures: int = 5
    """failed AUTH (or IMAP4/POP3) logins for one account from one client address within
    `failure_window` that lock that pair out (`421 4.7.0`); a successful login resets only its
    own pair"""
    failure_window: float = 900.0
    """the window `max_failures` are counted in"""
    lockout: float = 900.0
    """how long a client address stays locked out"""
    failure_delay: float = 1.0
    """each `535` waits this long, doubling per failure, at most 8 s"""
    max_failures_per_address: int = 20
    """failures for any account from one address: the address is locked out, except for accounts
    that logged in from it before (users behind a shared NAT keep working)"""
    max_failures_per_account: int = 20
    """failures for one account from any address: then only addresses it logged in from before may
    try it (`454 4.7.0`)"""
    trusted_for: float = 30 * 86400.0
    """how long a successful login trusts its (account, address) pair"""


@dataclass(frozen=True)
class SubmissionConfig:
    """[submission]: message submission listeners (RFC 6409 port 587, RFC 8314 port 465)."""

    listen: str = ""
    """address of both submission listeners (empty: `smtp.listen`)"""
    port: int | None = None
    """RFC 6409 submission listener (587): STARTTLS, then AUTH before MAIL; needs TLS
    (`smtp.tls_cert` or `smtp.tls_generate`); 0 or unset: off"""
    tls_port: int | None = None
    """RFC 8314 implicit-TLS submission listener (465): AUTH before MAIL; 0 or unset: off"""

    max_connections: int = 30
    """sessions at once on each submission listener (587 and 465 never take port 25's slots, nor
    each other's)"""
    max_connections_per_ip: int = 10
    """sessions at once from one client address on each submission listener"""
    sender_must_match: bool = False
    """on 587/465 only: an authenticated client may send only as its own mailbox's addresses
    (Q262945; the labs set it). `restrictions.sender_must_match` applies to every port"""

IMAP_PORT, IMAPS_PORT, POP3_PORT, POP3S_PORT = 143, 993, 110, 995  # RFC 9051/8314, RFC 1939/8314
ACCESS_PROTOCOLS = ("imap4", "pop3")  # Exchange 5.5's names for the mailbox protocols (Q233081)


@dataclass(frozen=True)
class AccessConfig:
    """[access]: IMAP4rev1 and POP3 for the mailboxes homed on this server (Exchange 5.5's
    IMAP4 and POP3 services), served by Dovecot over the site's Maildirs; logins are
    checked against the directory through imsrelay (``imsrelay.access``).  A port of
    0 turns that listener off."""

    enabled: bool = False
    """serve IMAP4 and POP3 from this server (starts a Dovecot; `imsrelay lab` turns it on). Off
    by default for `serve`: it needs Dovecot installed (`dovecot-imapd`, `dovecot-pop3d`)"""
    listen: str = ""
    """the address the IMAP4/POP3 listeners use (empty: `smtp.listen`)"""
    imap_port: int | None = IMAP_PORT
    """IMAP4 with STARTTLS (0: off)"""
    imaps_port: int | None = IMAPS_PORT
    """IMAP4 over implicit TLS, with the SMTP certificate (0: off)"""
    pop3_port: int | None = POP3_PORT
    """POP3 with STLS (0: off)"""
    pop3s_port: int | None = POP3S_PORT
    """POP3 over implicit TLS (0: off)"""
    imap4: bool | None = None
    """this server's IMAP4 Protocols setting (left out: the site's defaults, replicated in the
    directory); a mailbox can turn a protocol off, never on"""
    pop3: bool | None = None
    """this server's POP3 Protocols setting (left out: the site's defaults)"""
    dovecot: str = "dovecot"
    """the Dovecot binary (a name is looked up in PATH and /usr/sbin)"""
    mail_user: str = "mail"
    """run as root: the user Dovecot's mail processes run as (never root); the Maildirs belong to
    it, and the data directory must be enterable by other users"""

    def server_setting(self, protocol: str) -> bool | None:
        return self.imap4 if protocol == "imap4" else self.pop3


@dataclass(frozen=True)
class RestrictionsConfig:
    """[restrictions]: Routing Restrictions, submission and connection rules, message filtering."""

    relay_authenticated: bool = True
    """Routing Restrictions (Q196626): clients that authenticated may relay"""
    relay_internal_addresses: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """clients that connected to these addresses of the site may relay (with `smtp.relay_networks`:
    the listed client ranges)"""
    never_relay: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """client networks that never relay, whatever else allows it"""
    sender_must_match: bool = False
    """Q262945: an authenticated client may send only as an address of its own mailbox (else `550
    5.7.1`)"""
    accept: str = "all"
    """Accept connections: `all`, `authenticated`, `encrypted`, `authenticated+encrypted` (checked
    at MAIL on the main port: `530 5.7.0`)"""
    accept_hosts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """if set, only these client hosts/networks may connect (checked at connect: others get `554
    5.7.1` instead of the greeting, then only QUIT)"""
    reject_hosts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """client hosts/networks refused at connect (`554 5.7.1`); reject wins over `accept_hosts`"""
    filter_senders: tuple[str, ...] = ()
    """the site's Message Filtering (Q245465): senders or `@domains` whose mail is filtered"""
    filter_action: str = "turf"
    """what happens to filtered mail: `delete`, or `turf` (kept in `turf_dir`); the sender hears
    `250` either way"""
    turf_dir: Path | None = None
    """where filtered mail is kept, relative to the file (unset: `<data>/turf`): `<queue id>.eml`
    (as received) and `.json` (sender, client, recipients, the rule)"""


@dataclass(frozen=True)
class TransferConfig:
    """[transfer]: the Transfer mode of the first start; then the site's state is the truth."""

    mode: str = "inbound-outbound"
    """Transfer mode at the **first** start (`inbound-outbound`, `inbound`, `outbound`, `none`);
    then the directory database holds it (`imsrelay transfer-mode`)"""


@dataclass(frozen=True)
class ConnectionsConfig:
    """[connections]: the Connections tab's Advanced button (outbound side; the inbound
    cap is smtp.max_inbound_connections)."""

    max_outbound: int = 100
    """outbound SMTP connections open at once, to all hosts (idle pooled ones are closed to make
    room)"""
    max_outbound_per_host: int = 20
    """connections (transactions at once) to one next hop"""
    messages_per_connection: int = 0
    """transactions on one connection before it is closed; 0 = no limit"""


@dataclass(frozen=True)
class NotificationsConfig:
    """[notifications]: the Internet Mail tab's administrator mailbox (Q190708)."""

    administrator: str | None = None
    """administrator mailbox (alias here, or an address) of the Internet Mail tab (Q190708)"""
    copy_ndrs: bool = False
    """send the administrator a copy of every NDR (needs `administrator`)"""


LINK_MONITOR_INTERVAL = 15 * 60.0  # Q246674: a ping every 15 minutes (5 for critical links)
LINK_MONITOR_WARNING = 30 * 60.0  # Q246674: warning after 30 minutes without an answer
LINK_MONITOR_ALERT = 60 * 60.0  # Q246674: alert after 60 minutes


@dataclass(frozen=True)
class LinkMonitorConfig:
    """[[link_monitors]]: a Link Monitor (KB Q246674): ping messages to servers of other
    sites (their system attendant answers) or to a foreign address (its NDR answers)."""

    name: str
    """the monitor's name (shown on the console, in metrics and in alert mail)"""
    targets: tuple[str, ...] = ()
    """what to ping: a site name (`SiteB`: its system attendant, `attendant@` its routing
    domain), an `attendant@domain` address (a ping responder), or any other address
    (a foreign system: its NDR is the answer)"""
    interval: float = LINK_MONITOR_INTERVAL
    """polling interval: one ping per target this often"""
    warning_after: float = LINK_MONITOR_WARNING
    """warning state when a ping has waited this long for its answer (or the last round trip took longer)"""
    alert_after: float = LINK_MONITOR_ALERT
    """alert state (and mail to `notify`) after this long; back to up mails again"""
    notify: str | None = None
    """who gets the alert and recovery mail: an alias here or an address (left out:
    `notifications.administrator`; neither: no mail)"""
INTERNET_MAIL_DEFAULT = "*"  # the [[internet_mail]] entry for every domain not listed (Exchange's "Default")


@dataclass(frozen=True)
class InternetMailDomain:
    """The IMS Internet Mail tab's "Specify by E-Mail Domain" (Q262126, Q176161): what may be sent
    to one remote domain. A key left out takes the `*` entry's value, then the default."""

    domain: str
    """the remote domain (and its sub-domains; `#domain`: that domain only); `*` is the entry for
    every other domain (Exchange's "Default")"""
    out_of_office: bool | None = None
    """send out-of-office replies to the domain (`false`: "Disable out of office responses to the
    Internet"; such a reply is discarded without an NDR, as the IMS did); default true"""
    auto_replies: bool | None = None
    """send automatic replies to the domain (`false`: "Disable automatic replies to the Internet";
    discarded without an NDR); default true"""
    auto_forwards: bool | None = None
    """send automatically forwarded messages to the domain (left out: as `auto_replies`, since in
    Exchange 5.5 that check box disables automatic forwards too, Q176161)"""
    display_names: bool | None = None
    """send display names (`false`: "Disable sending display names to the Internet": the `From:`,
    `To:` and `Cc:` fields carry bare addresses); default true"""
    max_message_size: int | None = None
    """the largest message in bytes sent to the domain, then an NDR `5.3.4` (0: no limit); default
    no limit"""


@dataclass(frozen=True)
class JournalingConfig:
    """[journaling]: Message Journaling at site level (Exchange 5.5 SP1, KB Q239427)."""

    recipient: str | None = None
    """the journal recipient (an alias of a mailbox here, or an address): it receives one copy of
    every message accepted at this site, once per message, wrapped with its envelope (sender and
    recipients). Unset: no journaling"""
    reports: bool = True
    """journal the reports this site writes (NDRs, delay notices) too; replication mail and journal
    copies are never journaled"""


@dataclass(frozen=True)
class EtrnRequest:
    host: str
    """issue ETRN to this host (`host` or `host:port`) on a schedule (the dial-up side)"""
    port: int = SMTP_PORT
    """the port of `host`"""
    domain: str = ""
    """the domain named in `ETRN domain`"""
    schedule: float = 3600.0
    """how often the ETRN is issued"""


@dataclass(frozen=True)
class EtrnConfig:
    """[etrn]: who may ask this site to start delivery (RFC 1985), and whom it asks."""

    allowed_hosts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """networks that may issue ETRN here (empty: ETRN refused with 459, or 502 when ETRN is unused)"""
    requests: tuple[EtrnRequest, ...] = ()


@dataclass(frozen=True)
class DiagnosticsConfig:
    """[diagnostics]: Diagnostics Logging levels per category (Q146669) and the
    per-session SMTP protocol log."""

    levels: tuple[tuple[str, str], ...] = ()  # (category, level) for categories set explicitly
    protocol_log_max_bytes: int = 10 * 1024 * 1024
    """the SMTP protocol log is rotated at this size"""
    protocol_log_files: int = 5
    """rotated protocol log files kept"""

    def level(self, category: str, default: str) -> str:
        return dict(self.levels).get(category, default)

    @property
    def protocol_log_enabled(self) -> bool:
        """The SMTP protocol log is written: its level is set and is not ``none``."""
        return self.level(PROTOCOL_LOG_CATEGORY, PROTOCOL_LOG_DEFAULT) != "none"

    def access_log_enabled(self, protocol: str) -> bool:
        """The IMAP4 (``imap4``) or POP3 (``pop3``) protocol log is written."""
        return self.level(f"{protocol}_protocol_log", PROTOCOL_LOG_DEFAULT) != "none"


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: PerfMon counters as Prometheus metrics on the admin endpoint."""

    enabled: bool = True
    """`GET /metrics` on the admin endpoint: PerfMon counters as Prometheus metrics"""
    require_token: bool = False
    """`/metrics` needs the admin token"""


def default_priorities() -> PriorityTimeouts:
    return PriorityTimeouts(Timeouts(DEFAULT_URGENT_LIFETIME, None), Timeouts(DEFAULT_LIFETIME, None),
                            Timeouts(DEFAULT_NON_URGENT_LIFETIME, None))


@dataclass(frozen=True)
class SiteConfig:
    path: Path
    organisation: str
    """organisation name (ExchangeORG)"""
    site: str
    """the site's directory name (exact, e.g. `SiteA`)"""
    server: str
    """server (NetBIOS) name, e.g. `ServerA`; the SMTP host name is `server.email_domain`"""
    site_domain: str
    """site e-mail domain given at IMS install (`SiteA.microsoft.com`)"""
    company_domain: str
    """the organisation's shared domain (`microsoft.com`); left out: `email_domain`"""
    data_dir: Path
    """data directory, relative to the config file (left out: `data/<name>`); `serve --data`
    overrides it"""
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    mailboxes: tuple[MailboxConfig, ...] = ()
    custom_recipients: tuple[CustomRecipientConfig, ...] = ()
    """custom recipients created here (`[[custom_recipients]]`, KB Q258203)"""
    distribution_lists: tuple[DistributionListConfig, ...] = ()
    """distribution lists created here (`[[distribution_lists]]`, KB Q185194)"""
    servers: tuple[SiteServer, ...] = ()
    """the site's servers, this one (`site.server`) included; left out: this server alone"""
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    connected_sites: tuple[ConnectedSite, ...] = ()
    email_domains: tuple[DomainRoute, ...] = ()
    internet_mail: tuple[InternetMailDomain, ...] = ()
    """the Internet Mail tab's settings by E-Mail Domain (`[[internet_mail]]`)"""
    journaling: JournalingConfig = field(default_factory=JournalingConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    connections: ConnectionsConfig = field(default_factory=ConnectionsConfig)
    priorities: PriorityTimeouts = field(default_factory=default_priorities)  # normal: delivery.lifetime
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    etrn: EtrnConfig = field(default_factory=EtrnConfig)
    link_monitors: tuple[LinkMonitorConfig, ...] = ()
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    restrictions: RestrictionsConfig = field(default_factory=RestrictionsConfig)
    lab: LabConfig = field(default_factory=LabConfig)

    @property
    def turf_dir(self) -> Path:
        """Where Message Filtering keeps filtered mail (``restrictions.turf_dir``)."""
        return self.restrictions.turf_dir or self.data_dir / "turf"

    @property
    def hostname(self) -> str:
        """The FQDN this site's server greets with (``ServerA.SiteA.microsoft.com``)."""
        return self.smtp.hostname or f"{self.server}.{self.site_domain}"

    @property
    def site_address(self) -> str:
        """The site-default SMTP address installed with IMS: ``@SiteA.microsoft.com``."""
        return "@" + self.site_domain

    @property
    def peer_servers(self) -> tuple[SiteServer, ...]:
        """The site's other servers (``[[servers]]`` but this one)."""
        return tuple(s for s in self.servers if s.name.lower() != self.server.lower())

    def home_server_for(self, named: str | None) -> str:
        """The home server of a mailbox provisioned or created here: the one named (as
        ``[[servers]]`` spells it), else this server on a site of several servers ("" on a
        site of one server)."""
        if named:
            return next((s.name for s in self.servers if s.name.lower() == named.lower()), named)
        return self.server if self.servers else ""

    def provisioned_mailboxes(self) -> list[tuple[str, str, tuple[str, ...], str]]:
        """``[[mailboxes]]`` as the directory provisions them: alias, display name, extra
        addresses, home server."""
        return [(m.alias, m.display_name, m.extra_addresses, self.home_server_for(m.home_server))
                for m in self.mailboxes]

    @property
    def bridgehead(self) -> bool:
        """Whether this server runs the site's Directory Replication Connectors: a site of one
        server, or the server ``replication.bridgehead`` names (else the first of ``[[servers]]``)."""
        if not self.servers:
            return True
        named = self.replication.bridgehead or self.servers[0].name
        return named.lower() == self.server.lower()


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``"15m"``, ``"2d"``, ``"500ms"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration, e.g. 30, \"15m\", \"2d\"")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        try:
            return float(value)
        except OverflowError:  # an int such as 10**400
            raise ValueError("the duration is too large") from None
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration (e.g. 30, \"15m\", \"4h\", \"2d\")")


# The keys of a site file that are no field of the dataclasses above (the configuration
# reference, imsrelay.config.reference, takes every other key's default and meaning from
# its field): key -> (default, meaning).
KEY_DOCS: dict[str, tuple[Any, str]] = {
    "diagnostics.imap4_protocol_log": (DefaultText("`none`"), "IMAP4 protocol logging (`none`, `minimum`, "
                                       "`medium`, `maximum`): each session's traffic under "
                                       "`<data>/logs/imap4/<alias>/`"),
    "diagnostics.pop3_protocol_log": (DefaultText("`none`"), "POP3 protocol logging, as `imap4_protocol_log`, "
                                      "under `<data>/logs/pop3/<alias>/`"),
    "smtp.max_queued_messages": (DefaultText("—"), "the older name of `queue.refuse_at` (still read; give only "
                                 "one of them)"),
    "priorities.urgent_lifetime": (DEFAULT_URGENT_LIFETIME, "Time-out of urgent messages (IMS Time-outs "
                                   "button, Q184051): then the NDR; normal ones use `delivery.lifetime`"),
    "priorities.urgent_delay_notice": (DefaultText("`delivery.delay_notice`"), "delay-notice time of urgent "
                                       "messages (`\"never\"` = none)"),
    "priorities.non_urgent_lifetime": (DEFAULT_NON_URGENT_LIFETIME, "Time-out of non-urgent messages"),
    "priorities.non_urgent_delay_notice": (DefaultText("`delivery.delay_notice`"), "delay-notice time of "
                                           "non-urgent messages (`\"never\"` = none)"),
    **{f"diagnostics.{category}": (DefaultText("from `logging.level`"),
                                   f"Diagnostics Logging level (Q146669) of the `{category}` events: `none` = "
                                   "errors only, `minimum` = warnings, `medium` = info, `maximum` = debug; "
                                   "docs/events.md says which events are in which category")
       for category in EVENT_CATEGORIES},
    f"diagnostics.{PROTOCOL_LOG_CATEGORY}": (PROTOCOL_LOG_DEFAULT, "any level but `none` writes the per-session "
                                             "SMTP protocol log, `<data>/logs/smtp-protocol.log`: every command "
                                             "and reply, both directions, without message content or AUTH lines"),
}
