"""One view of a site of several servers (issue 24 item 5): two real servers of SiteA on
loopback, each with its own queue, tracking log and Maildirs, configured with the same
``[[servers]]`` list.  The message API, search, tracking and the queue asked at either
server answer for the whole site, each item labelled with its server; ``?server=`` narrows
to one; ``?local=1`` is one server's own answer (no fan-out beyond one level); a server
that is down is reported as such in a 200 answer; the console (a real HTTP client)
shows the merged views."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from sitekit import (
    free_port,
    run_cli,
    send_mail,
    simple_message,
    site_mapping,
    wait_for,
    write_site_file,
)

from imsrelay.admin.federation import (
    ServerAnswer,
    SiteServers,
    UnknownServer,
    labelled,
    servers_report,
)
from imsrelay.admin.message_api import LabEndpoint
from imsrelay.console.backend import Organisation
from imsrelay.console.server import ConsoleServer
from imsrelay.model.settings import SiteServer
from imsrelay.site import Site
from imsrelay.transport.maildir import list_messages, mailbox_dir

TOKEN = "federation-test-token"
HOSTS = {"ServerA": "127.10.24.10", "Server1": "127.10.24.11"}


# ------------------------------------------------------------------ pure parts


def test_scope_local_server_and_whole_site():
    servers = SiteServers(own="ServerA", token="t", servers=(
        SiteServer("ServerA", "127.0.0.1", 25, "http://127.0.0.1:1"),
        SiteServer("Server1", "127.0.0.2", 25, "http://127.0.0.2:1")))
    whole = servers.scope({})
    assert whole.local and whole.peers == ("Server1",) and whole.labelled
    assert servers.scope({"local": "1"}).peers == ()  # what a server asks another: never forwarded again
    one = servers.scope({"server": "server1"})
    assert not one.local and one.peers == ("Server1",)
    assert servers.scope({"server": "SERVERA"}).local and servers.scope({"server": "SERVERA"}).peers == ()
    with pytest.raises(UnknownServer, match="no server 'Nope'.*ServerA, Server1"):
        servers.scope({"server": "Nope"})
    alone = SiteServers(own="ServerA", servers=(), token="t")
    assert alone.scope({}) == alone.scope({"local": "1"}) and not alone.scope({}).labelled
    assert labelled([{"id": 1}, {"id": 2, "server": "Server1"}], "ServerA") == [
        {"id": 1, "server": "ServerA"}, {"id": 2, "server": "Server1"}]
    report = servers_report("ServerA", {"Server1": ServerAnswer("Server1", 0, None, "Server1 does not answer")})
    assert report == {"ServerA": {"ok": True, "error": None},
                      "Server1": {"ok": False, "error": "Server1 does not answer"}}


# ------------------------------------------------------------------ two real servers of one site


def _configs(tmp_path):
    smtp = {n: free_port(h) for n, h in HOSTS.items()}
    admin = {n: free_port(h) for n, h in HOSTS.items()}
    dead = free_port(HOSTS["Server1"])  # nothing listens: mail for nowhere.test waits in Server1's queue
    servers = [{"name": n, "host": HOSTS[n], "port": smtp[n], "admin": f"http://{HOSTS[n]}:{admin[n]}"}
               for n in HOSTS]
    # every server's file lists the site's mailboxes, each with its home server (where its Maildir is)
    mailboxes = [{"alias": "User1", "display_name": "User One", "home_server": "ServerA"},
                 {"alias": "User5", "display_name": "User Five", "home_server": "Server1"}]
    configs = {}
    for name, host in HOSTS.items():
        mapping = site_mapping(
            "SiteA", listen=host, port=smtp[name], mailboxes=mailboxes,
            site={"server": name}, servers=servers,
            admin={"listen": host, "port": admin[name], "token": TOKEN},
            email_domains=[{"domain": "nowhere.test", "host": HOSTS["Server1"], "port": dead}],
            delivery={"retry_intervals": [60], "connect_timeout": 2},
            logging={"level": "warning", "format": "json"})
        (tmp_path / name).mkdir()
        _, configs[name] = write_site_file(tmp_path / name, mapping)
    return configs, smtp, admin


async def _get(http, url, path, **params):
    async with http.get(url + path, params=params) as r:
        return r.status, await r.json(content_type=None)


async def test_two_servers_one_view(tmp_path):
    configs, smtp, admin = _configs(tmp_path)
    url = {n: f"http://{HOSTS[n]}:{admin[n]}" for n in HOSTS}
    sites = {n: Site(configs[n]) for n in HOSTS}
    for s in sites.values():
        await s.start()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as http:
            await _two_servers(http, sites, configs, smtp, url)
    finally:
        for s in sites.values():
            await s.stop()


async def _two_servers(http, sites, configs, smtp, url):
    a, one = url["ServerA"], url["Server1"]
    message = simple_message("sender@example.net", "User1@SiteA.microsoft.com", "Federated figures")
    message = message.replace(b"Subject:", b"Message-ID: <fed-1@example.net>\r\nSubject:")
    await asyncio.to_thread(send_mail, HOSTS["ServerA"], smtp["ServerA"], "sender@example.net",
                            ["User1@SiteA.microsoft.com", "User5@SiteA.microsoft.com"], message)
    await asyncio.to_thread(send_mail, HOSTS["Server1"], smtp["Server1"], "sender@example.net",
                            ["someone@nowhere.test"], simple_message("sender@example.net", "someone@nowhere.test",
                                                                     "Waiting at Server1"))

    def delivered() -> bool:
        return (len(list_messages(mailbox_dir(configs["ServerA"].data_dir, "User1"))) == 1
                and len(list_messages(mailbox_dir(configs["Server1"].data_dir, "User5"))) == 1)
    await wait_for(delivered, timeout=20)

    # the message list and search at ServerA: both servers' mailboxes, labelled
    status, body = await _get(http, a, "/api/v1/messages")
    assert status == 200, body
    assert sorted((m["server"], m["mailbox"]) for m in body["messages"]) == [("Server1", "User5"),
                                                                             ("ServerA", "User1")]
    assert body["total"] == 2 and body["servers"] == {"ServerA": {"ok": True, "error": None},
                                                      "Server1": {"ok": True, "error": None}}
    status, body = await _get(http, one, "/api/v1/search", query="subject:federated")
    assert status == 200 and {m["server"] for m in body["messages"]} == {"ServerA", "Server1"}
    # one server's own answer, and one server named
    status, body = await _get(http, one, "/api/v1/messages", local="1")
    assert [(m["server"], m["mailbox"]) for m in body["messages"]] == [("Server1", "User5")]
    status, body = await _get(http, a, "/api/v1/messages", server="Server1")
    assert status == 200 and [m["mailbox"] for m in body["messages"]] == ["User5"]
    assert list(body["servers"]) == ["Server1"]
    status, body = await _get(http, a, "/api/v1/messages", server="Server9")
    assert status == 404 and "no server 'Server9'" in body["error"]
    status, body = await _get(http, a, "/api/v1/wait", query="mailbox:User5", timeout="5")
    assert status == 200 and [(m["server"], m["mailbox"]) for m in body["messages"]] == [("Server1", "User5")]
    status, body = await _get(http, a, "/api/v1/mailboxes")
    assert sorted((b["server"], b["mailbox"]) for b in body["mailboxes"]) == [("Server1", "User5"),
                                                                              ("ServerA", "User1")]

    # a message held by the other server, read through this one
    status, listing = await _get(http, a, "/api/v1/messages", query="mailbox:User5")
    remote_id = listing["messages"][0]["id"]
    status, detail = await _get(http, a, f"/api/v1/messages/{remote_id}")
    assert status == 200 and detail["server"] == "Server1" and detail["subject"] == "Federated figures"
    async with http.get(a + f"/api/v1/messages/{remote_id}/raw") as r:
        assert r.status == 200 and b"Federated figures" in await r.read()
        assert r.headers["Content-Type"].startswith("message/rfc822")
    async with http.patch(a + f"/api/v1/messages/{remote_id}", json={"read": True}) as r:
        assert r.status == 200 and (await r.json())["read"] is True
    status, body = await _get(http, a, "/api/v1/messages/SiteA:User5:nosuchmessage")
    assert status == 404

    # tracking: one message's trace across the two servers of the site
    status, body = await _get(http, a, "/api/v1/tracking", message_id="<fed-1@example.net>")
    assert status == 200, body
    [story] = body["messages"]
    assert [(h["site"], h.get("server")) for h in story["hops"]] == [("SiteA", "ServerA"), ("SiteA", "Server1")]
    ends = {r["recipient"].lower(): r for r in story["recipients"]}
    assert ends["user5@sitea.microsoft.com"]["state"] == "delivered" and ends["user5@sitea.microsoft.com"]["site"] == "SiteA/Server1"
    assert ends["user5@sitea.microsoft.com"]["path"] == ["SiteA/ServerA", "SiteA/Server1"]
    assert ends["user1@sitea.microsoft.com"]["path"] == ["SiteA/ServerA"]
    assert "SiteA/ServerA -> {SiteA/Server1 -> mailbox User5" in story["path"]
    code, out, err = await asyncio.to_thread(run_cli, "track", "--message-id", "<fed-1@example.net>",
                                             "--site", f"{a}={TOKEN}")
    assert code == 0, err
    assert "path: SiteA/ServerA -> {SiteA/Server1 -> mailbox User5" in out and "  SiteA/Server1 (queue id" in out
    # the same trace asked at the other server
    status, body = await _get(http, one, "/api/v1/tracking", message_id="<fed-1@example.net>")
    assert [h.get("server") for h in body["messages"][0]["hops"]] == ["ServerA", "Server1"]

    # queues: Server1's waiting message seen at ServerA
    await wait_for(lambda: any(r.attempts for e in sites["Server1"].qmgr.envelopes.values() for r in e.recipients),
                   timeout=15)
    status, body = await _get(http, a, "/queue")
    assert status == 200 and [(m["server"], m["recipients"][0]["address"]) for m in body["messages"]] == [
        ("Server1", "someone@nowhere.test")]
    status, body = await _get(http, a, "/api/v1/sites/SiteA/queue")
    assert [m["server"] for m in body["messages"]] == ["Server1"]
    status, body = await _get(http, a, "/queue", server="ServerA")
    assert body["messages"] == []
    queue_id = next(iter(sites["Server1"].qmgr.envelopes))
    code, out, err = await asyncio.to_thread(run_cli, "queue", "list", "--all-servers",
                                             "-c", str(configs["ServerA"].path))
    assert code == 0, err
    assert f"{queue_id} Server1" in out and "someone@nowhere.test" in out and "at 2 of 2 servers" in out
    code, out, _ = await asyncio.to_thread(run_cli, "queue", "list", "-c", str(configs["ServerA"].path))
    assert code == 0 and out.strip() == "Mail queue is empty"  # this server's own spool
    async with http.post(a + "/queue/retry", json={"queue_id": queue_id}) as r:
        assert r.status == 200 and (await r.json())["retried"] == 1

    # the console, through a real HTTP client, given ServerA's endpoint only
    await _console(a, queue_id)
    # a lab endpoint running both servers in one process: the same labels, no HTTP between them
    await _lab_endpoint(sites, remote_id)

    async with http.delete(a + f"/queue/{queue_id}") as r:
        assert r.status == 200 and (await r.json())["server"] == "Server1"
    assert queue_id not in sites["Server1"].qmgr.envelopes

    # Server1 stops: ServerA answers with what it has, and says who did not answer
    await sites.pop("Server1").stop()
    status, body = await _get(http, a, "/api/v1/messages")
    assert status == 200 and [m["mailbox"] for m in body["messages"]] == ["User1"]
    assert body["servers"]["ServerA"]["ok"] and not body["servers"]["Server1"]["ok"]
    assert "Server1 does not answer" in body["servers"]["Server1"]["error"]
    status, body = await _get(http, a, "/queue")
    assert status == 200 and body["messages"] == [] and not body["servers"]["Server1"]["ok"]
    code, out, _ = await asyncio.to_thread(run_cli, "queue", "list", "--all-servers",
                                           "-c", str(configs["ServerA"].path))
    assert code == 3 and "-- Server1: not answering (Server1 does not answer" in out
    status, body = await _get(http, a, "/api/v1/tracking", message_id="<fed-1@example.net>")
    assert status == 200 and [h.get("server") for h in body["messages"][0]["hops"]] == ["ServerA"]
    assert not body["servers"]["Server1"]["ok"]
    status, body = await _get(http, a, f"/api/v1/messages/{remote_id}")
    assert status == 404 and "not answering" in body["error"]


async def _lab_endpoint(sites, remote_id: str) -> None:
    lab = LabEndpoint(lambda: list(sites.values()), host="127.0.0.1", port=free_port(), token=TOKEN,
                      log=sites["ServerA"].log, lab_ready=lambda: None)
    await lab.start()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            status, body = await _get(http, lab.url, "/api/v1/messages")
            assert sorted((m["server"], m["mailbox"]) for m in body["messages"]) == [("Server1", "User5"),
                                                                                     ("ServerA", "User1")]
            assert "servers" not in body  # one process: nobody was asked over HTTP
            status, body = await _get(http, lab.url, f"/api/v1/messages/{remote_id}")
            assert status == 200 and body["server"] == "Server1"  # the second SiteA store holds it
            status, body = await _get(http, lab.url, "/api/v1/tracking", message_id="<fed-1@example.net>")
            assert [h.get("server") for h in body["messages"][0]["hops"]] == ["ServerA", "Server1"]
    finally:
        await lab.stop()


async def _console(admin_url: str, queue_id: str) -> None:
    org = Organisation([admin_url], TOKEN, timeout=20)
    console = ConsoleServer(org, TOKEN, listen="127.0.0.1", port=free_port())
    await console.start()  # starts the organisation's client too
    try:
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            base = console.url.rstrip("/")
            async with http.post(base + "/login", json={"token": TOKEN}) as r:
                assert r.status == 200
            async with http.get(base + "/api/messages") as r:
                body = await r.json()
                assert sorted(m["server"] for m in body["messages"]) == ["Server1", "ServerA"], body
            async with http.get(base + "/api/site/SiteA/queue") as r:
                assert [m["server"] for m in (await r.json())["messages"]] == ["Server1"]
            async with http.get(base + "/api/tracking", params={"q": "<fed-1@example.net>"}) as r:
                body = await r.json()
                [story] = body["messages"]
                assert [h.get("server") for h in story["hops"]] == ["ServerA", "Server1"], json.dumps(body)[:2000]
            async with http.get(base + "/static/console.js") as r:
                assert "m.server" in await r.text()  # the page shows each item's server
    finally:
        await console.stop()


async def test_a_site_of_one_server_answers_as_before(tmp_path):
    host = "127.10.24.12"
    admin_port, smtp_port = free_port(host), free_port(host)
    _, config = write_site_file(tmp_path, site_mapping(
        "SiteA", listen=host, port=smtp_port, admin={"listen": host, "port": admin_port, "token": TOKEN},
        logging={"level": "warning", "format": "json"}))
    site = Site(config)
    await site.start()
    try:
        await asyncio.to_thread(send_mail, host, smtp_port, "sender@example.net", ["User1@SiteA.microsoft.com"],
                                simple_message("sender@example.net", "User1@SiteA.microsoft.com", "One server"))
        await wait_for(lambda: list_messages(mailbox_dir(config.data_dir, "User1")), timeout=10)
        base = f"http://{host}:{admin_port}"
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            status, body = await _get(http, base, "/api/v1/messages")
            assert status == 200 and set(body) == {"total", "start", "count", "messages"}
            assert "server" not in body["messages"][0]
            status, body = await _get(http, base, "/queue")
            assert body == {"messages": []}
            status, body = await _get(http, base, "/api/v1/messages", server="ServerA")
            assert status == 200 and body["total"] == 1
            status, body = await _get(http, base, "/api/v1/messages", server="Server1")
            assert status == 404 and "no server 'Server1'" in body["error"]
            status, body = await _get(http, base, "/api/v1/tracking", recipient="User1@SiteA.microsoft.com")
            assert set(body) == {"events", "messages"} and "server" not in body["messages"][0]["hops"][0]
    finally:
        await site.stop()
