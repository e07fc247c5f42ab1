"""Site configuration: one TOML file per site, loaded into frozen dataclasses.

Every error a user can make names the file and the key (``ConfigError``); nothing
here raises a bare traceback for bad input.  The file is the single source of truth
for *static* set-up (listen address, limits, routing tables, connectors); the
directory database is the truth for mailboxes and site addressing once provisioned.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from imsrelay.addresses import AddressError, normalise_domain, parse_address

# Exchange 5.5 IMC retry intervals: .25, .5, 1, 4 hours (the last one repeats).
DEFAULT_RETRY_INTERVALS = (900.0, 1800.0, 3600.0, 14400.0)
DEFAULT_LIFETIME = 2 * 86400.0
REPLICATION_ALWAYS = 15 * 60.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class ConfigError(Exception):
    """A problem in a configuration file, naming the file and the key."""

    def __init__(self, path: Path | str, key: str, message: str) -> None:
        self.path = str(path)
        self.key = key
        self.message = message
        super().__init__(f"{self.path}: {key}: {message}")


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``"15m"``, ``"2d"``, ``"500ms"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration, e.g. 30, \"15m\", \"2d\"")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration (e.g. 30, \"15m\", \"4h\", \"2d\")")


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
    starttls: str  # "none" | "opportunistic" | "require"


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

    def resolved_key(self) -> str | None:
        if self.key:
            return self.key
        if self.key_env:
            return os.environ.get(self.key_env) or None
        return None


@dataclass(frozen=True)
class AdminConfig:
    listen: str = "127.0.0.1"
    port: int = 0  # 0 = disabled
    token: str | None = None
    token_env: str | None = "IMSRELAY_ADMIN_TOKEN"

    def resolved_token(self) -> str | None:
        if self.token:
            return self.token
        if self.token_env:
            return os.environ.get(self.token_env) or None
        return None


@dataclass(frozen=True)
class ConsoleConfig:
    """``[console]``: the web console of ``serve`` (it talks to this site's admin endpoint)."""

    enabled: bool = False
    listen: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True)
class TrackingConfig:
    """``[tracking]``: message tracking (Exchange 5.5's Message Tracking Center)."""
    enabled: bool = True
    days: float = 7.0  # events older than this are deleted


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
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def hostname(self) -> str:
        """The FQDN this site's server greets with (``ServerA.SiteA.microsoft.com``)."""
        return self.smtp.hostname or f"{self.server}.{self.site_domain}"

    @property
    def site_address(self) -> str:
        """The site-default SMTP address installed with IMS: ``@SiteA.microsoft.com``."""
        return "@" + self.site_domain

    def with_data_dir(self, data_dir: Path) -> SiteConfig:
        return replace(self, data_dir=data_dir)


# --------------------------------------------------------------------------- loading


class _Section:
    """Typed access to one TOML table; every error names file and dotted key."""

    def __init__(self, path: Path, prefix: str, table: Mapping[str, Any]) -> None:
        self.path = path
        self.prefix = prefix
        self.table = table
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), message)

    def _get(self, name: str, required: bool) -> Any:
        self.used.add(name)
        if name not in self.table:
            if required:
                raise self.error(name, "is required but missing")
            return None
        return self.table[name]

    def str(self, name: str, default: str | None = None, *, required: bool = False) -> Any:
        value = self._get(name, required)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, not {type(value).__name__}")
        if required and not value.strip():
            raise self.error(name, "must not be empty")
        return value

    def int(self, name: str, default: int, *, minimum: int | None = 0, maximum: int | None = None) -> int:
        value = self._get(name, False)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be a whole number, not {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            raise self.error(name, f"must be at most {maximum}, not {value}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        value = self._get(name, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, not {value!r}")
        return value

    def duration(self, name: str, default: float | None) -> float | None:
        value = self._get(name, False)
        if value is None:
            return default
        if value in ("", "never", "off"):
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.error(name, str(exc)) from None

    def list(self, name: str) -> list[Any]:
        value = self._get(name, False)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(name, f"must be a list, not {type(value).__name__}")
        return value

    def table_of(self, name: str) -> _Section:
        value = self._get(name, False)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.error(name, "must be a table")
        return _Section(self.path, self.key(name), value)

    def tables(self, name: str) -> list[_Section]:
        result = []
        for i, item in enumerate(self.list(name)):
            if not isinstance(item, dict):
                raise ConfigError(self.path, f"{self.key(name)}[{i}]", "must be a table")
            result.append(_Section(self.path, f"{self.key(name)}[{i}]", item))
        return result

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(unknown[0], "is not a known setting (check the spelling)")


def _domain(section: _Section, name: str, value: str) -> str:
    """Validate a domain; keep its letter case for display (matching ignores case)."""
    bare = value.lstrip("#").strip().rstrip(".")
    try:
        normalised = normalise_domain(bare)
    except AddressError as exc:
        raise section.error(name, str(exc)) from None
    return bare if bare.isascii() else normalised


def _starttls(section: _Section, name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if value not in ("none", "opportunistic", "require"):
        raise section.error(name, "must be one of none, opportunistic, require")
    return value


def _host_port(section: _Section, name: str, value: str, default_port: int) -> tuple[str, int]:
    host, port = value, default_port
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:]) if rest[1:].isdigit() else -1
    elif value.count(":") == 1:
        host, _, p = value.partition(":")
        port = int(p) if p.isdigit() else -1
    if not host or not 0 < port < 65536:
        raise section.error(name, f"{value!r} is not host or host:port")
    return host, port


