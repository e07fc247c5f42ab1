"""The console's property pages below the browser: the TOML edits that keep a
person's lines (imsrelay.config.toml_edit), the entries the admin endpoint builds
from a form (imsrelay.admin.property_routes), the replication hold for a site that
is not configured (KB Q196927's NOTE) and Check Now's new sites."""

from __future__ import annotations

import os
import subprocess
import tomllib

import pytest

from imsrelay.admin.property_routes import (
    PropertyError,
    connected_site_entry,
    connector_entry,
    email_domain_entry,
    write_atomically,
)
from imsrelay.config import toml_edit, toml_text
from imsrelay.directory import kcc
from imsrelay.directory.replication import sending_site, unconfigured_peer_reply
from imsrelay.model.objects import SiteObject
from imsrelay.model.settings import ConnectedSite, ReplicationConnector
from imsrelay.routing.router import RoutingTable

FILE = """# my site, written by hand
[site]
name = "SiteA"   # the directory name

# the first link
[[connected_sites]]
name = "SiteB"
routing_address = "@SiteB.microsoft.com"  # keep this comment

# a second one
[[connected_sites]]
name = "SiteC"
routing_address = "@SiteC.microsoft.com"

[replication]
startup_delay = "5m"
"""


def test_add_keeps_every_line_and_appends_a_block():
    edit = toml_edit.add_entry(FILE, "email_domains", "domain", {"domain": "SiteB.microsoft.com", "host": "10.0.0.1"},
                               note="Added by the console")
    assert not edit.rewritten
    assert edit.text.startswith(FILE.rstrip("\n"))
    assert "# Added by the console\n[[email_domains]]\n" in edit.text
    assert tomllib.loads(edit.text)["email_domains"] == [{"domain": "SiteB.microsoft.com", "host": "10.0.0.1"}]


def test_add_a_connector_under_replication_keeps_the_table():
    edit = toml_edit.add_entry(FILE, "replication.connectors", "site", {"site": "SiteB"}, note="n")
    data = tomllib.loads(edit.text)
    assert data["replication"] == {"startup_delay": "5m", "connectors": [{"site": "SiteB"}]}
    assert not edit.rewritten and "# the first link" in edit.text


def test_add_twice_is_refused():
    with pytest.raises(toml_edit.EditError, match="already has a \\[\\[connected_sites\\]\\] entry with name = 'siteb'"):
        toml_edit.add_entry(FILE, "connected_sites", "name", {"name": "siteb", "routing_address": "@x.com"}, note="n")


def test_replace_changes_one_block_and_keeps_comments():
    edit = toml_edit.replace_entry(FILE, "connected_sites", "name", "SiteB",
                                   {"name": "SiteB", "routing_address": "@b.example.com", "cost": 5}, note="Changed")
    assert not edit.rewritten
    data = tomllib.loads(edit.text)
    assert data["connected_sites"][0] == {"name": "SiteB", "routing_address": "@b.example.com", "cost": 5}
    assert data["connected_sites"][1]["name"] == "SiteC"
    for line in ("# my site, written by hand", "# the first link", "# a second one", 'name = "SiteA"   # the directory name'):
        assert line in edit.text
    assert "@SiteB.microsoft.com" not in edit.text


def test_remove_takes_out_one_block_only():
    edit = toml_edit.remove_entry(FILE, "connected_sites", "name", "SiteC")
    assert not edit.rewritten
    data = tomllib.loads(edit.text)
    assert [c["name"] for c in data["connected_sites"]] == ["SiteB"]
    assert data["replication"] == {"startup_delay": "5m"}
    assert "# the first link" in edit.text and "# keep this comment" in edit.text
    last = toml_edit.remove_entry(edit.text, "connected_sites", "name", "SiteB")
    assert "connected_sites" not in tomllib.loads(last.text)


