"""Readiness: named checks; ``imsrelay lab`` opens no SMTP port before its stage is reached."""

from __future__ import annotations

import json
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from imsrelay.observe.readiness import Readiness
from imsrelay.testing import free_lab_port, free_port

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def status_of(url: str) -> tuple[int | None, dict]:
    try:
        with OPENER.open(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return None, {}


def test_named_checks():
    r = Readiness()
    state = {"up": False}
    r.add("listening", lambda: None if state["up"] else "the SMTP port is not open yet")
    r.add("broken", lambda: 1 / 0)
    report = r.report()
    assert not report.ready
    assert report.reasons[0] == "listening: the SMTP port is not open yet"
    assert "check failed" in report.reasons[1]
    r.remove("broken")
    state["up"] = True
    assert r.report().ready and r.report().as_dict() == {
        "ready": True, "reasons": [], "checks": [{"name": "listening", "ok": True, "reason": None}]}
    r.add("queue manager running", lambda: "restarting after an error")  # what other parts add
    assert r.names == ["listening", "queue manager running"] and not r.report().ready


def test_lab_listens_only_when_ready(tmp_path):
    """Send at the very moment SiteA's SMTP port first accepts: the message is
    delivered at its home site SiteB, never bounced; /ready was 503 before."""
    port, admin = free_lab_port(), free_lab_port(("127.10.10.10", "127.10.10.15", "127.10.10.20"))
    api = free_port("127.10.10.1")
    data = tmp_path / "lab"
    out = open(tmp_path / "lab.out", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "imsrelay", "lab", "--data", str(data), "--port", str(port),
                             "--admin-port", str(admin), "--api-port", str(api),
                             "--submission-port", str(free_port("127.10.10.10")),
                             "--smtps-port", str(free_port("127.10.10.10"))], stdout=out,
                            stderr=subprocess.STDOUT)
    before: list[tuple[str, int | None]] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "lab.out").read_text()
            assert time.monotonic() < deadline, "SiteA never listened"
            sock = socket.socket()
            sock.settimeout(2)
            try:
                sock.connect(("127.10.10.10", port))
                break
            except OSError:
                sock.close()
            before.append(("lab", status_of(f"http://127.10.10.1:{api}/ready")[0]))
            before.append(("SiteA", status_of(f"http://127.10.10.10:{admin}/ready")[0]))
            time.sleep(0.02)
        sock.close()
        with smtplib.SMTP("127.10.10.10", port, timeout=30) as s:  # at once
            s.sendmail("alice@example.net", ["User2@microsoft.com"],
                       b"From: alice@example.net\r\nTo: User2@microsoft.com\r\nSubject: first moment\r\n"
                       b"Message-ID: <first-moment@test>\r\n\r\nhello\r\n")
        assert ("lab", 503) in before and ("SiteA", 503) in before
        assert ("lab", 200) not in before and ("SiteA", 200) not in before
        maildir = data / "SiteB" / "mailboxes" / "User2" / "new"
        deadline = time.monotonic() + 30
        while not (maildir.is_dir() and any(b"first moment" in p.read_bytes() for p in maildir.iterdir())):
            assert time.monotonic() < deadline, "not delivered to User2 at SiteB"
            time.sleep(0.1)
        code, body = status_of(f"http://127.10.10.1:{api}/ready")
        assert code == 200 and body["ready"] is True
        assert status_of(f"http://127.10.10.15:{admin}/ready")[0] == 200
        assert status_of(f"http://127.10.10.15:{admin}/health")[0] == 200
        time.sleep(1.0)
        bounced = [p for box in (data / "Internet" / "mailboxes").glob("*/new") for p in box.iterdir()
                   if b"first moment" in p.read_bytes()]
        assert bounced == []
        assert "imsrelay lab: ready" in (tmp_path / "lab.out").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        out.close()
