"""ETRN (RFC 1985; Q175494, Q258292): an E-Mail Domain entry holds its mail until the
peer issues ETRN; the site answers ETRN from allowed hosts; it can issue ETRN on a
schedule.  Real sites, a real aiosmtpd peer, swaks and raw ETRN with smtplib."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import subprocess

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


def etrn(port: int, node: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    with smtplib.SMTP(host, port, timeout=10) as s:
        s.ehlo("dialup.partner.test")
        return s.docmd("ETRN", node)


async def test_mail_is_held_until_the_peer_issues_etrn(tmp_path, capsys):
    port = free_port()
    peer = Peer()
    server = await start_peer("127.0.0.1", port, peer)
    path, config = write_site_file(tmp_path, site_mapping(
        "SiteA", delivery={"retry_intervals": [0.2]},
        email_domains=[{"domain": "partner.test", "host": "127.0.0.1", "port": port, "etrn": True}],
        etrn={"allowed_hosts": ["127.0.0.0/8"]}, **admin_section()))
    try:
        assert await asyncio.to_thread(main, ["route", "bob@partner.test", "--config", str(path)]) == 0
        assert "held until the peer issues ETRN for partner.test" in capsys.readouterr().out
        async with running_site(config) as site:
            if shutil.which("swaks"):  # the EHLO answer offers ETRN
                done = await asyncio.to_thread(subprocess.run, [
                    "swaks", "--server", f"127.0.0.1:{site.bound_port}", "--quit-after", "EHLO"],
                    capture_output=True, text=True, timeout=30)
                assert "250-ETRN" in done.stdout
            assert (await asyncio.to_thread(etrn, site.bound_port, "partner.test"))[0] == 251  # nothing yet
            await submit(site, ["bob@partner.test"], message("held 1"))
            await submit(site, ["carol@partner.test"], message("held 2"))
            await wait_for(lambda: site.qmgr.held_messages() == 2)
            await asyncio.sleep(1.0)  # several retry intervals: nothing leaves
            assert peer.messages == [] and all(r.attempts == 0 for e in queued(site) for r in e.recipients)
            listing = (await admin(site, "GET", "/queue"))["messages"]
            assert [r["held"] for m in listing for r in m["recipients"]] == \
                ["held until the peer issues ETRN for partner.test"] * 2
            assert [(r["state"], r["next_attempt"]) for m in listing for r in m["recipients"]] == [("held", None)] * 2

            code, text = await asyncio.to_thread(etrn, site.bound_port, "partner.test")
            assert code == 253 and text == b"2.0.0 OK, 2 pending messages for node partner.test started"
            await wait_for(lambda: len(peer.messages) == 2)
            await wait_for(lambda: not queued(site))

            # mail that arrives afterwards waits for the next ETRN again; @domain takes sub-domains
            await submit(site, ["dave@sales.partner.test"], message("held 3"))
            await wait_for(lambda: site.qmgr.held_messages() == 1)
            assert (await asyncio.to_thread(etrn, site.bound_port, "sales.partner"))[0] == 251
            assert (await asyncio.to_thread(etrn, site.bound_port, "@partner.test"))[0] == 253
            await wait_for(lambda: len(peer.messages) == 3)

            # syntax
            assert (await asyncio.to_thread(etrn, site.bound_port, ""))[0] == 501
    finally:
        server.close()


async def test_etrn_from_a_host_not_allowed_is_refused(tmp_path):
    config = make_config(tmp_path, site_mapping("SiteA", etrn={"allowed_hosts": ["10.0.0.0/8"]}))
    async with running_site(config) as site:
        code, text = await asyncio.to_thread(etrn, site.bound_port, "partner.test")
    assert code == 459 and b"not allowed" in text
    plain = make_config(tmp_path / "plain", site_mapping("SiteA"))
    async with running_site(plain) as site:
        assert (await asyncio.to_thread(etrn, site.bound_port, "partner.test"))[0] == 502


async def test_a_site_issues_etrn_on_a_schedule(tmp_path):
    """SiteA holds SiteB's mail for ETRN (a dial-up site); SiteB asks for it every second."""
    host_a, host_b = "127.0.0.41", "127.0.0.42"
    port_a, port_b = free_port(host_a), free_port(host_b)
    a_cfg = make_config(tmp_path, site_mapping(
        "SiteA", listen=host_a, port=port_a, delivery={"retry_intervals": [0.2]},
        connected_sites=[{"name": "SiteB", "routing_address": "@SiteB.microsoft.com"}],
        email_domains=[{"domain": "SiteB.microsoft.com", "host": host_b, "port": port_b, "etrn": True}],
        etrn={"allowed_hosts": ["127.0.0.0/8"]}))
    b_cfg = make_config(tmp_path, site_mapping(
        "SiteB", listen=host_b, port=port_b,
        etrn={"requests": [{"host": host_a, "port": port_a, "domain": "SiteB.microsoft.com", "schedule": "1s"}]}))
    async with running_site(a_cfg) as a:
        await submit(a, ["User2@SiteB.microsoft.com"], message("for the dial-up site"))
        await wait_for(lambda: a.qmgr.held_messages() == 1)
        assert maildir_messages(b_cfg.data_dir, "User2") == []
        async with running_site(b_cfg):
            await wait_for(lambda: maildir_messages(b_cfg.data_dir, "User2"), timeout=15)
        assert not queued(a)


def test_etrn_config_errors_name_the_key(tmp_path):
    from imsrelay.model.errors import ConfigError

    with pytest.raises(ConfigError, match=r"etrn.allowed_hosts\[0\]"):
        make_config(tmp_path, site_mapping("SiteA", etrn={"allowed_hosts": ["nonsense"]}))
    with pytest.raises(ConfigError, match=r"etrn.requests\[0\].domain"):
        make_config(tmp_path, site_mapping("SiteA", etrn={"requests": [{"host": "127.0.0.1"}]}))
