"""Dovecot as a child process: found, configured under ``<data>/dovecot``, watched.

``find_dovecot`` looks for the binary (a path, or a name in PATH and /usr/sbin);
``DovecotProcess`` writes the configuration (``dovecot_config.render``) and the
checkpassword wrapper, starts ``dovecot -F -c <data>/dovecot/dovecot.conf`` (the
foreground master: its children end with it), waits until its listeners answer,
restarts it if it dies (at most ``MAX_RESTARTS`` times in ``RESTART_WINDOW``
seconds), and stops it with SIGTERM (then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from imsrelay.access import checkpassword
from imsrelay.access.dovecot_config import DovecotPlan, render

INSTALL_HINT = "apt-get install dovecot-imapd dovecot-pop3d (./dev lab installs them)"
CHECKPASSWORD_REPLY = ("/usr/lib/dovecot/checkpassword-reply", "/usr/libexec/dovecot/checkpassword-reply")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes; Dovecot's socket names under base_dir take up to 20 more


class DovecotUnavailable(Exception):
    """Dovecot cannot run here (one line: what is missing and how to get it)."""


def find_dovecot(binary: str) -> Path:
    """The Dovecot binary ``binary`` names; ``DovecotUnavailable`` when there is none."""
    if "/" in binary:
        path = Path(binary)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise DovecotUnavailable(f"{binary} is not an executable Dovecot")
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise DovecotUnavailable(f"Dovecot is not installed ({binary} not found): {INSTALL_HINT}")
    if not any(Path(p).exists() for p in CHECKPASSWORD_REPLY):
        raise DovecotUnavailable(f"Dovecot's checkpassword-reply is missing: {INSTALL_HINT}")
    return Path(found)


def wrapper_text(bridge_socket: Path) -> str:
    """The checkpassword program Dovecot runs per login: this Python, the helper module
    (standard library only, ``-I -S``: no site-packages) and the bridge's socket."""
    helper = Path(checkpassword.__file__).resolve()
    command = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-I", "-S", helper, bridge_socket))
    return f"#!/bin/sh\n# Written by imsrelay: Dovecot's checkpassword, answered by the site's auth bridge.\nexec {command} \"$@\"\n"


class DovecotProcess:
    def __init__(self, binary: Path, plan: DovecotPlan, *, config_path: Path, log: Any) -> None:
        self.binary = binary
        self.plan = plan
        self.config_path = config_path
        self.log = log
        self.process: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._restarts: list[float] = []

    def write_files(self, bridge_socket: Path) -> None:
        plan = self.plan
        for d in (plan.base_dir, plan.state_dir, plan.log_path.parent):
            d.mkdir(parents=True, exist_ok=True)
        if len(str(plan.base_dir)) > MAX_SOCKET_PATH - 20:
            raise DovecotUnavailable(f"{plan.base_dir}: the path is too long for Dovecot's sockets "
                                     f"(at most {MAX_SOCKET_PATH - 20} characters): use a shorter data directory")
        wrapper = self.plan.checkpassword
        tmp = wrapper.with_suffix(".tmp")
        tmp.write_text(wrapper_text(bridge_socket))
        os.chmod(tmp, 0o700)
        os.replace(tmp, wrapper)
        text = render(plan)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)
        (plan.base_dir / "master.pid").unlink(missing_ok=True)  # a master killed with the site left it

    async def start(self) -> None:
        await self._spawn()
        self._watcher = asyncio.create_task(self._watch(), name="dovecot-watch")

    async def _spawn(self) -> None:
        log_file = self.plan.log_path.parent / "dovecot.stderr"
        with open(log_file, "ab") as err:
            self.process = await asyncio.create_subprocess_exec(
                str(self.binary), "-F", "-c", str(self.config_path), stdin=asyncio.subprocess.DEVNULL,
                stdout=err, stderr=err, start_new_session=True)
        await self._wait_listening()
        self.log.info("access.started", pid=self.process.pid, config=str(self.config_path),
                      listeners={k: v for k, v in self.ports().items()})

    def ports(self) -> dict[str, int]:
        p = self.plan
        tls = p.tls_cert is not None
        found = {"imap": p.imap_port, "imaps": p.imaps_port if tls else None, "pop3": p.pop3_port,
                 "pop3s": p.pop3s_port if tls else None}
        return {k: v for k, v in found.items() if v}

    async def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        pending = set(self.ports().values())
        host = "127.0.0.1" if self.plan.listen in ("0.0.0.0", "*", "") else self.plan.listen.strip("[]")
        if host == "::":
            host = "::1"
        while pending:
            assert self.process is not None
            if self.process.returncode is not None:
                raise DovecotUnavailable(f"Dovecot exited at start (status {self.process.returncode}): "
                                         f"{self._last_error()}")
            for port in list(pending):
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection(host, port)
                    writer.close()
                    pending.discard(port)
            if pending and time.monotonic() > deadline:
                await self._terminate()
                raise DovecotUnavailable(f"Dovecot did not listen on {host} port(s) "
                                         f"{', '.join(map(str, sorted(pending)))} within {START_TIMEOUT:g}s: "
                                         f"{self._last_error()}")
            if pending:
                await asyncio.sleep(0.05)

    def _last_error(self) -> str:
        """The last error line Dovecot wrote (its log, else its stderr)."""
        for path in (self.plan.log_path, self.plan.log_path.parent / "dovecot.stderr"):
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            errors = [line for line in lines if "Fatal" in line or "Error" in line]
            if errors:
                return errors[-1].strip()
        return f"see {self.plan.log_path}"

    async def _watch(self) -> None:
        while not self._stopping:
            assert self.process is not None
            status = await self.process.wait()
            if self._stopping:
                return
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
            self.log.error("access.dovecot_exited", status=status, error=self._last_error(),
                           restart=len(self._restarts) <= MAX_RESTARTS)
            if len(self._restarts) > MAX_RESTARTS:
                return
            await asyncio.sleep(1.0)
            try:
                (self.plan.base_dir / "master.pid").unlink(missing_ok=True)
                await self._spawn()
            except (OSError, DovecotUnavailable) as exc:
                self.log.error("access.restart_failed", error=str(exc))
                return

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self) -> None:
        self._stopping = True
        await self._terminate()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None

    async def _terminate(self) -> None:
        p = self.process
        if p is None or p.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(p.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            await p.wait()
        self.log.info("access.stopped", pid=p.pid)
