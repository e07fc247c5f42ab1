"""The documentation site is tested like code: the pages generated from the code are not
stale (tools/docs_reference.py), ``mkdocs build --strict`` passes (no broken link or anchor,
no page left out of the navigation) and the built site loads nothing from elsewhere, the
events page lists exactly the events the code logs, and figures quoted in the docs are the
ones the code or bench/RESULTS.md has."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import docs_reference  # noqa: E402  (tools/ is not a package)
from console_kit import DOCS_PICTURES, chromium, make_docs_pictures  # noqa: E402
from sitekit import free_port  # noqa: E402

from imsrelay.cli import COMMANDS, build_parser  # noqa: E402
from imsrelay.config import reference  # noqa: E402
from imsrelay.lab.embedded import INTERNET, LAB_PASSWORDS, SITES, STAGE_NAMES  # noqa: E402
from imsrelay.model import settings  # noqa: E402
from imsrelay.testing import LAB_API_HOST, LAB_TOKEN  # noqa: E402

LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "msg"}
EVENT = re.compile(r"[a-z_0-9]+(?:\.[a-z_0-9]+)+")


def test_generated_pages_are_current() -> None:
    assert docs_reference.stale() == [], "run ./dev docs gen and commit the pages"


def test_a_stale_page_is_found(tmp_path: Path) -> None:
    assert set(docs_reference.stale(tmp_path)) == set(docs_reference.pages())  # missing
    page = tmp_path / "docs" / "reference" / "metrics.md"
    page.parent.mkdir(parents=True)
    page.write_text(docs_reference.metrics_page().replace("imsrelay_ndrs_total", "imsrelay_ndrs"))
    assert "docs/reference/metrics.md" in docs_reference.stale(tmp_path)
    page.write_text(docs_reference.metrics_page())
    assert "docs/reference/metrics.md" not in docs_reference.stale(tmp_path)


def test_every_setting_has_its_default_and_meaning_from_settings() -> None:
    keys = {k.name: k for k in reference.keys()}
    # one of every kind of key: a plain field, a renamed field, an array of tables, KEY_DOCS
    assert keys["smtp.max_inbound_connections"].default == f"`{settings.SmtpConfig().max_inbound_connections}`"
    assert keys["site.email_domain"].default == "required"
    assert keys["replication.connectors[].schedule"].default == '`"3h"`' == \
        f'`"{int(settings.REPLICATION_DEFAULT_SCHEDULE // 3600)}h"`'
    assert keys["delivery.retry_intervals"].default == '`["15m", "30m", "1h", "4h"]`'
    assert keys["priorities.non_urgent_lifetime"].default == '`"3d"`'
    assert keys["mailboxes[].addresses"].doc.startswith("secondary proxy addresses")
    assert "auth.mechanisms" in keys and "smtp.max_queued_messages" in keys
    # every key the loader reads is on the page, and nothing else
    assert set(keys) == set(reference.loader_keys())


def test_a_setting_without_a_docstring_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "KEY_DOCS", {k: v for k, v in settings.KEY_DOCS.items()
                                               if k != "priorities.urgent_lifetime"})
    with pytest.raises(LookupError, match="priorities.urgent_lifetime"):
        reference.keys()
    field_docs = reference._field_docs(settings.SmtpConfig)
    assert {f.name for f in dataclasses.fields(settings.SmtpConfig)} - set(field_docs) == set(), \
        "every field of [smtp] read from the file has its docstring"


def _dev_env(tmp_path: Path) -> dict[str, str]:
    """./dev with this test run's virtualenv (its stamp is current: nothing is installed)."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
            "IMSRELAY_VENV": str(Path(sys.executable).parent.parent), "NO_MKDOCS_2_WARNING": "1"}


