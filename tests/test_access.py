"""IMAP4 and POP3 (imsrelay.access: Dovecot over the site's Maildirs) with real clients.

One site on 127.0.0.1 with TLS from its throwaway CA, IMAP4/POP3 through Dovecot,
logins answered by the site's auth bridge.  Clients: imaplib and poplib (the lab CA
verified), and mpop from Debian in batch mode.  Different client addresses are
127.0.0.x sources (a connection from 127.0.0.1 to 127.0.0.1 counts as secured for
Dovecot, one from 127.0.0.9 does not).
"""

from __future__ import annotations

import asyncio
import base64
import imaplib
import os
import poplib
import shutil
import smtplib
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import pytest_asyncio
from sitekit import free_port, run_cli, running_site, site_mapping, wait_for, write_site_file

from imsrelay.access.dovecot import DovecotUnavailable, find_dovecot
from imsrelay.admin.message_store import NotFound
from imsrelay.policy.auth import hash_password
from imsrelay.testing import LabClient

pytestmark = pytest.mark.asyncio(loop_scope="module")
HOST = "127.0.0.1"
OUTSIDE = "127.0.0.9"  # not the server's own address: Dovecot does not count it as secured
BRUTE = "127.0.0.45"  # the lock-out test's own address (the lock-out is per client)
WRONG = ("127.0.0.46", "127.0.0.47", "127.0.0.48")  # the bad-login test's own addresses (one each: Dovecot
# delays further attempts from an address that failed, 2 s and up, besides imsrelay's lock-out)
PASSWORDS = {"User1": "pw-User1", "User2": "pw-User2"}


def _dovecot_missing() -> str | None:
    try:
        find_dovecot("dovecot")
    except DovecotUnavailable as exc:
        return str(exc)
    return None


pytestmark = [pytestmark, pytest.mark.skipif(_dovecot_missing() is not None,
                                             reason=f"{_dovecot_missing()} (./dev test installs it)")]


