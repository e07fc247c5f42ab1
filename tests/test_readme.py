"""The tutorials' embedded-lab commands, run as written (docs/tutorials/embedded-lab.md and
docs/tutorials/walk-by-hand.md, in a scratch checkout-like directory with
``.venv/bin/imsrelay``, the lab on free ports instead of 2525/8025): the walk by hand —
the ``cat >> lab-data/config/SiteA.toml`` block, the table's Check Now / Request Now /
Site Addressing commands, ``lab status`` and ``lab next`` — and then the mail examples
(swaks, smtplib) with what the tutorial says they give.  The README's own example is
one of the tutorial's, so it runs too (checked below), and its two commands are the
newcomer's two."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sitekit import free_port

from imsrelay.transport.maildir import list_messages

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
TUTORIALS = [REPO / "docs" / "tutorials" / "embedded-lab.md", REPO / "docs" / "tutorials" / "walk-by-hand.md"]
SECTION = "\n".join(page.read_text() for page in TUTORIALS)


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", SECTION, re.S)


def test_the_readme_example_is_the_tutorials_and_its_commands_are_the_two() -> None:
    readme_blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    assert readme_blocks[0].splitlines()[:2] == [
        "./dev lab       # run the three-site lab on 127.10.10.10/.15/.20, port 2525 (Ctrl-C stops it)",
        "./dev test      # run the whole test suite (installs swaks, nsd, postfix's tools, chromium)"]
    examples = next(b for b in blocks("sh") if b.startswith("swaks --server 127.10.10.10:2525"))
    tested = {" ".join(line.split()) for line in examples.splitlines()}
    for line in readme_blocks[1].strip().splitlines():
        assert " ".join(line.split()) in tested, f"README line not run by the tutorial test: {line}"
    assert len(README.splitlines()) < 70, "the README is one screen; the rest goes to docs/"


def table_commands() -> list[str]:
    return re.findall(r"`(\.venv/bin/imsrelay (?:kcc|replicate|site-addressing) [^`]+)`", SECTION)


class Scratch:
    def __init__(self, root: Path, port: int, admin: int) -> None:
        self.root, self.port, self.admin = root, port, admin
        venv_bin = root / ".venv" / "bin"
        venv_bin.mkdir(parents=True)
        (venv_bin / "imsrelay").symlink_to(Path(sys.executable).parent / "imsrelay")

    def sh(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        command = command.replace(":2525", f":{self.port}").replace(", 2525)", f", {self.port})")
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=self.root, capture_output=True,
                                text=True, timeout=timeout)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result

    def status(self) -> str:
        return self.sh(".venv/bin/imsrelay lab status").stdout


def wait_until(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.5)


def test_the_readme_lab_walk_and_examples(tmp_path: Path) -> None:
    port, admin = free_port("127.10.10.10"), free_port("127.10.10.10")
    scratch = Scratch(tmp_path, port, admin)
    assert ".venv/bin/imsrelay lab --stage install" in SECTION
    lab = subprocess.Popen([".venv/bin/imsrelay", "lab", "--stage", "install", "--port", str(port),
                            "--admin-port", str(admin), "--api-port", "0",
                            "--submission-port", str(free_port("127.10.10.10")),
                            "--smtps-port", str(free_port("127.10.10.10"))], cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: (tmp_path / "lab-data" / "lab.pid").exists()
                   and (tmp_path / "lab-data" / "config" / "Internet.toml").exists())
        assert "stage install" in scratch.status()
        # step 2 by hand: the README's block at SiteA, "the same at SiteB and SiteC with the other two names"
        connected = next(b for b in blocks("sh") if "cat >> lab-data/config/SiteA.toml" in b)
        scratch.sh(connected)
        scratch.sh(connected.replace("SiteA.toml", "SiteB.toml").replace('"SiteB"', '"SiteA"')
                   .replace("@SiteB.", "@SiteA."))
        scratch.sh(connected.replace("SiteA.toml", "SiteC.toml").replace('"SiteC"', '"SiteA"')
                   .replace("@SiteC.", "@SiteA."))
        wait_until(lambda: "done  connected-sites" in scratch.status())
        assert scratch.status().startswith("stage connected-sites; lab running")
        assert "missing: SiteA has no [[email_domains]] SiteB.microsoft.com" in scratch.status()
        # `lab next` twice: the E-Mail Domain table and the connectors
        assert scratch.sh(".venv/bin/imsrelay lab next").stdout == "lab: did domain-table; now at stage domain-table\n"
        assert "now at stage replication-connectors" in scratch.sh(".venv/bin/imsrelay lab next").stdout
        # the table's commands, at every site where the README says "at each site"
        check, request, addressing = table_commands()
        sites = ["SiteA", "SiteB", "SiteC"]
        for site in sites:
            scratch.sh(check.replace("SiteA.toml", f"{site}.toml"))
        for site in sites:
            for peer in sites:
                if peer != site:
                    scratch.sh(request.replace("--site SiteB", f"--site {peer}").replace("SiteA.toml", f"{site}.toml"))
        wait_until(lambda: "done  request-now" in scratch.status())
        scratch.sh(addressing)  # at SiteA, "then Request Now at SiteB and SiteC"
        for site in ("SiteB", "SiteC"):
            scratch.sh(request.replace("--site SiteB", "--site SiteA").replace("SiteA.toml", f"{site}.toml"))
        wait_until(lambda: "done  site-addressing-a" in scratch.status())
        assert scratch.status().startswith("stage site-addressing-a;")
        assert scratch.sh(".venv/bin/imsrelay lab next").stdout.endswith("now at stage site-addressing-b\n")
        assert scratch.sh(".venv/bin/imsrelay lab next").stdout.endswith("now at stage end\n")

        # the mail examples, as written
        examples = next(b for b in blocks("sh") if b.startswith("swaks --server 127.10.10.10:2525"))
        if shutil.which("swaks"):
            for line in examples.strip().splitlines():  # one at a time, at a person's pace
                if line.startswith("ls "):
                    target = tmp_path / line.split()[1]
                    wait_until(lambda target=target: target.is_dir() and any(target.iterdir()), timeout=30)
                out = scratch.sh(line).stdout
            assert out.startswith("stage end (every step of KB Q196927 is done)")
        code = blocks("python")[0].replace("2525", str(port))
        subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=60)
        bob = tmp_path / "lab-data" / "Internet" / "mailboxes" / "bob"
        wait_until(lambda: list_messages(bob))
        mail = list_messages(bob)[0].read_bytes()
        assert b"Return-Path: <User3@microsoft.com>" in mail and b"\r\nFrom: User3@microsoft.com\r\n" in mail
        if shutil.which("swaks"):
            user2 = tmp_path / "lab-data" / "SiteB" / "mailboxes" / "User2"
            assert any(b"\nFrom: User1@microsoft.com" in p.read_bytes() for p in list_messages(user2))
    finally:
        lab.send_signal(signal.SIGINT)
        try:
            lab.wait(timeout=60)
        except subprocess.TimeoutExpired:
            lab.kill()
            lab.wait()
    assert lab.returncode == 0
    assert os.path.exists(tmp_path / "lab-data" / "config" / "SiteA.toml")


if not shutil.which("bash"):  # pragma: no cover - every Debian has bash
    pytest.skip("bash is needed to run the README's shell blocks", allow_module_level=True)
