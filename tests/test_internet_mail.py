"""The Internet Mail tab by E-Mail Domain (Q262126, Q176161) and the separate inbound
and outbound size limits (Q231303), with a real site and a real SMTP peer on loopback:
what reaches the peer, what is discarded without an NDR, what comes back as an NDR."""

from __future__ import annotations

import asyncio
import itertools
import smtplib

import pytest
from ims_kit import (
    USER1,
    Peer,
    admin,
    admin_section,
    human_text,
    mailbox,
    message,
    queued,
    start_peer,
    status_text,
    submit,
)
from sitekit import free_port, make_config, running_site, site_mapping, wait_for

from imsrelay.observe import tracking

DOMAINS = ("partner.test", "open.test", "names.test", "small.test")


@pytest.fixture
async def world(tmp_path):
    """SiteA with a peer for every test domain (and SiteB's server) and these settings: ``*`` disables
    out-of-office replies; partner.test disables automatic replies (and so forwards);
    open.test allows everything; names.test strips display names; small.test takes at
    most 2 KB; the IMS takes 8 KB in and sends 4 KB out."""
    port = free_port()
    peer = Peer()
    server = await start_peer("127.0.0.1", port, peer)
    config = make_config(tmp_path, site_mapping(
        "SiteA", email_domains=[{"domain": d, "host": "127.0.0.1", "port": port} for d in DOMAINS],
        connected_sites=[{"name": "SiteB", "routing_address": "@SiteB.microsoft.com", "host": "127.0.0.1",
                          "port": port}],
        smtp={"max_message_size": 8192},
        delivery={"retry_intervals": [0.3], "max_message_size": 4096},
        internet_mail=[{"domain": "*", "out_of_office": False},
                       {"domain": "partner.test", "auto_replies": False},
                       {"domain": "open.test", "out_of_office": True},
                       {"domain": "names.test", "display_names": False},
                       {"domain": "small.test", "max_message_size": 2048}],
        **admin_section()))
    try:
        async with running_site(config) as site:
            yield site, peer
    finally:
        server.close()


_NUMBERS = itertools.count(2)


def numbered(data: bytes) -> bytes:
    """The message with a Message-ID of its own (tracking tells messages apart by it)."""
    return data.replace(b"<m1@", f"<m{next(_NUMBERS)}@".encode())


async def settle(site) -> None:
    await wait_for(lambda: not queued(site), timeout=15)


async def events(site, event: str) -> list[tracking.TrackingEvent]:
    await asyncio.sleep(0.2)  # the tracking writer's batch window
    found = await site.tracking.query(tracking.TrackingQuery(limit=500))
    return [e for e in found if e.event == event]


async def test_automatic_messages_are_discarded_by_domain_without_an_ndr(world):
    site, peer = world
    oof = "Subject: Out of Office AutoReply: Figures\r\n"
    await submit(site, ["bob@partner.test"], numbered(message("plain mail")))
    await submit(site, ["bob@partner.test"], numbered(message("away", headers="Auto-Submitted: auto-replied\r\n")))
    await submit(site, ["bob@partner.test"], numbered(message("fwd", headers="Autoforwarded: TRUE\r\n")))
    await submit(site, ["bob@open.test"], numbered(message("fwd open", headers="Autoforwarded: TRUE\r\n")))
    await submit(site, ["bob@open.test"], numbered(message(headers=oof).replace(b"Subject: Figures\r\n", b"")))
    await submit(site, ["bob@small.test", "bob@open.test", "User2@SiteB.microsoft.com"],
                 numbered(message(headers=oof + "Auto-Submitted: auto-replied\r\n").replace(b"Subject: Figures\r\n", b"")))
    await settle(site)
    got = sorted((r, subject) for (rcpts, _), subject in zip(peer.messages, peer.subjects(), strict=True)
                 for r in rcpts)
    assert got == [
        ("User2@SiteB.microsoft.com", "Out of Office AutoReply: Figures"),  # another site: not the Internet
        ("bob@open.test", "Out of Office AutoReply: Figures"),  # open.test allows what "*" disables
        ("bob@open.test", "Out of Office AutoReply: Figures"),  # (the last message's copy to open.test)
        ("bob@open.test", "fwd open"),
        ("bob@partner.test", "plain mail")]
    assert mailbox(site.config.data_dir, "User1") == []  # discarded silently: no NDR to the sender
    discarded = await events(site, tracking.DISCARDED)
    assert sorted((e.recipient, e.detail["kind"]) for e in discarded) == [
        ("bob@partner.test", "auto-forward"), ("bob@partner.test", "auto-reply"),
        ("bob@small.test", "out-of-office")]
    assert all("without an NDR" in e.detail["diagnostic"] for e in discarded)
    # the Message Tracking Center's story says where each ended
    stories = tracking.follow(await site.tracking.query(tracking.TrackingQuery(limit=500)))
    ended = sorted((r.recipient, r.state) for story in stories for r in story.recipients if r.state == "discarded")
    assert ended == [("bob@partner.test", "discarded")] * 2 + [("bob@small.test", "discarded")]


