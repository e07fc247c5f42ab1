"""Helpers for tests that run real sites on loopback (no mocks of what can run here)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from imsrelay.config import SiteConfig, config_from_mapping
from imsrelay.maildir import list_messages, mailbox_dir
from imsrelay.site import Site

SEED = {
    "SiteA": ("ServerA", "User1", "User One"),
    "SiteB": ("ServerB", "User2", "User Two"),
    "SiteC": ("ServerC", "User3", "User Three"),
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
    import tomli_w

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
