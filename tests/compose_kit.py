"""Helpers for tests against the Docker compose lab (docker-compose.yml, docker/lab.sh).

Everything the tests do goes through ports the lab publishes on 127.0.0.1 — mail
at the sites is found with their message API (``/api/v1`` on the admin port) — or
through ``docker exec`` into a lab container (the Postfix Internet host's Maildirs,
the CLI inside a site); nothing talks to the containers' own 10.10.10.x addresses
from the host.  The lab runs under its own compose project
(``imsrelaytest`` unless ``IMSRELAY_TEST_COMPOSE_PROJECT`` says otherwise), so its
containers and volumes never mix with a lab started by hand (``imsrelay``).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.utils import make_msgid
from pathlib import Path
from typing import Any, TypeVar

import sitekit
from sitekit import send_mail

REPO = Path(__file__).resolve().parent.parent
LAB_SH = REPO / "docker" / "lab.sh"
PROJECT = os.environ.get("IMSRELAY_TEST_COMPOSE_PROJECT", "imsrelaytest")
TOKEN = "compose-test-admin-token"
NETWORK = f"{PROJECT}_lab"
# The lab's network (10.10.10.0/24) and ports are fixed: one lab per Docker engine.
# Test sessions (of any checkout) take this lock while they use it.
LOCK_FILE = Path(os.environ.get("IMSRELAY_COMPOSE_LOCK", "/tmp/imsrelay-compose-lab.lock"))



def _port(name: str, default: int) -> int:
    """A published port, moved like docker-compose.yml moves it (LAB_*_PORT)."""
    return int(os.environ.get(name) or default)


# service -> (site, published SMTP port, published admin port, lab address)
SITES = {
    "sitea": ("SiteA", _port("LAB_SITEA_SMTP_PORT", 2510), _port("LAB_SITEA_ADMIN_PORT", 8510), "10.10.10.10"),
    "siteb": ("SiteB", _port("LAB_SITEB_SMTP_PORT", 2515), _port("LAB_SITEB_ADMIN_PORT", 8515), "10.10.10.15"),
    "sitec": ("SiteC", _port("LAB_SITEC_SMTP_PORT", 2520), _port("LAB_SITEC_ADMIN_PORT", 8520), "10.10.10.20"),
}
# SiteA's second server, Server1, when SiteA runs as two servers (docker/servers.override.yml,
# docker/lab.sh up --servers SiteA=2): service -> the same fields as SITES
SERVERS = {
    "sitea-server1": ("SiteA", _port("LAB_SITEA_SERVER1_SMTP_PORT", 2511),
                      _port("LAB_SITEA_SERVER1_ADMIN_PORT", 8511), "10.10.10.11"),
}
ENDPOINTS = {**SITES, **SERVERS}  # every imsrelay container a test may talk to
INTERNET_SMTP = _port("LAB_INTERNET_SMTP_PORT", 2600)
# service -> (published submission port 587, published implicit-TLS port 465)
SUBMISSION = {
    "sitea": (_port("LAB_SITEA_SUBMISSION_PORT", 5810), _port("LAB_SITEA_SMTPS_PORT", 4610)),
    "siteb": (_port("LAB_SITEB_SUBMISSION_PORT", 5815), _port("LAB_SITEB_SMTPS_PORT", 4615)),
    "sitec": (_port("LAB_SITEC_SUBMISSION_PORT", 5820), _port("LAB_SITEC_SMTPS_PORT", 4620)),
}
CONSOLE_PORT = _port("LAB_CONSOLE_PORT", 8580)
SITE_MAILBOXES = "/var/lib/imsrelay/mailboxes"

T = TypeVar("T")


def docker_skip_reason() -> str | None:
    """Why the compose-lab tests cannot run here, or None when they can."""
    if os.environ.get("IMSRELAY_SKIP_DOCKER") == "1":
        return "IMSRELAY_SKIP_DOCKER=1: the Docker compose lab tests are switched off"
    if shutil.which("docker") is None:
        return "no Docker engine: the docker client is not installed"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no Docker engine: `docker info` failed ({exc})"
    if info.returncode != 0:
        first = (info.stderr.strip().splitlines() or ["no output"])[0]
        return f"no Docker engine: `docker info` failed ({first})"
    if shutil.which("docker-compose") is None and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode != 0:
        return "Docker has no compose: neither docker-compose nor `docker compose` is installed"
    return None


def poll(predicate: Callable[[], T], *, timeout: float, what: str, interval: float = 0.5) -> T:
    """Call ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _has_pip(python: str) -> bool:
    return subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0


