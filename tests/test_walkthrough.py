"""KB Q196927, step by step, on the embedded lab (SiteA/SiteB/SiteC + Internet).

After each of the article's steps the test checks what a user would observe:
who can mail whom, which address is on the mail that arrives, and which
mailboxes each site's directory knows.  One lab is walked through all stages in
order (a module-scoped walk), each stage a test, so a failure names the step.
"""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import pytest
import pytest_asyncio
from sitekit import free_port, rcpt_reply, send_mail, wait_for

from imsrelay.lab.embedded import INTERNET, SITES, Lab, stage_index
from imsrelay.transport.maildir import list_messages

pytestmark = pytest.mark.asyncio(loop_scope="module")

A, B, C = SITES


class Walk:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.sent = 0

    @property
    def port(self) -> int:
        return self.lab.port

    @property
    def mx_servers(self) -> tuple[str, ...]:
        """The servers microsoft.com's MX leads to: Server1 and ServerA with equal preference
        when SiteA has both, else ServerA."""
        return ("Server1", "ServerA") if "SiteA-Server1" in self.lab.extra_servers else ("ServerA",)

    def maildir(self, site: str, alias: str) -> Path:
        return self.lab.data_dir / site / "mailboxes" / alias

    def messages(self, site: str, alias: str) -> list[bytes]:
        return [p.read_bytes() for p in list_messages(self.maildir(site, alias))]

    async def send(self, via: str, sender: str, rcpt: str, subject: str) -> str:
        """Submit one message; returns the SMTP reply text. Raises on refusal."""
        self.sent += 1
        body = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
                f"Message-ID: <walk-{self.sent}@test>\r\n\r\nKB Q196927 walk\r\n").encode()

        await asyncio.to_thread(send_mail, via, self.port, sender, rcpt, body)
        return "ok"

    async def rcpt_reply(self, via: str, rcpt: str, source: str | None = None) -> tuple[int, str]:
        code, text = await asyncio.to_thread(rcpt_reply, via, self.port, rcpt, sender="tester@example.net",
                                             source=source, timeout=10)
        return code, text.decode()

    async def arrives(self, site: str, alias: str, subject: str, timeout: float = 30.0) -> bytes:
        needle = f"Subject: {subject}\r\n".encode()

        def find() -> bytes | None:
            for m in self.messages(site, alias):
                if needle in m:
                    return m
            return None
        return await wait_for(find, timeout=timeout)

    async def known(self, site: str) -> set[tuple[str, str]]:
        s = self.lab.sites[site]
        boxes = await s.directory.run(s.directory.mailboxes)
        return {(m.home_site, m.alias) for m in boxes}

    async def primary(self, site: str, home: str, alias: str) -> str:
        s = self.lab.sites[site]
        m = await s.directory.run(s.directory.mailbox, alias, home)
        return m.primary_address if m else ""

    async def advance(self, stage: str) -> None:
        await self.lab.advance_to(stage_index(stage))
        assert self.lab.stage == stage_index(stage)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=[1, 2], ids=["SiteA-1-server", "SiteA-2-servers"])
async def walk(tmp_path_factory, request):
    """The walk on both topologies: SiteA as one server, and as two (ServerA on .10,
    Server1 on .11: the seed's A and MX records; issue 24)."""
    data = tmp_path_factory.mktemp("lab")
    lab = Lab(data, port=free_port("127.10.10.10"), admin_port=free_port("127.10.10.10"),
              startup_delay="1h", say=lambda s: None, submission_port=free_port("127.10.10.10"),
              smtps_port=free_port("127.10.10.10"), servers={"SiteA": request.param})
    await lab.start()
    try:
        yield Walk(lab)
    finally:
        await lab.stop()


def trace(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0]


