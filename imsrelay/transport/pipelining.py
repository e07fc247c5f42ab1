"""aiosmtplib with command pipelining (RFC 2920) and a DATA body sent as given.

aiosmtplib 5 sends one command and waits for its reply; its protocol parses one reply
per ``data_received`` and drops what arrives while a parsed reply waits to be picked up
or between two reads.  That is right for one command at a time but would lose replies
to a pipelined group.  ``PipeliningProtocol`` keeps everything received while replies
of a group are due and hands them out in order; aiosmtplib's reply parsing
(``_read_response_from_buffer``), limits and timeouts are used unchanged.

``PipeliningSMTP`` adds to ``aiosmtplib.SMTP``:

- ``pipeline(lines, timeout)``: the command lines in one write, then their replies in
  order; what came before a timeout or a dropped connection is returned with the error.
- ``send_body(body, timeout)``: after a 354, the already dot-stuffed, terminated body
  in one write (no line-ending regex), and the reply to it.

Every reply is awaited on the protocol's own deadline instead of ``asyncio.wait_for``
(a new future, a timer and an extra loop hop per reply): each read sets the deadline
(now + its timeout) and one timer per connection checks it, re-arming itself when the
deadline moved on.  A read that outlives its deadline fails with aiosmtplib's
``SMTPReadTimeoutError``, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

import aiosmtplib
from aiosmtplib.errors import (
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPException,
    SMTPReadTimeoutError,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, MAX_RESPONSE_LENGTH, SMTPProtocol
from aiosmtplib.response import SMTPResponse

CLOSING = 421  # the server is closing the connection: no reply follows
EARLY = 0.001  # seconds a timer may fire before its time (the loop's clock resolution)


class PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol, which keeps every reply of a pipelined group."""

    _due = 0  # replies of the current group not yet handed out
    _deadline: float | None = None  # loop time by which the awaited reply must have come
    _timer: asyncio.TimerHandle | None = None
    _timer_at = 0.0  # when _timer fires

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def _await_until(self, timeout: float) -> None:
        """The awaited reply must come within ``timeout`` seconds from now."""
        deadline = self._loop.time() + timeout
        self._deadline = deadline
        if self._timer is not None and self._timer_at <= deadline:
            return  # it fires first and re-arms for the rest
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline, self._check_deadline)
        self._timer_at = deadline

    def _check_deadline(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return  # no read waits (the last one was answered in time)
        if deadline - self._loop.time() > EARLY:  # a later read moved it on
            self._timer = self._loop.call_at(deadline, self._check_deadline)
            self._timer_at = deadline
            return
        self._deadline = None
        waiter = self._response_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    async def _read_reply(self, timeout: float | None) -> SMTPResponse:
        """aiosmtplib's ``read_response`` with the deadline for its timeout."""
        waiter = self._response_waiter
        if waiter is None:
            raise SMTPServerDisconnected("Connection lost")
        self._response_pending = True  # (a read not preceded by a write: the greeting)
        try:
            if waiter.done() or timeout is None:
                result = await waiter
            elif timeout <= 0:
                raise TimeoutError
            else:
                self._await_until(timeout)
                try:
                    result = await waiter
                finally:
                    self._deadline = None
        except TimeoutError as exc:
            raise SMTPReadTimeoutError("Timed out waiting for server response") from exc
        finally:
            self._response_pending = False
            # If we were disconnected, don't create a new waiter
            self._response_waiter = None if self.transport is None else self._loop.create_future()
        return result

    def data_received(self, data: bytes) -> None:
        if not self._due:
            super().data_received(data)
            return
        if self._response_waiter is None:  # connection lost already
            return
        self._buffer.extend(data)
        self._hand_out()
        if len(self._buffer) > MAX_RESPONSE_LENGTH * self._due:  # far more than the replies due
            del self._buffer[:]
            self._due = 0
            if self.transport is not None:
                self.transport.close()  # the reads learn it from connection_lost

    def _hand_out(self) -> None:
        """Give the waiting read the first buffered reply, when there is a whole one."""
        waiter = self._response_waiter
        if waiter is None or waiter.done() or b"\n" not in self._buffer:
            return
        try:
            response = self._read_response_from_buffer()
        except Exception as exc:  # a malformed reply, as aiosmtplib reports it
            self._set_response_exception(waiter, exc)
        else:
            if response is not None:
                waiter.set_result(response)

    async def read_response(self, timeout: float | None = None) -> SMTPResponse:
        if not self._due:
            return await self._read_reply(timeout)
        self._due -= 1
        try:
            if self._response_waiter is None:  # closed, but replies sent before still count
                response = self._read_response_from_buffer() if self._buffer else None
                if response is None:
                    raise SMTPServerDisconnected("Connection lost")
                return response
            self._hand_out()
            return await self._read_reply(timeout)
        except BaseException:
            self._due = 0
            raise

    async def execute_pipelined(self, lines: Sequence[bytes], timeout: float | None,
                                first_timeout: float | None = None
                                ) -> tuple[list[SMTPResponse], SMTPException | OSError | None]:
        """``first_timeout``: for the first reply (default ``timeout``)."""
        for line in lines:
            if COMMAND_INJECTION_REGEX.search(line):
                raise ValueError("Command contains a prohibited control character")
        if self._command_lock is None:
            raise SMTPServerDisconnected("Server not connected")
        replies: list[SMTPResponse] = []
        async with self._command_lock:
            self._due = len(lines)
            try:
                self.write(b"".join(line + b"\r\n" for line in lines))
                for i in range(len(lines)):
                    reply = await self.read_response(timeout=first_timeout if i == 0 and first_timeout else timeout)
                    replies.append(reply)
                    if reply.code == CLOSING:
                        break
            except (SMTPException, OSError) as exc:
                return replies, exc
            finally:
                self._due = 0
        return replies, None

    async def execute_body(self, body: bytes | Sequence[bytes], timeout: float | None) -> SMTPResponse:
        if self._command_lock is None:
            raise SMTPServerDisconnected("Server not connected")
        async with self._command_lock:
            if isinstance(body, bytes):
                self.write(body)
            else:  # parts back to back in one system call (uvloop: one writev), never joined
                if self.transport is None or self.transport.is_closing():
                    raise SMTPServerDisconnected("Connection lost")
                cast(asyncio.WriteTransport, self.transport).writelines(body)
            return await self.read_response(timeout=timeout)


class PipeliningSMTP(aiosmtplib.SMTP):
    """``aiosmtplib.SMTP`` over a ``PipeliningProtocol``; TCP to a host and port only."""

    def _pipelining(self) -> PipeliningProtocol:
        if not isinstance(self.protocol, PipeliningProtocol):
            raise SMTPServerDisconnected("Server not connected")
        return self.protocol

    async def pipeline(self, lines: Sequence[bytes], timeout: float | None, first_timeout: float | None = None
                       ) -> tuple[list[SMTPResponse], SMTPException | OSError | None]:
        """Send the command lines (without CRLF) in one write and read their replies in
        order (``first_timeout``: the first reply's time-out, default ``timeout``).
        Returns the replies received and, when not all came, the error that ended the
        group (the connection is then closed).  A 421 reply ends the group too."""
        replies, error = await self._pipelining().execute_pipelined(lines, timeout, first_timeout)
        if error is not None or (replies and replies[-1].code == CLOSING):
            self.close()
        return replies, error

    async def send_body(self, body: bytes | Sequence[bytes], timeout: float | None) -> SMTPResponse:
        """After a 354: ``body`` (dot-stuffed, ending ``CRLF.CRLF``; or such bytes in
        parts, sent back to back) and the reply to it."""
        try:
            return await self._pipelining().execute_body(body, timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError):
            self.close()
            raise

    async def _create_connection(self, timeout: float | None) -> SMTPResponse:
        """aiosmtplib 5's connection set-up for a host and port in clear (all this site
        uses: TLS comes later by STARTTLS), with a ``PipeliningProtocol``."""
        if self.loop is None:
            raise RuntimeError("No event loop set")
        if self.sock is not None or self.socket_path is not None or self.use_tls:
            raise ValueError("PipeliningSMTP connects to a host and port, in clear")
        hostname = self.hostname or "localhost"
        port = self.port or self._get_default_port()
        protocol = PipeliningProtocol(loop=self.loop, connection_lost_callback=self._on_connection_lost)
        connect = self.loop.create_connection(lambda: protocol, host=hostname, port=port,
                                              local_addr=self.source_address)
        try:
            transport, _ = await asyncio.wait_for(connect, timeout=timeout)
        except TimeoutError as exc:
            raise SMTPConnectTimeoutError(f"Timed out connecting to {hostname} on port {port}") from exc
        except OSError as exc:
            raise SMTPConnectError(f"Error connecting to {hostname} on port {port}: {exc}") from exc
        self.protocol = protocol
        self.transport = transport
        try:
            response = await protocol.read_response(timeout=timeout)
        except SMTPServerDisconnected as exc:
            raise SMTPConnectError(f"Error connecting to {hostname} on port {port}: {exc}") from exc
        except SMTPTimeoutError as exc:
            raise SMTPConnectTimeoutError("Timed out waiting for server ready message") from exc
        if response.code != 220:
            raise SMTPConnectResponseError(response.code, response.message)
        return response
