#!/usr/bin/env python3
"""What aiosmtpd alone costs per message on this machine: its SMTP server (on uvloop,
as imsrelay runs it) with a handler that answers DATA ``250`` at once — no journal,
no flush, no relay, no policy.  A lower bound for any site built on aiosmtpd, to set
beside ``bench/floor_relay.py`` (the whole relay path without aiosmtpd).

    python bench/aiosmtpd_floor.py [--messages 10000] [--size 4096] [--sessions 20]

Runs this server and ``smtp-source`` on loopback, bounded in count and time; prints
messages/s and the server's CPU ms per message (user + system, /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py: smtp-source, CPU of a process tree)


class Accept:
    """aiosmtpd handler: every message is taken and dropped."""

    def __init__(self) -> None:
        self.count = 0

    def connect_refusal(self, peer_ip: str | None, listener: str) -> str | None:
        return None  # (asked by imsrelay's protocol at connect: everyone is welcome)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        return "250 2.0.0 Ok: dropped"


async def serve(port: int, seconds: float, paths: str) -> None:
    from aiosmtpd.smtp import SMTP

    class FastPaths(SMTP):
        """aiosmtpd's SMTP with imsrelay's path parser (a regular expression for
        ``<local@domain>``; aiosmtpd's own runs the email package's parser)."""

        def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
            from imsrelay.ingress.adapter import parse_path
            return parse_path(arg)

    loop = asyncio.get_running_loop()
    handler = Accept()
    if paths == "protocol":  # imsrelay's own protocol (DATA read in chunks, enhanced codes, timers)
        from imsrelay.ingress.adapter import ImsSMTP

        def factory() -> SMTP:
            return ImsSMTP(handler, session_timeout=600.0, max_errors=20, hostname="aiosmtpd-floor")
    else:
        cls = FastPaths if paths == "imsrelay" else SMTP

        def factory() -> SMTP:
            return cls(handler, hostname="aiosmtpd-floor")
    server = await loop.create_server(factory, "127.0.0.1", port, backlog=1024)
    await asyncio.sleep(seconds)  # bounded: the measuring run stops it long before
    server.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--paths", choices=("aiosmtpd", "imsrelay", "protocol"), default="imsrelay",
                    help="aiosmtpd's SMTP with its own MAIL/RCPT path parser, with imsrelay's (default), "
                         "or imsrelay's whole protocol class (ImsSMTP: DATA read in chunks, enhanced "
                         "status codes, session timers) with the same dropping handler")
    ap.add_argument("--serve", metavar="PORT", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        import uvloop
        uvloop.install()
        asyncio.run(serve(a.serve, seconds=600.0, paths=a.paths))
        return 0
    tools = bench.ensure_tools()
    procs = bench.Processes()
    try:
        port = bench.free_port()
        server = procs.start("aiosmtpd-floor", [sys.executable, __file__, "--serve", str(port), "--paths", a.paths],
                             stdout=subprocess.DEVNULL)
        bench.wait_port("127.0.0.1", port, 20, server)
        bench.run_source(tools, port, messages=300, sessions=a.sessions, size=a.size, timeout=60)  # warm-up
        cpu0 = bench.tree_cpu_seconds(server.pid)
        src = bench.run_source(tools, port, messages=a.messages, sessions=a.sessions, size=a.size,
                               timeout=max(120.0, a.messages / 20))
        cpu = bench.tree_cpu_seconds(server.pid) - cpu0
        if src.returncode != 0:
            print(f"aiosmtpd floor: smtp-source rc {src.returncode}: {src.output[-300:]}", file=sys.stderr)
            return 1
        label = {"aiosmtpd": "SMTP, aiosmtpd's path parser", "imsrelay": "SMTP, imsrelay's path parser",
                 "protocol": "imsrelay's ImsSMTP"}[a.paths]
        print(f"aiosmtpd alone ({label}; no journal, no relay), {a.messages} x {a.size} B, "
              f"{a.sessions} sessions: "
              f"{a.messages / src.seconds:,.0f} msg/s, CPU {cpu * 1000 / a.messages:.3f} ms/msg")
        return 0
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
