"""`imsrelay serve --workers N`: several processes share one site's port and data."""

import signal
import subprocess
import sys
import time

from sitekit import free_port, send_mail
from test_crash import wait_listening, write_config

from imsrelay.durable.journal import Journal
from imsrelay.queue.spool import Spool, _replay
from imsrelay.transport.maildir import list_messages, mailbox_dir

HOST = "127.0.0.1"


def serve(config, workers):
    return subprocess.Popen([sys.executable, "-m", "imsrelay", "serve", "--config", str(config),
                             "--workers", str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def send(port, rcpt, i):
    send_mail(HOST, port, "w@example.org", rcpt, b"Subject: w %d\r\n\r\nbody\r\n" % i)


def test_two_workers_share_the_port_and_hand_over_their_queue(tmp_path):
    port, dead_port = free_port(), free_port()
    config = write_config(tmp_path, port, dead_port)
    data = tmp_path / "data"
    proc = serve(config, 2)
    try:
        wait_listening(port)
        time.sleep(0.5)  # both workers listening
        for i in range(40):  # bounded; new connection each time, spread over the workers
            send(port, "User1@SiteA.microsoft.com" if i % 2 == 0 else f"x{i}@down.example", i)
        deadline = time.monotonic() + 20
        while len(list_messages(mailbox_dir(data, "User1"))) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list_messages(mailbox_dir(data, "User1"))) == 20
        while len(Spool(data).queue_ids()) > 20 and time.monotonic() < deadline:
            time.sleep(0.1)  # a delivered message leaves the journal just after its Maildir file appears
        assert len(Spool(data).queue_ids()) == 20  # the unreachable ones wait, in both journals
        per_worker = [len(_replay(Journal(data / "queue" / name))) for name in ("journal", "journal-1")]
        assert sum(per_worker) == 20 and min(per_worker) > 0, per_worker
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stderr.read().decode()[-2000:]
    queued = set(Spool(data).queue_ids())
    # one worker again: worker 0 adopts worker 1's journal, nothing is lost
    proc = serve(config, 1)
    try:
        wait_listening(port)
        deadline = time.monotonic() + 10
        while (data / "queue" / "journal-1").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (data / "queue" / "journal-1").exists()
        assert set(Spool(data).queue_ids()) == queued
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
