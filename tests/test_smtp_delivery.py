"""Delivery to other hosts, with real peers on loopback.

Remote hosts are postfix's ``smtp-sink`` (made to answer 4xx, 5xx, hang up, be slow
or be down) and, where smtp-sink cannot do it (per-recipient answers, STARTTLS), a
small aiosmtpd server; DNS is a real ``nsd``; NDRs are read from real Maildirs.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import shutil
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP as AioSMTP
from nsd_server import NsdServer
from sitekit import (
    free_port,
    maildir_messages,
    make_config,
    running_site,
    send_mail,
    site_mapping,
    wait_for,
)
from smtp_sink import SmtpSink

from imsrelay.queue.spool import Spool

USER1 = "User1@SiteA.microsoft.com"
SUBJECT = "Quarterly figures"


def message(subject: str = SUBJECT, body: bytes = b"hello\r\n") -> bytes:
    return (f"From: User One <{USER1}>\r\nTo: bob@partner.test\r\nSubject: {subject}\r\n"
            "Message-ID: <q1@SiteA.microsoft.com>\r\n\r\n").encode() + body


def site_config(tmp_path: Path, *, listen: str = "127.0.0.1", port: int = 0, name: str = "SiteA",
                delivery: dict | None = None, **extra):
    d = {"retry_intervals": [0.2, 0.5], "connect_timeout": 2, "command_timeout": 10}
    d.update(delivery or {})
    return make_config(tmp_path, site_mapping(name, listen=listen, port=port, delivery=d, **extra))


def partner(host: str, port: int, **extra) -> dict:
    return {"email_domains": [{"domain": "partner.test", "host": host, "port": port, **extra}]}


def send(port: int, rcpts: list[str], data: bytes, *, sender: str = USER1, host: str = "127.0.0.1",
         mail_options: tuple[str, ...] = ()) -> None:
    send_mail(host, port, sender, rcpts, data, mail_options=mail_options)


async def submit(site, rcpts: list[str], data: bytes | None = None, **kw) -> None:
    await asyncio.to_thread(send, site.bound_port, rcpts, data or message(), **kw)


def queued(site) -> list:
    return list(Spool(site.config.data_dir).envelopes())


def ndrs(config) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(m, policy=email.policy.default) for m in maildir_messages(config.data_dir, "User1")]


def report_parts(ndr: email.message.EmailMessage) -> tuple[str, str, str]:
    """(human text, delivery-status text, returned headers) of an RFC 3464 report."""
    assert ndr.get_content_type() == "multipart/report"
    assert ndr.get_param("report-type") == "delivery-status"
    human, status, returned = ndr.get_payload()
    status_text = "\n".join(str(block) for block in status.get_payload())
    status_text = re.sub(r"[ \t]*\r?\n[ \t]+", " ", status_text)  # unfold
    returned_text = returned.get_payload(decode=True).decode() if returned.get_content_type() == "text/rfc822-headers" \
        else str(returned.get_payload()[0])
    return human.get_content(), status_text, returned_text


# ------------------------------------------------------------------ smtp-sink peers


async def test_relay_sends_raw_bytes_with_8bitmime(tmp_path):
    port = free_port()
    config = site_config(tmp_path, **partner("127.0.0.1", port))
    body = b"caf\xc3\xa9 \xe9 raw 8-bit\r\n.leading dot\r\n"
    with SmtpSink("127.0.0.1", port) as sink:
        async with running_site(config) as site:
            await submit(site, ["bob@partner.test"], message(body=body), mail_options=("BODY=8BITMIME",))
            dumps = await wait_for(sink.messages)
            await wait_for(lambda: not queued(site))
    dump = dumps[0]
    assert b"X-Mail-Args: <User1@SiteA.microsoft.com> BODY=8BITMIME" in dump
    assert b"X-Helo-Args: ServerA.SiteA.microsoft.com" in dump
    assert b"by ServerA.SiteA.microsoft.com (imsrelay)" in dump
    # the body arrives byte for byte (the sink writes LF line ends and undoes dot-stuffing)
    assert b"\n\ncaf\xc3\xa9 \xe9 raw 8-bit\n.leading dot\n" in dump


async def test_a_large_message_goes_through_unchanged(tmp_path):
    port = free_port()
    config = site_config(tmp_path, **partner("127.0.0.1", port))
    lines = b"".join(b"%07d " % i + b"x" * 70 + b"\r\n" for i in range(20_000))  # ~1.6 MiB
    with SmtpSink("127.0.0.1", port) as sink:
        async with running_site(config) as site:
            await submit(site, ["bob@partner.test"], message(body=lines))
            await wait_for(lambda: not queued(site) and sink.messages())
        dump = sink.messages()[0]
    assert dump.count(b"\n") > 20_000 and b"0019999 " + b"x" * 70 + b"\n" in dump


async def test_4xx_is_retried_then_delivered(tmp_path):
    port = free_port()
    config = site_config(tmp_path, **partner("127.0.0.1", port))
    async with running_site(config) as site:
        with SmtpSink("127.0.0.1", port, "-r", "RCPT"):
            await submit(site, ["bob@partner.test"])
            env = await wait_for(lambda: next((e for e in queued(site) if e.recipients[0].attempts >= 2), None))
            r = env.recipients[0]
            assert r.state == "pending" and r.status == "4.3.0"
            assert r.diagnostic == "smtp; 450 4.3.0 Error: command failed"
            assert r.remote == f"127.0.0.1 [127.0.0.1]:{port}"
        with SmtpSink("127.0.0.1", port) as sink:
            await wait_for(sink.messages)
            await wait_for(lambda: not queued(site))
    assert ndrs(config) == []  # no NDR for a message that got through


async def test_5xx_bounces_at_once_with_an_rfc3464_report(tmp_path):
    port = free_port()
    config = site_config(tmp_path, **partner("127.0.0.1", port), delivery={"retry_intervals": [60]})
    reject = "550 5.1.1 <bob@partner.test>: Recipient address rejected: unknown user"
    with SmtpSink("127.0.0.1", port, "-f", "RCPT", "-B", reject) as sink:
        async with running_site(config) as site:
            await submit(site, ["bob@partner.test"])
            reports = await wait_for(lambda: ndrs(config))
            await wait_for(lambda: not queued(site))
        assert sink.counters()["sess"] == 1  # one attempt only: a 5xx is not retried
    human, status, returned = report_parts(reports[0])
    assert reports[0]["To"].addresses[0].addr_spec == USER1 and reports[0]["Subject"] == f"Undeliverable: {SUBJECT}"
    assert "MSEXCH:IMC:ExchangeORG:SiteA:ServerA" in human
    assert "Final-Recipient: rfc822; bob@partner.test" in status
    assert "Action: failed" in status and "Status: 5.1.1" in status
    assert f"Diagnostic-Code: smtp; {reject}" in status
    assert f"Remote-MTA: dns; 127.0.0.1 [127.0.0.1]:{port}" in status
    assert f"Subject: {SUBJECT}" in returned and "Message-ID: <q1@SiteA.microsoft.com>" in returned


async def test_hang_up_is_retried(tmp_path):
    port = free_port()
    config = site_config(tmp_path, **partner("127.0.0.1", port))
    async with running_site(config) as site:
        with SmtpSink("127.0.0.1", port, "-q", "DATA"):
            await submit(site, ["bob@partner.test"])
            env = await wait_for(lambda: next((e for e in queued(site) if e.recipients[0].attempts >= 1), None))
            r = env.recipients[0]
            assert r.state == "pending" and r.status == "4.4.2"
            assert "lost connection with 127.0.0.1" in r.diagnostic and "while sending DATA" in r.diagnostic
        with SmtpSink("127.0.0.1", port) as sink:
            await wait_for(sink.messages)
            await wait_for(lambda: not queued(site))
    assert ndrs(config) == []


async def test_peer_down_retries_then_expires_with_an_ndr(tmp_path):
    port = free_port()  # nothing listens there
    config = site_config(tmp_path, **partner("127.0.0.1", port), delivery={"lifetime": 2})
    async with running_site(config) as site:
        await submit(site, ["bob@partner.test"])
        await wait_for(lambda: any(e.recipients[0].attempts >= 2 for e in queued(site)))
        reports = await wait_for(lambda: ndrs(config), timeout=15)
        await wait_for(lambda: not queued(site))
    human, status, _ = report_parts(reports[0])
    assert "The maximum time for delivering the message expired" in human
    assert "Status: 4.4.7" in status and "Action: failed" in status
    assert f"connect to 127.0.0.1 [127.0.0.1]:{port}: Connection refused" in status


async def test_smtputf8_message_to_a_peer_without_it_bounces_5_6_7(tmp_path):
    port = free_port()
    config = site_config(tmp_path, **partner("127.0.0.1", port))
    with SmtpSink("127.0.0.1", port) as sink:  # smtp-sink does not offer SMTPUTF8
        async with running_site(config) as site:
            await submit(site, ["josé@partner.test"], message(), mail_options=("SMTPUTF8",))
            reports = await wait_for(lambda: ndrs(config))
        assert sink.messages() == []
    _, status, _ = report_parts(reports[0])
    assert "Status: 5.6.7" in status
    assert "remote server does not support SMTPUTF8" in status


async def test_connections_are_reused_and_closed_when_idle(tmp_path):
    port = free_port()
    config = site_config(tmp_path, **partner("127.0.0.1", port),
                         delivery={"max_per_destination": 1, "connection_idle": 0.5})
    with SmtpSink("127.0.0.1", port) as sink:
        async with running_site(config) as site:
            def five() -> None:
                with smtplib.SMTP("127.0.0.1", site.bound_port, timeout=10) as s:
                    for i in range(5):
                        s.sendmail(USER1, [f"user{i}@partner.test"], message(f"m{i}"))
            await asyncio.to_thread(five)
            await wait_for(lambda: len(sink.messages()) == 5)
            # the one connection is closed (QUIT) after connection_idle, the site still running
            await wait_for(lambda: sink.counters()["quit"] == 1)
            assert site.smtp_client.connections_opened == 1
            assert site.smtp_client.connections_reused == 4
        assert sink.counters() == {"sess": 1, "quit": 1, "mesg": 5}


async def test_a_slow_peer_does_not_hold_up_another(tmp_path):
    slow_port, fast_port = free_port(), free_port()
    config = site_config(tmp_path, email_domains=[
        {"domain": "slow.test", "host": "127.0.0.1", "port": slow_port},
        {"domain": "fast.test", "host": "127.0.0.1", "port": fast_port}],
        # few delivery slots in all, one per destination: messages waiting for the slow
        # destination must not take the slots the fast one needs
        delivery={"command_timeout": 60, "max_deliveries": 2, "max_per_destination": 1})
    with SmtpSink("127.0.0.1", slow_port, "-w", "30") as slow, SmtpSink("127.0.0.1", fast_port) as fast:
        async with running_site(config) as site:
            for rcpt in ("a@slow.test", "b@slow.test", "c@slow.test"):
                await submit(site, [rcpt])
            await submit(site, ["d@fast.test"])
            await wait_for(lambda: {e.recipients[0].address for e in queued(site)} == {
                "a@slow.test", "b@slow.test", "c@slow.test"})  # d@fast.test delivered
            assert len(fast.messages()) == 1 and slow.messages() == []


# ------------------------------------------------------------------ aiosmtpd peers


class Recorder:
    """aiosmtpd handler: refuses RCPT for local parts starting "bad", counts sessions."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes, bool]] = []
        self.sessions = 0

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address.startswith("bad"):
            return f"550 5.1.1 <{address}>: unknown user"
        if address.startswith("later"):
            return f"451 4.2.0 <{address}>: mailbox busy"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        self.mail_options = list(envelope.mail_options)
        self.messages.append((list(envelope.rcpt_tos), envelope.original_content, session.ssl is not None))
        return "250 2.0.0 Ok: queued"


