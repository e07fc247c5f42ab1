"""The embedded lab driven by a person: the walk's state is what the files and
directories are, `lab next` continues from there keeping what the person added (or
refuses in one line, changing nothing), lab-written files take `[[table]]` entries,
nothing replicates behind the person's back, and the lab's hosts look like the
article's (own source addresses, relay networks, an ordinary Internet MTA)."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import pytest_asyncio
from sitekit import free_port

from imsrelay.config.loader import load_config
from imsrelay.directory.keys import generate_private_key, public_key_text
from imsrelay.lab.embedded import INTERNET, SITES, Lab, LabStepRefused, stage_index
from imsrelay.lab.walk import plan_config_step

ASYNC = pytest.mark.asyncio(loop_scope="module")

A, B, C = SITES
KEYS = {s.name: public_key_text(generate_private_key()) for s in SITES}

CONNECTED_BY_HAND = """
# typed by hand, as the README's table says
[[connected_sites]]
name = "{0}"
routing_address = "@{0}.microsoft.com"

[[connected_sites]]
name = "{1}"
routing_address = "@{1}.microsoft.com"
"""


def others(site) -> list[str]:
    return [s.name for s in SITES if s is not site]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory):
    data = tmp_path_factory.mktemp("hand")
    lab = Lab(data, port=free_port("127.10.10.10"), admin_port=free_port("127.10.10.10"), hand=True,
              submission_port=free_port("127.10.10.10"), smtps_port=free_port("127.10.10.10"),
              say=lambda s: None)
    await lab.start(stage_index("install"))
    try:
        yield lab
    finally:
        await lab.stop()


@ASYNC
async def test_hand_walk_keeps_what_the_person_added_and_takes_table_entries(lab: Lab):
    assert lab.stage == stage_index("install")
    assert lab.status_lines("running")[0].startswith("stage install; lab running")
    # Exchange's timing in what the lab wrote for a walk by hand: a request 5 minutes after start-up
    for s in SITES:
        assert load_config(lab.config_path(s.name)).replication.startup_delay == 300.0
        assert "[[mailboxes]]" in lab.config_path(s.name).read_text()  # [[table]] form, not inline arrays
    # step 2 by hand: the README's [[connected_sites]] appended to the lab-written files
    for s in SITES:
        with lab.config_path(s.name).open("a") as f:
            f.write(CONNECTED_BY_HAND.format(*others(s)))
    # and something of the person's own at SiteA
    with lab.config_path("SiteA").open("a") as f:
        f.write('\n[[email_domains]]   # my partner\ndomain = "partner.example"\nhost = "127.0.0.40"\nport = 2526\n')
    assert sorted(await lab.restart_changed()) == ["SiteA", "SiteB", "SiteC"]
    assert lab.stage == stage_index("connected-sites")
    status = "\n".join(lab.status_lines("running"))
    assert "done  connected-sites" in status and "todo  domain-table" in status
    assert "missing: SiteA has no [[email_domains]] SiteB.microsoft.com" in status

    # a conflicting entry typed by hand: `next` refuses in one line and changes nothing
    with lab.config_path("SiteB").open("a") as f:
        f.write('\n[[email_domains]]\ndomain = "sitec.microsoft.com"\nhost = "127.10.10.99"\nport = 25\n')
    await lab.restart_changed()
    before = {s.name: lab.config_path(s.name).read_text() for s in SITES}
    with pytest.raises(LabStepRefused) as refused:
        await lab.next_stage()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("lab next: stage domain-table not done, nothing changed: SiteB.toml [[email_domains]]")
    assert "host = '127.10.10.99' (the article's step has '127.10.10.20')" in message
    assert {s.name: lab.config_path(s.name).read_text() for s in SITES} == before
    # the person corrects it; now `next` adds only what is missing
    lab.config_path("SiteB").write_text(before["SiteB"].replace("127.10.10.99", "127.10.10.20")
                                        .replace("port = 25\n", f"port = {lab.port}\n"))
    await lab.restart_changed()
    assert await lab.next_stage() == "domain-table"
    assert lab.stage == stage_index("domain-table")
    site_a = lab.config_path("SiteA").read_text()
    assert "# typed by hand, as the README's table says" in site_a and "# my partner" in site_a
    assert {r.domain for r in load_config(lab.config_path("SiteA")).email_domains} == {
        "partner.example", "SiteB.microsoft.com", "SiteC.microsoft.com"}
    site_b = load_config(lab.config_path("SiteB"))
    assert [r.domain.lower() for r in site_b.email_domains].count("sitec.microsoft.com") == 1
    # the lab's own additions are [[table]] blocks a person can extend
    assert "[[email_domains]]" in site_a and "email_domains = [" not in site_a


@ASYNC
async def test_nothing_replicates_unasked_then_next_continues_from_the_directories(lab: Lab):
    assert await lab.next_stage() == "replication-connectors"
    for s in SITES:
        connectors = load_config(lab.config_path(s.name)).replication.connectors
        assert {c.site for c in connectors} == set(others(s))
        assert {c.schedule for c in connectors} == {3 * 3600.0}  # Exchange's default: every 3 hours
    await asyncio.sleep(3.0)  # sites restarted with connectors: nothing is requested by itself
    for s in SITES:
        site = lab.sites[s.name]
        status = await site.replicator.status()
        assert all(p["last_request"] is None for p in status["peers"]), status
        boxes = await site.directory.run(site.directory.mailboxes)
        assert {m.home_site for m in boxes} == {s.name}
    assert lab.stage == stage_index("replication-connectors")

    # Check Now and Request Now done by hand at SiteA only (the admin endpoint, as the CLI does)
    await lab.sites["SiteA"].check_now()
    steps = {s.name: s for s in lab.observe()}
    assert not steps["check-now"].done
    assert steps["check-now"].missing == ("Check Now has not run at SiteB", "Check Now has not run at SiteC")
    assert await lab.next_stage() == "check-now"
    assert await lab.next_stage() == "request-now"
    assert lab.stage == stage_index("request-now")
    # Site Addressing at SiteB by hand, out of the article's order
    org = await lab._administrator()
    await asyncio.to_thread(org.site_addressing, "SiteB", "@microsoft.com", 60.0)
    steps = {s.name: s for s in lab.observe()}
    assert steps["site-addressing-b"].done and not steps["site-addressing-a"].done
    assert lab.stage == stage_index("request-now")  # the walk's stage is the done prefix
    assert await lab.next_stage() == "site-addressing-a"
    assert await lab.next_stage() == "site-addressing-c"  # b was done by hand
    assert lab.stage == stage_index("end")
    assert lab.status_lines("running")[0].startswith("stage end (every step of KB Q196927 is done)")
    assert await lab.next_stage() is None


@ASYNC
async def test_lab_hosts_look_like_the_articles(lab: Lab):
    def greeting() -> bytes:
        with smtplib.SMTP(INTERNET.address, lab.port, timeout=10) as s:
            return s.ehlo()[1] + b"|" + s.docmd("NOOP")[1]

    def relay_from(source: str) -> tuple[int, bytes]:
        with smtplib.SMTP(A.address, lab.port, timeout=10, source_address=(source, 0)) as s:
            s.ehlo("mail.example.net")
            s.mail("alice@example.net")
            return s.rcpt("someone@example.org")

    sock_banner = await asyncio.to_thread(_raw_greeting, INTERNET.address, lab.port)
    assert sock_banner == "220 mail.example.net ESMTP"
    assert "Microsoft" not in (await asyncio.to_thread(greeting)).decode()
    # the Internet host (its own address) may not relay through a site; the lab's users may
    code, text = await asyncio.to_thread(relay_from, INTERNET.address)
    assert (code, text[:5]) == (554, b"5.7.1")
    code, _ = await asyncio.to_thread(relay_from, "127.0.0.1")
    assert code == 250


def _raw_greeting(host: str, port: int) -> str:
    import socket

    with socket.create_connection((host, port), timeout=10) as s:
        line = s.makefile("rb").readline().decode().strip()
        s.sendall(b"QUIT\r\n")
        return line


def test_plan_config_step_adds_only_what_is_missing_and_names_conflicts():
    entries = (("connected_sites", "name", ({"name": "SiteB", "routing_address": "@SiteB.microsoft.com"},
                                            {"name": "SiteC", "routing_address": "@SiteC.microsoft.com"})),)
    raw = tomllib.loads('[[connected_sites]]\nname = "siteb"\nrouting_address = "@siteb.MICROSOFT.com"\n')
    plan = plan_config_step("SiteA", "SiteA.toml", raw, entries)
    assert plan.additions == (("connected_sites", {"name": "SiteC", "routing_address": "@SiteC.microsoft.com"}),)
    assert plan.conflicts == ()
    raw = tomllib.loads('[[connected_sites]]\nname = "SiteB"\nrouting_address = "@SiteB.example.com"\n')
    plan = plan_config_step("SiteA", "SiteA.toml", raw, entries)
    assert plan.conflicts == ("SiteA.toml [[connected_sites]] name = 'SiteB' has routing_address = "
                              "'@SiteB.example.com' (the article's step has '@SiteB.microsoft.com')",)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imsrelay", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_the_cli_walk_by_hand_then_lab_next_to_the_end(tmp_path: Path):
    """`imsrelay lab --stage install` in its own process; a person edits the files and
    runs commands; `lab status` and `lab next` (the README's commands) follow."""
    data = tmp_path / "lab-data"
    port, admin = free_port("127.10.10.10"), free_port("127.10.10.10")
    proc = subprocess.Popen([sys.executable, "-m", "imsrelay", "lab", "--stage", "install", "--data", str(data),
                             "--port", str(port), "--admin-port", str(admin), "--api-port", "0",
                             "--submission-port", str(free_port("127.10.10.10")),
                             "--smtps-port", str(free_port("127.10.10.10"))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = _read_until(proc, "imsrelay lab: ready")
        assert any(line.startswith("stage install: ") for line in lines)
        status = run_cli("lab", "status", "--data", str(data))
        assert status.returncode == 0
        assert status.stdout.startswith(f"stage install; lab running (pid {proc.pid}); data in {data}")
        for s in SITES:
            with (data / "config" / f"{s.name}.toml").open("a") as f:
                f.write(CONNECTED_BY_HAND.format(*others(s)))
        _wait(lambda: "done  connected-sites" in run_cli("lab", "status", "--data", str(data)).stdout)
        # a step done by hand with the real command (Check Now at SiteA)
        check = run_cli("kcc", "check-now", "--config", str(data / "config" / "SiteA.toml"))
        assert check.returncode == 0, check.stderr
        seen = []
        while True:
            step = run_cli("lab", "next", "--data", str(data))
            assert step.returncode == 0, step.stderr
            seen.append(step.stdout.strip())
            if "already at the end" in step.stdout:
                break
            assert len(seen) < 10
        assert seen[0] == "lab: did domain-table; now at stage domain-table"
        assert seen[-2].endswith("now at stage end")
        final = run_cli("lab", "status", "--data", str(data))
        assert final.stdout.startswith("stage end (every step of KB Q196927 is done)")
        # what the person typed is still there
        assert "# typed by hand" in (data / "config" / "SiteC.toml").read_text()
        # the console showed one line per stage, no flood of site events
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        console = lines + out.splitlines()
        assert not [line for line in console if "site.started" in line]
        assert len([line for line in console if line.startswith("lab: stage ")]) == 7
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float = 120.0) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), True)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the lab exited: {lines}")
        lines.append(line.rstrip("\n"))
        if marker in line:
            return lines
    raise AssertionError(f"no {marker!r} within {timeout}s: {lines}")


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        time.sleep(0.3)


