"""The Docker lab with SiteA as two servers (docker/servers.override.yml): the files
each server reads are what the generator writes, they load, and they agree with each
other, with the compose override's addresses and with the lab DNS's equal-preference MX
(checked without Docker; the containers themselves run in the compose tests)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from imsrelay.config.loader import load_config
from imsrelay.lab.docker_configs import (
    COMPOSE_ADDRESSES,
    COMPOSE_ADMIN_PORT,
    COMPOSE_KEY_PATH,
    CONFIG_DIR,
    SERVERS_DIR,
    committed_public_keys,
    compose_server_toml,
    compose_servers,
    compose_site_mapping,
    regenerate_keys,
    server_config_name,
)
from imsrelay.lab.embedded import SITES, STAGE_NAMES, site_servers

yaml = pytest.importorskip("yaml")
REPO = Path(__file__).resolve().parents[1]
OVERRIDE = REPO / "docker" / "servers.override.yml"
ZONES = CONFIG_DIR / SERVERS_DIR / "dns"


def test_the_committed_server_files_are_the_generators():
    for server in compose_servers():
        path = CONFIG_DIR / SERVERS_DIR / f"{server_config_name(server)}.toml"
        assert path.read_text(encoding="utf-8") == compose_server_toml(server), \
            f"{path} is stale: python -m imsrelay.lab.docker_configs servers"


def test_the_two_servers_agree_with_each_other_and_with_the_embedded_lab():
    servers = compose_servers()
    assert [v.name for v in servers] == [v.name for v in site_servers(SITES[0], 2)] == ["ServerA", "Server1"]
    assert [v.address for v in servers] == [COMPOSE_ADDRESSES["SiteA"], "10.10.10.11"]
    configs = {v.name: load_config(CONFIG_DIR / SERVERS_DIR / f"{server_config_name(v)}.toml") for v in servers}
    lists = {name: c.servers for name, c in configs.items()}
    assert lists["ServerA"] == lists["Server1"]  # one [[servers]] table for the site
    assert [(s.name, s.host, s.admin) for s in lists["ServerA"]] == [
        (v.name, v.address, f"http://{v.address}:{COMPOSE_ADMIN_PORT}") for v in servers]
    single = compose_site_mapping(SITES[0], len(STAGE_NAMES) - 1, committed_public_keys())
    for name, c in configs.items():
        assert c.server == name and c.site == "SiteA" and c.bridgehead == (name == "ServerA")
        assert [(m.alias, m.home_server) for m in c.mailboxes] == [("User1", "ServerA"), ("Administrator", "ServerA")]
        assert dict(c.replication.trusted_keys) == committed_public_keys()
        assert c.replication.signing_key == Path(COMPOSE_KEY_PATH)
        assert [e.domain for e in c.email_domains] == [e["domain"] for e in single["email_domains"]]
        assert c.replication.intrasite_interval is not None and c.replication.intrasite_interval < 300


def test_the_override_runs_each_server_at_its_address_with_its_own_file_and_volume():
    override = yaml.safe_load(OVERRIDE.read_text())
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = {"ServerA": "sitea", "Server1": "sitea-server1"}
    for server in compose_servers():
        service = services[server.name]
        mine = override["services"][service]
        address = (mine.get("networks") or base["services"][service]["networks"])["lab"]["ipv4_address"]
        assert address == server.address
        assert f"./config/docker/{SERVERS_DIR}/{server_config_name(server)}.toml:/etc/imsrelay/site.toml:ro" \
            in mine["volumes"]
    server1 = override["services"]["sitea-server1"]
    assert "./config/docker/keys/siteA.pem:" + COMPOSE_KEY_PATH + ":ro" in server1["volumes"]
    assert "sitea-server1-data:/var/lib/imsrelay" in server1["volumes"] and "sitea-server1-data" in override["volumes"]
    assert {p.split(":")[1] for p in server1["ports"]}.isdisjoint(
        {p.split(":")[1] for s in base["services"].values() for p in s.get("ports", [])})
    for zone in ("microsoft.com.zone", "10.10.10.in-addr.arpa.zone"):
        assert f"./config/docker/{SERVERS_DIR}/dns/{zone}:/etc/nsd/zones/{zone}:ro" in override["services"]["dns"]["volumes"]


def _records(path: Path, origin: str) -> list[tuple[str, str, str]]:
    """(name, type, data) of a simple zone file (the lab's: one record a line, owner or blank)."""
    out, owner = [], "@"
    for line in path.read_text().splitlines():
        line = line.split(";", 1)[0].rstrip()
        m = re.match(r"^(\S+)?\s+IN\s+(A|MX|PTR)\s+(.+)$", line)
        if not m:
            continue
        owner = m.group(1) or owner
        out.append((owner if owner != "@" else origin, m.group(2), " ".join(m.group(3).split())))
    return out


def test_the_lab_dns_gives_both_servers_as_mx_of_equal_preference():
    records = _records(ZONES / "microsoft.com.zone", "microsoft.com.")
    a = {name: data for name, kind, data in records if kind == "A"}
    for server in compose_servers():
        assert a[f"{server.name}.SiteA"] == server.address
    for owner in ("microsoft.com.", "SiteA"):
        mx = sorted(data for name, kind, data in records if kind == "MX" and name == owner)
        assert mx == ["10 Server1.SiteA.microsoft.com.", "10 ServerA.SiteA.microsoft.com."], owner
    ptr = {name: data for name, kind, data in _records(ZONES / "10.10.10.in-addr.arpa.zone", "") if kind == "PTR"}
    assert ptr["10"] == "ServerA.SiteA.microsoft.com." and ptr["11"] == "Server1.SiteA.microsoft.com."
    nsd = shutil.which("nsd-checkzone") or "/usr/sbin/nsd-checkzone"
    if Path(nsd).exists():
        for zone, name in (("microsoft.com.zone", "microsoft.com"), ("10.10.10.in-addr.arpa.zone", "10.10.10.in-addr.arpa")):
            done = subprocess.run([nsd, name, str(ZONES / zone)], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stdout + done.stderr


def test_new_lab_keys_reach_the_server_files(tmp_path: Path):
    config_dir = tmp_path / "docker"
    shutil.copytree(CONFIG_DIR, config_dir)
    new = regenerate_keys(config_dir, say=lambda line: None)
    for server in compose_servers():
        text = (config_dir / SERVERS_DIR / f"{server_config_name(server)}.toml").read_text()
        assert tomllib.loads(text)["replication"]["trusted_keys"] == new
