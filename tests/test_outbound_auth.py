"""Outbound AUTH and TLS per E-Mail Domain and for the smart host (the IMS Security tab,
KB Q174754), against real aiosmtpd peers on loopback: the right credentials deliver
(and never show in logs, the protocol log, tracking, the queue, `check-config`, the
admin API or the console's data), wrong ones defer and end in an NDR at the lifetime,
AUTH goes only over TLS unless allowed, and a TLS-required domain whose peer lacks
STARTTLS defers."""

from __future__ import annotations

import asyncio
import base64
import ssl
from typing import Any

import pytest
import structlog
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import AuthResult, LoginPassword
from ims_kit import Peer, admin, admin_section, mailbox, message, queued, start_peer, submit
from sitekit import free_port, run_cli, running_site, site_mapping, wait_for, write_site_file
from tls_kit import make_cert

SECRET = "s3cret-Pa55-q174754"
USER = "ims-sitea"
SMART_USER = "ims-smarthost"


class AuthPeer(Peer):
    """A peer that wants AUTH before MAIL (aiosmtpd's own AUTH PLAIN/LOGIN), and records
    the logins it saw."""

    def __init__(self) -> None:
        super().__init__("smarthost.partner.test")
        self.logins: list[tuple[str, str, bool]] = []  # (mechanism, login, accepted)

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        ok = data.login.decode() in (USER, SMART_USER) and data.password.decode() == SECRET
        self.logins.append((mechanism, data.login.decode(), ok))
        return AuthResult(success=ok, handled=False)  # (handled=True would leave the reply to us)


@pytest.fixture(scope="module")
def peer_tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    cert, key = make_cert(tmp_path_factory.mktemp("peer-tls"), "peer", "IP:127.0.0.1", ca=None)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def start_auth_peer(port: int, peer: AuthPeer, tls: ssl.SSLContext | None) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: AioSMTP(peer, hostname=peer.name, decode_data=False, tls_context=tls, require_starttls=False,
                        authenticator=peer.authenticate, auth_required=True, auth_require_tls=tls is not None),
        host="127.0.0.1", port=port)


def domain_entry(port: int, **auth: Any) -> dict[str, Any]:
    return {"domain": "partner.test", "host": "127.0.0.1", "port": port, "starttls": "require",
            "auth": {"username": USER, **auth}}


def secret_forms() -> list[bytes]:
    """The password as it could leak: in clear, and inside AUTH PLAIN / LOGIN's base64."""
    return [SECRET.encode(), base64.b64encode(f"\0{USER}\0{SECRET}".encode()), base64.b64encode(SECRET.encode())]


