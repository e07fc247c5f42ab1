"""Replicated objects are validated like local changes and accepted only from their
home site's side; forged bounce reports change nothing; rejection counters persist."""

import asyncio
from datetime import UTC, datetime

from sitekit import make_config, running_site, site_mapping, wait_for
from test_replication_signing import mailbox, render, request, smtp_send

from imsrelay.directory.replication import FORGED_BOUNCE, REFUSED_OBJECT, build_updates
from imsrelay.model.object_rules import object_problem
from imsrelay.model.objects import DirObject, Stamp
from imsrelay.queue import dsn

DIRSYNC_A = "dirsync@SiteA.microsoft.com"


def update_from(peer, objects, now):
    return build_updates(organisation="ExchangeORG", from_site=peer, to_site="SiteA", invocation="b0b0",
                         highest_usn=5, since_usn=0, full=True, in_reply_to="ab" * 16,
                         batches=[(0, 5, objects)], now=now)[0]


def test_object_rules():
    ok = mailbox("User3", "SiteC")
    assert object_problem(ok, receiving_site="SiteA") is None
    bad_alias = DirObject("mailbox:SiteC:../../pwned", "mailbox", "SiteC", Stamp(1, 1.0, "SiteC"), False,
                          {"alias": "../../pwned", "proxy_addresses": ["SMTP:p@microsoft.com"]})
    assert "bad alias" in object_problem(bad_alias, receiving_site="SiteA")
    wrong_id = DirObject("mailbox:SiteC:other", "mailbox", "SiteC", Stamp(1, 1.0, "SiteC"), False,
                         {"alias": "User3", "proxy_addresses": []})
    assert "does not match" in object_problem(wrong_id, receiving_site="SiteA")
    foreign_origin = DirObject("mailbox:SiteC:user3", "mailbox", "SiteC", Stamp(1, 1.0, "SiteB"), False,
                               {"alias": "User3", "proxy_addresses": []})
    assert "not its home site" in object_problem(foreign_origin, receiving_site="SiteA")
    bad_proxy = DirObject("mailbox:SiteC:user3", "mailbox", "SiteC", Stamp(1, 1.0, "SiteC"), False,
                          {"alias": "User3", "proxy_addresses": ["SMTP:not an address"]})
    assert "bad proxy" in object_problem(bad_proxy, receiving_site="SiteA")
    bad_site = DirObject("site:SiteC", "site", "SiteC", Stamp(1, 1.0, "SiteC"), False,
                         {"name": "SiteC", "smtp_address": "@bad domain", "routing_address": "@SiteC.microsoft.com"})
    assert "smtp_address" in object_problem(bad_site, receiving_site="SiteA")


async def test_a_peer_cannot_hijack_local_mailboxes_or_escape_the_data_dir(tmp_path):
    cfg = make_config(tmp_path, site_mapping("SiteA"))
    async with running_site(cfg) as site:
        now = site.clock()
        hijack = DirObject("mailbox:SiteA:user1", "mailbox", "SiteA", Stamp(99, now, "SiteA"), False,
                           {"alias": "User1", "display_name": "x", "proxy_addresses": ["SMTP:hijacked@microsoft.com"]})
        escape_here = DirObject("mailbox:SiteA:../../pwned", "mailbox", "SiteA", Stamp(1, now, "SiteA"), False,
                                {"alias": "../../pwned", "proxy_addresses": ["SMTP:pwned@SiteA.microsoft.com"]})
        escape_there = DirObject("mailbox:SiteB:../../pwned", "mailbox", "SiteB", Stamp(1, now, "SiteB"), False,
                                 {"alias": "../../pwned", "proxy_addresses": ["SMTP:pwned2@SiteA.microsoft.com"]})
        fine = mailbox("User2", "SiteB")
        raw = render(update_from("SiteB", [hijack, escape_here, escape_there, fine], now))
        await asyncio.to_thread(smtp_send, site.bound_port, "dirsync@SiteB.microsoft.com", DIRSYNC_A, raw)
        await wait_for(lambda: site.directory.run(site.directory.find_recipient, "User2@microsoft.com"))
        user1 = await site.directory.run(site.directory.mailbox, "User1")
        assert user1.primary_address == "User1@SiteA.microsoft.com"
        for addr in ("hijacked@microsoft.com", "pwned@SiteA.microsoft.com", "pwned2@SiteA.microsoft.com"):
            assert await site.directory.run(site.directory.find_recipient, addr) is None
        assert site.replicator.rejected[REFUSED_OBJECT] == 3
        assert not (tmp_path / "pwned").exists() and not (cfg.data_dir.parent / "pwned").exists()


def forged_report(peer_text):
    original = (f"From: dirsync@SiteA.microsoft.com\r\nX-IMS-Dirsync-Type: request\r\n"
                f"X-IMS-Dirsync-To-Site: {peer_text}\r\nMessage-ID: <{'cd' * 16}.dirsync@x>\r\n\r\nbody\r\n").encode()
    return dsn.build_report(
        original=original, envelope_sender="dirsync@SiteA.microsoft.com",
        recipients=[dsn.RecipientStatus(f"dirsync@{peer_text}.example", None, "failed", "5.1.1", "smtp; 550 <b>owned</b>")],
        reporter=dsn.ReportingSite("Evil", "Evil", "Evil", "evil.example"), queue_id="X",
        arrival_date=datetime.now(UTC), now=datetime.now(UTC), postmaster="postmaster@evil.example")


async def test_forged_bounces_change_no_replication_state_and_counters_persist(tmp_path):
    cfg = make_config(tmp_path, site_mapping("SiteA", connected_sites=[
        {"name": "SiteB", "routing_address": "@SiteB.microsoft.com"}]))
    async with running_site(cfg) as site:
        for peer, sender in (("SiteB", "attacker@example.net"), ("Bogus<script>", "attacker@example.net"),
                             ("SiteB", "<>")):
            await asyncio.to_thread(smtp_send, site.bound_port, "" if sender == "<>" else sender, DIRSYNC_A,
                                    forged_report(peer))
        await wait_for(lambda: site.replicator.rejected[FORGED_BOUNCE] == 3)
        status = await site.replicator.status()
        assert not any("Bogus" in p["site"] for p in status["peers"])
        assert all(p["last_error"] is None for p in status["peers"])
        peers = await site.directory.run(site.directory.peers)
        assert peers == []  # no peer state was created or changed
        raw = render(request(to_site="SiteA", from_site="SiteB"), key="wrong")
        await asyncio.to_thread(smtp_send, site.bound_port, "x@example.net", DIRSYNC_A, raw)
        await wait_for(lambda: site.replicator.rejected["bad-signature"] == 1)
        await wait_for(lambda: not site.qmgr.envelopes)  # finished: not handled again after the restart
    async with running_site(cfg) as site:  # after a restart
        status = await site.replicator.status()
        assert status["rejected"] == {FORGED_BOUNCE: 3, "bad-signature": 1}
