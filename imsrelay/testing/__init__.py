"""``imsrelay.testing``: drive an imsrelay lab from a test suite or a script.

``LabClient`` talks to the embedded lab's endpoint (one URL answers for every host)
or to several sites' admin endpoints at once (the Docker lab: it joins them), and
sends mail over SMTP::

    from imsrelay.testing import LabClient

    lab = LabClient("http://127.10.10.1:8025")
    msgid = lab.send("User2@microsoft.com", subject="hello", via="Internet")
    msg = lab.wait_for(f"message-id:{msgid} mailbox:User2", timeout=30)
    assert msg["site"] == "SiteB"
    print(lab.track(msgid)["messages"][0]["chain"])   # ['Internet', 'SiteA', 'SiteB']

    with lab.imap("User2") as imap:                    # IMAP4 at User2's server, STARTTLS
        imap.select("INBOX")                           # (the lab CA verified), logged in
        lab.idle(imap, timeout=5)                      # IDLE until new mail arrives

``imap``/``pop3`` log in as a lab user (the lab's passwords, or the one given) the
way a mail client would: STARTTLS (or implicit TLS, ``tls="implicit"``) with the
lab's CA verified.

``EmbeddedLab`` starts ``imsrelay lab`` in a directory on free ports and waits for
it to be ready.  The pytest plugin (``imsrelay.testing.plugin``, registered as a
``pytest11`` entry point) gives tests the ``imsrelay_lab`` fixture built on both.
Only the standard library is used here (blocking, like a test).
"""

from __future__ import annotations

import http.client
import imaplib
import json
import os
import poplib
import queue
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, cast

from imsrelay.admin.message_store import parse_time
from imsrelay.observe.tracking import TrackingEvent, TrackingQuery, gather, tracking_body

LAB_TOKEN = "lab-admin-token"
LAB_API_HOST = "127.10.10.1"
LAB_ADDRESSES = ("127.10.10.10", "127.10.10.15", "127.10.10.20", "127.10.10.100")
# The labs' test accounts (SMTP AUTH, IMAP4, POP3): only their scrypt hashes go into
# the sites' files and directories.  Each user's home site; Administrator is at every site.
LAB_PASSWORDS = {"User1": "user1-lab", "User2": "user2-lab", "User3": "user3-lab", "Administrator": "admin-lab"}
LAB_HOMES = {"User1": "SiteA", "User2": "SiteB", "User3": "SiteC"}


