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
DIAGNOSTIC_CATEGORIES = (*EVENT_CATEGORIES, PROTOCOL_LOG_CATEGORY)
DIAGNOSTIC_LEVELS = ("none", "minimum", "medium", "maximum")
DEFAULT_BANNER = "Microsoft Exchange Internet Mail Service 5.5 (imsrelay)"
ADDRESS_LITERAL_POLICIES = ("deliver", "refuse")

def secret_from(value: str | None, env: str | None) -> str | None:
    """A secret given in the file, else in the environment variable named ``env``."""
    if value:
        return value
    if env:
        return os.environ.get(env) or None
    return None


@dataclass(frozen=True)
class MailboxConfig:
    alias: str
    display_name: str
    extra_addresses: tuple[str, ...] = ()  # additional proxy addresses, "smtp:x@y"
    password_hash: str | None = None  # scrypt hash set when the mailbox has no password yet


@dataclass(frozen=True)
class ConnectedSite:
    """Connected Sites tab: a remote site by directory name and its routing address."""

    name: str
    routing_address: str  # "@SiteB.microsoft.com" (type SMTP)
    cost: int = 1
    host: str | None = None  # this route's next hop, instead of the E-Mail Domain table (a dearer route via another site)
    port: int = SMTP_PORT

    @property
    def routing_domain(self) -> str:
        return self.routing_address.lstrip("@")


@dataclass(frozen=True)
class DomainRoute:
    """E-Mail Domain table: "forward all messages for this domain to host"."""

    domain: str  # "SiteB.microsoft.com", or "#exact.example" for an exact match only
    host: str
    port: int = SMTP_PORT
    starttls: str | None = None  # None = the delivery default
    etrn: bool = False  # hold the domain's mail until the peer issues ETRN (RFC 1985)


@dataclass(frozen=True)
class TlsPolicy:
    domain: str
    starttls: str  # "none" | "opportunistic" | "require" | "verify"


@dataclass(frozen=True)
class SmtpConfig:
    listen: str = "127.0.0.1"
    port: int = 2525
    hostname: str = ""
    max_message_size: int = 10 * 1024 * 1024
    max_hops: int = 15
    max_recipients: int = 100
    relay_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    accepted_domains: tuple[str, ...] = ()
    idle_timeout: float = 300.0
    session_timeout: float = 1800.0
    max_errors: int = 20
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_generate: bool = False  # no tls_cert: make a throwaway CA + certificate in <data_dir>/tls
    workers: int = 1  # processes sharing the port (SO_REUSEPORT), each with its own queue journal
    queue_minfree: int = 0  # bytes the queue's file system keeps free, besides 1.5 x the message
    max_inbound_connections: int = 30  # Exchange 5.5 IMS's default; 421 4.7.0 at connect beyond it
    max_connections_per_ip: int = 10  # per client IP; relay_networks are exempt (as Postfix's mynetworks)
    # a client must say HELO/EHLO (and finish a TLS handshake on 465) within this; then idle_timeout applies
    handshake_timeout: float = 30.0
    # a full listener closes a session idle this long (or one with failed commands) to admit a new client
    busy_idle_timeout: float = 10.0
    bare_newline: str = "normalize"  # normalize (bare LF -> CRLF) | reject (521 5.5.2, as Postfix)
    postmaster: str = "Administrator"  # the mailbox that receives postmaster@ (RFC 5321 4.5.1)
    banner: str = DEFAULT_BANNER  # the greeting after "220 hostname" (Postfix's smtpd_banner)


@dataclass(frozen=True)
class DeliveryConfig:
    retry_intervals: tuple[float, ...] = DEFAULT_RETRY_INTERVALS
    lifetime: float = DEFAULT_LIFETIME
    delay_notice: float | None = None
    smart_host: str | None = None
    smart_host_port: int = SMTP_PORT
    starttls: str = "opportunistic"
    tls_policies: tuple[TlsPolicy, ...] = ()
    max_per_destination: int = 20  # Postfix's default_destination_concurrency_limit
    max_deliveries: int = 100
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout_per_mib: float = 60.0
    connection_idle: float = 30.0
    mx_port: int = SMTP_PORT  # port for next hops found by DNS MX (tests and labs use another)
    max_active_messages: int = 2000  # attempts under way or waiting for a slot (Postfix's active queue)
    smart_host_starttls: str | None = None  # TLS level for the smart host (None: as for the domain)
    tls_ca_file: Path | None = None  # CA bundle for starttls = "verify" (None: the system's)