async def aiosmtpd_peer(host: str, port: int, handler: Recorder, tls: ssl.SSLContext | None = None,
                        size_limit: int = 33554432):
    loop = asyncio.get_running_loop()

    def factory():
        handler.sessions += 1
        return AioSMTP(handler, hostname="peer.partner.test", decode_data=False, tls_context=tls,
                       require_starttls=False, enable_SMTPUTF8=True, data_size_limit=size_limit)

    return await loop.create_server(factory, host=host, port=port)


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate and key for the peer (made with the openssl tool)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=peer.partner.test", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")


def server_tls(cert: tuple[str, str], *, demand_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert)
    if demand_client_cert:  # a handshake our client (which has none) cannot complete
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def test_per_recipient_outcomes(tmp_path):
    port = free_port()
    config = site_config(tmp_path, **partner("127.0.0.1", port), delivery={"retry_intervals": [60]})
    peer = Recorder()
    server = await aiosmtpd_peer("127.0.0.1", port, peer)
    try:
        async with running_site(config) as site:
            await submit(site, ["good@partner.test", "bad@partner.test", "later@partner.test"])
            reports = await wait_for(lambda: ndrs(config))
            await wait_for(lambda: peer.messages)
            env = await wait_for(lambda: next((e for e in queued(site) if e.recipients[2].attempts), None))
    finally:
        server.close()
    assert peer.messages[0][0] == ["good@partner.test"]  # DATA went to the accepted one only
    states = {r.address: (r.state, r.status) for r in env.recipients}
    assert states == {"good@partner.test": ("delivered", "2.0.0"), "bad@partner.test": ("bounced", "5.1.1"),
                      "later@partner.test": ("pending", "4.2.0")}
    _, status, _ = report_parts(reports[0])
    assert "bad@partner.test" in status and "good@partner.test" not in status and "later@" not in status


