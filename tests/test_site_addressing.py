"""The Site Addressing bulk job (KB Q196927's last step; Exchange events 2043/2044/2053),
through the directory, the admin endpoint and the CLI (online and --offline)."""

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import tomli_w
from sitekit import free_port, make_config, running_site, site_mapping
from structlog.testing import capture_logs

from imsrelay.directory.site_addressing import site_addressing_job
from imsrelay.directory.store import Directory, DirectoryError
from imsrelay.model.errors import ConfigError
from imsrelay.model.objects import DirObject, Stamp
from imsrelay.observe.logs import configure_logging, get_logger
from imsrelay.site import Site

TOKEN = "site-addressing-test-token"


def seed_directory(path: Path) -> Directory:
    d = Directory(path, "SiteA")
    d.provision(organisation="ExchangeORG", server="ServerA", site_domain="SiteA.microsoft.com",
                hostname="ServerA.SiteA.microsoft.com",
                mailboxes=[("User1", "User One", ()), ("Administrator", "SiteA Administrator", ()),
                           ("Sales", "Sales", ("smtp:sales@legacy.example",))])
    # SiteB already moved to @microsoft.com and its Administrator replicated here first
    d.apply([DirObject("mailbox:SiteB:administrator", "mailbox", "SiteB", Stamp(2, 50.0, "SiteB"), False,
                       {"alias": "Administrator", "display_name": "SiteB Administrator",
                        "proxy_addresses": ["SMTP:Administrator@microsoft.com",
                                            "smtp:Administrator@SiteB.microsoft.com"]})])
    return d


def test_bulk_update_counts_keeps_old_and_substitutes(tmp_path):
    d = seed_directory(tmp_path / "d.sqlite3")
    report = d.set_site_addressing("@microsoft.com", update_mailboxes=True, keep_old=True)
    assert (report.scanned, report.updated, report.failed) == (3, 3, 0)
    assert report.substitutes == (("Administrator", "Administrator2@microsoft.com"),)
    assert d.site_addressing() == "@microsoft.com"
    assert d.site_object().routing_address == "@SiteA.microsoft.com"  # routing address unchanged
    user1 = d.mailbox("User1")
    assert user1.proxy_addresses == ("SMTP:User1@microsoft.com", "smtp:User1@SiteA.microsoft.com")
    sales = d.mailbox("Sales")
    assert sales.proxy_addresses == ("SMTP:Sales@microsoft.com", "smtp:Sales@SiteA.microsoft.com",
                                     "smtp:sales@legacy.example")
    assert d.mailbox("Administrator").primary_address == "Administrator2@microsoft.com"
    # every address still finds its mailbox; the SiteB one keeps its address
    assert d.find_recipient("user1@SITEA.microsoft.com").alias == "User1"
    assert d.find_recipient("User1@microsoft.com").home_site == "SiteA"
    assert d.find_recipient("administrator@microsoft.com").home_site == "SiteB"
    assert d.find_recipient("administrator2@microsoft.com").home_site == "SiteA"
    # running it again changes nothing
    again = d.set_site_addressing("@microsoft.com", update_mailboxes=True, keep_old=True)
    assert (again.scanned, again.updated, again.failed, again.substitutes) == (3, 0, 0, ())
    # a mailbox created afterwards gets the new address
    assert d.add_mailbox("User4", "User Four").primary_address == "User4@microsoft.com"
    d.close()


def test_drop_old_address_as_exchange_55_did(tmp_path):
    d = seed_directory(tmp_path / "d.sqlite3")
    report = d.set_site_addressing("@microsoft.com", update_mailboxes=True, keep_old=False)
    assert (report.scanned, report.updated) == (3, 3)
    assert d.mailbox("User1").proxy_addresses == ("SMTP:User1@microsoft.com",)
    assert d.find_recipient("User1@SiteA.microsoft.com") is None
    # secondaries that were not the old primary stay
    assert d.mailbox("Sales").proxy_addresses == ("SMTP:Sales@microsoft.com", "smtp:sales@legacy.example")
    d.close()


def test_without_update_mailboxes_only_the_site_changes(tmp_path):
    d = seed_directory(tmp_path / "d.sqlite3")
    usn = d.highest_usn
    report = d.set_site_addressing("@microsoft.com", update_mailboxes=False)
    assert (report.scanned, report.updated, report.failed) == (0, 0, 0)
    assert d.highest_usn == usn + 1  # only the site object changed (and will replicate)
    assert d.mailbox("User1").primary_address == "User1@SiteA.microsoft.com"
    with pytest.raises(DirectoryError, match="is not a site address: give the site address as @domain"):
        d.set_site_addressing("microsoft.com", update_mailboxes=True)
    d.close()


@pytest.fixture
def info_logging():
    configure_logging("info", "json", stream=io.StringIO())
    yield
    configure_logging("warning", "json")