def assert_no_secret(where: str, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    for form in secret_forms():
        assert form not in raw, f"the password shows in {where}"


async def test_right_credentials_deliver_and_the_password_never_shows(tmp_path, peer_tls, monkeypatch):
    monkeypatch.setenv("IMSRELAY_TEST_PARTNER_PW", SECRET)
    port, peer = free_port(), AuthPeer()
    server = await start_auth_peer(port, peer, peer_tls)
    path, config = write_site_file(tmp_path, site_mapping(
        "SiteA", delivery={"retry_intervals": [0.3], "smart_host": f"127.0.0.1:{port}",
                           "smart_host_starttls": "require",
                           "smart_host_auth": {"username": SMART_USER, "password": SECRET}},
        email_domains=[domain_entry(port, password_env="IMSRELAY_TEST_PARTNER_PW")],
        diagnostics={"smtp_protocol_log": "maximum"}, **admin_section()))
    try:
        with structlog.testing.capture_logs() as logs:  # (before the start: the site's logger is made then)
            async with running_site(config) as site:
                await submit(site, ["bob@partner.test"], message("by the domain's credentials"))
                await submit(site, ["carol@elsewhere.test"], message("by the smart host's credentials"))
                await wait_for(lambda: len(peer.messages) == 2)
                await wait_for(lambda: not queued(site))
                site.protocol_log.flush()
                answers = [await admin(site, "GET", p) for p in ("/config", "/config/file")]
                code, tracked, _ = await asyncio.to_thread(run_cli, "track", "--config", str(path), "--json",
                                                           "--recipient", "bob@partner.test")
                ok, checked, _ = await asyncio.to_thread(run_cli, "check-config", str(path))
                _, explained, _ = await asyncio.to_thread(run_cli, "route", "bob@partner.test", "--config",
                                                          str(path))
    finally:
        server.close()
    # each message with its own entry's credentials (a connection made for one user is not reused for another)
    assert sorted(login for _, login, accepted in peer.logins if accepted) == [USER, SMART_USER]
    assert sorted(peer.subjects()) == ["by the domain's credentials", "by the smart host's credentials"]
    auth_events = [e for e in logs if e["event"] == "delivery.auth"]
    assert sorted(e["user"] for e in auth_events) == [USER, SMART_USER] and all(e["tls"] for e in auth_events)
    # the secret, in clear or base64, nowhere: logs, protocol log, tracking, CLI, admin API, the data directory
    assert_no_secret("the log events", repr(logs))
    protocol = (config.data_dir / "logs" / "smtp-protocol.log").read_text()
    assert "AUTH PLAIN ********" in protocol or "AUTH LOGIN ********" in protocol
    assert_no_secret("the protocol log", protocol)
    assert code == 0 and ok == 0
    assert_no_secret("imsrelay track", tracked)
    assert f"AUTH as {USER}, password from environment variable IMSRELAY_TEST_PARTNER_PW" in checked
    assert f"AUTH as {SMART_USER}, password from the site file" in checked
    assert_no_secret("imsrelay check-config", checked)
    assert f"AUTH as {USER}" in explained
    assert_no_secret("imsrelay route", explained)
    assert answers[0]["email_domains"][0]["auth_user"] == USER
    assert answers[1]["email_domains"][0]["auth"]["username"] == USER
    assert_no_secret("the admin API", repr(answers))
    for f in config.data_dir.rglob("*"):
        if f.is_file():
            assert_no_secret(str(f), f.read_bytes())


async def test_wrong_credentials_defer_then_end_in_an_ndr(tmp_path, peer_tls):
    port, peer = free_port(), AuthPeer()
    server = await start_auth_peer(port, peer, peer_tls)
    secret_file = tmp_path / "partner.pw"
    secret_file.write_text("not-the-password\n")
    _, config = write_site_file(tmp_path, site_mapping(
        "SiteA", delivery={"retry_intervals": [0.3], "lifetime": "3s"},
        email_domains=[domain_entry(port, password_file="partner.pw")]))
    try:
        async with running_site(config) as site:
            await submit(site, ["bob@partner.test"], message("refused credentials"))
            deferred = await wait_for(lambda: [r for e in queued(site) for r in e.recipients if r.diagnostic])
            assert deferred[0].status == "4.7.8" and deferred[0].state == "pending"
            assert f"authentication as {USER} failed" in deferred[0].diagnostic
            assert "535" in deferred[0].diagnostic
            ndrs = await wait_for(lambda: mailbox(config.data_dir, "User1"), timeout=15)
    finally:
        server.close()
    assert peer.messages == [] and peer.logins and not any(ok for _, _, ok in peer.logins)
    assert {login for _, login, _ in peer.logins} == {USER}
    text = ndrs[0].as_string()
    assert "bob@partner.test" in text and f"authentication as {USER} failed" in text


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_credentials_go_only_over_tls_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("IMSRELAY_TEST_PARTNER_PW", SECRET)
    clear_port, allowed_port = free_port(), free_port()
    clear, allowed = AuthPeer(), AuthPeer()
    servers = [await start_auth_peer(clear_port, clear, None), await start_auth_peer(allowed_port, allowed, None)]
    entry = {"host": "127.0.0.1", "starttls": "opportunistic",
             "auth": {"username": USER, "password_env": "IMSRELAY_TEST_PARTNER_PW"}}
    _, config = write_site_file(tmp_path, site_mapping(
        "SiteA", delivery={"retry_intervals": [0.3]},
        email_domains=[{**entry, "domain": "clear.test", "port": clear_port},
                       {**entry, "domain": "allowed.test", "port": allowed_port,
                        "auth": {**entry["auth"], "allow_plaintext": True}}]))
    try:
        async with running_site(config) as site:
            await submit(site, ["bob@clear.test", "bob@allowed.test"], message("in clear?"))
            await wait_for(lambda: allowed.messages)
            held = await wait_for(lambda: [r for e in queued(site) for r in e.recipients
                                           if r.address == "bob@clear.test" and r.diagnostic])
    finally:
        for s in servers:
            s.close()
    assert clear.logins == [] and clear.messages == []  # the credentials never went out in clear
    assert held[0].status == "4.7.0" and "sent only over TLS" in held[0].diagnostic
    assert [(login, ok) for _, login, ok in allowed.logins] == [(USER, True)]


async def test_a_tls_required_domain_whose_peer_lacks_starttls_defers(tmp_path):
    port, peer = free_port(), Peer()
    server = await start_peer("127.0.0.1", port, peer)  # no STARTTLS offered
    _, config = write_site_file(tmp_path, site_mapping(
        "SiteA", delivery={"retry_intervals": [0.3]},
        email_domains=[{"domain": "partner.test", "host": "127.0.0.1", "port": port, "starttls": "require"},
                       {"domain": "open.test", "host": "127.0.0.1", "port": port}]))
    try:
        async with running_site(config) as site:
            await submit(site, ["bob@partner.test", "bob@open.test"], message("tls?"))
            await wait_for(lambda: peer.messages)
            held = await wait_for(lambda: [r for e in queued(site) for r in e.recipients if r.diagnostic])
    finally:
        server.close()
    assert [rcpts for rcpts, _ in peer.messages] == [["bob@open.test"]]  # the opportunistic domain went
    assert held[0].address == "bob@partner.test" and held[0].status == "4.7.4"
    assert "TLS is required, but was not offered" in held[0].diagnostic