async def test_size_is_declared_and_a_message_over_the_peers_limit_bounces_unsent(tmp_path):
    port = free_port()
    config = site_config(tmp_path, **partner("127.0.0.1", port))
    peer = Recorder()
    server = await aiosmtpd_peer("127.0.0.1", port, peer, size_limit=2000)
    try:
        async with running_site(config) as site:
            await submit(site, ["good@partner.test"], message(subject="small"))
            await wait_for(lambda: peer.messages)
            await submit(site, ["good@partner.test"], message(subject="big", body=(b"y" * 60 + b"\r\n") * 50))
            reports = await wait_for(lambda: ndrs(config))
    finally:
        server.close()
    size = len(peer.messages[0][1])
    assert f"SIZE={size}" in peer.mail_options  # RFC 1870: the exact size as sent
    assert len(peer.messages) == 1
    _, status, _ = report_parts(reports[0])
    assert "Status: 5.3.4" in status and "exceeds size limit 2000 of server 127.0.0.1" in status


async def test_opportunistic_starttls_is_used_when_offered(tmp_path, server_cert):
    port = free_port()
    config = site_config(tmp_path, **partner("127.0.0.1", port))
    peer = Recorder()
    server = await aiosmtpd_peer("127.0.0.1", port, peer, server_tls(server_cert))
    try:
        async with running_site(config) as site:
            await submit(site, ["good@partner.test"])
            await wait_for(lambda: peer.messages)
    finally:
        server.close()
    assert peer.messages[0][2] is True  # the session was encrypted


