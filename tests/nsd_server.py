"""A real authoritative DNS server (NLnet Labs nsd) on 127.0.0.1 for tests.

    with NsdServer({"example.test": ZONE_TEXT}, tmp_path) as nsd:
        resolver = MailResolver([nsd.address], ...)   # "127.0.0.1:<port>"

Each zone text is a complete BIND zone file ($ORIGIN/$TTL optional, SOA required).
The server only ever listens on loopback. Skips the calling test when nsd is not
installed (Debian: `apt-get install nsd`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from sitekit import free_port

LOOPBACK = "127.0.0.1"


def nsd_binary() -> str:
    """Path of the nsd executable, or skip the test with a clear message."""
    found = shutil.which("nsd") or next(
        (p for p in ("/usr/sbin/nsd", "/usr/local/sbin/nsd") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip("nsd is not installed (apt-get install nsd): DNS integration tests need it")
    return found


class NsdServer:
    """Start nsd serving `zones` (zone name → zone file text) from `directory`."""

    def __init__(
        self,
        zones: dict[str, str],
        directory: Path,
        *,
        port: int | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self._binary = nsd_binary()
        self.zones = dict(zones)
        self.directory = Path(directory) / "nsd"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        for name, text in self.zones.items():
            (self.directory / f"{name}.zone").write_text(text)
        self._start(port, start_timeout)

    @property
    def address(self) -> str:
        """The nameserver as MailResolver takes it: "127.0.0.1:<port>"."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def log_text(self) -> str:
        log = self.directory / "nsd.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def _write_config(self) -> Path:
        d = self.directory
        lines = [
            "server:",
            '    username: ""',
            '    chroot: ""',
            '    database: ""',
            f'    zonesdir: "{d}"',
            f'    zonelistfile: "{d}/zone.list"',
            f'    pidfile: "{d}/nsd.pid"',
            f'    xfrdfile: "{d}/xfrd.state"',
            f'    xfrdir: "{d}"',
            f'    logfile: "{d}/nsd.log"',
            f"    ip-address: {LOOPBACK}@{self.port}",
            f"    port: {self.port}",
            "    do-ip6: no",
            "    server-count: 1",
            "    verbosity: 1",
            "    hide-version: yes",
            "remote-control:",
            "    control-enable: no",
        ]
        for name in self.zones:
            lines += ["zone:", f"    name: {name}", f'    zonefile: "{d}/{name}.zone"']
        config = d / "nsd.conf"
        config.write_text("\n".join(lines) + "\n")
        return config

    def _start(self, port: int | None, start_timeout: float) -> None:
        last_error = ""
        for _attempt in range(1 if port else 3):  # a probed port may be taken before nsd binds
            self.port = port or free_port(LOOPBACK, udp=True)
            config = self._write_config()
            self._process = subprocess.Popen(
                [self._binary, "-d", "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            if self._wait_until_answering(start_timeout):
                return
            last_error = self._reap()
        raise RuntimeError(f"nsd did not start: {last_error}\n{self.log_text}")

    def _wait_until_answering(self, start_timeout: float) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + start_timeout
        pending = list(self.zones) or ["."]
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            pending = [zone for zone in pending if not self._answers_soa(zone)]
            if not pending:
                return True
            time.sleep(0.05)
        return False

    def _answers_soa(self, zone: str) -> bool:
        query = dns.message.make_query(zone, dns.rdatatype.SOA)
        try:
            response = dns.query.udp(query, LOOPBACK, port=self.port, timeout=0.2)
        except (OSError, dns.exception.DNSException):
            return False
        return response.rcode() == dns.rcode.NOERROR and bool(response.flags & dns.flags.AA)

    def _reap(self) -> str:
        """Stop the process we started (and its children); return its stderr."""
        process, self._process = self._process, None
        if process is None:
            return ""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the session nsd leads
                process.wait()
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        if process.stderr:
            process.stderr.close()
        return stderr

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Stop nsd; afterwards queries to its port are refused."""
        self._reap()

    def __enter__(self) -> NsdServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