class LabError(Exception):
    """The lab answered with an error (``status`` is the HTTP status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class _Endpoint:
    def __init__(self, url: str, token: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, method: str, path: str, params: dict[str, Any] | None = None, body: Any = None, *,
                raw: bool = False, timeout: float | None = None) -> Any:
        query = "?" + urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None}) \
            if params else ""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path + query, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                message = json.loads(text).get("error", "")
            except (ValueError, AttributeError):
                message = text.decode("utf-8", "replace")
            raise LabError(exc.code, message) from None
        return payload if raw else json.loads(payload or b"null")


class _Poll:
    """One long-poll to one endpoint on its own thread (plain ``http.client``, so
    ``close`` can end it from another thread); puts (status, body) on ``answers``."""

    def __init__(self, endpoint: _Endpoint, path: str, params: dict[str, Any], timeout: float,
                 answers: queue.Queue[tuple[int, Any]]) -> None:
        url = urllib.parse.urlsplit(endpoint.url)
        self._conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=timeout)
        self._target = (url.path.rstrip("/") + path + "?" + urllib.parse.urlencode(params))
        self._token = endpoint.token
        self._answers = answers
        self._closed = False
        threading.Thread(target=self._run, name=f"imsrelay-wait-{endpoint.url}", daemon=True).start()

    def _run(self) -> None:
        try:
            self._conn.request("GET", self._target, headers={"Authorization": f"Bearer {self._token}"})
            resp = self._conn.getresponse()
            payload = resp.read()
            try:
                body: Any = json.loads(payload or b"null")
            except ValueError:
                body = payload.decode("utf-8", "replace")
            if resp.status != 200 and isinstance(body, dict):
                body = body.get("error", "")
            self._answers.put((resp.status, body))
        except (OSError, http.client.HTTPException) as exc:
            if not self._closed:
                self._answers.put((0, exc))

    def close(self) -> None:
        self._closed = True
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._conn.close()


class LabClient:
    """One lab: its lab endpoint, or the admin endpoints of its sites (joined)."""

    def __init__(self, endpoints: str | Sequence[str], token: str = LAB_TOKEN, *,
                 smtp: dict[str, tuple[str, int]] | None = None, timeout: float = 30.0,
                 ca_file: str | Path | None = None, access: dict[str, tuple[str, dict[str, int]]] | None = None
                 ) -> None:
        """``ca_file``: the lab CA that IMAP/POP3 TLS is verified with (default: found
        from the sites' data directories); ``access``: per site (host, {imap, imaps,
        pop3, pop3s: port}) where the endpoints' own addresses are not reachable."""
        urls = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        urls = [u.strip() for url in urls for u in url.split(",") if u.strip()]
        if not urls:
            raise ValueError("LabClient needs at least one endpoint URL")
        self.endpoints = [_Endpoint(u, token, timeout) for u in urls]
        self.smtp_override = dict(smtp or {})
        self.ca_file = Path(ca_file) if ca_file is not None else None
        self.access_override = dict(access or {})
        self._site_endpoint: dict[str, _Endpoint] = {}
        self._sites: list[dict[str, Any]] = []

    # ------------------------------------------------------------ readiness and sites

    def ready(self) -> bool:
        for e in self.endpoints:
            try:
                e.request("GET", "/ready", timeout=5.0)
            except (LabError, OSError):
                return False
        return True

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                reasons = []
                for e in self.endpoints:
                    try:
                        e.request("GET", "/ready", timeout=5.0)
                    except LabError as exc:
                        reasons.append(f"{e.url}: {exc.message or exc}")
                    except OSError as exc:
                        reasons.append(f"{e.url}: {exc}")
                raise TimeoutError(f"the lab is not ready after {timeout:g}s: {'; '.join(reasons)}")
            time.sleep(0.2)

    def sites(self) -> list[dict[str, Any]]:
        out = []
        for e in self.endpoints:
            for s in e.request("GET", "/api/v1/sites")["sites"]:
                self._site_endpoint[s["site"].lower()] = e
                out.append(s)
        self._sites = out
        return out

    def _endpoint_of(self, site: str) -> _Endpoint:
        if site.lower() not in self._site_endpoint:
            self.sites()
        try:
            return self._site_endpoint[site.lower()]
        except KeyError:
            hint = ""
            if site.lower() == "internet":  # the Docker lab's Internet is Postfix: no admin endpoint
                hint = ("; the Docker lab's Internet host is Postfix on 127.0.0.1:2600: give "
                        "--imsrelay-smtp Internet=127.0.0.1:2600 (or IMSRELAY_LAB_SMTP), or smtp={'Internet': "
                        "('127.0.0.1', 2600)} to LabClient")
            raise LabError(404, f"no site {site!r} in this lab{hint}") from None

    def smtp_address(self, site: str) -> tuple[str, int]:
        if site in self.smtp_override:
            return self.smtp_override[site]
        self._endpoint_of(site)
        s = next(s for s in self._sites if s["site"].lower() == site.lower())
        return s["smtp"]["host"], int(s["smtp"]["port"])

    # ------------------------------------------------------------ sending

    def send(self, to: str | Iterable[str], *, sender: str = "alice@example.net", subject: str = "imsrelay test",
             text: str = "Sent by imsrelay.testing.\n", html: str | None = None,
             attachments: Iterable[tuple[str, str, bytes]] = (), headers: dict[str, str] | None = None,
             via: str | None = None, message_id: str | None = None) -> str:
        """Send one message through ``via`` (a site name; default the Internet host,
        else the first site); ``attachments`` are (filename, content type, bytes).
        Returns its Message-ID."""
        rcpts = [to] if isinstance(to, str) else list(to)
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = ", ".join(rcpts)
        msg["Subject"] = subject
        msg["Date"] = formatdate()
        msg["Message-ID"] = message_id or make_msgid(domain="imsrelay.test")
        for k, v in (headers or {}).items():
            msg[k] = v
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
        for name, ctype, data in attachments:
            maintype, _, subtype = ctype.partition("/")
            msg.add_attachment(data, maintype=maintype, subtype=subtype or "octet-stream", filename=name)
        if via is None:
            names = [s["site"] for s in (self._sites or self.sites())]
            via = "Internet" if "Internet" in names or "Internet" in self.smtp_override else names[0]
        host, port = self.smtp_address(via)
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        with smtplib.SMTP(host, port, timeout=30) as s:
            s.send_message(msg, from_addr=sender, to_addrs=rcpts)
        return str(msg["Message-ID"])

    # ------------------------------------------------------------ reading mail as a client (IMAP4, POP3)

    def _site_of(self, user: str, site: str | None) -> str:
        if site is not None:
            return site
        home = LAB_HOMES.get(_lab_name(user))
        if home is None:
            raise ValueError(f"give the site {user!r} is homed at (site=...)")
        return home

    @staticmethod
    def _password_of(user: str, password: str | None) -> str:
        if password is not None:
            return password
        try:
            return LAB_PASSWORDS[_lab_name(user)]
        except KeyError:
            raise ValueError(f"{user!r} is not a lab user: give its password") from None

    def access_address(self, site: str, listener: str) -> tuple[str, int]:
        """(host, port) of a site's ``imap``, ``imaps``, ``pop3`` or ``pop3s`` listener."""
        if site in self.access_override:
            host, ports = self.access_override[site]
        else:
            self._endpoint_of(site)
            info = next(s for s in self._sites if s["site"].lower() == site.lower()).get("access")
            if not info:
                raise LabError(404, f"{site} does not serve IMAP4/POP3 ([access] enabled = false)")
            if "unavailable" in info:
                raise LabError(503, f"{site}: no IMAP4/POP3: {info['unavailable']}")
            host, ports = info["host"], info
        if listener not in ports:
            raise LabError(404, f"{site} has no {listener} listener")
        return ("127.0.0.1" if host in ("0.0.0.0", "", "::") else host), int(ports[listener])

    def tls_context(self, site: str | None = None) -> ssl.SSLContext:
        """A client TLS context that trusts the lab's CA (and checks host names)."""
        ca = self.ca_file
        if ca is None and site is not None:
            self._endpoint_of(site)
            data = Path(next(s for s in self._sites if s["site"].lower() == site.lower())["data_dir"])
            ca = next((c for c in (data.parent / "tls" / "ca.crt", data / "tls" / "ca.crt") if c.is_file()), None)
        if ca is None:
            raise LabError(404, "the lab's CA certificate is not known here: give LabClient(ca_file=...)")
        return ssl.create_default_context(cafile=str(ca))

    def imap(self, user: str, password: str | None = None, *, site: str | None = None,
             tls: str = "starttls", timeout: float = 30.0) -> imaplib.IMAP4:
        """An IMAP4rev1 session logged in as ``user`` (alias or SMTP address) at the
        user's server: ``tls`` is ``starttls`` (port 143's way), ``implicit`` (993's)
        or ``none`` (plaintext; the lab allows it).  Use it as a context manager."""
        site = self._site_of(user, site)
        secret = self._password_of(user, password)
        conn: imaplib.IMAP4
        if tls == "implicit":
            host, port = self.access_address(site, "imaps")
            conn = imaplib.IMAP4_SSL(host, port, ssl_context=self.tls_context(site), timeout=timeout)
        else:
            host, port = self.access_address(site, "imap")
            conn = imaplib.IMAP4(host, port, timeout=timeout)
            if tls == "starttls":
                conn.starttls(self.tls_context(site))
        try:
            conn.login(user, secret)
        except BaseException:
            conn.shutdown()
            raise
        return conn

    def pop3(self, user: str, password: str | None = None, *, site: str | None = None,
             tls: str = "starttls", timeout: float = 30.0) -> poplib.POP3:
        """A POP3 session logged in as ``user`` (USER/PASS), like ``imap``; close it with ``quit()``."""
        site = self._site_of(user, site)
        secret = self._password_of(user, password)
        conn: poplib.POP3
        if tls == "implicit":
            host, port = self.access_address(site, "pop3s")
            conn = poplib.POP3_SSL(host, port, context=self.tls_context(site), timeout=timeout)
        else:
            host, port = self.access_address(site, "pop3")
            conn = poplib.POP3(host, port, timeout=timeout)
            if tls == "starttls":
                conn.stls(self.tls_context(site))
        try:
            conn.user(user)
            conn.pass_(secret)
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def idle(conn: imaplib.IMAP4, timeout: float = 30.0) -> list[bytes]:
        """IMAP IDLE (RFC 2177) on the selected mailbox until the server reports a
        change (EXISTS, EXPUNGE or FETCH) or ``timeout`` seconds pass; returns the
        untagged lines received (empty: nothing happened).  Ends with DONE."""
        tag = conn._new_tag()
        conn.send(tag + b" IDLE\r\n")
        first = conn.readline()
        if not first.startswith(b"+"):
            raise imaplib.IMAP4.error(f"IDLE refused: {first.decode(errors='replace').strip()}")
        seen: list[bytes] = []
        sock = conn.socket()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    line = conn.readline()
                except (TimeoutError, ssl.SSLError):
                    break
                if not line:
                    raise imaplib.IMAP4.abort("the server closed the connection during IDLE")
                if line.startswith(b"* ") and not line.startswith(b"* OK"):
                    seen.append(line.strip())
                    break
        finally:
            sock.settimeout(None)
            conn.send(b"DONE\r\n")
            while True:
                line = conn.readline()
                if not line or line.startswith(tag):
                    break
                if line.startswith(b"* ") and not line.startswith(b"* OK"):
                    seen.append(line.strip())
        return seen

    # ------------------------------------------------------------ messages

    def messages(self, query: str = "", *, site: str | None = None, mailbox: str | None = None,
                 limit: int = 50) -> list[dict[str, Any]]:
        """Message summaries, newest first (every endpoint joined)."""
        found: list[dict[str, Any]] = []
        for e in ([self._endpoint_of(site)] if site else self.endpoints):
            page = e.request("GET", "/api/v1/messages", {"query": query or None, "site": site,
                                                          "mailbox": mailbox, "limit": limit})
            found += page["messages"]
        found.sort(key=lambda m: (m["received"], m["id"]), reverse=True)
        return found[:limit]

    def message(self, message_id: str) -> dict[str, Any]:
        """Headers, decoded text and HTML, attachments."""
        body: dict[str, Any] = self._endpoint_of(message_id.split(":", 1)[0]).request(
            "GET", f"/api/v1/messages/{urllib.parse.quote(message_id, safe='')}")
        return body

    def raw(self, message_id: str) -> bytes:
        data: bytes = self._endpoint_of(message_id.split(":", 1)[0]).request(
            "GET", f"/api/v1/messages/{urllib.parse.quote(message_id, safe='')}/raw", raw=True)
        return data

    def wait_for(self, query: str, timeout: float = 30.0) -> dict[str, Any]:
        """The newest message matching ``query`` as soon as there is one (long-poll);
        ``TimeoutError`` if none arrives within ``timeout`` seconds.  Several endpoints
        (the Docker lab's sites) are long-polled at once: the first answer wins and
        the other polls are closed, so a delivery is seen as soon as it happens."""
        params = {"query": query, "timeout": f"{timeout:.3f}"}
        if len(self.endpoints) == 1:
            try:
                page = self.endpoints[0].request("GET", "/api/v1/wait", params, timeout=timeout + 30.0)
            except LabError as exc:
                if exc.status != 408:
                    raise
                raise TimeoutError(f"no message matching {query!r} within {timeout:g}s") from None
            return cast(dict[str, Any], page["messages"][0])
        answers: queue.Queue[tuple[int, Any]] = queue.Queue()
        polls = [_Poll(e, "/api/v1/wait", params, timeout + 30.0, answers) for e in self.endpoints]
        try:
            for _ in polls:
                status, body = answers.get(timeout=timeout + 60.0)
                if status == 200:
                    return cast(dict[str, Any], body["messages"][0])
                if status != 408:
                    raise body if isinstance(body, BaseException) else LabError(status, str(body))
        finally:
            for poll in polls:
                poll.close()
        raise TimeoutError(f"no message matching {query!r} within {timeout:g}s")

    def delete(self, query: str) -> int:
        """Delete every message matching ``query``; returns how many."""
        return sum(int(e.request("DELETE", "/api/v1/search", {"query": query})["deleted"]) for e in self.endpoints)

    # ------------------------------------------------------------ tracking, queue, replication

    def track(self, message_id: str | None = None, *, queue_id: str | None = None, sender: str | None = None,
              recipient: str | None = None, since: str | float | None = None) -> dict[str, Any]:
        """Tracking events and hop chains (``messages[i]["chain"]``, ``["recipients"]``)
        of a Message-ID, a queue id, a sender or a recipient (since a time)."""
        first = TrackingQuery(message_id=message_id, queue_id=queue_id, sender=sender, recipient=recipient,
                              since=parse_time(str(since)) if since is not None else None)

        def fetch(q: TrackingQuery) -> list[TrackingEvent]:
            params = {"message_id": q.message_id, "queue_id": q.queue_id, "sender": q.sender,
                      "recipient": q.recipient, "since": q.since, "limit": q.limit}
            return [TrackingEvent.from_dict(ev) for e in self.endpoints
                    for ev in e.request("GET", "/api/v1/tracking", params)["events"]]

        return tracking_body(gather(fetch, first))

    def queue(self, site: str) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._endpoint_of(site).request("GET", f"/api/v1/sites/{site}/queue")["messages"])

    def replication(self, site: str) -> dict[str, Any]:
        return cast(dict[str, Any], self._endpoint_of(site).request("GET", f"/api/v1/sites/{site}/replication"))


