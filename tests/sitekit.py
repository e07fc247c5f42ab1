"""Helpers for tests that run real sites on loopback (no mocks of what can run here):
free ports, site mappings and configs, sending mail (``send_mail``, ``rcpt_reply``),
running sites, and ``Organisation`` — KB Q196927's three sites, each with its own
config file (the ``organisation`` fixture of conftest.py builds them)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import smtplib
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from imsrelay import cli
from imsrelay.config.loader import config_from_mapping
from imsrelay.model.settings import SiteConfig
from imsrelay.site import Site
from imsrelay.transport.maildir import list_messages, mailbox_dir

SEED = {
    "SiteA": ("ServerA", "User1", "User One"),
    "SiteB": ("ServerB", "User2", "User Two"),
    "SiteC": ("ServerC", "User3", "User Three"),
}


def free_port(host: str = "127.0.0.1", *, udp: bool = False) -> int:
    """A free TCP port on ``host`` (``udp``: free for both UDP and TCP, e.g. for a DNS
    server).  Racy by nature: servers bound to it retry or fail clearly."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as first:
            first.bind((host, 0))
            port = first.getsockname()[1]
            if not udp:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port


def wait_smtp(host: str, port: int, timeout: float = 15.0) -> None:
    """Block until an SMTP server answers at host:port (a site started as a process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with smtplib.SMTP(host, port, timeout=2) as s:
                s.noop()
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"no SMTP server started at {host}:{port}")


def send_mail(host: str, port: int, sender: str, rcpts: str | Sequence[str], message: bytes, *,
              mail_options: Sequence[str] = (), source: str | None = None,
              timeout: float = 10.0) -> dict[str, tuple[int, bytes]]:
    """One SMTP transaction (blocking; run it on a thread beside sites on the test's
    loop); returns smtplib's refused recipients, raises on a refusal of them all."""
    with smtplib.SMTP(host, port, timeout=timeout, source_address=(source, 0) if source else None) as s:
        return s.sendmail(sender, [rcpts] if isinstance(rcpts, str) else list(rcpts), message,
                          mail_options=list(mail_options))


def rcpt_reply(host: str, port: int, rcpt: str, *, sender: str = "someone@example.net",
               helo: str = "client.example", source: str | None = None, timeout: float = 15.0) -> tuple[int, bytes]:
    """The server's reply to RCPT TO for ``rcpt`` (blocking)."""
    with smtplib.SMTP(host, port, timeout=timeout, source_address=(source, 0) if source else None) as s:
        s.ehlo(helo)
        s.mail(sender)
        return s.rcpt(rcpt)


