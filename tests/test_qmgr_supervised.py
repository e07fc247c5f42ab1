"""The queue manager is supervised: a failing stage is logged, counted, backed off and
retried, deliveries go on, and ``GET /ready`` reports it (docs/design.md invariant 8)."""

import shutil
import smtplib

import aiohttp
from sitekit import free_port, maildir_messages, make_config, running_site, site_mapping, wait_for

from imsrelay.queue.manager import QmgrHealth

TOKEN = "t0ken"


def test_health_backs_off_exponentially_and_clears_on_success():
    h = QmgrHealth()
    assert h.ok and h.failed("compaction", OSError(28, "No space"), 100.0) == 0.5
    assert not h.due("compaction", 100.2) and h.due("compaction", 100.6)
    assert h.failed("compaction", OSError(28, "No space"), 101.0) == 1.0
    for _ in range(20):
        delay = h.failed("compaction", OSError(28, "No space"), 102.0)
    assert delay == 30.0 and h.failures == 22 and "compaction failing" in h.reason()
    h.succeeded("compaction")
    assert h.ok and h.reason() == ""


async def _ready(port):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/ready") as r:  # no token needed
            return r.status, await r.json()


def _send(port, rcpt, n):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("x@example.org", [rcpt], b"Subject: s %d\r\n\r\nbody\r\n" % n)


async def test_a_broken_control_directory_never_stops_delivery(tmp_path):
    admin_port = free_port()
    cfg = make_config(tmp_path, site_mapping(admin={"port": admin_port, "token": TOKEN}))
    async with running_site(cfg) as site:
        assert (await _ready(admin_port))[0] == 200
        control = site.spool.control
        shutil.rmtree(control)
        control.write_text("not a directory")  # take_control_requests() now raises NotADirectoryError
        await wait_for(lambda: site.qmgr.health.failures > 0)
        status, body = await _ready(admin_port)
        assert status == 503 and any("operator requests" in r for r in body["reasons"]), body
        import asyncio
        for i in range(5):
            await asyncio.to_thread(_send, site.bound_port, "User1@SiteA.microsoft.com", i)
        await wait_for(lambda: len(maildir_messages(cfg.data_dir, "User1")) == 5)  # delivery went on
        assert site.qmgr.running
        control.unlink()
        control.mkdir()
        await wait_for(lambda: site.qmgr.health.ok, timeout=40)
        assert (await _ready(admin_port))[0] == 200