def _lab_name(user: str) -> str:
    """The lab account a login names: ``user2@microsoft.com`` → ``User2``."""
    local = user.split("@", 1)[0].lower()
    return next((name for name in LAB_PASSWORDS if name.lower() == local), "")


# ------------------------------------------------------------------ the embedded lab, in a subprocess


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def lab_server_addresses(servers: dict[str, int]) -> list[str]:
    """The addresses of the lab sites' other servers (``SiteA=2``: 127.10.10.11; a
    site's servers follow its own address, ``imsrelay.lab.embedded.site_servers``)."""
    bases = dict(zip(("sitea", "siteb", "sitec"), LAB_ADDRESSES[:3], strict=True))
    out = []
    for site, count in servers.items():
        prefix, last = bases[site.lower()].rsplit(".", 1)
        out += [f"{prefix}.{int(last) + i}" for i in range(1, count)]
    return out


def free_lab_port(addresses: Sequence[str] = LAB_ADDRESSES, attempts: int = 50) -> int:
    """A port free on every lab address."""
    for _ in range(attempts):
        port = free_port(addresses[0])
        try:
            for a in addresses[1:]:
                with socket.socket() as s:
                    s.bind((a, port))
        except OSError:
            continue
        return port
    raise OSError("no port is free on every lab address")