def test_inline_arrays_are_written_again_in_block_form():
    text = '# head comment\nconnected_sites = [{name = "SiteB", routing_address = "@b.com"}]\n'
    edit = toml_edit.add_entry(text, "connected_sites", "name", {"name": "SiteC", "routing_address": "@c.com"}, note="n")
    assert edit.rewritten and edit.text.startswith("# head comment\n")
    assert [c["name"] for c in tomllib.loads(edit.text)["connected_sites"]] == ["SiteB", "SiteC"]
    assert edit.text.count("[[connected_sites]]") == 2


def test_missing_entry_and_broken_file_are_refused():
    with pytest.raises(toml_edit.EditError, match="no \\[\\[email_domains\\]\\] entry"):
        toml_edit.remove_entry(FILE, "email_domains", "domain", "x.com")
    with pytest.raises(toml_edit.EditError, match="not valid TOML"):
        toml_edit.add_entry("[site\n", "connected_sites", "name", {"name": "B"}, note="n")


def test_write_atomically_replaces_whole(tmp_path):
    path = tmp_path / "SiteA.toml"
    path.write_text("old\n")
    path.chmod(0o600)
    write_atomically(path, "new\n")
    assert path.read_text() == "new\n" and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["SiteA.toml"]


async def test_a_file_that_cannot_be_written_is_answered_in_the_form(organisation):
    org = organisation()
    await org.start("SiteA")
    path = org.paths["SiteA"]
    before = path.read_text()
    # as a read-only mount: no temporary file, no rename (root needs the immutable flag)
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path.parent)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr: a directory cannot be made unwritable")
        undo = ["chattr", "-i", str(path.parent)]
    else:
        path.parent.chmod(0o555)
        undo = ["chmod", "755", str(path.parent)]
    try:
        async with aiohttp.ClientSession() as http:
            status, body = await _call(http, org.url("SiteA"), "POST", "/config/email-domains",
                                       {"domain": "branch.example", "host": "127.0.0.99"})
    finally:
        subprocess.run(undo, check=True)
    assert status == 400 and "cannot be written" in body["error"] and "nothing changed" in body["error"]
    assert path.read_text() == before


def test_form_entries_are_checked():
    assert connected_site_entry({"name": "SiteB", "type": "SMTP", "routing_address": "SiteB.microsoft.com"}, "SiteA") == {
        "name": "SiteB", "routing_address": "@SiteB.microsoft.com"}
    with pytest.raises(PropertyError, match="type SMTP, in upper case"):
        connected_site_entry({"name": "SiteB", "type": "smtp", "routing_address": "@b.com"}, "SiteA")
    with pytest.raises(PropertyError, match="SiteA is this site"):
        connected_site_entry({"name": "SiteA", "routing_address": "@a.com"}, "SiteA")
    with pytest.raises(PropertyError, match="cost must be a whole number from 0 to 100"):
        connected_site_entry({"name": "SiteB", "routing_address": "@b.com", "cost": 500}, "SiteA")
    assert email_domain_entry({"domain": "SiteB.microsoft.com", "host": "10.10.10.15", "port": "2525"}) == {
        "domain": "SiteB.microsoft.com", "host": "10.10.10.15", "port": 2525}
    with pytest.raises(PropertyError, match="host is required"):
        email_domain_entry({"domain": "SiteB.microsoft.com"})
    known = {"SiteB": "@SiteB.microsoft.com"}
    assert connector_entry({"site": "siteb", "server": "ServerB"}, None, known, "SiteA") == {"site": "SiteB",
                                                                                             "server": "ServerB"}
    with pytest.raises(PropertyError, match="not available on this network"):
        connector_entry({"site": "SiteB", "remote_on_network": True}, None, known, "SiteA")
    with pytest.raises(PropertyError, match="no route to site SiteC: add it to Connected Sites first"):
        connector_entry({"site": "SiteC"}, None, known, "SiteA")


def _table() -> RoutingTable:
    return RoutingTable(site="SiteB", site_domain="SiteB.microsoft.com", local_domains=("SiteB.microsoft.com",),
                        connected_sites=(ConnectedSite("SiteA", "@SiteA.microsoft.com"),
                                         ConnectedSite("SiteC", "@SiteC.microsoft.com")))


