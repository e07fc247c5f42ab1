"""The embedded three-site lab: KB Q196927's organisation on loopback addresses.

SiteA, SiteB and SiteC run as real sites (each its own SMTP server, queue,
directory and Maildirs) on 127.10.10.10, .15 and .20 — the seed's 10.10.10.x on
loopback — plus an "Internet" host on 127.10.10.100 that owns ``example.net`` and
forwards the ``microsoft.com`` domains to the sites the way the seed's DNS MX
records would (``microsoft.com`` → Server1.SiteA).  Every site reaches the Internet
through it as its smart host.

The lab walks the article's steps as *stages*; each stage is either a change to
the sites' configuration (written to ``<data>/config/<Site>.toml``, the sites are
restarted) or an administrator's action (Check Now, Request Now, Site Addressing).
By default the lab comes up in the article's end state; ``--stage install`` starts
at step 1 so the walk can be done by hand (``imsrelay lab next``, or by editing the
config files — a changed file restarts its site — and the usual CLI commands).

Where the walk stands is read from the files and directories themselves
(``imsrelay.lab.walk``), so what a person did by hand counts, and ``next`` only adds
what is missing (or refuses, saying what it would change).  The lab writes its files
with ``[[table]]`` blocks, the form a person adds by hand.  Replication runs by itself
only on Exchange's documented schedule when the walk is done by hand (a request 5
minutes after a site starts, then every 3 hours per connector); the lab's own fast
walk (to the end state) uses lab-speed values.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imsrelay.access.dovecot import DovecotUnavailable, find_dovecot
from imsrelay.admin.message_api import LabEndpoint
from imsrelay.config import toml_text
from imsrelay.config.loader import config_from_mapping, load_config
from imsrelay.directory.keys import public_key_text, site_key
from imsrelay.ingress.lab_ca import ensure_ca, ensure_certificate, trust_hint
from imsrelay.lab.org_setup import Endpoint, OrgSetup
from imsrelay.lab.walk import (
    ConfigEntries,
    ConfigPlan,
    StepState,
    action_step_missing,
    config_step_missing,
    plan_config_step,
    read_facts,
    read_raw,
)
from imsrelay.model.errors import ConfigError
from imsrelay.model.settings import AccessConfig, LabConfig, MailboxConfig, SiteConfig
from imsrelay.observe.logs import get_logger
from imsrelay.site import Site
from imsrelay.testing import LAB_API_HOST, LAB_PASSWORDS, LAB_TOKEN

ORGANISATION = "ExchangeORG"
COMPANY_DOMAIN = "microsoft.com"
ADMIN_TOKEN = LAB_TOKEN  # one token for every site's admin endpoint and the lab endpoint
ADMIN_PORT = 8025
SUBMISSION_PORT = 2587  # each site's RFC 6409 submission port (STARTTLS, AUTH before MAIL) on its address
SMTPS_PORT = 2465  # each site's RFC 8314 implicit-TLS submission port
# each site's IMAP4 and POP3 (Dovecot, imsrelay.access) on its address: 143/993/110/995 in the lab's range
ACCESS_PORTS = {"imap_port": 2143, "imaps_port": 2993, "pop3_port": 2110, "pop3s_port": 2995}

# The labs' test accounts (SMTP AUTH, IMAP4, POP3): only the scrypt hashes go into the
# sites' config files and directories; the passwords (imsrelay.testing.LAB_PASSWORDS)
# are documented in docs/tutorials/embedded-lab.md.
LAB_PASSWORD_HASHES = {
    "User1": "scrypt$16384$8$1$aW1zcmVsYXktbGFiLVVzZXIx$0f8ny3RdyGe8FvhLFWUhfnBjaSbP7S9bNSi3CpELc0A=",
    "User2": "scrypt$16384$8$1$aW1zcmVsYXktbGFiLVVzZXIy$A6ZFY1V9JzftjHdQSwtkJbfwo+uVuyaFvro8SwwKz9A=",
    "User3": "scrypt$16384$8$1$aW1zcmVsYXktbGFiLVVzZXIz$4ZYP3/TsCAeoinoq7tNz3XozCZitoMNnVBD6EtgHK9k=",
    "Administrator": "scrypt$16384$8$1$aW1zcmVsYXktbGFiLUFkbWluaXN0cmF0b3I=$Yv9Hq8RXb8rJCC0aEOuq7a4E+mbJNNIyy8F5f0TmEgw=",
}
API_HOST = LAB_API_HOST  # the lab endpoint: the message API for every host of the lab


@dataclass(frozen=True)
class LabSite:
    name: str
    server: str
    address: str
    user: str
    display_name: str

    @property
    def domain(self) -> str:
        return f"{self.name}.{COMPANY_DOMAIN}"


SITES = (
    LabSite("SiteA", "ServerA", "127.10.10.10", "User1", "User One"),
    LabSite("SiteB", "ServerB", "127.10.10.15", "User2", "User Two"),
    LabSite("SiteC", "ServerC", "127.10.10.20", "User3", "User Three"),
)
MAX_SERVERS = 5  # a site's servers take the addresses up to the next site's (.10-.14, .15-.19, .20-.24)


@dataclass(frozen=True)
class LabServer:
    """One server of a lab site run as several servers (``imsrelay lab --servers SiteA=2``)."""
    site: LabSite
    name: str
    address: str

    @property
    def first(self) -> bool:
        return self.name == self.site.server

    @property
    def key(self) -> str:
        """Its name among the lab's hosts (and its data directory): the site's for the
        first server, ``SiteA-Server1`` for the others."""
        return self.site.name if self.first else f"{self.site.name}-{self.name}"


def site_servers(site: LabSite, count: int) -> tuple[LabServer, ...]:
    """The servers of a lab site (pure): its own server on its address, then the next
    addresses.  SiteA's second is the seed's ``Server1`` (the MX names
    Server1.SiteA.microsoft.com, the A record ServerA.SiteA.microsoft.com)."""
    if not 1 <= count <= MAX_SERVERS:
        raise ValueError(f"{site.name}: 1 to {MAX_SERVERS} servers, not {count}")
    extra = ["Server1"] if site.name == "SiteA" else []
    extra += [f"{site.server}{i}" for i in range(2, count + 1)]
    base, last = site.address.rsplit(".", 1)
    names = [site.server, *extra][:count]
    return tuple(LabServer(site, n, f"{base}.{int(last) + i}") for i, n in enumerate(names))


def parse_servers(specs: list[str]) -> dict[str, int]:
    """``--servers SiteA=2`` (repeatable, or comma-separated) → ``{"SiteA": 2}`` (pure)."""
    out: dict[str, int] = {}
    names = {s.name.lower(): s.name for s in SITES}
    for spec in (x for arg in specs for x in arg.split(",") if x.strip()):
        name, sep, count = spec.strip().partition("=")
        if name.lower() not in names or not sep or not count.strip().isdigit():
            raise ValueError(f"--servers {spec.strip()!r}: give SITE=N with SITE one of "
                             f"{', '.join(s.name for s in SITES)} (e.g. SiteA=2)")
        site = next(s for s in SITES if s.name == names[name.lower()])
        site_servers(site, int(count))  # checks the count
        out[site.name] = int(count)
    return out


INTERNET = LabSite("Internet", "mail", "127.10.10.100", "alice", "Alice (outside)")
INTERNET_DOMAIN = "example.net"
# The Internet in a box: the Internet host keeps mail for every domain outside the
# organisation (and outside example.net) in this mailbox, "the rest of the Internet";
# every host of the lab is sealed (lab.sealed): no connection leaves loopback.
REST_OF_INTERNET = "rest-of-internet"
REST_OF_INTERNET_NAME = "The rest of the Internet"

# (name, what the article says, kind) — kind "config" changes the files, "action" runs a command.
STAGES: tuple[tuple[str, str, str], ...] = (
    ("install", "1. IMS installed at each site with its site domain (SiteX.microsoft.com)", "config"),
    ("connected-sites", "2-5. Connected Sites: each remote site by directory name, routing address SMTP @SiteX.microsoft.com", "config"),
    ("domain-table", "Domain-specific routing: E-Mail Domain table forwards SiteX.microsoft.com to the site's address", "config"),
    ("replication-connectors", "Directory Replication Connectors to every other site", "config"),
    ("check-now", "Check Now (knowledge consistency check) at each site", "action"),
    ("request-now", "Request Now, 'Update only new and modified items', at each site for each peer", "action"),
    ("site-addressing-a", "Single domain: SiteA Site Addressing @microsoft.com (update all mailboxes); SiteB and SiteC Request Now", "action"),
    ("site-addressing-b", "Repeat at SiteB; SiteA and SiteC Request Now", "action"),
    ("site-addressing-c", "Repeat at SiteC; SiteA and SiteB Request Now: every user is UserN@microsoft.com", "action"),
)
STAGE_NAMES = tuple(s[0] for s in STAGES)


def stage_index(name: str) -> int:
    if name == "end":
        return len(STAGES) - 1
    try:
        return STAGE_NAMES.index(name)
    except ValueError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}, end") from None


# Exchange's documented replication timing (reference: requests 5 minutes after
# start-up; a connector's default schedule is once every 3 hours) and the lab's fast walk.
EXCHANGE_STARTUP_DELAY, EXCHANGE_SCHEDULE = "5m", "3h"
FAST_STARTUP_DELAY, FAST_SCHEDULE = "10s", "always"
# The lab's users submit from 127.0.0.1 (the seed's workstations; the Docker lab's
# clients come through its gateway).  The sites are reached from their own addresses
# (outbound connections are bound to them), so the Internet host, 127.10.10.100, is
# outside every site's relay networks: a site is no open relay for it.
SITE_RELAY_NETWORKS = ["127.0.0.1/32"]
# The Internet host is the sites' ISP (their smart host): it relays for its customers,
# the sites, and for its own users' workstation.
INTERNET_RELAY_NETWORKS = ["127.0.0.1/32", "127.10.10.0/27"]
INTERNET_BANNER = "ESMTP"


# The lab's Link Monitor (KB Q246674), at SiteA: the other two sites' system attendants,
# and a foreign address whose NDR (from the Internet host: no such user) is the answer.
# Lab pace in the fast walk (a ping every 10 s, warning after 30 s, alert after 1 min);
# Exchange's defaults (15 min, 30 min, 60 min) when the walk is done by hand.
LINK_MONITOR_SITE = "SiteA"
LINK_MONITOR_FOREIGN = f"no-such-user@{INTERNET_DOMAIN}"


def link_monitor_entry(*, fast: bool) -> dict[str, Any]:
    """The ``[[link_monitors]]`` entry of the lab's monitoring site (pure)."""
    entry: dict[str, Any] = {"name": "Sites and the Internet",
                             "targets": [s.name for s in SITES if s.name != LINK_MONITOR_SITE]
                             + [LINK_MONITOR_FOREIGN], "notify": "Administrator"}
    if fast:
        entry.update(interval="10s", warning_after="30s", alert_after="1m")
    return entry


