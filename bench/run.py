#!/usr/bin/env python3
"""imsrelay benchmarks, side by side with Postfix (issues 6 and 16).

One command runs every phase on loopback only, each phase bounded in time, and
writes ``bench/RESULTS.md`` and ``bench/scale.png`` (plus raw JSON and logs under
``bench/out/``)::

    python bench/run.py            # full run (see bench/README.md for every count)
    python bench/run.py --quick    # the same phases, smaller counts

Phases (``--phases`` picks a subset, comma separated):

throughput
    At 4 KB and 50 KB: ``smtp-source -s 20 -m N -l SIZE`` into (a) ``smtp-sink``
    directly (the ceiling), (b) a private Postfix instance relaying to
    ``smtp-sink`` (its own config, queue and data directories in a temp dir;
    default durability: the queue file is fsynced before ``250``), (c) one
    imsrelay site relaying to ``smtp-sink`` through its E-Mail Domain table.
    Messages/s accepted (smtp-source wall time), messages/s end to end (until the
    sink has counted them all: ``smtp-sink -c``), CPU seconds per message of the
    relay's process tree (``/proc``: utime+stime of every process, plus the
    reaped children's).
local
    smtp-source into a site whose recipient is its own mailbox vs a private
    Postfix delivering into Maildir with ``virtual(8)``; completion = files in
    the Maildirs' ``new/``.
latency
    Two imsrelay sites (SiteA, SiteB on 127.0.0.x) whose E-Mail Domain tables
    point at each other: time from SiteA's ``250`` to the file appearing in
    SiteB's Maildir ``new/`` (inotify), p50/p99 at light load (one message at a
    time) and heavy load (20 concurrent senders; acceptance rate, 4xx deferrals).
replication
    Three sites; N new mailboxes at SiteA; time until SiteB and SiteC know them
    all after Request Now.  Reports "skipped" when the replication feature
    (``imsrelay replicate request-now``) is not in this tree.
concurrency
    10,000 simultaneous idle SMTP sessions (after EHLO) held against one site;
    memory per session = RSS delta / sessions.
scale
    Throughput and CPU/msg at 1-500 sessions and 1 KB-1 MB; restarts with a
    full (held) queue: time until ``/ready``, memory.
servers (only when named: ``--phases servers``)
    SiteA as one server, then as two (``[[servers]]``, User2 homed on the
    second), on the same load given to every server in equal parts: messages/s,
    CPU per message of both servers, and the latency of the intra-site hop
    (one message at a time given to the server its mailbox is not homed on).

Nothing here talks to anything but 127.0.0.0/8.  Needs root for the private
Postfix instance (and ``apt-get install postfix`` when the tools are missing).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import ctypes
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:  # bench_targets, bench_scale beside this file
    sys.path.insert(0, str(BENCH_DIR))

from bench_scale import ScalePlan, plot_scale, render_scale, scale_plan  # noqa: E402
from bench_targets import evaluate_targets, size_label, targets_markdown  # noqa: E402

OUT_DIR = BENCH_DIR / "out"
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

SENDER = "bench@source.bench.example"
SINK_RCPT = "sink@bench.example"
LOCAL_DOMAIN = "local.bench.test"
HELD_DOMAIN = "held.bench.example"
PHASES = ("throughput", "local", "latency", "replication", "concurrency", "scale")  # the default run
EXTRA_PHASES = ("servers",)  # asked for by name: --phases servers (issue 24: a site of two servers)
# Sizes above this use --messages-large in the throughput phase.
LARGE_SIZE = 8192
HUGE_SIZE = 64 * 1024  # above this, a size's message count comes from a byte budget
BIG_BYTES = 512 << 20  # bytes relayed per big size in the full run (1 MB: 512 messages, 10 MB: 51)
QUICK_BIG_BYTES = 48 << 20
FLOOR_MAX_SIZE = 51200  # the floor relay runs beside imsrelay at 4 KB and 50 KB
PROFILED_SIZE = 1 << 20  # a separate py-spy run at 1 MB (its table in RESULTS.md) unless --profile is given
PROFILED_MESSAGES = 200
MIN_BIG_MESSAGES = 10
MAX_MESSAGE_SIZE = 32 << 20  # both relays accept messages up to this size in the bench
DEFAULT_SIZES = "4096,51200,1048576,10485760"


class BenchError(Exception):
    """A phase could not be run (clear one-line reason)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ============================================================== tools and machine


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN:
        p = Path(d) / name
        if p.exists() and os.access(p, os.X_OK):
            return str(p)
    return None


def ensure_tools() -> dict[str, str]:
    """smtp-source, smtp-sink, postfix, postconf: install Debian's postfix if missing."""
    names = ("smtp-source", "smtp-sink", "postfix", "postconf")
    tools = {n: which(n) for n in names}
    if all(tools.values()):
        return {k: v for k, v in tools.items() if v}
    if os.geteuid() != 0 or not which("apt-get"):
        missing = ", ".join(n for n, p in tools.items() if not p)
        raise SystemExit(f"bench: missing {missing}; install Debian's postfix package (needs root)")
    log("installing Debian postfix (smtp-source, smtp-sink, reference relay)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["sh", "-c", "echo 'postfix postfix/main_mailer_type select No configuration'"
                    " | debconf-set-selections"], env=env, check=False, timeout=60)
    subprocess.run(["apt-get", "update"], env=env, check=False, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "postfix"], env=env,
                   check=True, timeout=900)
    tools = {n: which(n) for n in names}
    if not all(tools.values()):
        raise SystemExit("bench: postfix installed but its tools are still missing")
    return {k: v for k, v in tools.items() if v}


def code_fingerprint() -> dict[str, Any]:
    """Which imsrelay code ran: git HEAD, modified files, and a hash of imsrelay/*.py
    (taken at the start and the end: other people may be editing the tree meanwhile)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((REPO / "imsrelay").rglob("*.py")):
        h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    out: dict[str, Any] = {"imsrelay_sha256": h.hexdigest()[:12]}
    with contextlib.suppress(Exception):
        out["git_head"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "imsrelay"],
                                capture_output=True, text=True, timeout=10).stdout.splitlines()
        out["modified_imsrelay_files"] = len(status)
    return out


def machine_info(tools: dict[str, str]) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    postfix_version = "?"
    with contextlib.suppress(Exception):
        postfix_version = subprocess.run([tools["postconf"], "-d", "-h", "mail_version"], capture_output=True,
                                         text=True, timeout=10).stdout.strip()
    import importlib.metadata as md

    versions = {}
    for pkg in ("imsrelay", "aiosmtpd", "aiosmtplib", "uvloop"):
        with contextlib.suppress(Exception):
            versions[pkg] = md.version(pkg)
    fs = "?"
    with contextlib.suppress(Exception):
        fs = subprocess.run(["df", "-T", tempfile.gettempdir()], capture_output=True, text=True,
                            timeout=10).stdout.splitlines()[1].split()[1]
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(), "python": platform.python_version(), "postfix": postfix_version,
        "packages": versions, "tmp_filesystem": fs, "loadavg_at_start": os.getloadavg(),
    }


# ============================================================== /proc accounting


def _stat(pid: int) -> tuple[int, int, int, int, int, int] | None:
    """(ppid, utime, stime, cutime, cstime, rss_pages) of a process, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = raw[raw.rindex(b")") + 2:].split()
    # fields after "pid (comm)": state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14 ... rss=21
    return (int(rest[1]), int(rest[11]), int(rest[12]), int(rest[13]), int(rest[14]), int(rest[21]))