async def test_step1_ims_installed_each_site_serves_its_own_domain(walk: Walk):
    assert walk.lab.stage == stage_index("install")
    await walk.send(A.address, "user1@SiteA.microsoft.com", "User1@SiteA.microsoft.com", "s1-local")
    await walk.arrives("SiteA", "User1", "s1-local")
    # sites are not connected yet, but each has the Internet: mail to another site's
    # domain travels like any Internet mail (here: via the Internet host, as by DNS MX)
    await walk.send(A.address, "user1@SiteA.microsoft.com", "User2@SiteB.microsoft.com", "s1-to-b")
    got = await walk.arrives("SiteB", "User2", "s1-to-b")
    assert b"by mail.example.net (imsrelay)" in trace(got)
    assert b"Received: from mail.example.net ([127.10.10.100])\r\n\tby ServerB" in trace(got)
    assert b"Received: from ServerA.SiteA.microsoft.com ([127.10.10.10])\r\n\tby mail.example.net" in trace(got)
    assert got.startswith(b"Return-Path: <user1@SiteA.microsoft.com>")
    # the company domain is not usable yet: microsoft.com's MX is SiteA itself, which
    # does not own microsoft.com yet and is no relay for the Internet host (it connects
    # from its own address, outside the sites' relay networks) -- refused, and User1
    # gets a non-delivery report from the Internet host
    await walk.send(A.address, "user1@SiteA.microsoft.com", "User2@microsoft.com", "s1-company")
    ndr = await walk.arrives("SiteA", "User1", "Undeliverable: s1-company")
    assert b"multipart/report" in ndr and b"5.7.1" in ndr and b"relaying denied" in ndr
    # a client outside the relay networks may not use the site as a relay
    code, text = await walk.rcpt_reply(A.address, "someone@example.org", source="127.0.0.2")
    assert (code, text[:5]) == (554, "5.7.1")
    assert await walk.known("SiteA") == {("SiteA", "User1"), ("SiteA", "Administrator")}
    # outside mail works
    await walk.send(A.address, "user1@SiteA.microsoft.com", "alice@example.net", "s1-out")
    await walk.arrives(INTERNET.name, "alice", "s1-out")


async def test_step2_connected_sites(walk: Walk):
    await walk.advance("connected-sites")
    table = await walk.lab.sites["SiteA"].routing_table()
    assert {c.name for c in table.connected_sites} == {"SiteB", "SiteC"}
    assert {c.routing_address for c in table.connected_sites} == {"@SiteB.microsoft.com", "@SiteC.microsoft.com"}
    await walk.send(A.address, "user1@SiteA.microsoft.com", "User3@SiteC.microsoft.com", "s2-to-c")
    got = await walk.arrives("SiteC", "User3", "s2-to-c")
    # no E-Mail Domain entry yet: still through the Internet
    assert b"by mail.example.net (imsrelay)" in trace(got)


async def test_step3_email_domain_table_sends_direct(walk: Walk):
    await walk.advance("domain-table")
    await walk.send(A.address, "user1@SiteA.microsoft.com", "User3@SiteC.microsoft.com", "s3-to-c")
    got = await walk.arrives("SiteC", "User3", "s3-to-c")
    assert b"mail.example.net" not in trace(got)  # straight from ServerA to ServerC
    assert b"by ServerA.SiteA.microsoft.com (imsrelay)" in trace(got)
    # ServerA connected from its own address, as Server1.SiteA at 10.10.10.10 would
    assert (b"Received: from ServerA.SiteA.microsoft.com ([127.10.10.10])\r\n"
            b"\tby ServerC.SiteC.microsoft.com (imsrelay)") in trace(got)
    await walk.send(C.address, "user3@SiteC.microsoft.com", "User1@SiteA.microsoft.com", "s3-to-a")
    got = await walk.arrives("SiteA", "User1", "s3-to-a")
    assert b"mail.example.net" not in trace(got)
    assert b"Received: from ServerC.SiteC.microsoft.com ([127.10.10.20])\r\n\tby ServerA" in trace(got)
    assert b"[127.0.0.1])\r\n\tby ServerC" in trace(got)  # only the user's client is on 127.0.0.1


async def test_step4_replication_connectors_then_check_now(walk: Walk):
    await walk.advance("replication-connectors")
    assert await walk.known("SiteA") == {("SiteA", "User1"), ("SiteA", "Administrator")}
    await walk.advance("check-now")


async def test_step5_request_now_replicates_every_directory(walk: Walk):
    await walk.advance("request-now")
    everyone = {(s.name, s.user) for s in SITES} | {(s.name, "Administrator") for s in SITES}
    for s in SITES:
        assert await walk.known(s.name) == everyone
    # still different domains per site
    assert await walk.primary("SiteC", "SiteA", "User1") == "User1@SiteA.microsoft.com"


async def test_step6_single_domain_at_site_a(walk: Walk):
    await walk.advance("site-addressing-a")
    for s in SITES:  # replicated to every site
        assert await walk.primary(s.name, "SiteA", "User1") == "User1@microsoft.com"
    # User1@microsoft.com is deliverable through any site
    await walk.send(C.address, "user3@SiteC.microsoft.com", "User1@microsoft.com", "s6-to-user1")
    await walk.arrives("SiteA", "User1", "s6-to-user1")
    # mail from SiteA's users now carries the company address
    await walk.send(A.address, "user1@SiteA.microsoft.com", "User2@SiteB.microsoft.com", "s6-from-a")
    got = await walk.arrives("SiteB", "User2", "s6-from-a")
    assert got.startswith(b"Return-Path: <User1@microsoft.com>")
    assert b"\r\nFrom: User1@microsoft.com\r\n" in got
    # SiteB has not changed yet: User2 is still only User2@SiteB.microsoft.com
    assert await walk.primary("SiteA", "SiteB", "User2") == "User2@SiteB.microsoft.com"
    code, text = await walk.rcpt_reply(A.address, "nobody@microsoft.com")
    assert (code, text[:5]) == (550, "5.1.1")  # microsoft.com is SiteA's own domain now


