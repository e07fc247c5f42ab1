"""SMTP AUTH, submission ports and the restrictions against real sites on loopback.

One site ("the gate") with TLS from a throwaway CA, AUTH against its directory,
submission on 587-style and 465-style ports (free ports here), Routing Restrictions,
the submission restriction, a host reject list, Delivery Restrictions, Message
Filtering with the turf directory.  The outside world is Postfix's smtp-sink as the
smart host: anything relayed lands there, so "0 relays" is checked where it counts.
Clients are smtplib and swaks; different client addresses are 127.0.0.x sources.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import pytest_asyncio
from sitekit import free_port, make_config, running_site, site_mapping, wait_for
from smtp_sink import SmtpSink
from structlog.testing import capture_logs

from imsrelay.observe.tracking import TrackingQuery, describe_event
from imsrelay.policy.auth import hash_password

pytestmark = pytest.mark.asyncio(loop_scope="module")
HOST = "127.0.0.1"
OUTSIDE = "127.0.0.9"  # a client outside every relay range
LISTED = "127.0.0.2"  # smtp.relay_networks
NEVER = "127.0.0.3"  # in relay_networks too, but on the never-relay list
REJECTED = "127.0.0.66"  # restrictions.reject_hosts
BRUTE = "127.0.0.44"  # the brute-force test's own address (lockout is per client)
MSG = b"From: User1@SiteA.microsoft.com\r\nSubject: {s}\r\n\r\nbody\r\n"
needs_swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (apt-get install swaks)")


class Gate:
    def __init__(self, site, sink, data: Path) -> None:
        self.site, self.sink, self.data = site, sink, data
        self.ca = str(data / "tls" / "ca.crt")

    @property
    def port(self) -> int:
        return self.site.bound_port

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def smtp(self, source: str | None = None, port: int | None = None) -> smtplib.SMTP:
        return smtplib.SMTP(HOST, port or self.port, timeout=20, source_address=(source, 0) if source else None)

    def smtps(self, source: str | None = None) -> smtplib.SMTP_SSL:
        return smtplib.SMTP_SSL(HOST, self.site.submission_ports["smtps"], timeout=20, context=self.tls(),
                                source_address=(source, 0) if source else None)

    def relayed(self) -> list[bytes]:
        return self.sink.messages()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gate(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    sink_port = free_port()
    with SmtpSink(HOST, sink_port) as sink:
        mapping = site_mapping(
            "SiteA", listen=HOST, port=free_port(),
            smtp={"relay_networks": [f"{LISTED}/32", f"{NEVER}/32"], "tls_generate": True, "max_errors": 200},
            delivery={"smart_host": f"{HOST}:{sink_port}", "retry_intervals": [0.2, 0.5, 1]},
            auth={"failure_delay": "300ms", "max_failures": 3, "lockout": "10m"},
            submission={"port": free_port(), "tls_port": free_port()},
            restrictions={"never_relay": [f"{NEVER}/32"], "reject_hosts": [f"{REJECTED}/32"],
                          "sender_must_match": True, "filter_senders": ["@spam.example"], "filter_action": "turf"},
            mailboxes=[{"alias": "User1", "display_name": "User One", "password_hash": hash_password("pw-User1"),
                        "addresses": ["smtp:u1@SiteA.microsoft.com"]},
                       {"alias": "User2", "display_name": "User Two", "password_hash": hash_password("pw-User2")},
                       {"alias": "Boss", "display_name": "The Boss"}])
        config = make_config(tmp, mapping)
        async with running_site(config) as site:
            yield Gate(site, sink, config.data_dir)


def go(fn, *args):
    return asyncio.to_thread(fn, *args)


def login_and_send(g: Gate, user: str, password: str, sender: str, rcpt: str, subject: str,
                   *, source: str | None = None, starttls: bool = True) -> dict:
    with g.smtp(source) as s:
        s.ehlo()
        if starttls:
            s.starttls(context=g.tls())
            s.ehlo()
        s.login(user, password)
        return s.sendmail(sender, [rcpt], MSG.replace(b"{s}", subject.encode()))


# ------------------------------------------------------------------ AUTH basics


async def test_auth_offered_only_after_starttls_and_plaintext_refused_538(gate: Gate):
    def check():
        with gate.smtp() as s:
            s.ehlo()
            assert "starttls" in s.esmtp_features and "auth" not in s.esmtp_features
            code, text = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0User1\0pw-User1").decode())
            assert (code, text[:6]) == (538, b"5.7.11")
            s.starttls(context=gate.tls())
            s.ehlo()
            assert s.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
            code, _ = s.docmd("AUTH", "plain " + base64.b64encode(b"\0User1\0pw-User1").decode())
            assert code == 235  # mechanism names are case-insensitive
    await go(check)


async def test_smtplib_login_success_relays_and_records_auth(gate: Gate):
    before = len(gate.relayed())
    got = await go(login_and_send, gate, "User1", "pw-User1", "User1@SiteA.microsoft.com",
                   "alice@example.net", "auth-relay")
    assert got == {}
    msgs = await wait_for(lambda: len(gate.relayed()) > before and gate.relayed())
    relayed = [m for m in msgs if b"Subject: auth-relay" in m][0]
    assert b"with ESMTPSA id" in relayed  # RFC 3848: TLS + AUTH
    # message tracking shows who submitted it
    log = gate.site.tracking

    def received() -> list:
        log.flush_sync()
        return [e for e in log.query_sync(TrackingQuery(sender="User1@SiteA.microsoft.com", limit=1000))
                if e.event == "received" and "alice@example.net" in e.detail.get("recipients", [])]
    events = await go(received)
    assert events and events[0].detail["auth"] == "User1"
    assert "authenticated as User1" in describe_event(events[0])


async def test_bad_password_535_and_logged(gate: Gate):
    def bad():
        with gate.smtp() as s:
            s.ehlo()
            s.starttls(context=gate.tls())
            s.ehlo()
            code, text = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0User2\0wrong").decode())
            return code, text
    with capture_logs() as logs:
        code, text = await go(bad)
    assert (code, text) == (535, b"5.7.8 Authentication credentials invalid")
    failed = [e for e in logs if e["event"] == "auth.failed"]
    assert failed and failed[0]["login"] == "User2" and failed[0]["peer"] == HOST
    assert "wrong" not in json.dumps(logs, default=str)  # the password is never logged


@needs_swaks
async def test_swaks_auth_plain_and_login_with_tls(gate: Gate):
    for mech, subject in (("PLAIN", "swaks-plain"), ("LOGIN", "swaks-login")):
        out = await go(lambda m=mech, s=subject: subprocess.run(
            ["swaks", "--server", f"{HOST}:{gate.port}", "--tls", "--tls-verify", "--tls-ca-path", gate.ca,
             "--auth", m, "--auth-user", "User1", "--auth-password", "pw-User1",
             "-f", "User1@SiteA.microsoft.com", "-t", "bob@example.net", "--header", f"Subject: {s}"],
            capture_output=True, text=True, timeout=60))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "235 2.7.0 Authentication successful" in out.stdout
    await wait_for(lambda: sum(b"Subject: swaks-" in m for m in gate.relayed()) == 2)
    # a wrong password: swaks fails with the 535 (exit code 28: AUTH failed)
    out = await go(lambda: subprocess.run(
        ["swaks", "--server", f"{HOST}:{gate.port}", "--tls", "--tls-ca-path", gate.ca, "--auth", "LOGIN",
         "--auth-user", "User1", "--auth-password", "nope", "-f", "User1@SiteA.microsoft.com", "-t", "b@example.net"],
        capture_output=True, text=True, timeout=60))
    assert out.returncode != 0 and "535 5.7.8" in out.stdout


@needs_swaks
async def test_submission_587_requires_starttls_and_auth_before_mail(gate: Gate):
    port = gate.site.submission_ports["submission"]

    def check():
        with gate.smtp(port=port) as s:
            s.ehlo()
            assert "auth" not in s.esmtp_features  # not before STARTTLS, on 587 always
            code, text = s.docmd("MAIL FROM:<User1@SiteA.microsoft.com>")
            assert (code, text[:5]) == (530, b"5.7.0")
            s.starttls(context=gate.tls())
            s.ehlo()
            code, _ = s.docmd("MAIL FROM:<User1@SiteA.microsoft.com>")
            assert code == 530  # RFC 6409: AUTH before MAIL, even to a local mailbox
            s.login("User1", "pw-User1")
            assert s.sendmail("User1@SiteA.microsoft.com", ["carol@example.net"],
                              MSG.replace(b"{s}", b"via-587")) == {}
    await go(check)
    out = await go(lambda: subprocess.run(
        ["swaks", "--server", f"{HOST}:{port}", "--tls", "--tls-ca-path", gate.ca, "--auth", "PLAIN",
         "--auth-user", "User1", "--auth-password", "pw-User1", "-f", "User1@SiteA.microsoft.com",
         "-t", "dave@example.net", "--header", "Subject: swaks-587"], capture_output=True, text=True, timeout=60))
    assert out.returncode == 0, out.stdout
    await wait_for(lambda: any(b"Subject: via-587" in m for m in gate.relayed())
                   and any(b"Subject: swaks-587" in m for m in gate.relayed()))


@needs_swaks
async def test_implicit_tls_465_with_swaks_and_smtplib(gate: Gate):
    port = gate.site.submission_ports["smtps"]
    out = await go(lambda: subprocess.run(
        ["swaks", "--server", f"{HOST}:{port}", "--tls-on-connect", "--tls-verify", "--tls-ca-path", gate.ca,
         "--auth", "LOGIN", "--auth-user", "User1", "--auth-password", "pw-User1",
         "-f", "User1@SiteA.microsoft.com", "-t", "erin@example.net", "--header", "Subject: swaks-465"],
        capture_output=True, text=True, timeout=60))
    assert out.returncode == 0, out.stdout + out.stderr

    def smtplib_465():
        with gate.smtps() as s:
            s.ehlo()
            assert "starttls" not in s.esmtp_features and "auth" in s.esmtp_features
            code, _ = s.docmd("MAIL FROM:<User1@SiteA.microsoft.com>")
            assert code == 530
            s.rset()
            s.login("u1@sitea.microsoft.com", "pw-User1")  # any of the mailbox's addresses is a login too
            return s.sendmail("User1@SiteA.microsoft.com", ["frank@example.net"], MSG.replace(b"{s}", b"via-465"))
    assert await go(smtplib_465) == {}
    msgs = await wait_for(lambda: [m for m in gate.relayed() if b"Subject: via-465" in m])
    assert b"with ESMTPSA id" in msgs[0]


# ------------------------------------------------------------------ Routing Restrictions


async def test_relay_only_after_auth_listed_range_and_never_relay_wins(gate: Gate):
    def rcpt(source: str, auth: bool) -> tuple[int, bytes]:
        with gate.smtp(source) as s:
            s.ehlo()
            if auth:
                s.starttls(context=gate.tls())
                s.ehlo()
                s.login("User1", "pw-User1")
            s.mail("User1@SiteA.microsoft.com")
            return s.rcpt("someone@example.org")
    assert (await go(rcpt, OUTSIDE, False))[0] == 554
    assert (await go(rcpt, OUTSIDE, True))[0] == 250  # (a) authenticated
    assert (await go(rcpt, LISTED, False))[0] == 250  # (b) listed range
    code, text = await go(rcpt, NEVER, False)  # listed, but never-relay wins
    assert code == 554 and b"never-relay" in text
    code, text = await go(rcpt, NEVER, True)  # ... also over authentication
    assert code == 554 and b"never-relay" in text


async def test_internal_address_relay(tmp_path):
    """(c) clients that connected to a listed internal address of the site may relay."""
    sink_port = free_port()
    with SmtpSink(HOST, sink_port) as sink:
        mapping = site_mapping("SiteA", listen=HOST, port=free_port(), smtp={"relay_networks": []},
                               delivery={"smart_host": f"{HOST}:{sink_port}"},
                               restrictions={"relay_internal_addresses": [f"{HOST}/32"]})
        async with running_site(make_config(tmp_path, mapping)) as site:
            def send():
                with smtplib.SMTP(HOST, site.bound_port, timeout=20, source_address=(OUTSIDE, 0)) as s:
                    return s.sendmail("x@example.org", ["y@example.net"], MSG.replace(b"{s}", b"internal"))
            assert await go(send) == {}
            await wait_for(lambda: any(b"Subject: internal" in m for m in sink.messages()))
        other = site_mapping("SiteA", listen=HOST, port=free_port(), smtp={"relay_networks": []},
                             delivery={"smart_host": f"{HOST}:{sink_port}"},
                             restrictions={"relay_internal_addresses": ["127.0.0.5/32"]})
        async with running_site(make_config(tmp_path / "other", other)) as site:
            def refused():
                with smtplib.SMTP(HOST, site.bound_port, timeout=20, source_address=(OUTSIDE, 0)) as s:
                    s.ehlo()
                    s.mail("x@example.org")
                    return s.rcpt("y@example.net")[0]
            assert await go(refused) == 554


# ------------------------------------------------------------------ submission restriction


async def test_sender_mismatch_refused_550(gate: Gate):
    def check():
        with gate.smtp() as s:
            s.ehlo()
            s.starttls(context=gate.tls())
            s.ehlo()
            s.login("User1", "pw-User1")
            code, text = s.mail("User2@SiteA.microsoft.com")
            assert (code, text[:5]) == (550, b"5.7.1")
            assert b"User1 may not send as" in text
            s.rset()
            assert s.mail("u1@SiteA.microsoft.com")[0] == 250  # a secondary address of its own mailbox
    await go(check)


# ------------------------------------------------------------------ connections


async def test_reject_list_554_at_connect(gate: Gate):
    def check():
        with pytest.raises(smtplib.SMTPConnectError) as err:
            gate.smtp(REJECTED)
        return err.value
    err = await go(check)
    assert err.smtp_code == 554 and err.smtp_error.startswith(b"5.7.1 Connection refused")

    def raw():  # then only QUIT is answered
        import socket
        with socket.create_connection((HOST, gate.port), source_address=(REJECTED, 0), timeout=10) as c:
            f = c.makefile("rb")
            greeting = f.readline()
            c.sendall(b"EHLO x\r\n")
            ehlo = f.readline()
            c.sendall(b"QUIT\r\n")
            return greeting, ehlo, f.readline()
    greeting, ehlo, bye = await go(raw)
    assert greeting.startswith(b"554 5.7.1") and ehlo.startswith(b"503 5.5.1") and bye.startswith(b"221")

    def others() -> int:
        with smtplib.SMTP(HOST, gate.port, timeout=10, source_address=(OUTSIDE, 0)) as s:
            return s.noop()[0]
    assert await go(others) == 250  # others still connect


async def test_accept_only_encrypted_and_authenticated_and_accept_list(tmp_path):
    mapping = site_mapping("SiteA", listen=HOST, port=free_port(), smtp={"tls_generate": True},
                           restrictions={"accept": "authenticated+encrypted", "accept_hosts": ["127.0.0.0/28"]},
                           mailboxes=[{"alias": "User1", "display_name": "U", "password_hash": hash_password("p")}])
    config = make_config(tmp_path, mapping)
    async with running_site(config) as site:
        ctx = ssl.create_default_context(cafile=str(config.data_dir / "tls" / "ca.crt"))

        def check():
            with smtplib.SMTP(HOST, site.bound_port, timeout=20, source_address=(OUTSIDE, 0)) as s:
                s.ehlo()
                code, text = s.mail("x@example.org")
                assert (code, text[:5]) == (530, b"5.7.0") and b"STARTTLS" in text
                s.rset()
                s.starttls(context=ctx)
                s.ehlo()
                code, text = s.mail("x@example.org")
                assert (code, text[:5]) == (530, b"5.7.0") and b"Authentication required" in text
                s.rset()
                s.login("User1", "p")
                assert s.mail("User1@SiteA.microsoft.com")[0] == 250
            with pytest.raises(smtplib.SMTPConnectError) as err:  # not on the accept list
                smtplib.SMTP(HOST, site.bound_port, timeout=20, source_address=("127.0.0.77", 0))
            assert err.value.smtp_code == 554
        await go(check)


# ------------------------------------------------------------------ delivery restrictions, filtering


async def test_delivery_restrictions_and_filtering_with_turf(gate: Gate):
    directory = gate.site.directory
    await directory.run(directory.set_sender_rules, "Boss", accept_from=["@corp.example", "User1@SiteA.microsoft.com"],
                        reject_from=["mallory@corp.example"], filter_senders=["@junk.example"], filter_action="turf")
    await directory.run(directory.set_sender_rules, "User2", filter_senders=["eve@bad.example"],
                        filter_action="delete")
    await gate.site.refresh()

    def rcpt(sender: str, rcpt: str) -> tuple[int, bytes]:
        with gate.smtp() as s:
            s.ehlo()
            s.mail(sender)
            return s.rcpt(rcpt)
    assert (await go(rcpt, "alice@corp.example", "Boss@SiteA.microsoft.com"))[0] == 250
    code, text = await go(rcpt, "mallory@corp.example", "Boss@SiteA.microsoft.com")
    assert (code, text[:5]) == (550, b"5.7.1") and b"reject from mallory@corp.example" in text
    code, text = await go(rcpt, "x@example.org", "Boss@SiteA.microsoft.com")
    assert (code, text[:5]) == (550, b"5.7.1") and b"accepts only from" in text

    def send(sender: str, rcpts: list[str], subject: str):
        with gate.smtp() as s:
            return s.sendmail(sender, rcpts, MSG.replace(b"{s}", subject.encode()))
    # the site's filter (@spam.example, turf) and User2's own (eve@bad.example, delete)
    assert await go(send, "x@spam.example", ["User1@SiteA.microsoft.com"], "spam-1") == {}
    assert await go(send, "eve@bad.example", ["User2@SiteA.microsoft.com", "User1@SiteA.microsoft.com"],
                    "eve-1") == {}
    turf = gate.data / "turf"
    metas = [json.loads(p.read_text()) for p in sorted(turf.glob("*.json"))]
    assert [m["sender"] for m in metas] == ["x@spam.example"]
    assert metas[0]["recipients"][0]["rule"] == "site message filter: @spam.example (turf)"
    assert b"Subject: spam-1" in (turf / f"{metas[0]['queue_id']}.eml").read_bytes()
    # User1 gets eve's message, User2's copy was deleted; nobody got the spam
    from sitekit import maildir_messages
    await wait_for(lambda: any(b"Subject: eve-1" in m for m in maildir_messages(gate.data, "User1")))
    assert not any(b"Subject: eve-1" in m for m in maildir_messages(gate.data, "User2"))
    assert not any(b"Subject: spam-1" in m for m in maildir_messages(gate.data, "User1"))


# ------------------------------------------------------------------ brute force


async def test_brute_force_slowed_then_locked_out_and_logged(gate: Gate):
    def attempt(password: str) -> tuple[int, bytes, float]:
        with smtplib.SMTP(HOST, gate.port, timeout=30, source_address=(BRUTE, 0)) as s:
            s.ehlo()
            s.starttls(context=gate.tls())
            s.ehlo()
            start = time.monotonic()
            code, text = s.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0User1\0{password}".encode()).decode())
            return code, text, time.monotonic() - start
    with capture_logs() as logs:
        results = [await go(attempt, f"guess{i}") for i in range(3)]
        assert [r[0] for r in results] == [535, 535, 535]
        # replies slow down: 0.3 s, 0.6 s, 1.2 s at least (the limit is only from below)
        assert results[0][2] >= 0.3 and results[1][2] >= 0.6 and results[2][2] >= 1.2
        # locked out now: even the right password is refused, at once
        code, text, _ = await go(attempt, "pw-User1")
    assert (code, text[:5]) == (421, b"4.7.0") and b"Too many failed authentication attempts" in text
    failed = [e for e in logs if e["event"] == "auth.failed"]
    assert [e["failures"] for e in failed] == [1, 2, 3] and failed[-1]["locked_out"] is True
    assert any(e["event"] == "auth.refused" and e["peer"] == BRUTE for e in logs)
    # other clients are not locked out
    assert await go(login_and_send, gate, "User1", "pw-User1", "User1@SiteA.microsoft.com",
                    "User1@SiteA.microsoft.com", "after-brute") == {}


# ------------------------------------------------------------------ open-relay matrix

RELAY_MATRIX = [
    "victim@example.net",
    "victim%example.net@SiteA.microsoft.com",  # percent hack
    "victim%example.net@[127.0.0.1]",
    "example.net!victim@SiteA.microsoft.com",  # bang path
    "example.net!victim",
    '"victim@example.net"@SiteA.microsoft.com',  # quoted local parts
    '"victim%example.net"@SiteA.microsoft.com',
    '"victim@example.net"',
    "@SiteA.microsoft.com:victim@example.net",  # source routes
    "@SiteA.microsoft.com,@example.net:victim@example.net",
    "victim@example.net.",  # trailing dots
    "victim@SiteA.microsoft.com.",
    "victim@[192.0.2.1]",  # IP literals
    "victim@[IPv6:2001:db8::1]",
    "victim@[127.0.0.1]",
    "victim@SiteA.microsoft.com.example.net",  # the site's own domain as a prefix / suffix
    "victim@notSiteA.microsoft.com",
    "victim@xSiteA.microsoft.com",
    "victim@microsoft.com",
    "victim@example.net@SiteA.microsoft.com",
    "victim@SiteA.microsoft.com@example.net",
    "victim@example.net%SiteA.microsoft.com",
    "VICTIM@EXAMPLE.NET",
    "victim@xn--exmple-cua.net",  # (IDNA of exämple.net)
]


async def test_open_relay_matrix_from_outside_accepts_nothing(gate: Gate):
    def session(source: str, auth: str | None) -> list[tuple[str, int, bytes]]:
        results = []
        with gate.smtp(source) as s:
            s.ehlo()
            if auth is not None:  # a wrongly authenticated session: the AUTH failed, the client goes on
                s.starttls(context=gate.tls())
                s.ehlo()
                code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0User1\0{auth}".encode()).decode())
                assert code == 535
            for sender in ("victim@example.net", "User1@SiteA.microsoft.com", ""):
                code, _ = s.docmd(f"MAIL FROM:<{sender}>")
                assert code == 250
                accepted = False
                for rcpt in RELAY_MATRIX:
                    code, text = s.docmd(f"RCPT TO:<{rcpt}>")
                    results.append((rcpt, code, text))
                    accepted = accepted or code // 100 == 2
                if accepted:  # try to get it through: the sink must not see it
                    s.data(b"Subject: relay-matrix\r\n\r\nrelay test\r\n")
                s.rset()
        return results
    results = await go(session, OUTSIDE, None) + await go(session, "127.0.0.45", "wrong-password")
    accepted = [(r, c, t) for r, c, t in results if c // 100 == 2]
    assert accepted == []
    assert len(results) == 2 * 3 * len(RELAY_MATRIX)
    assert {c for _, c, _ in results} <= {550, 553, 554, 501, 555}
    await asyncio.sleep(1.0)  # anything queued would be on its way to the smart host by now
    assert not any(b"relay-matrix" in m for m in gate.relayed())


async def test_the_465_listener_writes_no_aiosmtpd_auth_warning(tmp_path, caplog):
    """AUTH without STARTTLS on 465 is right (TLS from the start): aiosmtpd's warning
    about it (a Python warning and a mail.log line, at the first connection) does not
    reach the console."""
    import logging
    import ssl

    caplog.set_level(logging.WARNING, logger="mail.log")
    config = make_config(tmp_path, site_mapping("SiteA", listen=HOST, port=free_port(),
                                                smtp={"tls_generate": True},
                                                submission={"port": free_port(), "tls_port": free_port()}))
    async with running_site(config) as site:
        def connect() -> None:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with smtplib.SMTP_SSL(HOST, site.submission_ports["smtps"], timeout=20, context=context) as s:
                assert s.ehlo()[0] == 250
        await asyncio.to_thread(connect)
    assert not [r for r in caplog.records if "auth_require_tls" in r.getMessage()]