def test_replication_mail_from_an_unconfigured_peer_waits():
    table = _table()
    assert sending_site("dirsync@sitea.microsoft.com", table) == "SiteA"
    assert sending_site("user1@SiteA.microsoft.com", table) is None
    reply = unconfigured_peer_reply("dirsync@SiteA.microsoft.com", "SiteB", [], table)
    assert reply is not None and reply.startswith("450 4.3.2 ")
    assert "no Directory Replication Connector to SiteA" in reply and "KB Q196927" in reply
    assert unconfigured_peer_reply("dirsync@SiteA.microsoft.com", "SiteB", ["SiteA"], table) is None
    assert unconfigured_peer_reply("", "SiteB", [], table) is None  # an NDR
    assert unconfigured_peer_reply("dirsync@elsewhere.example", "SiteB", [], table) is None  # nobody we know


def test_check_now_makes_the_connector_sites_appear():
    own = SiteObject("SiteA", "ServerA", "ExchangeORG", "@SiteA.microsoft.com", "@SiteA.microsoft.com")
    connected = (ConnectedSite("SiteB", "@SiteB.microsoft.com"), ConnectedSite("SiteC", "@SiteC.microsoft.com"))
    r = kcc.plan("SiteA", [own], connected, (ReplicationConnector("SiteB"),))
    assert r.known_sites == ("SiteA", "SiteB") and r.awaiting == ("SiteB",)
    notes = {f.site: f.message for f in r.findings}
    assert "appears through its Directory Replication Connector" in notes["SiteB"]
    assert "add a Directory Replication Connector to it" in notes["SiteC"]
    assert r.as_dict()["awaiting_replication"] == ["SiteB"]


# ---------------------------------------------------------------------------- on running sites

import asyncio  # noqa: E402

import aiohttp  # noqa: E402
from sitekit import ORG_TOKEN, wait_for  # noqa: E402

from imsrelay.config.loader import load_config  # noqa: E402
from imsrelay.site import Site  # noqa: E402

AUTH = {"Authorization": f"Bearer {ORG_TOKEN}"}


async def _call(http, url, method, path, body=None):
    async with http.request(method, url + path, json=body, headers=AUTH) as r:
        return r.status, await r.json()


def _drop_connectors(path):
    """SiteB as a person left it: Connected Sites, but no Directory Replication Connectors."""
    text = path.read_text()
    edit = toml_edit.remove_entry(text, "replication.connectors", "site", "SiteA")
    edit = toml_edit.remove_entry(edit.text, "replication.connectors", "site", "SiteC")
    path.write_text("# SiteB's file, kept by hand\n" + edit.text)