async def test_step7_repeat_at_site_b_and_c_everyone_at_microsoft_com(walk: Walk):
    await walk.advance("site-addressing-b")
    await walk.advance("site-addressing-c")
    for s in SITES:
        for home in SITES:
            assert await walk.primary(s.name, home.name, home.user) == f"{home.user}@microsoft.com"
    # the three Administrators cannot all be Administrator@microsoft.com
    admins = {await walk.primary("SiteA", s.name, "Administrator") for s in SITES}
    assert len(admins) == 3 and "Administrator@microsoft.com" in admins
    # mail to UserN@microsoft.com sent to ANY site lands in the home site's Maildir
    n = 0
    for via in SITES:
        for home in SITES:
            n += 1
            await walk.send(via.address, "alice@example.net", f"{home.user}@microsoft.com", f"s7-{n}")
            await walk.arrives(home.name, home.user, f"s7-{n}")
    # the old site-domain address still works (kept as a secondary proxy address)
    await walk.send(A.address, "alice@example.net", "User2@SiteB.microsoft.com", "s7-old")
    await walk.arrives("SiteB", "User2", "s7-old")
    # from outside, through the company MX (SiteA) to the home site
    await walk.send(INTERNET.address, "alice@example.net", "User3@microsoft.com", "s7-outside")
    got = await walk.arrives("SiteC", "User3", "s7-outside")
    assert b"by mail.example.net (imsrelay)" in trace(got)
    assert any(f"by {m}.SiteA.microsoft.com (imsrelay)".encode() in trace(got) for m in walk.mx_servers)
    if len(walk.mx_servers) > 1:  # equal-preference MX: the Internet host uses both servers in turn
        # (by queue id: 16 messages all on one server would be a 1 in 32768 chance)
        subjects = [f"s7-mx-{i}" for i in range(16)]
        for subject in subjects:
            await walk.send(INTERNET.address, "alice@example.net", "User3@microsoft.com", subject)
        firsts = set()
        for subject in subjects:
            hops = trace(await walk.arrives("SiteC", "User3", subject))
            firsts |= {m for m in walk.mx_servers if f"by {m}.SiteA.microsoft.com (imsrelay)".encode() in hops}
        assert firsts == set(walk.mx_servers)
    for key, server in walk.lab.extra_servers.items():  # SiteA's other server takes mail for the whole site
        n += 1
        await walk.send(server.address, "alice@example.net", "User1@microsoft.com", f"s7-{n}")
        got = await walk.arrives("SiteA", "User1", f"s7-{n}")  # homed on ServerA: one intra-site hop
        assert b"by Server1.SiteA.microsoft.com (imsrelay)" in trace(got)
        assert b"Received: from Server1.SiteA.microsoft.com ([127.10.10.11])\r\n\tby ServerA" in trace(got)
        assert await walk.known(key) == await walk.known("SiteA")  # the whole directory, by intra-site replication
        n += 1
        await walk.send(server.address, "alice@example.net", "User2@microsoft.com", f"s7-{n}")
        await walk.arrives("SiteB", "User2", f"s7-{n}")
    # and out to the Internet with the company address
    await walk.send(C.address, "user3@SiteC.microsoft.com", "bob@example.net", "s7-out")
    got = await walk.arrives(INTERNET.name, "bob", "s7-out")
    assert got.startswith(b"Return-Path: <User3@microsoft.com>")
    assert b"\r\nFrom: User3@microsoft.com\r\n" in got
    # unknown company users are refused at RCPT, at every site
    for s in SITES:
        code, text = await walk.rcpt_reply(s.address, "nobody@microsoft.com")
        assert (code, text[:5]) == (550, "5.1.1")


async def test_the_labs_link_monitor_sees_the_other_sites_and_the_internet_up(walk: Walk):
    """SiteA's Link Monitor (KB Q246674): SiteB's and SiteC's system attendants return
    its pings and the Internet host's NDR answers the foreign address; no ping or answer
    lands in a mailbox."""
    from imsrelay.lab.embedded import LINK_MONITOR_FOREIGN

    monitors = walk.lab.sites["SiteA"].link_monitors

    def states() -> dict[str, str]:
        return {t["target"]: t["state"] for m in monitors.snapshot() for t in m["targets"]}
    await wait_for(lambda: set(states().values()) == {"up"}, timeout=60)
    assert set(states()) == {"SiteB", "SiteC", LINK_MONITOR_FOREIGN}
    for s in SITES:
        for alias in (s.user, "Administrator"):
            assert not [m for m in walk.messages(s.name, alias) if b"X-Link-Monitor" in m], (s.name, alias)