@dataclass(frozen=True)
class QueueConfig:
    """[queue]: backpressure when acceptance outruns delivery (imsrelay.policy.backpressure)."""

    backpressure_at: int = 50  # messages waiting for their first attempt: MAIL FROM waits for delivery
    refuse_at: int = 50_000  # messages queued (deferred too): MAIL FROM gets 452 4.3.1
    max_delay: float = 1.0  # seconds MAIL FROM waits at most (Postfix's in_flow_delay); 0 = never waits


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()
    timeout: float = 5.0


@dataclass(frozen=True)
class ReplicationConnector:
    site: str
    schedule: float | None = REPLICATION_DEFAULT_SCHEDULE  # seconds between requests; None = never


@dataclass(frozen=True)
class ReplicationConfig:
    key: str | None = None
    key_env: str | None = "IMSRELAY_ORG_KEY"
    connectors: tuple[ReplicationConnector, ...] = ()
    startup_delay: float = 300.0
    batch_size: int = 500
    max_age: float = 7 * 86400.0
    keep_old_address: bool = True
    kcc_interval: float = 3 * 3600.0
    signing_key: Path | None = None  # this site's Ed25519 private key (PEM): per-site replication keys
    trusted_keys: tuple[tuple[str, str], ...] = ()  # (site, "ed25519:<base64>") of every site, itself included

    @property
    def enabled(self) -> bool:
        return bool(self.resolved_key() or self.signing_key)

    def resolved_key(self) -> str | None:
        return secret_from(self.key, self.key_env)


@dataclass(frozen=True)
class AdminConfig:
    listen: str = "127.0.0.1"
    port: int = 0  # 0 = disabled
    token: str | None = None
    token_env: str | None = "IMSRELAY_ADMIN_TOKEN"

    def resolved_token(self) -> str | None:
        return secret_from(self.token, self.token_env)


@dataclass(frozen=True)
class ConsoleConfig:
    """``[console]``: the web console of ``serve`` (it talks to this site's admin endpoint)."""

    enabled: bool = False
    listen: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True)
class RoutingConfig:
    """``[routing]``: how recipients at address literals (``user@[192.0.2.1]``) are
    treated: ``deliver`` straight to that address, never through MX (RFC 5321 §5.1;
    Postfix's behaviour), or ``refuse`` them (Exim's ``allow_domain_literals = false``).
    A literal naming this site's own address is this site."""

    address_literals: str = "deliver"


@dataclass(frozen=True)
class TrackingConfig:
    """``[tracking]``: message tracking (Exchange 5.5's Message Tracking Center)."""

    enabled: bool = True
    days: int = 7  # events older than this are deleted
    max_bytes: int = 256 * 1024 * 1024  # the database's own quota: beyond it the oldest events go (0 = none)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"  # auto | json | console


@dataclass(frozen=True)
class AuthConfig:
    """[auth]: SMTP AUTH (RFC 4954) against the mailboxes' accounts in the directory."""

    enabled: bool = True
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    allow_plaintext: bool = False  # offer AUTH before STARTTLS on the main port (a lab switch)
    replicate_credentials: bool = False  # the organisation lets password hashes replicate
    max_failures: int = 5  # failures for one account from one address in failure_window: locked out (421)
    failure_window: float = 900.0
    lockout: float = 900.0
    failure_delay: float = 1.0
    # any account from one address: locked out, except account/address pairs that logged in before
    max_failures_per_address: int = 20
    # one account from any address: then only addresses it logged in from may try it (454 4.7.0)
    max_failures_per_account: int = 20
    trusted_for: float = 30 * 86400.0  # a successful login trusts its (account, address) this long


