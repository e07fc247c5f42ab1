"""The auth bridge: Dovecot's logins checked against the site's directory.

A UNIX socket (``<data>/dovecot/auth-bridge``, mode 0600: only imsrelay's user, as
which Dovecot's auth process runs, may talk to it).  Each connection carries one
request line from the checkpassword helper (``imsrelay.access.checkpassword``) and
gets one answer line:

- ``{"result": "ok", "user": ALIAS, "home": MAILDIR}``: the password is right and
  the mailbox may use the protocol;
- the same with ``"nologin": REASON``: right password, but the protocol is disabled
  for it (site, server or mailbox) or the mailbox is homed elsewhere;
- ``{"result": "fail"}``: wrong login or password, or the client is locked out;
- ``{"result": "tempfail", "reason": ...}``: the site could not decide.

Failed attempts count per client address in the site's ``FailureLimiter``, the one
SMTP AUTH uses: the same lock-out for every protocol, and the same doubling delay
before a refusal is answered.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imsrelay.access.ports import AccessSite

PROTOCOL_OF_SERVICE = {"imap": "imap4", "pop3": "pop3"}
MAX_LINE = 8192


class AuthBridge:
    def __init__(self, socket_path: Path, site: AccessSite, *, home_of: Callable[[str], Path],
                 prepare: Callable[[str], None], log: Any, clock: Callable[[], float] = time.monotonic) -> None:
        """``home_of(alias)``: the mailbox's Maildir; ``prepare(alias)`` (blocking, run on
        a thread): make it ready for Dovecot's mail processes.  ``clock``: the one the
        SMTP side gives the shared ``FailureLimiter`` (monotonic)."""
        self.socket_path = socket_path
        self.site = site
        self.home_of = home_of
        self.prepare = prepare
        self.log = log
        self.clock = clock
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._session, path=str(self.socket_path),
                                                           limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.socket_path.unlink(missing_ok=True)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 30.0)
            answer = await self.answer(line)
            writer.write((json.dumps(answer) + "\n").encode())
            await writer.drain()
        except (OSError, TimeoutError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def answer(self, line: bytes) -> dict[str, str]:
        """The answer to one request line (see the module's docstring)."""
        try:
            req = json.loads(line)
            login = base64.b64decode(req["login"], validate=True).decode("utf-8")
            password = base64.b64decode(req["password"], validate=True)
            protocol = PROTOCOL_OF_SERVICE[str(req.get("service", ""))]
            client = str(req.get("remote_ip", "")) or "unknown"
        except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
            return {"result": "tempfail", "reason": "a malformed request"}
        guard = self.site.auth_guard  # the same counts as SMTP AUTH: one lock-out for every protocol
        try:
            account = await self.site.account_of(login)
            refused = guard.refusal(account, client, self.clock())
            if refused is not None:
                self.log.warning("access.locked_out", protocol=protocol, client=client, login=login,
                                 seconds=round(refused.retry_after))
                return {"result": "fail"}
            identity = await self.site.authenticate(login, password)
        except Exception as exc:  # the directory could not answer: Dovecot says "try again later"
            self.log.error("access.auth_error", protocol=protocol, client=client, error=repr(exc))
            return {"result": "tempfail", "reason": "the directory could not be read"}
        if identity is None:
            failures = guard.failure(account, client, self.clock())
            self.log.info("access.login_failed", protocol=protocol, client=client, login=login, failures=failures)
            await asyncio.sleep(guard.delay(failures))
            return {"result": "fail"}
        guard.success(account, client, self.clock())
        refusal = await self.site.protocol_refusal(identity, protocol)
        home = self.home_of(identity.alias)
        if refusal is None:
            await asyncio.to_thread(self.prepare, identity.alias)
            self.log.info("access.login", protocol=protocol, client=client, login=login, mailbox=identity.alias)
            return {"result": "ok", "user": identity.alias, "home": str(home)}
        self.log.info("access.login_refused", protocol=protocol, client=client, login=login,
                      mailbox=identity.alias, reason=refusal)
        return {"result": "ok", "user": identity.alias, "home": str(home), "nologin": refusal}