async def test_backlog_builds_until_the_other_site_is_configured_then_drains(organisation):
    """KB Q196927's NOTE, on real sites: SiteA has a connector to SiteB, SiteB none back.
    SiteA's Request Now waits in SiteA's queue (backlog, deferral in tracking) until SiteB
    gets its connector through the property page's admin call and restarts."""
    org = organisation()
    _drop_connectors(org.paths["SiteB"])
    org.configs["SiteB"] = load_config(org.paths["SiteB"])
    await org.start("SiteA", "SiteB")
    a, b = org.url("SiteA"), org.url("SiteB")
    async with aiohttp.ClientSession() as http:
        await org.request_now("SiteA", "SiteB")
        backlog = await wait_for(lambda: _backlog(http, a, "SiteB"), timeout=20)
        assert backlog == 1
        site_a = org.sites["SiteA"]
        env = next(iter(site_a.qmgr.envelopes.values()))
        await wait_for(lambda: env.recipients[0].attempts >= 1, timeout=20)
        assert "no Directory Replication Connector to SiteA" in (env.recipients[0].diagnostic or "")
        status, track = await _call(http, a, "GET", f"/api/v1/tracking?queue_id={env.queue_id}")
        assert status == 200 and "deferred" in str(track)
        # not answered meanwhile: SiteA does not know User2 and has applied nothing
        assert await site_a.directory.run(site_a.directory.mailbox, "User2", "SiteB") is None

        # SiteB: New Directory Replication Connector (SiteA), as the console's dialog sends it
        status, body = await _call(http, b, "POST", "/config/replication-connectors",
                                   {"site": "SiteA", "server": "ServerA", "remote_on_network": False})
        assert status == 201, body
        assert body["restart_needed"] and "restart" in body["message"]
        text = org.paths["SiteB"].read_text()
        assert text.startswith("# SiteB's file, kept by hand\n")
        assert '[[replication.connectors]]\nsite = "SiteA"\nserver = "ServerA"\n' in text
        status, file = await _call(http, b, "GET", "/config/file")
        assert file["pending_restart"] is True and file["replication_connectors"] == [
            {"site": "SiteA", "server": "ServerA"}]

        # the IMS takes it when it starts again; SiteA's next retry goes through
        await org.stop("SiteB")
        org.configs["SiteB"] = load_config(org.paths["SiteB"])
        await org.start("SiteB")
        status, file = await _call(http, b, "GET", "/config/file")
        assert file["pending_restart"] is False
        site_a.qmgr.retry_now(None)
        await org.knows("SiteA", "User2", "SiteB")
        assert await wait_for(lambda: _backlog_zero(http, a, "SiteB"), timeout=20)


async def _backlog(http, url, peer):
    status, body = await _call(http, url, "GET", "/replication/status")
    return next((p["backlog"] for p in body["peers"] if p["site"] == peer and p["backlog"]), None)


async def _backlog_zero(http, url, peer):
    status, body = await _call(http, url, "GET", "/replication/status")
    return all(p["backlog"] == 0 for p in body["peers"] if p["site"] == peer)


async def test_property_pages_change_the_file_or_say_why(organisation):
    org = organisation()
    path = org.paths["SiteA"]
    # as a person (or the lab) writes it: [[table]] blocks, comments at the top and the end
    path.write_text("# SiteA, by hand\n" + toml_text.dumps(tomllib.loads(path.read_text())) + "# my last line\n")
    org.configs["SiteA"] = load_config(path)
    await org.start("SiteA")
    a = org.url("SiteA")
    async with aiohttp.ClientSession() as http:
        before = path.read_text()
        # bad input: the reason, and the file untouched
        for call, reason in (
                (("POST", "/config/connected-sites", {"name": "SiteD", "type": "SMTP", "routing_address": "@bad domain"}),
                 "connected_sites"),
                (("POST", "/config/connected-sites", {"name": "SiteB", "routing_address": "@x.example"}),
                 "already has a [[connected_sites]] entry"),
                (("POST", "/config/email-domains", {"domain": "SiteD.microsoft.com", "host": "10.0.0.1", "port": 0}),
                 "port must be a whole number from 1 to 65535"),
                (("POST", "/config/replication-connectors", {"site": "SiteZ"}), "no route to site SiteZ"),
                (("DELETE", "/config/email-domains/nowhere.example", None), "has no E-Mail Domain nowhere.example"),
                (("PUT", "/directory/mailboxes/User1", {"addresses": ["not an address"]}), "is not an SMTP address")):
            status, body = await _call(http, a, *call)
            assert status in (400, 404, 409) and reason in body["error"], (call, status, body)
            assert path.read_text() == before
        # Connected Sites: Properties (Routing Address tab), then Remove
        status, body = await _call(http, a, "PUT", "/config/connected-sites/SiteC",
                                   {"type": "SMTP", "routing_address": "@SiteC.example.org", "cost": 3})
        assert status == 200, body
        text = path.read_text()
        assert text.startswith("# SiteA, by hand\n") and text.rstrip().endswith("# my last line")
        assert load_config(path).connected_sites[1].routing_address == "@SiteC.example.org"
        status, body = await _call(http, a, "DELETE", "/config/email-domains/SiteC.microsoft.com")
        assert status == 200 and [d.domain for d in load_config(path).email_domains] == ["SiteB.microsoft.com"]
        # a mailbox's properties: display name and a secondary address
        status, body = await _call(http, a, "PUT", "/directory/mailboxes/User1",
                                   {"display_name": "User One (A)", "addresses": ["u1@SiteA.microsoft.com"]})
        assert status == 200, body
        assert body["display_name"] == "User One (A)"
        assert body["proxy_addresses"] == ["SMTP:User1@SiteA.microsoft.com", "smtp:u1@SiteA.microsoft.com"]
        status, file = await _call(http, a, "GET", "/config/file")
        assert file["pending_restart"] is True and "restart" in file["message"]
        # without the token nothing changes
        async with http.post(a + "/config/connected-sites", json={"name": "SiteD", "routing_address": "@d.example"}) as r:
            assert r.status == 401
    await asyncio.sleep(0)
    assert "SiteD" not in path.read_text()