def test_dev_docs_build_is_strict_and_offline(tmp_path: Path) -> None:
    result = subprocess.run([str(REPO / "dev"), "docs", "build", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=_dev_env(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    site = tmp_path / "site"
    assert (site / "reference" / "configuration.html").exists()
    for suffix, _, _ in DOCS_PICTURES:
        assert (site / f"console{suffix}.png").exists(), suffix
    for page in site.rglob("*.html"):
        html = page.read_text()
        # nothing fetched from elsewhere when a page is viewed: no web fonts, scripts or styles from a CDN
        remote = re.findall(r'<(?:link|script|img)[^>]+(?:href|src)="(https?://[^"]+)"', html)
        assert remote == [], (page, remote)
        assert "fonts.googleapis" not in html and "fonts.gstatic" not in html


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# x\n\n[gone](nowhere.md) and [anchor](#no-such-heading)\n")
    (tmp_path / "mkdocs.yml").write_text((REPO / "mkdocs.yml").read_text().split("\nnav:")[0] + "\n")
    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run([str(mkdocs), "build", "--strict"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=_dev_env(tmp_path))
    assert result.returncode != 0
    assert "nowhere.md" in result.stderr and "no-such-heading" in result.stderr


def test_dev_docs_serves_the_site_on_loopback(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    server = subprocess.Popen([str(REPO / "dev"), "docs", "serve", "-a", f"127.0.0.1:{port}", "--no-livereload"],
                              cwd=REPO, env=_dev_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/how-to/console.html", timeout=5) as r:
                    page = r.read().decode()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:] if server.stderr else ""
                assert time.monotonic() < deadline, "mkdocs serve did not answer in time"
                time.sleep(0.5)
        assert "console-replication.png" in page
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_console_pictures_are_the_browser_helpers(tmp_path: Path) -> None:
    referenced = "\n".join(p.read_text() for p in (REPO / "docs").rglob("*.md"))
    for suffix, _, _ in DOCS_PICTURES:
        name = f"console{suffix}.png"
        assert f"]({name})" in referenced or f"](../{name})" in referenced, f"docs never show {name}"
        assert _png_size(REPO / "docs" / name) == (1280, 800)
    assert chromium(), "the console's pictures need Debian's chromium (./dev test installs it)"
    made = make_docs_pictures(tmp_path / "console.png")
    assert [p.name for p in made] == [f"console{s}.png" for s, _, _ in DOCS_PICTURES]
    for path in made:
        assert _png_size(path) == (1280, 800) and path.stat().st_size > 20_000


def _logged_events() -> tuple[set[str], set[str], set[str]]:
    """(event names the code passes to a logger, every event-shaped string constant in the
    code, the prefixes of f-string event names such as ``f"fault.{what}"``)."""
    logged, constants, prefixes = set(), set(), set()
    for path in (REPO / "imsrelay").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and EVENT.fullmatch(node.value):
                constants.add(node.value)
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                head = str(node.values[0].value)
                if re.fullmatch(r"[a-z_]+\.", head):
                    prefixes.add(head)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOG_METHODS
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                    and EVENT.fullmatch(node.args[0].value)):
                logged.add(node.args[0].value)
    return logged, constants, prefixes


def _documented_events() -> set[str]:
    names = set()
    for line in (REPO / "docs" / "events.md").read_text().splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([a-z_0-9]+(?:\.[a-z_0-9]+)+)`", line.split("|")[1]))
    return names


def test_the_events_page_lists_the_events_the_code_logs() -> None:
    logged, constants, prefixes = _logged_events()
    documented = _documented_events()
    assert len(logged) > 80
    assert logged - documented == set(), "events logged but not in docs/events.md"
    gone = {name for name in documented - constants if not name.startswith(tuple(prefixes))}
    assert gone == set(), "docs/events.md lists events the code no longer has"


def test_figures_in_the_docs_are_the_codes() -> None:
    promises = (REPO / "docs" / "explanation" / "promises.md").read_text()
    bound = re.search(r"assert per_message < ([\d_]+)", (REPO / "tests" / "test_memory_bounds.py").read_text())
    assert bound and f"under {int(bound.group(1).replace('_', '')):,} bytes" in promises
    results = (REPO / "bench" / "RESULTS.md").read_text()
    figures = (REPO / "docs" / "reference" / "benchmarks.md").read_text()
    assert re.search(r"^## Targets.*?\n\n(\|.*?)\n\n", results, re.S | re.M).group(1) in figures  # type: ignore[union-attr]
    # no page but the generated one quotes the benchmark's ratios to Postfix
    for page in (REPO / "docs").rglob("*.md"):
        if page.name != "benchmarks.md":
            assert not re.search(r"\d\.\d+× Postfix", page.read_text()), page


def test_the_kb_page_covers_every_stage_of_the_labs() -> None:
    page = (REPO / "docs" / "explanation" / "kb-q196927.md").read_text()
    for stage in STAGE_NAMES:
        assert f"`{stage}`" in page, stage


def test_dev_docs_knows_its_commands(tmp_path: Path) -> None:
    result = subprocess.run([str(REPO / "dev"), "docs", "nonsense"], capture_output=True, text=True, timeout=120,
                            cwd=REPO, env=_dev_env(tmp_path))
    assert result.returncode == 2 and "serve, build, gen" in result.stderr


def test_the_command_map_lists_every_command() -> None:
    table = (REPO / "docs" / "how-to" / "real-site.md").read_text()
    listed = set(re.findall(r"^\| `([a-z-]+)", table, re.M))
    assert listed == set(COMMANDS), "docs/how-to/real-site.md's command table and imsrelay's commands differ"


def _lab_defaults() -> dict[str, object]:
    parser = build_parser(["lab"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["lab"]
    return {a.dest: a.default for a in sub._actions}


def test_the_readme_and_tutorial_quote_the_labs_own_defaults() -> None:
    """The addresses, ports, token and passwords a newcomer types are the lab's."""
    d = _lab_defaults()
    readme = (REPO / "README.md").read_text()
    tutorial = (REPO / "docs" / "tutorials" / "embedded-lab.md").read_text()
    a, b, c = (s.address for s in SITES)
    assert f"{a}/.{b.rsplit('.', 1)[1]}/.{c.rsplit('.', 1)[1]}, port {d['port']}" in readme
    assert f"--server {a}:{d['port']}" in readme and f"--server {INTERNET.address}:{d['port']}" in tutorial
    assert f"http://{LAB_API_HOST}:{d['api_port']}/api/v1" in tutorial and f"token {LAB_TOKEN}" in tutorial
    for site in SITES:
        assert f"SMTP {site.address}:{d['port']}   admin http://{site.address}:{d['admin_port']}" in tutorial
        assert f"submission {site.address}:{d['submission_port']} (STARTTLS + AUTH)" in tutorial
        assert f"{site.address}:{d['smtps_port']} (TLS + AUTH)" in tutorial
    console = (REPO / "docs" / "how-to" / "console.md").read_text()
    assert f"http://{d['console_listen']}:{d['console_port']}/" in console
    assert f"default {d['console_listen']}, {d['console_port']}" in console
    assert f"(how long `lab next` waits for the lab's answer, default {d['wait']:g})" in tutorial
    for login, password in LAB_PASSWORDS.items():
        assert password in tutorial and login in tutorial


def test_the_docker_tutorial_uses_only_commands_lab_sh_has() -> None:
    script = (REPO / "docker" / "lab.sh").read_text()
    known = set(re.findall(r"^    ([a-z]+)\)", script[script.index('case "$cmd" in'):], re.M))
    used = set(re.findall(r"docker/lab\.sh ([a-z]+)", (REPO / "docs" / "tutorials" / "docker-lab.md").read_text()))
    assert {"up", "down", "compose"} <= used
    assert used <= known, f"the Docker tutorial uses commands docker/lab.sh lacks: {sorted(used - known)}"
    services = set(re.findall(r"^  ([a-z]+):$", (REPO / "docker-compose.yml").read_text(), re.M))
    for service in re.findall(r"docker/lab\.sh compose exec(?: -T)? ([a-z]+) ", (REPO / "docs" / "tutorials" /
                                                                                 "docker-lab.md").read_text()):
        assert service in services, service


def test_an_admin_route_without_a_docstring_fails(tmp_path: Path) -> None:
    module = tmp_path / "server.py"
    module.write_text("class S:\n    def routes(self, r):\n        r.add_get('/documented', self.a)\n"
                      "        r.add_post('/bare', self.b)\n\n"
                      "    async def a(self, request):\n        \"\"\"Answers.\"\"\"\n\n"
                      "    async def b(self, request):\n        pass\n")
    with pytest.raises(LookupError, match="handler b of /bare has no docstring"):
        docs_reference._routes(module)
    module.write_text(module.read_text().replace("        pass\n", '        """Takes."""\n'))
    assert docs_reference._routes(module) == [("GET", "/documented", "Answers."), ("POST", "/bare", "Takes.")]
