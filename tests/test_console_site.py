"""`imsrelay serve` with `[console] enabled`: one site's console over real HTTP
(aiohttp client): log-in, cookie, CSRF, the allow-list, the site's views and the
live feed (server-sent events) telling of new mail and queue changes."""

from __future__ import annotations

import asyncio
import json
import smtplib

import aiohttp
import pytest
from sitekit import free_port, make_config, site_mapping, wait_http_ok

from imsrelay.commands.serve import run_site

TOKEN = "console-test-token"


@pytest.fixture
async def console(tmp_path):
    admin_port, console_port, smtp_port = free_port(), free_port(), free_port()
    config = make_config(tmp_path, site_mapping(
        "SiteA", port=smtp_port, admin={"port": admin_port, "token": TOKEN},
        console={"enabled": True, "listen": "127.0.0.1", "port": console_port}))
    stop = asyncio.Event()
    task = asyncio.create_task(run_site(config, stop))
    base = f"http://127.0.0.1:{console_port}"
    await wait_http_ok(base + "/")
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for a bare IP address
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        yield base, http, smtp_port
    stop.set()
    await asyncio.wait_for(task, 30)


async def test_serve_console_login_csrf_and_views(console):
    base, http, _ = console
    async with http.get(base + "/") as r:
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Frame-Options"] == "DENY"
        page = await r.text()
        assert "<script src=\"/static/console.js\" defer></script>" in page and "<script>" not in page
    async with http.get(base + "/static/console.js") as r:
        script = await r.text()
        assert r.status == 200
        for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval(", "srcdoc"):
            assert sink not in script, sink  # data reaches the page only as text
    async with http.get(base + "/api/organisation") as r:
        assert r.status == 401
    async with http.post(base + "/login", json={"token": "nope"}) as r:
        assert r.status == 401
    async with http.post(base + "/login", json={"token": TOKEN}, headers={"Origin": "http://evil.example"}) as r:
        assert r.status == 403
    async with http.post(base + "/login", json={"token": TOKEN}) as r:
        assert r.status == 200
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        csrf = (await r.json())["csrf"]
    async with http.get(base + "/api/organisation") as r:
        org = await r.json()
        assert [s["site"] for s in org["sites"]] == ["SiteA"]
        assert org["sites"][0]["config"]["server"] == "ServerA"
    async with http.post(base + "/api/site/SiteA/queue/retry", json={}) as r:
        assert r.status == 403
    async with http.post(base + "/api/site/SiteA/queue/retry", json={}, headers={"X-CSRF-Token": csrf}) as r:
        assert r.status == 200 and (await r.json()) == {"retried": 0}
    async with http.delete(base + "/api/site/SiteA/queue/NOSUCHID", headers={"X-CSRF-Token": csrf}) as r:
        assert r.status == 404 and "no message NOSUCHID" in (await r.json())["error"]
    async with http.post(base + "/api/site/SiteA/directory/mailboxes/User1/password", json={"password": "x"},
                         headers={"X-CSRF-Token": csrf}) as r:
        assert r.status == 404  # not on the console's allow-list
    async with http.put(base + "/api/site/SiteA/transfer-mode", json={"mode": "none"},
                        headers={"X-CSRF-Token": csrf}) as r:
        assert r.status == 404
    async with http.get(base + "/api/site/SiteZ/status") as r:
        assert r.status == 502 and "no site 'SiteZ'" in (await r.json())["error"]
    async with http.get(base + "/api/stage") as r:
        assert r.status == 404  # no lab stage for `serve`
    async with http.get(base + "/api/messages?limit=abc") as r:
        assert r.status == 400
    async with http.post(base + "/logout", headers={"X-CSRF-Token": csrf}) as r:
        assert r.status == 200
    async with http.get(base + "/api/organisation") as r:
        assert r.status == 401


async def test_live_feed_tells_of_new_mail(console):
    base, http, smtp_port = console
    async with http.post(base + "/login", json={"token": TOKEN}) as r:
        assert r.status == 200
    async with http.get(base + "/api/events", timeout=aiohttp.ClientTimeout(total=60)) as events:
        assert events.headers["Content-Type"].startswith("text/event-stream")
        await asyncio.sleep(1.5)  # the feed takes its first picture

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as s:
                s.sendmail("alice@example.net", ["User1@SiteA.microsoft.com"],
                           b"Subject: live\r\nMessage-ID: <live-feed@test>\r\n\r\nhello\r\n")
        await asyncio.to_thread(send)
        topics: set[str] = set()
        deadline = asyncio.get_running_loop().time() + 30
        while "mail:SiteA" not in topics and asyncio.get_running_loop().time() < deadline:
            line = await asyncio.wait_for(events.content.readline(), 30)
            if line.startswith(b"data: "):
                topics |= set(json.loads(line[6:])["topics"])
        assert "mail:SiteA" in topics
    async with http.get(base + "/api/messages?site=SiteA") as r:
        body = await r.json()
        assert body["total"] == 1 and body["messages"][0]["subject"] == "live"
    mid = body["messages"][0]["id"]
    async with http.get(base + f"/api/site/SiteA/message-html/{mid}") as r:
        assert "sandbox" in r.headers["Content-Security-Policy"]
        assert "has no HTML part" in await r.text()
    async with http.get(base + "/api/tracking?q=<live-feed@test>") as r:
        story = (await r.json())["messages"][0]
        assert story["chain"] == ["SiteA"] and story["recipients"][0]["state"] == "delivered"


async def test_imsrelay_console_command_serves_running_sites(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from sitekit import running_site

    admin_port, console_port = free_port(), free_port()
    config = make_config(tmp_path, site_mapping("SiteB", admin={"port": admin_port, "token": TOKEN}))
    exe = [sys.executable, "-m", "imsrelay", "console"]
    # user errors: one line, non-zero exit
    for args, env, needle in (
            ([], {}, "the following arguments are required: --site"),
            (["--site", f"http://127.0.0.1:{admin_port}"], {"IMSRELAY_ADMIN_TOKEN": ""}, "no admin token"),
            (["--site", "127.0.0.1:8025"], {"IMSRELAY_ADMIN_TOKEN": TOKEN}, "give the admin endpoint as a URL")):
        done = await asyncio.to_thread(subprocess.run, exe + args, capture_output=True, text=True, timeout=60,
                                       env={**os.environ, **env})
        assert done.returncode != 0 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    async with running_site(config):
        proc = subprocess.Popen(exe + ["--site", f"http://127.0.0.1:{admin_port}", "--port", str(console_port),
                                       "--log-level", "warning"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "IMSRELAY_ADMIN_TOKEN": TOKEN})
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
            assert line.startswith(f"console  http://127.0.0.1:{console_port}/  sites SiteB"), line
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar) as http:
                base = f"http://127.0.0.1:{console_port}"
                async with http.post(base + "/login", json={"token": TOKEN}) as r:
                    assert r.status == 200 and (await r.json())["sites"] == ["SiteB"]
                async with http.get(base + "/api/recipients") as r:
                    rows = (await r.json())["recipients"]
                    assert {row["alias"] for row in rows} == {"User2", "Administrator"}
                    assert all(row["known_at"] == ["SiteB"] for row in rows)
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 30)