async def test_check_now_at_a_running_site_shows_the_connector_sites(organisation):
    org = organisation()
    await org.start("SiteA")
    code, out, _ = await org.cli("kcc", "check-now", site="SiteA")
    assert code == 0
    assert ("Check Now at SiteA: 3 site(s) known (SiteA, SiteB (Site and Configuration only until replication "
            "completes), SiteC (Site and Configuration only until replication completes))") in out
    async with aiohttp.ClientSession() as http:
        status, body = await _call(http, org.url("SiteA"), "GET", "/kcc/known")
    assert body == {"site": "SiteA", "checked": True, "known_sites": ["SiteA", "SiteB", "SiteC"],
                    "awaiting_replication": ["SiteB", "SiteC"]}
    assert isinstance(org.sites["SiteA"], Site)


async def test_serve_restarts_the_ims_from_its_file_when_asked(tmp_path):
    """`imsrelay serve`'s site takes a changed file when its administrator restarts the
    IMS (POST /ims/restart, the console's button), and not before; a file that would
    not load is refused with the reason and the site keeps running."""
    from sitekit import free_port, site_mapping, write_site_file

    from imsrelay.commands.serve import run_site

    admin = free_port()
    mapping = site_mapping("SiteA", port=free_port(), admin={"port": admin, "token": ORG_TOKEN})
    path, cfg = write_site_file(tmp_path, mapping)
    path.write_text(toml_text.dumps(tomllib.loads(path.read_text())))
    stop = asyncio.Event()
    runner = asyncio.create_task(run_site(load_config(path), stop))
    url = f"http://127.0.0.1:{admin}"
    try:
        async with aiohttp.ClientSession() as http:
            async def up():
                try:
                    return (await _call(http, url, "GET", "/config"))[1]
                except aiohttp.ClientError:
                    return None
            assert (await wait_for(up, timeout=20))["connected_sites"] == []
            status, body = await _call(http, url, "POST", "/config/connected-sites",
                                       {"name": "SiteB", "type": "SMTP", "routing_address": "@SiteB.microsoft.com"})
            assert status == 201
            assert (await _call(http, url, "GET", "/config"))[1]["connected_sites"] == []  # not before a restart
            path.write_text(path.read_text() + "\n[smtp.bogus]\n")
            status, body = await _call(http, url, "POST", "/ims/restart")
            assert status == 400 and "would not load" in body["error"]
            path.write_text(path.read_text().replace("\n[smtp.bogus]\n", ""))
            status, body = await _call(http, url, "POST", "/ims/restart")
            assert status == 202 and body["restarting"] is True

            async def restarted():
                config = await up()
                return config is not None and config["connected_sites"] != []
            await wait_for(restarted, timeout=20)
            status, file = await _call(http, url, "GET", "/config/file")
            assert file["pending_restart"] is False
    finally:
        stop.set()
        await asyncio.wait_for(runner, 30)
