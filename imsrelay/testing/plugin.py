"""pytest plugin (entry point ``pytest11``: ``imsrelay``): the ``imsrelay_lab`` fixture.

``imsrelay_lab`` (session scope) starts the embedded lab (``imsrelay lab``) in a
temporary directory on free loopback ports, waits until it is ready and yields an
``imsrelay.testing.LabClient``.  To attach to a lab that is already running — an
``imsrelay lab`` of your own, or the Docker lab — give its URL(s) instead::

    pytest --imsrelay-url http://127.10.10.1:8025
    pytest --imsrelay-url http://127.0.0.1:8510,http://127.0.0.1:8515,http://127.0.0.1:8520 \\
           --imsrelay-smtp SiteA=127.0.0.1:2510 --imsrelay-smtp SiteB=127.0.0.1:2515

Attached to a lab with no ``Internet`` site of its own (the Docker lab, whose Internet
host is Postfix), ``via="Internet"`` sends to ``127.0.0.1:2600`` (``LAB_INTERNET_SMTP_PORT``
moves it, as it moves the Docker lab's published port) unless ``--imsrelay-smtp`` says.

(or ``IMSRELAY_LAB_URL``, ``IMSRELAY_LAB_TOKEN``, ``IMSRELAY_LAB_SMTP``;
``IMSRELAY_LAB_READY_TIMEOUT`` seconds to wait for readiness, default 120).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imsrelay.testing import LAB_API_HOST, LAB_TOKEN, EmbeddedLab, LabClient

DOCKER_INTERNET_SMTP_PORT = 2600  # docker-compose.yml: the Internet (Postfix) on 127.0.0.1:${LAB_INTERNET_SMTP_PORT:-2600}


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("imsrelay", "imsrelay lab")
    group.addoption("--imsrelay-url", action="append", default=[], metavar="URL",
                    help="attach imsrelay_lab to a running lab: its lab endpoint, or each site's admin endpoint "
                         "(repeat or comma-separate); default: start an embedded lab ($IMSRELAY_LAB_URL)")
    group.addoption("--imsrelay-token", default=None,
                    help=f"bearer token of those endpoints (default $IMSRELAY_LAB_TOKEN or {LAB_TOKEN})")
    group.addoption("--imsrelay-port", type=int, default=None, metavar="N",
                    help="SMTP port of every host of the embedded lab (default: a free one)")
    group.addoption("--imsrelay-admin-port", type=int, default=None, metavar="N",
                    help="admin port of the embedded lab's sites (default: a free one)")
    group.addoption("--imsrelay-api", default=None, metavar="HOST:PORT",
                    help="where the embedded lab's endpoint listens (default 127.10.10.1 on a free port)")
    group.addoption("--imsrelay-smtp", action="append", default=[], metavar="SITE=HOST:PORT",
                    help="where to send mail for SITE when the endpoints' own addresses are not reachable "
                         "(the Docker lab's published ports; $IMSRELAY_LAB_SMTP, comma-separated)")


def _smtp_map(values: list[str]) -> dict[str, tuple[str, int]]:
    out = {}
    for v in values:
        for item in v.split(","):
            if not item.strip():
                continue
            site, _, hostport = item.strip().partition("=")
            host, _, port = hostport.rpartition(":")
            if not site or not host or not port.isdigit():
                raise pytest.UsageError(f"--imsrelay-smtp {item!r}: expected SITE=HOST:PORT")
            out[site] = (host, int(port))
    return out


@pytest.fixture(scope="session")
def imsrelay_lab(request: Any, tmp_path_factory: Any) -> Iterator[LabClient]:
    """A ready imsrelay lab (embedded, or the one given by --imsrelay-url) and its client."""
    urls = list(request.config.getoption("--imsrelay-url") or [])
    if not urls and os.environ.get("IMSRELAY_LAB_URL"):
        urls = [os.environ["IMSRELAY_LAB_URL"]]
    token = request.config.getoption("--imsrelay-token") or os.environ.get("IMSRELAY_LAB_TOKEN") or LAB_TOKEN
    smtp = _smtp_map(list(request.config.getoption("--imsrelay-smtp") or [])
                     + ([os.environ["IMSRELAY_LAB_SMTP"]] if os.environ.get("IMSRELAY_LAB_SMTP") else []))
    if urls:
        client = LabClient(urls, token, smtp=smtp)
        client.wait_ready(float(os.environ.get("IMSRELAY_LAB_READY_TIMEOUT", "120")))
        names = {s["site"].lower() for s in client.sites()}
        if "internet" not in names and "Internet" not in client.smtp_override:
            # the Docker lab: its Internet host is Postfix (no admin endpoint), published on 127.0.0.1
            client.smtp_override["Internet"] = ("127.0.0.1", int(os.environ.get("LAB_INTERNET_SMTP_PORT") or
                                                               DOCKER_INTERNET_SMTP_PORT))
        yield client
        return
    api = request.config.getoption("--imsrelay-api")
    api_host, _, api_port = (api or "").rpartition(":")
    if api and not api_port.isdigit():
        raise pytest.UsageError(f"--imsrelay-api {api!r}: expected HOST:PORT")
    data, own = _lab_data_dir(tmp_path_factory)
    lab = EmbeddedLab(data, port=request.config.getoption("--imsrelay-port"),
                      admin_port=request.config.getoption("--imsrelay-admin-port"),
                      api_host=api_host if api else LAB_API_HOST, api_port=int(api_port) if api else None)
    try:
        client = lab.start()
        client.smtp_override.update(smtp)
        yield client
    finally:
        lab.stop()
        if own:
            shutil.rmtree(data, ignore_errors=True)


def _lab_data_dir(tmp_path_factory: Any) -> tuple[Path, bool]:
    """Where the embedded lab keeps its data, and whether the fixture removes it.
    Run as root, pytest's own temporary directories are closed to other users, and
    the lab's IMAP4/POP3 (Dovecot's mail processes, never root) must reach the
    Maildirs: then a directory of its own that others may enter but not list."""
    if os.geteuid() != 0:
        return Path(tmp_path_factory.mktemp("imsrelay-lab")), False
    data = Path(tempfile.mkdtemp(prefix="imsrelay-lab-"))
    os.chmod(data, 0o711)
    return data, True


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: Any) -> None:
    """pytest-asyncio warns, once per run, about a suite that leaves
    ``asyncio_default_fixture_loop_scope`` unset.  A user's suite gets this plugin with
    imsrelay's environment and should not see that noise about a setting it never made;
    its behaviour is left as it is (setting the option would change the loop of its
    session-scoped async fixtures).  Only that one warning, of that one plugin, is
    ignored; a suite that sets the option sees no difference."""
    warnings.filterwarnings("ignore", message=LOOP_SCOPE_UNSET, category=pytest.PytestDeprecationWarning,
                            module="pytest_asyncio")


LOOP_SCOPE_UNSET = 'The configuration option "asyncio_default_fixture_loop_scope" is unset'
