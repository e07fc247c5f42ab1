"""kill -9 under load loses nothing that was acknowledged (docs/design.md invariant 1)."""

import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time

from sitekit import free_port, wait_smtp

from imsrelay.queue.spool import Spool
from imsrelay.transport.maildir import list_messages, mailbox_dir

HOST = "127.0.0.1"


def write_config(tmp_path, port, dead_port, extra: str = ""):
    """SiteA on ``port`` whose ``down.example`` route leads to ``dead_port`` (nothing
    listens: its mail stays queued); ``extra``: more TOML."""
    path = tmp_path / "siteA.toml"
    path.write_text(f"""
[site]
organisation = "ExchangeORG"
name = "SiteA"
server = "ServerA"
email_domain = "SiteA.microsoft.com"
company_domain = "microsoft.com"
data_dir = "data"

[smtp]
listen = "{HOST}"
port = {port}
relay_networks = ["127.0.0.0/8"]

[[mailboxes]]
alias = "User1"

[delivery]
retry_intervals = ["1h"]

[[email_domains]]
domain = "down.example"
host = "{HOST}"
port = {dead_port}

[logging]
level = "warning"
format = "json"
""" + extra)
    return path


def start(config):
    proc = subprocess.Popen([sys.executable, "-m", "imsrelay", "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc


def wait_listening(port, timeout=15):
    wait_smtp(HOST, port, timeout)


def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path):
    port, dead_port = free_port(), free_port()
    config = write_config(tmp_path, port, dead_port)
    proc = start(config)
    wait_listening(port)
    acked: list[tuple[str, str]] = []  # (queue id, kind)
    lock = threading.Lock()
    stop = threading.Event()

    def sender(n: int) -> None:
        for i in range(400):  # bounded
            if stop.is_set():
                return
            kind = "local" if i % 2 == 0 else "remote"
            rcpt = "User1@SiteA.microsoft.com" if kind == "local" else f"x{n}@down.example"
            try:
                with smtplib.SMTP(HOST, port, timeout=5) as s:
                    s.ehlo()
                    s.mail("load@example.org")
                    s.rcpt(rcpt)
                    code, reply = s.data(b"Subject: load %d %d\r\n\r\nbody\r\n" % (n, i))
                if code == 250:
                    qid = re.search(rb"queued as (\w+)", reply).group(1).decode()
                    with lock:
                        acked.append((qid, kind))
            except (OSError, smtplib.SMTPException):
                return  # the server died under us: the unanswered message was not acknowledged

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(acked) < 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert len(acked) >= 60, "load did not get going"

    # restart: recovery runs, local mail gets delivered
    proc = start(config)
    try:
        wait_listening(port)
        data = tmp_path / "data"
        local_ids = {q for q, k in acked if k == "local"}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            delivered = {p.name.split(".")[0] for p in list_messages(mailbox_dir(data, "User1"))}
            if local_ids <= delivered:
                break
            time.sleep(0.1)
        spool_ids = set(Spool(data).queue_ids())
        missing = [(q, k) for q, k in acked if q not in delivered and q not in spool_ids]
        assert missing == [], f"acknowledged but lost: {missing[:5]} of {len(acked)}"
        assert local_ids <= delivered
        assert {q for q, k in acked if k == "remote"} <= spool_ids
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
