"""`serve --workers`: restarts counted per worker and reset, workers die with a killed
supervisor (no orphans, no SpoolLocked on restart), distinct queue ids per worker,
GET /queue and /status see every worker, and log lines never interleave."""

import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request

from sitekit import free_port
from test_crash import wait_listening, write_config

from imsrelay.commands.serve import Restarts

HOST = "127.0.0.1"
TOKEN = "w0rkers"


def test_restart_decisions_count_quick_deaths_per_worker_and_reset():
    r = Restarts()
    assert r.after_death(1, 0.2) == 0.5 and r.after_death(1, 0.2) == 1.0 and r.after_death(1, 0.2) == 2.0
    assert r.after_death(2, 0.1) == 0.5  # another worker has its own count
    assert r.after_death(1, 60.0) == 0.5  # it ran a while: start afresh
    assert r.after_death(1, 0.1) == 0.5 and r.after_death(1, 0.1) == 1.0 and r.after_death(1, 0.1) == 2.0
    assert r.after_death(1, 0.1) is None  # fourth quick death in a row: give up


def pids_of_workers(supervisor):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(supervisor)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def admin_get(port, path):
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_workers_are_one_site_and_die_with_their_supervisor(tmp_path):
    port, dead_port, admin_port = free_port(), free_port(), free_port()
    config = write_config(tmp_path, port, dead_port)
    config.write_text(config.read_text().replace('level = "warning"', 'level = "info"')
                      + f'\n[admin]\nport = {admin_port}\ntoken = "{TOKEN}"\n')
    log_path = tmp_path / "stderr.log"
    cmd = [sys.executable, "-m", "imsrelay", "serve", "--config", str(config), "--workers", "2"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_listening(port)
        time.sleep(1.0)  # both workers listening
        ids = []
        for i in range(40):  # a new connection each time: spread over both workers
            with smtplib.SMTP(HOST, port, timeout=10) as s:
                s.ehlo()
                s.mail("w@example.org")
                s.rcpt(f"x{i}@down.example")
                s.putcmd("data")
                s.getreply()
                s.send(b"Subject: w\r\n\r\nbody\r\n.\r\n")
                code, text = s.getreply()
                assert code == 250
                ids.append(re.search(rb"queued as (\w+)", text).group(1).decode())
        assert len(set(ids)) == 40
        prefixes = {qid[13:17] for qid in ids}
        assert len(prefixes) == 2, prefixes  # one per worker, distinct
        queue = admin_get(admin_port, "/queue")
        assert {m["queue_id"] for m in queue["messages"]} == set(ids)  # both workers' messages
        assert admin_get(admin_port, "/status")["queue"]["messages"] == 40
        workers = pids_of_workers(proc.pid)
        assert len(workers) == 2
        proc.kill()  # kill -9 of the supervisor
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(w) for w in workers), "workers outlived their supervisor"
        with open(log_path, "ab") as log:  # a restart finds no orphan holding the spool
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        wait_listening(port)
        time.sleep(1.0)
        assert proc.poll() is None
        assert len(admin_get(admin_port, "/queue")["messages"]) == 40
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    lines = log_path.read_bytes().splitlines()
    bad = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    assert lines and not bad, bad[:3]
    assert b"SpoolLocked" not in log_path.read_bytes()


def test_sigterm_during_start_up_stops_every_worker(tmp_path):
    port, dead_port = free_port(), free_port()
    config = write_config(tmp_path, port, dead_port)
    proc = subprocess.Popen([sys.executable, "-m", "imsrelay", "serve", "--config", str(config), "--workers", "3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_listening(port)  # worker 0 listens; the others start 0.5 s later
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1.0)
    assert subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).returncode != 0, \
        "a worker was started after SIGTERM and outlived the site"
