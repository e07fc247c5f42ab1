"""The two measuring sticks of bench/ run end to end on loopback with a few messages:
the floor relay (the whole path without aiosmtpd) and aiosmtpd alone (the server
library with a handler that drops every message).  Their figures are not judged
here (benchmarks are not tests): each must finish and print its line."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

pytestmark = pytest.mark.skipif(
    shutil.which("smtp-source") is None and not Path("/usr/sbin/smtp-source").exists(),
    reason="needs Postfix's smtp-source and smtp-sink (./dev test installs them)")


@pytest.mark.parametrize(("paths", "label"), [("imsrelay", "SMTP, imsrelay's path parser"),
                                              ("aiosmtpd", "SMTP, aiosmtpd's path parser"),
                                              ("protocol", "imsrelay's ImsSMTP")])
def test_aiosmtpd_alone_takes_and_drops_every_message(paths, label):
    out = subprocess.run([sys.executable, str(BENCH / "aiosmtpd_floor.py"), "--messages", "60", "--sessions", "4",
                          "--paths", paths], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(rf"aiosmtpd alone \({re.escape(label)}; .*60 x 4096 B, 4 sessions: [\d,]+ msg/s, "
                     r"CPU \d+\.\d{3} ms/msg", out.stdout), out.stdout


def test_floor_relay_relays_every_message():
    out = subprocess.run([sys.executable, str(BENCH / "floor_relay.py"), "--messages", "60", "--sessions", "4"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"floor relay, 60 x 4096 B, 4 sessions: .* msg/s end to end, CPU \d+\.\d{3} ms/msg", out.stdout), \
        out.stdout