def _all_stats() -> dict[int, tuple[int, int, int, int, int, int]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                out[int(entry)] = st
    return out


def tree_pids(root: int, stats: dict[int, tuple[int, ...]] | None = None) -> list[int]:
    stats = stats if stats is not None else _all_stats()
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st[0], []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU ever used by a process tree: each live process's own time plus the time of
    the children it has reaped (monotone, so a difference is the CPU in between)."""
    stats = _all_stats()
    ticks = sum(stats[p][1] + stats[p][2] + stats[p][3] + stats[p][4] for p in tree_pids(root, stats))
    return ticks / CLK_TCK


def tree_pss_bytes(root: int) -> int:
    """Proportional set size of a process tree (shared pages split between sharers),
    from /proc/PID/smaps_rollup; RSS where that is unreadable."""
    stats = _all_stats()
    total = 0
    for pid in tree_pids(root, stats):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            total += stats[pid][5] * PAGE
    return total


def tree_peak_rss_bytes(root: int) -> tuple[int, int]:
    """(largest, sum of) the peak resident sizes (VmHWM) of the processes of a tree."""
    peaks = []
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) * 1024)
        except OSError:
            continue
    return (max(peaks), sum(peaks)) if peaks else (0, 0)


def tree_rss_bytes(root: int) -> int:
    """Resident set size of a process tree (shared pages counted in each process)."""
    stats = _all_stats()
    return sum(stats[p][5] for p in tree_pids(root, stats)) * PAGE


def process_rss_bytes(pid: int) -> int:
    """VmRSS of one process (bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies from /proc/stat, for the machine's CPU load during a run."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def busy_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total else 0.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process exited with status {proc.returncode} before listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1) as s:
            s.recv(512)  # the 220 banner
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def raise_fd_limit(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ============================================================== processes we own


class Processes:
    """Every process the harness starts, stopped by its pid (never by name)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[Any]]] = []
        self.cleanups: list[tuple[str, Callable[[], None]]] = []

    def start(self, name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(list(argv), start_new_session=True, **kwargs)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 20.0) -> int | None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(10)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]
        return proc.returncode

    def on_exit(self, name: str, fn: Callable[[], None]) -> None:
        self.cleanups.append((name, fn))

    def done(self, name: str) -> None:
        self.cleanups = [(n, f) for n, f in self.cleanups if n != name]

    def stop_all(self) -> None:
        for name, fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as exc:  # keep cleaning up the rest
                log(f"cleanup {name}: {exc!r}")
        self.cleanups.clear()
        for _name, proc in reversed(list(self.procs)):
            self.stop(proc, timeout=10)


# ============================================================== smtp-sink


class Sink:
    """``smtp-sink -c`` on loopback; its running counter (``mesg=N``) read live."""

    def __init__(self, procs: Processes, tools: dict[str, str], port: int, logdir: Path) -> None:
        argv = [tools["smtp-sink"], "-c"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        argv += ["-m", "1024", f"127.0.0.1:{port}", "1024"]
        self.port = port
        self.procs = procs
        self.argv = argv
        self.proc = procs.start(f"smtp-sink:{port}", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.count = 0
        self.last_change = time.monotonic()
        self._cond = threading.Condition()
        self._tail = b""
        self._reader = threading.Thread(target=self._read, name=f"sink-{port}", daemon=True)
        self._reader.start()
        wait_port("127.0.0.1", port, 10, self.proc)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        pending = b""
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                break
            pending += chunk
            *records, pending = re.split(rb"[\r\n]", pending)
            for rec in reversed(records):
                m = re.search(rb"mesg=(\d+)", rec)
                if m:
                    n = int(m.group(1))
                    with self._cond:
                        if n != self.count:
                            self.count = n
                            self.last_change = time.monotonic()
                            self._cond.notify_all()
                    break
                if rec.strip():
                    self._tail = (self._tail + rec + b"\n")[-2000:]

    def wait_count(self, n: int, deadline: float, stall: float = 60.0) -> float | None:
        """Monotonic time when the counter reached ``n``; None at the deadline or when
        nothing arrived for ``stall`` seconds."""
        with self._cond:
            while self.count < n:
                now = time.monotonic()
                if now >= deadline or now - self.last_change > stall or self.proc.poll() is not None:
                    return None
                self._cond.wait(min(0.5, deadline - now))
            return self.last_change if self.count == n else time.monotonic()

    def stop(self) -> None:
        self.procs.stop(self.proc, timeout=5)


class MaildirCounter:
    """Files in a Maildir's ``new/``, counted every 50 ms by a thread: the completion
    counter of the local delivery phase (the same interface as :class:`Sink`)."""

    def __init__(self, new_dir: Path, interval: float = 0.05) -> None:
        self.new_dir = new_dir
        self.count = self._files()
        self.last_change = time.monotonic()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name=f"count-{new_dir.parent.name}", daemon=True)
        self._thread.start()

    def _files(self) -> int:
        try:
            with os.scandir(self.new_dir) as it:
                return sum(1 for _ in it)
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            n = self._files()
            with self._cond:
                if n != self.count:
                    self.count = n
                    self.last_change = time.monotonic()
                    self._cond.notify_all()

    def wait_count(self, n: int, deadline: float, stall: float = 60.0) -> float | None:
        with self._cond:
            while self.count < n:
                now = time.monotonic()
                if now >= deadline or now - self.last_change > stall:
                    return None
                self._cond.wait(min(0.5, deadline - now))
            return self.last_change

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


# ============================================================== smtp-source


@dataclass
class SourceRun:
    seconds: float
    returncode: int
    output: str


def run_source(tools: dict[str, str], port: int, *, messages: int, sessions: int, size: int,
               timeout: float, host: str = "127.0.0.1", rcpt: str = SINK_RCPT) -> SourceRun:
    argv = [tools["smtp-source"], "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-f", SENDER, "-t", rcpt, "-M", "bench-client.invalid", f"{host}:{port}"]
    t0 = time.monotonic()
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        rc, out = cp.returncode, (cp.stdout + cp.stderr).strip()
    except subprocess.TimeoutExpired as exc:
        rc, out = -1, f"timed out after {timeout:.0f}s: {exc.stderr or ''}"
    return SourceRun(time.monotonic() - t0, rc, out[-2000:])


def source_command(messages: int, sessions: int, size: int, rcpt: str = SINK_RCPT) -> str:
    return (f"smtp-source -s {sessions} -m {messages} -l {size} -f {SENDER} -t {rcpt} "
            f"-M bench-client.invalid 127.0.0.1:PORT")


def throughput_plan(sizes: Sequence[int], messages: int, messages_large: int,
                    big_bytes: int = BIG_BYTES) -> list[tuple[int, int]]:
    """(size, messages) per throughput run: with one size, ``--messages`` of it; with
    several, ``--messages`` for sizes up to 8 KB, ``--messages-large`` up to 64 KB, and
    above that as many as ``big_bytes`` holds (at least ``MIN_BIG_MESSAGES``)."""
    if len(sizes) == 1:
        return [(sizes[0], messages)]

    def count(s: int) -> int:
        if s <= LARGE_SIZE:
            return messages
        if s <= HUGE_SIZE:
            return messages_large
        return max(MIN_BIG_MESSAGES, min(messages_large, big_bytes // s))

    return [(s, count(s)) for s in sizes]


@dataclass(frozen=True)
class Load:
    """One smtp-source run: how many messages, sessions, bytes, to whom."""

    messages: int
    sessions: int
    size: int
    rcpt: str = SINK_RCPT


# ============================================================== private Postfix


def virtual_maildir_settings(root: Path, domain: str, users: Sequence[str], uid: int, gid: int) -> dict[str, str]:
    """main.cf settings for Postfix's ``virtual(8)`` delivery agent into Maildirs under
    ``root/vmail/<domain>/<user>/`` (a trailing ``/`` in the map = Maildir), with a
    ``texthash:`` map (read as it is: no postmap) and static uid/gid."""
    maps = root / "vmailbox"
    maps.write_text("".join(f"{u}@{domain}  {domain}/{u}/\n" for u in users))
    return {"virtual_mailbox_domains": domain, "virtual_mailbox_base": str(root / "vmail"),
            "virtual_mailbox_maps": f"texthash:{maps}", "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}", "virtual_minimum_uid": str(min(uid, 100)),
            "virtual_alias_maps": "", "relayhost": ""}


def make_maildir(path: Path, uid: int = -1, gid: int = -1) -> Path:
    """``path/{tmp,new,cur}`` (owned by uid:gid when given); returns ``path/new``."""
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    if uid >= 0:
        for d in (path.parent, path, path / "tmp", path / "new", path / "cur"):
            os.chown(d, uid, gid)
    return path / "new"


class PrivatePostfix:
    """A Postfix instance of our own: config, queue and data directories in a temp dir,
    smtpd on 127.0.0.1:PORT, relaying everything to ``[127.0.0.1]:SINKPORT`` (or, with
    ``extra`` settings such as :func:`virtual_maildir_settings`, delivering itself)."""

    def __init__(self, procs: Processes, tools: dict[str, str], root: Path, port: int, sink_port: int,
                 extra: dict[str, str] | None = None) -> None:
        if os.geteuid() != 0:
            raise BenchError("a private Postfix instance needs root")
        self.procs = procs
        self.tools = tools
        self.root = root
        self.conf = root / "conf"
        self.queue = root / "queue"
        self.data = root / "data"
        self.logfile = root / "postfix.log"
        self.port = port
        self.sink_port = sink_port
        for d in (self.conf, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        # Our own files, not the system's: Debian's postfix installed with "No
        # configuration" has no /etc/postfix/main.cf at all.  Every main.cf setting the
        # bench relies on is set below with postconf; the rest are Postfix's defaults.
        (self.conf / "main.cf").write_text("# written by bench/run.py; settings below via postconf -e\n")
        shutil.copy(Path(__file__).with_name("postfix-master.cf"), self.conf / "master.cf")
        self._write_master_cf()
        shutil.chown(self.data, "postfix")
        settings = {
            "queue_directory": str(self.queue), "data_directory": str(self.data),
            "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4", "mynetworks": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{sink_port}", "default_transport": "smtp", "relay_transport": "relay",
            "mydestination": "", "local_transport": "error:local delivery is disabled",
            "local_recipient_maps": "", "alias_maps": "", "alias_database": "",
            "myhostname": "postfix-bench.invalid", "mydomain": "bench.invalid", "myorigin": "bench.invalid",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "", "smtpd_peername_lookup": "no",
            "smtpd_tls_security_level": "none", "smtp_tls_security_level": "none",
            "smtp_dns_support_level": "disabled", "syslog_name": "postfix-bench",
            "maillog_file": str(self.logfile), "maillog_file_prefixes": str(root),
            "compatibility_level": "3.6", "message_size_limit": str(MAX_MESSAGE_SIZE),
            **(extra or {}),
        }
        self.postconf(*[f"{k}={v}" for k, v in settings.items()])
        self.master_pid: int | None = None

    def _write_master_cf(self) -> None:
        """bench/postfix-master.cf with smtpd moved to our port and no chroot (the chroot
        would need a copy of /etc files inside our temp queue directory)."""
        lines = (self.conf / "master.cf").read_text().splitlines()
        out = []
        for line in lines:
            if not line.strip() or line.startswith("#") or line[0].isspace():
                out.append(line)
                continue
            f = line.split()
            if len(f) >= 8:
                if f[1] == "inet" and f[0] in ("smtp", "submission", "smtps", "628"):
                    if f[0] != "smtp":
                        continue
                    f[0] = f"127.0.0.1:{self.port}"
                if f[4] in ("y", "-"):
                    f[4] = "n"
                line = "  ".join(f)
            out.append(line)
        (self.conf / "master.cf").write_text("\n".join(out) + "\n")

    def postconf(self, *assignments: str) -> None:
        subprocess.run([self.tools["postconf"], "-c", str(self.conf), "-e", *assignments], check=True,
                       capture_output=True, timeout=30)

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.tools["postfix"], "-c", str(self.conf), *args], capture_output=True,
                              text=True, timeout=timeout)

    def start(self) -> None:
        cp = self._postfix("start")
        self.procs.on_exit("postfix", self.stop)
        pidfile = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                self.master_pid = int(pidfile.read_text().split()[0])
                if _stat(self.master_pid) is not None:
                    break
            time.sleep(0.1)
        if cp.returncode != 0 or self.master_pid is None:
            raise BenchError(f"postfix start failed ({cp.returncode}): {cp.stdout}{cp.stderr}{self.log_tail()}")
        wait_port("127.0.0.1", self.port, 20)

    def log_tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        return ""

    def queue_count(self) -> int:
        n = 0
        for sub in ("incoming", "active", "deferred", "maildrop", "hold"):
            for _dirpath, _dirs, files in os.walk(self.queue / sub):
                n += len(files)
        return n

    def stop(self) -> None:
        if self.master_pid is None:
            return
        pid, self.master_pid = self.master_pid, None
        self.procs.done("postfix")
        self._postfix("stop", timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _stat(pid) is not None:
            time.sleep(0.1)
        if _stat(pid) is not None:
            self._postfix("abort", timeout=30)
            time.sleep(1)
        for p in tree_pids(pid):  # last resort, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


# ============================================================== imsrelay sites


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(doc: dict[str, Any]) -> str:
    """Enough TOML for a site file: tables, arrays of tables, scalars and lists."""
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)
                   and not (isinstance(v, list) and v and isinstance(v[0], dict))}
        for k, v in scalars.items():
            lines.append(f"{k} = {toml_value(v)}")
        for k, v in table.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                lines.append(f"\n[{name}]")
                emit(name, v)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    lines.append(f"\n[[{name}]]")
                    emit(name, item)

    emit("", doc)
    return "\n".join(lines).lstrip() + "\n"


@dataclass
class SiteSpec:
    name: str
    listen: str
    port: int
    domain: str
    company_domain: str
    mailboxes: list[str] = field(default_factory=list)
    email_domains: list[tuple[str, str, int]] = field(default_factory=list)
    connected: list[tuple[str, str]] = field(default_factory=list)  # (site, routing domain)
    replication_peers: list[str] = field(default_factory=list)
    admin_port: int = 0
    delivery: dict[str, Any] = field(default_factory=dict)  # extra [delivery] settings
    workers: int = 1  # smtp.workers: processes serving the site
    smtp: dict[str, Any] = field(default_factory=dict)  # extra [smtp] settings
    transfer: dict[str, Any] = field(default_factory=dict)  # [transfer] (mode at the first start)
    server: str = ""  # site.server ("": Server<name>)
    servers: list[dict[str, Any]] = field(default_factory=list)  # [[servers]]: a site of several servers
    homes: dict[str, str] = field(default_factory=dict)  # mailbox alias -> home_server


class ImsSite:
    """One ``imsrelay serve --config F`` subprocess with its own data directory."""

    def __init__(self, procs: Processes, root: Path, spec: SiteSpec, *, wrapper: Sequence[str] = ()) -> None:
        self.procs = procs
        self.spec = spec
        self.dir = root / spec.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = self.dir / "data"
        self.config = self.dir / f"{spec.name}.toml"
        self.logfile = self.dir / "site.log"
        self.wrapper = list(wrapper)
        self.admin_token = f"bench-{spec.name}-token"
        doc: dict[str, Any] = {
            "site": {"organisation": "BenchORG", "name": spec.name, "server": spec.server or f"Server{spec.name}",
                     "email_domain": spec.domain, "company_domain": spec.company_domain,
                     "data_dir": str(self.data)},
            "smtp": {"listen": spec.listen, "port": spec.port, "relay_networks": ["127.0.0.0/8"],
                     "idle_timeout": "10m", "session_timeout": "1h", "max_errors": 1000,
                     "workers": spec.workers,
                     # the concurrency phase holds 1,000 sessions; load phases run many senders
                     "max_inbound_connections": 100_000, "max_connections_per_ip": 100_000,
                     "max_queued_messages": 10_000_000, "max_message_size": MAX_MESSAGE_SIZE, **spec.smtp},
            "mailboxes": [{"alias": a, "display_name": a, **({"home_server": spec.homes[a]} if a in spec.homes else {})}
                          for a in spec.mailboxes],
            "delivery": {"retry_intervals": ["5s", "10s", "30s"], "starttls": "none", **spec.delivery},
            # A dead loopback resolver: no lab name ever reaches the system resolver.
            "dns": {"nameservers": ["127.0.0.1:9"], "timeout": 1},
            "connected_sites": [{"name": s, "routing_address": "@" + d} for s, d in spec.connected],
            "email_domains": [{"domain": d, "host": h, "port": p} for d, h, p in spec.email_domains],
            "replication": {"key": "bench-org-key", "startup_delay": "1h",
                            "connectors": [{"site": s, "schedule": "never"} for s in spec.replication_peers]},
            "logging": {"level": "warning", "format": "json"},
        }
        if spec.transfer:
            doc["transfer"] = dict(spec.transfer)
        if spec.servers:
            doc["servers"] = [dict(v) for v in spec.servers]
        if spec.admin_port:
            doc["admin"] = {"listen": spec.listen, "port": spec.admin_port, "token": self.admin_token}
        for key in ("mailboxes", "connected_sites", "email_domains"):
            if not doc[key]:
                del doc[key]
        if not spec.replication_peers:
            del doc["replication"]["connectors"]
        self.config.write_text(to_toml(doc))
        self.proc: subprocess.Popen[Any] | None = None

    def maildir_new(self, alias: str) -> Path:
        return self.data / "mailboxes" / alias / "new"

    def start(self, timeout: float = 30.0) -> None:
        if self.wrapper:  # a profiler that runs the module itself
            argv = self.wrapper + ["-m", "imsrelay", "serve", "--config", str(self.config)]
        else:
            argv = [sys.executable, "-m", "imsrelay", "serve", "--config", str(self.config)]
        self._log = open(self.logfile, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = self.procs.start(f"site:{self.spec.name}", argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(self.dir))
        try:
            wait_port(self.spec.listen, self.spec.port, timeout, self.proc)
        except BenchError as exc:
            raise BenchError(f"site {self.spec.name}: {exc}; log: {self.log_tail()}") from None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 10) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        return ""

    def queue_count(self) -> int:
        active = self.data / "queue" / "active"
        return sum(1 for p in active.iterdir() if p.suffix == ".env") if active.is_dir() else 0

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        rc = self.procs.stop(self.proc, timeout=timeout)
        self.proc = None
        with contextlib.suppress(Exception):
            self._log.close()
        return rc


# ============================================================== a small SMTP client


class SmtpError(Exception):
    pass


class MiniSmtp:
    """Just enough SMTP over asyncio streams for the harness (no pipelining)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, *, helo: str = "bench-client.invalid",
                      timeout: float = 30.0) -> MiniSmtp:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        s = cls(reader, writer)
        await s.expect(220, timeout)
        await s.command(f"EHLO {helo}", 250, timeout)
        return s

    async def reply(self, timeout: float = 60.0) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise SmtpError("connection closed by the server")
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                break
        return int(lines[-1][:3]), b"".join(lines).decode("utf-8", "replace").strip()

    async def expect(self, code: int, timeout: float = 60.0) -> str:
        got, text = await self.reply(timeout)
        if got != code:
            raise SmtpError(f"expected {code}, got {text}")
        return text

    async def command(self, line: str, code: int, timeout: float = 60.0) -> str:
        self.writer.write(line.encode() + b"\r\n")
        return await self.expect(code, timeout)

    async def send(self, sender: str, rcpt: str, body: bytes, timeout: float = 60.0) -> str:
        await self.command(f"MAIL FROM:<{sender}>", 250, timeout)
        await self.command(f"RCPT TO:<{rcpt}>", 250, timeout)
        await self.command("DATA", 354, timeout)
        self.writer.write(body + b".\r\n")
        return await self.expect(250, timeout)

    async def try_send(self, sender: str, rcpt: str, body: bytes, timeout: float = 60.0) -> tuple[int, float]:
        """Send one message; (reply code, seconds from the final dot to the reply).  A
        4xx (backpressure: the server defers) is returned after a RSET (code, 0.0 when
        it came before DATA); 421 and anything else unexpected raise SmtpError."""
        for line, want in ((f"MAIL FROM:<{sender}>", 250), (f"RCPT TO:<{rcpt}>", 250), ("DATA", 354)):
            self.writer.write(line.encode() + b"\r\n")
            code, text = await self.reply(timeout)
            if code != want:
                if 400 <= code < 500 and code != 421:
                    await self.command("RSET", 250, timeout)
                    return code, 0.0
                raise SmtpError(f"{line.split(':')[0]}: expected {want}, got {text}")
        t0 = time.monotonic()
        self.writer.write(body + b".\r\n")
        code, text = await self.reply(timeout)
        waited = time.monotonic() - t0
        if code == 250 or (400 <= code < 500 and code != 421):
            return code, waited
        raise SmtpError(f"end of DATA: expected 250, got {text}")

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reader.readline(), 5)
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


def bench_message(sender: str, rcpt: str, bench_id: str, size: int = 4096) -> bytes:
    line = b"X" * 76 + b"\r\n"
    body = line * max(1, size // len(line))
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: latency {bench_id}\r\n"
            f"Message-ID: <{bench_id}@bench.invalid>\r\nX-Bench-Id: {bench_id}\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n\r\n").encode()
    return head + body


# ============================================================== inotify watcher


IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
_EVENT = struct.Struct("iIII")


class MaildirWatcher:
    """Timestamps every file that appears in a Maildir ``new/`` (inotify, no polling),
    then reads its ``X-Bench-Id`` header."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise BenchError(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        if libc.inotify_add_watch(self.fd, str(path).encode(), IN_MOVED_TO | IN_CLOSE_WRITE) < 0:
            raise BenchError(f"inotify_add_watch {path}: {os.strerror(ctypes.get_errno())}")
        self.arrived: dict[str, float] = {}
        self.unmatched = 0
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="maildir-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            r, _, _ = select.select([self.fd], [], [], 0.2)
            if not r:
                continue
            now = time.monotonic()
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                continue
            names = []
            off = 0
            while off < len(buf):
                _wd, _mask, _cookie, length = _EVENT.unpack_from(buf, off)
                name = buf[off + _EVENT.size: off + _EVENT.size + length].rstrip(b"\0").decode()
                off += _EVENT.size + length
                names.append(name)
            for name in names:
                bench_id = self._bench_id(self.path / name)
                with self._cond:
                    if bench_id is None:
                        self.unmatched += 1
                    elif bench_id not in self.arrived:
                        self.arrived[bench_id] = now
                    self._cond.notify_all()

    @staticmethod
    def _bench_id(path: Path) -> str | None:
        try:
            with open(path, "rb") as f:
                head = f.read(8192)
        except OSError:
            return None
        m = re.search(rb"\r?\nX-Bench-Id: (\S+)", head)
        return m.group(1).decode() if m else None

    def wait_for(self, bench_id: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while bench_id not in self.arrived:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.arrived[bench_id]

    def wait_all(self, ids: Sequence[str], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                n = sum(1 for i in ids if i in self.arrived)
                left = deadline - time.monotonic()
                if n == len(ids) or left <= 0:
                    return n
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        os.close(self.fd)


# ============================================================== statistics


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median end-to-end rate (failed runs count as 0); with one run, it."""
    if len(runs) == 1:
        return runs[0]
    ranked = sorted(runs, key=lambda r: r.get("end_to_end_per_s") or 0.0)
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["median_of"] = len(runs)
    chosen["all_end_to_end_per_s"] = [r.get("end_to_end_per_s") for r in runs]
    return chosen


def relay_ratios(pf: dict[str, Any], ims: dict[str, Any]) -> dict[str, float]:
    """imsrelay / Postfix for the rates and CPU per message both runs measured."""
    out = {}
    for key in ("accepted_per_s", "end_to_end_per_s", "cpu_ms_per_msg"):
        if pf.get(key) and ims.get(key):
            out[key] = round(ims[key] / pf[key], 2)
    return out


def paired_ratios(pf_runs: list[dict[str, Any]], ims_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """imsrelay / Postfix round by round (round i of one against round i of the other, run
    back to back), then the median of each ratio: one noisy Postfix round moves one
    pair, not the figure.  With one round, ``relay_ratios`` of that pair."""
    pairs = [relay_ratios(pf, ims) for pf, ims in zip(pf_runs, ims_runs, strict=True)]
    if len(pairs) == 1:
        return pairs[0]
    out: dict[str, Any] = {}
    for key in ("accepted_per_s", "end_to_end_per_s", "cpu_ms_per_msg"):
        values = sorted(p[key] for p in pairs if key in p)
        if values:
            mid = len(values) // 2
            out[key] = values[mid] if len(values) % 2 else round((values[mid - 1] + values[mid]) / 2, 2)
    out["rounds"] = pairs
    return out


def session_steps(total: int, steps: int = 5) -> list[int]:
    """Cumulative session counts at which the concurrency phase reads the site's RSS."""
    points = sorted({max(1, round(total * k / steps)) for k in range(1, steps + 1)})
    return points if total > 0 else []


def percentile(values: Sequence[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return math.nan
    k = max(0, min(len(s) - 1, math.ceil(p / 100.0 * len(s)) - 1))
    return s[k]


def summarize_ms(values: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms) if ms else math.nan,
            "mean_ms": sum(ms) / len(ms) if ms else math.nan}


# ============================================================== the harness


@dataclass
class Options:
    quick: bool
    phases: list[str]
    messages: int
    rounds: int
    sessions: int
    sizes: list[int]
    messages_large: int
    local_messages: int
    scale_queue: int
    light: int
    heavy: int
    heavy_senders: int
    mailboxes: int
    idle_sessions: int
    profile: str
    keep: bool
    out: Path
    addr_base: str
    workers: int = 1


class Bench:
    def __init__(self, opts: Options, tools: dict[str, str]) -> None:
        self.opts = opts
        self.tools = tools
        self.procs = Processes()
        self.root = Path(tempfile.mkdtemp(prefix="imsrelay-bench-"))
        os.chmod(self.root, 0o755)
        self.results: dict[str, Any] = {}
        self.started = dt.datetime.now(dt.UTC)
        OUT_DIR.mkdir(exist_ok=True)
        self.stamp = self.started.strftime("%Y%m%dT%H%M%SZ")
        self.logs: dict[str, str] = {}

    def addr(self, last: int) -> str:
        return f"{self.opts.addr_base}.{last}"

    # ---------------------------------------------------------- throughput

    def _measure_relay(self, label: str, sink: Sink | MaildirCounter, port: int, relay_pid: int | None,
                       queue_count: Callable[[], int] | None,
                       profiler: Callable[[], Callable[[], None]] | None = None, *,
                       load: Load, warm_up: bool = True) -> dict[str, Any]:
        """One measured smtp-source run (after a warm-up batch unless ``warm_up`` is
        False): rates, CPU of the relay's process tree, memory; bounded in time."""
        warm_ok = True
        if warm_up:
            warm = max(20, min(500, load.messages // 20))
            log(f"{label}: warm-up {warm} messages")
            base = sink.count
            warm_run = run_source(self.tools, port, messages=warm, sessions=min(load.sessions, warm),
                                  size=load.size, timeout=120, rcpt=load.rcpt)
            if warm_run.returncode != 0:
                raise BenchError(f"{label}: smtp-source warm-up failed: {warm_run.output}")
            warm_ok = sink.wait_count(base + warm, time.monotonic() + 120, stall=30) is not None
            if not warm_ok:
                log(f"{label}: the warm-up did not arrive ({sink.count - base}/{warm}); measuring acceptance only")
        base = sink.count
        time.sleep(0.5)
        pss0 = tree_pss_bytes(relay_pid) if relay_pid else None
        stop_profiler = profiler() if profiler is not None else None
        cpu0 = tree_cpu_seconds(relay_pid) if relay_pid else None
        busy0 = machine_busy()
        load0 = os.getloadavg()[0]
        n = load.messages
        log(f"{label}: {n} messages, {load.sessions} sessions, {load.size} bytes")
        # Bounded: smtp-source gets at least 120 s (more for big counts and sizes), the
        # counter the same again plus 60 s, and gives up after 60 s without progress.
        budget = max(120.0, n / 20.0 * max(1.0, load.size / 51200))
        t0 = time.monotonic()
        src = run_source(self.tools, port, messages=n, sessions=load.sessions, size=load.size,
                         timeout=budget, rcpt=load.rcpt)
        t_src = time.monotonic()
        cap = t0 + budget + 60
        t_end = sink.wait_count(base + n, cap, stall=60 if warm_ok else 15)
        t_after = time.monotonic()
        cpu1 = tree_cpu_seconds(relay_pid) if relay_pid else None
        if stop_profiler is not None:
            stop_profiler()
        busy1 = machine_busy()
        got = sink.count - base
        r: dict[str, Any] = {
            "label": label, "messages": n, "sessions": load.sessions, "size": load.size,
            "source_seconds": round(src.seconds, 3), "source_rc": src.returncode,
            "accepted_per_s": round(n / src.seconds, 1) if src.returncode == 0 else None,
            "delivered": got, "machine_busy_pct": round(busy_percent(busy0, busy1), 1),
            "loadavg_before": round(load0, 2),
        }
        if src.returncode != 0:
            r["error"] = f"smtp-source exited {src.returncode}: {src.output[-400:]}"
        if t_end is not None:
            r["end_to_end_seconds"] = round(t_end - t0, 3)
            r["end_to_end_per_s"] = round(n / (t_end - t0), 1)
            r["drain_after_source_s"] = round(max(0.0, t_end - t_src), 3)
        else:
            r["end_to_end_per_s"] = None
            r.setdefault("error", f"{got}/{n} messages arrived after {t_after - t0:.0f}s"
                                  + ("" if warm_ok else " (the warm-up never arrived either)"))
            if queue_count is not None:
                r["left_in_queue"] = queue_count()
        if pss0 is not None and relay_pid:
            r["relay_pss_before_mib"] = round(pss0 / 2**20, 1)
            r["relay_pss_mib"] = round(tree_pss_bytes(relay_pid) / 2**20, 1)
            largest, total = tree_peak_rss_bytes(relay_pid)
            r["relay_peak_rss_mib"] = round(largest / 2**20, 1)  # the largest process's high-water mark
            r["relay_peak_rss_sum_mib"] = round(total / 2**20, 1)
        if cpu0 is not None and cpu1 is not None:
            r["relay_cpu_seconds"] = round(cpu1 - cpu0, 2)
            r["cpu_ms_per_msg"] = round(1000 * (cpu1 - cpu0) / n, 3)
        log(f"{label}: accepted {r['accepted_per_s']}/s, end to end {r['end_to_end_per_s']}/s, "
            f"CPU {r.get('cpu_ms_per_msg')} ms/msg" + (f" — {r['error']}" if "error" in r else ""))
        return r

    def _run_ceiling(self, load: Load) -> dict[str, Any]:
        """(a) smtp-source straight into smtp-sink."""
        port = free_port()
        sink = Sink(self.procs, self.tools, port, self.root)
        try:
            r = self._measure_relay("smtp-sink (ceiling)", sink, port, None, None, load=load)
            r["end_to_end_per_s"] = r["accepted_per_s"]
            return r
        finally:
            sink.stop()

    def _run_postfix(self, round_no: int, load: Load) -> dict[str, Any]:
        """(b) a private Postfix instance relaying to smtp-sink."""
        sink_port, pf_port = free_port(), free_port()
        sink = Sink(self.procs, self.tools, sink_port, self.root)
        pf = None
        try:
            pf = PrivatePostfix(self.procs, self.tools, self.root / f"postfix{load.size}-{round_no}", pf_port,
                                sink_port)
            pf.start()
            assert pf.master_pid is not None
            return self._measure_relay("postfix", sink, pf_port, pf.master_pid, pf.queue_count, load=load)
        except BenchError as exc:
            log(f"postfix: {exc}")
            return {"label": "postfix", "error": str(exc)}
        finally:
            if pf is not None:
                self.logs["postfix"] = pf.log_tail(5)
                pf.stop()
            sink.stop()

    def _run_floor(self, load: Load) -> dict[str, Any]:
        """(d) the floor (bench/floor_relay.py): a minimal asyncio relay doing the same
        path — parse, group-commit fsync before ``250``, relay to smtp-sink — as the
        measuring stick for what imsrelay's layers cost."""
        sink_port, port = free_port(), free_port()
        sink = Sink(self.procs, self.tools, sink_port, self.root)
        journal = self.root / f"floor{load.size}.journal"
        relay = None
        try:
            relay = self.procs.start("floor-relay", [sys.executable, str(BENCH_DIR / "floor_relay.py"), "--serve",
                                                     str(port), str(sink_port), str(journal)],
                                     stdout=subprocess.DEVNULL)
            wait_port("127.0.0.1", port, 20, relay)
            return self._measure_relay("floor relay", sink, port, relay.pid, None, load=load)
        except BenchError as exc:
            log(f"floor relay: {exc}")
            return {"label": "floor relay", "error": str(exc)}
        finally:
            if relay is not None:
                self.procs.stop(relay)
            journal.unlink(missing_ok=True)
            sink.stop()

    def _profiling(self, profile: str, tag: str) -> tuple[list[str], Path, int]:
        """(wrapper argv, profile file stem, site workers) for one profiled site: py-spy
        follows every worker (``--subprocesses``); the in-process profilers see only the
        process they start, so they run the site as one process."""
        prof_file = OUT_DIR / f"profile-{self.stamp}-{tag}"
        workers = self.opts.workers
        wrapper: list[str] = []
        if profile == "cprofile":
            wrapper = [sys.executable, "-m", "cProfile", "-o", str(prof_file) + ".pstats"]
        elif profile == "pyinstrument":
            wrapper = [sys.executable, "-m", "pyinstrument", "--async-mode", "disabled", "-r", "text",
                       "--show-all", "-o", str(prof_file) + ".pyinstrument.txt"]
        if wrapper and workers > 1:
            log(f"--profile {profile} profiles one process: the profiled site runs with workers = 1")
            workers = 1
        return wrapper, prof_file, workers

    def _run_imsrelay(self, round_no: int, profile: str, load: Load) -> dict[str, Any]:
        """(c) one imsrelay site relaying to smtp-sink through its E-Mail Domain table."""
        sink_port, site_port = free_port(), free_port()
        sink = Sink(self.procs, self.tools, sink_port, self.root)
        wrapper, prof_file, workers = self._profiling(profile, f"{load.size}")
        spec = SiteSpec("BenchRelay", "127.0.0.1", site_port, "relay.imsrelay-bench.test",
                        "relay.imsrelay-bench.test", mailboxes=["Administrator"],
                        email_domains=[("bench.example", "127.0.0.1", sink_port)], workers=workers)
        site = ImsSite(self.procs, self.root / f"throughput{load.size}-{round_no}", spec, wrapper=wrapper)
        r: dict[str, Any]
        rc = None
        try:
            site.start()
            profiler = None
            if profile in ("py-spy", "py-spy-gil"):
                def profiler() -> Callable[[], None]:
                    return start_py_spy(self.procs, site.pid, Path(str(prof_file) + ".py-spy.txt"),
                                        gil_only=profile == "py-spy-gil", subprocesses=workers > 1)
            r = self._measure_relay("imsrelay", sink, site_port, site.pid, site.queue_count, profiler, load=load)
            if workers != self.opts.workers:
                r["workers"] = workers
        except BenchError as exc:
            r = {"label": "imsrelay", "error": str(exc)}
            log(f"imsrelay: {exc}")
        finally:
            rc = site.stop(timeout=120 if profile != "none" else 30)
            self.logs["imsrelay"] = site.log_tail(5)
            sink.stop()
        if rc not in (0, None):
            r["exit_status"] = rc
        if profile == "cprofile" and Path(str(prof_file) + ".pstats").exists():
            r["profile"] = summarize_cprofile(Path(str(prof_file) + ".pstats"), load.messages)
        elif profile == "pyinstrument":
            r["profile"] = {"file": str(prof_file) + ".pyinstrument.txt"}
        elif profile.startswith("py-spy") and Path(str(prof_file) + ".py-spy.txt").exists():
            r["profile"] = summarize_py_spy(Path(str(prof_file) + ".py-spy.txt"), load.messages, PY_SPY_RATE)
            r["profile"]["mode"] = profile
        return r

    def phase_throughput(self) -> dict[str, Any]:
        o = self.opts
        return {"sizes": [self._throughput_at(Load(n, o.sessions, size))
                          for size, n in throughput_plan(o.sizes, o.messages, o.messages_large,
                                                         QUICK_BIG_BYTES if o.quick else BIG_BYTES)]}

    def _throughput_at(self, load: Load) -> dict[str, Any]:
        o = self.opts
        log(f"--- throughput at {size_label(load.size)}")
        out: dict[str, Any] = {"size": load.size, "messages": load.messages, "sessions": load.sessions,
                               "command": source_command(load.messages, load.sessions, load.size),
                               "rounds": o.rounds}
        out["ceiling"] = self._run_ceiling(load)
        runs: dict[str, list[dict[str, Any]]] = {"postfix": [], "imsrelay": []}
        for i in range(o.rounds):
            if o.rounds > 1:
                log(f"throughput round {i + 1}/{o.rounds}")
            # Alternate the order so neither relay always runs on a warmer (or busier) machine.
            order = ("postfix", "imsrelay") if i % 2 == 0 else ("imsrelay", "postfix")
            for which_relay in order:
                if which_relay == "postfix":
                    runs["postfix"].append(self._run_postfix(i, load))
                else:
                    # Profile only the last round (profilers slow the site down).
                    profile = o.profile if i == o.rounds - 1 else "none"
                    runs["imsrelay"].append(self._run_imsrelay(i, profile, load))
        for key, rs in runs.items():
            out[key] = median_run(rs)
            if o.rounds > 1:
                out[f"{key}_rounds"] = rs
        if "profile" in out["imsrelay"]:
            out["profile"] = out["imsrelay"].pop("profile")
        elif o.profile == "none" and load.size == PROFILED_SIZE and find_py_spy() is not None:
            # where a big message's time goes (issue 28): a separate, profiled run, not in the figures
            few = Load(min(load.messages, PROFILED_MESSAGES), load.sessions, load.size, load.rcpt)
            profiled = self._run_imsrelay(o.rounds, "py-spy-gil", few)
            if "profile" in profiled:
                out["profile"] = profiled["profile"] | {"separate_run": few.messages}
        if load.size <= FLOOR_MAX_SIZE:
            out["floor"] = self._run_floor(load)
        for r in runs["imsrelay"]:
            if "exit_status" in r:
                out.setdefault("notes", []).append(f"an imsrelay site exited with status {r['exit_status']}")
        out["ratio_imsrelay_over_postfix"] = paired_ratios(runs["postfix"], runs["imsrelay"])
        return out

    # ---------------------------------------------------------- local delivery

    def phase_local(self) -> dict[str, Any]:
        """smtp-source into a site whose recipient is its own mailbox (Maildir) vs a
        private Postfix delivering into Maildir with virtual(8); completion = files in
        the Maildirs' new/."""
        o = self.opts
        out: dict[str, Any] = {"messages": o.local_messages, "sessions": o.sessions, "size": 4096,
                               "command": source_command(o.local_messages, o.sessions, 4096, f"User1@{LOCAL_DOMAIN}")}
        runs: dict[str, list[dict[str, Any]]] = {"postfix": [], "imsrelay": []}
        for i in range(o.rounds):
            order = ("postfix", "imsrelay") if i % 2 == 0 else ("imsrelay", "postfix")
            for which_relay in order:
                run = self._local_postfix if which_relay == "postfix" else self._local_imsrelay
                runs[which_relay].append(run(i))
        for key, rs in runs.items():
            out[key] = median_run(rs)
            if o.rounds > 1:
                out[f"{key}_rounds"] = rs
        out["ratio_imsrelay_over_postfix"] = paired_ratios(runs["postfix"], runs["imsrelay"])
        return out

    def _local_postfix(self, round_no: int) -> dict[str, Any]:
        import pwd

        o = self.opts
        root = self.root / f"local-postfix{round_no}"
        root.mkdir(parents=True, exist_ok=True)
        nobody = pwd.getpwnam("nobody")
        vmail = root / "vmail"
        vmail.mkdir(exist_ok=True)
        os.chmod(vmail, 0o755)
        new_dir = make_maildir(vmail / LOCAL_DOMAIN / "user1", nobody.pw_uid, nobody.pw_gid)
        extra = virtual_maildir_settings(root, LOCAL_DOMAIN, ["user1"], nobody.pw_uid, nobody.pw_gid)
        counter = MaildirCounter(new_dir)
        pf = None
        try:
            pf = PrivatePostfix(self.procs, self.tools, root, free_port(), 9, extra=extra)
            pf.start()
            assert pf.master_pid is not None
            return self._measure_relay("postfix virtual(8)", counter, pf.port, pf.master_pid, pf.queue_count,
                                       load=Load(o.local_messages, o.sessions, 4096, f"user1@{LOCAL_DOMAIN}"))
        except BenchError as exc:
            log(f"postfix virtual(8): {exc}")
            return {"label": "postfix virtual(8)", "error": str(exc)}
        finally:
            counter.stop()
            if pf is not None:
                self.logs["local-postfix"] = pf.log_tail(5)
                pf.stop()

    def _local_imsrelay(self, round_no: int) -> dict[str, Any]:
        o = self.opts
        spec = SiteSpec("BenchLocal", "127.0.0.1", free_port(), LOCAL_DOMAIN, LOCAL_DOMAIN,
                        mailboxes=["Administrator", "User1"], workers=o.workers)
        site = ImsSite(self.procs, self.root / f"local-imsrelay{round_no}", spec)
        counter = MaildirCounter(make_maildir(site.maildir_new("User1").parent))
        try:
            site.start()
            return self._measure_relay("imsrelay Maildir", counter, spec.port, site.pid, site.queue_count,
                                       load=Load(o.local_messages, o.sessions, 4096, f"User1@{LOCAL_DOMAIN}"))
        except BenchError as exc:
            log(f"imsrelay Maildir: {exc}")
            return {"label": "imsrelay Maildir", "error": str(exc)}
        finally:
            counter.stop()
            site.stop()
            self.logs["local-imsrelay"] = site.log_tail(5)

    # ---------------------------------------------------------- servers (issue 24)

    def phase_servers(self) -> dict[str, Any]:
        """SiteA as one server and as two (ServerA, Server1) on the same load: 4 KB messages
        to User1 and User2, given to every server in equal parts (equal-preference MX);
        with two servers User2 is homed on Server1, so half the mail takes an intra-site
        hop.  Then the latency of one message at a time given to the server its mailbox
        is not homed on (the intra-site hop) against one given to its home server."""
        o = self.opts
        out: dict[str, Any] = {"messages": o.local_messages, "sessions": o.sessions, "size": 4096}
        for count in (1, 2):
            try:
                out[f"servers_{count}"] = self._servers_run(count)
            except BenchError as exc:
                out[f"servers_{count}"] = {"error": str(exc)}
                log(f"servers {count}: {exc}")
        one, two = out["servers_1"], out["servers_2"]
        if one.get("end_to_end_per_s") and two.get("end_to_end_per_s"):
            out["ratio_two_over_one"] = round(two["end_to_end_per_s"] / one["end_to_end_per_s"], 2)
        if one.get("direct", {}).get("p50_ms") is not None and two.get("hop", {}).get("p50_ms") is not None:
            out["hop_adds_p50_ms"] = round(two["hop"]["p50_ms"] - one["direct"]["p50_ms"], 1)
        return out

    def _servers_run(self, count: int) -> dict[str, Any]:
        o = self.opts
        names = ["ServerA", "Server1"][:count]
        listen = {n: self.addr(30 + i) for i, n in enumerate(names)}
        ports = {n: free_port(listen[n]) for n in names}
        admin = {n: free_port(listen[n]) for n in names}
        servers = [{"name": n, "host": listen[n], "port": ports[n], "admin": f"http://{listen[n]}:{admin[n]}"}
                   for n in names] if count > 1 else []
        homes = {"User1": "ServerA", "User2": names[-1]} if count > 1 else {}
        domain = "SiteA.bench.test"
        sites = {}
        for n in names:
            spec = SiteSpec("SiteA", listen[n], ports[n], domain, "bench.test", mailboxes=["User1", "User2"],
                            admin_port=admin[n], server=n, servers=servers, homes=homes, workers=1)
            sites[n] = ImsSite(self.procs, self.root / f"servers{count}" / n, spec)
        home = {"User1": sites["ServerA"], "User2": sites[names[-1]]}
        counters = {a: MaildirCounter(make_maildir(site.maildir_new(a).parent)) for a, site in home.items()}
        runs = [(site, alias) for site in sites.values() for alias in ("User1", "User2")]
        per = max(1, o.local_messages // len(runs))
        total = per * len(runs)
        try:
            for site in sites.values():
                site.start()
            self._servers_load(runs, counters, max(5, per // 20), label=f"{count} server(s) warm-up")
            time.sleep(0.5)
            cpu0 = sum(tree_cpu_seconds(site.pid) for site in sites.values())
            r = self._servers_load(runs, counters, per, label=f"{count} server(s)")
            cpu1 = sum(tree_cpu_seconds(site.pid) for site in sites.values())
            r["cpu_ms_per_message"] = round((cpu1 - cpu0) * 1000 / total, 3)
            r["servers"] = count
            run_id = f"{os.getpid()}x{int(time.time())}s{count}"
            watcher = MaildirWatcher(home["User1"].maildir_new("User1"))
            try:  # one message at a time to User1 (homed on ServerA): given to ServerA, and to Server1
                r["direct"] = asyncio.run(self._light(sites["ServerA"], f"User1@{domain}", watcher, run_id + "d"))
                if count > 1:
                    r["hop"] = asyncio.run(self._light(sites["Server1"], f"User1@{domain}", watcher, run_id + "h"))
            finally:
                watcher.close()
            return r
        finally:
            for c in counters.values():
                c.stop()
            for n, site in sites.items():
                site.stop()
                self.logs[f"servers{count}-{n}"] = site.log_tail(5)

    def _servers_load(self, runs: list[tuple[ImsSite, str]], counters: dict[str, MaildirCounter], per: int, *,
                      label: str) -> dict[str, Any]:
        """``per`` messages for each (server, mailbox) at once (one smtp-source each); bounded."""
        o = self.opts
        sessions = max(1, o.sessions // len(runs))
        base = {a: c.count for a, c in counters.items()}
        want = {a: base[a] + per * sum(1 for _, x in runs if x == a) for a in counters}
        budget = max(120.0, per * len(runs) / 20.0)
        log(f"{label}: {per * len(runs)} messages over {len(runs)} smtp-source runs")
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
            done = list(pool.map(lambda run: run_source(
                self.tools, run[0].spec.port, host=run[0].spec.listen, messages=per, sessions=sessions, size=4096,
                timeout=budget, rcpt=f"{run[1]}@{run[0].spec.domain}"), runs))
        t_src = time.monotonic()
        bad = [d.output for d in done if d.returncode != 0]
        if bad:
            raise BenchError(f"{label}: smtp-source failed: {bad[0][-300:]}")
        ends = [counters[a].wait_count(want[a], t0 + budget + 60, stall=60) for a in counters]
        if any(e is None for e in ends):
            got = {a: counters[a].count - base[a] for a in counters}
            raise BenchError(f"{label}: not every message arrived: {got}")
        t_end = max(e for e in ends if e is not None)
        n = per * len(runs)
        return {"messages": n, "accepted_per_s": round(n / (t_src - t0), 1),
                "end_to_end_per_s": round(n / (t_end - t0), 1)}

    # ---------------------------------------------------------- latency

    def _two_sites(self, root: Path, names: Sequence[str], *, replication: bool = False,
                   mailboxes: dict[str, list[str]] | None = None) -> list[ImsSite]:
        ports = {n: free_port() for n in names}
        listen = {n: self.addr(11 + i) for i, n in enumerate(names)}
        domains = {n: f"{n}.bench.test" for n in names}
        sites = []
        for n in names:
            others = [m for m in names if m != n]
            spec = SiteSpec(
                n, listen[n], ports[n], domains[n], "bench.test",
                mailboxes=(mailboxes or {}).get(n, [f"User{n[-1]}"]),
                email_domains=[(domains[m], listen[m], ports[m]) for m in others],
                connected=[(m, domains[m]) for m in others],
                replication_peers=others if replication else [],
                admin_port=free_port(listen[n]) if replication else 0)
            sites.append(ImsSite(self.procs, root, spec))
        return sites

    def phase_latency(self) -> dict[str, Any]:
        site_a, site_b = self._two_sites(self.root / "latency", ["SiteA", "SiteB"])
        rcpt = f"UserB@{site_b.spec.domain}"
        new_dir = site_b.maildir_new("UserB")
        for sub in ("tmp", "new", "cur"):
            (new_dir.parent / sub).mkdir(parents=True, exist_ok=True)
        out: dict[str, Any] = {"recipient": rcpt, "path": "client → SiteA (E-Mail Domain table) → SiteB → Maildir"}
        watcher = MaildirWatcher(new_dir)
        try:
            site_b.start()
            site_a.start()
            run_id = f"{os.getpid()}x{int(time.time())}"
            out["light"] = asyncio.run(self._light(site_a, rcpt, watcher, run_id))
            out["heavy"] = asyncio.run(self._heavy(site_a, rcpt, watcher, run_id))
            out["unmatched_files"] = watcher.unmatched
        except BenchError as exc:
            out["error"] = str(exc)
            log(f"latency: {exc}")
        finally:
            watcher.close()
            for s in (site_a, site_b):
                s.stop()
                self.logs[f"latency-{s.spec.name}"] = s.log_tail(5)
        return out

    async def _light(self, site_a: ImsSite, rcpt: str, watcher: MaildirWatcher, run_id: str) -> dict[str, Any]:
        o = self.opts
        sender = f"bench@{site_a.spec.domain}"
        smtp = await MiniSmtp.connect(site_a.spec.listen, site_a.spec.port)
        lat: list[float] = []
        lost = 0
        # warm-up: 5 messages, not counted
        log(f"latency light: warm-up, then {o.light} messages one at a time")
        deadline = time.monotonic() + max(60.0, o.light * 1.0)
        try:
            for i in range(-5, o.light):
                if time.monotonic() > deadline:
                    raise BenchError(f"light load: over {deadline:.0f}s budget after {len(lat)} messages")
                bid = f"{run_id}-L{i}"
                await smtp.send(sender, rcpt, bench_message(sender, rcpt, bid))
                t250 = time.monotonic()
                t_file = await asyncio.to_thread(watcher.wait_for, bid, 15.0)
                if t_file is None:
                    lost += 1
                    if lost > 3:
                        raise BenchError(f"light load: {lost} messages did not reach SiteB's Maildir within 15s")
                    continue
                if i >= 0:
                    lat.append(t_file - t250)
        finally:
            await smtp.quit()
        r = summarize_ms(lat)
        r["lost"] = lost
        log(f"latency light: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms (n={r['n']})")
        return r

    async def _heavy(self, site_a: ImsSite, rcpt: str, watcher: MaildirWatcher, run_id: str) -> dict[str, Any]:
        o = self.opts
        sender = f"bench@{site_a.spec.domain}"
        per = max(1, o.heavy // o.heavy_senders)
        sent: dict[str, float] = {}
        accept_waits: list[float] = []
        deferred = {"n": 0}
        errors: list[str] = []
        log(f"latency heavy: {o.heavy_senders} concurrent senders x {per} messages")

        async def one_sender(k: int) -> None:
            try:
                smtp = await MiniSmtp.connect(site_a.spec.listen, site_a.spec.port)
            except Exception as exc:
                errors.append(f"sender {k}: {exc!r}")
                return
            try:
                for i in range(per):
                    bid = f"{run_id}-H{k}-{i}"
                    body = bench_message(sender, rcpt, bid)
                    # A 4xx is the site pushing back: count it, wait a little, send again
                    # (bounded by the phase's time budget below).
                    while True:
                        code, waited = await smtp.try_send(sender, rcpt, body)
                        if code == 250:
                            break
                        deferred["n"] += 1
                        await asyncio.sleep(0.05)
                    sent[bid] = time.monotonic()
                    accept_waits.append(waited)
            except Exception as exc:
                errors.append(f"sender {k}: {exc!r}")
            finally:
                await smtp.quit()

        busy0 = machine_busy()
        t0 = time.monotonic()
        budget = max(120.0, o.heavy / 10.0)
        try:
            await asyncio.wait_for(asyncio.gather(*(one_sender(k) for k in range(o.heavy_senders))), budget)
        except TimeoutError:
            errors.append(f"the senders were stopped after the {budget:.0f} s budget")
        t_sent = time.monotonic()
        ids = list(sent)
        got = await asyncio.to_thread(watcher.wait_all, ids, max(30.0, budget - (t_sent - t0)))
        t_done = time.monotonic()
        lat = [watcher.arrived[i] - sent[i] for i in ids if i in watcher.arrived]
        r: dict[str, Any] = dict(summarize_ms(lat))
        last = max((watcher.arrived[i] for i in ids if i in watcher.arrived), default=t_done)
        waits = summarize_ms(accept_waits)
        r.update({"accept_p50_ms": waits["p50_ms"], "accept_p99_ms": waits["p99_ms"],
                  "deferred_4xx": deferred["n"]})
        r.update({"senders": o.heavy_senders, "sent": len(ids), "delivered": got, "errors": errors[:5],
                  "accepted_per_s": round(len(ids) / (t_sent - t0), 1),
                  "delivered_per_s": round(got / (last - t0), 1) if got else 0.0,
                  "machine_busy_pct": round(busy_percent(busy0, machine_busy()), 1)})
        log(f"latency heavy: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms (n={r['n']}, "
            f"{r['accepted_per_s']}/s accepted, {deferred['n']} deferred with 4xx)")
        return r

    # ---------------------------------------------------------- replication

    def phase_replication(self) -> dict[str, Any]:
        available, why = replication_available()
        if not available:
            log(f"replication: skipped: {why}")
            return {"skipped": f"replication not available ({why})"}
        o = self.opts
        names = ["SiteA", "SiteB", "SiteC"]
        sites = self._two_sites(self.root / "replication", names, replication=True,
                                mailboxes={n: [f"User{n[-1]}"] for n in names})
        by_name = {s.spec.name: s for s in sites}
        out: dict[str, Any] = {"mailboxes": o.mailboxes}
        try:
            for s in sites:
                s.start()
            # Initial full replication so that what is timed is only the new mailboxes.
            log("replication: initial sync (Request Now at SiteB and SiteC from SiteA)")
            base = {n: count_mailboxes(by_name[n], "SiteA") for n in names}
            for n in ("SiteB", "SiteC"):
                request_now(by_name[n], "SiteA")
            for n in ("SiteB", "SiteC"):
                if wait_mailboxes(by_name[n], "SiteA", base["SiteA"], 120) is None:
                    raise BenchError(f"initial replication SiteA → {n} did not finish within 120s: "
                                     f"{count_mailboxes(by_name[n], 'SiteA')}/{base['SiteA']}")
            log(f"replication: adding {o.mailboxes} mailboxes at SiteA")
            t_add = time.monotonic()
            add_mailboxes(by_name["SiteA"], o.mailboxes)
            out["add_seconds"] = round(time.monotonic() - t_add, 2)
            want = base["SiteA"] + o.mailboxes
            if count_mailboxes(by_name["SiteA"], "SiteA") != want:
                raise BenchError(f"SiteA has {count_mailboxes(by_name['SiteA'], 'SiteA')} mailboxes, expected {want}")
            before = {n: count_mailboxes(by_name[n], "SiteA") for n in ("SiteB", "SiteC")}
            out["known_before_request"] = before
            if any(v >= want for v in before.values()):
                raise BenchError(f"the new mailboxes were already known before Request Now: {before}")
            cpu0 = {n: tree_cpu_seconds(by_name[n].pid) for n in names}
            t0 = time.monotonic()
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:  # Request Now at both sites at once
                cli = dict(zip(("SiteB", "SiteC"), pool.map(
                    lambda n: (request_now(by_name[n], "SiteA"), time.monotonic() - t0), ("SiteB", "SiteC")),
                    strict=True))
            out["request_now_cli_seconds"] = {n: round(v[1], 2) for n, v in cli.items()}
            out["request_now_output"] = {n: v[0] for n, v in cli.items()}
            budget = max(120.0, o.mailboxes / 500)  # 200 s for 100,000 (the target is 30 s)
            for n in ("SiteB", "SiteC"):
                t = wait_mailboxes(by_name[n], "SiteA", want, budget - (time.monotonic() - t0))
                if t is None:
                    out[n] = {"error": f"knew {count_mailboxes(by_name[n], 'SiteA')}/{want} after {budget:.0f}s"}
                else:
                    out[n] = {"seconds": round(t - t0, 2)}
            out["cpu_seconds"] = {n: round(tree_cpu_seconds(by_name[n].pid) - cpu0[n], 2) for n in names}
            times = [out[n].get("seconds") for n in ("SiteB", "SiteC")]
            out["seconds"] = max(times) if all(t is not None for t in times) else None
            log(f"replication: {out}")
        except BenchError as exc:
            out["error"] = str(exc)
            log(f"replication: {exc}")
        finally:
            for s in sites:
                s.stop()
                self.logs[f"replication-{s.spec.name}"] = s.log_tail(5)
        return out

    # ---------------------------------------------------------- concurrency

    def phase_concurrency(self) -> dict[str, Any]:
        o = self.opts
        limit = raise_fd_limit(max(65536, o.idle_sessions * 4))
        spec = SiteSpec("IdleSite", self.addr(30), free_port(self.addr(30)), "idle.bench.test", "idle.bench.test",
                        mailboxes=["User1"])
        site = ImsSite(self.procs, self.root / "concurrency", spec)
        out: dict[str, Any] = {"sessions": o.idle_sessions, "fd_limit": limit}
        try:
            site.start()
            out.update(asyncio.run(self._hold_sessions(site)))
        except BenchError as exc:
            out["error"] = str(exc)
            log(f"concurrency: {exc}")
        finally:
            site.stop()
            self.logs["concurrency"] = site.log_tail(5)
        return out

    async def _hold_sessions(self, site: ImsSite) -> dict[str, Any]:
        o = self.opts
        host, port = site.spec.listen, site.spec.port
        # Warm the site up (lazy imports, first-session allocations), then measure.
        warm = [await MiniSmtp.connect(host, port) for _ in range(10)]
        for s in warm:
            await s.quit()
        await asyncio.sleep(1.0)
        rss0 = process_rss_bytes(site.pid)
        gate = asyncio.Semaphore(100)
        errors: list[str] = []

        async def open_one() -> MiniSmtp | None:
            async with gate:
                try:
                    return await MiniSmtp.connect(host, port, timeout=60)
                except Exception as exc:
                    errors.append(repr(exc))
                    return None

        log(f"concurrency: opening {o.idle_sessions} sessions (EHLO, then idle)")
        t0 = time.monotonic()
        sessions: list[MiniSmtp] = []
        steps = []
        for want in session_steps(o.idle_sessions):
            opened = await asyncio.wait_for(asyncio.gather(*(open_one() for _ in range(want - len(sessions)))),
                                            max(60.0, want / 20))
            sessions += [s for s in opened if s is not None]
            await asyncio.sleep(0.3)
            rss = process_rss_bytes(site.pid)
            steps.append({"sessions": len(sessions), "rss_mib": round(rss / 2**20, 1),
                          "kib_per_session": round((rss - rss0) / max(1, len(sessions)) / 1024, 1)})
        t_open = time.monotonic() - t0
        await asyncio.sleep(3.0)  # held idle
        rss1 = process_rss_bytes(site.pid)

        async def still_alive(s: MiniSmtp) -> bool:
            async with gate:
                try:
                    await s.command("NOOP", 250, 30)
                    return True
                except Exception:
                    return False

        alive = sum(await asyncio.wait_for(asyncio.gather(*(still_alive(s) for s in sessions)), 300))
        rss2 = process_rss_bytes(site.pid)
        await asyncio.wait_for(asyncio.gather(*(s.quit() for s in sessions)), 120)
        per = (rss1 - rss0) / max(1, len(sessions))
        r = {"opened": len(sessions), "alive_after_hold": alive, "open_seconds": round(t_open, 2),
             "rss_before_mib": round(rss0 / 2**20, 1), "rss_held_mib": round(rss1 / 2**20, 1),
             "rss_after_noop_mib": round(rss2 / 2**20, 1), "kib_per_session": round(per / 1024, 1),
             "errors": errors[:5], "steps": steps}
        log(f"concurrency: {len(sessions)} open, {alive} alive, {r['kib_per_session']} KiB/session")
        return r

    # ---------------------------------------------------------- scale

    def phase_scale(self) -> dict[str, Any]:
        """Throughput and CPU/msg at 1-500 sessions and 1 KB-1 MB (one warmed site),
        then restarts with a full queue (replay time, memory)."""
        o = self.opts
        plan = scale_plan(o.quick, o.scale_queue)
        out: dict[str, Any] = {"plan": asdict(plan), "workers": o.workers}
        out.update(self._scale_loads(plan))
        out["restart"] = self._scale_restart(plan)
        return out

    def _scale_loads(self, plan: ScalePlan) -> dict[str, Any]:
        o = self.opts
        sink_port, site_port = free_port(), free_port()
        sink = Sink(self.procs, self.tools, sink_port, self.root)
        spec = SiteSpec("ScaleRelay", "127.0.0.1", site_port, "scale.imsrelay-bench.test",
                        "scale.imsrelay-bench.test", mailboxes=["Administrator"],
                        email_domains=[("bench.example", "127.0.0.1", sink_port)], workers=o.workers,
                        smtp={"max_message_size": 4 << 20})
        site = ImsSite(self.procs, self.root / "scale-loads", spec)
        out: dict[str, Any] = {"sessions": [], "sizes": []}
        try:
            site.start()
            points = [("sessions", p) for p in plan.sessions] + [("sizes", p) for p in plan.sizes]
            for i, (kind, point) in enumerate(points):
                label = f"scale {point.sessions} sessions × {size_label(point.size)}"
                try:
                    r = self._measure_relay(label, sink, site_port, site.pid, site.queue_count,
                                            load=Load(point.messages, point.sessions, point.size), warm_up=i == 0)
                except BenchError as exc:
                    r = {"label": label, "sessions": point.sessions, "size": point.size,
                         "messages": point.messages, "error": str(exc)}
                out[kind].append(r)
        except BenchError as exc:
            out["error"] = str(exc)
            log(f"scale: {exc}")
        finally:
            site.stop()
            self.logs["scale-loads"] = site.log_tail(5)
            sink.stop()
        return out

    def _scale_restart(self, plan: ScalePlan) -> list[dict[str, Any]]:
        """Fill a held queue (Transfer mode ``inbound``: outbound SMTP held; the domain's
        host is a closed loopback port besides) to each depth, restart, time /ready."""
        o = self.opts
        listen = "127.0.0.1"
        spec = SiteSpec("ScaleQueue", listen, free_port(), "queue.imsrelay-bench.test", "queue.imsrelay-bench.test",
                        mailboxes=["Administrator"], email_domains=[(HELD_DOMAIN, listen, free_port())],
                        admin_port=free_port(), workers=o.workers, transfer={"mode": "inbound"})
        site = ImsSite(self.procs, self.root / "scale-restart", spec)
        out: list[dict[str, Any]] = []
        try:
            site.start()
            wait_ready(site, time.monotonic() + 60)
            queued = 0
            for depth in plan.restart_queued:
                n = depth - queued
                log(f"scale restart: queueing {n} more messages (held) → {depth}")
                src = run_source(self.tools, spec.port, messages=n, sessions=20, size=4096,
                                 timeout=max(120.0, n / 50), rcpt=f"user@{HELD_DOMAIN}")
                if src.returncode != 0:
                    out.append({"queued": depth, "error": f"smtp-source exited {src.returncode}: {src.output[-300:]}"})
                    break
                queued = depth
                r = self._restart(site, depth)
                out.append(r)
                if r.get("error"):
                    break
        except BenchError as exc:
            out.append({"queued": 0, "error": str(exc)})
            log(f"scale restart: {exc}")
        finally:
            site.stop(timeout=120)
            self.logs["scale-restart"] = site.log_tail(5)
        return out

    def _restart(self, site: ImsSite, depth: int) -> dict[str, Any]:
        r: dict[str, Any] = {"queued": depth, "queue_before": admin_queue_size(site)}
        r["pss_before_mib"] = round(tree_pss_bytes(site.pid) / 2**20, 1)
        t = time.monotonic()
        rc = site.stop(timeout=120)
        r["stop_seconds"] = round(time.monotonic() - t, 2)
        if rc not in (0, None):
            r["exit_status"] = rc
        t0 = time.monotonic()
        budget = max(120.0, depth / 500)
        site.start(timeout=budget)
        r["listening_seconds"] = round(time.monotonic() - t0, 2)
        t_ready = wait_ready(site, t0 + budget)
        if t_ready is None:
            r["error"] = f"/ready did not say 200 within {budget:.0f} s"
            return r
        r["ready_seconds"] = round(t_ready - t0, 2)
        r["queue_after"] = admin_queue_size(site)
        r["rss_mib"] = round(tree_rss_bytes(site.pid) / 2**20, 1)
        pss = tree_pss_bytes(site.pid)
        r["pss_mib"] = round(pss / 2**20, 1)
        if r["queue_after"] != r["queue_before"]:
            r["error"] = f"the queue held {r['queue_before']} before the restart and {r['queue_after']} after"
        log(f"scale restart at {depth} queued: /ready after {r['ready_seconds']} s, PSS {r['pss_mib']} MiB, "
            f"queue {r['queue_after']}")
        return r

    # ---------------------------------------------------------- driver

    def run(self) -> dict[str, Any]:
        machine = machine_info(self.tools)
        self.results = {"machine": machine, "started": self.started.isoformat(timespec="seconds"),
                        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.opts).items()},
                        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]), "phases": {},
                        "code_at_start": code_fingerprint()}
        phases = {"throughput": self.phase_throughput, "local": self.phase_local, "latency": self.phase_latency,
                  "replication": self.phase_replication, "concurrency": self.phase_concurrency,
                  "scale": self.phase_scale, "servers": self.phase_servers}
        try:
            for name in self.opts.phases:
                log(f"=== {name}")
                t0 = time.monotonic()
                try:
                    self.results["phases"][name] = phases[name]()
                except BenchError as exc:
                    self.results["phases"][name] = {"error": str(exc)}
                    log(f"{name}: {exc}")
                self.results["phases"][name]["phase_seconds"] = round(time.monotonic() - t0, 1)
        finally:
            self.procs.stop_all()
            self.results["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            self.results["code_at_end"] = code_fingerprint()
            self.results["logs"] = self.logs
            if not self.opts.keep:
                shutil.rmtree(self.root, ignore_errors=True)
            else:
                self.results["workdir"] = str(self.root)
        return self.results


# ============================================================== replication API


def _imsrelay(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imsrelay", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))


def replication_available() -> tuple[bool, str]:
    import importlib

    for module in ("imsrelay.directory.replication", "imsrelay.admin.server"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return False, f"{module} cannot be imported: {exc}"
    cp = _imsrelay("replicate", "request-now", "--help", timeout=60)
    if cp.returncode != 0:
        return False, "no `imsrelay replicate request-now` command"
    return True, ""


def request_now(site: ImsSite, source: str) -> str:
    """``imsrelay replicate request-now --site SOURCE --config SITE.toml`` (the admin endpoint)."""
    cp = _imsrelay("replicate", "request-now", "--site", source, "--config", str(site.config))
    if cp.returncode != 0:
        raise BenchError(f"request-now at {site.spec.name} from {source}: {(cp.stderr or cp.stdout).strip()}")
    return cp.stdout.strip()


def add_mailboxes(site: ImsSite, n: int, *, workers: int = 8) -> None:
    """N new mailboxes through the running site's admin endpoint (what ``imsrelay
    directory add`` does, without starting a Python process per mailbox)."""
    from concurrent.futures import ThreadPoolExecutor

    from imsrelay.admin.client import AdminClient
    from imsrelay.config.loader import load_config

    config = load_config(site.config)
    clients = threading.local()

    def add(i: int) -> None:
        client = getattr(clients, "c", None)
        if client is None:
            client = clients.c = AdminClient.for_config(config, timeout=60)
        client.call("POST", "/directory/mailboxes", {"alias": f"bench{i:05d}", "display_name": f"Bench Mailbox {i}"})

    with ThreadPoolExecutor(workers) as pool:
        for fut in [pool.submit(add, i) for i in range(n)]:
            try:
                fut.result()
            except Exception as exc:
                raise BenchError(f"adding mailboxes at {site.spec.name}: {exc}") from None


def count_mailboxes(site: ImsSite, home: str) -> int:
    db = site.data / "directory.sqlite3"
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT count(*) FROM objects WHERE kind='mailbox' AND home_site=? AND deleted=0",
                           (home,)).fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        con.close()


def admin_queue_size(site: ImsSite) -> int | None:
    """Messages in the site's queue (every worker's), from ``GET /status``."""
    from imsrelay.admin.client import AdminClient
    from imsrelay.config.loader import load_config

    try:
        status = AdminClient.for_config(load_config(site.config), timeout=60).call("GET", "/status")
        return int(status["queue"]["messages"])
    except Exception as exc:
        log(f"{site.spec.name}: GET /status: {exc!r}")
        return None


def wait_ready(site: ImsSite, deadline: float) -> float | None:
    """Monotonic time when the site's ``GET /ready`` first answers 200 (polled every
    50 ms; no token needed), or None at the deadline or when the site exits."""
    import urllib.error
    import urllib.request

    url = f"http://{site.spec.listen}:{site.spec.admin_port}/ready"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    while time.monotonic() < deadline:
        if site.proc is None or site.proc.poll() is not None:
            return None
        with contextlib.suppress(urllib.error.URLError, OSError):
            with opener.open(url, timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic()
        time.sleep(0.05)
    return None


def wait_mailboxes(site: ImsSite, home: str, want: int, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while True:
        if count_mailboxes(site, home) >= want:
            return time.monotonic()
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


# ============================================================== profile summary

PY_SPY_RATE = 200  # samples/s


def find_py_spy(path_lookup: Callable[[str], str | None] = shutil.which,
                prefixes: Sequence[str] = (sys.prefix, str(Path(sys.executable).parent.parent))) -> str | None:
    """py-spy on PATH, else the one installed in this virtualenv (``sys.prefix/bin``,
    also when ``.venv/bin`` is not on PATH: ``./dev bench`` runs ``.venv/bin/python``)."""
    found = path_lookup("py-spy")
    if found:
        return found
    for prefix in prefixes:
        exe = Path(prefix) / "bin" / "py-spy"
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    return None


def py_spy_argv(exe: str, pid: int, out: Path, *, gil_only: bool, subprocesses: bool) -> list[str]:
    """``py-spy record`` of the site: with workers, ``--subprocesses`` (the pid is the
    supervisor, which relays nothing itself; its workers are its children)."""
    argv = [exe, "record", "--pid", str(pid), "--rate", str(PY_SPY_RATE), "--threads", "--nonblocking",
            "--format", "raw", "--output", str(out)]
    if subprocesses:
        argv.append("--subprocesses")
    if gil_only:
        argv.append("--gil")
    return argv


def start_py_spy(procs: Processes, pid: int, out: Path, *, gil_only: bool = False,
                 subprocesses: bool = False) -> Callable[[], None]:
    """Sample the site until the returned function is called: every thread that is not
    idle (a thread waiting in fsync counts as busy), or with ``gil_only`` only the
    thread holding the GIL (Python CPU time); ``subprocesses`` follows the workers."""
    exe = find_py_spy()
    if exe is None:
        raise BenchError("--profile py-spy needs py-spy (./dev bench installs it: the `bench` extra)")
    proc = procs.start("py-spy", py_spy_argv(exe, pid, out, gil_only=gil_only, subprocesses=subprocesses),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attach

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        procs.procs = [(n, p) for n, p in procs.procs if p is not proc]

    return stop


def _frame_name(frame: str) -> str:
    """'handle_DATA (imsrelay/ingress/adapter.py:158)' → 'smtpd.py:handle_DATA'."""
    m = re.match(r"(.*) \((.*?):\d+\)$", frame.strip())
    if not m:
        return frame.strip()
    func, path = m.groups()
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if "site-packages" in path or "imsrelay" in path else Path(path).name
    return f"{short}:{func}"


_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("spool writer thread (write + fsync + rename)", ("_apply_batch", "GroupCommitter._run")),
    ("ingress: new connection (aiosmtpd SMTP.__init__, connection_made)",
     ("server_factory.<locals>.factory", "SMTP.__init__", "connection_made")),
    ("ingress: imsrelay handlers (handle_MAIL/RCPT/DATA, policy, spool.enqueue)",
     ("SiteHandler.handle_", "ingress/handler.py", "Site.accept", "Spool.enqueue", "queue/door.py")),
    ("ingress: aiosmtpd session (command parsing, replies)",
     ("aiosmtpd/smtp.py", "SMTP.push", "SMTP._handle_client", "ingress/adapter.py")),
    ("delivery: outbound SMTP (imsrelay transport + aiosmtplib)",
     ("transport/smtp.py", "transport/pipelining.py", "transport/smtp_body.py", "transport/costed.py",
      "aiosmtplib/", "protocol.py:SMTPProtocol")),
    ("delivery: queue manager (routing, spool state, records)", ("queue/manager.py", "queue/rules.py", "routing/")),
    ("directory (SQLite thread)", ("directory/store.py",)),
)


def _stage(names: list[str], thread: str) -> str:
    """Which part of the relay a sample belongs to (first match, outermost frame first)."""
    for label, keys in _STAGES:
        for name in names:
            if any(k in name for k in keys):
                return label
    if names and names[-1] == "runners.py:Runner.run":
        return "event loop itself (uvloop: sockets, epoll, callbacks in C)"
    if "MainThread" not in thread:
        return f"other thread ({thread.split(':')[-1].strip()})"
    return "other (asyncio plumbing, partial stacks)"


def summarize_py_spy(path: Path, messages: int, rate: int, top: int = 25) -> dict[str, Any]:
    """Self and inclusive on-CPU time per function (µs per relayed message), by thread."""
    self_s: dict[str, int] = {}
    incl: dict[str, int] = {}
    threads: dict[str, int] = {}
    entries: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        frames = stack.split(";")
        total += n
        # raw lines: [process PID:"cmd";]thread (0x…):"name";frame;… — with --subprocesses
        # every worker's threads come under their process.
        thread = next((f for f in frames if f.startswith("thread")), frames[0] if frames[0].startswith("process") else "?")
        threads[thread] = threads.get(thread, 0) + n
        names = [_frame_name(f) for f in frames if not f.startswith(("thread", "process"))]
        if names:
            self_s[names[-1]] = self_s.get(names[-1], 0) + n
        entry = _stage(names, thread)
        entries[entry] = entries.get(entry, 0) + n
        for name in set(names):
            incl[name] = incl.get(name, 0) + n
    per_msg = 1e6 / rate / max(1, messages)

    def rows(d: dict[str, int]) -> list[dict[str, Any]]:
        return [{"function": k, "samples": v, "pct": round(100 * v / max(1, total), 1),
                 "us_per_msg": round(v * per_msg, 1)} for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    summary = {"raw": str(path), "rate_hz": rate, "samples": total,
               "cpu_us_per_msg": round(total * per_msg, 1),
               "threads": rows(threads), "entry_points": rows(entries), "top_self": rows(self_s),
               "top_inclusive": rows(incl)}
    text = [f"py-spy on-CPU samples: {total} at {rate} Hz over {messages} messages "
            f"= {summary['cpu_us_per_msg']} µs CPU per message (sampled)"]
    for title, key in (("threads", "threads"), ("by part of the relay", "entry_points"),
                       ("self time", "top_self"), ("inclusive time", "top_inclusive")):
        text.append(f"\n== {title}")
        text += [f"{r['pct']:6.1f}% {r['us_per_msg']:8.1f} µs/msg  {r['function']}" for r in summary[key]]
    path.with_suffix(".summary.txt").write_text("\n".join(text) + "\n")
    summary["text"] = str(path.with_suffix(".summary.txt"))
    return summary


def summarize_cprofile(path: Path, messages: int, top: int = 25) -> dict[str, Any]:
    import io
    import pstats

    buf = io.StringIO()
    st = pstats.Stats(str(path), stream=buf)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    text_path = path.with_suffix(".txt")
    text_path.write_text(buf.getvalue())
    rows = []
    stats = st.stats  # type: ignore[attr-defined]
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]:
        rows.append({"function": f"{Path(filename).name}:{line}({func})", "calls": nc,
                     "tottime_s": round(tt, 3), "us_per_msg": round(1e6 * tt / max(1, messages), 1),
                     "cumtime_s": round(ct, 3)})
    return {"pstats": str(path), "text": str(text_path), "top_tottime": rows}


# ============================================================== RESULTS.md


def fmt(v: Any, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        v = f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v}{unit}"


def _run_note(r: dict[str, Any]) -> str:
    notes = []
    if r.get("median_of"):
        notes.append(f"median of {r['median_of']} rounds (end to end: "
                     + ", ".join(fmt(x) for x in r.get("all_end_to_end_per_s", [])) + " msg/s)")
    if r.get("relay_pss_mib"):
        notes.append(f"memory (PSS of the process tree) {r.get('relay_pss_before_mib', '?')} MiB before, "
                     f"{r['relay_pss_mib']} MiB after")
    if r.get("relay_peak_rss_mib"):
        notes.append(f"peak RSS {r['relay_peak_rss_mib']} MiB (largest process), "
                     f"{r.get('relay_peak_rss_sum_mib', '?')} MiB (all processes)")
    if r.get("error"):
        notes.append(str(r["error"]))
    return "; ".join(notes)


NOTES_START, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


def carried_notes(path: Path) -> str:
    """The hand-written block of an earlier RESULTS.md, kept across runs."""
    with contextlib.suppress(OSError):
        text = path.read_text()
        if NOTES_START in text and NOTES_END in text:
            return text[text.index(NOTES_START): text.index(NOTES_END) + len(NOTES_END)]
    return ""


def _relay_table(L: list[str], entry: dict[str, Any], keys: Sequence[str]) -> None:
    """Rates, CPU and memory of the relays one phase compared, and their ratio."""
    L.append("| relay | accepted msg/s | end-to-end msg/s | CPU ms/msg (relay) | source s | end-to-end s | machine CPU busy | note |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---|")
    for key in keys:
        r = entry.get(key)
        if not r:
            continue
        L.append(f"| {r.get('label', key)} | {fmt(r.get('accepted_per_s'))} | {fmt(r.get('end_to_end_per_s'))} | "
                 f"{fmt(r.get('cpu_ms_per_msg'))} | {fmt(r.get('source_seconds'))} | "
                 f"{fmt(r.get('end_to_end_seconds'))} | {fmt(r.get('machine_busy_pct'), '%')} | "
                 f"{_run_note(r)} |")
    ratios = entry.get("ratio_imsrelay_over_postfix", {})
    L.append(f"| **imsrelay / Postfix** | **{fmt(ratios.get('accepted_per_s'), '×')}** | "
             f"**{fmt(ratios.get('end_to_end_per_s'), '×')}** | {fmt(ratios.get('cpu_ms_per_msg'), '×')} | | | | "
             f"{_rounds_note(ratios)} |")
    floor, ims = entry.get("floor"), entry.get("imsrelay") or {}
    if floor:
        ratio = relay_ratios(floor, ims)  # (imsrelay over the floor)
        L.append(f"| {floor.get('label', 'floor relay')} | {fmt(floor.get('accepted_per_s'))} | "
                 f"{fmt(floor.get('end_to_end_per_s'))} | {fmt(floor.get('cpu_ms_per_msg'))} | "
                 f"{fmt(floor.get('source_seconds'))} | {fmt(floor.get('end_to_end_seconds'))} | "
                 f"{fmt(floor.get('machine_busy_pct'), '%')} | bench/floor_relay.py, the same path with nothing "
                 f"else (one run); {_run_note(floor)} |")
        L.append(f"| **imsrelay / floor relay** | {fmt(ratio.get('accepted_per_s'), '×')} | "
                 f"{fmt(ratio.get('end_to_end_per_s'), '×')} | **{fmt(ratio.get('cpu_ms_per_msg'), '×')}** | | | | |")
    L.append("")


def _rounds_note(ratios: dict[str, Any]) -> str:
    rounds = ratios.get("rounds") or []
    if len(rounds) < 2:
        return ""
    e2e = ", ".join(fmt(r.get("end_to_end_per_s"), "×") for r in rounds)
    return f"median of {len(rounds)} interleaved rounds' ratios (end to end: {e2e})"


def _profile_tables(L: list[str], prof: dict[str, Any] | None) -> None:
    if prof and prof.get("entry_points"):
        mode = ("thread holding the GIL only (Python CPU)" if prof.get("mode") == "py-spy-gil"
                else "every non-idle thread (a thread in fsync counts as busy)")
        run_text = (f"a separate run of {prof['separate_run']:,} messages (not in the figures above)"
                    if prof.get("separate_run") else "the measured run")
        L.append(f"\nWhere the imsrelay site spends its time per relayed message: py-spy samples at "
                 f"{prof['rate_hz']} Hz during {run_text} (every worker process), {mode}; "
                 f"{prof['samples']:,} samples = {prof['cpu_us_per_msg']:,} µs per message. "
                 f"Raw stacks: `bench/out/{Path(prof['raw']).name}`.\n")
        L.append("| part of the relay | share | µs/msg |\n|---|---:|---:|")
        for row in prof["entry_points"]:
            if row["pct"] >= 0.5:
                L.append(f"| {row['function']} | {row['pct']}% | {row['us_per_msg']} |")
        L.append("\n| function (self time) | share | µs/msg |\n|---|---:|---:|")
        for row in prof["top_self"][:15]:
            L.append(f"| `{row['function']}` | {row['pct']}% | {row['us_per_msg']} |")
        L.append("")
    if prof and prof.get("top_tottime"):
        L.append(f"\ncProfile of the imsrelay site during this run (`{Path(prof['pstats']).name}`; "
                 "main thread only, profiler overhead included — read the proportions, not the rates):\n")
        L.append("| function | calls | own time s | µs/msg |\n|---|---:|---:|---:|")
        for row in prof["top_tottime"][:15]:
            L.append(f"| `{row['function']}` | {row['calls']:,} | {row['tottime_s']} | {row['us_per_msg']} |")
        L.append("")


def render_results(res: dict[str, Any], notes: str = "", plot_name: str | None = None) -> str:
    """RESULTS.md from one run's results (``plot_name``: the scale PNG beside it, if written)."""
    m = res["machine"]
    ph = res["phases"]
    o = res["options"]
    L: list[str] = []
    L.append("# imsrelay benchmark results\n")
    L.append(f"Generated by `{res['command']}` on {res['started']} (finished {res['finished']}). "
             "Everything ran on loopback on this one machine, in one run; ratios compare numbers "
             "from that same run.\n")
    L.append("## Machine\n")
    L.append("| | |\n|---|---|")
    L.append(f"| CPUs (nproc) | {m['nproc']} |")
    L.append(f"| CPU model | {m['cpu']} |")
    L.append(f"| memory | {m['memory_gib']} GiB |")
    L.append(f"| kernel | {m['kernel']} |")
    L.append(f"| temp filesystem (queues, Maildirs) | {m['tmp_filesystem']} |")
    L.append(f"| Python | {m['python']} (" + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + ") |")
    L.append(f"| Postfix | {m['postfix']} |")
    L.append(f"| load average at start | {' '.join(f'{x:.2f}' for x in m['loadavg_at_start'])} |")
    c0, c1 = res.get("code_at_start", {}), res.get("code_at_end", {})
    code = (f"git {c0.get('git_head', '?')}" + (f" + {c0['modified_imsrelay_files']} modified files in imsrelay/"
                                                 if c0.get("modified_imsrelay_files") else "")
            + f", imsrelay/*.py sha256 {c0.get('imsrelay_sha256', '?')}")
    if c1 and c1.get("imsrelay_sha256") != c0.get("imsrelay_sha256"):
        code += f" — **changed during the run** (at the end: {c1.get('imsrelay_sha256')})"
    L.append(f"| imsrelay code | {code} |")
    durations = ", ".join(f"{name} {fmt(v.get('phase_seconds'))} s" for name, v in ph.items()
                          if isinstance(v, dict) and v.get("phase_seconds") is not None)
    if durations:
        L.append(f"| phase durations | {durations} |")
    L.append("")

    tp = ph.get("throughput")
    if tp:
        L.append("## Relay throughput\n")
        L.append("PORT is smtp-sink, Postfix's smtpd or the imsrelay site. "
                 "Postfix relays with `relayhost = [127.0.0.1]:SINKPORT` (default durability: the queue "
                 "file is fsynced before `250`); imsrelay relays through its E-Mail Domain table entry "
                 "`bench.example → 127.0.0.1:SINKPORT` (`250` only once its spool has flushed the message "
                 "to disk, docs/design.md invariant 1). "
                 "Each relay got a warm-up batch first (not counted). End to end = until smtp-sink's "
                 "counter has every message. CPU = utime+stime of the relay's whole process tree "
                 "(Postfix: master and all its children).\n")
        if tp.get("error"):
            L.append(f"Error: {tp['error']}\n")
        for entry in tp.get("sizes", []):
            L.append(f"### {size_label(entry.get('size', 0))}\n")
            L.append(f"`{entry.get('command', '')}`\n")
            _relay_table(L, entry, ("ceiling", "postfix", "imsrelay"))
            for note in entry.get("notes", []):
                L.append(f"- {note}")
            _profile_tables(L, entry.get("profile"))

    local = ph.get("local")
    if local:
        L.append("## Local delivery into Maildir\n")
        L.append(f"`{local.get('command', '')}` — into (a) a private Postfix delivering with its `virtual(8)` "
                 f"agent (`virtual_mailbox_domains = {LOCAL_DOMAIN}`, a `texthash:` map "
                 f"`user1@{LOCAL_DOMAIN}  {LOCAL_DOMAIN}/user1/` = Maildir, static uid/gid; its smtpd and "
                 "cleanup fsync the queue file before `250`; otherwise Postfix's defaults), (b) an imsrelay "
                 "site whose recipient is its own mailbox (`<data>/mailboxes/User1/`). End to end = until "
                 "the Maildir's `new/` holds every message (counted every 50 ms).\n")
        if local.get("error"):
            L.append(f"Error: {local['error']}\n")
        _relay_table(L, local, ("postfix", "imsrelay"))

    lat = ph.get("latency")
    if lat:
        L.append("## Cross-site latency\n")
        L.append("SiteA and SiteB are two imsrelay sites on 127.0.0.x whose E-Mail Domain tables (and "
                 "Connected Sites) point at each other. A client sends to `UserB@SiteB.bench.test` at "
                 "SiteA; latency = from SiteA's `250` to the file appearing in SiteB's "
                 "`<data>/mailboxes/UserB/new/` (inotify timestamp). 4 KiB bodies.\n")
        if lat.get("error"):
            L.append(f"Error: {lat['error']}\n")
        L.append("| load | messages | p50 ms | p90 ms | p99 ms | max ms | note |\n|---|---:|---:|---:|---:|---:|---|")
        light, heavy = lat.get("light"), lat.get("heavy")
        if light:
            L.append(f"| light: 1 message at a time | {light['n']} | {fmt(light['p50_ms'])} | {fmt(light['p90_ms'])} | "
                     f"{fmt(light['p99_ms'])} | {fmt(light['max_ms'])} | lost {light.get('lost', 0)} |")
        if heavy:
            L.append(f"| heavy: {heavy['senders']} concurrent senders | {heavy['n']} | {fmt(heavy['p50_ms'])} | "
                     f"{fmt(heavy['p90_ms'])} | {fmt(heavy['p99_ms'])} | {fmt(heavy['max_ms'])} | "
                     f"{heavy['accepted_per_s']} msg/s accepted, {heavy['delivered_per_s']} msg/s into the Maildir, "
                     f"{heavy['delivered']}/{heavy['sent']} delivered |")
        if heavy:
            L.append(f"\nAt heavy load the site answered `250` {fmt(heavy.get('accept_p50_ms'))} ms (p50) / "
                     f"{fmt(heavy.get('accept_p99_ms'))} ms (p99) after the final dot, and deferred "
                     f"{heavy.get('deferred_4xx', 0):,} attempts with a 4xx (backpressure; each sent again "
                     "50 ms later)." + (f" Errors: {heavy['errors']}" if heavy.get("errors") else ""))
        L.append("")

    rep = ph.get("replication")
    if rep:
        L.append("## Replication\n")
        if rep.get("skipped"):
            L.append(f"Skipped: {rep['skipped']}.\n")
        else:
            L.append(f"{rep.get('mailboxes', 0):,} new mailboxes added at SiteA through its admin endpoint "
                     f"(`POST /directory/mailboxes`, {fmt(rep.get('add_seconds'))} s, not timed) after an initial "
                     "full sync; then `imsrelay replicate request-now --site SiteA --config SiteX.toml` run at "
                     "SiteB and SiteC at the same moment; time from starting those commands until each site's "
                     "directory (SQLite, polled every 0.1 s) has every new mailbox. The three sites exchange the "
                     "dirsync messages over SMTP through their E-Mail Domain tables. The command itself (a new "
                     "Python process) took " + ", ".join(f"{k} {v} s" for k, v in
                                                          rep.get("request_now_cli_seconds", {}).items()) + ".\n")
            if rep.get("error"):
                L.append(f"Error: {rep['error']}\n")
            L.append("| site | seconds | note |\n|---|---:|---|")
            for n in ("SiteB", "SiteC"):
                r = rep.get(n, {})
                L.append(f"| {n} | {fmt(r.get('seconds'))} | {r.get('error', '')} |")
            if rep.get("cpu_seconds"):
                L.append("\nCPU seconds during replication: " + ", ".join(
                    f"{k} {v}" for k, v in rep["cpu_seconds"].items()))
            L.append("")

    conc = ph.get("concurrency")
    if conc:
        L.append("## Concurrency\n")
        L.append(f"{conc.get('sessions', 0):,} SMTP sessions opened against one site (banner + EHLO, at most "
                 "100 connecting at once), held idle 3 s, then each answers a NOOP. Memory per session = "
                 "(RSS while held − RSS before) / sessions.\n")
        if conc.get("error"):
            L.append(f"Error: {conc['error']}\n")
        if "opened" in conc:
            L.append("| sessions opened | alive after hold | time to open | RSS before | RSS held | KiB/session |")
            L.append("|---:|---:|---:|---:|---:|---:|")
            L.append(f"| {conc['opened']:,} | {conc['alive_after_hold']:,} | {conc['open_seconds']} s | "
                     f"{conc['rss_before_mib']} MiB | {conc['rss_held_mib']} MiB | {conc['kib_per_session']} |")
            if conc.get("errors"):
                L.append(f"\nFirst errors: {conc['errors']}")
            L.append("")

    if ph.get("scale") or any(ph.get(k) for k in ("replication", "concurrency")):
        L.append(render_scale(ph, plot_name))

    srv = ph.get("servers")
    if srv:
        L.append(render_servers(srv))

    L.insert(_targets_index(L), targets_markdown(evaluate_targets(ph)))
    if notes:
        L.append(notes + "\n")
    L.append("## Options\n")
    L.append("```\n" + json.dumps(o, indent=1) + "\n```")
    return "\n".join(L) + "\n"


def render_servers(srv: dict[str, Any]) -> str:
    """The "Several servers in one site" section (issue 24): one server against two, same load."""
    L = ["## Several servers in one site\n",
         f"SiteA as one server, then as two (ServerA and Server1 on their own 127.0.0.x addresses, "
         f"`[[servers]]`), on the same load: {srv.get('messages', 0):,} messages of 4 KiB to User1 and User2, "
         "given to every server in equal parts at once (one `smtp-source` per server and mailbox, as "
         "equal-preference MX would spread them); with two servers User2 is homed on Server1, so half the "
         "mail takes an intra-site SMTP hop. End to end = until both Maildirs hold every message. CPU = both "
         "servers' process trees. Latency: one message at a time to User1 (homed on ServerA) given to ServerA "
         "(direct) and to Server1 (one intra-site hop), from the `250` to the file in ServerA's Maildir.\n",
         "| topology | accepted msg/s | end to end msg/s | CPU ms/message | direct p50 / p99 ms "
         "| intra-site hop p50 / p99 ms | note |", "|---|---:|---:|---:|---:|---:|---|"]
    for count in (1, 2):
        r = srv.get(f"servers_{count}") or {}
        direct, hop = r.get("direct") or {}, r.get("hop") or {}
        L.append(f"| {count} server{'s' if count > 1 else ''} | {fmt(r.get('accepted_per_s'))} | "
                 f"{fmt(r.get('end_to_end_per_s'))} | {fmt(r.get('cpu_ms_per_message'))} | "
                 f"{fmt(direct.get('p50_ms'))} / {fmt(direct.get('p99_ms'))} | "
                 + (f"{fmt(hop.get('p50_ms'))} / {fmt(hop.get('p99_ms'))}" if hop else "—")
                 + f" | {r.get('error', '')} |")
    if srv.get("ratio_two_over_one") is not None:
        L.append(f"\nTwo servers / one server, end to end: {srv['ratio_two_over_one']}× on this one machine "
                 "(both servers share its cores: the figure shows the cost of the hop, not the gain of a second "
                 "machine)." + (f" The intra-site hop adds {srv['hop_adds_p50_ms']} ms at p50."
                                if srv.get("hop_adds_p50_ms") is not None else ""))
    L.append("")
    return "\n".join(L)


def _targets_index(lines: list[str]) -> int:
    for i, line in enumerate(lines):
        if line.startswith("## ") and not line.startswith("## Machine"):
            return i
    return len(lines)


# ============================================================== main


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller counts (2,000 messages per relay, …)")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated subset of {','.join(PHASES + EXTRA_PHASES)} (default: {','.join(PHASES)})")
    p.add_argument("--messages", type=int, help="smtp-source -m (default 20000, quick 1500)")
    p.add_argument("--sessions", type=int, default=20, help="smtp-source -s (default 20)")
    p.add_argument("--rounds", type=int,
                   help="throughput and local rounds per relay, interleaved (Postfix, imsrelay, then the other "
                        "way round); each ratio is the median of the rounds' ratios (default 3, quick 1)")
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help=f"throughput message sizes, bytes, comma separated (default {DEFAULT_SIZES}: 4 KB, "
                        "50 KB, 1 MB, 10 MB)")
    p.add_argument("--size", type=int, help="one throughput size instead of --sizes (its count: --messages)")
    p.add_argument("--messages-large", type=int,
                   help="throughput messages at sizes above 8 KB when several sizes run (default 8000, quick 500)")
    p.add_argument("--local-messages", type=int, help="local delivery phase messages (default 10000, quick 600)")
    p.add_argument("--scale-queue", type=int,
                   help="scale phase: queued messages at the last restart (default 100000, quick 1000)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="imsrelay worker processes for the relay (smtp.workers; default: one per core, "
                        "as Postfix runs one smtpd/smtp process per session)")
    p.add_argument("--light", type=int, help="light-load latency messages (default 200, quick 100)")
    p.add_argument("--heavy", type=int, help="heavy-load latency messages in all (default 2000, quick 400)")
    p.add_argument("--heavy-senders", type=int, default=20, help="concurrent senders at heavy load")
    p.add_argument("--mailboxes", type=int, help="new mailboxes to replicate (default 100000, quick 1000)")
    p.add_argument("--idle-sessions", type=int, help="idle SMTP sessions to hold (default 10000, quick 1000)")
    p.add_argument("--profile", choices=("none", "py-spy", "py-spy-gil", "cprofile", "pyinstrument"), default="none",
                   help="profile the imsrelay site during the throughput phase (bench/out/profile-*)")
    p.add_argument("--addr-base", default="127.0.0", help="loopback /24 for the sites (127.x.y)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md", help="results file")
    p.add_argument("--keep", action="store_true", help="keep the temp directory (configs, queues, logs)")
    a = p.parse_args(argv)
    phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    bad = [x for x in phases if x not in PHASES + EXTRA_PHASES]
    if bad:
        p.error(f"unknown phase {bad[0]!r} (choose from {', '.join(PHASES + EXTRA_PHASES)})")
    if not a.addr_base.startswith("127."):
        p.error("--addr-base must be inside 127.0.0.0/8 (loopback only)")
    try:
        sizes = [a.size] if a.size else [int(x) for x in a.sizes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--sizes: not a list of byte counts: {a.sizes!r}")
    if not sizes or min(sizes) < 1:
        p.error("--sizes needs at least one positive size")
    q = a.quick
    return Options(
        quick=q, phases=phases, messages=a.messages or (1500 if q else 20000), rounds=max(1, a.rounds if a.rounds is not None else (1 if q else 3)),
        sessions=a.sessions, sizes=sizes, messages_large=a.messages_large or (500 if q else 8000),
        local_messages=a.local_messages or (600 if q else 10000),
        scale_queue=a.scale_queue or (1000 if q else 100_000),
        light=a.light or (100 if q else 200), heavy=a.heavy or (400 if q else 2000), heavy_senders=a.heavy_senders,
        mailboxes=a.mailboxes or (1000 if q else 100_000), idle_sessions=a.idle_sessions or (1000 if q else 10_000),
        profile=a.profile, keep=a.keep, out=a.out, addr_base=a.addr_base, workers=max(1, a.workers))


def scale_png_path(out: Path) -> Path:
    """The plot beside the results file: bench/RESULTS.md → bench/scale.png, X.md → X.scale.png."""
    return out.with_name("scale.png") if out.name == "RESULTS.md" else out.with_suffix(".scale.png")


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    tools = ensure_tools()
    raise_fd_limit()
    bench = Bench(opts, tools)

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    log(f"workdir {bench.root}; phases {', '.join(opts.phases)}")
    try:
        res = bench.run()
    except KeyboardInterrupt:
        log("interrupted: everything started was stopped")
        return 130
    raw = OUT_DIR / f"results-{bench.stamp}.json"
    raw.write_text(json.dumps(res, indent=1, default=str))
    plot_name = None
    plot = scale_png_path(opts.out)
    try:
        if plot_scale(res["phases"], plot):
            plot_name = plot.name
            log(f"wrote {plot}")
    except ImportError as exc:
        log(f"no scale plot: {exc} (./dev bench installs matplotlib: the `bench` extra)")
    opts.out.write_text(render_results(res, carried_notes(opts.out), plot_name))
    log(f"wrote {opts.out} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