async def test_two_servers_a_mailbox_made_on_server1_reaches_the_organisation(walk: Walk):
    """SiteA as two servers (issue 24): a mailbox created on Server1 is homed there, reaches
    ServerA by intra-site replication and the other sites through ServerA, the bridgehead;
    their mail for it ends in Server1's Maildir."""
    if not walk.lab.extra_servers:
        pytest.skip("SiteA runs as one server here")
    server1, server_a = walk.lab.sites["SiteA-Server1"], walk.lab.sites["SiteA"]
    made = await server1.directory.run(server1.directory.add_mailbox, "User5", "User Five", (),
                                       server1.config.home_server_for(None))
    assert made.home_server == "Server1"
    assert (await wait_for(lambda: server_a.directory.run(server_a.directory.mailbox, "User5"))).home_server == "Server1"
    site_b = walk.lab.sites["SiteB"]
    assert site_b.replicator is not None
    await site_b.replicator.request_now("SiteA")  # answered by ServerA, which has it from Server1
    await wait_for(lambda: walk.primary("SiteB", "SiteA", "User5"), timeout=30)
    assert await walk.primary("SiteB", "SiteA", "User5") == "User5@microsoft.com"
    await walk.send(B.address, "user2@SiteB.microsoft.com", "User5@microsoft.com", "to-user5")
    got = await walk.arrives("SiteA-Server1", "User5", "to-user5")
    assert b"by ServerA.SiteA.microsoft.com (imsrelay)" in trace(got)  # through the site's bridgehead, one hop
    assert not walk.maildir("SiteA", "User5").exists()
    # Check Now works per server; only ServerA runs the replication connectors
    assert (await server1.check_now()).as_dict() is not None
    assert server_a.config.bridgehead and not server1.config.bridgehead


@pytest.mark.skipif(__import__("shutil").which("swaks") is None, reason="swaks not installed")
async def test_lab_submission_587_465_with_the_documented_accounts(walk: Walk):
    """The lab's TLS works out of the box (its throwaway CA), and its test accounts
    submit on the submission ports (README: lab test accounts)."""
    import ssl
    import subprocess

    from imsrelay.lab.embedded import LAB_PASSWORDS

    lab = walk.lab
    ca = str(lab.ca_cert)
    assert f"--tls-ca-path {ca}" in await lab.describe()
    # 587: STARTTLS, verified against the lab CA, AUTH, then relay to the Internet
    out = await asyncio.to_thread(subprocess.run, [
        "swaks", "--server", f"{A.address}:{lab.submission_port}", "--tls", "--tls-verify", "--tls-ca-path", ca,
        "--auth", "PLAIN", "--auth-user", "User1", "--auth-password", LAB_PASSWORDS["User1"],
        "-f", "User1@microsoft.com", "-t", "alice@example.net", "--header", "Subject: lab-587"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    got = await walk.arrives(INTERNET.name, "alice", "lab-587")
    assert b"with ESMTPSA id" in trace(got)
    # 465: TLS on connect, LOGIN as the SiteC Administrator, to a user of another site
    admin = await walk.primary("SiteC", "SiteC", "Administrator")
    out = await asyncio.to_thread(subprocess.run, [
        "swaks", "--server", f"{C.address}:{lab.smtps_port}", "--tls-on-connect", "--tls-verify",
        "--tls-ca-path", ca, "--auth", "LOGIN", "--auth-user", "Administrator", "--auth-password",
        LAB_PASSWORDS["Administrator"], "-f", admin, "-t", "User2@microsoft.com",
        "--header", "Subject: lab-465"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    await walk.arrives("SiteB", "User2", "lab-465")

    # smtplib login() on the main port works as is in the lab (auth.allow_plaintext), and
    # with a wrong password it is refused
    def plain_login(password: str) -> int:
        with smtplib.SMTP(B.address, lab.port, timeout=20) as s:
            try:
                return s.login("User2", password)[0]
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code
    assert await asyncio.to_thread(plain_login, LAB_PASSWORDS["User2"]) == 235
    assert await asyncio.to_thread(plain_login, "wrong") == 535

    def verified() -> str:  # the certificate names the server and its address
        ctx = ssl.create_default_context(cafile=ca)
        with smtplib.SMTP_SSL(A.address, lab.smtps_port, timeout=20, context=ctx) as s:
            s.ehlo()
            return s.sock.getpeercert()["subject"][0][0][1]
    assert await asyncio.to_thread(verified) == "servera.sitea.microsoft.com"
