"""IMAP4/POP3 in the embedded lab: each site's Dovecot starts and stops with the lab
on the site's own address and the ports the lab prints; without Dovecot the lab says
so in one line and runs without."""

from __future__ import annotations

import asyncio
import imaplib
import os
import shutil
import ssl
import tempfile
from pathlib import Path

import pytest

from imsrelay.access.dovecot import DovecotUnavailable, find_dovecot
from imsrelay.lab.embedded import SITES, Lab, stage_index
from imsrelay.testing import LAB_PASSWORDS, free_lab_port

A = SITES[0]


def _has_dovecot() -> bool:
    try:
        find_dovecot("dovecot")
    except DovecotUnavailable:
        return False
    return True


@pytest.fixture
def data():
    path = Path(tempfile.mkdtemp(prefix="imsrelay-access-lab-"))
    os.chmod(path, 0o711)  # run as root, Dovecot's mail user must reach the Maildirs
    yield path / "lab"
    shutil.rmtree(path, ignore_errors=True)


def make_lab(data: Path, said: list[str], **extra) -> Lab:
    sites = [s.address for s in SITES]
    ports = {k: free_lab_port(sites) for k in ("imap_port", "imaps_port", "pop3_port", "pop3s_port")}
    return Lab(data, port=free_lab_port(), admin_port=free_lab_port(sites), submission_port=free_lab_port(sites),
               smtps_port=free_lab_port(sites), access_ports=ports, say=said.append, **extra)


def test_without_dovecot_the_lab_says_so_in_one_line_and_runs(data: Path):
    said: list[str] = []
    lab = make_lab(data, said, dovecot=str(data.parent / "no-dovecot-here"))

    async def main() -> str:
        await lab.start(stage_index("install"))
        try:
            assert all(site.access is None for site in lab.sites.values())
            assert all(site.readiness.report().ready for site in lab.sites.values())  # it runs without
            return await lab.describe()
        finally:
            await lab.stop()

    described = asyncio.run(main())
    lines = [line for line in said if "IMAP4/POP3" in line]
    assert lines == [f"lab: no IMAP4/POP3: {data.parent / 'no-dovecot-here'} is not an executable Dovecot"]
    assert "mail access" not in described


@pytest.mark.skipif(not _has_dovecot(), reason="Dovecot is not installed (./dev lab installs it)")
def test_each_site_serves_imap_on_its_address_while_the_lab_runs(data: Path):
    said: list[str] = []
    lab = make_lab(data, said)
    ca = data / "tls" / "ca.crt"

    def login(port: int) -> str:
        conn = imaplib.IMAP4(A.address, port, timeout=20)
        try:
            conn.starttls(ssl.create_default_context(cafile=str(ca)))  # the site's certificate from the lab CA
            return conn.login("User1", LAB_PASSWORDS["User1"])[0]
        finally:
            conn.shutdown()

    async def main() -> tuple[str, str, int]:
        await lab.start(stage_index("install"))
        try:
            port = lab.access_ports["imap_port"]
            return await lab.describe(), await asyncio.to_thread(login, port), port
        finally:
            await lab.stop()

    described, reply, port = asyncio.run(main())
    assert reply == "OK"
    assert f"mail access {A.address}:{port} (IMAP4, STARTTLS)" in described
    assert not [line for line in said if "IMAP4/POP3" in line]
    with pytest.raises(OSError):  # stopped with the lab
        imaplib.IMAP4(A.address, port, timeout=5)
    assert (data / A.name / "dovecot" / "dovecot.conf").is_file()  # its own config under the lab's data