async def test_opportunistic_starttls_falls_back_to_clear_text_when_tls_fails(tmp_path, server_cert):
    port = free_port()
    config = site_config(tmp_path, **partner("127.0.0.1", port))
    peer = Recorder()
    server = await aiosmtpd_peer("127.0.0.1", port, peer, server_tls(server_cert, demand_client_cert=True))
    try:
        async with running_site(config) as site:
            await submit(site, ["good@partner.test"])
            await wait_for(lambda: peer.messages)
            await wait_for(lambda: not queued(site))
    finally:
        server.close()
    assert peer.messages[0][2] is False and peer.sessions >= 2


async def test_required_starttls_not_offered_is_a_temporary_failure(tmp_path):
    port = free_port()
    config = site_config(tmp_path, **partner("127.0.0.1", port, starttls="require"),
                         delivery={"retry_intervals": [60]})
    with SmtpSink("127.0.0.1", port) as sink:
        async with running_site(config) as site:
            await submit(site, ["bob@partner.test"])
            env = await wait_for(lambda: next((e for e in queued(site) if e.recipients[0].attempts), None))
        assert sink.messages() == []
    r = env.recipients[0]
    assert (r.state, r.status) == ("pending", "4.7.4")
    assert r.diagnostic == f"TLS is required, but was not offered by host 127.0.0.1 [127.0.0.1]:{port}"


# ------------------------------------------------------------------ DNS MX (real nsd)

ZONES = {
    "partner.test": """\
$ORIGIN partner.test.
$TTL 60
@       IN SOA ns1 hostmaster 1 3600 600 86400 60
@       IN NS  ns1
ns1     IN A   127.0.0.1
@       IN MX  10 mx1
@       IN MX  20 mx2
mx1     IN A   127.0.0.2
mx2     IN A   127.0.0.3
""",
    "nomail.test": """\
$ORIGIN nomail.test.
$TTL 60
@       IN SOA ns1.partner.test. hostmaster.partner.test. 1 3600 600 86400 60
@       IN NS  ns1.partner.test.
@       IN MX  0 .
""",
    "loop.test": """\
$ORIGIN loop.test.
$TTL 60
@       IN SOA ns1.partner.test. hostmaster.partner.test. 1 3600 600 86400 60
@       IN NS  ns1.partner.test.
@       IN MX  10 self
self    IN A   127.0.0.1
""",
}


