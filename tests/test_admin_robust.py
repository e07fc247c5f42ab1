"""The admin endpoint answers bad JSON bodies with 400 and one clear message, never a
500 with a traceback; /ready and /health need no token."""

import aiohttp
import structlog
from sitekit import free_port, make_config, running_site, site_mapping

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


async def test_hostile_json_bodies_get_400(tmp_path):
    port = free_port()
    cfg = make_config(tmp_path, site_mapping(admin={"port": port, "token": TOKEN}))
    bodies = [
        ("/directory/mailboxes", b"[" * 200_000 + b"]" * 200_000),
        ("/directory/mailboxes", b"[" * 20_000 + b"]" * 20_000),
        ("/directory/mailboxes", b'{"alias": ' + b"9" * 5000 + b"}"),
        ("/directory/mailboxes", b'{"alias": "\xff\xfe"'),
        ("/directory/mailboxes", b"not json"),
        ("/site-addressing", b'{"address": "@bad domain!", "update_mailboxes": true}'),
        ("/site-addressing", b'{"address": "@' + b"a" * 300 + b'.com"}'),
        ("/replication/request-now", b'{"site": ' + b"{" * 5000 + b"}"),
    ]
    async with running_site(cfg):
        with structlog.testing.capture_logs() as logs:
            async with aiohttp.ClientSession() as http:
                for path, body in bodies:
                    async with http.post(f"http://127.0.0.1:{port}{path}", data=body, headers=AUTH) as r:
                        answer = await r.json()
                        assert r.status in (400, 413), (path, body[:40], r.status, answer)  # 413: too large
                        assert "\n" not in answer["error"] and "Traceback" not in answer["error"]
                async with http.get(f"http://127.0.0.1:{port}/health") as r:
                    assert r.status == 200
        assert [e for e in logs if e.get("event") == "admin.internal_error"] == []


async def test_a_long_poll_does_not_hold_the_sites_stop(tmp_path):
    """A client waiting in ``GET /api/v1/wait`` (the fixture waits on every site at once)
    must not keep a stopping site waiting for it: `docker stop` kills a site that takes
    more than 10 s."""
    import asyncio
    import time

    from imsrelay.admin.message_api import SHUTDOWN_TIMEOUT
    from imsrelay.site import Site

    port = free_port()
    cfg = make_config(tmp_path, site_mapping(admin={"port": port, "token": TOKEN}))
    site = Site(cfg)
    await site.start()
    async with aiohttp.ClientSession() as http:
        poll = asyncio.ensure_future(http.get(f"http://127.0.0.1:{port}/api/v1/wait?timeout=60&q=to:nobody@x.y",
                                              headers=AUTH))
        await asyncio.sleep(0.5)  # the request is under way at the site
        started = time.monotonic()
        await site.stop()
        took = time.monotonic() - started
        poll.cancel()
        await asyncio.gather(poll, return_exceptions=True)
    assert took < SHUTDOWN_TIMEOUT + 3, took