async def test_display_names_are_stripped_for_that_domain_only(world):
    site, peer = world
    data = (f"From: \"User One\" <{USER1}>\r\nTo: Bob <bob@names.test>, Ann <ann@open.test>\r\n"
            "Cc: Carol <carol@names.test>\r\nSubject: names\r\n\r\nBody with To: Bob <bob@x>\r\n").encode()
    await submit(site, ["bob@names.test", "ann@open.test"], data)
    await settle(site)
    by_rcpt = {rcpts[0]: raw for rcpts, raw in peer.messages}
    assert set(by_rcpt) == {"bob@names.test", "ann@open.test"}
    stripped, kept = by_rcpt["bob@names.test"], by_rcpt["ann@open.test"]
    assert f"\r\nFrom: {USER1}\r\n".encode() in stripped
    assert b"\r\nTo: bob@names.test, ann@open.test\r\nCc: carol@names.test\r\n" in stripped
    assert b"Body with To: Bob <bob@x>" in stripped  # the body is never touched
    assert b'From: "User One" <' in kept and b"To: Bob <bob@names.test>" in kept


async def test_size_limits_inbound_outbound_and_per_domain(world):
    site, peer = world
    assert site.config.smtp.max_message_size == 8192

    def too_big() -> tuple[str, int, bytes]:
        with smtplib.SMTP("127.0.0.1", site.bound_port, timeout=10) as s:
            s.ehlo("client.test")
            code, reply = s.mail(USER1, ["SIZE=9000"])
            return s.esmtp_features["size"], code, reply

    size, code, reply = await asyncio.to_thread(too_big)  # the inbound limit is in EHLO and enforced
    assert (size, code, reply[:5]) == ("8192", 552, b"5.3.4")
    middle = message("three KB", body=(b"x" * 70 + b"\r\n") * 43)  # under 4 KB out: too big for small.test only
    large = message("six KB", body=(b"x" * 70 + b"\r\n") * 86)  # in under 8 KB, out over 4 KB
    await submit(site, ["bob@small.test", "bob@open.test"], middle)
    await submit(site, ["bob@open.test", "User1@SiteA.microsoft.com"], large)
    await settle(site)
    assert sorted((r[0], s) for (r, _), s in zip(peer.messages, peer.subjects(), strict=True)) == [
        ("bob@open.test", "three KB")]
    inbox = mailbox(site.config.data_dir, "User1")
    ndrs = [m for m in inbox if m.get_content_type() == "multipart/report"]
    assert [m["Subject"] for m in inbox if m not in ndrs] == ["six KB"]  # local delivery: no outbound limit
    assert len(ndrs) == 2
    texts = sorted(" ".join((status_text(m) + human_text(m)).split()) for m in ndrs)
    assert all("Status: 5.3.4" in t for t in texts)
    assert any("bob@small.test" in t and "limit of 2048 bytes for small.test" in t for t in texts)
    assert any("bob@open.test" in t and "outbound size limit of 4096 bytes" in t for t in texts)


async def test_the_console_shows_the_settings_as_they_apply(world):
    site, _ = world
    cfg = await admin(site, "GET", "/config")
    assert cfg["ims"]["max_message_size"] == 8192 and cfg["ims"]["max_outbound_message_size"] == 4096
    assert cfg["journaling"] == {"recipient": None, "reports": True}
    entries = {e["entry"]: e for e in cfg["internet_mail"]}
    assert list(entries) == ["*", *DOMAINS]
    assert entries["*"]["out_of_office"] is False and entries["*"]["auto_replies"] is True
    assert entries["partner.test"] == {"entry": "partner.test", "out_of_office": False, "auto_replies": False,
                                       "auto_forwards": False, "display_names": True, "max_message_size": 0}
    assert entries["small.test"]["max_message_size"] == 2048
