"""Transfer mode at run time (Q238719, Q156063): real site, real aiosmtpd peer, smtplib."""

from __future__ import annotations

import asyncio
import smtplib

import pytest
from ims_kit import Peer, admin, admin_section, message, queued, start_peer, submit
from sitekit import (
    free_port,
    maildir_messages,
    make_config,
    running_site,
    site_mapping,
    wait_for,
    write_site_file,
)

from imsrelay.cli import main
from imsrelay.model.envelope import Envelope, RecipientState, new_queue_id
from imsrelay.policy.transfer_mode import TransferMode


def mapping_for(peer_port: int, **extra):
    return site_mapping("SiteA", delivery={"retry_intervals": [0.2, 0.5]},
                        email_domains=[{"domain": "partner.test", "host": "127.0.0.1", "port": peer_port}],
                        **admin_section(), **extra)


def config_for(tmp_path, peer_port: int, **extra):
    return make_config(tmp_path, mapping_for(peer_port, **extra))


def refused_at_connect(port: int) -> tuple[int, bytes]:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.noop()
    except smtplib.SMTPConnectError as exc:
        return exc.smtp_code, exc.smtp_error
    raise AssertionError("the connection was accepted")


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_each_mode_with_mail_in_flight(tmp_path, capsys):
    port = free_port()
    peer = Peer()
    server = await start_peer("127.0.0.1", port, peer)
    file, config = write_site_file(tmp_path, mapping_for(port))
    path = str(file)
    try:
        async with running_site(config) as site:
            # Inbound only: new mail is accepted, local mail delivered, outbound SMTP held
            assert await cli("transfer-mode", "set", "inbound", "--config", path) == 0
            assert "transfer mode is now inbound (was inbound-outbound)" in capsys.readouterr().out
            for i in range(3):
                await submit(site, ["bob@partner.test"], message(f"out {i}"))
            await submit(site, ["User1@SiteA.microsoft.com"], message("local"))
            await wait_for(lambda: maildir_messages(config.data_dir, "User1"))
            await wait_for(lambda: site.qmgr.held_messages() == 3)
            await asyncio.sleep(1.0)  # several retry intervals: still nothing sent
            assert peer.messages == []
            state = await admin(site, "GET", "/transfer-mode")
            assert state == {"site": "SiteA", "mode": "inbound", "held_messages": 3}
            assert all(r.attempts == 0 for e in queued(site) for r in e.recipients)  # held, not failed
            # every view names it "held", with no next attempt: queue list, the API, tracking
            assert await cli("queue", "list", "--config", path) == 0
            listing = capsys.readouterr().out
            assert listing.count("held      bob@partner.test  attempts 0, no attempt while held: Transfer mode "
                                 "inbound: outbound mail is held") == 3, listing
            assert "next attempt" not in listing
            queue = (await admin(site, "GET", "/queue"))["messages"]
            assert {(r["state"], r["next_attempt"]) for m in queue for r in m["recipients"]} == {("held", None)}
            story = (await admin(site, "GET", "/api/v1/tracking?recipient=bob@partner.test"))["messages"][0]
            assert story["recipients"][0]["state"] == "held"
            assert "Transfer mode inbound" in story["recipients"][0]["detail"]

            # None: new mail is refused with a 4xx, every queue is held (local too)
            assert await cli("transfer-mode", "set", "none", "--config", path) == 0
            code, text = await asyncio.to_thread(refused_at_connect, site.bound_port)
            assert code == 421 and b"4.3.2" in text and b"transfer mode is none" in text
            note = Envelope(queue_id=new_queue_id(), sender="", recipients=[RecipientState("User1@SiteA.microsoft.com")],
                            received_at=site.clock(), origin="local")
            await site.enqueue_local(note, message("site notice"))
            await asyncio.sleep(1.0)
            assert len(maildir_messages(config.data_dir, "User1")) == 1 and peer.messages == []
            assert site.qmgr.held_messages() == 4

            # Outbound only: still refused, but everything queued goes, exactly once
            assert (await admin(site, "PUT", "/transfer-mode", {"mode": "outbound-only"}))["mode"] == "outbound"
            code, _ = await asyncio.to_thread(refused_at_connect, site.bound_port)
            assert code == 421
            await wait_for(lambda: len(peer.messages) == 3)
            await wait_for(lambda: len(maildir_messages(config.data_dir, "User1")) == 2)
            await wait_for(lambda: not queued(site))
            assert sorted(peer.subjects()) == ["out 0", "out 1", "out 2"]

            # Inbound & Outbound again: mail flows both ways
            assert await cli("transfer-mode", "set", "inbound-outbound", "--config", path) == 0
            await submit(site, ["bob@partner.test"], message("after"))
            await wait_for(lambda: len(peer.messages) == 4)
            assert await cli("transfer-mode", "show", "--config", path) == 0
            assert "transfer mode inbound-outbound; 0 message(s) held" in capsys.readouterr().out
    finally:
        server.close()