def test_bulk_job_logs_exchange_events(tmp_path, info_logging):
    d = seed_directory(tmp_path / "d.sqlite3")
    with capture_logs() as logs:
        site_addressing_job(d, get_logger("imsrelay").bind(site="SiteA"), "@microsoft.com",
                            update_mailboxes=True, keep_old=True)
    events = [(e["event"], e.get("event_id")) for e in logs]
    assert events == [("site_addressing.started", 2043), ("site_addressing.substitute", 2053),
                      ("site_addressing.finished", 2044)]
    finished = logs[-1]
    assert (finished["scanned"], finished["updated"], finished["failed"]) == (3, 3, 0)
    assert logs[1]["alias"] == "Administrator" and logs[1]["address"] == "Administrator2@microsoft.com"
    d.close()


# ------------------------------------------------------------------ admin endpoint and CLI


def site_with_admin(tmp_path, **extra):
    port = free_port()
    mapping = site_mapping("SiteA", listen="127.0.0.1",
                           admin={"listen": "127.0.0.1", "port": port, "token": TOKEN}, **extra)
    config = make_config(tmp_path, mapping)
    path = tmp_path / "SiteA.toml"
    mapping = dict(mapping, site={**mapping["site"], "data_dir": str(config.data_dir)})
    path.write_text(tomli_w.dumps(mapping))
    return config, path


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("IMSRELAY_ADMIN_TOKEN", "IMSRELAY_ORG_KEY")}
    return subprocess.run([sys.executable, "-m", "imsrelay", *args], capture_output=True, text=True,
                          timeout=60, env=env)


async def test_admin_endpoint_site_addressing_and_token(tmp_path):
    config, _ = site_with_admin(tmp_path)
    async with running_site(config) as site:
        base = f"http://127.0.0.1:{config.admin.port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/site-addressing", json={"address": "@microsoft.com"}) as r:
                assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
            async with http.get(f"{base}/status", headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with http.post(f"{base}/site-addressing", headers=auth,
                                 json={"address": "@microsoft.com", "update_mailboxes": True}) as r:
                assert r.status == 200
                report = await r.json()
            async with http.post(f"{base}/site-addressing", headers=auth, json={"address": "nope"}) as r:
                assert r.status == 400 and "is not a site address" in (await r.json())["error"]
            async with http.post(f"{base}/site-addressing", headers=auth, data=b"[") as r:
                assert r.status == 400
            async with http.get(f"{base}/nowhere", headers=auth) as r:
                assert r.status == 404 and "error" in await r.json()
        assert report == {"address": "@microsoft.com", "update_mailboxes": True, "keep_old": True,
                          "scanned": 2, "updated": 2, "failed": 0, "substitutes": []}
        assert site.addressing_domain == "microsoft.com"  # the running site uses it at once
        rules = await site.rewrite_rules()
        assert rules.active


def test_admin_port_without_token_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.delenv("IMSRELAY_ADMIN_TOKEN", raising=False)
    config = make_config(tmp_path, site_mapping("SiteA", admin={"port": free_port()}))
    with pytest.raises(ConfigError, match="admin.token"):
        Site(config)


async def test_cli_online_offline_and_not_running(tmp_path):
    config, path = site_with_admin(tmp_path)
    # not started yet: a clear one-line error, no traceback
    r = await asyncio.to_thread(cli, "site-addressing", "show", "--config", str(path))
    assert r.returncode == 3 and r.stderr.count("\n") == 1
    assert "site SiteA is not running" in r.stderr and "Traceback" not in r.stderr
    async with running_site(config):
        r = await asyncio.to_thread(cli, "site-addressing", "set", "@microsoft.com", "--update-mailboxes",
                                    "--config", str(path))
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [
            "SiteA: Site Addressing SMTP is now @microsoft.com",
            "recipients: 2 scanned, 2 updated, 0 failed (old primary kept as a secondary address)"]
        r = await asyncio.to_thread(cli, "site-addressing", "show", "--config", str(path))
        assert r.stdout.strip() == ("SiteA: Site Addressing SMTP @microsoft.com, routing address "
                                    "@SiteA.microsoft.com (site domain SiteA.microsoft.com)")
        r = await asyncio.to_thread(cli, "site-addressing", "set", "@example.org", "--offline",
                                    "--config", str(path))
        assert r.returncode == 2 and "is running: drop --offline" in r.stderr
    # stopped: --offline works on the database directly, and --drop-old drops
    r = await asyncio.to_thread(cli, "site-addressing", "set", "@corp.example", "--update-mailboxes",
                                "--drop-old", "--offline", "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert "recipients: 2 scanned, 2 updated, 0 failed (old primary address dropped)" in r.stdout
    r = await asyncio.to_thread(cli, "directory", "list", "--json", "--config", str(path))
    boxes = {m["alias"]: m["proxy_addresses"] for m in json.loads(r.stdout)["mailboxes"]}
    assert boxes["User1"] == ["SMTP:User1@corp.example", "smtp:User1@SiteA.microsoft.com"]
