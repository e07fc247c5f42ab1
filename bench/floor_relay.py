#!/usr/bin/env python3
"""The floor: what relaying costs on this machine with Python and nothing else.

A minimal store-and-forward relay in one asyncio.Protocol (uvloop): it parses SMTP
commands in ``data_received`` with no per-command task, appends each message to one
journal file that a thread fdatasyncs for all waiting sessions at once (``250`` only
after the flush, as imsrelay does), and relays over persistent pipelined connections
to ``smtp-sink``.  No policy, no routing table, no tracking, no metrics, no limits —
it is a measuring stick, not a mail server: the difference between its CPU per
message and imsrelay's is what imsrelay's layers cost, not what Python or the kernel
costs.

    python bench/floor_relay.py [--messages 6000] [--size 4096] [--sessions 20]

Runs ``smtp-sink``, this relay and ``smtp-source`` on loopback, bounded in count and
time; prints messages/s (accepted and end to end) and the relay's CPU ms per message.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py: smtp-sink, smtp-source, CPU of a process tree)

EHLO_REPLY = b"250-floor\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
RELAY_CONNECTIONS = 10


class GroupCommit:
    """One journal file; a thread writes and fdatasyncs every waiting message at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: Path) -> None:
        self.loop = loop
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        self.pending: list[tuple[bytes, Callable[[], None]]] = []
        self.cv = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, data: bytes, done: Callable[[], None]) -> None:
        with self.cv:
            self.pending.append((data, done))
            self.cv.notify()

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.pending:
                    self.cv.wait()
                batch, self.pending = self.pending, []
            os.writev(self.fd, [data for data, _ in batch])
            os.fdatasync(self.fd)
            self.loop.call_soon_threadsafe(lambda b=batch: [done() for _, done in b])


class Relay:
    def __init__(self, commit: GroupCommit, sink_port: int) -> None:
        self.commit = commit
        self.sink_port = sink_port
        self.outgoing: collections.deque[tuple[bytes, list[bytes], bytes]] = collections.deque()
        self.ready = asyncio.Event()

    async def forward(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.sink_port)

        async def reply() -> bytes:
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionError("the sink closed the connection")
                if line[3:4] != b"-":
                    return line

        await reply()
        writer.write(b"EHLO floor\r\n")
        await reply()
        while True:
            while not self.outgoing:
                self.ready.clear()
                await self.ready.wait()
            sender, rcpts, body = self.outgoing.popleft()
            writer.write(b"MAIL FROM:<%s>\r\n" % sender + b"".join(b"RCPT TO:<%s>\r\n" % r for r in rcpts)
                         + b"DATA\r\n")
            for _ in range(2 + len(rcpts)):
                await reply()
            writer.write(body.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            await reply()


class Session(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.buf = b""
        self.in_data = False
        self.sender = b""
        self.rcpts: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport  # uvloop's TCPTransport (not an asyncio.Transport subclass)
        transport.write(b"220 floor ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    return
                body = self.buf[:end + 2].replace(b"\r\n..", b"\r\n.")
                self.buf = self.buf[end + 5:]
                self.in_data = False
                message = (self.sender, self.rcpts, body)
                self.rcpts = []
                self.relay.commit.submit(b"%s\n%s\n%s" % (message[0], b",".join(message[1]), body),
                                         lambda m=message: self._queued(m))
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            line, self.buf = self.buf[:end], self.buf[end + 2:]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.t.write(EHLO_REPLY if verb == b"EHLO" else b"250 floor\r\n")
            elif verb == b"MAIL":
                self.sender = line[10:].strip(b"<> ")
                self.t.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                self.rcpts.append(line[8:].strip(b"<> "))
                self.t.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                self.in_data = True
                self.t.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                self.t.write(b"221 2.0.0 Bye\r\n")
                self.t.close()
                return
            else:
                self.t.write(b"250 2.0.0 Ok\r\n" if verb in (b"RSET", b"NOOP") else b"502 5.5.2 Error\r\n")

    def _queued(self, message: tuple[bytes, list[bytes], bytes]) -> None:
        if not self.t.is_closing():
            self.t.write(b"250 2.0.0 Ok: queued\r\n")
        self.relay.outgoing.append(message)
        self.relay.ready.set()


async def serve(port: int, sink_port: int, journal: Path, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay(GroupCommit(loop, journal), sink_port)
    server = await loop.create_server(lambda: Session(relay), "127.0.0.1", port, backlog=1024)
    forwarders = [asyncio.ensure_future(relay.forward()) for _ in range(RELAY_CONNECTIONS)]
    await asyncio.sleep(seconds)  # bounded: the measuring run stops it long before
    server.close()
    for f in forwarders:
        f.cancel()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=6000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--serve", nargs=3, metavar=("PORT", "SINK_PORT", "JOURNAL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        import uvloop
        uvloop.install()
        asyncio.run(serve(int(a.serve[0]), int(a.serve[1]), Path(a.serve[2]), seconds=600.0))
        return 0
    tools = bench.ensure_tools()
    procs = bench.Processes()
    root = Path(tempfile.mkdtemp(prefix="floor-relay-"))
    try:
        sink = bench.Sink(procs, tools, bench.free_port(), root)
        port = bench.free_port()
        relay = procs.start("floor-relay", [sys.executable, __file__, "--serve", str(port), str(sink.port),
                                            str(root / "journal")], stdout=subprocess.DEVNULL)
        bench.wait_port("127.0.0.1", port, 20, relay)
        bench.run_source(tools, port, messages=300, sessions=a.sessions, size=a.size, timeout=60)  # warm-up
        sink.wait_count(300, time.monotonic() + 60)
        cpu0, t0 = bench.tree_cpu_seconds(relay.pid), time.monotonic()
        src = bench.run_source(tools, port, messages=a.messages, sessions=a.sessions, size=a.size,
                               timeout=max(120.0, a.messages / 20))
        done = sink.wait_count(300 + a.messages, time.monotonic() + 120)
        t1 = time.monotonic()
        cpu = bench.tree_cpu_seconds(relay.pid) - cpu0
        if src.returncode != 0 or done is None:
            print(f"floor relay: smtp-source rc {src.returncode}, sink has {sink.count - 300}/{a.messages}: "
                  f"{src.output[-300:]}", file=sys.stderr)
            return 1
        print(f"floor relay, {a.messages} x {a.size} B, {a.sessions} sessions: "
              f"{a.messages / src.seconds:,.0f} msg/s accepted, {a.messages / (t1 - t0):,.0f} msg/s end to end, "
              f"CPU {cpu * 1000 / a.messages:.3f} ms/msg")
        return 0
    finally:
        procs.stop_all()
        subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    sys.exit(main())
