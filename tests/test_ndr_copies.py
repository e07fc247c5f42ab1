"""NDR copies to the administrator mailbox (Q190708), with a real peer refusing a recipient."""

from __future__ import annotations

from ims_kit import Peer, human_text, mailbox, message, queued, start_peer, status_text, submit
from sitekit import free_port, make_config, running_site, site_mapping, wait_for


class Refusing(Peer):
    async def handle_RCPT(self, server, session, envelope, address, options):
        if address.startswith("bad"):
            return f"550 5.1.1 <{address}>: unknown user"
        return await super().handle_RCPT(server, session, envelope, address, options)


async def _bounce(tmp_path, notifications: dict | None) -> tuple[list, list]:
    port = free_port()
    server = await start_peer("127.0.0.1", port, Refusing())
    extra = {"notifications": notifications} if notifications else {}
    config = make_config(tmp_path, site_mapping(
        "SiteA", email_domains=[{"domain": "partner.test", "host": "127.0.0.1", "port": port}],
        delivery={"retry_intervals": [0.3]}, **extra))
    try:
        async with running_site(config) as site:
            await submit(site, ["bad@partner.test"], message("to a bad address"))
            await wait_for(lambda: mailbox(config.data_dir, "User1"))
            await wait_for(lambda: not queued(site))
    finally:
        server.close()
    return mailbox(config.data_dir, "User1"), mailbox(config.data_dir, "Administrator")


async def test_the_administrator_gets_a_copy_of_each_ndr(tmp_path):
    to_sender, to_admin = await _bounce(tmp_path, {"administrator": "Administrator", "copy_ndrs": True})
    assert len(to_sender) == 1 and len(to_admin) == 1
    copy = to_admin[0]
    assert copy["Subject"] == to_sender[0]["Subject"]
    assert "Status: 5.1.1" in status_text(copy) and "bad@partner.test" in human_text(copy)
    assert copy["To"] == to_sender[0]["To"]  # the same report, addressed to the sender; a copy in the envelope


async def test_no_copy_unless_enabled(tmp_path):
    to_sender, to_admin = await _bounce(tmp_path, {"administrator": "Administrator", "copy_ndrs": False})
    assert len(to_sender) == 1 and to_admin == []


async def test_an_address_works_as_administrator_too(tmp_path):
    to_sender, to_admin = await _bounce(tmp_path, {"administrator": "Administrator@SiteA.microsoft.com",
                                                   "copy_ndrs": True})
    assert len(to_sender) == 1 and len(to_admin) == 1
