"""KB Q196927 walked in the Docker lab's web console, every step by clicking, from the
article's first step (the same walk as tests/test_console_walk.py; Debian's chromium
driven by Playwright).

The compose lab comes up with docker/console-walk.override.yml: each site serves a
file in a writable directory (stage install, from ``imsrelay.lab.docker_configs``);
`setup` does not run.  The walk changes the files through the console's property
pages and, as Exchange asked after such a change, restarts each site's Internet Mail
Service from the console ("Restart the Internet Mail Service now": `imsrelay serve`
restarts the site in its container).  Unlike the embedded lab, the sites find each
other by the lab's DNS MX before the E-Mail Domain table, and the Internet is a real
Postfix (example.net).

Needs a Docker engine (marker ``docker``); one compose lab at a time (the engine
lock); its own project, removed with its volumes at the end.
"""

from __future__ import annotations

import os
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest
from compose_kit import (
    CONSOLE_PORT,
    INTERNET_SMTP,
    REPO,
    SITES,
    TOKEN,
    ComposeLab,
    LabError,
    docker_skip_reason,
    engine_lock,
    poll,
    progress_to_terminal,
)
from console_kit import sample_message
from test_console_walk import in_browser, walk_the_article

from imsrelay.lab.docker_configs import COMPOSE_ADDRESSES, compose_site_toml
from imsrelay.lab.embedded import SITES as LAB_SITES

pytestmark = [pytest.mark.docker, pytest.mark.slow]
PROJECT = os.environ.get("IMSRELAY_TEST_CONSOLE_WALK_PROJECT", "imsrelayconsolewalk")
OVERRIDE = REPO / "docker" / "console-walk.override.yml"
SERVICE = {"SiteA": "sitea", "SiteB": "siteb", "SiteC": "sitec"}


class ComposeTarget:
    """The Docker lab's console: no stage control, sites restarted from the console."""

    staged = False
    install_path = ["SiteA", "SiteB"]  # SiteB.microsoft.com by the lab DNS's MX, straight to SiteB
    smtp_port = 25  # E-Mail Domain entries name the sites' addresses on the lab network

    def __init__(self, lab: ComposeLab) -> None:
        self.lab = lab
        self.console_url = f"http://127.0.0.1:{CONSOLE_PORT}/"

    def host(self, site: str) -> str:
        return COMPOSE_ADDRESSES[site]

    def admin(self, site: str, method: str, path: str) -> Any:
        try:
            return self.lab.admin(SERVICE[site], method, path, timeout=5)
        except LabError as exc:  # a site restarting answers 5xx or nothing: ask again
            raise RuntimeError(str(exc)) from None

    def send(self, via: str, sender: str, to: str, subject: str, message_id: str) -> None:
        port = SITES[SERVICE[via]][1] if via in SERVICE else INTERNET_SMTP
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.send_message(sample_message(subject, sender=sender, to=to, message_id=message_id),
                           from_addr=sender, to_addrs=[to])

    def from_internet(self, to: str, subject: str, message_id: str) -> list[str]:
        self.send("Internet", "alice@example.net", to, subject, message_id)
        return ["SiteA"]  # Postfix (not an imsrelay site) → MX Server1.SiteA


def write_install_configs(directory: Path) -> None:
    for s in LAB_SITES:
        site_dir = directory / f"site{s.name[-1]}"
        site_dir.mkdir(parents=True, exist_ok=True)
        site_dir.chmod(0o777)  # the sites run as the image's user `imsrelay`
        path = site_dir / "site.toml"
        path.write_text(compose_site_toml(s, 0))
        path.chmod(0o666)


def test_the_article_walked_in_the_docker_labs_console(pytestconfig, tmp_path):
    reason = docker_skip_reason()
    if reason:
        pytest.skip(reason)
    lab = ComposeLab(PROJECT, progress=progress_to_terminal(pytestconfig))
    configs = REPO / "build" / f"console-walk-{PROJECT}"
    lab.env["IMSRELAY_WALK_CONFIGS"] = str(configs)
    services = ("dns", "sitea", "siteb", "sitec", "internet", "console")
    with engine_lock():
        try:
            started = time.monotonic()
            lab.lab_sh("down", "--volumes", timeout=300)
            write_install_configs(configs)
            lab.lab_sh("build", *services)
            lab.lab_sh("compose", "-f", str(OVERRIDE), "up", "-d", "--remove-orphans", *services, timeout=300)
            lab.lab_sh("wait", timeout=300)
            for service in ("sitea", "siteb", "sitec"):
                poll(lambda s=service: lab.admin_up(s), timeout=90, what=f"{service}'s admin endpoint")
            print(f"compose lab up at stage install in {time.monotonic() - started:.0f}s")
            shots = Path(os.environ.get("IMSRELAY_WALK_SHOTS") or tmp_path / "walk")
            in_browser(ComposeTarget(lab), shots, TOKEN, walk_the_article)
            print(f"the walk in the Docker lab's console took {time.monotonic() - started:.0f}s in all")
        finally:
            if not os.environ.get("IMSRELAY_DOCKER_KEEP"):
                lab.down()
