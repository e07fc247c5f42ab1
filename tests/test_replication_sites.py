"""Directory replication between three real sites on loopback (127.0.0.1x), driven
through the CLI and the admin endpoints, with mail delivered into real Maildirs.

Every site's E-Mail Domain table points at the others' listen addresses, so no DNS is
ever asked; all traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from sitekit import ORG_HOSTS, ORG_KEY, ORG_TOKEN, maildir_messages, rcpt_reply, send_mail, wait_for

from imsrelay.directory.replication import build_request, render_message
from imsrelay.model.objects import DirObject, Stamp
from imsrelay.site import Site

HOSTS = ORG_HOSTS
USERS = {"SiteA": "User1", "SiteB": "User2", "SiteC": "User3"}
KEY = ORG_KEY
TOKEN = ORG_TOKEN


async def test_new_mailbox_replicates_and_its_deletion_as_a_tombstone(organisation):
    org = organisation()
    await org.start()
    out = await org.ok("directory", "add", "User7", "--display-name", "User Seven", site="SiteC")
    assert out.strip() == "SiteC: mailbox User7 created, SMTP:User7@SiteC.microsoft.com"
    assert await org.sites["SiteA"].directory.run(org.sites["SiteA"].directory.mailbox, "User7", "SiteC") is None

    out = await org.request_now("SiteA", "SiteC")
    assert out.startswith("SiteA: Request Now sent to SiteC (dirsync@SiteC.microsoft.com): "
                          "new and modified items since USN 0; queue id ")
    user7 = await org.knows("SiteA", "User7", "SiteC")
    assert user7.display_name == "User Seven" and user7.primary_address == "User7@SiteC.microsoft.com"
    await org.quiet()
    a = org.sites["SiteA"]
    state = await a.directory.run(a.directory.peer_state, "SiteC")
    c_highest = await org.sites["SiteC"].directory.run(lambda: org.sites["SiteC"].directory.highest_usn)
    assert state["high_water"] == c_highest and state["ranges"] == [] and state["last_reply"]
    applied_before = state["applied"]

    out = await org.ok("directory", "delete", "User7", site="SiteC")
    assert "deleted" in out
    out = await org.request_now("SiteA", "SiteC")
    assert f"since USN {c_highest};" in out  # only new and modified items
    await wait_for(lambda: _gone(a, "User7", "SiteC"))
    tomb = [m for m in await a.directory.run(a.directory.mailboxes, "SiteC", include_deleted=True)
            if m.alias == "User7"]
    assert tomb and tomb[0].deleted
    assert await a.directory.run(a.directory.find_recipient, "User7@SiteC.microsoft.com") is None
    await org.quiet()
    state = await a.directory.run(a.directory.peer_state, "SiteC")
    assert state["applied"] == applied_before + 1  # the incremental update carried one object
    # mail to the deleted user is refused at RCPT by its home site, and by A (domain of a connected site
    # is forwarded, but the home site answers 550)
    code, _ = await asyncio.to_thread(rcpt_reply, HOSTS["SiteC"], org.ports["SiteC"], "User7@SiteC.microsoft.com")
    assert code == 550

    status_out = await org.ok("replicate", "status", site="SiteA")
    lines = status_out.splitlines()
    assert lines[0].startswith("SiteA: invocation ") and "rejected messages: none" in lines[0]
    row = next(line for line in lines if line.startswith("SiteC "))
    assert row.split()[1] == "never" and row.split()[2] == str(state["high_water"])


async def _gone(site: Site, alias: str, home: str) -> bool:
    return await site.directory.run(site.directory.mailbox, alias, home) is None


async def test_wiped_directory_is_restored_by_request_now_all(organisation):
    org = organisation()
    await org.start("SiteA", "SiteC")
    await org.request_now("SiteA", "SiteC")
    await org.request_now("SiteC", "SiteA")
    await org.knows("SiteA", "User3", "SiteC")
    await org.knows("SiteC", "User1", "SiteA")
    await org.quiet()
    c = org.sites["SiteC"]
    old_invocation = (await c.directory.run(c.directory.peer_state, "SiteA"))["invocation"]

    await org.stop("SiteA")
    for p in org.data("SiteA").glob("directory.sqlite3*"):
        p.unlink()
    await org.start("SiteA")
    a = org.sites["SiteA"]
    assert await a.directory.run(a.directory.mailbox, "User3", "SiteC") is None  # really wiped
    assert a.directory.invocation != old_invocation

    out = await org.request_now("SiteA", "SiteC", full=True)
    assert ": all items; queue id " in out
    await org.knows("SiteA", "User3", "SiteC")
    await org.knows("SiteA", "Administrator", "SiteC")
    await org.quiet()

    # SiteC still holds SiteA's old high-water mark; its next ordinary request names the old
    # invocation, so SiteA answers from USN 0 and SiteC restarts its mark.
    await org.ok("directory", "add", "User8", site="SiteA")
    await org.request_now("SiteC", "SiteA")
    await org.knows("SiteC", "User8", "SiteA")
    await org.quiet()
    state = await c.directory.run(c.directory.peer_state, "SiteA")
    assert state["invocation"] == a.directory.invocation
    assert state["high_water"] == await a.directory.run(lambda: a.directory.highest_usn)


async def test_changes_reach_a_site_connected_only_through_another(organisation):
    org = organisation(links={"SiteA": ["SiteB"], "SiteB": ["SiteA", "SiteC"], "SiteC": ["SiteB"]})
    await org.start()
    await org.ok("directory", "add", "Remote9", site="SiteC")
    await org.request_now("SiteB", "SiteC")
    await org.knows("SiteB", "Remote9", "SiteC")
    await org.quiet()
    await org.request_now("SiteA", "SiteB")
    m = await org.knows("SiteA", "Remote9", "SiteC")
    assert m.home_site == "SiteC"
    a = org.sites["SiteA"]
    assert {s.name for s in await a.directory.run(a.directory.sites)} == {"SiteA", "SiteB", "SiteC"}
    assert (await a.directory.run(a.directory.peers))[0]["site"] == "SiteB"  # never talked to SiteC

    # Check Now at SiteA makes SiteC (learned by replication) known to routing
    assert a._learned_sites == ()
    code, out, _ = await org.cli("kcc", "check-now", site="SiteA")
    assert code == 0, out
    assert "known to routing by replication: SiteC (@SiteC.microsoft.com)" in out
    assert a._learned_sites == (("SiteC", "SiteC.microsoft.com"),)
    table = await a.routing_table()
    assert ("SiteC", "SiteC.microsoft.com") in table.learned_sites


async def test_two_thousand_mailboxes_replicate_in_several_batches(organisation):
    many = [{"alias": f"Bulk{i:05d}", "display_name": f"Bulk user {i}"} for i in range(2000)]
    org = organisation(mailboxes={"SiteC": many}, batch_size=300)
    await org.start("SiteA", "SiteC")
    out = await org.request_now("SiteA", "SiteC", full=True)
    assert "all items" in out
    a, c = org.sites["SiteA"], org.sites["SiteC"]
    await wait_for(lambda: a.directory.run(lambda: len(a.directory.mailboxes("SiteC")) == 2000), timeout=60)
    await org.quiet()
    state = await a.directory.run(a.directory.peer_state, "SiteC")
    assert state["high_water"] == await c.directory.run(lambda: c.directory.highest_usn)
    assert state["ranges"] == [] and state["applied"] == 2001  # mailboxes + the site object
    seen = await a.directory.run(lambda: a.directory._db.execute("SELECT COUNT(*) FROM seen_messages").fetchone()[0])
    assert seen == 7  # ceil(2001 / 300) update messages
    bulk = await a.directory.run(a.directory.find_recipient, "bulk01999@sitec.microsoft.com")
    assert bulk is not None and bulk.home_site == "SiteC"


@pytest.mark.slow
async def test_ten_thousand_mailboxes_replicate_completely(organisation):
    many = [{"alias": f"Bulk{i:05d}"} for i in range(10000)]
    org = organisation(mailboxes={"SiteC": many})
    started = time.monotonic()
    await org.start("SiteA", "SiteC")
    await org.request_now("SiteA", "SiteC")
    a, c = org.sites["SiteA"], org.sites["SiteC"]
    await wait_for(lambda: a.directory.run(lambda: len(a.directory.mailboxes("SiteC")) == 10000), timeout=120)
    await org.quiet()
    state = await a.directory.run(a.directory.peer_state, "SiteC")
    assert state["high_water"] == await c.directory.run(lambda: c.directory.highest_usn)
    assert state["applied"] == 10001
    seen = await a.directory.run(lambda: a.directory._db.execute("SELECT COUNT(*) FROM seen_messages").fetchone()[0])
    assert seen == 21  # ceil(10001 / 500)
    print(f"10,000 mailboxes: start + replicate in {time.monotonic() - started:.1f}s")


async def test_backlog_to_a_site_not_up_yet_drains_when_it_starts(organisation):
    org = organisation()
    await org.start("SiteA")
    await org.request_now("SiteA", "SiteB")
    await org.request_now("SiteA", "SiteB", full=True)
    a = org.sites["SiteA"]
    await wait_for(lambda: all(r.attempts >= 1 for e in a.qmgr.envelopes.values() for r in e.recipients))
    status = await a.replicator.status()
    peer = next(p for p in status["peers"] if p["site"] == "SiteB")
    assert peer["backlog"] == 2 and peer["last_request"] and peer["last_reply"] is None
    assert next(p for p in status["peers"] if p["site"] == "SiteC")["backlog"] == 0
    out = await org.ok("replicate", "status", site="SiteA")
    row = next(line for line in out.splitlines() if line.startswith("SiteB "))
    assert row.split()[6:8] == ["0", "2"]  # applied 0, backlog 2
    assert len(list(a.spool.envelopes())) == 2  # the backlog is on disk, in the spool

    await org.start("SiteB")
    await org.knows("SiteA", "User2", "SiteB")
    await org.quiet("SiteA", "SiteB")
    b = org.sites["SiteB"]
    status = await a.replicator.status()
    peer = next(p for p in status["peers"] if p["site"] == "SiteB")
    assert peer["backlog"] == 0 and peer["last_reply"] and peer["last_error"] is None
    # nothing lost: SiteB received and answered both queued requests
    answered = await b.directory.run(lambda: b.directory._db.execute("SELECT COUNT(*) FROM seen_messages").fetchone()[0])
    assert answered == 2
    assert peer["high_water"] == await b.directory.run(lambda: b.directory.highest_usn)


async def test_schedule_and_start_up_request(organisation):
    org = organisation(links={"SiteA": ["SiteB"], "SiteB": ["SiteA"], "SiteC": []},
                      schedule="1s", startup_delay="0.2s")
    await org.start("SiteA", "SiteB")
    await org.knows("SiteA", "User2", "SiteB")
    await org.knows("SiteB", "User1", "SiteA")
    await org.ok("directory", "add", "Later", site="SiteB")
    await org.knows("SiteA", "Later", "SiteB", timeout=10)  # the next scheduled request brings it


async def test_forged_request_changes_nothing_and_gets_no_answer(organisation):
    org = organisation()
    await org.start("SiteB")
    b = org.sites["SiteB"]
    usn = b.directory.highest_usn
    forged = build_request(organisation="ExchangeORG", from_site="SiteA", to_site="SiteB",
                           reply_to="evil.example", since_usn=0, invocation="", full=True, now=time.time())
    raw = render_message(forged, key="not-the-org-key", from_domain="SiteA.microsoft.com",
                         to_domain="SiteB.microsoft.com", hostname="attacker.example")
    await asyncio.to_thread(send_mail, HOSTS["SiteB"], org.ports["SiteB"], "dirsync@SiteA.microsoft.com",
                            ["dirsync@SiteB.microsoft.com"], raw)
    await wait_for(lambda: b.replicator.rejected["bad-signature"] == 1)
    await org.quiet("SiteB")
    assert not list(b.spool.envelopes())  # no reply, no NDR
    assert b.directory.highest_usn == usn
    # a forged *update* (unsigned) does not add a mailbox either
    evil = DirObject("mailbox:SiteA:evil", "mailbox", "SiteA", Stamp(9, time.time(), "SiteA"), False,
                     {"alias": "Evil", "display_name": "Evil", "proxy_addresses": ["SMTP:ceo@microsoft.com"]})
    unsigned = (b"From: dirsync@SiteA.microsoft.com\r\nTo: dirsync@SiteB.microsoft.com\r\n"
                b"Subject: Directory replication update SiteA -> SiteB\r\nX-IMS-Dirsync-Type: update\r\n\r\n"
                + str(evil.to_wire()).encode() + b"\r\n")
    await asyncio.to_thread(send_mail, HOSTS["SiteB"], org.ports["SiteB"], "x@example.net",
                            ["dirsync@SiteB.microsoft.com"], unsigned)
    await wait_for(lambda: b.replicator.rejected["unsigned"] == 1)
    await org.quiet("SiteB")
    assert await b.directory.run(b.directory.find_recipient, "ceo@microsoft.com") is None
    assert not list(b.spool.envelopes())


async def test_kb_q196927_end_to_end(organisation):
    """Connectors, Check Now, Request Now, Site Addressing at A, pull at B and C,
    repeat at B then C: one company domain for every user at every site."""
    org = organisation()
    await org.start()

    # Check Now before any replication: the sites of the connectors appear (KB Q196927,
    # "Speeding up Initial Directory Replication" 3), their objects still to come
    code, out, _ = await org.cli("kcc", "check-now", site="SiteA")
    assert code == 0 and "Check Now at SiteA: 3 site(s) known (SiteA, SiteB (Site and Configuration" in out
    assert "info    SiteB: SiteB appears through its Directory Replication Connector" in out

    # Request Now on every connector ("update only new and modified items")
    for at in HOSTS:
        for source in org.links[at]:
            await org.request_now(at, source)
    for at in HOSTS:
        for home, user in USERS.items():
            await org.knows(at, user, home)
    await org.quiet()
    for at in HOSTS:
        code, out, _ = await org.cli("kcc", "check-now", site=at)
        assert code == 0 and "3 site(s) known (SiteA, SiteB, SiteC)" in out
        assert "no inconsistencies found" in out

    async def site_addressing(name: str, substitute: str | None) -> None:
        out = await org.ok("site-addressing", "set", "@microsoft.com", "--update-mailboxes", site=name)
        assert f"{name}: Site Addressing SMTP is now @microsoft.com" in out
        assert "recipients: 2 scanned, 2 updated, 0 failed" in out
        if substitute:
            assert f"substitute: Administrator -> {substitute} (the address was not unique)" in out
        for other in HOSTS:
            if other != name:
                await org.request_now(other, name)
        for other in HOSTS:
            await org.knows(other, USERS[name], name, address=f"{USERS[name]}@microsoft.com")
        await org.quiet()

    await site_addressing("SiteA", None)
    await site_addressing("SiteB", "Administrator2@microsoft.com")
    await site_addressing("SiteC", "Administrator3@microsoft.com")

    # Check Now: routing addresses stay @SiteX — a note, not an error (Q180401)
    code, out, _ = await org.cli("kcc", "check-now", site="SiteA")
    assert code == 0, out
    assert ("info    SiteB: SiteB's Site Addressing is now @microsoft.com; its routing address stays "
            "@SiteB.microsoft.com, which SiteB keeps accepting") in out
    assert "warning" not in out and "error" not in out

    # mail for UserN@microsoft.com sent to ANY site lands in the home site's Maildir
    for via in HOSTS:
        for user in USERS.values():
            body = f"From: x@example.net\r\nTo: {user}@microsoft.com\r\nSubject: via {via}\r\n\r\nhi\r\n".encode()
            await asyncio.to_thread(send_mail, HOSTS[via], org.ports[via], "x@example.net",
                                    [f"{user}@microsoft.com"], body)
    for home, user in USERS.items():
        msgs = await wait_for(lambda h=home, u=user: len(maildir_messages(org.data(h), u)) == 3
                              and maildir_messages(org.data(h), u), timeout=20)
        assert {m.split(b"Subject: via ")[1][:5] for m in msgs} == {b"SiteA", b"SiteB", b"SiteC"}
    body = b"From: x@example.net\r\nTo: Administrator2@microsoft.com\r\nSubject: admin\r\n\r\nhi\r\n"
    await asyncio.to_thread(send_mail, HOSTS["SiteA"], org.ports["SiteA"], "x@example.net",
                            ["Administrator2@microsoft.com"], body)
    await wait_for(lambda: maildir_messages(org.data("SiteB"), "Administrator"), timeout=20)

    # User1 writes to User2 through SiteA: sender rewritten to the company domain
    note = (b"From: User One <User1@SiteA.microsoft.com>\r\nTo: User2@microsoft.com\r\n"
            b"Subject: from user1\r\n\r\nhello from SiteA\r\n")
    await asyncio.to_thread(send_mail, HOSTS["SiteA"], org.ports["SiteA"], "User1@SiteA.microsoft.com",
                            ["User2@microsoft.com"], note)
    got = await wait_for(lambda: [m for m in maildir_messages(org.data("SiteB"), "User2")
                                  if b"Subject: from user1" in m], timeout=20)
    assert got[0].startswith(b"Return-Path: <User1@microsoft.com>")
    assert b"From: User One <User1@microsoft.com>\r\n" in got[0]

    # unknown company-domain users are refused at RCPT by every site
    for via in HOSTS:
        code, text = await asyncio.to_thread(rcpt_reply, HOSTS[via], org.ports[via], "nobody@microsoft.com")
        assert (code, text[:5]) == (550, b"5.1.1"), (via, code, text)
    # and nothing is left in any queue (no stray NDRs, no stuck replication)
    await org.quiet()
    for site in org.sites.values():
        assert not list(site.spool.envelopes())
        assert site.replicator.rejected == {}


async def test_wrong_routing_address_comes_back_as_ndr_q180401(organisation):
    """A Connected Sites routing address the remote site does not answer to: its
    directory messages come back as NDRs (KB Q180401), shown in replicate status."""
    org = organisation(routing={"SiteA": {"SiteB": "@old.SiteB.microsoft.com"}})
    await org.start("SiteA", "SiteB")
    out = await org.request_now("SiteA", "SiteB")
    assert "(dirsync@old.SiteB.microsoft.com)" in out
    a = org.sites["SiteA"]

    async def last_error() -> str | None:
        return (await a.directory.run(a.directory.peer_state, "SiteB"))["last_error"]

    error = await wait_for(last_error)
    assert error.startswith("replication message returned as undeliverable: 5.1.1")
    await org.quiet("SiteA", "SiteB")
    assert a.replicator.rejected == {}  # the NDR is recognised, not counted as a forgery
    out = await org.ok("replicate", "status", site="SiteA")
    row = next(line for line in out.splitlines() if line.startswith("SiteB "))
    assert row.endswith("replication message returned as undeliverable: 5.1.1 " + error.split("5.1.1 ", 1)[1])

    # SiteB's site object reaches SiteA the long way round (through SiteC); Check Now then
    # names the mismatch between A's Connected Sites entry and B's published routing address
    await org.start("SiteC")
    await org.request_now("SiteC", "SiteB")
    await org.knows("SiteC", "User2", "SiteB")
    await org.quiet()
    await org.request_now("SiteA", "SiteC")
    await org.knows("SiteA", "User2", "SiteB")
    code, out, _ = await org.cli("kcc", "check-now", site="SiteA")
    assert code == 0, out
    assert ("warning SiteB: Connected Sites routing address SMTP @old.SiteB.microsoft.com for SiteB does not "
            "match the routing address @SiteB.microsoft.com that SiteB publishes") in out
    assert "(KB Q180401)" in out


async def test_admin_status_directory_and_queue(organisation):
    org = organisation()
    await org.start("SiteA")
    await org.request_now("SiteA", "SiteB")  # SiteB is down: one message waits in the queue
    a = org.sites["SiteA"]
    await wait_for(lambda: all(r.attempts >= 1 for e in a.qmgr.envelopes.values() for r in e.recipients))
    base = f"http://{HOSTS['SiteA']}:{org.admin_ports['SiteA']}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/status", headers=auth) as r:
            status = await r.json()
        assert status["site"] == "SiteA" and status["site_addressing"] == "@SiteA.microsoft.com"
        assert status["queue"]["messages"] == 1 and status["replication"]["enabled"]
        async with http.get(f"{base}/directory", headers=auth) as r:
            directory = await r.json()
        assert {m["alias"] for m in directory["mailboxes"]} == {"User1", "Administrator"}
        assert [s["name"] for s in directory["sites"]] == ["SiteA"]
        async with http.get(f"{base}/queue", headers=auth) as r:
            queue = (await r.json())["messages"]
        assert queue[0]["origin"] == "dirsync" and queue[0]["recipients"][0]["state"] in ("queued", "deferred")
        assert queue[0]["recipients"][0]["address"] == "dirsync@SiteB.microsoft.com"
        attempts = queue[0]["recipients"][0]["attempts"]
        async with http.post(f"{base}/queue/retry", headers=auth, json={}) as r:
            assert (await r.json()) == {"retried": 1}
        await wait_for(lambda: next(iter(a.qmgr.envelopes.values())).recipients[0].attempts > attempts)
        async with http.post(f"{base}/replication/request-now", headers=auth, json={"site": "Nowhere"}) as r:
            assert r.status == 409 and "no routing address for site Nowhere" in (await r.json())["error"]
        async with http.delete(f"{base}/directory/mailboxes/Nobody", headers=auth) as r:
            assert r.status == 404
        async with http.post(f"{base}/directory/mailboxes", headers=auth, json={"alias": "bad alias"}) as r:
            assert r.status == 400 and "not a valid alias" in (await r.json())["error"]
    code, _, err = await org.cli("replicate", "request-now", "--site", "SiteA", site="SiteA")
    assert code == 2 and err.strip() == ("imsrelay: SiteA: SiteA is this site: replication requests go to "
                                         "other sites")
