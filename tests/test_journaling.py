"""Message Journaling (Exchange 5.5 SP1, KB Q239427) with a real site and real SMTP
peers on loopback: one journal copy per accepted message (not per recipient), with
its envelope; reports journaled, journal copies not; readable through the message
API; and a journal copy still queued survives a restart of the site."""

from __future__ import annotations

import email
import email.policy
import signal
import smtplib
import subprocess
import sys

from ims_kit import USER1, Peer, admin, admin_section, mailbox, message, queued, start_peer, submit
from sitekit import free_port, make_config, running_site, site_mapping, wait_for
from test_crash import wait_listening, write_config

from imsrelay.observe import tracking
from imsrelay.policy.journaling import JOURNAL_HEADER, RECIPIENTS_HEADER, SENDER_HEADER
from imsrelay.queue.spool import Spool


class Refusing(Peer):
    async def handle_RCPT(self, server, session, envelope, address, options):
        if address.startswith("bad"):
            return f"550 5.1.1 <{address}>: unknown user"
        return await super().handle_RCPT(server, session, envelope, address, options)


def unfolded(m: email.message.EmailMessage, name: str) -> str:
    return " ".join(str(m[name]).split())


async def test_every_accepted_message_is_journaled_once(tmp_path):
    port = free_port()
    server = await start_peer("127.0.0.1", port, Refusing())
    config = make_config(tmp_path, site_mapping(
        "SiteA", mailboxes=[{"alias": "User1", "display_name": "User One"},
                            {"alias": "Administrator", "display_name": "Administrator"},
                            {"alias": "Journal", "display_name": "Journal"}],
        email_domains=[{"domain": "partner.test", "host": "127.0.0.1", "port": port}],
        journaling={"recipient": "Journal"}, **admin_section()))
    try:
        async with running_site(config) as site:
            first = await submit(site, ["User1@SiteA.microsoft.com", "bob@partner.test", "carol@partner.test"],
                                 message("to three"))
            await submit(site, ["bad@partner.test"], message("to a bad address"))
            await wait_for(lambda: len(mailbox(config.data_dir, "Journal")) == 3 and not queued(site), timeout=15)
            journal = mailbox(config.data_dir, "Journal")
            api = await admin(site, "GET", "/api/v1/messages?mailbox=Journal")
            found = await site.tracking.query(tracking.TrackingQuery(limit=500))
    finally:
        server.close()
    by_subject = {str(m["Subject"]): m for m in journal}
    assert set(by_subject) == {"Journal: to three", "Journal: to a bad address",
                               "Journal: Undeliverable: to a bad address"}
    three = by_subject["Journal: to three"]
    assert unfolded(three, RECIPIENTS_HEADER) == (
        "<User1@SiteA.microsoft.com>, <bob@partner.test>, <carol@partner.test>")
    assert unfolded(three, SENDER_HEADER) == f"<{USER1}>"
    assert str(three[JOURNAL_HEADER]).startswith(f"{first}; site=SiteA; origin=smtp")
    text, inner = three.get_payload()
    assert inner.get_content_type() == "message/rfc822"
    original = inner.get_payload()[0]
    assert original["Subject"] == "to three" and original["Message-ID"] == "<m1@SiteA.microsoft.com>"
    assert original["Received"]  # the message as this site queued it, trace header included
    ndr = by_subject["Journal: Undeliverable: to a bad address"]
    assert str(ndr[JOURNAL_HEADER]).endswith("origin=ndr") and unfolded(ndr, SENDER_HEADER) == "<>"
    assert api["total"] == 3  # what a test suite reads: every message that passed
    assert sorted(m["subject"] for m in api["messages"]) == sorted(by_subject)
    journaled = [e for e in found if e.event == tracking.JOURNALED]
    assert len(journaled) == 3
    assert {e.detail["journal"].lower() for e in journaled} == {"journal@sitea.microsoft.com"}


async def test_a_queued_journal_copy_survives_a_restart(tmp_path):
    """The journal recipient is at an archive that is down: the message is delivered,
    its journal copy waits in the queue; the site stops; when it starts again and the
    archive is up, the copy is delivered."""
    port = free_port()
    config = make_config(tmp_path, site_mapping(
        "SiteA", email_domains=[{"domain": "vault.test", "host": "127.0.0.1", "port": port}],
        journaling={"recipient": "archive@vault.test"}, delivery={"retry_intervals": [0.2]}))
    async with running_site(config) as site:
        big = (b"y" * 70 + b"\r\n") * 4500  # over 256 KB: its copy is built off the event loop
        qid = await submit(site, ["User1@SiteA.microsoft.com"], message("kept", body=big))
        await wait_for(lambda: mailbox(config.data_dir, "User1"))
        await wait_for(lambda: [e.origin for e in queued(site)] == ["journal"])
        await wait_for(lambda: queued(site)[0].recipients[0].attempts >= 1)  # tried, and refused
    archive = Peer("archive.vault.test")
    server = await start_peer("127.0.0.1", port, archive)
    try:
        async with running_site(config) as site:
            await wait_for(lambda: archive.messages, timeout=15)
            await wait_for(lambda: not queued(site))
    finally:
        server.close()
    assert len(archive.messages) == 1 and len(mailbox(config.data_dir, "User1")) == 1
    rcpts, raw = archive.messages[0]
    copy = email.message_from_bytes(raw, policy=email.policy.default)
    assert rcpts == ["archive@vault.test"] and str(copy[JOURNAL_HEADER]).startswith(qid)
    assert unfolded(copy, RECIPIENTS_HEADER) == "<User1@SiteA.microsoft.com>"
    assert big in raw and raw.count(b"Subject: kept\r\n") == 1


def test_kill_9_after_250_keeps_each_message_with_its_journal_copy(tmp_path):
    """``imsrelay serve`` killed right after acknowledging: every acknowledged message
    is in the queue with its journal copy (one commit), nothing delivered yet."""
    port, dead = free_port(), free_port()
    path = write_config(tmp_path, port, dead, '[journaling]\nrecipient = "archive@down.example"\n')
    proc = subprocess.Popen([sys.executable, "-m", "imsrelay", "serve", "--config", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            for i in range(5):  # each returns after the 250 (a refusal raises)
                s.sendmail(USER1, [f"r{i}@down.example", f"s{i}@down.example"], message(f"m{i}"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    envelopes = list(Spool(tmp_path / "data").envelopes())
    originals = {e.queue_id: e for e in envelopes if e.origin == "smtp"}
    copies = [e for e in envelopes if e.origin == "journal"]
    assert len(originals) == 5 and len(copies) == 5
    assert sorted(e.extra["journal_of"] for e in copies) == sorted(originals)
    assert all([r.address for r in e.recipients] == ["archive@down.example"] for e in copies)