@dataclass(frozen=True)
class SubmissionConfig:
    """[submission]: message submission listeners (RFC 6409 port 587, RFC 8314 port 465)."""

    listen: str = ""  # "" = smtp.listen
    port: int | None = None  # STARTTLS then AUTH before MAIL; None = off
    tls_port: int | None = None  # implicit TLS, AUTH before MAIL; None = off
    # each submission listener's own caps (587 and 465 never take the SMTP port's slots, nor each other's)
    max_connections: int = 30
    max_connections_per_ip: int = 10
    # on 587/465 only: an authenticated client sends only as its own mailbox's addresses (Q262945);
    # restrictions.sender_must_match (off by default, as Exchange 5.5) applies to every port
    sender_must_match: bool = False


@dataclass(frozen=True)
class RestrictionsConfig:
    """[restrictions]: Routing Restrictions, submission and connection rules, message filtering."""

    relay_authenticated: bool = True
    relay_internal_addresses: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    never_relay: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    sender_must_match: bool = False
    accept: str = "all"
    accept_hosts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    reject_hosts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    filter_senders: tuple[str, ...] = ()
    filter_action: str = "turf"
    turf_dir: Path | None = None  # None = <data_dir>/turf


@dataclass(frozen=True)
class TransferConfig:
    """[transfer]: the Transfer mode of the first start; then the site's state is the truth."""

    mode: str = "inbound-outbound"


@dataclass(frozen=True)
class ConnectionsConfig:
    """[connections]: the Connections tab's Advanced button (outbound side; the inbound
    cap is smtp.max_inbound_connections)."""

    max_outbound: int = 100  # SMTP connections open at once, to all hosts
    max_outbound_per_host: int = 20  # to one next hop (address, port)
    messages_per_connection: int = 0  # transactions before a connection is closed; 0 = no limit


@dataclass(frozen=True)
class NotificationsConfig:
    """[notifications]: the Internet Mail tab's administrator mailbox (Q190708)."""

    administrator: str | None = None  # mailbox alias here, or an address
    copy_ndrs: bool = False


@dataclass(frozen=True)
class EtrnRequest:
    host: str
    port: int = SMTP_PORT
    domain: str = ""
    schedule: float = 3600.0


@dataclass(frozen=True)
class EtrnConfig:
    """[etrn]: who may ask this site to start delivery (RFC 1985), and whom it asks."""

    allowed_hosts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    requests: tuple[EtrnRequest, ...] = ()


@dataclass(frozen=True)
class DiagnosticsConfig:
    """[diagnostics]: Diagnostics Logging levels per category (Q146669) and the
    per-session SMTP protocol log."""

    levels: tuple[tuple[str, str], ...] = ()  # (category, level) for categories set explicitly
    protocol_log_max_bytes: int = 10 * 1024 * 1024
    protocol_log_files: int = 5

    def level(self, category: str, default: str) -> str:
        return dict(self.levels).get(category, default)

    @property
    def protocol_log_enabled(self) -> bool:
        """The SMTP protocol log is written: its level is set and is not ``none``."""
        return self.level(PROTOCOL_LOG_CATEGORY, PROTOCOL_LOG_DEFAULT) != "none"


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: PerfMon counters as Prometheus metrics on the admin endpoint."""

    enabled: bool = True
    require_token: bool = False


def default_priorities() -> PriorityTimeouts:
    return PriorityTimeouts(Timeouts(DEFAULT_URGENT_LIFETIME, None), Timeouts(DEFAULT_LIFETIME, None),
                            Timeouts(DEFAULT_NON_URGENT_LIFETIME, None))


@dataclass(frozen=True)
class SiteConfig:
    path: Path
    organisation: str
    site: str
    server: str
    site_domain: str
    company_domain: str
    data_dir: Path
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    mailboxes: tuple[MailboxConfig, ...] = ()
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    connected_sites: tuple[ConnectedSite, ...] = ()
    email_domains: tuple[DomainRoute, ...] = ()
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    connections: ConnectionsConfig = field(default_factory=ConnectionsConfig)
    priorities: PriorityTimeouts = field(default_factory=default_priorities)  # normal: delivery.lifetime
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    etrn: EtrnConfig = field(default_factory=EtrnConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    restrictions: RestrictionsConfig = field(default_factory=RestrictionsConfig)

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
