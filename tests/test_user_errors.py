"""Every user error is one line on stderr with a documented exit status (CLI), or a
4xx with a JSON message (admin endpoint) — never a traceback, never a 500.

Table-driven: each row is a command line (or an HTTP request) with bad input and
what the user must see.  The CLI rows run ``imsrelay.cli.main`` — the console
script's entry point — in this process, against a real site file and database;
the online rows against a real running site with its admin endpoint.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from sitekit import free_port, running_site, site_mapping, write_site_file
from structlog.testing import capture_logs

from imsrelay.cli import main

TOKEN = "user-errors-token"

BAD_SITE_ADDRESSES = ["@", "@not a domain", "@a..b", "@-x.com", "microsoft.com", "@[1.2.3.4]"]


@pytest.fixture(autouse=True)
def keep_logging():
    """The in-process CLI configures logging onto capsys's stream, which closes after
    the test: give later tests the configuration they had."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def run_cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse
        status = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line(err: str, status: int, expected_status: int, expect: str) -> None:
    lines = err.strip().splitlines()
    assert status == expected_status, (status, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert expect.lower() in lines[0].lower(), lines[0]
    assert lines[0].startswith("imsrelay"), lines[0]


@pytest.fixture
def stopped_site(tmp_path: Path) -> Path:
    """A site file whose database exists (started once and stopped)."""
    path, config = write_site_file(tmp_path, site_mapping(
        "SiteA", port=free_port(), admin={"port": free_port(), "token": TOKEN}))

    async def once() -> None:
        async with running_site(config):
            pass

    asyncio.run(once())
    return path


def offline_rows(cfg: str, tmp: Path) -> list[tuple[list[str], int, str]]:
    rows: list[tuple[list[str], int, str]] = [
        (["site-addressing", "set", bad, "--offline", "-c", cfg], 2, "site address") for bad in BAD_SITE_ADDRESSES]
    rows += [
        (["directory", "add", "bad alias", "--offline", "-c", cfg], 2, "not a valid alias"),
        (["directory", "add", "User1", "--offline", "-c", cfg], 2, "already exists"),
        (["directory", "delete", "Nobody", "--offline", "-c", cfg], 1, "no mailbox Nobody"),
        (["queue", "show", "NOPE", "-c", cfg], 1, "no message NOPE"),
        (["queue", "delete", "NOPE", "-c", cfg], 1, "not in the queue"),
        (["queue", "show", "bad/id", "-c", cfg], 2, "not a queue id"),
        (["queue", "delete", "bad/id", "-c", cfg], 2, "not a queue id"),
        (["queue", "retry", "NOPE", "-c", cfg], 1, "no message NOPE"),
        (["route", "not-an-address", "-c", cfg], 2, "user@domain"),
        (["route", "a@[999.1.1.1]", "-c", cfg], 2, "address literal"),
        (["route", "User1@SiteA.microsoft.com", "--from", "not an address", "-c", cfg], 2,
         "553 5.1.7 Bad sender address syntax"),
        (["serve", "--workers", "0", "-c", cfg], 2, "--workers"),
        (["serve", "--workers", "many", "-c", cfg], 2, "--workers"),
        (["serve", "-c", str(tmp / "missing.toml")], 2, "no such file"),
        (["check-config", str(tmp / "missing.toml")], 2, "no such file"),
        (["lab", "--port", "99999", "--data", str(tmp / "lab")], 2, "--port"),
        (["lab", "--admin-port", "0", "--data", str(tmp / "lab")], 2, "--admin-port"),
        (["lab", "--stage", "nonsense", "--data", str(tmp / "lab")], 2, "unknown stage"),
        (["lab", "next", "--data", str(tmp / "lab")], 2, "no lab"),
        (["lab", "status", "--data", str(tmp / "lab")], 2, "no lab"),
        (["org-setup", "--site", "not-a-url"], 2, "--site"),
        (["org-setup", "--wait", "-1", "--site", "http://127.0.0.1:1=t", "--site", "http://127.0.0.1:2=t"],
         2, "--wait"),
        (["replicate", "status", "-c", cfg], 3, "not running"),
        (["kcc", "check-now", "-c", cfg], 3, "not running"),
        (["directory", "add", "User9", "-c", cfg], 3, "not running"),
        (["lab", "--data", str(tmp / "a-file" / "lab")], 2, "cannot create the lab's data directory"),
        (["org-setup", "--wait", "0.5", "--site", "http://127.0.0.1:1=t", "--site", "http://127.0.0.1:2=t"],
         3, "no admin endpoint"),
        (["nonsense-command"], 2, "invalid choice"),
        (["queue"], 2, "required"),
    ]
    return rows


def test_every_command_refuses_bad_input_in_one_line(stopped_site: Path, tmp_path: Path, capsys) -> None:
    cfg = str(stopped_site)
    (tmp_path / "a-file").write_text("not a directory")
    for argv, expected_status, expect in offline_rows(cfg, tmp_path):
        status, _, err = run_cli(capsys, argv)
        assert_one_line(err, status, expected_status, expect)
    # `lab --port 99999` refused before anything is written
    assert not (tmp_path / "lab").exists()


def test_help_lists_the_exit_statuses() -> None:
    out = subprocess.run([sys.executable, "-m", "imsrelay", "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    assert "exit status:" in out
    for code in ("0 ", "1 ", "2 ", "3 ", "130"):
        assert f"\n  {code}" in out


def test_a_traceback_never_reaches_the_user_in_a_real_process(stopped_site: Path) -> None:
    """The console script itself (a separate process), for the issue's first report."""
    result = subprocess.run([sys.executable, "-m", "imsrelay", "site-addressing", "set", "@", "--offline",
                             "-c", str(stopped_site)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


async def test_online_commands_and_admin_endpoints_answer_4xx_with_a_message(tmp_path: Path, capsys) -> None:
    admin_port = free_port()
    path, config = write_site_file(tmp_path, site_mapping(
        "SiteA", port=free_port(), admin={"port": admin_port, "token": TOKEN}))
    cfg = str(path)
    base = f"http://127.0.0.1:{admin_port}"
    huge_int = b'{"alias": 1' + b"0" * 5000 + b"}"
    nested = b'{"alias": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    requests: list[tuple[str, str, bytes | None, int, str]] = [
        ("POST", "/directory/mailboxes", b"{not json", 400, "not JSON"),
        ("POST", "/directory/mailboxes", b"\xff\xfe", 400, "UTF-8"),
        ("POST", "/directory/mailboxes", b"[1, 2]", 400, "JSON object"),
        ("POST", "/directory/mailboxes", nested, 400, "nested"),
        ("POST", "/directory/mailboxes", huge_int, 400, "out of range"),
        ("POST", "/directory/mailboxes", b'{"alias": 5}', 400, "alias must be a string"),
        ("POST", "/directory/mailboxes", b'{"alias": true}', 400, "alias must be a string"),
        ("POST", "/directory/mailboxes", b'{}', 400, "alias is required"),
        ("POST", "/directory/mailboxes", b'{"alias": "bad alias"}', 400, "not a valid alias"),
        ("POST", "/directory/mailboxes", b'{"alias": "User1"}', 409, "already exists"),
        ("POST", "/directory/mailboxes", b'{"alias": "x", "addresses": ["smtp:not an address"]}', 400, "address"),
        ("POST", "/directory/mailboxes", b'{"alias": "' + b"x" * 70_000 + b'"}', 413, "large"),
        ("DELETE", "/directory/mailboxes/Nobody", None, 404, "no mailbox"),
        ("POST", "/replication/request-now", b'{"site": "SiteZ"}', 409, "no routing address"),
        ("POST", "/replication/request-now", b'{"site": "SiteB", "full": "yes"}', 400, "full must be a boolean"),
        ("POST", "/queue/retry", b'{"queue_id": "NOPE"}', 404, "no message"),
        ("POST", "/queue/retry", b'{"queue_id": 7}', 400, "queue_id must be a string"),
        ("GET", "/no/such/endpoint", None, 404, "Not Found"),
        ("PUT", "/status", None, 405, "Not Allowed"),
    ]
    requests += [("POST", "/site-addressing", b'{"address": "%s", "update_mailboxes": true}' % bad.encode(),
                  400, "site address") for bad in BAD_SITE_ADDRESSES]
    online = [(["site-addressing", "set", bad, "-c", cfg], 2, "site address") for bad in BAD_SITE_ADDRESSES]
    online += [
        (["directory", "add", "bad alias", "-c", cfg], 2, "not a valid alias"),
        (["directory", "delete", "Nobody", "-c", cfg], 1, "no mailbox"),
        (["replicate", "request-now", "--site", "SiteZ", "-c", cfg], 2, "no routing address"),
        (["site-addressing", "set", "@microsoft.com", "--offline", "-c", cfg], 2, "running"),
    ]
    with capture_logs() as logs:
        async with running_site(config):
            headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
            async with aiohttp.ClientSession() as http:
                for method, url, body, status, expect in requests:
                    async with http.request(method, base + url, data=body, headers=headers) as resp:
                        answer = await resp.json(content_type=None)
                        assert resp.status == status, (method, url, body[:40] if body else None, resp.status, answer)
                        assert expect.lower() in answer["error"].lower(), (url, answer)
                async with http.get(base + "/status") as resp:
                    assert resp.status == 401 and "token" in (await resp.json())["error"]
            for argv, expected_status, expect in online:
                status, _, err = await asyncio.to_thread(run_cli, capsys, argv)
                assert_one_line(err, status, expected_status, expect)
    assert not [e for e in logs if e["event"] == "admin.internal_error"], logs


def test_check_config_reports_every_error_one_line_each_listen_must_be_an_ip(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[site]\norganisation = "O"\nname = "SiteA"\nserver = "ServerA"\nemail_domain = "a.example"\n'
                   '[smtp]\nlisten = "not-an-ip"\nport = 99999\n[routing]\naddress_literals = "maybe"\n'
                   '[dns]\nnameservers = ["ns1.example"]\n')
    status, out, err = run_cli(capsys, ["check-config", str(bad)])
    lines = err.strip().splitlines()
    assert status == 2 and out == "" and "Traceback" not in err
    assert len(lines) == 4, lines
    assert all(line.startswith(f"imsrelay: configuration error: {bad}: ") for line in lines)
    assert any("smtp.listen: 'not-an-ip' must be an IP address" in line for line in lines)
    assert any("routing.address_literals: must be one of deliver, refuse" in line for line in lines)
    # serve refuses the same file before anything starts (nothing asks a resolver)
    status, _, err = run_cli(capsys, ["serve", "-c", str(bad)])
    assert status == 2 and len(err.strip().splitlines()) == 4


def test_check_config_refuses_a_connected_site_differing_only_in_case(tmp_path: Path, capsys) -> None:
    path, _ = write_site_file(tmp_path, site_mapping("SiteA", port=free_port()))
    text = path.read_text() + ('\n[[connected_sites]]\nname = "SiteB"\nrouting_address = "@SiteB.microsoft.com"\n'
                               '\n[[connected_sites]]\nname = "siteb"\nrouting_address = "@SiteB.microsoft.com"\n')
    path.write_text(text)
    status, _, err = run_cli(capsys, ["check-config", str(path)])
    assert_one_line(err, status, 2, "connected_sites[1].name: 'siteb' differs from the entry 'SiteB' only in case")


def test_every_sub_command_help_page_says_what_it_does() -> None:
    import argparse

    from imsrelay.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    if not (sub.description or "").strip():
                        missing.append(sub.prog)
                    walk(sub)

    walk(build_parser(None))
    assert missing == []


def test_lab_stage_before_the_lab_on_disk_is_refused_before_anything_starts(tmp_path: Path, capsys) -> None:
    from imsrelay.lab.embedded import Lab

    lab = Lab(tmp_path / "lab", say=lambda line: None)
    lab._write_install()
    lab._append_entries("connected-sites", lab._plans("connected-sites"))
    assert lab.stage == 1
    status, out, err = run_cli(capsys, ["lab", "--stage", "install", "--data", str(tmp_path / "lab")])
    assert_one_line(err, status, 2, "is already at stage connected-sites, past install")
    assert out == "" and not (tmp_path / "lab" / "lab.pid").exists()


def test_a_busy_port_names_the_option_that_moves_it() -> None:
    import argparse

    from imsrelay.commands.lab import busy_port_hint

    args = argparse.Namespace(port=2525, admin_port=8025, submission_port=2587, smtps_port=2465, api_host=None,
                              api_port=8025, console_listen="127.10.10.1", console_port=8080)
    bind = "[Errno 98] error while attempting to bind on address ('{}', {}): address already in use"
    assert "--api-port" in busy_port_hint(bind.format("127.10.10.1", 8025), args)
    assert busy_port_hint(bind.format("127.10.10.10", 8025), args) == "choose another port with --admin-port"
    assert busy_port_hint(bind.format("127.10.10.15", 2525), args) == "choose another port with --port"
    assert "--console-port" in busy_port_hint(bind.format("127.10.10.1", 8080), args)