class EmbeddedLab:
    """``imsrelay lab`` in ``data_dir`` on free ports (or the ones given), as a
    subprocess; ``start()`` returns once its endpoint says ready."""

    def __init__(self, data_dir: Path, *, port: int | None = None, admin_port: int | None = None,
                 api_host: str = LAB_API_HOST, api_port: int | None = None, stage: str = "end",
                 ready_timeout: float = 120.0, submission_port: int | None = None,
                 smtps_port: int | None = None, access_ports: dict[str, int] | None = None,
                 servers: dict[str, int] | None = None) -> None:
        """``access_ports``: the sites' ``imap_port``, ``imaps_port``, ``pop3_port`` and
        ``pop3s_port`` (default: free ones); ``servers``: sites run as several servers
        (``{"SiteA": 2}``: ``imsrelay lab --servers SiteA=2``)."""
        self.data_dir = Path(data_dir)
        self.servers = dict(servers or {})
        extra = tuple(lab_server_addresses(self.servers))
        self.port = port or free_lab_port(LAB_ADDRESSES + extra)
        self.admin_port = admin_port or free_lab_port(LAB_ADDRESSES[:3] + extra)
        self.submission_port = submission_port or free_lab_port(LAB_ADDRESSES[:3])  # 587 and 465 of the sites
        self.smtps_port = smtps_port or free_lab_port(LAB_ADDRESSES[:3])
        self.access_ports = {k: (access_ports or {}).get(k) or free_lab_port(LAB_ADDRESSES[:3])
                             for k in ("imap_port", "imaps_port", "pop3_port", "pop3s_port")}
        self.api_host = api_host
        self.api_port = api_port or free_port(api_host)
        self.stage = stage
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.client = LabClient(self.url, ca_file=self.data_dir / "tls" / "ca.crt")

    @property
    def url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    def start(self) -> LabClient:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "lab.out", "wb")  # noqa: SIM115 - kept open while the lab runs
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imsrelay", "lab", "--data", str(self.data_dir), "--port", str(self.port),
             "--admin-port", str(self.admin_port), "--api-host", self.api_host, "--api-port", str(self.api_port),
             "--submission-port", str(self.submission_port), "--smtps-port", str(self.smtps_port),
             *[a for k, port in self.access_ports.items() for a in (f"--{k.replace('_', '-')}", str(port))],
             *[a for site, n in self.servers.items() for a in ("--servers", f"{site}={n}")],
             "--stage", self.stage, "--log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        deadline = time.monotonic() + self.ready_timeout
        while not self.client.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                output = (self.data_dir / "lab.out").read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"imsrelay lab did not become ready (data in {self.data_dir}):\n{output}")
            time.sleep(0.1)
        self.client.sites()
        return self.client

    def stop(self) -> None:
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def __enter__(self) -> LabClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
