"""Postfix's ``smtp-sink`` as a real remote SMTP host on loopback, for tests.

    with SmtpSink("127.0.0.1", port, tmp_dir, "-r", "RCPT") as sink:   # 4xx to RCPT
        ...
        sink.messages()   # transactions it accepted (-d dump files), oldest first
        sink.counters()   # {"sess": n, "quit": n, "mesg": n} from -c (after sessions end)

Behaviours used (``man smtp-sink``): ``-r CMD`` soft (4xx) and ``-f CMD`` hard (5xx)
rejects, ``-b``/``-B`` their reply texts, ``-q CMD`` hang up without a reply, ``-w S``
wait before answering DATA.  The sink runs as ``nobody`` when we are root (it
insists), so its dump directory lives under /tmp, writable by it.  Skips the test
when smtp-sink is not installed (Debian: ``apt-get install postfix``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import pytest


def sink_binary() -> str:
    found = shutil.which("smtp-sink") or next(
        (p for p in ("/usr/sbin/smtp-sink", "/usr/lib/postfix/smtp-sink") if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.skip("smtp-sink is not installed (apt-get install postfix): SMTP peer tests need it")
    return found


class SmtpSink:
    def __init__(self, host: str, port: int, *options: str, start_timeout: float = 10.0) -> None:
        self.host, self.port, self.options = host, port, list(options)
        self.dump_dir = Path(tempfile.mkdtemp(prefix="smtp-sink-", dir="/tmp"))
        self.dump_dir.chmod(0o777)
        self._out = self.dump_dir / "counters.out"
        self._process: subprocess.Popen[bytes] | None = None
        self._probe_sessions = 0
        self._start(start_timeout)

    def _start(self, start_timeout: float) -> None:
        cmd = [sink_binary(), "-c", "-d", f"{self.dump_dir}/msg.", *self.options]
        if os.geteuid() == 0:
            cmd[1:1] = ["-u", "nobody"]
        cmd += [f"{self.host}:{self.port}", "64"]
        with open(self._out, "wb") as out:
            self._process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"smtp-sink exited: {self._out.read_text(errors='replace')}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    s.recv(100)  # the greeting; counts as one session in the counters
                    self._probe_sessions = 1
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"smtp-sink did not start on {self.host}:{self.port}")

    def messages(self) -> list[bytes]:
        """Dumped transactions (smtp-sink's X-* lines, then the message as received),
        oldest first.  smtp-sink creates a dump file at MAIL and fills it as data
        arrives: wait for the sender to see its 250 before reading the content."""
        files = sorted(self.dump_dir.glob("msg.*"), key=lambda p: p.stat().st_mtime_ns)
        return [data for data in (p.read_bytes() for p in files) if data]

    def counters(self) -> dict[str, int]:
        """The last counter line, minus our start-up probe session."""
        text = self._out.read_text(errors="replace").replace("\r", "\n").strip().splitlines()
        lines = [line for line in text if line.startswith("sess=")]
        if not lines:
            return {"sess": 0, "quit": 0, "mesg": 0}
        values = dict(part.split("=") for part in lines[-1].split())
        out = {k: int(v) for k, v in values.items()}
        out["sess"] -= self._probe_sessions
        return out

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dump_dir, ignore_errors=True)

    def __enter__(self) -> SmtpSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
