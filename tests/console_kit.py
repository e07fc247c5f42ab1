"""Helpers for the console's browser tests: a real `imsrelay lab` process, Debian's
chromium driven by Playwright, a loopback "remote" server that counts requests,
and the documentation's pictures (docs/console*.png) made by the same code:

    .venv/bin/python tests/console_kit.py docs/console.png
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from sitekit import free_port  # noqa: E402

TOKEN = "lab-admin-token"
CONSOLE_HOST = "127.10.10.1"
SITE_ADDRESSES = {"SiteA": "127.10.10.10", "SiteB": "127.10.10.15", "SiteC": "127.10.10.20",
                  "Internet": "127.10.10.100"}


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class LabProcess:
    """`imsrelay lab` run as a user runs it, on free ports of the lab's addresses."""

    data: Path
    smtp_port: int
    admin_port: int
    console_port: int
    process: subprocess.Popen[str]
    output: list[str]

    @property
    def console_url(self) -> str:
        return f"http://{CONSOLE_HOST}:{self.console_port}/"

    def admin(self, site: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(f"http://{SITE_ADDRESSES[site]}:{self.admin_port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=30) as resp:
            return json.loads(resp.read())

    def send(self, via: str, message: EmailMessage | bytes, sender: str, recipients: list[str]) -> None:
        with smtplib.SMTP(SITE_ADDRESSES[via], self.smtp_port, timeout=30) as s:
            if isinstance(message, bytes):
                s.sendmail(sender, recipients, message)
            else:
                s.send_message(message, from_addr=sender, to_addrs=recipients)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_lab(data: Path, *, stage: str = "site-addressing-a", timeout: float = 180.0) -> LabProcess:
    smtp_port = free_port("127.10.10.10")
    admin_port = free_port("127.10.10.10")
    console_port = free_port(CONSOLE_HOST)
    api_port = free_port(CONSOLE_HOST)
    exe = Path(sys.executable).with_name("imsrelay")
    cmd = [str(exe), "lab", "--data", str(data), "--port", str(smtp_port), "--admin-port", str(admin_port),
           "--api-port", str(api_port), "--console-listen", CONSOLE_HOST, "--console-port", str(console_port),
           "--stage", stage,
           # free ports for submission too: the defaults (2587, 2465) may be another lab's on this machine
           "--submission-port", str(free_port("127.10.10.10")), "--smtps-port", str(free_port("127.10.10.10"))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    lab = LabProcess(data, smtp_port, admin_port, console_port, process, output)
    seen = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line.rstrip("\n"))
            if line.startswith("imsrelay lab: ready"):
                seen.set()
    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not seen.wait(0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            lab.stop()
            raise AssertionError("the lab did not get ready:\n" + "\n".join(output[-40:]))
    return lab


class CountingServer:
    """A loopback HTTP server standing for "the Internet": counts every request."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def launch_browser(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])


def log_in(page: Any, url: str, token: str = TOKEN) -> None:
    page.goto(url)
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#tree a.tree-org")
    page.wait_for_selector("#live.on")


def sample_message(subject: str, *, sender: str = "alice@example.net", to: str = "User2@microsoft.com",
                   message_id: str | None = None) -> EmailMessage:
    m = EmailMessage()
    m["From"] = f"Alice <{sender}>"
    m["To"] = to
    m["Subject"] = subject
    if message_id:
        m["Message-ID"] = message_id
    m.set_content(f"{subject}\n\nA message for the console, sent by SMTP.\n")
    m.add_alternative(f"<p>{subject}: <b>HTML</b> part</p>", subtype="html")
    m.add_attachment(b"quarterly numbers\n", maintype="text", subtype="csv", filename="numbers.csv")
    return m


def readme_picture(page: Any, url: str, path: Path, *, message_id: str | None = None) -> Path:
    """A README picture at a laptop's width: the organisation, or a message's path
    through it (``message_id``)."""
    page.set_viewport_size({"width": 1280, "height": 800})
    if message_id:
        page.goto(url + "#/tracking?q=" + urllib.parse.quote(message_id, safe=""))
        page.wait_for_selector("article.story .hop-node.mailbox")
    else:
        page.goto(url + "#/")
        page.wait_for_selector(".site-card")
    page.wait_for_timeout(300)
    page.screenshot(path=str(path))
    return path


# The documentation's pictures of the console (docs/how-to/console.md): file name suffix,
# the console's route, what to wait for.  "" is the message's path (``readme_picture``).
DOCS_PICTURES = (
    ("", "#/tracking?q=", "article.story .hop-node.mailbox"),
    ("-organisation", "#/", ".site-card"),
    ("-mail", "#/mail", ".messages tr.unread, .messages tr.read"),
    ("-replication", "#/site/SiteA/replication", "table.replication"),
)
DOCS_MESSAGE_ID = "<readme-1@example.net>"


def docs_picture(page: Any, url: str, path: Path, route: str, ready: str) -> Path:
    """One of the documentation's pictures, at a laptop's width."""
    page.set_viewport_size({"width": 1280, "height": 800})
    if route == "#/tracking?q=":
        route += urllib.parse.quote(DOCS_MESSAGE_ID, safe="")
    page.goto(url + route)
    page.wait_for_selector(ready)
    page.wait_for_timeout(300)
    page.screenshot(path=str(path))
    return path


def make_docs_pictures(out: Path) -> list[Path]:
    """Start a lab at the article's end, send a message from the Internet to User2, log in
    with chromium and take every picture of ``DOCS_PICTURES`` next to ``out``
    (``docs/console.png``, ``docs/console-organisation.png``, ...)."""
    import tempfile

    from playwright.sync_api import sync_playwright

    paths = [out.with_name(out.stem + suffix + out.suffix) for suffix, _, _ in DOCS_PICTURES]
    with tempfile.TemporaryDirectory() as tmp:
        lab = start_lab(Path(tmp) / "lab", stage="end")
        try:
            lab.send("Internet", sample_message("Quarterly numbers", message_id=DOCS_MESSAGE_ID),
                     "alice@example.net", ["User2@microsoft.com"])
            with sync_playwright() as p:
                browser = launch_browser(p)
                page = browser.new_page()
                log_in(page, lab.console_url)
                for path, (_, route, ready) in zip(paths, DOCS_PICTURES, strict=True):
                    docs_picture(page, lab.console_url, path, route, ready)
                browser.close()
        finally:
            lab.stop()
    return paths


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "docs/console.png").resolve()
    paths = make_docs_pictures(out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def text_of(page: Any, selector: str) -> str:
    return re.sub(r"\s+", " ", page.inner_text(selector)).strip()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
