"""Delivery Status Notifications (RFC 3461, KB Q156063 2.2.14-15) end to end, over real
sockets: smtplib clients give NOTIFY, RET, ENVID and ORCPT to a running site; scripted
peers on loopback (tests/smtp_script_peer.py), one offering DSN and one not, show what
is passed on; the reports are read from the sender's real Maildir; tracking shows them.

One site serves the module (each test uses its own subject and recipients);
the durability test runs a site of its own and restarts it.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import smtplib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import pytest_asyncio
from sitekit import (
    Organisation,
    free_port,
    maildir_messages,
    make_config,
    run_cli,
    running_site,
    site_mapping,
    wait_for,
    write_site_file,
)
from smtp_script_peer import ScriptPeer

from imsrelay.model.envelope import PENDING
from imsrelay.observe.tracking import TrackingQuery, follow
from imsrelay.queue.spool import Spool
from imsrelay.site import Site

pytestmark = pytest.mark.asyncio(loop_scope="module")

USER1 = "User1@SiteA.microsoft.com"
ADMIN = "Administrator@SiteA.microsoft.com"
CLERK = "Clerk@SiteA.microsoft.com"


def _rcpt_reply(address: str) -> str:
    if address.startswith("bad"):
        return "550 5.1.1 unknown user"
    if address.startswith("later"):
        return "450 4.2.1 try again later"
    return "250 2.1.5 Ok"


class Rig:
    def __init__(self, site: Site, dsn_peer: ScriptPeer, plain_peer: ScriptPeer) -> None:
        self.site, self.dsn_peer, self.plain_peer = site, dsn_peer, plain_peer

    def reports(self, subject: str) -> list[email.message.EmailMessage]:
        """The reports about the message with ``subject`` in User1's (the sender's) Maildir."""
        found = []
        for raw in maildir_messages(self.site.config.data_dir, "User1"):
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            if str(msg["Subject"]).endswith(f": {subject}"):
                found.append(msg)
        return found

    async def settled(self) -> None:
        await wait_for(lambda: not list(Spool(self.site.config.data_dir).envelopes()), timeout=20)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tmp = tmp_path_factory.mktemp("dsn")
    dsn_peer = ScriptPeer(extensions=("SIZE 10240000", "8BITMIME", "DSN"), rcpt=_rcpt_reply)
    plain_peer = ScriptPeer(extensions=("SIZE 10240000", "8BITMIME"), rcpt=_rcpt_reply)
    dsn_port, plain_port = await dsn_peer.start(), await plain_peer.start()
    config = make_config(tmp, site_mapping(
        "SiteA", mailboxes=[{"alias": "User1", "display_name": "User One"},
                            {"alias": "Administrator", "display_name": "SiteA Administrator"},
                            {"alias": "Clerk", "display_name": "Clerk"}],
        email_domains=[{"domain": "partner.test", "host": "127.0.0.1", "port": dsn_port},
                       {"domain": "plain.test", "host": "127.0.0.1", "port": plain_port}],
        delivery={"retry_intervals": [0.2], "delay_notice": 0.3, "lifetime": 2, "connect_timeout": 2}))
    try:
        async with running_site(config) as site:
            yield Rig(site, dsn_peer, plain_peer)
    finally:
        dsn_peer.close()
        plain_peer.close()


def message(subject: str, body: str = "the body text") -> bytes:
    return (f"From: User One <{USER1}>\r\nTo: someone\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@SiteA.microsoft.com>\r\n\r\n{body}\r\n").encode()


def transaction(port: int, rcpts: Sequence[tuple[str, Sequence[str]]], data: bytes, *,
                mail_options: Sequence[str] = (), sender: str = USER1, host: str = "127.0.0.1") -> str:
    """One transaction with per-recipient parameters (blocking); the queue id."""
    with smtplib.SMTP(host, port, timeout=20) as s:
        s.ehlo("client.test")
        code, reply = s.mail(sender, list(mail_options))
        assert code == 250, reply
        for address, options in rcpts:
            code, reply = s.rcpt(address, list(options))
            assert code == 250, (address, reply)
        code, reply = s.data(data)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[-1]


async def send(rig: Rig, rcpts: Sequence[tuple[str, Sequence[str]]], data: bytes, **kw: Any) -> str:
    return await asyncio.to_thread(transaction, rig.site.bound_port, rcpts, data, **kw)


def parts(report: email.message.EmailMessage) -> tuple[str, str, Any]:
    """(human text, the unfolded delivery-status text, the returned part)."""
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    human, status, returned = report.get_payload()
    text = "\n".join(str(block) for block in status.get_payload())
    return human.get_content(), re.sub(r"[ \t]*\r?\n[ \t]+", " ", text), returned


def blocks(status: str) -> list[str]:
    """The per-recipient blocks of a delivery-status text (those with Final-Recipient)."""
    return [b for b in re.split(r"\n\s*\n", status) if "Final-Recipient:" in b]


async def story_of(site: Site, subject: str) -> Any:
    message_id = f"<{subject.replace(' ', '-')}@SiteA.microsoft.com>"
    events = await site.tracking.query(TrackingQuery(message_id=message_id))
    (story,) = [s for s in follow(events) if s.message_id == message_id]
    return story


# ---------------------------------------------------------------- the wire

def _session_replies(port: int) -> dict[str, tuple[int, bytes]]:
    out: dict[str, tuple[int, bytes]] = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("client.test")
        out["dsn_offered"] = (250 if s.has_extn("dsn") else 0, b"")
        for name, options in [("ret", ["RET=BOGUS"]), ("ret twice", ["RET=FULL", "RET=HDRS"]),
                              ("envid xtext", ["ENVID=a+zz"]), ("envid long", ["ENVID=" + "x" * 101]),
                              ("envid empty", ["ENVID="]), ("ret bare", ["RET"]),
                              ("unknown", ["FOO=1"])]:
            out[name] = s.mail(USER1, options)
            s.rset()
        assert s.mail(USER1, ["RET=hdrs", "ENVID=Ab+2Bc"])[0] == 250  # case-insensitive keyword and value
        for name, options in [("never and more", ["NOTIFY=NEVER,SUCCESS"]), ("notify word", ["NOTIFY=SOMETIMES"]),
                              ("orcpt", ["ORCPT=nosemicolon"]), ("orcpt xtext", ["ORCPT=rfc822;a=b"]),
                              ("notify twice", ["NOTIFY=SUCCESS", "NOTIFY=FAILURE"])]:
            out[name] = s.rcpt(ADMIN, options)
        out["good rcpt"] = s.rcpt(ADMIN, ["notify=success,failure", "ORCPT=rfc822;Administrator+40SiteA"])
        s.rset()
        s.helo("client.test")  # not ESMTP: no parameters at all
        out["helo"] = s.mail(USER1, ["RET=FULL"])
    return out


async def test_dsn_is_offered_and_bad_parameters_get_501_with_a_clear_text(rig):
    r = await asyncio.to_thread(_session_replies, rig.site.bound_port)
    assert r["dsn_offered"][0] == 250
    for name in ("ret", "ret twice", "envid xtext", "envid long", "envid empty", "ret bare",
                 "never and more", "notify word", "orcpt", "orcpt xtext", "notify twice"):
        code, text = r[name]
        assert code == 501 and text.startswith(b"5.5.4 Syntax error in the DSN parameters"), (name, code, text)
    assert b"RET takes FULL or HDRS" in r["ret"][1]
    assert b"RET given twice" in r["ret twice"][1]
    assert b"NOTIFY=NEVER cannot be combined" in r["never and more"][1]
    assert b"ORCPT takes addr-type;xtext" in r["orcpt"][1]
    assert r["unknown"][0] == 555  # unknown parameters are refused as before
    assert r["good rcpt"][0] == 250
    assert r["helo"][0] == 501  # HELO: no ESMTP parameters


# ---------------------------------------------------------------- reports

async def test_notify_success_on_local_delivery_gives_a_delivered_report_with_envid_and_orcpt(rig):
    subject = "local success"
    await send(rig, [(ADMIN, ["NOTIFY=SUCCESS", "ORCPT=rfc822;ADMINISTRATOR+40SiteA.microsoft.com"]),
                     (CLERK, [])],  # no NOTIFY: no success report for the Clerk
               message(subject), mail_options=["RET=FULL", "ENVID=QX+2B42"])
    (report,) = await wait_for(lambda: rig.reports(subject))
    await rig.settled()
    assert report["Subject"] == f"Delivered: {subject}"
    assert report["Auto-Submitted"] == "auto-replied"
    human, status, returned = parts(report)
    assert "Original-Envelope-Id: QX+42" in status
    (block,) = blocks(status)  # the Clerk asked for nothing
    assert "Action: delivered" in block and "Status: 2.0.0" in block
    assert "Original-Recipient: rfc822;ADMINISTRATOR@SiteA.microsoft.com" in block
    assert f"Final-Recipient: rfc822; {ADMIN}" in block
    assert "mailboxes" not in report.as_string()  # no file name of the mailbox store
    assert returned.get_content_type() == "text/rfc822-headers"  # RET=FULL is for failure reports only
    assert "the body text" not in report.as_string()
    assert ADMIN in human and CLERK not in human
    assert len(maildir_messages(rig.site.config.data_dir, "Clerk")) == 1
    story = await story_of(rig.site, subject)
    by = {r.recipient: r for r in story.recipients}
    assert by[ADMIN].report == "delivered" and by[CLERK].report is None
    assert "'delivered' report" in by[ADMIN].detail
    tree = story.as_dict()
    assert "mailbox Administrator (DSN: delivered)" in tree["path"]
    assert any(e.event == "dsn_sent" for h in story.hops for e in h.events)


async def test_notify_never_or_without_failure_suppresses_the_ndr(rig):
    subject = "failures by notify"
    await send(rig, [("bad1@partner.test", ["NOTIFY=NEVER"]), ("bad2@partner.test", ["NOTIFY=SUCCESS,DELAY"]),
                     ("bad3@partner.test", []), ("bad4@partner.test", ["NOTIFY=FAILURE"])], message(subject))
    (ndr,) = await wait_for(lambda: rig.reports(subject))
    await rig.settled()
    assert ndr["Subject"] == f"Undeliverable: {subject}"
    _, status, _ = parts(ndr)
    finals = sorted(re.findall(r"Final-Recipient: rfc822; (\S+)", status))
    assert finals == ["bad3@partner.test", "bad4@partner.test"]
    story = await story_of(rig.site, subject)
    by = {r.recipient: r for r in story.recipients}
    assert by["bad1@partner.test"].state == "failed"
    assert "no NDR (the sender asked for none: NOTIFY=NEVER)" in by["bad1@partner.test"].detail
    assert "NOTIFY=SUCCESS,DELAY" in by["bad2@partner.test"].detail
    assert by["bad3@partner.test"].state == "bounced"


async def test_ret_full_returns_the_message_and_ret_hdrs_only_its_headers(rig):
    await send(rig, [("bad-full@partner.test", [])], message("ret full", "FULL-BODY"), mail_options=["RET=FULL"])
    await send(rig, [("bad-hdrs@partner.test", [])], message("ret hdrs", "HDRS-BODY"), mail_options=["RET=HDRS"])
    (full,) = await wait_for(lambda: rig.reports("ret full"))
    (hdrs,) = await wait_for(lambda: rig.reports("ret hdrs"))
    assert parts(full)[2].get_content_type() == "message/rfc822"
    assert "FULL-BODY" in full.as_string()
    assert parts(hdrs)[2].get_content_type() == "text/rfc822-headers"
    assert "HDRS-BODY" not in hdrs.as_string() and "Subject: ret hdrs" in hdrs.as_string()


async def test_parameters_go_on_to_a_dsn_peer_and_a_peer_without_dsn_gets_a_relayed_report(rig):
    subject = "pass on"
    await send(rig, [("ok1@partner.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;OK1+2Bx@partner.test"]),
                     ("ok2@partner.test", []),
                     ("ok3@plain.test", ["NOTIFY=SUCCESS"]), ("ok4@plain.test", ["NOTIFY=FAILURE"])],
               message(subject), mail_options=["RET=HDRS", "ENVID=ID+2B1"])
    (report,) = await wait_for(lambda: rig.reports(subject))
    await rig.settled()
    dsn_lines = [line for s in rig.dsn_peer.sessions for _, _, line in s.commands]
    at = next(i for i, line in enumerate(dsn_lines) if line.startswith(b"RCPT TO:<ok1@"))
    mail = next(line for line in reversed(dsn_lines[:at]) if line.startswith(b"MAIL FROM:"))
    assert b" RET=HDRS" in mail and b" ENVID=ID+2B1" in mail
    rcpts = {line.split(b">")[0][9:].decode(): line for line in dsn_lines if line.startswith(b"RCPT TO:<ok")}
    assert rcpts["ok1@partner.test"].endswith(b"> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;OK1+2Bx@partner.test")
    assert rcpts["ok2@partner.test"].endswith(b"> ORCPT=rfc822;ok2@partner.test")  # added: the address received
    plain_lines = [line for s in rig.plain_peer.sessions for _, _, line in s.commands]
    assert any(line.startswith(b"RCPT TO:<ok3@plain.test>") for line in plain_lines)
    assert not [line for line in plain_lines if re.search(rb"NOTIFY=|ORCPT=|RET=|ENVID=", line)]
    # only ok3 asked for success and went to a host without DSN: a "relayed" report about it alone
    assert report["Subject"] == f"Relayed: {subject}"
    _, status, _ = parts(report)
    assert "Original-Envelope-Id: ID+1" in status
    (block,) = blocks(status)
    assert "Final-Recipient: rfc822; ok3@plain.test" in block and "Action: relayed" in block
    assert "Remote-MTA: dns; 127.0.0.1" in block
    story = await story_of(rig.site, subject)
    assert {r.recipient: r.report for r in story.recipients}["ok3@plain.test"] == "relayed"


async def test_notify_delay_governs_delay_notices(rig):
    await send(rig, [("later1@partner.test", ["NOTIFY=DELAY"])], message("delay only"))
    await send(rig, [("later2@partner.test", ["NOTIFY=FAILURE"])], message("failure only"))
    await send(rig, [("later3@partner.test", [])], message("default notify"))
    await rig.settled()  # the lifetime (2 s) ran out for all three
    assert [m["Subject"] for m in rig.reports("delay only")] == ["Delivery delayed: delay only"]
    assert [m["Subject"] for m in rig.reports("failure only")] == ["Undeliverable: failure only"]
    assert sorted(m["Subject"] for m in rig.reports("default notify")) == [
        "Delivery delayed: default notify", "Undeliverable: default notify"]  # as before NOTIFY existed


# ---------------------------------------------------------------- durability

async def test_dsn_parameters_survive_a_restart_with_the_message_queued(tmp_path):
    port = free_port()  # the DSN peer is down at first
    path, config = write_site_file(tmp_path, site_mapping(
        "SiteA", email_domains=[{"domain": "partner.test", "host": "127.0.0.1", "port": port}],
        delivery={"retry_intervals": [0.2], "connect_timeout": 2}))
    async with running_site(config) as site:
        await asyncio.to_thread(transaction, site.bound_port,
                                [("ok@partner.test", ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;Ok+2B1@partner.test"])],
                                message("durable"), mail_options=["RET=HDRS", "ENVID=keep+2Bme"])
        await wait_for(lambda: any(r.attempts for e in Spool(config.data_dir).envelopes() for r in e.recipients))
    (env,) = list(Spool(config.data_dir).envelopes())  # read back from the journal, site stopped
    code, shown, _ = await asyncio.to_thread(run_cli, "queue", "show", env.queue_id, "--config", str(path))
    assert code == 0 and "dsn:        RET=HDRS ENVID=keep+me" in shown
    assert "dsn NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Ok+1@partner.test" in shown
    assert (env.ret, env.envid) == ("HDRS", "keep+me")
    (r,) = env.recipients
    assert (r.state, r.notify, r.orcpt) == (PENDING, "SUCCESS,DELAY", "rfc822;Ok+1@partner.test")
    peer = ScriptPeer(extensions=("DSN",))
    await peer.start(port=port)
    try:
        async with running_site(config):
            await wait_for(lambda: not list(Spool(config.data_dir).envelopes()), timeout=20)
    finally:
        peer.close()
    lines = [line for s in peer.sessions for _, _, line in s.commands]
    assert any(line.startswith(b"MAIL FROM:<User1@") and b"RET=HDRS ENVID=keep+2Bme" in line for line in lines)
    assert b"RCPT TO:<ok@partner.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Ok+2B1@partner.test" in lines



# ---------------------------------------------------------------- between two sites

async def test_between_sites_the_next_site_reports_delivery_and_the_first_sends_none(tmp_path):
    """SiteA passes NOTIFY, ORCPT, RET and ENVID on to SiteB (which offers DSN), so
    SiteA sends no "relayed" report; SiteB delivers to User2's mailbox and its
    "delivered" report comes back to the sender at SiteA, naming the ORCPT and ENVID
    the sender gave SiteA."""
    org = Organisation(tmp_path, hosts={"SiteA": "127.0.0.71", "SiteB": "127.0.0.72"})
    try:
        await org.start()
        user2 = "User2@SiteB.microsoft.com"
        await asyncio.to_thread(
            transaction, org.sites["SiteA"].bound_port,
            [(user2, ["NOTIFY=SUCCESS", "ORCPT=rfc822;user2+40SiteB.microsoft.com"])],
            message("two sites"), mail_options=["ENVID=two+2Bsites", "RET=HDRS"], host="127.0.0.71")
        reports = await wait_for(lambda: maildir_messages(org.data("SiteA"), "User1"))
        await org.quiet()
        assert len(maildir_messages(org.data("SiteB"), "User2")) == 1
    finally:
        await org.close()
    assert len(maildir_messages(org.data("SiteA"), "User1")) == 1  # SiteB's report only: no "relayed" one
    report = email.message_from_bytes(reports[0], policy=email.policy.default)
    assert report["Subject"] == "Delivered: two sites"
    _, status, _ = parts(report)
    assert f"Reporting-MTA: dns; {org.configs['SiteB'].hostname}" in status
    assert "Original-Envelope-Id: two+sites" in status
    (block,) = blocks(status)
    assert "Original-Recipient: rfc822;user2@SiteB.microsoft.com" in block and "Action: delivered" in block