def _load_smtp(s: _Section, config_dir: Path) -> SmtpConfig:
    networks = []
    for i, net in enumerate(s.list("relay_networks")):
        try:
            networks.append(ipaddress.ip_network(str(net), strict=False))
        except ValueError:
            raise ConfigError(s.path, f"{s.key('relay_networks')}[{i}]", f"{net!r} is not an IP network") from None
    accepted = tuple(
        ("#" if str(d).startswith("#") else "") + _domain(s, "accepted_domains", str(d))
        for d in s.list("accepted_domains")
    )
    cert = s.str("tls_cert")
    key = s.str("tls_key")
    if bool(cert) != bool(key):
        raise s.error("tls_key" if cert else "tls_cert", "tls_cert and tls_key go together")
    cfg = SmtpConfig(
        listen=s.str("listen", "127.0.0.1"),
        port=s.int("port", 2525, minimum=0, maximum=65535),
        hostname=s.str("hostname", ""),
        max_message_size=s.int("max_message_size", 10 * 1024 * 1024, minimum=1024),
        max_hops=s.int("max_hops", 15, minimum=1),
        max_recipients=s.int("max_recipients", 100, minimum=1),
        relay_networks=tuple(networks),
        accepted_domains=accepted,
        idle_timeout=s.duration("idle_timeout", 300.0) or 300.0,
        session_timeout=s.duration("session_timeout", 1800.0) or 1800.0,
        max_errors=s.int("max_errors", 20, minimum=1),
        tls_cert=(config_dir / cert) if cert else None,
        tls_key=(config_dir / key) if key else None,
        workers=s.int("workers", 1, minimum=1, maximum=64),
        queue_minfree=s.int("queue_minfree", 0, minimum=0),
    )
    s.reject_unknown()
    return cfg


def _load_delivery(s: _Section) -> DeliveryConfig:
    intervals = []
    for i, value in enumerate(s.list("retry_intervals")):
        try:
            intervals.append(parse_duration(value))
        except ValueError as exc:
            raise ConfigError(s.path, f"{s.key('retry_intervals')}[{i}]", str(exc)) from None
    smart = s.str("smart_host")
    smart_host, smart_port = (None, 25)
    if smart:
        smart_host, smart_port = _host_port(s, "smart_host", smart, 25)
    policies = []
    for t in s.tables("tls"):
        policies.append(TlsPolicy(_domain(t, "domain", t.str("domain", required=True)),
                                  _starttls(t, "starttls", t.str("starttls", required=True)) or "opportunistic"))
        t.reject_unknown()
    cfg = DeliveryConfig(
        retry_intervals=tuple(intervals) or DEFAULT_RETRY_INTERVALS,
        lifetime=s.duration("lifetime", DEFAULT_LIFETIME) or DEFAULT_LIFETIME,
        delay_notice=s.duration("delay_notice", None),
        smart_host=smart_host,
        smart_host_port=smart_port,
        starttls=_starttls(s, "starttls", s.str("starttls", "opportunistic")) or "opportunistic",
        tls_policies=tuple(policies),
        max_per_destination=s.int("max_per_destination", 20, minimum=1),
        max_deliveries=s.int("max_deliveries", 100, minimum=1),
        connect_timeout=s.duration("connect_timeout", 30.0) or 30.0,
        command_timeout=s.duration("command_timeout", 300.0) or 300.0,
        data_timeout_per_mib=s.duration("data_timeout_per_mib", 60.0) or 60.0,
        connection_idle=s.duration("connection_idle", 30.0) or 30.0,
        mx_port=s.int("mx_port", 25, minimum=1, maximum=65535),
    )
    s.reject_unknown()
    return cfg


