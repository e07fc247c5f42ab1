"""The pytest plugin as a user meets it: registered by the ``pytest11`` entry point,
attaching to a running lab by URL (here: this session's embedded lab)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from imsrelay.testing import LabClient

SAMPLE = Path(__file__).with_name("test_user_sample.py")


def test_attach_by_url_runs_the_sample_user_test(imsrelay_lab: LabClient, tmp_path):
    user_tests = tmp_path / "user"
    user_tests.mkdir()
    (user_tests / "test_theirs.py").write_text(SAMPLE.read_text())
    url = imsrelay_lab.endpoints[0].url
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(user_tests),
                          "--imsrelay-url", url, "--rootdir", str(user_tests)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout  # mail seen over the API, then read over IMAP
    # the plugin's options are in pytest's help
    helptext = subprocess.run([sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path).stdout
    assert "--imsrelay-url" in helptext and "--imsrelay-smtp" in helptext


def test_attach_to_a_lab_that_is_not_there_says_so(tmp_path):
    from imsrelay.testing import free_port

    (tmp_path / "test_x.py").write_text("def test_x(imsrelay_lab):\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path),
                          "--imsrelay-url", f"http://127.0.0.1:{free_port()}", "--rootdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**__import__("os").environ, "IMSRELAY_LAB_READY_TIMEOUT": "1"})
    assert out.returncode != 0
    assert "not ready" in out.stdout
