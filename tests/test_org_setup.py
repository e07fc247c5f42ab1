"""``imsrelay org-setup``: KB Q196927's administrator actions over real sites' admin
endpoints (three real sites on loopback, real SMTP between them for replication).

The compose lab runs the same command as its `setup` service (tests/test_compose_lab.py).
"""

from __future__ import annotations

import asyncio

import pytest
import sitekit
from sitekit import Organisation, free_port, maildir_messages, send_mail, wait_for

from imsrelay.lab.org_setup import lagging, needs_site_addressing, view_of

HOSTS = {"SiteA": "127.0.0.21", "SiteB": "127.0.0.22", "SiteC": "127.0.0.23"}
TOKEN = "org-setup-test-token"


async def run_cli(*argv: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(sitekit.run_cli, *argv)


@pytest.fixture
async def org(organisation):
    o = organisation(hosts=HOSTS, token=TOKEN)
    await o.start()
    return o


END_STATE = {
    ("SiteA", "User1"): "User1@microsoft.com", ("SiteA", "Administrator"): "Administrator@microsoft.com",
    ("SiteB", "User2"): "User2@microsoft.com", ("SiteB", "Administrator"): "Administrator2@microsoft.com",
    ("SiteC", "User3"): "User3@microsoft.com", ("SiteC", "Administrator"): "Administrator3@microsoft.com",
}


async def test_org_setup_reaches_the_articles_end_state_then_changes_nothing(org: Organisation):
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
    await asyncio.to_thread(send_mail, HOSTS["SiteC"], org.ports["SiteC"], "alice@example.net",
                            "User2@microsoft.com", b"From: alice@example.net\r\nSubject: org-setup\r\n\r\nhi\r\n")
    await wait_for(lambda: maildir_messages(org.configs["SiteB"].data_dir, "User2"), timeout=15)

    before = await org.usns()
    await wait_for(lambda: all(s.qmgr.backlog == 0 for s in org.sites.values()), timeout=15)
    code, out, err = await run_cli("org-setup", *org.site_args())
    assert code == 0, err
    assert "already set up: nothing changed" in out
    assert "(queue id" not in out and "update all recipient mailboxes" not in out  # no Request Now sent
    assert await org.usns() == before  # no directory write anywhere
    assert all(s.qmgr.backlog == 0 for s in org.sites.values())  # no replication traffic


async def test_check_reports_what_is_missing_and_changes_nothing(org: Organisation):
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


async def test_errors_are_one_line(org: Organisation, monkeypatch):
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