def load_config(path: Path | str, *, data_dir: Path | None = None) -> SiteConfig:
    """Load and validate one site's TOML file; raise ``ConfigError`` on any problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, "(file)", "no such file") from None
    except OSError as exc:
        raise ConfigError(path, "(file)", exc.strerror or str(exc)) from None
    except UnicodeDecodeError:
        raise ConfigError(path, "(file)", "is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "(syntax)", str(exc)) from None
    return config_from_mapping(raw, path, data_dir=data_dir)


def config_from_mapping(raw: Mapping[str, Any], path: Path, *, data_dir: Path | None = None) -> SiteConfig:
    root = _Section(path, "", raw)
    config_dir = path.parent
    site = root.table_of("site")
    organisation = site.str("organisation", required=True)
    name = site.str("name", required=True)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise site.error("name", f"{name!r} is not a site directory name (letters, digits, - _ .)")
    server = site.str("server", required=True)
    site_domain = _domain(site, "email_domain", site.str("email_domain", required=True))
    company_domain = _domain(site, "company_domain", site.str("company_domain", site_domain))
    data = site.str("data_dir", f"data/{name}")
    site.reject_unknown()

    smtp = _load_smtp(root.table_of("smtp"), config_dir)

    mailboxes = []
    seen: set[str] = set()
    for m in root.tables("mailboxes"):
        alias = m.str("alias", required=True)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", alias):
            raise m.error("alias", f"{alias!r} is not a valid alias (letters, digits, . _ -)")
        if alias.lower() in seen:
            raise m.error("alias", f"{alias!r} is listed twice")
        seen.add(alias.lower())
        extra = []
        for i, addr in enumerate(m.list("addresses")):
            try:
                parse_address(str(addr).split(":", 1)[-1])
            except AddressError as exc:
                raise ConfigError(path, f"{m.key('addresses')}[{i}]", str(exc)) from None
            extra.append(str(addr) if ":" in str(addr) else f"smtp:{addr}")
        mailboxes.append(MailboxConfig(alias, m.str("display_name", alias), tuple(extra)))
        m.reject_unknown()

    delivery = _load_delivery(root.table_of("delivery"))

    dns_s = root.table_of("dns")
    dns = DnsConfig(tuple(str(n) for n in dns_s.list("nameservers")),
                    dns_s.duration("timeout", 5.0) or 5.0)
    dns_s.reject_unknown()

    connected = []
    for c in root.tables("connected_sites"):
        routing = c.str("routing_address", required=True)
        if not routing.startswith("@"):
            raise c.error("routing_address", f"{routing!r} must be an SMTP routing address like @SiteB.example.com")
        connected.append(ConnectedSite(c.str("name", required=True), "@" + _domain(c, "routing_address", routing[1:]),
                                       c.int("cost", 1, minimum=0, maximum=100)))
        c.reject_unknown()

    routes = []
    for e in root.tables("email_domains"):
        domain = e.str("domain", required=True)
        exact = domain.startswith("#")
        host = e.str("host", required=True)
        routes.append(DomainRoute(("#" if exact else "") + _domain(e, "domain", domain), host,
                                  e.int("port", 25, minimum=1, maximum=65535),
                                  _starttls(e, "starttls", e.str("starttls"))))
        e.reject_unknown()

    r = root.table_of("replication")
    connectors = []
    for c in r.tables("connectors"):
        if c.table.get("schedule", "always") == "always":
            c.used.add("schedule")
            schedule: float | None = REPLICATION_ALWAYS
        else:
            schedule = c.duration("schedule", REPLICATION_ALWAYS)
        connectors.append(ReplicationConnector(c.str("site", required=True), schedule))
        c.reject_unknown()
    replication = ReplicationConfig(
        key=r.str("key"),
        key_env=r.str("key_env", "IMSRELAY_ORG_KEY"),
        connectors=tuple(connectors),
        startup_delay=r.duration("startup_delay", 300.0) or 0.0,
        batch_size=r.int("batch_size", 500, minimum=1),
        max_age=r.duration("max_age", 7 * 86400.0) or 7 * 86400.0,
        keep_old_address=r.bool("keep_old_address", True),
        kcc_interval=r.duration("kcc_interval", 3 * 3600.0) or 3 * 3600.0,
    )
    r.reject_unknown()

    a = root.table_of("admin")
    admin = AdminConfig(a.str("listen", "127.0.0.1"), a.int("port", 0, minimum=0, maximum=65535),
                        a.str("token"), a.str("token_env", "IMSRELAY_ADMIN_TOKEN"))
    a.reject_unknown()

    co = root.table_of("console")
    console = ConsoleConfig(co.bool("enabled", False), co.str("listen", "127.0.0.1"),
                            co.int("port", 8080, minimum=0, maximum=65535))
    if console.enabled and admin.port == 0:
        raise co.error("enabled", "the console needs the admin endpoint: set admin.port (and admin.token)")
    co.reject_unknown()

    lg = root.table_of("logging")
    level = lg.str("level", "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise lg.error("level", "must be one of debug, info, warning, error")
    fmt = lg.str("format", "auto")
    if fmt not in ("auto", "json", "console"):
        raise lg.error("format", "must be one of auto, json, console")
    logging = LoggingConfig(level, fmt)
    lg.reject_unknown()

    tr = root.table_of("tracking")
    days = tr.int("days", 7, minimum=1, maximum=3650)
    tracking = TrackingConfig(tr.bool("enabled", True), float(days))
    tr.reject_unknown()

    root.reject_unknown()

    if data_dir is None:
        data_dir = Path(data)
        if not data_dir.is_absolute():
            data_dir = config_dir / data_dir
    return SiteConfig(
        path=path, organisation=organisation, site=name, server=server,
        site_domain=site_domain, company_domain=company_domain, data_dir=data_dir,
        smtp=smtp, mailboxes=tuple(mailboxes), delivery=delivery, dns=dns,
        connected_sites=tuple(connected), email_domains=tuple(routes),
        replication=replication, admin=admin, logging=logging, tracking=tracking, console=console,
    )
