"""The Link Monitor (KB Q246674) between real sites: pings to other sites' system
attendants and to a foreign address (its NDR answers), a ``faults`` link cut turning
a target to warning then alert, back up when cleared; the state in /link-monitors,
/metrics and /ready's details, alert and recovery mail to the administrator, and no
ping or answer in a user's Maildir."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json

import aiohttp
from ims_kit import TOKEN, admin
from sitekit import (
    free_port,
    maildir_messages,
    run_cli,
    site_mapping,
    wait_for,
    wait_http_ok,
    write_site_file,
)

from imsrelay.commands.serve import run_site
from imsrelay.site import Site

HOSTS = {"SiteA": "127.0.0.91", "SiteB": "127.0.0.92", "SiteC": "127.0.0.93"}
FOREIGN = "nobody@SiteC.microsoft.com"  # no such user: SiteC refuses it, the NDR is the answer
MONITOR = {"name": "Sites", "targets": ["SiteB", "SiteC", FOREIGN], "interval": "0.3s",
           "warning_after": "1s", "alert_after": "2s", "notify": "Administrator"}


def org_files(tmp_path):
    ports = {n: free_port(h) for n, h in HOSTS.items()}
    out = {}
    for name, host in HOSTS.items():
        others = [o for o in HOSTS if o != name]
        extra = {"link_monitors": [dict(MONITOR)]} if name == "SiteA" else {}
        mapping = site_mapping(
            name, listen=host, port=ports[name],
            connected_sites=[{"name": o, "routing_address": f"@{o}.microsoft.com"} for o in others],
            email_domains=[{"domain": f"{o}.microsoft.com", "host": HOSTS[o], "port": ports[o]} for o in others],
            delivery={"retry_intervals": [0.2], "connect_timeout": 5, "command_timeout": 5},
            replication={"key": "linkmon-test-key", "startup_delay": "1h",
                         "connectors": [{"site": o, "schedule": "never"} for o in others]},
            admin={"listen": host, "port": free_port(host), "token": TOKEN},
            logging={"level": "warning", "format": "json"}, **extra)
        out[name] = write_site_file(tmp_path, mapping)[1]
    return out


async def states(site: Site) -> dict[str, str]:
    body = await admin(site, "GET", "/link-monitors")
    return {t["target"]: t["state"] for m in body["monitors"] for t in m["targets"]}


def subjects(site: Site, alias: str) -> list[str]:
    return [str(email.message_from_bytes(raw, policy=email.policy.default)["Subject"])
            for raw in maildir_messages(site.config.data_dir, alias)]


async def test_a_cut_link_turns_the_monitor_to_warning_then_alert_and_back_up(tmp_path):
    configs = org_files(tmp_path)
    sites = {name: Site(cfg) for name, cfg in configs.items()}
    for s in sites.values():
        await s.start()
    a = sites["SiteA"]
    try:
        # every target answers: two system attendants and the foreign address's NDR
        assert await wait_for(lambda: _all(a, "up"), timeout=15)
        body = await admin(a, "GET", "/link-monitors")
        targets = {t["target"]: t for t in body["monitors"][0]["targets"]}
        assert all(t["answers"] >= 1 and t["last_rtt"] is not None for t in targets.values())
        assert body["monitors"][0]["state"] == "up"

        # the link to SiteB is cut: its target goes to warning, then alert; the others stay up
        await admin(a, "POST", "/faults", {"kind": "link", "peer": "SiteB"})
        await wait_for(lambda: _target(a, "SiteB", "warning"), timeout=10)
        await wait_for(lambda: _target(a, "SiteB", "alert"), timeout=10)
        now = await states(a)
        assert now["SiteC"] == "up" and now[FOREIGN] == "up"

        # /ready stays 200 and shows the state; /metrics says alert; the administrator got mail
        ready = await admin(a, "GET", "/ready")
        assert ready["ready"] is True
        assert ready["details"]["link monitors"]["Sites: SiteB"] == "alert"
        metrics = await _metrics(a)
        assert 'imsrelay_link_monitor_state{monitor="Sites",state="alert",target="SiteB"} 1.0' in metrics
        assert 'imsrelay_link_monitor_state{monitor="Sites",state="up",target="SiteC"} 1.0' in metrics
        await wait_for(lambda: "Link Monitor Sites: SiteB ALERT" in subjects(a, "Administrator"), timeout=10)

        # cleared: the queued pings go, SiteB answers, the target is up again, and the administrator is told
        await admin(a, "DELETE", "/faults")
        await wait_for(lambda: _target(a, "SiteB", "up"), timeout=15)
        await wait_for(lambda: "Link Monitor Sites: SiteB back up" in subjects(a, "Administrator"), timeout=10)

        # pings and their answers never land in a mailbox; only the administrator's alert mail does
        for name, site in sites.items():
            for alias in (site.config.mailboxes[0].alias, "Administrator"):
                for subject in subjects(site, alias):
                    assert name == "SiteA" and alias == "Administrator", (name, alias, subject)
                    assert subject.startswith("Link Monitor Sites: "), subject
        assert (await states(a))["SiteC"] == "up"
    finally:
        for s in sites.values():
            await s.stop()


async def _all(site: Site, state: str) -> bool:
    return set((await states(site)).values()) == {state}


async def _target(site: Site, target: str, state: str) -> bool:
    return (await states(site))[target] == state


async def _metrics(site: Site) -> str:
    async with aiohttp.ClientSession() as http, http.get(
            f"http://{HOSTS['SiteA']}:{site.admin.bound[1]}/metrics",
            headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        return await resp.text()


async def test_console_monitor_window_self_ping_and_local_ndr(tmp_path):
    """One site monitoring its own system attendant and an unknown user of its own
    domain (the local NDR is the answer): both come up; the console relays the
    monitor window's data and its live feed tells of the changes; ``imsrelay route``
    names the attendant."""
    admin_port, console_port, smtp_port = free_port(), free_port(), free_port()
    _, config = write_site_file(tmp_path, site_mapping(
        "SiteA", port=smtp_port, admin={"port": admin_port, "token": TOKEN},
        console={"enabled": True, "listen": "127.0.0.1", "port": console_port},
        link_monitors=[{"name": "Self", "targets": ["SiteA", "nobody@SiteA.microsoft.com"],
                        "interval": "0.5s", "warning_after": "5s", "alert_after": "10s"}]))
    stop = asyncio.Event()
    task = asyncio.create_task(run_site(config, stop))
    base = f"http://127.0.0.1:{console_port}"
    try:
        await wait_http_ok(base + "/")
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.post(base + "/login", json={"token": TOKEN}) as r:
                assert r.status == 200

            async def window() -> dict[str, str]:
                async with http.get(base + "/api/site/SiteA/link-monitors") as r:
                    assert r.status == 200
                    body = await r.json()
                return {t["target"]: t["state"] for m in body["monitors"] for t in m["targets"]}
            await wait_for(lambda: _all_up(window), timeout=20)
            async with http.get(base + "/api/events", timeout=aiohttp.ClientTimeout(total=30)) as events:
                topics: set[str] = set()
                deadline = asyncio.get_running_loop().time() + 20
                while "linkmon:SiteA" not in topics and asyncio.get_running_loop().time() < deadline:
                    line = await asyncio.wait_for(events.content.readline(), 20)
                    if line.startswith(b"data: "):
                        topics |= set(json.loads(line[6:])["topics"])
                assert "linkmon:SiteA" in topics  # the answers keep coming: the window redraws
        assert maildir_messages(config.data_dir, "User1") == []
        assert maildir_messages(config.data_dir, "Administrator") == []  # never alert: no mail
        code, out, _ = await asyncio.to_thread(run_cli, "route", "--config", str(config.path),
                                               "attendant@SiteA.microsoft.com")
        assert code == 0 and "system attendant" in out, out
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def _all_up(window) -> bool:
    return set((await window()).values()) == {"up"}