def stage_entries(site: LabSite, stage_name: str, *, port: int, hand: bool = False) -> ConfigEntries:
    """The ``[[table]]`` entries a configuration step adds to ``site``'s file (pure)."""
    others = [s for s in SITES if s is not site]
    if stage_name == "connected-sites":
        return (("connected_sites", "name",
                 tuple({"name": o.name, "routing_address": f"@{o.domain}"} for o in others)),)
    if stage_name == "domain-table":
        return (("email_domains", "domain",
                 tuple({"domain": o.domain, "host": o.address, "port": port} for o in others)),)
    if stage_name == "replication-connectors":
        schedule = EXCHANGE_SCHEDULE if hand else FAST_SCHEDULE
        return (("replication.connectors", "site", tuple({"site": o.name, "schedule": schedule} for o in others)),)
    return ()


def key_path(data_dir: Path, site: LabSite) -> Path:
    """Where the lab keeps ``site``'s replication private key."""
    return data_dir / "keys" / f"{site.name}.pem"


def site_mapping(site: LabSite, stage: int, *, port: int, data_dir: Path, trusted_keys: Mapping[str, str],
                 fast: bool = True, admin_port: int = ADMIN_PORT, startup_delay: str | None = None,
                 hand: bool = False, submission_port: int = SUBMISSION_PORT,
                 smtps_port: int = SMTPS_PORT, access_ports: Mapping[str, int] | None = None,
                 servers: tuple[LabServer, ...] = ()) -> dict[str, Any]:
    """The site's configuration at a stage of the walk (pure).  ``servers``: the site
    as several servers (``[[servers]]``, the mailboxes homed on the first one, which
    is also the bridgehead of the replication connectors).  TLS: the site's
    certificate from the lab CA in ``<data>/tls`` (``Lab.ensure_tls`` makes them).
    Replication: per-site keys, the site's own in ``<data>/keys/<Site>.pem``
    (``Lab.ensure_keys`` makes them) and ``trusted_keys``, every site's public key."""
    mapping: dict[str, Any] = {
        "site": {"organisation": ORGANISATION, "name": site.name, "server": site.server,
                 "email_domain": site.domain, "company_domain": COMPANY_DOMAIN,
                 "data_dir": str(data_dir / site.name)},
        "smtp": {"listen": site.address, "port": port, "relay_networks": list(SITE_RELAY_NETWORKS),
                 "tls_cert": str(data_dir / "tls" / f"{site.name}.crt"),
                 "tls_key": str(data_dir / "tls" / f"{site.name}.key")},
        # lab switch: AUTH also before STARTTLS on the main port, so smtplib.login() works as is
        "auth": {"allow_plaintext": True},
        # the submission ports show the safe setting (the main port keeps Exchange 5.5's default)
        "submission": {"port": submission_port, "tls_port": smtps_port, "sender_must_match": True},
        "access": access_mapping(access_ports or ACCESS_PORTS),
        "mailboxes": [{"alias": site.user, "display_name": site.display_name,
                       "password_hash": LAB_PASSWORD_HASHES[site.user]},
                      {"alias": "Administrator", "display_name": f"{site.name} Administrator",
                       "password_hash": LAB_PASSWORD_HASHES["Administrator"]}],
        "delivery": {"retry_intervals": ["5s", "15s", "1m", "5m"] if fast else ["15m", "30m", "1h", "4h"],
                     "lifetime": "1h" if fast else "2d", "smart_host": f"{INTERNET.address}:{port}"},
        # Time-outs by priority: the IMS's 24h/48h/72h with --exchange-timers, short ones in the lab
        "priorities": {"urgent_lifetime": "15m", "non_urgent_lifetime": "2h"} if fast else
                      {"urgent_lifetime": "1d", "non_urgent_lifetime": "3d"},
        "replication": {"signing_key": str(key_path(data_dir, site)),
                        "trusted_keys": {name: trusted_keys[name] for name in sorted(trusted_keys)},
                        "startup_delay": startup_delay or (EXCHANGE_STARTUP_DELAY if hand else FAST_STARTUP_DELAY)},
        "admin": {"listen": site.address, "port": admin_port, "token": ADMIN_TOKEN},
        "logging": {"level": "info", "format": "auto"},
        "lab": {"sealed": True},  # no connection leaves loopback; no system resolver
    }
    if site.name == LINK_MONITOR_SITE:
        mapping["link_monitors"] = [link_monitor_entry(fast=fast and not hand)]
    if len(servers) > 1:
        mapping["servers"] = [{"name": v.name, "host": v.address, "port": port,
                               "admin": f"http://{v.address}:{admin_port}"} for v in servers]
        for m in mapping["mailboxes"]:
            m["home_server"] = servers[0].name
        mapping["replication"]["bridgehead"] = servers[0].name
        if not hand:  # walking by hand: Exchange's 300 s + 30 s per server (KB Q199354)
            mapping["replication"]["intrasite_interval"] = "30s"
    for name in STAGE_NAMES[1:stage + 1]:
        for array, _, entries in stage_entries(site, name, port=port, hand=hand):
            table = mapping
            *parents, leaf = array.split(".")
            for part in parents:
                table = table.setdefault(part, {})
            table[leaf] = [dict(e) for e in entries]
    return mapping


