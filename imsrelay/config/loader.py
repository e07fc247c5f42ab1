"""Site configuration: one TOML file per site, loaded into the frozen values of
``imsrelay.model.settings``.

Every key is validated at load, and every error a user can make names the file and
the key (``ConfigError``); ``load_config`` reports *all* the errors of a file at
once (``ConfigErrors``), never a bare traceback.  Defaults are written once, in
``imsrelay.model.settings``: a key that is absent is left to its dataclass default.  The
file is the single source of truth for *static* set-up (listen address, limits,
routing tables, connectors); the directory database is the truth for mailboxes and
site addressing once provisioned.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from imsrelay.model.addresses import (
    AddressError,
    ip_literal,
    normalise_domain,
    parse_address,
    parse_host_port,
)
from imsrelay.model.errors import ConfigError, ConfigErrors
from imsrelay.model.priority import PriorityTimeouts, Timeouts
from imsrelay.model.settings import (
    ADDRESS_LITERAL_POLICIES,
    DEFAULT_NON_URGENT_LIFETIME,
    DEFAULT_URGENT_LIFETIME,
    DIAGNOSTIC_CATEGORIES,
    DIAGNOSTIC_LEVELS,
    INTERNET_MAIL_DEFAULT,
    REPLICATION_ALWAYS,
    SMTP_PORT,
    AccessConfig,
    AdminConfig,
    AuthConfig,
    ConnectedSite,
    ConnectionsConfig,
    ConsoleConfig,
    CustomRecipientConfig,
    DeliveryConfig,
    DiagnosticsConfig,
    DistributionListConfig,
    DnsConfig,
    DomainRoute,
    EtrnConfig,
    EtrnRequest,
    InternetMailDomain,
    JournalingConfig,
    LabConfig,
    LinkMonitorConfig,
    LoggingConfig,
    MailboxConfig,
    MetricsConfig,
    NotificationsConfig,
    OutboundAuth,
    QueueConfig,
    ReplicationConfig,
    ReplicationConnector,
    RestrictionsConfig,
    RoutingConfig,
    Secret,
    SiteConfig,
    SiteServer,
    SmtpConfig,
    SubmissionConfig,
    TlsPolicy,
    TrackingConfig,
    TransferConfig,
    parse_duration,
)
from imsrelay.policy.auth import MECHANISMS, PasswordError, parse_hash
from imsrelay.policy.restrictions import ACCEPT_MODES, FILTER_ACTIONS, check_entry
from imsrelay.policy.sealed import host_refusal
from imsrelay.policy.transfer_mode import parse_mode

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_OFF = ("", "never", "off")
# none; opportunistic (encrypt when offered); require (encrypt, no check: Postfix's "encrypt");
# verify (encrypt, certificate from a trusted CA and matching the host name: Postfix's "secure")
STARTTLS_POLICIES = ("none", "opportunistic", "require", "verify")
BARE_NEWLINE = ("normalize", "reject")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")

T = TypeVar("T")




# --------------------------------------------------------------------------- loading


class _Missing:
    """A key the file does not set: the dataclass default applies."""

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()


def _build(cls: Callable[..., T], **values: Any) -> T:
    """``cls(**values)`` without the keys the file left out (their default is the dataclass's)."""
    return cls(**{k: v for k, v in values.items() if v is not MISSING})


class _Section:
    """Typed access to one TOML table.  A bad value is recorded (file, dotted key,
    message) in the shared ``errors`` list and read as MISSING, so loading goes on
    and the file's every error is reported together."""

    def __init__(self, path: Path, prefix: str, table: Mapping[str, Any], errors: list[ConfigError]) -> None:
        self.path = path
        self.prefix = prefix
        self.table = table
        self.errors = errors
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> Any:
        """Record a problem with key ``name``; returns MISSING (the value to use)."""
        self.errors.append(ConfigError(self.path, self.key(name), message))
        return MISSING

    def item_error(self, name: str, index: int, message: str) -> Any:
        self.errors.append(ConfigError(self.path, f"{self.key(name)}[{index}]", message))
        return MISSING

    def _get(self, name: str, required: bool) -> Any:
        self.used.add(name)
        if name not in self.table:
            return self.error(name, "is required but missing") if required else MISSING
        return self.table[name]

    def string(self, name: str, *, required: bool = False) -> Any:
        value = self._get(name, required)
        if value is MISSING:
            return value
        if not isinstance(value, str):
            return self.error(name, f"must be a string, not {type(value).__name__}")
        if required and not value.strip():
            return self.error(name, "must not be empty")
        return value

    def choice(self, name: str, choices: tuple[str, ...], *, required: bool = False,
               fold: bool = False) -> Any:
        value = self.string(name, required=required)
        if value is MISSING:
            return value
        if fold:
            value = value.lower()
        if value not in choices:
            return self.error(name, f"must be one of {', '.join(choices)}")
        return value

    def integer(self, name: str, *, minimum: int | None = 0, maximum: int | None = None) -> Any:
        value = self._get(name, False)
        if value is MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            return self.error(name, f"must be a whole number, not {value!r}")
        if minimum is not None and value < minimum:
            return self.error(name, f"must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            return self.error(name, f"must be at most {maximum}, not {value}")
        return value

    def port(self, name: str, *, allow_zero: bool = False) -> Any:
        return self.integer(name, minimum=0 if allow_zero else 1, maximum=65535)

    def boolean(self, name: str) -> Any:
        value = self._get(name, False)
        if value is MISSING:
            return value
        if not isinstance(value, bool):
            return self.error(name, f"must be true or false, not {value!r}")
        return value

    def duration(self, name: str, *, off: float | None | _Missing = MISSING) -> Any:
        """A duration; ``off`` is what "never"/"off" mean where the setting may be
        switched off (left MISSING: they are an error)."""
        value = self._get(name, False)
        if value is MISSING:
            return value
        if value in _OFF:
            if off is MISSING:
                return self.error(name, "must be a duration (it cannot be switched off)")
            return off
        try:
            return parse_duration(value)
        except ValueError as exc:
            return self.error(name, str(exc))

    def listing(self, name: str) -> list[Any]:
        value = self._get(name, False)
        if value is MISSING:
            return []
        if not isinstance(value, list):
            self.error(name, f"must be a list, not {type(value).__name__}")
            return []
        return value

    def strings(self, name: str) -> list[tuple[int, str]]:
        """(index, value) of a list of strings; other items are errors."""
        out = []
        for i, item in enumerate(self.listing(name)):
            if isinstance(item, str):
                out.append((i, item))
            else:
                self.item_error(name, i, f"must be a string, not {type(item).__name__}")
        return out

    def table_of(self, name: str) -> _Section:
        value = self._get(name, False)
        if value is MISSING:
            value = {}
        elif not isinstance(value, dict):
            self.error(name, "must be a table")
            value = {}
        return type(self)(self.path, self.key(name), value, self.errors)

    def tables(self, name: str) -> list[_Section]:
        result = []
        for i, item in enumerate(self.listing(name)):
            if not isinstance(item, dict):
                self.item_error(name, i, "must be a table")
                continue
            result.append(type(self)(self.path, f"{self.key(name)}[{i}]", item, self.errors))
        return result

    def reject_unknown(self) -> None:
        for name in sorted(set(self.table) - self.used):
            self.error(name, "is not a known setting (check the spelling)")


def _domain(section: _Section, name: str, value: Any) -> Any:
    """Validate a domain (``#`` prefix kept off); keep its letter case for display
    (matching ignores case)."""
    if value is MISSING:
        return value
    bare = value.lstrip("#").strip().rstrip(".")
    try:
        normalised = normalise_domain(bare)
    except AddressError as exc:
        return section.error(name, str(exc))
    return bare if bare.isascii() else normalised


def _listen(section: _Section, name: str) -> Any:
    """A listen address: an IP address (0.0.0.0 or :: for every address), never a
    host name (that would ask the system resolver)."""
    value = section.string(name)
    if value is MISSING:
        return value
    if ip_literal(value) is None or value.strip().startswith("["):
        return section.error(name, f"{value!r} must be an IP address (e.g. 127.0.0.1, 0.0.0.0, ::), not a host name")
    return ip_literal(value)


def _host_list(section: _Section, name: str, default_port: int, *, required: bool = False) -> Any:
    """``host1,host2:2525,[::1]:26`` (KB Q279323) → ((host, port), ...), each host an IP
    address or a name, each with its own port or ``default_port``; MISSING when absent
    or wrong (the error recorded)."""
    value = section.string(name, required=required)
    if value in (MISSING, ""):
        return MISSING
    hosts: list[tuple[str, int]] = []
    for part in value.split(","):
        if not part.strip():
            return section.error(name, f"{value!r}: an empty host in the list (write `host1,host2,host3`)")
        try:
            hosts.append(parse_host_port(part, default_port))
        except ValueError as exc:
            return section.error(name, str(exc))
    if len(set(hosts)) != len(hosts):
        return section.error(name, f"{value!r} names the same host twice")
    return tuple(hosts)


def _outbound_auth(parent: _Section, name: str, config_dir: Path) -> Any:
    """The Security tab's credentials (Q174754): ``{ username, password_env | password_file |
    password, allow_plaintext }``; MISSING when not given."""
    if name not in parent.table:
        parent.used.add(name)
        return MISSING
    a = parent.table_of(name)
    username = a.string("username", required=True)
    password = a.string("password")
    env = a.string("password_env")
    file = a.string("password_file")
    allow = a.boolean("allow_plaintext")
    given = [k for k, v in (("password", password), ("password_env", env), ("password_file", file))
             if v not in (MISSING, "")]
    if len(given) != 1:
        a.error("password_env", "give exactly one of password_env (preferred), password_file or password"
                + (f", not {' and '.join(given)}" if given else ""))
    a.reject_unknown()
    if username is MISSING or len(given) != 1:
        return MISSING
    return _build(OutboundAuth, username=username,
                  password=Secret(password) if password not in (MISSING, "") else MISSING,
                  password_env=env if env not in (MISSING, "") else MISSING,
                  password_file=(config_dir / file) if file not in (MISSING, "") else MISSING,
                  allow_plaintext=allow)


def _load_smtp(s: _Section, config_dir: Path) -> SmtpConfig:
    networks = []
    for i, net in s.strings("relay_networks"):
        try:
            networks.append(ipaddress.ip_network(net, strict=False))
        except ValueError:
            s.item_error("relay_networks", i, f"{net!r} is not an IP network")
    accepted = []
    for i, d in s.strings("accepted_domains"):
        try:
            accepted.append(("#" if d.startswith("#") else "") + _checked_domain(d))
        except AddressError as exc:
            s.item_error("accepted_domains", i, str(exc))
    hostname = s.string("hostname")
    if hostname not in (MISSING, "") and _domain(s, "hostname", hostname) is MISSING:
        hostname = MISSING
    cert = s.string("tls_cert")
    key = s.string("tls_key")
    if bool(cert) != bool(key) and not any(e.key.startswith(s.key("tls_")) for e in s.errors):
        s.error("tls_key" if cert is not MISSING else "tls_cert", "tls_cert and tls_key go together")
    cfg = _build(
        SmtpConfig,
        listen=_listen(s, "listen"),
        port=s.port("port", allow_zero=True),
        hostname=hostname,
        max_message_size=s.integer("max_message_size", minimum=1024),
        max_hops=s.integer("max_hops", minimum=1),
        max_recipients=s.integer("max_recipients", minimum=1),
        relay_networks=tuple(networks),
        accepted_domains=tuple(accepted),
        idle_timeout=s.duration("idle_timeout"),
        session_timeout=s.duration("session_timeout"),
        max_errors=s.integer("max_errors", minimum=1),
        tls_cert=(config_dir / cert) if cert else MISSING,
        tls_key=(config_dir / key) if key else MISSING,
        workers=s.integer("workers", minimum=1, maximum=64),
        queue_minfree=s.integer("queue_minfree", minimum=0),
        max_inbound_connections=s.integer("max_inbound_connections", minimum=1),
        max_connections_per_ip=s.integer("max_connections_per_ip", minimum=1),
        listen_backlog=s.integer("listen_backlog", minimum=0, maximum=65535),
        handshake_timeout=s.duration("handshake_timeout"),
        busy_idle_timeout=s.duration("busy_idle_timeout"),
        bare_newline=s.choice("bare_newline", BARE_NEWLINE),
        postmaster=_alias(s, "postmaster"),
        banner=_banner(s),
        tls_generate=s.boolean("tls_generate"),
    )
    s.reject_unknown()
    return cfg


def _banner(s: _Section) -> Any:
    value = s.string("banner")
    if value is not MISSING and (not value.strip() or any(c in value for c in "\r\n")):
        return s.error("banner", "must be one line of text")
    return value


def _checked_domain(value: str) -> str:
    bare = value.lstrip("#").strip().rstrip(".")
    normalised = normalise_domain(bare)
    return bare if bare.isascii() else normalised


def _alias(s: _Section, name: str) -> Any:
    value = s.string(name)
    if value is not MISSING and not _ALIAS.fullmatch(value):
        return s.error(name, f"{value!r} is not a mailbox alias (letters, digits, . _ -)")
    return value


def _load_delivery(s: _Section, config_dir: Path) -> DeliveryConfig:
    intervals = []
    for i, value in enumerate(s.listing("retry_intervals")):
        try:
            intervals.append(parse_duration(value))
        except ValueError as exc:
            s.item_error("retry_intervals", i, str(exc))
    smart = _host_list(s, "smart_host", SMTP_PORT)
    smart_host, smart_port, smart_more = MISSING, MISSING, MISSING
    if smart is not MISSING:
        (smart_host, smart_port), smart_more = smart[0], smart[1:]
    policies = []
    for t in s.tables("tls"):
        domain = _domain(t, "domain", t.string("domain", required=True))
        starttls = t.choice("starttls", STARTTLS_POLICIES, required=True)
        if domain is not MISSING and starttls is not MISSING:
            policies.append(TlsPolicy(domain, starttls))
        t.reject_unknown()
    cfg = _build(
        DeliveryConfig,
        retry_intervals=tuple(intervals) or MISSING,
        lifetime=s.duration("lifetime"),
        delay_notice=s.duration("delay_notice", off=None),
        smart_host=smart_host,
        smart_host_port=smart_port,
        smart_host_more=smart_more,
        smart_host_auth=_outbound_auth(s, "smart_host_auth", config_dir),
        starttls=s.choice("starttls", STARTTLS_POLICIES),
        tls_policies=tuple(policies),
        max_per_destination=s.integer("max_per_destination", minimum=1),
        max_deliveries=s.integer("max_deliveries", minimum=1),
        connect_timeout=s.duration("connect_timeout"),
        command_timeout=s.duration("command_timeout"),
        data_timeout_per_mib=s.duration("data_timeout_per_mib"),
        connection_idle=s.duration("connection_idle"),
        mx_port=s.port("mx_port"),
        max_active_messages=s.integer("max_active_messages", minimum=1),
        smart_host_starttls=s.choice("smart_host_starttls", STARTTLS_POLICIES),
        tls_ca_file=(config_dir / ca) if (ca := s.string("tls_ca_file")) else MISSING,
        max_message_size=s.integer("max_message_size"),
    )
    s.reject_unknown()
    return cfg


def _load_queue(q: _Section, smtp: _Section) -> QueueConfig:
    """[queue]; ``smtp.max_queued_messages`` is the older name of ``queue.refuse_at``."""
    refuse_at = q.integer("refuse_at", minimum=1)
    older = smtp.integer("max_queued_messages", minimum=1)
    if older is not MISSING:
        if "refuse_at" in q.table:
            smtp.error("max_queued_messages", "is the older name of queue.refuse_at: give only one of them")
        else:
            refuse_at = older
    cfg = _build(QueueConfig, backpressure_at=q.integer("backpressure_at", minimum=1), refuse_at=refuse_at,
                 max_delay=q.duration("max_delay", off=0.0))
    if cfg.max_delay > 300.0:
        q.error("max_delay", "must be at most 5m (RFC 5321's MAIL time-out: clients give up after it)")
    q.reject_unknown()
    return cfg


def _load_dns(s: _Section) -> DnsConfig:
    servers = []
    for i, entry in s.strings("nameservers"):
        try:
            parse_host_port(entry, 53, ip_only=True)
            servers.append(entry)
        except ValueError as exc:
            s.item_error("nameservers", i, f"{exc} (nameservers are IP addresses, optionally with :port)")
    cfg = _build(DnsConfig, nameservers=tuple(servers), timeout=s.duration("timeout"))
    s.reject_unknown()
    return cfg


def _load_mailboxes(root: _Section) -> tuple[MailboxConfig, ...]:
    mailboxes = []
    seen: set[str] = set()
    for m in root.tables("mailboxes"):
        alias = _unique_name(m, "alias", _ALIAS, "a valid alias (letters, digits, . _ -)", seen)
        extra = []
        for i, addr in m.strings("addresses"):
            try:
                parse_address(addr.split(":", 1)[-1])
            except AddressError as exc:
                m.item_error("addresses", i, str(exc))
                continue
            extra.append(addr if ":" in addr else f"smtp:{addr}")
        display = m.string("display_name")
        password_hash = m.string("password_hash")
        home_server = m.string("home_server")
        if home_server is not MISSING and not _NAME.fullmatch(home_server):
            home_server = m.error("home_server", f"{home_server!r} is not a server name (letters, digits, - _ .)")
        if password_hash is not MISSING:
            try:
                parse_hash(password_hash)
            except PasswordError as exc:
                password_hash = m.error("password_hash", f"{exc} (make one with: imsrelay directory hash-password)")
        if alias is not MISSING:
            seen.add(alias.lower())
            mailboxes.append(MailboxConfig(alias, alias if display is MISSING else display, tuple(extra),
                                           password_hash or None,
                                           None if home_server is MISSING else home_server))
        m.reject_unknown()
    return tuple(mailboxes)


def _addresses(section: _Section, name: str) -> list[str]:
    """A list of SMTP addresses (``smtp:`` prefixes allowed), each checked."""
    out = []
    for i, addr in section.strings(name):
        try:
            parse_address(addr.split(":", 1)[-1] if addr.lower().startswith("smtp:") else addr)
        except AddressError as exc:
            section.item_error(name, i, str(exc))
            continue
        out.append(addr)
    return out


def _one_address(section: _Section, name: str, *, required: bool = False) -> str:
    value = section.string(name, required=required)
    if value is MISSING:
        return ""
    try:
        parse_address(value)
    except AddressError as exc:
        section.error(name, f"{value!r} is not an address: {exc}")
        return ""
    return str(value)


def _load_recipients(root: _Section, mailboxes: tuple[MailboxConfig, ...]
                     ) -> tuple[tuple[CustomRecipientConfig, ...], tuple[DistributionListConfig, ...]]:
    """``[[custom_recipients]]`` and ``[[distribution_lists]]`` (KB Q258203, Q185194): aliases
    valid and unique among them and the mailboxes."""
    seen = {m.alias.lower() for m in mailboxes}
    customs: list[CustomRecipientConfig] = []
    lists: list[DistributionListConfig] = []

    def alias_of(t: _Section) -> Any:
        alias = t.string("alias", required=True)
        if alias is not MISSING and not _ALIAS.fullmatch(alias):
            return t.error("alias", f"{alias!r} is not a valid alias (letters, digits, . _ -)")
        if alias is not MISSING and alias.lower() in seen:
            return t.error("alias", f"{alias!r} is taken (by a mailbox, custom recipient or list listed before)")
        if alias is not MISSING:
            seen.add(alias.lower())
        return alias

    for t in root.tables("custom_recipients"):
        alias = alias_of(t)
        target = _one_address(t, "target", required=True)
        display = t.string("display_name")
        extra = _addresses(t, "addresses")
        if alias not in (MISSING, None) and target:
            customs.append(CustomRecipientConfig(alias, target, "" if display is MISSING else display, tuple(extra)))
        t.reject_unknown()
    for t in root.tables("distribution_lists"):
        alias = alias_of(t)
        members = _addresses(t, "members")
        display = t.string("display_name")
        owner = _one_address(t, "owner")
        site = t.string("expansion_site")
        if site is not MISSING and not _NAME.fullmatch(site):
            site = t.error("expansion_site", f"{site!r} is not a site name")
        extra = _addresses(t, "addresses")
        if alias not in (MISSING, None):
            lists.append(DistributionListConfig(alias, tuple(members), "" if display is MISSING else display, owner,
                                                "" if site in (MISSING, None) else site, tuple(extra)))
        t.reject_unknown()
    return tuple(customs), tuple(lists)


def _unique_name(t: _Section, key: str, pattern: re.Pattern[str], what: str, seen: set[str]) -> Any:
    """``t``'s required ``key``: matching ``pattern`` (else "is not ``what``") and not among
    ``seen`` (case-insensitive; else "is listed twice")."""
    value = t.string(key, required=True)
    if value is not MISSING and not pattern.fullmatch(value):
        return t.error(key, f"{value!r} is not {what}")
    if value is not MISSING and value.lower() in seen:
        return t.error(key, f"{value!r} is listed twice")
    return value


def _load_servers(root: _Section, server: str | object) -> tuple[SiteServer, ...]:
    """``[[servers]]``: every server of the site, this one included (issue 24; KB Q199354)."""
    servers: list[SiteServer] = []
    seen: set[str] = set()
    for t in root.tables("servers"):
        name = _unique_name(t, "name", _NAME, "a server name (letters, digits, - _ .)", seen)
        host_text = t.string("host", required=True)
        port = t.port("port")
        host = MISSING
        if host_text is not MISSING:
            try:
                host, port = parse_host_port(host_text, SMTP_PORT if port is MISSING else port)
            except ValueError as exc:
                t.error("host", str(exc))
        admin = t.string("admin")
        if admin is not MISSING and not re.fullmatch(r"https?://[^\s/]+/?", admin):
            admin = t.error("admin", f"{admin!r} is not an admin endpoint URL like http://127.10.10.11:8025")
        if name is not MISSING and host is not MISSING:
            seen.add(name.lower())
            servers.append(_build(SiteServer, name=name, host=host, port=port,
                                  admin=None if admin is MISSING else admin.rstrip("/")))
        t.reject_unknown()
    if servers and isinstance(server, str) and server.lower() not in seen:
        root.errors.append(ConfigError(root.path, "servers",
                                       f"this server, site.server = {server!r}, is not among [[servers]]"))
    return tuple(servers)


def _check_home_servers(root: _Section, mailboxes: tuple[MailboxConfig, ...],
                        servers: tuple[SiteServer, ...]) -> None:
    names = {s.name.lower() for s in servers}
    for m in mailboxes:
        if m.home_server is not None and m.home_server.lower() not in names:
            root.errors.append(ConfigError(
                root.path, "mailboxes.home_server",
                f"{m.alias}: home_server {m.home_server!r} is not one of [[servers]] "
                f"({', '.join(s.name for s in servers) or 'none listed'})"))


def _load_connected_sites(root: _Section) -> tuple[ConnectedSite, ...]:
    connected = []
    spelled: dict[str, str] = {}  # lower-case name -> the first spelling
    for c in root.tables("connected_sites"):
        name = c.string("name", required=True)
        if name is not MISSING and not _NAME.fullmatch(name):
            name = c.error("name", f"{name!r} is not a site directory name (letters, digits, - _ .)")
        elif name is not MISSING and spelled.setdefault(name.lower(), name) != name:
            name = c.error("name", f"{name!r} differs from the entry {spelled[name.lower()]!r} only in case: a "
                                   "site's directory name is exact (Q196927); write it the same way or remove one")
        routing = c.string("routing_address", required=True)
        if routing is not MISSING and not routing.startswith("@"):
            routing = c.error("routing_address",
                              f"{routing!r} must be an SMTP routing address like @SiteB.example.com")
        elif routing is not MISSING:
            routing = _domain(c, "routing_address", routing[1:])
        cost = c.integer("cost", minimum=0, maximum=100)
        via_port = c.port("port")
        via = _host_list(c, "host", SMTP_PORT if via_port is MISSING else via_port)
        via_host, more = MISSING, MISSING
        if via is not MISSING:
            (via_host, via_port), more = via[0], via[1:]
        if name is not MISSING and routing is not MISSING:
            connected.append(_build(ConnectedSite, name=name, routing_address="@" + routing, cost=cost,
                                    host=via_host, port=via_port, more_hosts=more))
        c.reject_unknown()
    return tuple(connected)


def _load_email_domains(root: _Section, config_dir: Path) -> tuple[DomainRoute, ...]:
    routes = []
    for e in root.tables("email_domains"):
        domain = e.string("domain", required=True)
        exact = domain is not MISSING and domain.startswith("#")
        domain = _domain(e, "domain", domain)
        port = e.port("port")
        hosts = _host_list(e, "host", SMTP_PORT if port is MISSING else port, required=True)
        starttls = e.choice("starttls", STARTTLS_POLICIES)
        etrn = e.boolean("etrn")
        auth = _outbound_auth(e, "auth", config_dir)
        if domain is not MISSING and hosts is not MISSING:
            (host, port), more = hosts[0], hosts[1:]
            routes.append(_build(DomainRoute, domain=("#" if exact else "") + domain, host=host, port=port,
                                 starttls=starttls, etrn=etrn, more_hosts=more, auth=auth))
        e.reject_unknown()
    return tuple(routes)


def _load_internet_mail(root: _Section) -> tuple[InternetMailDomain, ...]:
    """``[[internet_mail]]``: the Internet Mail tab by E-Mail Domain; ``*`` is the default entry."""
    entries: list[InternetMailDomain] = []
    seen: set[str] = set()
    for e in root.tables("internet_mail"):
        given = e.string("domain", required=True)
        domain = given
        if given not in (MISSING, INTERNET_MAIL_DEFAULT):
            exact = given.startswith("#")
            domain = _domain(e, "domain", given)
            domain = MISSING if domain is MISSING else ("#" if exact else "") + domain
        if domain is not MISSING and domain.lower() in seen:
            domain = e.error("domain", f"{domain!r} is listed twice: give each domain one entry")
        values = {name: e.boolean(name) for name in ("out_of_office", "auto_replies", "auto_forwards",
                                                     "display_names")}
        size = e.integer("max_message_size")
        if domain is not MISSING:
            seen.add(domain.lower())
            entries.append(_build(InternetMailDomain, domain=domain, max_message_size=size, **values))
        e.reject_unknown()
    return tuple(entries)


def _load_journaling(j: _Section) -> JournalingConfig:
    recipient = j.string("recipient")
    if recipient is not MISSING and not recipient.strip():
        recipient = MISSING  # "" = off
    elif recipient is not MISSING and "@" in recipient:
        try:
            parse_address(recipient)
        except AddressError as exc:
            recipient = j.error("recipient", f"{recipient!r} is not an address: {exc}")
    elif recipient is not MISSING and not _ALIAS.fullmatch(recipient):
        recipient = j.error("recipient", f"{recipient!r} is neither an address nor a mailbox alias")
    cfg = _build(JournalingConfig, recipient=recipient, reports=j.boolean("reports"))
    j.reject_unknown()
    return cfg


def _public_key(t: _Section, site: str) -> Any:
    """``ed25519:<base64 of 32 bytes>`` (``imsrelay replicate keygen`` prints it)."""
    value = t.string(site, required=True)
    if value is MISSING:
        return value
    scheme, _, b64 = value.strip().partition(":")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if scheme != "ed25519" or len(raw) != 32:
        return t.error(site, "must be an Ed25519 public key, ed25519:<base64> (imsrelay replicate keygen prints it)")
    return value


def _load_replication(r: _Section, config_dir: Path) -> ReplicationConfig:
    connectors = []
    for c in r.tables("connectors"):
        if c.table.get("schedule") == "always":
            c.used.add("schedule")
            schedule: Any = REPLICATION_ALWAYS
        else:
            schedule = c.duration("schedule", off=None)
        site = c.string("site", required=True)
        server = c.string("server")
        if server is not MISSING and not _NAME.fullmatch(server):
            server = c.error("server", f"{server!r} is not a server name (letters, digits, - _ .)")
        if site is not MISSING:
            connectors.append(_build(ReplicationConnector, site=site, schedule=schedule, server=server))
        c.reject_unknown()
    trusted = r.table_of("trusted_keys")
    cfg = _build(
        ReplicationConfig,
        key=r.string("key"),
        key_env=r.string("key_env"),
        connectors=tuple(connectors),
        startup_delay=r.duration("startup_delay", off=0.0),
        batch_size=r.integer("batch_size", minimum=1),
        max_age=r.duration("max_age"),
        keep_old_address=r.boolean("keep_old_address"),
        kcc_interval=r.duration("kcc_interval"),
        signing_key=(config_dir / sk) if (sk := r.string("signing_key")) else MISSING,
        trusted_keys=tuple((site, k) for site in sorted(trusted.table)
                           if (k := _public_key(trusted, site)) is not MISSING),
        bridgehead=_server_name(r, "bridgehead"),
        intrasite_interval=r.duration("intrasite_interval"),
    )
    if cfg.signing_key and not trusted.table:
        r.error("trusted_keys", "signing_key needs the organisation's trusted public keys "
                                "([replication.trusted_keys] SiteA = \"ed25519:...\")")
    r.reject_unknown()
    return cfg


def _server_name(section: _Section, key: str) -> Any:
    name = section.string(key)
    if name is not MISSING and not _NAME.fullmatch(name):
        return section.error(key, f"{name!r} is not a server name (letters, digits, - _ .)")
    return name


def _check_bridgehead(root: _Section, replication: ReplicationConfig, servers: tuple[SiteServer, ...]) -> None:
    named = replication.bridgehead
    if named is not None and named.lower() not in {s.name.lower() for s in servers}:
        root.errors.append(ConfigError(root.path, "replication.bridgehead",
                                       f"{named!r} is not one of [[servers]] "
                                       f"({', '.join(s.name for s in servers) or 'none listed'})"))


def _load_admin(a: _Section) -> AdminConfig:
    cfg = _build(AdminConfig, listen=_listen(a, "listen"), port=a.port("port", allow_zero=True),
                 token=a.string("token"), token_env=a.string("token_env"))
    a.reject_unknown()
    return cfg


def _load_routing(rt: _Section) -> RoutingConfig:
    cfg = _build(RoutingConfig, address_literals=rt.choice("address_literals", ADDRESS_LITERAL_POLICIES),
                 least_cost_only=rt.boolean("least_cost_only"))
    rt.reject_unknown()
    return cfg


def _load_logging(lg: _Section) -> LoggingConfig:
    cfg = _build(LoggingConfig, level=lg.choice("level", LOG_LEVELS, fold=True),
                 format=lg.choice("format", LOG_FORMATS))
    lg.reject_unknown()
    return cfg


def _load_transfer(t: _Section) -> TransferConfig:
    mode = t.string("mode")
    if mode is not MISSING:
        try:
            mode = parse_mode(mode).value
        except ValueError as exc:
            mode = t.error("mode", str(exc))
    cfg = _build(TransferConfig, mode=mode)
    t.reject_unknown()
    return cfg


def _load_console(co: _Section, admin: AdminConfig) -> ConsoleConfig:
    cfg = _build(ConsoleConfig, enabled=co.boolean("enabled"), listen=_listen(co, "listen"), port=co.port("port"))
    if cfg.enabled and admin.port == 0:
        co.error("enabled", "the console needs the admin endpoint: set admin.port (and admin.token)")
    co.reject_unknown()
    return cfg


def _load_lab(s: _Section) -> LabConfig:
    networks = _networks(s, "networks") if "networks" in s.table else MISSING
    cfg = _build(LabConfig, sealed=s.boolean("sealed"), networks=networks, catch_all=_alias(s, "catch_all"))
    s.reject_unknown()
    return cfg


def _check_sealed(root: _Section, lab: LabConfig, *, delivery: DeliveryConfig, dns: DnsConfig,
                  connected: tuple[ConnectedSite, ...], routes: tuple[DomainRoute, ...], etrn: EtrnConfig,
                  mailboxes: tuple[MailboxConfig, ...], servers: tuple[SiteServer, ...] = ()) -> None:
    """A sealed lab's file names no host outside the lab (imsrelay.policy.sealed)."""
    if lab.catch_all is not None:
        if not lab.sealed:
            root.errors.append(ConfigError(root.path, "lab.catch_all", "only a sealed lab (lab.sealed = true) "
                                           "keeps the rest of the Internet in a catch-all mailbox"))
        elif lab.catch_all.lower() not in {m.alias.lower() for m in mailboxes}:
            root.errors.append(ConfigError(root.path, "lab.catch_all", f"{lab.catch_all!r} is not one of this "
                                           "site's [[mailboxes]]"))
    if not lab.sealed:
        return
    lab_dns = bool(dns.nameservers)

    def check(key: str, host: str) -> None:
        refused = host_refusal(host, lab.networks, lab_dns=lab_dns)
        if refused:
            root.errors.append(ConfigError(root.path, key, refused))

    for i, server in enumerate(dns.nameservers):
        check(f"dns.nameservers[{i}]", parse_host_port(server, 53, ip_only=True)[0])
    for host, _ in delivery.smart_hosts:
        check("delivery.smart_host", host)
    for i, c in enumerate(connected):
        for host, _ in c.hosts:
            check(f"connected_sites[{i}].host", host)
    for i, r in enumerate(routes):
        for host, _ in r.hosts:
            check(f"email_domains[{i}].host", host)
    for i, e in enumerate(etrn.requests):
        check(f"etrn.requests[{i}].host", e.host)
    for i, v in enumerate(servers):
        check(f"servers[{i}].host", v.host)
        if v.admin is not None:  # the admin endpoints are reached by HTTP, never through the lab's DNS
            refused = host_refusal(urlsplit(v.admin).hostname or "", lab.networks, lab_dns=False)
            if refused:
                root.errors.append(ConfigError(root.path, f"servers[{i}].admin", refused))


def _load_tracking(t: _Section) -> TrackingConfig:
    cfg = _build(TrackingConfig, enabled=t.boolean("enabled"), days=t.integer("days", minimum=1, maximum=3650),
                 max_bytes=t.integer("max_bytes", minimum=0))
    t.reject_unknown()
    return cfg


def _networks(s: _Section, name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for i, net in s.strings(name):
        try:
            out.append(ipaddress.ip_network(net, strict=False))
        except ValueError:
            s.item_error(name, i, f"{net!r} is not an IP address or network")
    return tuple(out)


def _load_auth(s: _Section) -> AuthConfig:
    mechanisms: Any = MISSING
    if "mechanisms" in s.table:
        mechanisms = []
        for i, m in s.strings("mechanisms"):
            if m.upper() in MECHANISMS:
                mechanisms.append(m.upper())
            else:
                s.item_error("mechanisms", i, f"{m!r}: supported are {', '.join(MECHANISMS)}")
        mechanisms = tuple(mechanisms)
    cfg = _build(
        AuthConfig,
        enabled=s.boolean("enabled"),
        mechanisms=mechanisms,
        allow_plaintext=s.boolean("allow_plaintext"),
        replicate_credentials=s.boolean("replicate_credentials"),
        max_failures=s.integer("max_failures", minimum=1),
        failure_window=s.duration("failure_window"),
        lockout=s.duration("lockout", off=0.0),
        failure_delay=s.duration("failure_delay", off=0.0),
        max_failures_per_address=s.integer("max_failures_per_address", minimum=1),
        max_failures_per_account=s.integer("max_failures_per_account", minimum=1),
        trusted_for=s.duration("trusted_for", off=0.0),
    )
    s.reject_unknown()
    return cfg


def _load_submission(s: _Section) -> SubmissionConfig:
    def port(name: str) -> Any:  # 0 or absent: that listener is off
        value = s.port(name, allow_zero=True)
        return None if value == 0 else value

    cfg = _build(SubmissionConfig, listen=_listen(s, "listen"), port=port("port"), tls_port=port("tls_port"),
                 max_connections=s.integer("max_connections", minimum=1),
                 max_connections_per_ip=s.integer("max_connections_per_ip", minimum=1),
                 sender_must_match=s.boolean("sender_must_match"))
    s.reject_unknown()
    return cfg


def _load_access(s: _Section) -> AccessConfig:
    def port(name: str) -> Any:  # 0: that listener is off
        value = s.port(name, allow_zero=True)
        return None if value == 0 else value

    mail_user = s.string("mail_user")
    if mail_user is not MISSING and (not mail_user or mail_user == "root" or not _USER.fullmatch(mail_user)):
        mail_user = s.error("mail_user", f"{mail_user!r} is not a user name other than root")
    cfg = _build(AccessConfig, enabled=s.boolean("enabled"), listen=_listen(s, "listen"),
                 imap_port=port("imap_port"), imaps_port=port("imaps_port"), pop3_port=port("pop3_port"),
                 pop3s_port=port("pop3s_port"), imap4=s.boolean("imap4"), pop3=s.boolean("pop3"),
                 dovecot=s.string("dovecot"), mail_user=mail_user)
    s.reject_unknown()
    return cfg


_USER = re.compile(r"[a-z_][a-z0-9_-]*\$?")


def _load_restrictions(s: _Section, config_dir: Path) -> RestrictionsConfig:
    senders = []
    for i, entry in s.strings("filter_senders"):
        try:
            senders.append(check_entry(entry))
        except ValueError as exc:
            s.item_error("filter_senders", i, str(exc))
    turf = s.string("turf_dir")
    cfg = _build(
        RestrictionsConfig,
        relay_authenticated=s.boolean("relay_authenticated"),
        relay_internal_addresses=_networks(s, "relay_internal_addresses"),
        never_relay=_networks(s, "never_relay"),
        sender_must_match=s.boolean("sender_must_match"),
        accept=s.choice("accept", ACCEPT_MODES),
        accept_hosts=_networks(s, "accept_hosts"),
        reject_hosts=_networks(s, "reject_hosts"),
        filter_senders=tuple(senders),
        filter_action=s.choice("filter_action", FILTER_ACTIONS),
        turf_dir=(config_dir / turf) if turf else MISSING,
    )
    s.reject_unknown()
    return cfg


def _load_connections(c: _Section) -> ConnectionsConfig:
    cfg = _build(ConnectionsConfig, max_outbound=c.integer("max_outbound", minimum=1),
                 max_outbound_per_host=c.integer("max_outbound_per_host", minimum=1),
                 messages_per_connection=c.integer("messages_per_connection", minimum=0))
    c.reject_unknown()
    return cfg


def _load_priorities(p: _Section, delivery: DeliveryConfig) -> PriorityTimeouts:
    """Urgent and non-urgent Time-outs; normal ones are delivery.lifetime / delay_notice."""
    def get(value: Any, default: float | None) -> float | None:
        return default if value is MISSING else value

    urgent_lifetime = get(p.duration("urgent_lifetime"), DEFAULT_URGENT_LIFETIME)
    non_urgent_lifetime = get(p.duration("non_urgent_lifetime"), DEFAULT_NON_URGENT_LIFETIME)
    assert urgent_lifetime is not None and non_urgent_lifetime is not None
    cfg = PriorityTimeouts(
        urgent=Timeouts(urgent_lifetime, get(p.duration("urgent_delay_notice", off=None), delivery.delay_notice)),
        normal=Timeouts(delivery.lifetime, delivery.delay_notice),
        non_urgent=Timeouts(non_urgent_lifetime,
                            get(p.duration("non_urgent_delay_notice", off=None), delivery.delay_notice)))
    p.reject_unknown()
    return cfg


def _load_notifications(n: _Section) -> NotificationsConfig:
    cfg = _build(NotificationsConfig, administrator=n.string("administrator"), copy_ndrs=n.boolean("copy_ndrs"))
    if cfg.copy_ndrs and not cfg.administrator and not any(e.key == n.key("administrator") for e in n.errors):
        n.error("administrator", "copy_ndrs = true needs the administrator mailbox (alias or address)")
    n.reject_unknown()
    return cfg


def _load_etrn(e: _Section) -> EtrnConfig:
    requests = []
    for r in e.tables("requests"):
        host, port = MISSING, r.port("port")
        given = r.string("host", required=True)
        if given is not MISSING:
            try:
                host, port = parse_host_port(given, SMTP_PORT if port is MISSING else port)
            except ValueError as exc:
                r.error("host", str(exc))
        domain = _domain(r, "domain", r.string("domain", required=True))
        schedule = r.duration("schedule")
        if host is not MISSING and domain is not MISSING:
            requests.append(_build(EtrnRequest, host=host, port=port, domain=domain, schedule=schedule))
        r.reject_unknown()
    cfg = EtrnConfig(_networks(e, "allowed_hosts"), tuple(requests))
    e.reject_unknown()
    return cfg


def _load_link_monitors(root: _Section) -> tuple[LinkMonitorConfig, ...]:
    monitors: list[LinkMonitorConfig] = []
    names: set[str] = set()
    for m in root.tables("link_monitors"):
        name = m.string("name", required=True)
        if name is not MISSING and (not name.strip() or any(ord(c) < 32 for c in name)):
            name = m.error("name", "must be a non-empty name on one line")
        if name is not MISSING and name.lower() in names:
            name = m.error("name", f"a link monitor named {name!r} is already defined")
        elif name is not MISSING:
            names.add(name.lower())
        targets: list[str] = []
        for i, target in m.strings("targets"):
            text = target.strip()
            problem = _link_target_problem(text)
            if problem:
                m.item_error("targets", i, problem)
            elif text.lower() in (t.lower() for t in targets):
                m.item_error("targets", i, f"{text!r} is listed twice")
            else:
                targets.append(text)
        if not targets and not any(e.key.startswith(m.key("targets")) for e in m.errors):
            m.error("targets", "a link monitor needs at least one target (a site name or an address)")
        interval = m.duration("interval")
        warning = m.duration("warning_after")
        alert = m.duration("alert_after")
        notify = m.string("notify")
        for key, value in (("interval", interval), ("warning_after", warning), ("alert_after", alert)):
            if value is not MISSING and value <= 0:
                m.error(key, "must be more than 0")
        cfg = _build(LinkMonitorConfig, name=name if name is not MISSING else "", targets=tuple(targets),
                     interval=interval, warning_after=warning, alert_after=alert,
                     notify=notify.strip() if notify else MISSING)
        if cfg.warning_after >= cfg.alert_after:
            m.error("alert_after", f"must be longer than warning_after ({cfg.warning_after:g}s)")
        if name is not MISSING and targets:
            monitors.append(cfg)
        m.reject_unknown()
    return tuple(monitors)


def _link_target_problem(text: str) -> str | None:
    """Why a link monitor target is not a site name or an address (None: it is one)."""
    if "@" in text:
        try:
            parse_address(text)
        except AddressError as exc:
            return f"{text!r} is not an address: {exc}"
        return None
    if not _NAME.fullmatch(text):
        return f"{text!r} is neither a site name nor an address"
    return None


def _load_diagnostics(d: _Section) -> DiagnosticsConfig:
    levels = []
    for category in DIAGNOSTIC_CATEGORIES:
        value = d.choice(category, DIAGNOSTIC_LEVELS, fold=True)
        if value is not MISSING:
            levels.append((category, value))
    cfg = _build(DiagnosticsConfig, levels=tuple(levels),
                 protocol_log_max_bytes=d.integer("protocol_log_max_bytes", minimum=4096),
                 protocol_log_files=d.integer("protocol_log_files", minimum=1, maximum=100))
    d.reject_unknown()
    return cfg


def _load_metrics(m: _Section) -> MetricsConfig:
    cfg = _build(MetricsConfig, enabled=m.boolean("enabled"), require_token=m.boolean("require_token"))
    m.reject_unknown()
    return cfg


def load_config(path: Path | str, *, data_dir: Path | None = None) -> SiteConfig:
    """Load and validate one site's TOML file; raise ``ConfigErrors`` (every problem
    of the file) or ``ConfigError`` (the file cannot be read or parsed)."""
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
    return config_from_root(_Section(path, "", raw, []), data_dir=data_dir)


def config_from_root(root: _Section, *, data_dir: Path | None = None) -> SiteConfig:
    """The site's settings from its file's root table (``imsrelay.config.reference`` passes
    a section that records which key is read as what)."""
    errors = root.errors
    path = root.path
    config_dir = path.parent
    site = root.table_of("site")
    organisation = site.string("organisation", required=True)
    name = site.string("name", required=True)
    if name is not MISSING and not _NAME.fullmatch(name):
        name = site.error("name", f"{name!r} is not a site directory name (letters, digits, - _ .)")
    server = site.string("server", required=True)
    if server is not MISSING and _domain(site, "server", server) is MISSING:
        server = MISSING
    site_domain = _domain(site, "email_domain", site.string("email_domain", required=True))
    company = site.string("company_domain")
    company_domain = site_domain if company is MISSING else _domain(site, "company_domain", company)
    data = site.string("data_dir")
    site.reject_unknown()

    smtp_section = root.table_of("smtp")
    queue = _load_queue(root.table_of("queue"), smtp_section)
    smtp = _load_smtp(smtp_section, config_dir)
    mailboxes = _load_mailboxes(root)
    custom_recipients, distribution_lists = _load_recipients(root, mailboxes)
    servers = _load_servers(root, server)
    _check_home_servers(root, mailboxes, servers)
    delivery = _load_delivery(root.table_of("delivery"), config_dir)
    dns = _load_dns(root.table_of("dns"))
    connected = _load_connected_sites(root)
    routes = _load_email_domains(root, config_dir)
    internet_mail = _load_internet_mail(root)
    journaling = _load_journaling(root.table_of("journaling"))
    replication = _load_replication(root.table_of("replication"), config_dir)
    _check_bridgehead(root, replication, servers)
    admin = _load_admin(root.table_of("admin"))
    logging = _load_logging(root.table_of("logging"))
    transfer = _load_transfer(root.table_of("transfer"))
    connections = _load_connections(root.table_of("connections"))
    priorities = _load_priorities(root.table_of("priorities"), delivery)
    notifications = _load_notifications(root.table_of("notifications"))
    etrn = _load_etrn(root.table_of("etrn"))
    link_monitors = _load_link_monitors(root)
    diagnostics = _load_diagnostics(root.table_of("diagnostics"))
    metrics = _load_metrics(root.table_of("metrics"))
    routing = _load_routing(root.table_of("routing"))
    tracking = _load_tracking(root.table_of("tracking"))
    auth = _load_auth(root.table_of("auth"))
    submission = _load_submission(root.table_of("submission"))
    restrictions = _load_restrictions(root.table_of("restrictions"), config_dir)
    access = _load_access(root.table_of("access"))
    if access.enabled and (access.imaps_port or access.pop3s_port) and not (smtp.tls_cert or smtp.tls_generate):
        root.errors.append(ConfigError(path, "access.imaps_port" if access.imaps_port else "access.pop3s_port",
                                       "implicit TLS needs a certificate: set smtp.tls_cert and smtp.tls_key "
                                       "(or smtp.tls_generate = true), or set the port to 0"))
    if (submission.port is not None or submission.tls_port is not None) and not (
            smtp.tls_cert or smtp.tls_generate):
        root.errors.append(ConfigError(path, "submission.port" if submission.port is not None else
                                       "submission.tls_port",
                                       "submission listeners need TLS: set smtp.tls_cert and smtp.tls_key "
                                       "(or smtp.tls_generate = true for a throwaway lab certificate)"))
    console = _load_console(root.table_of("console"), admin)
    lab = _load_lab(root.table_of("lab"))
    if not errors:
        _check_sealed(root, lab, delivery=delivery, dns=dns, connected=connected, routes=routes, etrn=etrn,
                      mailboxes=mailboxes, servers=servers)
    root.reject_unknown()
    if errors:
        raise ConfigErrors(errors)

    if data_dir is None:
        data_dir = Path(f"data/{name}" if data is MISSING else data)
        if not data_dir.is_absolute():
            data_dir = config_dir / data_dir
    return SiteConfig(
        path=path, organisation=organisation, site=name, server=server,
        site_domain=site_domain, company_domain=company_domain, data_dir=data_dir,
        smtp=smtp, mailboxes=mailboxes, custom_recipients=custom_recipients,
        distribution_lists=distribution_lists, servers=servers, delivery=delivery, queue=queue, dns=dns,
        connected_sites=connected, email_domains=routes, internet_mail=internet_mail, journaling=journaling,
        replication=replication, admin=admin, logging=logging, routing=routing, tracking=tracking,
        auth=auth, submission=submission, restrictions=restrictions, access=access,
        transfer=transfer, connections=connections, priorities=priorities, notifications=notifications,
        etrn=etrn, link_monitors=link_monitors, diagnostics=diagnostics, metrics=metrics,
        console=console, lab=lab,
    )
