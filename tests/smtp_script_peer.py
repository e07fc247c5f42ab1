"""A scripted SMTP server over a real loopback socket, for tests of the outbound client.

    peer = ScriptPeer(rcpt=lambda a: "550 5.1.1 no" if a.startswith("bad") else "250 2.1.5 Ok")
    port = await peer.start()
    ...
    peer.sessions[0].commands   # [(chunk, replies written before it was read, b"MAIL FROM:<a@b> SIZE=9"), ...]
    peer.sessions[0].bodies     # what came after each 354, byte for byte, with its CRLF.CRLF

It answers like a real server (503 to RCPT without MAIL, 554 to DATA with no
recipient), and can be made to misbehave: ``withhold`` keeps the replies to MAIL and
RCPT until DATA has been read (a client that waits for each reply never gets one);
``split`` writes replies a few bytes at a time, with pauses, across lines;
``hang_up_at_data`` closes the connection instead of answering DATA (after the
withheld replies, or without them: ``answer_before_hang_up=False``);
``data_anyway`` answers DATA with 354 even when no recipient was accepted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class PeerSession:
    commands: list[tuple[int, int, bytes]] = field(default_factory=list)  # (chunk, replies written, line)
    bodies: list[bytes] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)  # every read, as it came

    def verbs(self) -> list[str]:
        return [line.split(b" ", 1)[0].split(b":", 1)[0].decode().upper() for _, _, line in self.commands]

    def lines(self, verb: str) -> list[bytes]:
        return [line for _, _, line in self.commands if line.upper().startswith(verb.encode())]


class ScriptPeer:
    def __init__(self, *, pipelining: bool = True, extensions: tuple[str, ...] = ("SIZE 10240000", "8BITMIME",
                                                                                   "SMTPUTF8"),
                 mail: str = "250 2.1.0 Ok", rcpt: Callable[[str], str] = lambda _: "250 2.1.5 Ok",
                 data: str = "354 End data with <CR><LF>.<CR><LF>", final: str = "250 2.0.0 Ok: queued",
                 withhold: bool = False, split: int = 0, hang_up_at_data: bool = False,
                 answer_before_hang_up: bool = True, data_anyway: bool = False) -> None:
        self.ehlo = ["peer.partner.test", *(["PIPELINING"] if pipelining else []), *extensions]
        self.mail, self.rcpt, self.data, self.final = mail, rcpt, data, final
        self.withhold, self.split, self.data_anyway = withhold, split, data_anyway
        self.hang_up_at_data, self.answer_before_hang_up = hang_up_at_data, answer_before_hang_up
        self.sessions: list[PeerSession] = []
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Session(self), host=host, port=port)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class _Session(asyncio.Protocol):
    def __init__(self, peer: ScriptPeer) -> None:
        self.peer = peer
        self.record = PeerSession()
        peer.sessions.append(self.record)
        self.buffer = b""
        self.in_data = False
        self.mail_ok = False
        self.accepted = 0
        self.held: list[list[str]] = []
        self.written = 0  # replies written to the socket so far
        self.out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.writer: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.writer = asyncio.ensure_future(self._write())
        self._send("220 peer.partner.test ESMTP scripted")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.writer is not None:
            self.writer.cancel()

    async def _write(self) -> None:
        assert self.transport is not None
        while True:
            item = await self.out.get()
            if item is None:
                self.transport.close()
                return
            if self.peer.split:
                for i in range(0, len(item), self.peer.split):
                    self.transport.write(item[i:i + self.peer.split])
                    await asyncio.sleep(0.005)
            else:
                self.transport.write(item)
            self.written += 1

    def _send(self, reply: str | list[str]) -> None:
        lines = [reply] if isinstance(reply, str) else reply
        text = "".join(f"{ln[:3]}{'-' if i < len(lines) - 1 else ' '}{ln[4:]}\r\n" for i, ln in enumerate(lines))
        self.out.put_nowait(text.encode())

    def _reply(self, reply: str | list[str]) -> None:
        """A reply to MAIL or RCPT: held back until DATA when withholding."""
        if self.peer.withhold:
            self.held.append([reply] if isinstance(reply, str) else reply)
        else:
            self._send(reply)

    def _release(self) -> None:
        for held in self.held:
            self._send(held)
        self.held.clear()

    def data_received(self, data: bytes) -> None:
        self.record.chunks.append(data)
        self.buffer += data
        while self._step():
            pass

    def _step(self) -> bool:
        if self.in_data:
            end = (b"\r\n" + self.buffer).find(b"\r\n.\r\n")
            if end < 0:
                return False
            self.record.bodies.append(self.buffer[:end + 3])
            self.buffer = self.buffer[end + 3:]
            self.in_data = False
            self._send(self.peer.final if self.accepted else "554 5.5.1 Error: no valid recipients")
            self.mail_ok, self.accepted = False, 0
            return True
        if b"\r\n" not in self.buffer:
            return False
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        self.record.commands.append((len(self.record.chunks), self.written, line))
        self._command(line)
        return True

    def _command(self, line: bytes) -> None:
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        if verb == b"EHLO":
            self._send([f"250 {e}" for e in self.peer.ehlo])
        elif verb == b"MAIL":
            self.mail_ok = self.peer.mail.startswith("250")
            self._reply(self.peer.mail)
        elif verb == b"RCPT":
            if not self.mail_ok:
                self._reply("503 5.5.1 Error: need MAIL command")
                return
            address = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
            reply = self.peer.rcpt(address)
            self.accepted += reply.startswith("25")
            self._reply(reply.split("\n"))
        elif verb == b"DATA":
            if self.peer.answer_before_hang_up or not self.peer.hang_up_at_data:
                self._release()
            if self.peer.hang_up_at_data:
                self.out.put_nowait(None)
            elif self.accepted and self.mail_ok or self.peer.data_anyway:
                reply = self.peer.data if self.accepted else "354 go ahead (anyway)"
                self.in_data = reply.startswith("354")
                self._send(reply)
            else:
                self._send("554 5.5.1 Error: no valid recipients" if self.mail_ok else "503 5.5.1 Error: need RCPT")
        elif verb == b"RSET":
            self.mail_ok, self.accepted = False, 0
            self._send("250 2.0.0 Ok")
        elif verb == b"QUIT":
            self._send("221 2.0.0 Bye")
            self.out.put_nowait(None)
        else:
            self._send("250 2.0.0 Ok")