def access_mapping(ports: Mapping[str, int]) -> dict[str, Any]:
    """The ``[access]`` table of a lab site: IMAP4 and POP3 on the site's address (pure)."""
    return {"enabled": True, **{k: ports[k] for k in ACCESS_PORTS}}


def access_lines(site: Site, address: str) -> list[str]:
    """What ``describe`` says about a running site's IMAP4 and POP3."""
    access = site.access
    if access is None:
        return []
    endpoints = access.endpoints
    if endpoints is None:
        return [f"       IMAP4/POP3 not running: {access.problem}"]
    p = endpoints.ports
    parts = [f"{address}:{p[k]} ({what})" for k, what in (("imap", "IMAP4, STARTTLS"), ("imaps", "IMAP4 TLS"),
                                                          ("pop3", "POP3, STLS"), ("pop3s", "POP3 TLS")) if k in p]
    return ["       mail access " + "   ".join(parts)]


def private_port(addresses: list[str], attempts: int = 50) -> int:
    """A TCP port free on every one of ``addresses`` (for the lab's build phase)."""
    for _ in range(attempts):
        with socket.socket() as first:
            first.bind((addresses[0], 0))
            port = first.getsockname()[1]
            try:
                for a in addresses[1:]:
                    with socket.socket() as other:
                        other.bind((a, port))
            except OSError:
                continue
            return int(port)
    raise OSError(f"no TCP port is free on all of {', '.join(addresses)}")


