"""A site's settings as frozen values (no I/O): what ``imsrelay.config`` loads
from the site's TOML file.  Each default is written once, here."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

# Exchange 5.5 IMC retry intervals: .25, .5, 1, 4 hours (the last one repeats).
DEFAULT_RETRY_INTERVALS = (900.0, 1800.0, 3600.0, 14400.0)
DEFAULT_LIFETIME = 2 * 86400.0
REPLICATION_ALWAYS = 15 * 60.0
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


@dataclass(frozen=True)
class ConnectedSite:
    """Connected Sites tab: a remote site by directory name and its routing address."""

    name: str
    routing_address: str  # "@SiteB.microsoft.com" (type SMTP)
    cost: int = 1

    @property
    def routing_domain(self) -> str:
        return self.routing_address.lstrip("@")


@dataclass(frozen=True)
class DomainRoute:
    """E-Mail Domain table: "forward all messages for this domain to host"."""

    domain: str  # "SiteB.microsoft.com", or "#exact.example" for an exact match only
    host: str
    port: int = 25
    starttls: str | None = None  # None = the delivery default


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
    workers: int = 1  # processes sharing the port (SO_REUSEPORT), each with its own queue journal
    queue_minfree: int = 0  # bytes the queue's file system keeps free, besides 1.5 x the message
    max_inbound_connections: int = 30  # Exchange 5.5 IMS's default; 421 4.7.0 at connect beyond it
    max_connections_per_ip: int = 10  # per client IP; relay_networks are exempt (as Postfix's mynetworks)
    bare_newline: str = "normalize"  # normalize (bare LF -> CRLF) | reject (521 5.5.2, as Postfix)
    postmaster: str = "Administrator"  # the mailbox that receives postmaster@ (RFC 5321 4.5.1)
    max_queued_messages: int = 50_000  # beyond this many queued, MAIL gets 452 4.3.1 (backpressure)
    banner: str = DEFAULT_BANNER  # the greeting after "220 hostname" (Postfix's smtpd_banner)


@dataclass(frozen=True)
class DeliveryConfig:
    retry_intervals: tuple[float, ...] = DEFAULT_RETRY_INTERVALS
    lifetime: float = DEFAULT_LIFETIME
    delay_notice: float | None = None
    smart_host: str | None = None
    smart_host_port: int = 25
    starttls: str = "opportunistic"
    tls_policies: tuple[TlsPolicy, ...] = ()
    max_per_destination: int = 20  # Postfix's default_destination_concurrency_limit
    max_deliveries: int = 100
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout_per_mib: float = 60.0
    connection_idle: float = 30.0
    mx_port: int = 25  # port for next hops found by DNS MX (tests and labs use another)
    max_active_messages: int = 2000  # attempts under way or waiting for a slot (Postfix's active queue)
    smart_host_starttls: str | None = None  # TLS level for the smart host (None: as for the domain)
    tls_ca_file: Path | None = None  # CA bundle for starttls = "verify" (None: the system's)


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()
    timeout: float = 5.0


@dataclass(frozen=True)
class ReplicationConnector:
    site: str
    schedule: float | None = REPLICATION_ALWAYS  # seconds between requests; None = never


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


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"  # auto | json | console


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
    dns: DnsConfig = field(default_factory=DnsConfig)
    connected_sites: tuple[ConnectedSite, ...] = ()
    email_domains: tuple[DomainRoute, ...] = ()
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)

    @property
    def hostname(self) -> str:
        """The FQDN this site's server greets with (``ServerA.SiteA.microsoft.com``)."""
        return self.smtp.hostname or f"{self.server}.{self.site_domain}"

    @property
    def site_address(self) -> str:
        """The site-default SMTP address installed with IMS: ``@SiteA.microsoft.com``."""
        return "@" + self.site_domain