async def test_a_transaction_under_way_when_the_mode_changes_gets_a_4xx(tmp_path):
    config = config_for(tmp_path, free_port())
    async with running_site(config) as site:
        def transaction() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", site.bound_port, timeout=10) as s:
                s.ehlo("client.test")
                s.mail("User1@SiteA.microsoft.com")
                s.rcpt("User1@SiteA.microsoft.com")
                asyncio.run_coroutine_threadsafe(site.set_transfer_mode(mode_none), loop).result(10)
                code, reply = s.data(message("in flight"))
                s.rset()
                mail = s.mail("User1@SiteA.microsoft.com")
                return code, reply + b" | " + str(mail[0]).encode() + b" " + mail[1]

        mode_none = TransferMode.NONE
        loop = asyncio.get_running_loop()
        code, reply = await asyncio.to_thread(transaction)
    assert code == 451 and b"4.3.2" in reply and b"| 451" in reply
    assert maildir_messages(config.data_dir, "User1") == []  # not accepted: the client still has it


async def test_the_mode_survives_a_restart_and_offline_commands(tmp_path, capsys):
    path, config = write_site_file(tmp_path, site_mapping("SiteA", **admin_section(),
                                                          transfer={"mode": "inbound-outbound"}))
    async with running_site(config) as site:
        await admin(site, "PUT", "/transfer-mode", {"mode": "none"})
    assert await cli("transfer-mode", "show", "--offline", "--config", str(path)) == 0
    assert "transfer mode none (site stopped)" in capsys.readouterr().out
    async with running_site(config) as site:  # the directory database, not the file, is the truth
        assert site.transfer_mode.value == "none"
        code, _ = await asyncio.to_thread(refused_at_connect, site.bound_port)
        assert code == 421
    assert await cli("transfer-mode", "set", "both", "--offline", "--config", str(path)) == 0
    async with running_site(config) as site:
        assert site.transfer_mode.value == "inbound-outbound"
        await submit(site, ["User1@SiteA.microsoft.com"])
        await wait_for(lambda: maildir_messages(config.data_dir, "User1"))


async def test_user_errors_are_one_line(tmp_path, capsys):
    config = config_for(tmp_path, free_port())
    async with running_site(config) as site:
        from imsrelay.admin.client import AdminRequestError

        with pytest.raises(AdminRequestError) as err:
            await admin(site, "PUT", "/transfer-mode", {"mode": "sideways"})
        assert err.value.status == 400 and "not a transfer mode" in str(err.value)
    assert await cli("transfer-mode", "set", "sideways", "--offline", "--config", str(tmp_path / "x.toml")) == 2
    assert "not a transfer mode" in capsys.readouterr().err


async def test_held_mail_stays_held_across_a_restart_and_goes_when_released(tmp_path):
    port = free_port()
    peer = Peer()
    server = await start_peer("127.0.0.1", port, peer)
    config = config_for(tmp_path, port)
    try:
        async with running_site(config) as site:
            await site.set_transfer_mode(TransferMode.INBOUND)
            await submit(site, ["bob@partner.test"], message("kept"))
            await wait_for(lambda: site.qmgr.held_messages() == 1)
        async with running_site(config) as site:  # the journal and the mode both survive
            await wait_for(lambda: site.qmgr.held_messages() == 1)
            await asyncio.sleep(0.8)
            assert peer.messages == []
            await admin(site, "PUT", "/transfer-mode", {"mode": "inbound-outbound"})
            await wait_for(lambda: len(peer.messages) == 1)
            await wait_for(lambda: not queued(site))
    finally:
        server.close()
    assert peer.subjects() == ["kept"]