def internet_mapping(*, port: int, data_dir: Path, admin_port: int = ADMIN_PORT,
                     mx_host: str | None = None) -> dict[str, Any]:
    """The outside world: owns example.net, forwards microsoft.com like the seed's MX records,
    keeps the mail for every other domain in its catch-all mailbox (the rest of the
    Internet, sealed: nothing leaves the lab) and greets as an ordinary Internet MTA.
    ``mx_host``: microsoft.com's MX hosts (``a,b``: equal preference, used in turn) when SiteA
    runs as several servers; else SiteA's one server."""
    routes = [{"domain": s.domain, "host": s.address, "port": port} for s in SITES]
    routes.append({"domain": COMPANY_DOMAIN, "host": mx_host or SITES[0].address, "port": port})  # MX -> Server1.SiteA
    return {
        "site": {"organisation": "Internet", "name": INTERNET.name, "server": INTERNET.server,
                 "email_domain": INTERNET_DOMAIN, "data_dir": str(data_dir / INTERNET.name)},
        "smtp": {"listen": INTERNET.address, "port": port, "relay_networks": list(INTERNET_RELAY_NETWORKS),
                 "hostname": f"{INTERNET.server}.{INTERNET_DOMAIN}", "banner": INTERNET_BANNER},
        "mailboxes": [{"alias": "alice", "display_name": "Alice"}, {"alias": "bob", "display_name": "Bob"},
                      {"alias": REST_OF_INTERNET, "display_name": REST_OF_INTERNET_NAME}],
        "delivery": {"retry_intervals": ["5s", "15s", "1m"]},
        "email_domains": routes,
        "admin": {"listen": INTERNET.address, "port": admin_port, "token": ADMIN_TOKEN},  # the console's view
        "logging": {"level": "info", "format": "auto"},
        "lab": {"sealed": True, "catch_all": REST_OF_INTERNET},
    }


def sealed_config(config: SiteConfig) -> SiteConfig:
    """``config`` as a host of the embedded lab runs it: sealed to loopback (the file's
    own lab.networks if it is sealed), and the Internet host with its catch-all
    mailbox (pure)."""
    lab = config.lab if config.lab.sealed else LabConfig(sealed=True)
    mailboxes = config.mailboxes
    if config.site == INTERNET.name and lab.catch_all is None:
        lab = dataclasses.replace(lab, catch_all=REST_OF_INTERNET)
        if REST_OF_INTERNET not in {m.alias.lower() for m in mailboxes}:
            mailboxes = (*mailboxes, MailboxConfig(REST_OF_INTERNET, REST_OF_INTERNET_NAME))
    return dataclasses.replace(config, lab=lab, mailboxes=mailboxes)


class LabStepRefused(Exception):
    """``lab next`` would have to change what a person wrote: one line saying what."""


SITE_ADDRESSING_STAGES = {"site-addressing-a": "SiteA", "site-addressing-b": "SiteB", "site-addressing-c": "SiteC"}


def administrator_action(org: OrgSetup, stage: str, timeout: float = 120.0) -> None:
    """Do the administrator's action of an "action" stage, as ``imsrelay org-setup``
    does it (blocking; every lab that walks the article uses this, the embedded one
    and the compose walk): Check Now at each site; Request Now between the sites
    until every one knows every mailbox (then Check Now again); Site Addressing
    @microsoft.com at one site, replicated to the others."""
    if stage == "check-now":
        org.check_now()
    elif stage == "request-now":
        org.replicate_all(timeout)
        org.check_now()
    elif stage in SITE_ADDRESSING_STAGES:
        org.site_addressing(SITE_ADDRESSING_STAGES[stage], f"@{COMPANY_DOMAIN}", timeout)
    else:
        raise ValueError(f"stage {stage!r} is not an administrator's action")


