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

Both go through ``PipeliningProtocol.exchange`` (the lean path): one write, then the
replies are parsed in ``data_received`` as they arrive and the caller is woken once,
when the last one is in (or the group ended: a 421, an error, a lost connection, a
time-out) — no per-reply read coroutine, future or lock.  ``execute_pipelined`` and
``execute_body`` (one awaited read per reply, aiosmtplib's way) are the plain path it
is tested against (tests/test_lean_exchange.py): the same bytes written, the same
replies, the same errors.

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
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_LINE_LENGTH,
    MAX_RESPONSE_LENGTH,
    SMTPProtocol,
)
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import SMTPStatus

CLOSING = 421  # the server is closing the connection: no reply follows
EARLY = 0.001  # seconds a timer may fire before its time (the loop's clock resolution)


Replies = tuple[list[SMTPResponse], SMTPException | OSError | None]


def _command_lines(lines: Sequence[bytes]) -> bytes:
    """A pipelined group's command lines, CRLF-terminated, as one write; ValueError
    (aiosmtplib's) for a line with a control character that could inject a command."""
    for line in lines:
        if COMMAND_INJECTION_REGEX.search(line):
            raise ValueError("Command contains a prohibited control character")
    return b"".join([line + b"\r\n" for line in lines])


class _Exchange:
    """A lean exchange under way: the replies wanted, those in, and the caller's future."""

    __slots__ = ("done", "error", "replies", "single", "timeout", "wanted")

    def __init__(self, done: asyncio.Future[None], wanted: int, timeout: float | None, single: bool) -> None:
        self.done = done
        self.wanted = wanted  # replies still due
        self.timeout = timeout  # for each reply after the first
        self.single = single  # one reply read as aiosmtplib's read_response reads it (after a body)
        self.replies: list[SMTPResponse] = []
        self.error: SMTPException | OSError | None = None


class PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol, which keeps every reply of a pipelined group."""

    _exchange: _Exchange | None = None  # a lean exchange under way (``exchange``)
    _due = 0  # replies of the current group not yet handed out
    _deadline: float | None = None  # loop time by which the awaited reply must have come
    _timer: asyncio.TimerHandle | None = None
    _timer_at = 0.0  # when _timer fires

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._exchange is not None:
            lost = SMTPServerDisconnected("Connection lost")
            if exc:
                lost.__cause__ = exc
            self._finish(lost)
        super().connection_lost(exc)

    def eof_received(self) -> bool:
        if self._exchange is not None:
            self._finish(SMTPServerDisconnected("Unexpected EOF received"))
        return super().eof_received()

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
        if self._exchange is not None:
            timeout = SMTPReadTimeoutError("Timed out waiting for server response")
            timeout.__cause__ = TimeoutError()
            self._finish(timeout)
            return
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
        if self._exchange is not None:
            self._buffer.extend(data)
            self._take_replies(self._exchange, data)
            return
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

    # ------------------------------------------------------------ the lean path

    def exchange_started(self, data: bytes | Sequence[bytes], wanted: int, timeout: float | None,
                         first_timeout: float | None = None, *, single: bool = False) -> _Exchange:
        """Write ``data`` (bytes, or parts written back to back: one writev) and start
        collecting ``wanted`` replies; ``exchange`` awaits them.  ``first_timeout``:
        for the first reply (default ``timeout``); ``single``: one reply read exactly
        as ``read_response`` reads it (after a body: no group is pipelined)."""
        if self._command_lock is None:
            raise SMTPServerDisconnected("Server not connected")
        if self._exchange is not None or self._due or self._command_lock.locked():
            raise RuntimeError("an exchange is already under way on this connection")
        ex = _Exchange(self._loop.create_future(), wanted, timeout, single)
        transport = self.transport
        if transport is None or transport.is_closing():
            ex.error = SMTPServerDisconnected("Connection lost")  # (as execute_pipelined returns it)
            ex.done.set_result(None)
            return ex
        if isinstance(data, bytes):
            cast(asyncio.WriteTransport, transport).write(data)
        else:
            cast(asyncio.WriteTransport, transport).writelines(data)
        self._exchange = ex
        if self._buffer:  # (what came before the write: aiosmtplib would give it to this read)
            self._take_replies(ex, b"")
        if self._exchange is ex:
            first = first_timeout if first_timeout else timeout
            if first is not None and first <= 0:
                self._finish(SMTPReadTimeoutError("Timed out waiting for server response"))
            elif first is not None:
                self._await_until(first)
        return ex

    async def exchange(self, data: bytes | Sequence[bytes], wanted: int, timeout: float | None,
                       first_timeout: float | None = None, *, single: bool = False) -> Replies:
        """``data`` in one write, then ``wanted`` replies in order, with one wake-up of
        the caller: (the replies received, the error that ended the group before all
        came — a lost connection, a time-out, a malformed reply — or None).  A 421
        reply ends the group.  The same replies and errors as ``execute_pipelined``."""
        ex = self.exchange_started(data, wanted, timeout, first_timeout, single=single)
        try:
            await ex.done
        finally:
            if self._exchange is ex:  # (cancelled)
                self._exchange = None
                self._deadline = None
        return ex.replies, ex.error

    def _finish(self, error: SMTPException | OSError | None) -> None:
        ex = self._exchange
        if ex is None:
            return
        self._exchange = None
        self._deadline = None
        ex.error = error
        if not ex.done.done():
            ex.done.set_result(None)

    def _take_replies(self, ex: _Exchange, data: bytes) -> None:
        """Every whole reply in the buffer, while replies are due."""
        buffer = self._buffer
        if ex.single or ex.wanted == 1:  # the last reply: aiosmtplib's data_received, to the letter
            if len(buffer) > MAX_RESPONSE_LENGTH:
                del buffer[:]
                self._finish(SMTPResponseException(SMTPStatus.invalid_response.value, "Response too long"))
                return
            last = data.rfind(b"\n")
            if data and (last == -1 or data[last + 3:last + 4] == b"-"):
                return
        while ex.wanted:
            try:
                reply = self._parse_reply()
            except Exception as exc:  # a malformed reply, as aiosmtplib reports it
                self._finish(exc if isinstance(exc, SMTPException | OSError) else SMTPException(str(exc)))
                return
            if reply is None:
                break
            ex.replies.append(reply)
            ex.wanted -= 1
            if reply.code == CLOSING:
                ex.wanted = 0
            elif ex.wanted:  # the next reply's time starts now
                if ex.timeout is None:
                    self._deadline = None
                elif ex.timeout > 0:
                    self._await_until(ex.timeout)
        if not ex.wanted:
            self._finish(None)
        elif ex.replies and ex.timeout is not None and ex.timeout <= 0:  # no time to wait for the next one
            self._finish(SMTPReadTimeoutError("Timed out waiting for server response"))
        elif ex.wanted > 1 and len(buffer) > MAX_RESPONSE_LENGTH * ex.wanted:  # far more than the replies due
            del buffer[:]
            if self.transport is not None:
                self.transport.close()  # connection_lost ends the exchange

    def _parse_reply(self) -> SMTPResponse | None:
        """``_read_response_from_buffer`` with a shortcut for the usual one-line reply
        (the same result: tests/test_lean_exchange.py compares them)."""
        buffer = self._buffer
        end = buffer.find(b"\n")
        if end < 0:
            return None
        line = bytes(buffer[:end + 1])
        if line[3:4] == b"-" or end >= MAX_LINE_LENGTH:
            return self._read_response_from_buffer()
        try:
            code = int(line[:3])
        except ValueError:
            return self._read_response_from_buffer()  # (raises as aiosmtplib does)
        del buffer[:end + 1]
        return SMTPResponse(code, line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))

    # ------------------------------------------------------------ the plain path

    async def execute_pipelined(self, lines: Sequence[bytes], timeout: float | None,
                                first_timeout: float | None = None
                                ) -> tuple[list[SMTPResponse], SMTPException | OSError | None]:
        """``first_timeout``: for the first reply (default ``timeout``)."""
        data = _command_lines(lines)
        if self._command_lock is None:
            raise SMTPServerDisconnected("Server not connected")
        replies: list[SMTPResponse] = []
        async with self._command_lock:
            self._due = len(lines)
            try:
                self.write(data)
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

    lean = True  # the lean exchange; False: the plain path (one awaited read per reply), for the tests that compare them

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
        if self.lean:
            replies, error = await self._pipelining().exchange(_command_lines(lines), len(lines), timeout,
                                                               first_timeout)
        else:
            replies, error = await self._pipelining().execute_pipelined(lines, timeout, first_timeout)
        if error is not None or (replies and replies[-1].code == CLOSING):
            self.close()
        return replies, error

    async def send_body(self, body: bytes | Sequence[bytes], timeout: float | None) -> SMTPResponse:
        """After a 354: ``body`` (dot-stuffed, ending ``CRLF.CRLF``; or such bytes in
        parts, sent back to back) and the reply to it."""
        if not self.lean:
            try:
                return await self._pipelining().execute_body(body, timeout)
            except (SMTPServerDisconnected, SMTPTimeoutError):
                self.close()
                raise
        replies, error = await self._pipelining().exchange(body, 1, timeout, single=True)
        if error is not None:
            if isinstance(error, SMTPServerDisconnected | SMTPTimeoutError):
                self.close()
            raise error
        return replies[0]

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
