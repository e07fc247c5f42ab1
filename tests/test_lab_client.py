"""``LabClient`` attached to several endpoints (the Docker lab's sites): a delivery is
seen as soon as it happens (every endpoint long-polled at once, no poll interval)."""

from __future__ import annotations

import asyncio
import time

import pytest
from ims_kit import TOKEN, message, submit
from sitekit import free_port, running_site, site_mapping, write_site_file

from imsrelay.testing import LabClient, LabError


def _site(tmp_path, name: str, host: str):
    mapping = site_mapping(name, listen=host, port=free_port(host),
                           admin={"listen": host, "port": free_port(host), "token": TOKEN})
    return write_site_file(tmp_path, mapping)[1]


async def test_wait_for_over_several_endpoints_sees_a_delivery_at_once(tmp_path):
    a_cfg, b_cfg = _site(tmp_path, "SiteA", "127.0.0.41"), _site(tmp_path, "SiteB", "127.0.0.42")
    async with running_site(a_cfg) as a, running_site(b_cfg):
        client = LabClient([f"http://{c.admin.listen}:{c.admin.port}" for c in (a_cfg, b_cfg)], TOKEN)
        waiting = asyncio.create_task(asyncio.to_thread(client.wait_for, "subject:prompt", 20.0))
        await asyncio.sleep(1.2)  # both long-polls are open (the old client asked SiteB now, for 1 s)
        sent = time.monotonic()
        await submit(a, ["User1@SiteA.microsoft.com"], message("prompt"))
        found = await waiting
        seen = time.monotonic() - sent
        assert found["site"] == "SiteA" and found["mailbox"] == "User1"
        assert seen < 0.6, seen  # the old client polled each endpoint for 1 s in turn: ~0.8 s here
        with pytest.raises(TimeoutError, match="no message matching"):
            await asyncio.to_thread(client.wait_for, "subject:never-sent", 0.5)


def test_sending_via_an_internet_the_lab_does_not_serve_says_how():
    client = LabClient("http://127.0.0.1:9")  # nothing listens; the error comes first from the name
    client._sites = []
    client._site_endpoint = {}
    client.sites = lambda: []  # type: ignore[method-assign]
    with pytest.raises(LabError, match="--imsrelay-smtp Internet=127.0.0.1:2600"):
        client.smtp_address("Internet")
