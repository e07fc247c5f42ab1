"""``imsrelay org-setup``: KB Q196927's administrator actions over real sites' admin
endpoints (three real sites on loopback, real SMTP between them for replication).

The compose lab runs the same command as its `setup` service (tests/test_compose_lab.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import smtplib
from pathlib import Path

import pytest
from sitekit import free_port, maildir_messages, site_mapping, wait_for, write_site_file

from imsrelay import cli
from imsrelay.commands.org_setup import lagging, needs_site_addressing, view_of
from imsrelay.site import Site

HOSTS = {"SiteA": "127.0.0.21", "SiteB": "127.0.0.22", "SiteC": "127.0.0.23"}
TOKEN = "org-setup-test-token"


class Org:
    def __init__(self, tmp_path: Path) -> None:
        self.ports = {n: free_port(h) for n, h in HOSTS.items()}
        self.admin_ports = {n: free_port(h) for n, h in HOSTS.items()}
        self.paths: dict[str, Path] = {}
        self.configs = {}
        for name, host in HOSTS.items():
            others = [o for o in HOSTS if o != name]
            mapping = site_mapping(
                name, listen=host, port=self.ports[name],
                connected_sites=[{"name": o, "routing_address": f"@{o}.microsoft.com"} for o in others],
                email_domains=[{"domain": f"{o}.microsoft.com", "host": HOSTS[o], "port": self.ports[o]}
                               for o in others],
                delivery={"retry_intervals": [0.2, 0.5], "connect_timeout": 5},
                replication={"key": "org-setup-test-key", "startup_delay": "1h",
                             "connectors": [{"site": o, "schedule": "never"} for o in others]},
                admin={"listen": host, "port": self.admin_ports[name], "token": TOKEN},
                logging={"level": "warning", "format": "json"})
            self.paths[name], self.configs[name] = write_site_file(tmp_path, mapping)
        self.sites: dict[str, Site] = {}

    def url(self, name: str) -> str:
        return f"http://{HOSTS[name]}:{self.admin_ports[name]}"

    def site_args(self, token: str = TOKEN) -> list[str]:
        return [a for n in HOSTS for a in ("--site", f"{self.url(n)}={token}")]

    async def start(self) -> None:
        for name in HOSTS:
            site = Site(self.configs[name])
            await site.start()
            self.sites[name] = site

    async def close(self) -> None:
        for name in list(self.sites):
            await self.sites.pop(name).stop()

    async def usns(self) -> dict[str, int]:
        return {n: await s.directory.run(lambda d=s.directory: d.highest_usn) for n, s in self.sites.items()}

    async def primaries(self, at: str) -> dict[tuple[str, str], str]:
        d = self.sites[at].directory
        return {(m.home_site, m.alias): m.primary_address for m in await d.run(d.mailboxes)}


async def run_cli(*argv: str) -> tuple[int, str, str]:
    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    return await asyncio.to_thread(run)


@pytest.fixture
async def org(tmp_path):
    o = Org(tmp_path)
    await o.start()
    try:
        yield o
    finally:
        await o.close()


END_STATE = {
    ("SiteA", "User1"): "User1@microsoft.com", ("SiteA", "Administrator"): "Administrator@microsoft.com",
    ("SiteB", "User2"): "User2@microsoft.com", ("SiteB", "Administrator"): "Administrator2@microsoft.com",
    ("SiteC", "User3"): "User3@microsoft.com", ("SiteC", "Administrator"): "Administrator3@microsoft.com",
}


async def test_org_setup_reaches_the_articles_end_state_then_changes_nothing(org: Org):
    code, out, err = await run_cli("org-setup", *org.site_args(), "--timeout", "60")
    assert code == 0, err
    # the article's order: Check Now, Request Now, then Site Addressing A, B, C in turn
    assert out.index("Check Now at SiteA") < out.index("Request Now at SiteA from SiteB")
    assert out.index("Single e-mail domain at SiteA") < out.index("Single e-mail domain at SiteB") \
        < out.index("Single e-mail domain at SiteC")
    assert "Administrator -> Administrator2@microsoft.com (not unique)" in out
    for name in HOSTS:
        assert await org.primaries(name) == END_STATE
    # mail to the company address, sent to any site, reaches the home site's Maildir
    def send() -> None:  # a thread: the sites run on this test's event loop
        with smtplib.SMTP(HOSTS["SiteC"], org.ports["SiteC"], timeout=10) as s:
            s.sendmail("alice@example.net", ["User2@microsoft.com"],
                       b"From: alice@example.net\r\nSubject: org-setup\r\n\r\nhi\r\n")

    await asyncio.to_thread(send)
    await wait_for(lambda: maildir_messages(org.configs["SiteB"].data_dir, "User2"), timeout=15)

    before = await org.usns()
    await wait_for(lambda: all(s.qmgr.backlog == 0 for s in org.sites.values()), timeout=15)
    code, out, err = await run_cli("org-setup", *org.site_args())
    assert code == 0, err
    assert "already set up: nothing changed" in out
    assert "(queue id" not in out and "update all recipient mailboxes" not in out  # no Request Now sent
    assert await org.usns() == before  # no directory write anywhere
    assert all(s.qmgr.backlog == 0 for s in org.sites.values())  # no replication traffic


async def test_check_reports_what_is_missing_and_changes_nothing(org: Org):
    before = await org.usns()
    code, out, _ = await run_cli("org-setup", "--check", *org.site_args())
    assert code == 1
    assert "SiteB does not know mailbox User1@SiteA.microsoft.com of SiteA" in out
    assert "SiteA: Site Addressing @microsoft.com not done" in out
    assert out.rstrip().endswith("NOT set up")
    assert await org.usns() == before

    # half done by hand (SiteA's Site Addressing), the rest by org-setup
    code, _, err = await run_cli("site-addressing", "set", "@microsoft.com", "--update-mailboxes",
                                 "--config", str(org.paths["SiteA"]))
    assert code == 0, err
    code, out, err = await run_cli("org-setup", *[a for n in HOSTS for a in ("-c", str(org.paths[n]))])
    assert code == 0, err
    assert "SiteA: Site Addressing is already @microsoft.com" in out
    code, out, _ = await run_cli("org-setup", "--check", *org.site_args())
    assert code == 0 and out.rstrip().endswith("the organisation is set up")


async def test_errors_are_one_line(org: Org, monkeypatch):
    code, _, err = await run_cli("org-setup", *org.site_args(token="wrong"))
    assert code == 1
    assert err.startswith("imsrelay: org-setup: ") and "HTTP 401" in err and err.count("\n") == 1

    stopped = free_port("127.0.0.24")
    code, _, err = await run_cli("org-setup", "--site", f"{org.url('SiteA')}={TOKEN}",
                                 "--site", f"http://127.0.0.24:{stopped}={TOKEN}", "--wait", "0.3")
    assert code == 3 and "no admin endpoint at http://127.0.0.24" in err and "gave up after 0.3s" in err

    monkeypatch.delenv("IMSRELAY_ADMIN_TOKEN", raising=False)
    code, _, err = await run_cli("org-setup", "--site", org.url("SiteA"), "--site", org.url("SiteB"))
    assert code == 2 and "no admin token" in err
    code, _, err = await run_cli("org-setup", "--site", f"{org.url('SiteA')}={TOKEN}")
    assert code == 2 and "at least two sites" in err
    code, _, err = await run_cli("org-setup", "--site", "10.10.10.10:8025", "--site", "x")
    assert code == 2 and "expected the admin endpoint's URL" in err


# ------------------------------------------------------------------ the pure decisions


def snap(sites: dict[str, str], boxes: list[tuple[str, str, str]]) -> dict:
    return {"sites": [{"name": n, "smtp_address": a} for n, a in sites.items()],
            "mailboxes": [{"alias": a, "home_site": h, "primary_address": p, "proxy_addresses": [f"SMTP:{p}"]}
                          for h, a, p in boxes]}


def test_lagging_names_each_difference():
    a = snap({"SiteA": "@microsoft.com"}, [("SiteA", "User1", "User1@microsoft.com")])
    b = snap({"SiteA": "@SiteA.microsoft.com", "SiteB": "@SiteB.microsoft.com"},
             [("SiteA", "User1", "User1@SiteA.microsoft.com"), ("SiteA", "Gone", "Gone@SiteA.microsoft.com")])
    c = snap({"SiteA": "@microsoft.com"}, [("SiteA", "user1", "USER1@microsoft.com")])
    got = lagging({"SiteA": a, "SiteB": b, "SiteC": c}, "SiteA")
    assert list(got) == ["SiteB"]  # case does not matter (SiteC)
    assert got["SiteB"] == [
        "sees Site Addressing @SiteA.microsoft.com for SiteA, not @microsoft.com",
        "has SiteA's mailbox User1 as User1@SiteA.microsoft.com, not User1@microsoft.com",
        "still lists mailbox Gone of SiteA, deleted there"]
    assert view_of(b, "SiteC").mailboxes == {}
    assert lagging({"SiteA": a, "SiteB": snap({}, [])}, "SiteA")["SiteB"] == [
        "sees Site Addressing (none) for SiteA, not @microsoft.com",
        "does not know mailbox User1@microsoft.com of SiteA"]


def test_needs_site_addressing():
    done = snap({"SiteB": "@microsoft.com"}, [("SiteB", "User2", "User2@microsoft.com"),
                                               ("SiteB", "Administrator", "Administrator2@microsoft.com")])
    assert not needs_site_addressing(done, "SiteB", "@microsoft.com")
    assert needs_site_addressing(done, "SiteB", "@example.com")
    half = snap({"SiteB": "@microsoft.com"}, [("SiteB", "User2", "User2@SiteB.microsoft.com")])
    assert needs_site_addressing(half, "SiteB", "@microsoft.com")  # set without updating the mailboxes