class Lab:
    """Runs the four hosts in this process; advances the walk stage by stage."""

    def __init__(self, data_dir: Path, *, port: int = 2525, fast: bool = True, admin_port: int = ADMIN_PORT,
                 startup_delay: str | None = None, say: Callable[[str], None] = print,
                 hand: bool = False, detail: Callable[[str], None] | None = None,
                 api_host: str = API_HOST, api_port: int | None = None,
                 submission_port: int = SUBMISSION_PORT, smtps_port: int = SMTPS_PORT,
                 access_ports: Mapping[str, int] | None = None, dovecot: str = AccessConfig().dovecot,
                 servers: Mapping[str, int] | None = None) -> None:
        """``servers``: sites run as several servers (``{"SiteA": 2}``: ServerA and Server1,
        each its own process-like host with its own address, data and queue; written
        into the files at the first start).
        ``api_port``: the lab endpoint (message API for every host) on ``api_host``;
        None: no lab endpoint.  ``submission_port``/``smtps_port``: each site's 587/465;
        ``access_ports``: its IMAP4/POP3 ports (``ACCESS_PORTS``' keys) (all written
        into the files at the first start); ``dovecot``: the Dovecot the sites run."""
        self.submission_port = submission_port
        self.servers = {s.name: site_servers(s, (servers or {}).get(s.name, 1)) for s in SITES}
        # the hosts besides each site's first server: host key -> its server
        self.extra_servers = {v.key: v for vs in self.servers.values() for v in vs if not v.first}
        self.smtps_port = smtps_port
        self.access_ports = dict(access_ports or ACCESS_PORTS)
        self.dovecot = dovecot
        self.no_access: str | None = None  # why the sites run without IMAP4/POP3 (Dovecot missing)
        self.data_dir = Path(data_dir).resolve()
        self.config_dir = self.data_dir / "config"
        self.port = self._port_in_files() or port
        self._smtp_port = self.port  # the port the hosts run on: a private one while the lab builds its state
        self.api_host = api_host
        self.api_port = api_port
        self.endpoint: Any = None
        self._walking: str | None = "starting"  # why the lab is not at its announced stage yet
        self.fast = fast
        self.admin_port = admin_port
        self.startup_delay = startup_delay
        self.hand = hand  # a person walks by hand: Exchange's replication timing in what the lab writes
        self.say = say
        self.detail = detail or (lambda line: None)
        self.sites: dict[str, Site] = {}
        self._mtimes: dict[str, float] = {}
        self._restarts: set[asyncio.Task[None]] = set()
        self._restart_lock = asyncio.Lock()
        self.step_lock = asyncio.Lock()  # one "next step" at a time (`lab next`, the console)
        self._raw_cache: dict[Path, tuple[tuple[int, int, int], dict[str, Any] | str]] = {}
        self._config_cache: dict[Path, tuple[tuple[int, int, int], SiteConfig | ConfigError]] = {}

    # ------------------------------------------------------------ state (read from the files)

    def config_path(self, name: str) -> Path:
        """The file a host runs from (a site's other servers run from the site's file)."""
        extra = self.extra_servers.get(name)
        return self.config_dir / f"{extra.site.name if extra else name}.toml"

    def hosts_of(self, site: str) -> list[str]:
        """The lab's hosts that run from ``site``'s file: its servers."""
        return [site] + [k for k, v in self.extra_servers.items() if v.site.name == site]

    def _file_key(self, path: Path) -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read_raw(self, path: Path) -> dict[str, Any] | str:
        """``read_raw``, remembered while the file is unchanged (the walk asks for every
        file many times per step; each file is parsed again only when it changes)."""
        key = self._file_key(path)
        cached = self._raw_cache.get(path)
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        raw = read_raw(path)
        if key is not None:
            self._raw_cache[path] = (key, raw)
        return raw

    def _load_config(self, path: Path) -> SiteConfig:
        """``load_config``, remembered while the file is unchanged (its error too)."""
        key = self._file_key(path)
        cached = self._config_cache.get(path)
        if key is None or cached is None or cached[0] != key:
            try:
                result: SiteConfig | ConfigError = load_config(path)
            except ConfigError as exc:
                result = exc
            if key is None:
                if isinstance(result, ConfigError):
                    raise result
                return result
            cached = self._config_cache[path] = (key, result)
        if isinstance(cached[1], ConfigError):
            raise cached[1]
        return cached[1]

    def _port_in_files(self) -> int | None:
        raw = read_raw(self.config_path(SITES[0].name))
        port = raw.get("smtp", {}).get("port") if isinstance(raw, dict) else None
        return port if isinstance(port, int) and port > 0 else None

    @property
    def exists(self) -> bool:
        return any(self.config_path(s.name).exists() for s in SITES)

    def _plans(self, stage_name: str) -> list[ConfigPlan]:
        plans = []
        for s in SITES:
            raw = self._read_raw(self.config_path(s.name))
            if isinstance(raw, str):
                plans.append(ConfigPlan(s.name, (), (raw,)))
                continue
            plans.append(plan_config_step(s.name, self.config_path(s.name).name, raw,
                                          stage_entries(s, stage_name, port=self.port, hand=self.hand)))
        return plans

    def _data_dir_of(self, site: LabSite) -> Path:
        try:
            return self._load_config(self.config_path(site.name)).data_dir
        except ConfigError:
            return self.data_dir / site.name

    def observe(self) -> tuple[StepState, ...]:
        """Every step of the walk: done or not, and what is missing (reads only)."""
        steps: list[StepState] = []
        install_missing = []
        for s in SITES:
            try:
                self._load_config(self.config_path(s.name))
            except ConfigError as exc:
                install_missing.append(str(exc))
        steps.append(StepState(STAGES[0][0], STAGES[0][1], not install_missing, tuple(install_missing)))
        facts = None
        for name, text, kind in STAGES[1:]:
            if kind == "config":
                missing = config_step_missing(self._plans(name))
            else:
                if facts is None:
                    facts = {s.name: read_facts(self._data_dir_of(s) / "directory.sqlite3", s.name) for s in SITES}
                missing = action_step_missing(name, [(s.name, s.user) for s in SITES], facts, COMPANY_DOMAIN)
            steps.append(StepState(name, text, not missing, tuple(missing)))
        return tuple(steps)

    @property
    def stage(self) -> int:
        """The last step done with every step before it done (-1: no lab here yet)."""
        if not self.exists:
            return -1
        done = -1
        for i, step in enumerate(self.observe()):
            if not step.done:
                break
            done = i
        return done

    def status_lines(self, running: str) -> list[str]:
        steps = self.observe()
        reached = -1
        for i, step in enumerate(steps):
            if not step.done:
                break
            reached = i
        at_end = reached == len(steps) - 1
        name = "end" if at_end else (STAGE_NAMES[reached] if reached >= 0 else "none")
        lines = [f"stage {name}" + (" (every step of KB Q196927 is done)" if at_end else "")
                 + f"; lab {running}; data in {self.data_dir}"]
        for i, step in enumerate(steps):
            mark = "done" if step.done else "todo"
            lines.append(f"  {mark}  {step.name:<24} {step.text}")
            if i == reached + 1:
                lines += [f"          missing: {m}" for m in step.missing]
        if not at_end:
            lines.append(f"next: {steps[reached + 1].name} (imsrelay lab next, or by hand)")
        return lines

    def ensure_keys(self) -> dict[str, str]:
        """Each site's replication key in ``<data>/keys`` (made once, kept across
        restarts) and the organisation's trusted public keys, by site."""
        return {s.name: public_key_text(site_key(key_path(self.data_dir, s))) for s in SITES}

    def _write_install(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        header = ("# Written by `imsrelay lab` (KB Q196927 step 1: IMS installed). Edit it and the lab\n"
                  "# restarts the site; `imsrelay lab next` adds the next step's [[tables]] and keeps yours.\n"
                  "# Replication: this site's own Ed25519 key (signing_key, made by the lab) and every\n"
                  "# site's public key ([replication.trusted_keys]).\n")
        trusted = self.ensure_keys()
        for s in SITES:
            path = self.config_path(s.name)
            if not path.exists():
                path.write_text(header + toml_text.dumps(
                    site_mapping(s, 0, port=self.port, data_dir=self.data_dir, trusted_keys=trusted, fast=self.fast,
                                 admin_port=self.admin_port, startup_delay=self.startup_delay, hand=self.hand,
                                 submission_port=self.submission_port, smtps_port=self.smtps_port,
                                 access_ports=self.access_ports, servers=self.servers[s.name])))
            elif len(self.servers[s.name]) > 1:
                raw = self._read_raw(path)
                if not (isinstance(raw, dict) and raw.get("servers")):
                    raise ValueError(f"{path} was written for a site of one server: --servers {s.name}="
                                     f"{len(self.servers[s.name])} needs a new lab (another --data), or [[servers]] "
                                     "added to the file by hand")
        internet = self.config_path(INTERNET.name)
        if not internet.exists():  # the outside world does not change with the walk
            internet.write_text("# Written by `imsrelay lab`: the Internet host (example.net, MX forwarding).\n"
                                + toml_text.dumps(internet_mapping(port=self.port, data_dir=self.data_dir,
                                                                 admin_port=self.admin_port,
                                                                 mx_host=self._mx_host())))

    def _mx_host(self) -> str | None:
        """When SiteA runs as several servers: all of them as microsoft.com's MX hosts of equal
        preference, Server1 (the seed's MX record) first, used in turn like equal-preference MX
        (KB Q279323's host list); else None (SiteA's one server)."""
        servers = self.servers[SITES[0].name]
        if len(servers) < 2:
            return None
        return ",".join(v.address for v in sorted(servers, key=lambda v: v.name != "Server1"))

    def _append_entries(self, stage_name: str, plans: list[ConfigPlan]) -> list[str]:
        """Append the missing ``[[table]]`` entries to each file, keeping every line a
        person wrote; returns the names of the sites whose file changed."""
        changed = []
        for plan in plans:
            if not plan.additions:
                continue
            path = self.config_path(plan.site)
            text = path.read_text(encoding="utf-8")
            blocks = "\n".join(toml_text.table_block(array, entry) for array, entry in plan.additions)
            new = text.rstrip("\n") + f"\n\n# Added by `imsrelay lab next` (stage {stage_name})\n" + blocks
            try:
                raw = tomllib.loads(new)
            except tomllib.TOMLDecodeError:
                # the file holds the array inline (`connected_sites = [...]`): write it
                # again in [[table]] form with the same content plus the additions
                raw = tomllib.loads(text)
                for array, entry in plan.additions:
                    table = raw
                    *parents, leaf = array.split(".")
                    for part in parents:
                        table = table.setdefault(part, {})
                    table.setdefault(leaf, []).append(entry)
                new = toml_text.dumps(raw)
            config_from_mapping(raw, path)  # never write a file the site would refuse
            tmp = path.with_suffix(".toml.tmp")
            tmp.write_text(new, encoding="utf-8")
            os.replace(tmp, path)
            changed.append(plan.site)
        return changed

    # ------------------------------------------------------------ running

    async def start(self, target: int | None = None) -> None:
        """Start the hosts (first run: write step 1's files) and reach ``target``
        *before* the announced SMTP port opens: the walk runs with every host on a
        private port (the files keep the lab's port; the hosts run with it replaced),
        then the hosts restart on the lab's port (docs/design.md invariant 10)."""
        if self.api_port is not None and self.endpoint is None:
            self.endpoint = LabEndpoint(lambda: list(self.sites.values()), host=self.api_host, port=self.api_port,
                                        token=ADMIN_TOKEN, log=get_logger("imsrelay").bind(site="lab"),
                                        lab_ready=self._not_ready_reason)
            await self.endpoint.start()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.ensure_tls)
        self._check_access()
        self._write_install()
        if target is not None and target > self.stage:
            self._walking = f"building stage {STAGE_NAMES[target]} on a private port before listening"
            self._smtp_port = private_port([INTERNET.address, *(v.address for vs in self.servers.values()
                                                                 for v in vs)])
            try:
                await self._start_all()
                await self.advance_to(target)
            except LabStepRefused as exc:  # what a person wrote stops the walk: say so, keep running
                self.say(str(exc))
            finally:
                await self._stop_sites()
                self._smtp_port = self.port
        self._walking = "starting the hosts on the lab's port"
        await self._start_all()
        self._walking = None

    @property
    def ca_cert(self) -> Path:
        return self.data_dir / "tls" / "ca.crt"

    def ensure_tls(self) -> None:
        """The lab's throwaway CA and each site's certificate (its server name and address)."""
        tls = self.data_dir / "tls"
        ca = ensure_ca(tls)
        for s in SITES:
            ensure_certificate(tls, s.name, ca=ca, hostnames=[f"{s.server}.{s.domain}", s.domain],
                               addresses=[s.address])
        for v in self.extra_servers.values():
            ensure_certificate(tls, v.key, ca=ca, hostnames=[f"{v.name}.{v.site.domain}", v.site.domain],
                               addresses=[v.address])

    async def _start_all(self) -> None:
        for name in [INTERNET.name] + [s.name for s in SITES] + list(self.extra_servers):
            await self._start_site(name)

    def _check_access(self) -> None:
        """IMAP4/POP3 need Dovecot: without it, say so in one line and run without."""
        try:
            find_dovecot(self.dovecot)
        except DovecotUnavailable as exc:
            self.no_access = str(exc)
            self.say(f"lab: no IMAP4/POP3: {exc}")

    def _not_ready_reason(self) -> str | None:
        return self._walking

    @property
    def ready(self) -> bool:
        return self._walking is None and len(self.sites) == len(SITES) + 1 + len(self.extra_servers) and all(
            s.readiness.report().ready for s in self.sites.values())

    def _running_config(self, config: SiteConfig) -> SiteConfig:
        """The host's settings as it runs now: always sealed (a file written before
        the lab was sealed, or edited, cannot open the lab: the Internet host keeps
        the rest of the Internet in its catch-all mailbox); while the lab builds its
        state on a private port, every use of the lab's port (listener, smart host,
        E-Mail Domain entries) is that private port instead, and no submission
        listener opens; the file is not changed."""
        config = sealed_config(config)
        if config.access.enabled:
            config = dataclasses.replace(config, access=dataclasses.replace(
                config.access, enabled=self.no_access is None, dovecot=self.dovecot))
        if self._smtp_port == self.port:
            return config
        swap = {self.port: self._smtp_port}
        servers = tuple(dataclasses.replace(v, port=swap.get(v.port, v.port)) for v in config.servers)
        smtp = dataclasses.replace(config.smtp, port=swap.get(config.smtp.port, config.smtp.port))
        delivery = dataclasses.replace(config.delivery, smart_host_port=swap.get(
            config.delivery.smart_host_port, config.delivery.smart_host_port))
        routes = tuple(dataclasses.replace(r, port=swap.get(r.port, r.port)) for r in config.email_domains)
        submission = dataclasses.replace(config.submission, port=None, tls_port=None)
        access = dataclasses.replace(config.access, enabled=False)  # no IMAP/POP3 until the lab's port
        return dataclasses.replace(config, smtp=smtp, delivery=delivery, email_domains=routes, submission=submission,
                                   access=access, servers=servers)

    def _server_config(self, config: SiteConfig, server: LabServer) -> SiteConfig:
        """Another server of a site, run from the site's file (pure): its own name,
        address, data directory, certificate and admin endpoint; no IMAP4/POP3 of its own
        (the site's mailboxes are homed on its first server)."""
        tls = self.data_dir / "tls"
        smtp = dataclasses.replace(config.smtp, listen=server.address, tls_cert=tls / f"{server.key}.crt",
                                   tls_key=tls / f"{server.key}.key")
        return dataclasses.replace(
            config, server=server.name, data_dir=self.data_dir / server.key, smtp=smtp,
            admin=dataclasses.replace(config.admin, listen=server.address),
            access=dataclasses.replace(config.access, enabled=False))

    async def stop(self) -> None:
        await self._stop_sites()
        if self.endpoint is not None:
            await self.endpoint.stop()
            self.endpoint = None

    async def _stop_sites(self) -> None:
        for name in list(self.sites):
            await self.sites.pop(name).stop()

    async def _start_site(self, name: str) -> Site:
        path = self.config_path(name)
        config = self._load_config(path)
        extra = self.extra_servers.get(name)
        if extra is not None:
            config = self._server_config(config, extra)
        site = Site(self._running_config(config))
        site.on_restart = lambda: self._restart_soon(name)
        site.readiness.add("lab stage reached", lambda: None if self._walking is None else f"lab: {self._walking}")
        await site.start()
        self.sites[name] = site
        self._mtimes[name] = path.stat().st_mtime
        return site

    def _restart_soon(self, name: str) -> None:
        """A site's administrator asked to restart its IMS (``POST /ims/restart``)."""
        task = asyncio.get_running_loop().create_task(self.restart(name), name=f"restart-{name}")
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def restart(self, name: str) -> None:
        async with self._restart_lock:
            old = self.sites.pop(name, None)
            if old is not None:
                await old.stop()
            await self._start_site(name)

    async def restart_changed(self) -> list[str]:
        """Restart the sites whose config file changed (an administrator edited it)."""
        changed = []
        for name in list(self.sites):
            path = self.config_path(name)
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            if mtime != self._mtimes.get(name):
                try:
                    self._load_config(path)
                except Exception as exc:
                    self.say(f"lab: {path} not applied: {exc}")
                    self._mtimes[name] = mtime
                    continue
                self.say(f"lab: {path.name} changed, restarting {name}")
                await self.restart(name)
                changed.append(name)
        return changed

    async def advance_to(self, target: int) -> None:
        while self.stage < target:
            before = self.stage
            await self.next_stage()
            if self.stage <= before:
                missing = "; ".join(self.observe()[before + 1].missing)
                raise LabStepRefused(f"lab: stage {STAGE_NAMES[before + 1]} is still not done: {missing}")

    async def next_stage(self) -> str | None:
        """Do the first step of the walk that is not done yet (whatever was done by
        hand counts); ``LabStepRefused`` when it would change what a person wrote."""
        steps = self.observe()
        todo = next((i for i, step in enumerate(steps) if not step.done), None)
        if todo is None:
            return None
        name, text, kind = STAGES[todo]
        if kind == "config":
            plans = self._plans(name)
            conflicts = [c for p in plans for c in p.conflicts]
            if conflicts:
                raise LabStepRefused(f"lab next: stage {name} not done, nothing changed: {conflicts[0]}"
                                     + (f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else "")
                                     + "; correct or remove that entry, then run lab next again")
        elif todo == 0:
            raise LabStepRefused("lab next: step install is not done: " + "; ".join(steps[0].missing))
        self.say(f"lab: stage {name}: {text}")
        walking, self._walking = self._walking, self._walking or f"taking the step to stage {name}"
        try:
            if kind == "config":
                for changed in self._append_entries(name, plans):
                    for host in self.hosts_of(changed):
                        await self.restart(host)
            else:
                await asyncio.to_thread(administrator_action, await self._administrator(), name)
                for site in self.sites.values():
                    await site.refresh()
        finally:
            self._walking = walking
        return name

    # ------------------------------------------------------------ the article's actions

    async def _administrator(self) -> OrgSetup:
        """The article's administrator, working as ``imsrelay org-setup`` does: over
        each site's admin endpoint (blocking client, so on a thread)."""
        org = OrgSetup([Endpoint(f"http://{s.address}:{self._admin_port_of(s)}", ADMIN_TOKEN) for s in SITES],
                       say=lambda line: self.detail("lab:" + line), poll=0.02)  # loopback: ask often
        await asyncio.to_thread(org.wait_ready, 30.0)
        return org

    def _admin_port_of(self, site: LabSite) -> int:
        running = self.sites.get(site.name)
        return running.config.admin.port if running is not None else self.admin_port

    async def describe(self) -> str:
        stage = self.stage
        if stage == len(STAGES) - 1:
            where = "stage end: every step of KB Q196927 is done; every user is UserN@microsoft.com"
        else:
            where = f"stage {STAGE_NAMES[max(stage, 0)]}: {STAGES[max(stage, 0)][1]}"
        lines = [f"imsrelay lab: organisation {ORGANISATION}, data in {self.data_dir}", where, ""]
        if self.endpoint is not None:
            lines += [f"lab endpoint  {self.endpoint.url}/api/v1  (token {ADMIN_TOKEN}): every host's mail, "
                      f"search, wait, tracking; {self.endpoint.url}/ready", ""]
        for s in SITES:
            site = self.sites[s.name]
            boxes = await site.directory.run(site.directory.mailboxes, s.name)
            lines.append(f"{s.name}  SMTP {s.address}:{self.port}   admin http://{s.address}:{self._admin_port_of(s)} "
                         f"(token {ADMIN_TOKEN})   config {self.config_path(s.name)}")
            ports = site.submission_ports
            if ports:
                lines.append("       submission " + "   ".join(
                    f"{s.address}:{ports[k]} ({what})" for k, what in (("submission", "STARTTLS + AUTH"),
                                                                      ("smtps", "TLS + AUTH")) if k in ports))
            lines += access_lines(site, s.address)
            servers = self.servers[s.name]
            for m in boxes:
                password = LAB_PASSWORDS.get(m.alias, "") if ports else ""
                where = next((v.key for v in servers if v.name.lower() == m.home_server.lower()), s.name)
                lines.append(f"    {m.alias:<14} {m.primary_address:<34} {self.data_dir / where / 'mailboxes' / m.alias}/"
                             + (f"  password {password}" if password else ""))
            for v in servers[1:]:
                other = self.sites.get(v.key)
                admin = other.config.admin.port if other is not None else self.admin_port
                lines.append(f"  {s.name} also runs {v.name}: SMTP {v.address}:{self.port}   admin "
                             f"http://{v.address}:{admin}   data {self.data_dir / v.key} (the same users: it "
                             f"relays to their home server; the directory replicates within the site)")

        lines.append(f"Internet  SMTP {INTERNET.address}:{self.port}   {INTERNET_DOMAIN}: alice, bob "
                     f"({self.data_dir / INTERNET.name / 'mailboxes'}/); forwards microsoft.com like DNS MX")
        lines.append(f"          every other domain: kept in {REST_OF_INTERNET} (the rest of the Internet); "
                     "no connection leaves the lab")
        first = SITES[0]
        to = f"User2@{COMPANY_DOMAIN}" if stage == len(STAGES) - 1 else f"User2@{SITES[1].domain}"
        lines += ["", trust_hint(self.ca_cert),
                  "", f"try:  swaks --server {first.address}:{self.port} -f user1@{first.domain} -t {to}"]
        sub = self.sites[first.name].submission_ports.get("submission")
        if sub:
            lines.append(f"      swaks --server {first.address}:{sub} --tls --tls-ca-path {self.ca_cert} "
                         f"--auth PLAIN --auth-user User1 --auth-password {LAB_PASSWORDS['User1']} "
                         f"-f user1@{first.domain} -t alice@{INTERNET_DOMAIN}")
        access = self.sites[first.name].access
        if access is not None and access.endpoints is not None and "imap" in access.endpoints.ports:
            lines.append(f"      curl --ssl-reqd --cacert {self.ca_cert} -u User1:{LAB_PASSWORDS['User1']} "
                         f"imap://{first.address}:{access.endpoints.ports['imap']}/INBOX?ALL")
        lines.append("Ctrl-C stops the lab; the data stays for the next start.")
        return "\n".join(lines)