async def test_mx_routing_tries_the_next_mx_and_stops_loops(tmp_path):
    port = free_port()  # the site on 127.0.0.1:port; MX hosts on 127.0.0.2/.3 at the same port
    with NsdServer(ZONES, tmp_path) as nsd, SmtpSink("127.0.0.3", port) as mx2:
        config = site_config(tmp_path, port=port, dns={"nameservers": [nsd.address]},
                             delivery={"mx_port": port, "retry_intervals": [60]})
        async with running_site(config) as site:
            await submit(site, ["bob@partner.test"])  # mx1 (127.0.0.2) refuses: mx2 takes it
            dumps = await wait_for(mx2.messages)
            await submit(site, ["x@nomail.test"])
            await submit(site, ["y@loop.test"])
            reports = await wait_for(lambda: len(ndrs(config)) == 2 and ndrs(config))
            await wait_for(lambda: not queued(site))
    assert b"X-Rcpt-Args: <bob@partner.test>" in dumps[0]
    statuses = sorted(report_parts(r)[1] for r in reports)
    joined = "\n".join(statuses)
    assert "Status: 5.1.10" in joined and "nomail.test accepts no mail (null MX)" in joined
    assert "Status: 5.4.6" in joined and "mail for loop.test loops back to myself" in joined


# ------------------------------------------------------------------ two sites, no DNS


async def test_two_sites_exchange_mail_through_their_email_domain_tables(tmp_path):
    a_host, b_host = "127.0.0.11", "127.0.0.12"
    a_port, b_port = free_port(a_host), free_port(b_host)

    def seed_site(name, listen, port, other, other_host, other_port):
        return site_config(tmp_path, name=name, listen=listen, port=port,
                           connected_sites=[{"name": other, "routing_address": f"@{other}.microsoft.com"}],
                           email_domains=[{"domain": f"{other}.microsoft.com", "host": other_host,
                                           "port": other_port}])

    a = seed_site("SiteA", a_host, a_port, "SiteB", b_host, b_port)
    b = seed_site("SiteB", b_host, b_port, "SiteA", a_host, a_port)
    async with running_site(a) as site_a, running_site(b) as site_b:
        await asyncio.to_thread(send, a_port, ["User2@SiteB.microsoft.com"], message("to B"), host=a_host)
        at_b = await wait_for(lambda: maildir_messages(b.data_dir, "User2"))
        await asyncio.to_thread(send, b_port, [USER1], message("back to A"), sender="User2@SiteB.microsoft.com",
                                host=b_host)
        at_a = await wait_for(lambda: maildir_messages(a.data_dir, "User1"))
        await wait_for(lambda: not queued(site_a) and not queued(site_b))
    assert b"Subject: to B" in at_b[0]
    assert b"by ServerA.SiteA.microsoft.com (imsrelay)" in at_b[0]
    assert b"by ServerB.SiteB.microsoft.com (imsrelay)" in at_b[0]
    assert at_b[0].startswith(b"Return-Path: <User1@SiteA.microsoft.com>")
    assert b"Subject: back to A" in at_a[0] and at_a[0].startswith(b"Return-Path: <User2@SiteB.microsoft.com>")


# ------------------------------------------------------------------ pure parts of the client


def test_reply_classification_and_diagnostics():
    from imsrelay.transport.smtp import reply_outcome, reply_status, smtp_diagnostic

    assert reply_status(550, "5.1.1 <x@y>: unknown user") == "5.1.1"
    assert reply_status(550, "4.2.0 mismatched class") == "5.0.0"  # the reply code decides the class
    assert reply_status(451, "Try later") == "4.0.0"
    assert smtp_diagnostic(550, "5.1.1 <x@y>:\nunknown user") == "smtp; 550 5.1.1 <x@y>: unknown user"
    r = reply_outcome(552, "5.2.2 mailbox full", "mx [192.0.2.1]:25")
    assert (r.ok, r.permanent, r.status, r.remote) == (False, True, "5.2.2", "mx [192.0.2.1]:25")
    assert reply_outcome(421, "4.3.2 shutting down", "mx").permanent is False
    assert reply_outcome(354, "go ahead", "mx").status == "4.5.0"  # unexpected: temporary protocol error


