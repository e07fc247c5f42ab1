"""How fast the web console's mail pages are on a big mailbox.

One site (loopback, a temporary directory) whose mailbox User1 holds N messages
(default 20,000; ``--messages 100000`` for the issue's figure), written as Maildir
files the way a delivery writes them; the site runs with ``[console] enabled``.
Through the console's own API (logged in like the page), it times: the first page
(the message API indexes the Maildir), the next pages, a page deep in the mailbox,
a header search, the organisation-wide view, opening one message.  Bounded: one
site, N files, a fixed number of requests.

    .venv/bin/python bench/console_pages.py [--messages N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imsrelay.commands.serve import run_site  # noqa: E402
from imsrelay.config.loader import config_from_mapping  # noqa: E402

TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_mailbox(maildir: Path, count: int) -> None:
    new = maildir / "new"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    now = time.time()
    for i in range(count):
        body = (f"Return-Path: <sender{i % 97}@example.net>\r\nDelivered-To: User1@SiteA.microsoft.com\r\n"
                f"From: Sender {i % 97} <sender{i % 97}@example.net>\r\nTo: User1@SiteA.microsoft.com\r\n"
                f"Subject: message {i}{' needle' if i % 1000 == 7 else ''}\r\n"
                f"Message-ID: <bench-{i}@example.net>\r\n\r\nbody {i}\r\n").encode()
        path = new / f"{1_700_000_000 + i}.M{i}P1.bench"
        path.write_bytes(body)
        t = now - (count - i)
        os.utime(path, (t, t))


async def timed(http: aiohttp.ClientSession, url: str) -> tuple[float, dict]:
    started = time.perf_counter()
    async with http.get(url) as r:
        body = await r.json()
        assert r.status == 200, (r.status, body)
    return time.perf_counter() - started, body


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        admin, console, smtp = free_port(), free_port(), free_port()
        mapping = {
            "site": {"organisation": "ExchangeORG", "name": "SiteA", "server": "ServerA",
                     "email_domain": "SiteA.microsoft.com", "company_domain": "microsoft.com"},
            "smtp": {"listen": "127.0.0.1", "port": smtp},
            "mailboxes": [{"alias": "User1", "display_name": "User One"}],
            "admin": {"port": admin, "token": TOKEN},
            "console": {"enabled": True, "port": console},
            "logging": {"level": "warning"},
        }
        config = config_from_mapping(mapping, root / "SiteA.toml", data_dir=root / "SiteA")
        started = time.perf_counter()
        fill_mailbox(root / "SiteA" / "mailboxes" / "User1", count)
        print(f"wrote {count} messages in {time.perf_counter() - started:.1f}s")
        stop = asyncio.Event()
        task = asyncio.create_task(run_site(config, stop))
        base = f"http://127.0.0.1:{console}"
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar, timeout=aiohttp.ClientTimeout(total=600)) as http:
            for _ in range(100):
                try:
                    async with http.post(base + "/login", json={"token": TOKEN}) as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            page = base + "/api/messages?site=SiteA&mailbox=User1&limit=50"
            first, body = await timed(http, page + "&start=0")
            assert body["total"] == count, body["total"]
            warm = [(await timed(http, page + f"&start={50 * i}"))[0] for i in range(1, 11)]
            deep, _ = await timed(http, page + f"&start={count - 50}")
            search, found = await timed(http, base + "/api/messages?site=SiteA&query=subject%3Aneedle&limit=50")
            org, _ = await timed(http, base + "/api/messages?limit=50")
            mid = body["messages"][0]["id"]
            one, _ = await timed(http, base + f"/api/site/SiteA/api/v1/messages/{mid}")
            print(f"first page (index built)  {first * 1000:8.0f} ms")
            print(f"next pages (median of 10) {statistics.median(warm) * 1000:8.0f} ms")
            print(f"last page                 {deep * 1000:8.0f} ms")
            print(f"search subject:needle     {search * 1000:8.0f} ms  ({found['total']} found)")
            print(f"organisation-wide page    {org * 1000:8.0f} ms")
            print(f"open one message          {one * 1000:8.0f} ms")
        stop.set()
        await asyncio.wait_for(task, 60)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    args = parser.parse_args()
    if not 1 <= args.messages <= 200_000:
        parser.error("--messages must be between 1 and 200000")
    asyncio.run(main(args.messages))
