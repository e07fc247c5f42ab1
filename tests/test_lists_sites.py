"""Custom recipients (KB Q258203) and distribution lists (KB Q185194) on real sites:
mail over SMTP on loopback, expansion, NDRs to the list owner, an expansion site,
replication of the objects between two sites, the CLI and the admin API."""

from __future__ import annotations

import asyncio
import email
import email.policy

from ims_kit import Peer, admin, start_peer
from sitekit import (
    ORG_HOSTS,
    free_port,
    maildir_messages,
    rcpt_reply,
    send_mail,
    simple_message,
    site_mapping,
    wait_for,
)

from imsrelay.config.loader import ConfigErrors, config_from_mapping
from imsrelay.model.objects import CustomRecipient, DistributionList

PEER_HOST = "127.10.10.26"  # the outside world's host for example.net (a test peer)
A, B = "@SiteA.microsoft.com", "@SiteB.microsoft.com"


def parsed(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


async def entry_at(org, at: str, address: str, *, gone: bool = False):
    d = org.sites[at].directory
    if gone:
        return await wait_for(lambda: d.run(lambda: d.find_entry(address) is None), timeout=20)
    return await wait_for(lambda: d.run(d.find_entry, address), timeout=20)


async def test_lists_and_custom_recipients_between_two_sites(organisation):
    peer = Peer("mail.example.net")
    port = free_port(PEER_HOST)
    server = await start_peer(PEER_HOST, port, peer)
    org = organisation(hosts={"SiteA": ORG_HOSTS["SiteA"], "SiteB": ORG_HOSTS["SiteB"]}, mailboxes={"SiteA": [
        {"alias": "User1"}, {"alias": "Administrator"}, {"alias": "Journal"}]}, extra={"SiteA": {
        "journaling": {"recipient": "Journal"},
        "email_domains": [{"domain": "example.net", "host": PEER_HOST, "port": port}],
        "custom_recipients": [{"alias": "Partner", "target": "partner@example.net", "display_name": "Partner Inc"}],
        "distribution_lists": [
            {"alias": "Staff", "owner": f"Administrator{A}",
             "members": [f"User1{A}", f"Partner{A}", f"Team{A}", f"Ghost{A}"]},
            {"alias": "Team", "members": [f"User1{A}", f"User2{B}", f"Staff{A}"]},
            {"alias": "Far", "members": [f"User1{A}", f"User2{B}"], "expansion_site": "SiteB"},
            {"alias": "Loose", "members": [f"Nobody{A}"]}]}})
    try:
        await org.start()
        a, b = org.sites["SiteA"], org.sites["SiteB"]
        host, port_a = a.config.smtp.listen, a.bound_port

        # Staff: nested Team, a loop back to Staff, User1 three times, a custom recipient, a bad member
        msg = simple_message("someone@example.net", f"Staff{A}", "Figures")
        await asyncio.to_thread(send_mail, host, port_a, "someone@example.net", [f"Staff{A}", f"User1{A}"], msg)
        await wait_for(lambda: len(maildir_messages(org.data("SiteB"), "User2")) == 1)
        await wait_for(lambda: len(maildir_messages(org.data("SiteA"), "Administrator")) == 1)
        await wait_for(lambda: len(peer.messages) == 1)
        assert len(maildir_messages(org.data("SiteA"), "User1")) == 1  # duplicates removed
        rcpts, raw = peer.messages[0]
        assert rcpts == ["partner@example.net"] and parsed(raw)["Subject"] == "Figures"  # redirected, no NDR
        copy = parsed(maildir_messages(org.data("SiteB"), "User2")[0])
        assert sorted(copy.get_all("X-IMS-Expanded-DL")) == [f"Staff{A}", f"Team{A}"]
        ndr = maildir_messages(org.data("SiteA"), "Administrator")[0]  # the owner's, not the sender's
        assert b"Ghost@SiteA.microsoft.com" in ndr and b"5.1.1" in ndr
        await org.quiet("SiteA", "SiteB")
        assert len(peer.messages) == 1  # no NDR went to the sender
        journal = [parsed(m) for m in maildir_messages(org.data("SiteA"), "Journal")]
        assert [str(m["Subject"]) for m in journal].count("Journal: Figures") == 1  # once, not per member
        found = await admin(b, "GET", f"/api/v1/search?query=to:Team{A}")  # the lists it came through
        assert [m["mailbox"] for m in found["messages"]] == ["User2"] and "Team@" in found["messages"][0]["lists"]

        # replication: the lists and the custom recipient reach SiteB like mailboxes
        await org.request_now("SiteB", "SiteA")
        far = await entry_at(org, "SiteB", f"Far{A}")
        assert isinstance(far, DistributionList) and far.expansion_site == "SiteB" and far.home_site == "SiteA"
        assert isinstance(await entry_at(org, "SiteB", f"partner{A}"), CustomRecipient)
        assert (await asyncio.to_thread(rcpt_reply, b.config.smtp.listen, b.bound_port, f"Staff{A}"))[0] == 250

        # Far is expanded at SiteB (Q185194): SiteA sends it there unexpanded
        await asyncio.to_thread(send_mail, host, port_a, f"User1{A}", f"Far{A}",
                                simple_message(f"User1{A}", f"Far{A}", "Far away"))
        await wait_for(lambda: len(maildir_messages(org.data("SiteB"), "User2")) == 2)
        await wait_for(lambda: len(maildir_messages(org.data("SiteA"), "User1")) == 2)
        copies = [parsed(m) for m in maildir_messages(org.data("SiteA"), "User1")]
        far_copy = next(m for m in copies if m["Subject"] == "Far away")
        assert far_copy.get_all("X-IMS-Expanded-DL") == [f"Far{A}"]
        assert any(b.config.hostname in str(r) for r in far_copy.get_all("Received"))  # it went through SiteB

        # the CLI and the admin API create and delete them; deletions replicate as tombstones
        out = await org.ok("directory", "add-custom", "Vendor", "vendor@example.net", site="SiteA")
        assert out.strip() == f"SiteA: custom recipient Vendor (SMTP:Vendor{A}) -> vendor@example.net created"
        out = await org.ok("directory", "add-list", "Buyers", "--member", f"Vendor{A}", "--member", f"User2{B}",
                           "--owner", f"Administrator{A}", site="SiteA")
        assert "distribution list Buyers (SMTP:Buyers@SiteA.microsoft.com): 2 member(s), owner" in out
        code, _, err = await org.cli("directory", "add-list", "Vendor", site="SiteA")
        assert code != 0 and "taken" in err
        out = await org.ok("directory", "set-list", "Buyers", "--remove", f"vendor{A}", site="SiteA")
        assert "1 member(s)" in out
        snapshot = await admin(a, "GET", "/directory?site=SiteA")
        assert [c["target"] for c in snapshot["custom_recipients"]] == ["partner@example.net", "vendor@example.net"]
        assert {d["alias"] for d in snapshot["distribution_lists"]} == {"Staff", "Team", "Far", "Loose", "Buyers"}
        listing = await org.ok("directory", "list", site="SiteA")
        assert f"SiteA: custom recipient Vendor (SMTP:Vendor{A}) -> vendor@example.net" in listing
        await org.request_now("SiteB", "SiteA")
        await entry_at(org, "SiteB", f"Vendor{A}")
        await org.ok("directory", "delete-custom", "Vendor", site="SiteA")
        await org.ok("directory", "delete-list", "Buyers", site="SiteA")
        code, _, err = await org.cli("directory", "delete-list", "Buyers", site="SiteA")
        assert code != 0 and "no distribution list Buyers" in err
        await org.request_now("SiteB", "SiteA")
        await entry_at(org, "SiteB", f"Vendor{A}", gone=True)
        await entry_at(org, "SiteB", f"Buyers{A}", gone=True)
        code, _ = await asyncio.to_thread(rcpt_reply, host, port_a, f"Vendor{A}")
        assert code == 550

        # a list without an owner: the NDR for a bad member goes to the sender, as Exchange did
        await asyncio.to_thread(send_mail, host, port_a, f"Administrator{A}", f"Loose{A}",
                                simple_message(f"Administrator{A}", f"Loose{A}", "Loose"))
        await wait_for(lambda: len(maildir_messages(org.data("SiteA"), "Administrator")) == 2)
        assert b"Nobody@SiteA.microsoft.com" in maildir_messages(org.data("SiteA"), "Administrator")[-1]
    finally:
        server.close()
        peer.hang_up()
        await server.wait_closed()


def test_site_file_checks_custom_recipients_and_lists(tmp_path):
    good = site_mapping("SiteA", custom_recipients=[{"alias": "Partner", "target": "partner@example.net"}],
                        distribution_lists=[{"alias": "Staff", "members": ["User1@SiteA.microsoft.com"],
                                             "owner": "Administrator@SiteA.microsoft.com",
                                             "expansion_site": "SiteB"}])
    cfg = config_from_mapping(good, tmp_path / "a.toml", data_dir=tmp_path / "a")
    assert cfg.custom_recipients[0].target == "partner@example.net"
    assert cfg.distribution_lists[0].members == ("User1@SiteA.microsoft.com",)
    assert cfg.distribution_lists[0].expansion_site == "SiteB"
    bad = site_mapping("SiteA", custom_recipients=[{"alias": "User1", "target": "nowhere"}],
                       distribution_lists=[{"alias": "Staff", "members": ["@@"], "colour": "red"}])
    try:
        config_from_mapping(bad, tmp_path / "b.toml", data_dir=tmp_path / "b")
    except ConfigErrors as exc:
        text = "\n".join(exc.lines())
    else:
        raise AssertionError("a bad site file was accepted")
    assert "custom_recipients" in text and "is taken" in text and "nowhere" in text
    assert "members[0]" in text and "colour" in text