def test_smtputf8_need_and_command_paths():
    from imsrelay.model.envelope import Envelope, RecipientState
    from imsrelay.transport.smtp import needs_smtputf8, smtp_path

    env = Envelope("Q1", "a@b.example", [RecipientState("c@d.example")], 0.0)
    header_utf8 = "Subject: café\r\n\r\nbody".encode()
    assert not needs_smtputf8(env, ["c@d.example"], header_utf8)  # not received with SMTPUTF8
    assert needs_smtputf8(env, ["josé@d.example"], b"x")
    env.smtputf8 = True
    assert needs_smtputf8(env, ["c@d.example"], header_utf8)
    assert not needs_smtputf8(env, ["c@d.example"], b"Subject: plain\r\n\r\ncaf\xc3\xa9")
    assert smtp_path('"john doe"@example.com') == '<"john doe"@example.com>'
    for bad in ("a b@example.com", "a@example.com> SIZE=1", "a\r\nRSET@x"):
        with pytest.raises(ValueError):
            smtp_path(bad)


def test_mx_list_is_cut_at_this_host_as_rfc5321_asks():
    from imsrelay.policy.mail_loops import without_self
    from imsrelay.routing.dns import NextHop

    me = frozenset({("127.0.0.1", 25), ("servera.sitea.microsoft.com", 25)})
    hops = [NextHop("mx1.x", "192.0.2.1", 25, 10), NextHop("ServerA.SiteA.microsoft.com", "10.0.0.9", 25, 20),
            NextHop("mx3.x", "192.0.2.3", 25, 30)]
    assert without_self(hops, me) == ([hops[0]], True)  # a backup MX only tries the better ones
    assert without_self(hops[1:], me) == ([], True)  # the best MX is this host: a loop
    assert without_self([hops[0]], me) == ([hops[0]], False)
    wildcard = frozenset({("0.0.0.0", 25)})
    assert without_self([NextHop("l", "127.0.0.5", 25, 10)], wildcard) == ([], True)


async def test_delay_notice_then_expiry_ndr(tmp_path):
    """delivery.delay_notice: the sender is told once that delivery is delayed
    (RFC 3464 action=delayed, Will-Retry-Until), then gets the NDR at expiry."""
    port = free_port()  # nobody listens: the partner is down
    config = site_config(tmp_path, delivery={"delay_notice": 0.5, "lifetime": 3}, **partner("127.0.0.1", port))
    async with running_site(config) as site:
        await submit(site, ["bob@partner.test"])
        reports = await wait_for(lambda: len(ndrs(config)) >= 2 and ndrs(config), timeout=20)
        await wait_for(lambda: not queued(site))
    delay, final = reports[0], reports[1]
    assert delay["Subject"].startswith("Delivery delayed:")
    human, status, returned = report_parts(delay)
    assert "Action: delayed" in status and "Will-Retry-Until:" in status
    assert f"Subject: {SUBJECT}" in returned
    assert final["Subject"] == f"Undeliverable: {SUBJECT}"
    _, status, _ = report_parts(final)
    assert "Action: failed" in status and "Status: 4.4.7" in status
    assert len(ndrs(config)) == 2  # one delay notice, not one per retry


async def test_mail_to_an_address_literal_goes_to_that_address_from_the_sites_own_address(tmp_path):
    """RFC 5321 §5.1: no MX, no smart host for ``bob@[127.0.0.62]``; and the connection
    comes from the site's listen address (it is a specific one), as Postfix's
    smtp_bind_address would make it."""
    from imsrelay.transport.smtp import source_address_for

    port = free_port("127.0.0.62")
    config = site_config(tmp_path, listen="127.0.0.61",
                         delivery={"smart_host": f"127.0.0.63:{free_port('127.0.0.63')}", "mx_port": port})
    with SmtpSink("127.0.0.62", port) as sink:
        async with running_site(config) as site:
            await submit(site, ["bob@[127.0.0.62]"], host="127.0.0.61")
            dumps = await wait_for(sink.messages)
            await wait_for(lambda: not queued(site))
    assert b"X-Rcpt-Args: <bob@[127.0.0.62]>" in dumps[0]
    assert b"X-Client-Addr: 127.0.0.61" in dumps[0]
    # the decision (pure): only a specific address of the destination's family, and a
    # loopback one only towards loopback
    assert source_address_for("127.0.0.61", "127.0.0.62") == "127.0.0.61"
    assert source_address_for("0.0.0.0", "127.0.0.62") is None
    assert source_address_for("::", "::1") is None
    assert source_address_for("127.0.0.61", "192.0.2.1") is None
    assert source_address_for("192.0.2.10", "198.51.100.1") == "192.0.2.10"
    assert source_address_for("192.0.2.10", "2001:db8::1") is None
