"""A raw SMTP client over a real socket, for tests that send what smtplib refuses to
(invalid UTF-8, bare LF, broken syntax) and read every reply as bytes."""

from __future__ import annotations

import re
import socket

_FINAL = re.compile(rb"^\d{3} ", re.MULTILINE)


class Wire:
    def __init__(self, port: int, host: str = "127.0.0.1", *, source: str | None = None,
                 timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buffer = b""

    def reply(self) -> bytes:
        """One whole reply (all its lines)."""
        while True:
            lines = self.buffer.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if re.match(rb"^\d{3} ", line) or (len(line) == 3 and line.isdigit()):
                    out = b"\r\n".join(lines[:i + 1]) + b"\r\n"
                    self.buffer = self.buffer[len(out):]
                    return out
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:  # the server closed with our data unread
                chunk = b""
            if not chunk:
                out, self.buffer = self.buffer, b""
                return out
            self.buffer += chunk

    def send(self, data: bytes) -> None:
        """Write without waiting for a reply; a server that has closed is fine."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def cmd(self, line: bytes, end: bytes = b"\r\n") -> bytes:
        try:
            self.sock.sendall(line + end)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed: whatever it answered before is still to be read
        return self.reply()

    def closed(self) -> bool:
        """True once the server has closed the connection (after anything pending)."""
        self.sock.settimeout(5)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def code(reply: bytes) -> int:
    return int(reply[:3])