class Server:
    config_path: Path

    def __init__(self, site, data: Path) -> None:
        self.site, self.data = site, data
        self.ca = str(data / "tls" / "ca.crt")
        self.ports = site.access.endpoints.ports
        self.store = site.message_store

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def imap(self, source: str | None = None) -> imaplib.IMAP4:
        conn = imaplib.IMAP4(HOST, self.ports["imap"], timeout=20)
        if source:  # imaplib has no source address: reconnect the socket from it
            conn.shutdown()
            conn.host, conn.port = HOST, self.ports["imap"]
            import socket
            conn.sock = socket.create_connection((HOST, self.ports["imap"]), 20, source_address=(source, 0))
            conn.file = conn.sock.makefile("rb")
            conn._get_response()  # the greeting
            conn._get_capabilities()
        return conn

    def imap_tls(self, user: str = "User1", password: str | None = None) -> imaplib.IMAP4:
        conn = self.imap()
        conn.starttls(self.tls())
        conn.login(user, password or PASSWORDS[user.split("@")[0] if "@" not in user else "User1"])
        return conn

    def pop3_tls(self, user: str, password: str) -> poplib.POP3:
        conn = poplib.POP3(HOST, self.ports["pop3"], timeout=20)
        conn.stls(self.tls())
        conn.user(user)
        conn.pass_(password)
        return conn

    def deliver(self, rcpt: str, subject: str) -> None:
        with smtplib.SMTP(HOST, self.site.bound_port, timeout=20) as s:
            s.sendmail("alice@example.net", [rcpt], f"From: alice@example.net\r\nTo: {rcpt}\r\n"
                       f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@test>\r\n\r\nhello\r\n")

    def summaries(self, alias: str, subject: str):
        return [s for s in self.store.scan([alias]) if s.subject == subject]


@pytest.fixture(scope="module")
def traversable_dir():
    """Run as root, Dovecot's mail processes (user ``mail``) must reach the Maildirs:
    pytest's own temporary directories are closed to other users."""
    path = Path(tempfile.mkdtemp(prefix="imsrelay-access-"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(traversable_dir):
    mapping = site_mapping(
        "SiteA", listen=HOST, port=free_port(), smtp={"tls_generate": True},
        auth={"failure_delay": "100ms", "max_failures": 3, "lockout": "10m"},
        access={"enabled": True, "imap_port": free_port(), "imaps_port": free_port(), "pop3_port": free_port(),
                "pop3s_port": free_port()},
        diagnostics={"imap4_protocol_log": "maximum"},
        admin={"port": free_port(), "token": "access-test-token"},
        mailboxes=[{"alias": "User1", "display_name": "User One", "password_hash": hash_password(PASSWORDS["User1"]),
                    "addresses": ["smtp:u1@SiteA.microsoft.com"]},
                   {"alias": "User2", "display_name": "User Two", "password_hash": hash_password(PASSWORDS["User2"])},
                   {"alias": "NoPassword", "display_name": "No Password"}])
    path, config = write_site_file(traversable_dir, mapping)
    async with running_site(config) as site:
        assert site.access is not None and site.access.problem is None, site.access and site.access.problem
        server = Server(site, config.data_dir)
        server.config_path = path
        yield server


def go(fn, *args):
    return asyncio.to_thread(fn, *args)


async def test_imap_login_list_select_fetch_and_seen_is_the_read_flag(server):
    await go(server.deliver, "User1@SiteA.microsoft.com", "seen flag")
    await wait_for(lambda: server.summaries("User1", "seen flag"))

    def session() -> tuple:
        conn = server.imap_tls("u1@SiteA.microsoft.com", PASSWORDS["User1"])  # any SMTP address logs in
        try:
            listed = conn.list()
            selected = conn.select("INBOX")
            _, found = conn.search(None, "SUBJECT", '"seen flag"')
            number = found[0].split()[-1]
            _, flags_before = conn.fetch(number, "(FLAGS)")
            _, body = conn.fetch(number, "(BODY.PEEK[TEXT])")
            conn.store(number, "+FLAGS", "\\Seen")
            return listed, selected, number, flags_before, body
        finally:
            conn.logout()

    listed, selected, number, flags_before, body = await go(session)
    assert listed[0] == "OK" and any(b"INBOX" in line for line in listed[1])
    assert selected[0] == "OK"
    assert b"\\Seen" not in flags_before[0]
    assert body[0][1] == b"hello\r\n"
    [summary] = server.summaries("User1", "seen flag")
    assert summary.read is True  # IMAP \Seen is the message API's read flag ...
    assert Path(summary.path).name.endswith(":2,S")  # ... and the Maildir S flag
    server.store.set_read(summary.id, False)  # the API clears it: IMAP sees it cleared

    def flags_now() -> bytes:
        conn = server.imap_tls()
        try:
            conn.select("INBOX", readonly=True)
            return conn.fetch(number, "(FLAGS)")[1][0]
        finally:
            conn.logout()

    assert b"\\Seen" not in await go(flags_now)


async def test_expunge_in_imap_and_delete_in_the_api_are_one_fact(server):
    for subject in ("expunge me", "delete me"):
        await go(server.deliver, "User1@SiteA.microsoft.com", subject)
    await wait_for(lambda: server.summaries("User1", "expunge me") and server.summaries("User1", "delete me"))
    [gone_by_api] = server.summaries("User1", "delete me")

    def session() -> tuple:
        conn = server.imap_tls()
        try:
            conn.select("INBOX")
            _, before = conn.search(None, "SUBJECT", '"delete me"')
            assert server.store.delete(gone_by_api.id)  # deleted through the API while IMAP has it open
            _, noop = conn.noop()
            _, after = conn.search(None, "SUBJECT", '"delete me"')
            _, found = conn.search(None, "SUBJECT", '"expunge me"')
            conn.store(found[0].split()[-1], "+FLAGS", "\\Deleted")
            _, expunged = conn.expunge()
            return before, after, expunged
        finally:
            conn.logout()

    before, after, expunged = await go(session)
    assert before[0] and not after[0]
    assert expunged and expunged[0] is not None
    assert server.summaries("User1", "expunge me") == []  # gone for the API too
    with pytest.raises(NotFound):
        server.store.find(gone_by_api.id)


async def test_idle_client_sees_a_new_delivery_within_a_second(server):
    conn = await go(server.imap_tls)
    try:
        await go(conn.select, "INBOX")
        idle = asyncio.ensure_future(go(LabClient.idle, conn, 10.0))
        await asyncio.sleep(0.3)  # the client is idling
        await go(server.deliver, "User1@SiteA.microsoft.com", "idle wakes")
        delivered = time.monotonic()
        await wait_for(lambda: server.summaries("User1", "idle wakes"), timeout=5)
        lines = await idle
        waited = time.monotonic() - delivered
    finally:
        await go(conn.logout)
    assert any(line.endswith(b"EXISTS") for line in lines), lines
    assert waited < 1.0, f"IDLE reported the delivery {waited:.2f}s after the SMTP 250"


async def test_pop3_stls_list_retr_dele_and_implicit_tls(server):
    await go(server.deliver, "User2@SiteA.microsoft.com", "pop me")
    await wait_for(lambda: server.summaries("User2", "pop me"))

    def session() -> tuple:
        conn = server.pop3_tls("User2", PASSWORDS["User2"])
        try:
            count, _ = conn.stat()
            listing = conn.list()[1]
            retrieved = b"\r\n".join(conn.retr(count)[1])
            conn.dele(count)
        finally:
            conn.quit()
        secure = poplib.POP3_SSL(HOST, server.ports["pop3s"], context=server.tls(), timeout=20)
        try:
            secure.user("User2")
            secure.pass_(PASSWORDS["User2"])
            left = secure.stat()[0]
        finally:
            secure.quit()
        return count, listing, retrieved, left

    count, listing, retrieved, left = await go(session)
    assert count >= 1 and len(listing) == count
    assert b"Subject: pop me" in retrieved
    assert left == count - 1
    assert server.summaries("User2", "pop me") == []  # DELE + QUIT removed the Maildir file


async def test_tls_is_verified_with_the_lab_ca_and_refused_without_it(server):
    def imaps(context: ssl.SSLContext) -> str:
        conn = imaplib.IMAP4_SSL(HOST, server.ports["imaps"], ssl_context=context, timeout=20)
        try:
            return conn.login("User1", PASSWORDS["User1"])[0]
        finally:
            conn.logout()

    assert await go(imaps, server.tls()) == "OK"  # the certificate names 127.0.0.1, from the site's CA
    with pytest.raises(ssl.SSLCertVerificationError):
        await go(imaps, ssl.create_default_context())  # the system's CAs do not know the lab CA


async def test_bad_logins_fail_and_plaintext_needs_tls(server):
    def bad(source: str, user: str, password: str) -> str:
        conn = server.imap(source)
        try:
            conn.starttls(server.tls())
            with pytest.raises(imaplib.IMAP4.error) as exc:
                conn.login(user, password)
            return str(exc.value)
        finally:
            conn.shutdown()

    assert "AUTHENTICATIONFAILED" in await go(bad, WRONG[0], "User1", "wrong")
    assert "AUTHENTICATIONFAILED" in await go(bad, WRONG[1], "nobody@SiteA.microsoft.com", "x")
    assert "AUTHENTICATIONFAILED" in await go(bad, WRONG[2], "NoPassword", "anything")  # no password: no login

    def plaintext() -> tuple:
        conn = server.imap(OUTSIDE)
        try:
            caps = conn.capabilities
            with pytest.raises(imaplib.IMAP4.error) as refused:
                conn.login("User1", PASSWORDS["User1"])
            conn.starttls(server.tls())
            return caps, str(refused.value), conn.login("User1", PASSWORDS["User1"])[0]
        finally:
            conn.shutdown()

    caps, refused, after_tls = await go(plaintext)
    assert "LOGINDISABLED" in caps and "STARTTLS" in caps
    assert "PRIVACYREQUIRED" in refused or "disabled" in refused.lower()
    assert after_tls == "OK"


async def test_repeated_failures_lock_the_client_out_of_imap_pop3_and_smtp(server):
    def imap_login(password: str) -> str:
        conn = server.imap(BRUTE)
        try:
            conn.starttls(server.tls())
            try:
                return conn.login("User1", password)[0]
            except imaplib.IMAP4.error as exc:
                return str(exc)
        finally:
            conn.shutdown()

    for _ in range(3):  # auth.max_failures
        assert "AUTHENTICATIONFAILED" in await go(imap_login, "wrong")
    assert "AUTHENTICATIONFAILED" in await go(imap_login, PASSWORDS["User1"])  # locked out: right password too

    def smtp_auth() -> tuple[int, bytes]:
        s = smtplib.SMTP(HOST, server.site.bound_port, timeout=20, source_address=(BRUTE, 0))
        try:
            s.starttls(context=server.tls())
            s.ehlo()
            blob = base64.b64encode(f"\0User1\0{PASSWORDS['User1']}".encode()).decode()
            return s.docmd("AUTH", f"PLAIN {blob}")
        finally:
            s.close()

    code, text = await go(smtp_auth)
    assert code == 421 and b"Too many failed authentication attempts" in text  # the same lock-out as SMTP AUTH
    assert await go(imap_login_from_elsewhere, server) == "OK"  # only that client


def imap_login_from_elsewhere(server: Server) -> str:
    conn = server.imap_tls()
    try:
        return "OK"
    finally:
        conn.logout()


async def test_protocols_disabled_per_mailbox_and_per_site(server):
    directory = server.site.directory

    def imap_reply(user: str) -> str:
        conn = server.imap()
        try:
            conn.starttls(server.tls())
            try:
                return conn.login(user, PASSWORDS[user])[0]
            except imaplib.IMAP4.error as exc:
                return str(exc)
        finally:
            conn.shutdown()

    def pop3_reply(user: str) -> str:
        try:
            conn = server.pop3_tls(user, PASSWORDS[user])
        except poplib.error_proto as exc:
            return str(exc)
        conn.quit()
        return "OK"

    # the administrator's way: imsrelay directory protocols, through the running site's admin endpoint
    code, out, err = await go(run_cli, "directory", "protocols", "User2", "--imap4", "off",
                              "--config", str(server.config_path))
    assert code == 0, err
    assert "IMAP4  site default  server default  mailbox off      -> disabled" in out
    try:
        assert "IMAP4 is disabled for mailbox User2" in await go(imap_reply, "User2")
        assert await go(pop3_reply, "User2") == "OK"  # POP3 still on for it
        assert await go(imap_reply, "User1") == "OK"
        await directory.run(directory.set_site_protocols, {"pop3": False})
        await directory.run(directory.set_mailbox_protocols, "User1", {"pop3": True})
        assert "POP3 is disabled at site SiteA" in await go(pop3_reply, "User1")  # the server follows the site
    finally:
        await directory.run(directory.set_site_protocols, {"pop3": None})
        await directory.run(directory.set_mailbox_protocols, "User2", {"imap4": None})
        await directory.run(directory.set_mailbox_protocols, "User1", {"pop3": None})
    assert await go(pop3_reply, "User1") == "OK"
    assert await go(imap_reply, "User2") == "OK"


async def test_protocol_logs_under_the_site_log_directory(server):
    conn = await go(server.imap_tls)
    await go(conn.select, "INBOX")
    await go(conn.logout)
    logs = server.data / "logs"
    await wait_for(lambda: any((logs / "imap4" / "User1").glob("*.in")), timeout=5)
    text = "".join(p.read_text(errors="replace") for p in (logs / "imap4" / "User1").glob("*.in"))
    assert "SELECT INBOX" in text  # imap4_protocol_log: what the client sent, session by session
    assert "Login: user=<User1>" in (logs / "imap-pop3.log").read_text()


@pytest.mark.skipif(shutil.which("mpop") is None, reason="mpop not installed (./dev test installs it)")
async def test_mpop_fetches_in_batch_mode(server, tmp_path):
    await go(server.deliver, "User2@SiteA.microsoft.com", "for mpop")
    await wait_for(lambda: server.summaries("User2", "for mpop"))
    mbox = tmp_path / "mbox"
    mbox.touch()
    out = await go(lambda: subprocess.run(
        ["mpop", "--host", HOST, "--port", str(server.ports["pop3"]), "--tls=on", "--tls-starttls=on",
         f"--tls-trust-file={server.ca}", "--auth=user", "--user=User2", "--passwordeval",
         f"echo {PASSWORDS['User2']}", f"--delivery=mbox,{mbox}", "--keep=off", "--only-new=off", "--quiet"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Subject: for mpop" in mbox.read_text()
    assert server.summaries("User2", "for mpop") == []  # --keep=off: fetched and deleted
