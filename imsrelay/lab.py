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
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from imsrelay.config import load_config
from imsrelay.logs import get_logger
from imsrelay.message_api import LabEndpoint
from imsrelay.org_setup import Endpoint, OrgSetup
from imsrelay.site import Site
from imsrelay.testing import LAB_API_HOST, LAB_TOKEN

ORGANISATION = "ExchangeORG"
COMPANY_DOMAIN = "microsoft.com"
LAB_KEY = "ExchangeORG-lab-replication-key"
ADMIN_TOKEN = LAB_TOKEN  # one token for every site's admin endpoint and the lab endpoint
ADMIN_PORT = 8025
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
INTERNET = LabSite("Internet", "mail", "127.10.10.100", "alice", "Alice (outside)")
INTERNET_DOMAIN = "example.net"

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


def site_mapping(site: LabSite, stage: int, *, port: int, data_dir: Path, fast: bool = True,
                 admin_port: int = ADMIN_PORT, startup_delay: str | None = None) -> dict[str, Any]:
    """The site's configuration at a stage of the walk (pure)."""
    others = [s for s in SITES if s is not site]
    mapping: dict[str, Any] = {
        "site": {"organisation": ORGANISATION, "name": site.name, "server": site.server,
                 "email_domain": site.domain, "company_domain": COMPANY_DOMAIN,
                 "data_dir": str(data_dir / site.name)},
        # lab users submit from 127.0.0.1; the sites trust each other; the Internet host
        # (127.10.10.100) is outside, so the sites are no open relay for it
        "smtp": {"listen": site.address, "port": port, "relay_networks": ["127.0.0.1/32", "127.10.10.0/27"]},
        "mailboxes": [{"alias": site.user, "display_name": site.display_name},
                      {"alias": "Administrator", "display_name": f"{site.name} Administrator"}],
        "delivery": {"retry_intervals": ["5s", "15s", "1m", "5m"] if fast else ["15m", "30m", "1h", "4h"],
                     "lifetime": "2d", "smart_host": f"{INTERNET.address}:{port}"},
        "replication": {"key": LAB_KEY, "startup_delay": startup_delay or ("10s" if fast else "5m")},
        "admin": {"listen": site.address, "port": admin_port, "token": ADMIN_TOKEN},
        "logging": {"level": "info", "format": "auto"},
    }
    if stage >= stage_index("connected-sites"):
        mapping["connected_sites"] = [{"name": o.name, "routing_address": f"@{o.domain}"} for o in others]
    if stage >= stage_index("domain-table"):
        mapping["email_domains"] = [{"domain": o.domain, "host": o.address, "port": port} for o in others]
    if stage >= stage_index("replication-connectors"):
        mapping["replication"]["connectors"] = [{"site": o.name, "schedule": "always"} for o in others]
    return mapping


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


