"""Every listener takes its accept backlog from the configuration (default: the kernel's
maximum), so a burst of clients larger than asyncio's old default of 100 is queued by
the kernel instead of having its SYNs dropped (``TcpExtListenOverflows`` stays put)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sitekit import free_port, make_config, running_site, site_mapping

from imsrelay.ingress import backlog
from imsrelay.ingress.backlog import FALLBACK_BACKLOG, accept_backlog

BURST = 400  # clients connecting at once while the site's event loop is busy


def listen_overflows() -> int:
    """The kernel's count of connections dropped because an accept queue was full."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    raise AssertionError("no TcpExt line in /proc/net/netstat")


def listening_backlog(port: int) -> int:
    """The accept queue size ``ss`` reports for a listening socket (its Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[2])


def test_the_default_is_the_kernels_maximum():
    assert accept_backlog(0) == int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert accept_backlog(250) == 250


def test_without_proc_the_fallback(monkeypatch, tmp_path):
    monkeypatch.setattr(backlog, "SOMAXCONN", tmp_path / "missing")
    assert accept_backlog() == FALLBACK_BACKLOG


async def burst_while_busy(port: int) -> int:
    """``BURST`` clients connect while the event loop is blocked for a second; returns
    the rise of the kernel's ListenOverflows counter meanwhile."""
    socks: list[socket.socket] = []
    started = threading.Event()

    def connect_all() -> None:
        started.wait()
        for _ in range(BURST):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)

    before = listen_overflows()
    thread = threading.Thread(target=connect_all)
    thread.start()
    started.set()
    time.sleep(1.0)  # the event loop accepts nothing meanwhile, as under load
    thread.join()
    await asyncio.sleep(1.0)  # accepting resumes; dropped SYNs would be retried only after 1 s
    rise = listen_overflows() - before
    for s in socks:
        s.close()
    return rise


@pytest.mark.parametrize("configured, expect_drops", [(0, False), (50, True)])
async def test_a_burst_larger_than_100_is_accepted_without_syn_drops(tmp_path, configured, expect_drops):
    """With the default, no SYN is dropped; with ``listen_backlog = 50`` the same burst
    overflows the queue (the probe sees drops when there are some)."""
    config = make_config(tmp_path, site_mapping("SiteA", smtp={"listen_backlog": configured},
                                                admin={"port": 0}))
    async with running_site(config) as site:
        assert site.bound_port is not None
        assert listening_backlog(site.bound_port) == accept_backlog(configured)
        rise = await burst_while_busy(site.bound_port)
    assert (rise > 0) is expect_drops, rise


async def test_admin_endpoint_and_submission_use_the_configured_backlog(tmp_path):
    config = make_config(tmp_path, site_mapping(
        "SiteA", smtp={"listen_backlog": 777, "tls_generate": True},
        submission={"port": free_port(), "tls_port": free_port()}, admin={"port": free_port(), "token": "t"}))
    async with running_site(config) as site:
        assert site.admin is not None and site.admin.bound is not None
        ports = [site.bound_port, *site.submission_ports.values(), site.admin.bound[1]]
        assert len(ports) == 4
        assert [listening_backlog(p) for p in ports if p] == [777] * 4