class LabError(AssertionError):
    pass


@contextlib.contextmanager
def engine_lock(timeout: float = 900.0) -> Iterator[None]:
    """Hold the machine-wide compose-lab lock (wait up to ``timeout`` for another
    test session to finish with the lab)."""
    with LOCK_FILE.open("a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"another test session has been using the compose lab for over "
                                   f"{timeout:g}s (lock {LOCK_FILE})") from None
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def lab_held(lab: ComposeLab, up: Callable[[], float], what: str) -> Iterator[None]:
    """A module's compose lab: under the engine lock, ``up()`` (its seconds printed with
    ``what``), then the test's body, then down with its volumes (IMSRELAY_DOCKER_KEEP=1
    keeps it for a post-mortem)."""
    with engine_lock():
        try:
            seconds = up()
            print(f"{what} in {seconds:.0f}s")
            yield
        finally:
            if os.environ.get("IMSRELAY_DOCKER_KEEP") != "1":
                lab.down()


class ComposeLab:
    """The compose lab of one test session: up, inspect, fault, down."""

    def __init__(self, project: str = PROJECT, progress: Callable[[str], None] | None = None) -> None:
        self.project = project
        self.progress = progress or (lambda line: None)
        self.env = {**os.environ, "COMPOSE_PROJECT_NAME": project, "IMSRELAY_ADMIN_TOKEN": TOKEN}
        if "PYTHON" not in self.env and _has_pip(sys.executable):
            # docker/build-wheels.sh: the interpreter running the tests (./dev test's
            # virtualenv) has pip; a fresh machine's system python3 may not
            self.env["PYTHON"] = sys.executable
        self.log_path = REPO / "build" / f"compose-lab-{project}.log"
        self._ids: dict[str, str] = {}

    # ------------------------------------------------------------ lifecycle

    def lab_sh(self, *args: str, timeout: float = 900.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run docker/lab.sh; its output is appended to build/compose-lab-PROJECT.log
        and, line by line as it comes (image builds take minutes), given to
        ``self.progress`` (the test run's terminal, see ``progress_to_terminal``)."""
        started = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if args and args[0] == "compose" and args[1:2] != ("-f",):  # a query: its stdout is parsed
            proc = subprocess.run([str(LAB_SH), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                                  timeout=timeout)
            if check and proc.returncode != 0:
                raise LabError(f"docker/lab.sh {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr}")
            return proc
        lines: list[str] = []
        with self.log_path.open("a") as log:
            log.write(f"$ docker/lab.sh {' '.join(args)}\n")
            proc = subprocess.Popen([str(LAB_SH), *args], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace")
            assert proc.stdout is not None
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            try:
                for line in proc.stdout:
                    lines.append(line)
                    log.write(line)
                    log.flush()
                    self.progress(f"lab.sh {args[0] if args else ''}: {line.rstrip()}")
                returncode = proc.wait()
            finally:
                timer.cancel()
            log.write(f"({time.monotonic() - started:.0f}s, exit {returncode})\n")
        output = "".join(lines)
        if check and returncode != 0:
            tail = "\n".join(output.splitlines()[-40:])
            raise LabError(f"docker/lab.sh {' '.join(args)} failed (exit {returncode}); "
                           f"full log in {self.log_path}:\n{tail}")
        return subprocess.CompletedProcess([str(LAB_SH), *args], returncode, output, "")

    def up(self) -> float:
        """A fresh lab (old containers and volumes of this project removed first);
        returns the seconds `docker/lab.sh up` took (images built when missing)."""
        self.log_path.unlink(missing_ok=True)
        self.lab_sh("down", "--volumes", timeout=300)
        started = time.monotonic()
        self.lab_sh("up")
        return time.monotonic() - started

    def down(self) -> None:
        self.lab_sh("down", "--volumes", timeout=300, check=False)

    def container(self, service: str) -> str:
        if service not in self._ids:
            out = self.lab_sh("compose", "ps", "-q", service, timeout=60).stdout.split()
            if not out:
                raise LabError(f"no container for service {service}")
            self._ids[service] = out[0]
        return self._ids[service]

    def docker(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise LabError(f"docker {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def exec(self, service: str, *cmd: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return self.docker("exec", self.container(service), *cmd, check=check, timeout=timeout)

    def state(self, service: str) -> dict[str, Any]:
        out = self.docker("inspect", "-f", "{{json .State}}", self.container(service)).stdout
        return json.loads(out)

    def healthy(self, service: str) -> bool:
        state = self.state(service)
        return state.get("Status") == "running" and (state.get("Health") or {}).get("Status") == "healthy"

    # ------------------------------------------------------------ faults

    def stop(self, service: str) -> None:
        self.docker("stop", self.container(service), timeout=60)

    def start(self, service: str) -> None:
        self.docker("start", self.container(service), timeout=60)

    def disconnect(self, service: str) -> None:
        self.docker("network", "disconnect", NETWORK, self.container(service))

    def connect(self, service: str) -> None:
        """Back on the lab network with its own address (and its compose alias)."""
        self.docker("network", "connect", "--ip", ENDPOINTS[service][3], "--alias", service, NETWORK,
                    self.container(service))

    # ------------------------------------------------------------ admin endpoints (127.0.0.1)

    def admin(self, service: str, method: str, path: str, body: dict[str, Any] | None = None,
              timeout: float = 30.0) -> Any:
        port = ENDPOINTS[service][2]
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise LabError(f"{service} {method} {path}: HTTP {exc.code}: {exc.read()[:300]!r}") from None

    def admin_up(self, service: str) -> bool:
        try:
            self.admin(service, "GET", "/status", timeout=5)
        except (OSError, LabError):
            return False
        return True

    def primaries(self, service: str) -> dict[tuple[str, str], str]:
        d = self.admin(service, "GET", "/directory")
        return {(m["home_site"], m["alias"]): m["primary_address"] for m in d["mailboxes"]}

    def queued_for(self, service: str, recipient: str) -> list[dict[str, Any]]:
        """Recipients (of queued messages at ``service``) for ``recipient`` still pending."""
        out = []
        for msg in self.admin(service, "GET", "/queue")["messages"]:
            for r in msg["recipients"]:
                if r["address"].lower() == recipient.lower() and r["state"] in ("queued", "deferred", "held"):
                    out.append({**r, "queue_id": msg["queue_id"]})
        return out

    def replication_peer(self, service: str, peer: str) -> dict[str, Any]:
        status = self.admin(service, "GET", "/replication/status")
        return next(p for p in status["peers"] if p["site"] == peer)

    # ------------------------------------------------------------ mail

    @staticmethod
    def message(sender: str, rcpt: str, subject: str, tag: str) -> tuple[str, bytes]:
        msgid = make_msgid(idstring=tag, domain="compose-test.example.net")
        body = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\nMessage-ID: {msgid}\r\n"
                f"X-Compose-Test: {tag}\r\n\r\nimsrelay compose lab test {tag}\r\n").encode()
        return msgid, body

    @staticmethod
    def send(port: int, sender: str, rcpt: str, body: bytes) -> None:
        send_mail("127.0.0.1", port, sender, rcpt, body, timeout=30)

    @staticmethod
    def rcpt_reply(port: int, rcpt: str) -> tuple[int, str]:
        code, text = sitekit.rcpt_reply("127.0.0.1", port, rcpt, sender="tester@example.net",
                                        helo="compose-test.example.net", timeout=30)
        return code, text.decode()

    # ------------------------------------------------------------ mail, through the message API

    def api(self, service: str, path: str, params: dict[str, Any] | None = None, *, raw: bool = False,
            timeout: float = 30.0, restart_wait: float = 90.0) -> Any:
        """GET the message API of a site's published admin endpoint.  A site that is
        (re)starting does not answer yet: tried again until it does (``restart_wait``)."""
        import http.client
        import urllib.parse

        query = "?" + urllib.parse.urlencode(params) if params else ""
        req = urllib.request.Request(f"http://127.0.0.1:{ENDPOINTS[service][2]}/api/v1{path}{query}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + restart_wait
        while True:
            try:
                with opener.open(req, timeout=timeout) as resp:
                    data = resp.read()
                break
            except urllib.error.HTTPError as exc:
                raise LabError(f"{service} GET {path}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
            except (OSError, http.client.HTTPException) as exc:
                if time.monotonic() > deadline:
                    raise LabError(f"{service}: no message API on 127.0.0.1:{ENDPOINTS[service][2]}: {exc!r}") from None
                time.sleep(0.5)
        return data if raw else json.loads(data)

    def api_messages(self, service: str, query: str) -> dict[str, bytes]:
        """The messages a search finds at a site, id → the Maildir file's bytes (raw)."""
        import urllib.parse

        found = self.api(service, "/search", {"query": query, "limit": 1000})["messages"]
        return {m["id"]: self.api(service, f"/messages/{urllib.parse.quote(m['id'], safe='')}/raw", raw=True)
                for m in found}

    def maildir(self, service: str, path: str) -> dict[str, bytes]:
        """Every message in a Maildir (``new/`` and ``cur/``): a site's through its
        message API (``path`` ends with the mailbox's alias); the Internet host's
        (Postfix, no API) with ``docker exec tar``."""
        if service in ENDPOINTS:
            return self.api_messages(service, f"mailbox:{Path(path).name}")
        return self._maildir_by_exec(service, path)

    def _maildir_by_exec(self, service: str, path: str) -> dict[str, bytes]:
        proc = subprocess.run(["docker", "exec", self.container(service), "tar", "-C", path, "-cf", "-",
                               "new", "cur"], capture_output=True, timeout=60)
        if proc.returncode != 0 and b"No such file" in proc.stderr:
            return {}
        # GNU tar exits 1 when a directory changed while it was read (a delivery
        # renamed a file into new/): the archive is still complete and consistent,
        # since Maildir files appear in new/ only whole.
        if proc.returncode not in (0, 1):
            raise LabError(f"reading {path} in {service}: {proc.stderr.decode(errors='replace').strip()}")
        out = {}
        with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    f = tar.extractfile(member)
                    if f is not None:
                        out[member.name] = f.read()
        return out

    def mailbox(self, service: str, alias: str) -> dict[str, bytes]:
        return self.maildir(service, f"{SITE_MAILBOXES}/{alias}")

    def find(self, service: str, path: str, msgid: str) -> list[bytes]:
        if service in ENDPOINTS:
            return list(self.api_messages(service, f"mailbox:{Path(path).name} message-id:{msgid}").values())
        needle = msgid.encode()
        return [m for m in self.maildir(service, path).values() if needle in header(m)]


def header(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]


def message_ids(messages: dict[str, bytes]) -> list[str]:
    """The Message-ID of every message (one entry per file: duplicates show)."""
    from email.parser import BytesHeaderParser

    parser = BytesHeaderParser()
    return [str(parser.parsebytes(m).get("Message-ID", "")).strip() for m in messages.values()]


class MailFlow(threading.Thread):
    """A bounded stream of test messages submitted to one site, ``count`` messages
    ``interval`` seconds apart, each with a unique Message-ID.  ``sent`` lists
    (Message-ID, time sent) as they go; an SMTP refusal ends the stream."""

    def __init__(self, port: int, sender: str, rcpt: str, *, count: int, interval: float, tag: str) -> None:
        super().__init__(name=f"mailflow-{tag}", daemon=True)
        self.port, self.sender, self.rcpt = port, sender, rcpt
        self.count, self.interval, self.tag = count, interval, tag
        self.sent: list[tuple[str, float]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(self.count):
                msgid, body = ComposeLab.message(self.sender, self.rcpt, f"{self.tag} {i + 1}/{self.count}",
                                                 f"{self.tag}-{i + 1}")
                ComposeLab.send(self.port, self.sender, self.rcpt, body)
                self.sent.append((msgid, time.monotonic()))
                time.sleep(self.interval)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self, timeout: float = 120.0) -> list[tuple[str, float]]:
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"mail flow {self.tag} did not finish within {timeout:g}s")
        if self.error is not None:
            raise AssertionError(f"mail flow {self.tag} stopped after {len(self.sent)} messages: {self.error!r}")
        return self.sent


def progress_to_terminal(config: Any) -> Callable[[str], None]:
    """Print lines on the test run's terminal while pytest captures output (capture is
    suspended for the line), so a four-minute image build shows what it is doing:
    through the terminal reporter, or — in a pytest-xdist worker, whose own reporter writes nowhere —
    on the worker's stderr, which is the terminal's.  Silent with ``-q -q``."""
    worker = hasattr(config, "workerinput")  # a pytest-xdist worker: its reporter writes nowhere
    reporter = None if worker else config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if config.get_verbosity() < -1:
        return lambda line: None

    def show(line: str) -> None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            if reporter is not None:
                reporter.write_line(f"[compose] {line}")
            else:
                sys.stderr.write(f"[compose] {line}\n")
                sys.stderr.flush()
    return show