def internet_mapping(*, port: int, data_dir: Path, admin_port: int = ADMIN_PORT) -> dict[str, Any]:
    """The outside world: owns example.net, forwards microsoft.com like the seed's MX records."""
    routes = [{"domain": s.domain, "host": s.address, "port": port} for s in SITES]
    routes.append({"domain": COMPANY_DOMAIN, "host": SITES[0].address, "port": port})  # MX -> Server1.SiteA
    return {
        "site": {"organisation": "Internet", "name": INTERNET.name, "server": INTERNET.server,
                 "email_domain": INTERNET_DOMAIN, "data_dir": str(data_dir / INTERNET.name)},
        "smtp": {"listen": INTERNET.address, "port": port, "relay_networks": ["127.0.0.0/8"]},
        "mailboxes": [{"alias": "alice", "display_name": "Alice"}, {"alias": "bob", "display_name": "Bob"}],
        "delivery": {"retry_intervals": ["5s", "15s", "1m"]},
        "email_domains": routes,
        "admin": {"listen": INTERNET.address, "port": admin_port, "token": ADMIN_TOKEN},  # the console's view
        "logging": {"level": "info", "format": "auto"},
    }


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
                 api_host: str = API_HOST, api_port: int | None = None) -> None:
        """``api_port``: the lab endpoint (message API for every host) on ``api_host``;
        None: no lab endpoint."""
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self._smtp_port = port  # the port in the config files: a private one while the lab builds its state
        self.api_host = api_host
        self.api_port = api_port
        self.endpoint: Any = None
        self._walking: str | None = "starting"  # why the lab is not at its announced stage yet
        self.fast = fast
        self.admin_port = admin_port
        self.startup_delay = startup_delay
        self.say = say
        self.sites: dict[str, Site] = {}
        self.config_dir = self.data_dir / "config"
        self.state_file = self.data_dir / "lab.json"
        self._mtimes: dict[str, float] = {}
        self.step_lock = asyncio.Lock()  # one "next step" at a time (`lab next`, the console)

    # ------------------------------------------------------------ state

    @property
    def stage(self) -> int:
        try:
            return int(json.loads(self.state_file.read_text())["stage"])
        except (FileNotFoundError, ValueError, KeyError):
            return -1

    def _save_stage(self, stage: int) -> None:
        self.state_file.write_text(json.dumps({"stage": stage, "name": STAGE_NAMES[stage]}))

    def config_path(self, name: str) -> Path:
        return self.config_dir / f"{name}.toml"

    def _write_configs(self, stage: int, *, internet: bool = False) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        header = "# Written by `imsrelay lab` for stage {}; edit it and the lab restarts the site.\n"
        for s in SITES:
            text = header.format(STAGE_NAMES[stage]) + tomli_w.dumps(
                site_mapping(s, stage, port=self._smtp_port, data_dir=self.data_dir, fast=self.fast,
                             admin_port=self.admin_port, startup_delay=self.startup_delay))
            self.config_path(s.name).write_text(text)
        path = self.config_path(INTERNET.name)
        if internet or not path.exists():  # the outside world does not change with the walk
            path.write_text("# Written by `imsrelay lab`: the Internet host (example.net, MX forwarding).\n"
                            + tomli_w.dumps(internet_mapping(port=self._smtp_port, data_dir=self.data_dir,
                                                            admin_port=self.admin_port)))

    # ------------------------------------------------------------ running

    async def start(self, target: int | None = None) -> None:
        """Start at the stored stage (first run: stage 0) and reach ``target`` *before*
        the announced SMTP port opens: the walk runs with every host on a private
        port, then the hosts restart on the lab's port (DESIGN.md invariant 10)."""
        if self.api_port is not None and self.endpoint is None:
            self.endpoint = LabEndpoint(lambda: list(self.sites.values()), host=self.api_host, port=self.api_port,
                                        token=ADMIN_TOKEN, log=get_logger("imsrelay").bind(site="lab"),
                                        lab_ready=self._not_ready_reason)
            await self.endpoint.start()
        current = self.stage
        if current < 0:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._write_configs(0)
            self._save_stage(0)
            current = 0
        if target is not None and target > current:
            self._walking = f"building stage {STAGE_NAMES[target]} on a private port before listening"
            self._smtp_port = private_port([INTERNET.address, *(s.address for s in SITES)])
            self._write_configs(current, internet=True)
            try:
                await self._start_all()
                await self.advance_to(target)
            finally:
                await self._stop_sites()
                self._smtp_port = self.port
                self._write_configs(max(self.stage, 0), internet=True)
        elif self._internet_port() != self.port:
            self._write_configs(current, internet=True)
        self._walking = "starting the hosts on the lab's port"
        await self._start_all()
        self._walking = None

    def _internet_port(self) -> int | None:
        try:
            return load_config(self.config_path(INTERNET.name)).smtp.port
        except Exception:
            return None

    async def _start_all(self) -> None:
        for name in [INTERNET.name] + [s.name for s in SITES]:
            await self._start_site(name)

    def _not_ready_reason(self) -> str | None:
        return self._walking

    @property
    def ready(self) -> bool:
        return self._walking is None and len(self.sites) == len(SITES) + 1 and all(
            s.readiness.report().ready for s in self.sites.values())

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
        site = Site(load_config(path))
        site.readiness.add("lab stage reached", lambda: None if self._walking is None else f"lab: {self._walking}")
        await site.start()
        self.sites[name] = site
        self._mtimes[name] = path.stat().st_mtime
        return site

    async def restart(self, name: str) -> None:
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
                    load_config(path)
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
            await self.next_stage()

    async def next_stage(self) -> str | None:
        stage = self.stage + 1
        if stage >= len(STAGES):
            return None
        name, text, kind = STAGES[stage]
        self.say(f"lab: stage {name}: {text}")
        walking, self._walking = self._walking, self._walking or f"taking the step to stage {name}"
        try:
            if kind == "config":
                self._write_configs(stage)
                for s in SITES:
                    await self.restart(s.name)
            else:
                await asyncio.to_thread(administrator_action, await self._administrator(), name)
                for site in self.sites.values():
                    await site.refresh()
            self._save_stage(stage)
        finally:
            self._walking = walking
        return name

    # ------------------------------------------------------------ the article's actions

    async def _administrator(self) -> OrgSetup:
        """The article's administrator, working as ``imsrelay org-setup`` does: over
        each site's admin endpoint (blocking client, so on a thread)."""
        org = OrgSetup([Endpoint(f"http://{s.address}:{self.admin_port}", ADMIN_TOKEN) for s in SITES],
                       say=lambda line: self.say("lab:" + line), poll=0.1)
        await asyncio.to_thread(org.wait_ready, 30.0)
        return org

    async def describe(self) -> str:
        stage = self.stage
        lines = [f"imsrelay lab: organisation {ORGANISATION}, data in {self.data_dir}",
                 f"stage {STAGE_NAMES[stage]}: {STAGES[stage][1]}", ""]
        if self.endpoint is not None:
            lines += [f"lab endpoint  {self.endpoint.url}/api/v1  (token {ADMIN_TOKEN}): every host's mail, "
                      f"search, wait, tracking; {self.endpoint.url}/ready", ""]
        for s in SITES:
            site = self.sites[s.name]
            boxes = await site.directory.run(site.directory.mailboxes, s.name)
            lines.append(f"{s.name}  SMTP {s.address}:{self.port}   admin http://{s.address}:{self.admin_port} "
                         f"(token {ADMIN_TOKEN})   config {self.config_path(s.name)}")
            for m in boxes:
                lines.append(f"    {m.alias:<14} {m.primary_address:<34} {self.data_dir / s.name / 'mailboxes' / m.alias}/")
        lines.append(f"Internet  SMTP {INTERNET.address}:{self.port}   {INTERNET_DOMAIN}: alice, bob "
                     f"({self.data_dir / INTERNET.name / 'mailboxes'}/); forwards microsoft.com like DNS MX")
        first = SITES[0]
        to = f"User2@{COMPANY_DOMAIN}" if stage == len(STAGES) - 1 else f"User2@{SITES[1].domain}"
        lines += ["", f"try:  swaks --server {first.address}:{self.port} -f user1@{first.domain} -t {to}",
                  "Ctrl-C stops the lab; the data stays for the next start."]
        return "\n".join(lines)