def simple_message(sender: str, rcpt: str, subject: str, body: str = "hello") -> bytes:
    return f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def site_mapping(name: str = "SiteA", *, listen: str = "127.0.0.1", port: int = 0,
                 mailboxes: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    """A seed-like site as a TOML mapping; ``extra`` is deep-merged over it."""
    server, user, display = SEED.get(name, (f"Server{name[-1]}", f"User{name[-1]}", name))
    base: dict[str, Any] = {
        "site": {"organisation": "ExchangeORG", "name": name, "server": server,
                 "email_domain": f"{name}.microsoft.com", "company_domain": "microsoft.com"},
        "smtp": {"listen": listen, "port": port, "relay_networks": ["127.0.0.0/8"]},
        "mailboxes": mailboxes if mailboxes is not None else [
            {"alias": user, "display_name": display},
            {"alias": "Administrator", "display_name": f"{name} Administrator"}],
        "delivery": {"retry_intervals": [0.2, 0.5, 1]},
        "replication": {"key": "test-org-key", "startup_delay": 3600},
        "logging": {"level": "debug", "format": "json"},
    }
    return deep_merge(base, extra)


def make_config(tmp_path: Path, mapping: dict[str, Any]) -> SiteConfig:
    name = mapping["site"]["name"]
    return config_from_mapping(mapping, tmp_path / f"{name}.toml", data_dir=tmp_path / name)


def config_of(mapping: dict[str, Any]) -> SiteConfig:
    """A site's settings from a mapping, with no file and no directory (pure tests)."""
    name = mapping["site"]["name"]
    return config_from_mapping(mapping, Path(f"{name}.toml"), data_dir=Path(name))


def write_site_file(tmp_path: Path, mapping: dict[str, Any]) -> tuple[Path, SiteConfig]:
    """Write a site's TOML file (data in ``tmp_path/<name>``) and load it back."""
    name = mapping["site"]["name"]
    mapping["site"]["data_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(mapping))
    return path, config_from_mapping(mapping, path)


@contextlib.asynccontextmanager
async def running_site(config: SiteConfig) -> AsyncIterator[Site]:
    site = Site(config)
    await site.start()
    try:
        yield site
    finally:
        await site.stop()


def maildir_messages(data_dir: Path, alias: str) -> list[bytes]:
    return [p.read_bytes() for p in list_messages(mailbox_dir(data_dir, alias))]


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` (sync or async) until truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def wait_http_ok(url: str, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200 (a console or endpoint that is starting)."""
    import aiohttp

    async def answers() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(url) as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False
    await wait_for(answers, timeout=timeout)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """The real CLI in this process: (exit status, stdout, stderr); blocking."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


ORG_HOSTS = {"SiteA": "127.0.0.11", "SiteB": "127.0.0.12", "SiteC": "127.0.0.13"}
ORG_KEY = "ExchangeORG-test-key"
ORG_TOKEN = "admin-test-token"


class Organisation:
    """ExchangeORG's three sites as in KB Q196927, each with its own config file and
    admin endpoint, on loopback addresses ``hosts``; E-Mail Domain entries point at
    each other's listen addresses (no DNS).  ``links``: who connects to whom."""

    def __init__(self, tmp_path: Path, *, hosts: dict[str, str] | None = None,
                 links: dict[str, list[str]] | None = None,
                 mailboxes: dict[str, list[dict[str, Any]]] | None = None, batch_size: int = 500,
                 schedule: str = "never", startup_delay: str = "1h",
                 routing: dict[str, dict[str, str]] | None = None, token: str = ORG_TOKEN,
                 per_site_keys: bool = False, extra: dict[str, dict[str, Any]] | None = None) -> None:
        """``per_site_keys``: each site signs with its own Ed25519 key (``imsrelay
        replicate keygen``) and trusts the others' public keys, instead of the org key.
        ``extra``: by site, more settings (lists such as ``email_domains`` are appended to)."""
        self.tmp = tmp_path
        self.hosts = hosts or ORG_HOSTS
        trusted = self.make_keys() if per_site_keys else {}
        self.token = token
        self.links = links or {n: [o for o in self.hosts if o != n] for n in self.hosts}
        self.ports = {n: free_port(h) for n, h in self.hosts.items()}
        self.admin_ports = {n: free_port(h) for n, h in self.hosts.items()}
        self.paths: dict[str, Path] = {}
        self.configs: dict[str, SiteConfig] = {}
        for name in self.hosts:
            others = self.links.get(name, [])
            mapping = site_mapping(
                name, listen=self.hosts[name], port=self.ports[name],
                connected_sites=[{"name": o, "routing_address": (routing or {}).get(name, {}).get(
                    o, f"@{o}.microsoft.com")} for o in others],
                email_domains=[{"domain": f"{o}.microsoft.com", "host": self.hosts[o], "port": self.ports[o]}
                               for o in others],
                delivery={"retry_intervals": [0.2, 0.5], "connect_timeout": 5, "command_timeout": 20},
                replication={"key": ORG_KEY, "startup_delay": startup_delay, "batch_size": batch_size,
                             "connectors": [{"site": o, "schedule": schedule} for o in others]},
                admin={"listen": self.hosts[name], "port": self.admin_ports[name], "token": token},
                logging={"level": "warning", "format": "json"})
            if per_site_keys:
                del mapping["replication"]["key"]
                mapping["replication"]["signing_key"] = str(tmp_path / "keys" / f"{name}.pem")
                mapping["replication"]["trusted_keys"] = trusted
            if mailboxes and name in mailboxes:
                mapping["mailboxes"] = mailboxes[name]
            for key, value in (extra or {}).get(name, {}).items():
                if isinstance(value, list) and isinstance(mapping.get(key), list):
                    mapping[key] = mapping[key] + value
                else:
                    mapping = deep_merge(mapping, {key: value})
            self.paths[name], self.configs[name] = write_site_file(tmp_path, mapping)
        self.sites: dict[str, Site] = {}

    def make_keys(self) -> dict[str, str]:
        """Each site's key pair with ``imsrelay replicate keygen``: the trusted keys table."""
        trusted = {}
        for name in self.hosts:
            code, out, err = run_cli("replicate", "keygen", "--site", name,
                                     "--out", str(self.tmp / "keys" / f"{name}.pem"))
            assert code == 0, err
            site, _, value = out.strip().partition(" = ")
            trusted[site] = value.strip('"')
        return trusted

    async def start(self, *names: str) -> None:
        for name in names or tuple(self.hosts):
            site = Site(self.configs[name])
            await site.start()
            self.sites[name] = site

    async def stop(self, name: str) -> None:
        await self.sites.pop(name).stop()

    async def close(self) -> None:
        for name in list(self.sites):
            await self.stop(name)

    def data(self, name: str) -> Path:
        return self.configs[name].data_dir

    def url(self, name: str) -> str:
        return f"http://{self.hosts[name]}:{self.admin_ports[name]}"

    def site_args(self, token: str | None = None) -> list[str]:
        return [a for n in self.hosts for a in ("--site", f"{self.url(n)}={token or self.token}")]

    async def cli(self, *args: str, site: str | None = None) -> tuple[int, str, str]:
        """Run the real CLI (in-process, on a thread) against a site's config file."""
        argv = list(args) + (["--config", str(self.paths[site])] if site else [])
        return await asyncio.to_thread(run_cli, *argv)

    async def ok(self, *args: str, site: str) -> str:
        code, out, err = await self.cli(*args, site=site)
        assert code == 0, f"imsrelay {' '.join(args)} at {site}: {err}"
        return out

    async def request_now(self, at: str, source: str, *, full: bool = False) -> str:
        return await self.ok("replicate", "request-now", "--site", source, *(["--all"] if full else []), site=at)

    async def knows(self, at: str, alias: str, home: str, *, address: str | None = None,
                    timeout: float = 20.0) -> Any:
        d = self.sites[at].directory

        def check() -> Any:
            m = d.mailbox(alias, home)
            if m is None:
                return None
            if address and address.lower() not in (a.lower() for a in m.smtp_addresses):
                return None
            return m

        return await wait_for(lambda: d.run(check), timeout=timeout)

    async def quiet(self, *names: str) -> None:
        """Every queue empty (all replication traffic delivered)."""
        await wait_for(lambda: all(not self.sites[n].qmgr.envelopes for n in names or self.sites), timeout=20)

    async def usns(self) -> dict[str, int]:
        return {n: await s.directory.run(lambda d=s.directory: d.highest_usn) for n, s in self.sites.items()}

    async def primaries(self, at: str) -> dict[tuple[str, str], str]:
        d = self.sites[at].directory
        return {(m.home_site, m.alias): m.primary_address for m in await d.run(d.mailboxes)}
