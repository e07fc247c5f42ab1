"""Integration scenarios: a full disk, descriptor exhaustion by idle clients, hostile
headers (tests/test_smtp_hardening.py), and kill -9 of a site with workers under load."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import resource
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from sitekit import free_port, maildir_messages, make_config, running_site, site_mapping, wait_for
from test_crash import wait_listening, write_config

from imsrelay.queue.spool import Spool
from imsrelay.transport.maildir import list_messages, mailbox_dir

HOST = "127.0.0.1"


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MiB tmpfs of the test's own (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.system(f"mount -t tmpfs -o size=30m tmpfs {mnt}") != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        os.system(f"umount -l {mnt}")


def send(port, size, sender="a@example.org", declared=None):
    body = b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * (size // 78)
    with smtplib.SMTP(HOST, port, timeout=30) as s:
        s.ehlo()
        opts = [f"SIZE={declared}"] if declared is not None else []
        code, reply = s.mail(sender, opts)
        if code != 250:
            return code, reply
        s.rcpt("User1@SiteA.microsoft.com")
        try:
            return s.data(body)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


async def test_full_disk_space_comes_back_and_nothing_is_torn(tmp_path, small_disk):
    mapping = site_mapping(smtp={"max_message_size": 4 * 1024 * 1024})
    cfg = dataclasses.replace(make_config(tmp_path, mapping), data_dir=small_disk / "SiteA")
    async with running_site(cfg) as site:
        port = site.bound_port
        for _ in range(150):  # 15 MiB through the queue, read (deleted) from the Maildir as it arrives
            code, _ = await asyncio.to_thread(send, port, 100 * 1024)
            assert code == 250
            for p in list_messages(mailbox_dir(cfg.data_dir, "User1")):
                p.unlink(missing_ok=True)
        await wait_for(lambda: site.qmgr.backlog == 0)
        for p in list_messages(mailbox_dir(cfg.data_dir, "User1")):
            p.unlink()
        journal = sum(p.stat().st_size for p in (cfg.data_dir / "queue" / "journal").glob("*.log"))
        assert journal < 2 * 1024 * 1024, journal  # finished records gave their space back
    async with running_site(cfg) as site:  # and after a restart
        codes = [(await asyncio.to_thread(send, site.bound_port, 50 * 1024))[0] for _ in range(20)]
        assert codes == [250] * 20
        await wait_for(lambda: len(maildir_messages(cfg.data_dir, "User1")) == 20)
        # fill the disk to a few MiB free, then a message larger than that with an understated SIZE=
        filler = small_disk / "filler"
        with open(filler, "wb") as f:
            while free_bytes(small_disk) > 5 * 1024 * 1024:
                f.write(b"\0" * (1024 * 1024))
        site._free_checked = -10.0
        before = free_bytes(small_disk)
        code, reply = await asyncio.to_thread(send, site.bound_port, 3900 * 1024, declared=1000)
        assert code == 452 and reply.startswith(b"4.3.1"), (code, reply)
        await asyncio.sleep(0.2)
        assert free_bytes(small_disk) >= before - 256 * 1024  # no torn record left eating the space
        filler.unlink()
        site._free_checked = -10.0
        code, _ = await asyncio.to_thread(send, site.bound_port, 100 * 1024)
        assert code == 250
        await wait_for(lambda: len(maildir_messages(cfg.data_dir, "User1")) == 21)
        assert site.qmgr.health.ok and site.qmgr.running


def low_fd_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_idle_clients_cannot_exhaust_descriptors(tmp_path):
    port, dead_port, admin_port = free_port(), free_port(), free_port()
    config = write_config(tmp_path, port, dead_port)
    config.write_text(config.read_text().replace('relay_networks = ["127.0.0.0/8"]', 'relay_networks = ["127.0.0.2/32"]')
                      + f'\n[admin]\nport = {admin_port}\ntoken = "fd"\n')
    log = tmp_path / "site.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "imsrelay", "serve", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err, preexec_fn=low_fd_limit)
    held: list[socket.socket] = []
    try:
        wait_listening(port)
        greeted = refused = 0
        for i in range(400):  # bounded: 400 idle clients from 20 addresses
            try:
                s = socket.create_connection((HOST, port), timeout=5, source_address=(f"127.0.1.{i % 20 + 1}", 0))
            except OSError:
                continue
            held.append(s)
            try:
                line = s.recv(200)
            except OSError:
                line = b""
            greeted += line.startswith(b"220")
            refused += line.startswith(b"421 4.7.0")
        assert greeted <= 30 and refused >= 300, (greeted, refused)
        (tmp_path / "data" / "queue" / "control" / "retry-all").write_text("")  # the queue manager still works
        time.sleep(1.5)
        with urllib.request.urlopen(f"http://{HOST}:{admin_port}/ready", timeout=5) as r:
            assert r.status == 200
        for s in held:
            s.close()
        held.clear()
        time.sleep(0.5)
        for i in range(10):
            with smtplib.SMTP(HOST, port, timeout=10, source_address=("127.0.0.2", 0)) as s:
                s.sendmail("a@example.org", ["User1@SiteA.microsoft.com"], b"Subject: after %d\r\n\r\nx\r\n" % i)
        deadline = time.monotonic() + 20
        while len(list_messages(mailbox_dir(tmp_path / "data", "User1"))) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list_messages(mailbox_dir(tmp_path / "data", "User1"))) == 10
        assert proc.poll() is None
    finally:
        for s in held:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    events = [json.loads(line) for line in log.read_bytes().splitlines() if line.strip()]
    bad = [e for e in events if e.get("level") == "error" or "Too many open files" in json.dumps(e)]
    assert bad == [], bad[:3]


@pytest.mark.slow
def test_kill_9_loop_under_load_with_workers(tmp_path):
    """Rounds of kill -9 (supervisor and workers together, or the supervisor alone)
    under load: nothing acknowledged is lost; at worst a duplicate.  Rounds:
    IMSRELAY_KILL_ROUNDS (default 4)."""
    rounds = int(os.environ.get("IMSRELAY_KILL_ROUNDS", "4"))
    port, dead_port = free_port(), free_port()
    config = write_config(tmp_path, port, dead_port)
    config.write_text(config.read_text().replace('level = "warning"', 'level = "info"'))
    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "imsrelay", "serve", "--config", str(config), "--workers", "2"]
    acked: list[tuple[str, str]] = []
    lock = threading.Lock()
    log = open(tmp_path / "site.log", "ab")  # noqa: SIM115 - kept open for every round
    for rnd in range(rounds):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        wait_listening(port, timeout=30)
        stop = threading.Event()

        def sender(n: int, stop: threading.Event = stop) -> None:
            for i in range(300):  # bounded
                if stop.is_set():
                    return
                kind = "local" if i % 2 == 0 else "remote"
                rcpt = "User1@SiteA.microsoft.com" if kind == "local" else f"x{n}@down.example"
                try:
                    with smtplib.SMTP(HOST, port, timeout=5) as s:
                        s.ehlo()
                        s.mail("load@example.org")
                        s.rcpt(rcpt)
                        code, reply = s.data(b"Subject: r\r\n\r\nbody\r\n")
                    if code == 250:
                        with lock:
                            acked.append((re.search(rb"queued as (\w+)", reply).group(1).decode(), kind))
                except (OSError, smtplib.SMTPException):
                    time.sleep(0.05)

        threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        target = len(acked) + 40
        deadline = time.monotonic() + 20
        while len(acked) < target and time.monotonic() < deadline:
            time.sleep(0.02)
        if rnd % 2 == 0:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group at once
        else:
            os.kill(proc.pid, signal.SIGKILL)  # the supervisor alone: its workers must follow
        proc.wait()
        stop.set()
        for t in threads:
            t.join(timeout=15)
        deadline = time.monotonic() + 15  # workers gone (PR_SET_PDEATHSIG)
        while time.monotonic() < deadline:
            if subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).returncode != 0:
                break
            time.sleep(0.1)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("workers outlived their killed supervisor")
    assert len(acked) >= 40 * rounds // 2, len(acked)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        wait_listening(port, timeout=30)
        local = {q for q, k in acked if k == "local"}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            delivered = {p.name.split(".")[0] for p in list_messages(mailbox_dir(data, "User1"))}
            if local <= delivered:
                break
            time.sleep(0.2)
        queued = set(Spool(data).queue_ids())
        lost = [(q, k) for q, k in acked if q not in delivered and q not in queued]
        assert lost == [], f"acknowledged but lost: {lost[:5]} of {len(acked)}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ps = subprocess.run(["ps", "-o", "pid,ppid,stat,wchan:20,cmd", "-s", str(proc.pid)],
                                capture_output=True, text=True).stdout
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"the site did not stop:\n{ps}\n" + (tmp_path / "site.log").read_text()[-3000:]) from None
        finally:
            log.close()


def test_a_low_descriptor_limit_lowers_the_inbound_cap(tmp_path):
    """Descriptors stay reserved for delivery and the spool: with RLIMIT_NOFILE 200 the
    site keeps 164 (max_deliveries + 64) and accepts at most 36 sessions."""
    port, dead_port = free_port(), free_port()
    config = write_config(tmp_path, port, dead_port)
    config.write_text(config.read_text().replace("[smtp]", "[smtp]\nmax_inbound_connections = 100"))
    log = tmp_path / "site.log"

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "imsrelay", "serve", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err, preexec_fn=limit)
    held = []
    try:
        wait_listening(port)
        for _ in range(40):
            s = socket.create_connection((HOST, port), timeout=5)
            held.append((s, s.recv(100)))
        greeted = sum(line.startswith(b"220") for _, line in held)
        assert greeted == 36, greeted
        assert all(line.startswith((b"220", b"421 4.7.0")) for _, line in held)
    finally:
        for s, _ in held:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    events = [json.loads(line) for line in log.read_bytes().splitlines() if line.strip()]
    lowered = [e for e in events if e["event"] == "smtp.connection_cap_lowered"]
    assert lowered and lowered[0]["lowered"] == 36 and lowered[0]["configured"] == 100, lowered