def test_every_lab_written_file_takes_the_readmes_table_entries(tmp_path: Path):
    """At every stage, what the lab writes accepts `[[connected_sites]]`,
    `[[email_domains]]` and `[[replication.connectors]]` appended by hand (inline
    arrays would make TOML refuse them: "Cannot mutate immutable namespace")."""
    from imsrelay.config import toml_text
    from imsrelay.lab.docker_configs import compose_site_toml
    from imsrelay.lab.embedded import STAGE_NAMES, internet_mapping, site_mapping

    extra = ('\n[[connected_sites]]\nname = "SiteZ"\nrouting_address = "@SiteZ.example"\n'
             '\n[[email_domains]]\ndomain = "partner.example"\nhost = "127.0.0.40"\n'
             '\n[[replication.connectors]]\nsite = "SiteZ"\n'
             '\n[[mailboxes]]\nalias = "Sales"\n')
    for stage in range(len(STAGE_NAMES)):
        for text in (toml_text.dumps(site_mapping(A, stage, port=2525, data_dir=tmp_path, trusted_keys=KEYS)),
                     compose_site_toml(A, stage)):
            path = tmp_path / "SiteA.toml"
            path.write_text(text + extra)
            config = load_config(path)
            assert "SiteZ" in [c.name for c in config.connected_sites]
            assert "partner.example" in [r.domain for r in config.email_domains]
            assert "SiteZ" in [c.site for c in config.replication.connectors]
            assert "Sales" in [m.alias for m in config.mailboxes]
    internet = tmp_path / "Internet.toml"
    internet.write_text(toml_text.dumps(internet_mapping(port=2525, data_dir=tmp_path)) + extra)
    assert "partner.example" in [r.domain for r in load_config(internet).email_domains]
