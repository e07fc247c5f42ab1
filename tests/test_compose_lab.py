"""The Docker compose lab (docker-compose.yml) as a user meets it: `docker/lab.sh up`
(which is `docker-compose up` plus building what is missing) ends in KB Q196927's
end state with no manual step, mail flows in and out by DNS MX through the real
lab nsd and a real Postfix "Internet", and faults lose nothing.

Needs a Docker engine; skipped with a clear message when `docker info` fails or
IMSRELAY_SKIP_DOCKER=1.  One lab per module (built once; images are reused when
present), torn down with its volumes at the end (IMSRELAY_DOCKER_KEEP=1 keeps it
for a post-mortem).  All traffic from the host goes to ports published on
127.0.0.1, or through `docker exec`.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
from compose_kit import (
    CONSOLE_PORT,
    INTERNET_SMTP,
    SITES,
    SUBMISSION,
    TOKEN,
    ComposeLab,
    MailFlow,
    docker_skip_reason,
    header,
    lab_held,
    message_ids,
    poll,
    progress_to_terminal,
)

pytestmark = pytest.mark.docker

SMTP = {service: port for service, (_, port, _, _) in SITES.items()}
END_STATE = {
    ("SiteA", "User1"): "User1@microsoft.com", ("SiteA", "Administrator"): "Administrator@microsoft.com",
    ("SiteB", "User2"): "User2@microsoft.com", ("SiteB", "Administrator"): "Administrator2@microsoft.com",
    ("SiteC", "User3"): "User3@microsoft.com", ("SiteC", "Administrator"): "Administrator3@microsoft.com",
}
ALICE = "/home/alice/Maildir"
REST_OF_INTERNET = "/home/rest-of-internet/Maildir"


@pytest.fixture(scope="module")
def lab(pytestconfig):
    reason = docker_skip_reason()
    if reason:
        pytest.skip(reason)
    lab = ComposeLab(progress=progress_to_terminal(pytestconfig))
    with lab_held(lab, lab.up, "compose lab up (build included)"):
        yield lab


# ------------------------------------------------------------------ the article's end state


def test_setup_service_brings_the_organisation_to_the_articles_end_state(lab: ComposeLab):
    state = lab.state("setup")
    assert (state["Status"], state["ExitCode"]) == ("exited", 0)
    log = lab.docker("logs", lab.container("setup")).stdout
    assert "org-setup: organisation ExchangeORG set up" in log
    # every site knows every mailbox, every user is alias@microsoft.com
    for service in SITES:
        assert lab.primaries(service) == END_STATE, service
        assert lab.admin(service, "GET", "/site-addressing")["smtp_address"] == "@microsoft.com"


def test_setup_again_changes_nothing(lab: ComposeLab):
    before = {s: lab.admin(s, "GET", "/status")["directory"]["highest_usn"] for s in SITES}
    rerun = lab.docker("start", "-a", lab.container("setup"), timeout=300)
    assert "already set up: nothing changed" in rerun.stdout, rerun.stdout + rerun.stderr
    assert {s: lab.admin(s, "GET", "/status")["directory"]["highest_usn"] for s in SITES} == before


def test_the_cli_inside_a_site_container(lab: ComposeLab):
    """What the README shows: `docker compose exec sitea imsrelay ...`."""
    listing = lab.exec("sitea", "imsrelay", "directory", "list", "--config", "/etc/imsrelay/site.toml").stdout
    for address in END_STATE.values():
        assert address in listing
    status = lab.exec("siteb", "imsrelay", "replicate", "status", "--config", "/etc/imsrelay/site.toml").stdout
    assert "SiteA" in status and "SiteC" in status
    # each site signs with its own mounted key and trusts the three (config/docker/keys/)
    assert "keys: per-site ed25519 (trusted: SiteA, SiteB, SiteC)" in status
    for service in SITES:
        replication = lab.admin(service, "GET", "/status")["replication"]
        assert (replication["key_scheme"], replication["trusted_sites"]) == \
            ("per-site ed25519", ["SiteA", "SiteB", "SiteC"]), service
    check = lab.exec("sitec", "imsrelay", "org-setup", "--check", "--site", "http://10.10.10.10:8025",
                     "--site", "http://10.10.10.15:8025", "--site", "http://10.10.10.20:8025").stdout
    assert check.rstrip().endswith("the organisation is set up")


# ------------------------------------------------------------------ what users observe


def test_submission_587_and_465_with_the_documented_accounts(lab: ComposeLab, tmp_path):
    """Each site generated a throwaway CA in its volume; with it trusted, the lab's test
    accounts submit on the published 587 and 465 ports (README: lab test accounts)."""
    import smtplib
    import ssl

    from imsrelay.lab.embedded import LAB_PASSWORDS

    ca = tmp_path / "siteA-ca.crt"
    ca.write_text(lab.exec("sitea", "cat", "/var/lib/imsrelay/tls/ca.crt").stdout)
    ctx = ssl.create_default_context(cafile=str(ca))
    submission, smtps = SUBMISSION["sitea"]
    msgid, body = lab.message("User1@microsoft.com", "alice@example.net", "submitted on 587", "587")
    with smtplib.SMTP("127.0.0.1", submission, timeout=30) as s:
        s.ehlo()
        assert s.mail("User1@microsoft.com")[0] == 530  # AUTH first
        s.rset()
        s.starttls(context=ctx)  # the certificate names 127.0.0.1 too: verified
        s.login("User1", LAB_PASSWORDS["User1"])
        s.sendmail("User1@microsoft.com", ["alice@example.net"], body)
    got = poll(lambda: lab.find("internet", ALICE, msgid), timeout=90, what="the 587 mail in alice's Maildir")
    assert b"ESMTPSA" in header(got[0])
    msgid, body = lab.message("User1@microsoft.com", "User3@microsoft.com", "submitted on 465", "465")
    with smtplib.SMTP_SSL("127.0.0.1", smtps, timeout=30, context=ctx) as s:
        try:
            s.login("User1", "wrong")
            raise AssertionError("a wrong password was accepted")
        except smtplib.SMTPAuthenticationError as exc:
            assert exc.smtp_code == 535
        s.login("Administrator", LAB_PASSWORDS["Administrator"])
        s.sendmail("Administrator@microsoft.com", ["User3@microsoft.com"], body)
    poll(lambda: lab.find("sitec", "/var/lib/imsrelay/mailboxes/User3", msgid), timeout=90,
         what="the 465 mail in SiteC's Maildir")


def test_mail_from_outside_goes_by_dns_mx_to_sitea_and_on_to_the_home_site(lab: ComposeLab):
    msgid, body = lab.message("alice@example.net", "User2@microsoft.com", "from outside", "outside")
    lab.send(INTERNET_SMTP, "alice@example.net", "User2@microsoft.com", body)  # the Internet's Postfix
    got = poll(lambda: lab.find("siteb", "/var/lib/imsrelay/mailboxes/User2", msgid), timeout=90,
               what="User2@microsoft.com's mail in SiteB's Maildir")
    assert len(got) == 1
    trace = header(got[0])
    # Postfix found microsoft.com's MX (Server1.SiteA) in the lab DNS; SiteA handed it to SiteB
    assert b"by mail.example.net (Postfix" in trace
    assert b"by ServerA.SiteA.microsoft.com (imsrelay)" in trace
    assert b"by ServerB.SiteB.microsoft.com (imsrelay)" in trace
    assert got[0].startswith(b"Return-Path: <alice@example.net>")


def test_mail_to_the_internet_leaves_by_dns_mx_with_the_company_address(lab: ComposeLab):
    msgid, body = lab.message("user1@SiteA.microsoft.com", "alice@example.net", "to the Internet", "out")
    lab.send(SMTP["sitea"], "user1@SiteA.microsoft.com", "alice@example.net", body)
    got = poll(lambda: lab.find("internet", ALICE, msgid), timeout=90, what="the mail in alice's Maildir")
    assert len(got) == 1
    head = header(got[0])
    assert head.startswith(b"Return-Path: <User1@microsoft.com>")  # the envelope sender, rewritten
    assert b"\nFrom: User1@microsoft.com\n" in head  # and the From: header
    assert b"[10.10.10.10]" in head  # straight from SiteA (Postfix's Received: line)


def test_the_rest_of_the_internet_is_in_a_box(lab: ComposeLab):
    """A sealed lab: mail to a domain outside the lab, from a site and from the Internet's
    own users, goes by the lab DNS's root wildcard MX to the Internet host and is kept in
    rest-of-internet's Maildir; nothing asks a real resolver or leaves 10.10.10.0/24."""
    msgid, body = lab.message("user1@SiteA.microsoft.com", "someone@real-company.example", "to a real domain",
                              "box-site")
    lab.send(SMTP["sitea"], "user1@SiteA.microsoft.com", "someone@real-company.example", body)
    got = poll(lambda: lab.find("internet", REST_OF_INTERNET, msgid), timeout=90,
               what="the site's outside mail in rest-of-internet's Maildir")
    assert len(got) == 1
    msgid, body = lab.message("alice@example.net", "bob@gmail.com", "from alice outwards", "box-alice")
    lab.send(INTERNET_SMTP, "alice@example.net", "bob@gmail.com", body)
    poll(lambda: lab.find("internet", REST_OF_INTERNET, msgid), timeout=90,
         what="alice's outside mail in rest-of-internet's Maildir")
    # SiteA refuses an address literal outside the lab (sealed): the sender gets an NDR
    route = lab.exec("sitea", "imsrelay", "route", "x@[192.0.2.1]", "--config", "/etc/imsrelay/site.toml").stdout
    assert "outside this sealed lab" in route


def test_user3_sent_to_siteb_reaches_sitec(lab: ComposeLab):
    msgid, body = lab.message("User2@microsoft.com", "User3@microsoft.com", "B to C", "b-to-c")
    lab.send(SMTP["siteb"], "User2@microsoft.com", "User3@microsoft.com", body)
    got = poll(lambda: lab.find("sitec", "/var/lib/imsrelay/mailboxes/User3", msgid), timeout=60,
               what="User3's mail in SiteC's Maildir")
    assert len(got) == 1
    assert b"by ServerB.SiteB.microsoft.com (imsrelay)" in header(got[0])
    assert b"mail.example.net" not in header(got[0])  # site to site, not through the Internet
    for service in SITES:  # unknown company users are refused at RCPT everywhere
        code, text = lab.rcpt_reply(SMTP[service], "nobody@microsoft.com")
        assert (code, text[:5]) == (550, "5.1.1"), service


# ------------------------------------------------------------------ the web console


def test_the_console_on_127_0_0_1_shows_the_organisation_and_traces_mail(lab: ComposeLab, tmp_path):
    """The `console` service, published on 127.0.0.1: in a real browser, the three
    sites, the recipients at microsoft.com, a message from the Internet and its path."""
    import shutil
    import urllib.parse

    from console_kit import launch_browser, log_in
    from playwright.sync_api import expect, sync_playwright

    assert lab.healthy("console")
    assert shutil.which("chromium"), "the console test needs Debian's chromium (./dev test installs it)"
    msgid, body = lab.message("alice@example.net", "User2@microsoft.com", "seen in the console", "console")
    lab.send(INTERNET_SMTP, "alice@example.net", "User2@microsoft.com", body)
    poll(lambda: lab.find("siteb", "/var/lib/imsrelay/mailboxes/User2", msgid), timeout=90,
         what="the console's test mail in SiteB's Maildir")
    url = f"http://127.0.0.1:{CONSOLE_PORT}/"
    with sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)
        log_in(page, url, TOKEN)
        expect(page.locator(".site-card")).to_have_count(3)
        expect(page.locator(".site-card[data-site=SiteB]")).to_contain_text("@microsoft.com")
        page.screenshot(path=str(tmp_path / "compose-console.png"), full_page=True)
        page.goto(url + "#/recipients")
        user2 = page.locator("tr[data-alias=User2]")
        expect(user2.locator("li.primary")).to_contain_text("User2@microsoft.com")
        for site in ("SiteA", "SiteB", "SiteC"):
            expect(user2.locator(".badge.ok", has_text=site)).to_have_count(1)
        page.goto(url + "#/mail?site=SiteB&mailbox=User2")
        row = page.locator("table.message-list tr", has_text="seen in the console")
        expect(row).to_have_count(1)
        page.goto(url + "#/tracking?q=" + urllib.parse.quote(msgid, safe=""))
        labels = page.locator("article.story .hop-node .node-label")
        expect(labels.filter(has_text="SiteA")).to_have_count(1)
        expect(labels.filter(has_text="SiteB")).to_have_count(1)
        expect(page.locator("article.story ul.outcomes")).to_contain_text("delivered at SiteB")
        page.screenshot(path=str(tmp_path / "compose-tracking.png"), full_page=True)
        browser.close()


def test_message_api_tracking_and_the_client_on_the_published_ports(lab: ComposeLab):
    """The sites' message API on 127.0.0.1, joined by imsrelay.testing.LabClient;
    tracking follows a message SiteA -> SiteB and from the Internet's Postfix."""
    import subprocess
    import sys

    from compose_kit import TOKEN

    from imsrelay.testing import LabClient

    for service in SITES:
        assert lab.api(service, "/sites")["sites"][0]["ready"] is True
    client = LabClient([f"http://127.0.0.1:{admin}" for _, _, admin, _ in SITES.values()], TOKEN,
                       smtp={site: ("127.0.0.1", port) for site, port, _, _ in SITES.values()})
    assert client.ready()
    mid = client.send("User2@microsoft.com", sender="User1@microsoft.com", via="SiteA", subject="docker tracked",
                      html="<p>html</p>", attachments=[("a.bin", "application/octet-stream", b"\0" * 1000)])
    msg = client.wait_for(f"message-id:{mid}", timeout=90)
    assert (msg["site"], msg["mailbox"]) == ("SiteB", "User2")
    detail = client.message(msg["id"])
    assert detail["html"].strip() == "<p>html</p>" and detail["attachments"][0]["size"] == 1000
    assert client.raw(msg["id"]).startswith(b"Return-Path: <User1@microsoft.com>")
    story = poll(lambda: next((m for m in client.track(mid)["messages"]
                               if m["recipients"] and m["recipients"][0]["state"] == "delivered"), None),
                 timeout=60, what="tracking of the SiteA -> SiteB message")
    assert story["chain"] == ["SiteA", "SiteB"]
    args = [arg for _, _, admin, _ in SITES.values() for arg in ("--site", f"http://127.0.0.1:{admin}={TOKEN}")]
    out = subprocess.run([sys.executable, "-m", "imsrelay", "track", "--message-id", mid, *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "path: SiteA -> SiteB" in out.stdout, out.stdout + out.stderr
    # from outside, through the Internet's Postfix: tracking starts where imsrelay got it
    outside, body = lab.message("alice@example.net", "User3@microsoft.com", "tracked from outside", "track-out")
    lab.send(INTERNET_SMTP, "alice@example.net", "User3@microsoft.com", body)
    story = poll(lambda: next((m for m in client.track(outside)["messages"]
                               if m["recipients"] and m["recipients"][0]["state"] == "delivered"), None),
                 timeout=90, what="tracking of the message from outside")
    assert story["chain"] == ["SiteA", "SiteC"]
    assert story["hops"][0]["client"] == "10.10.10.100"  # the Internet host, by DNS MX
    assert client.delete(f"message-id:{outside}") == 1


# ------------------------------------------------------------------ faults: nothing lost


def delivered_once(lab: ComposeLab, service: str, alias: str, sent: list[str]) -> Counter[str]:
    counts = Counter(message_ids(lab.mailbox(service, alias)))
    return counts if all(counts[m] >= 1 for m in sent) else Counter()


def test_siteb_stopped_its_mail_and_replication_back_up_then_drain_exactly_once(lab: ComposeLab):
    flow = MailFlow(SMTP["sitea"], "alice@example.net", "User2@microsoft.com", count=30, interval=0.3,
                    tag="siteb-stop")
    flow.start()
    poll(lambda: len(flow.sent) >= 8 or flow.error, timeout=60, what="8 messages sent", interval=0.1)
    stopped_at = time.monotonic()  # from here SiteB is going down, then down
    lab.stop("siteb")
    try:
        # mail for User2 backs up at SiteA (deferred, retried)...
        poll(lambda: [r for r in lab.queued_for("sitea", "User2@microsoft.com") if r["attempts"] >= 1],
             timeout=60, what="deferred mail for User2 at SiteA")
        # ... and so does replication: SiteA asks SiteB for its changes
        lab.admin("sitea", "POST", "/replication/request-now", {"site": "SiteB", "full": False})
        requested = time.time()
        poll(lambda: lab.replication_peer("sitea", "SiteB")["backlog"] >= 1, timeout=30,
             what="a replication backlog for SiteB at SiteA")
        flow.finish()
        backlog = len(lab.queued_for("sitea", "User2@microsoft.com"))
        assert backlog >= 10, f"only {backlog} messages for User2 queued at SiteA while SiteB was down"
    finally:
        lab.start("siteb")
    started_at = time.monotonic()
    during = [m for m, t in flow.sent if stopped_at <= t <= started_at]
    assert len(during) >= 10
    everything = [m for m, _ in flow.sent]

    counts = poll(lambda: delivered_once(lab, "siteb", "User2", everything), timeout=120,
                  what="all 30 messages in User2's Maildir after SiteB came back")
    assert {m: counts[m] for m in everything} == {m: 1 for m in everything}  # exactly once each
    poll(lambda: not lab.queued_for("sitea", "User2@microsoft.com"), timeout=60, what="SiteA's queue to drain")
    peer = poll(lambda: (p := lab.replication_peer("sitea", "SiteB"))["backlog"] == 0
                and (p["last_reply"] or 0) >= requested and p, timeout=90,
                what="SiteB's answer to the Request Now made while it was down")
    assert peer["last_error"] is None
    poll(lambda: lab.healthy("siteb"), timeout=60, what="SiteB healthy again")


def test_sitec_cut_off_the_network_its_mail_and_replication_back_up_then_drain_exactly_once(lab: ComposeLab):
    flow = MailFlow(SMTP["sitea"], "alice@example.net", "User3@microsoft.com", count=30, interval=0.3,
                    tag="sitec-cut")
    flow.start()
    poll(lambda: len(flow.sent) >= 8 or flow.error, timeout=60, what="8 messages sent", interval=0.1)
    cut_at = time.monotonic()
    lab.disconnect("sitec")
    try:
        # a directory change at SiteA while SiteC cannot hear about it
        lab.admin("sitea", "POST", "/directory/mailboxes", {"alias": "FaultUser", "display_name": "Fault User"})
        # SiteC (reached with docker exec: its published ports are gone with its network)
        # asks SiteA for changes: the request waits in SiteC's queue
        out = lab.exec("sitec", "imsrelay", "replicate", "request-now", "--site", "SiteA",
                       "--config", "/etc/imsrelay/site.toml").stdout
        assert "Request Now sent to SiteA" in out
        status = json.loads(lab.exec("sitec", "imsrelay", "replicate", "status", "--json",
                                     "--config", "/etc/imsrelay/site.toml").stdout)
        assert next(p for p in status["peers"] if p["site"] == "SiteA")["backlog"] >= 1, status
        # SiteA's mail for User3 and its own Request Now to SiteC back up at SiteA
        poll(lambda: [r for r in lab.queued_for("sitea", "User3@microsoft.com") if r["attempts"] >= 1],
             timeout=60, what="deferred mail for User3 at SiteA")
        lab.admin("sitea", "POST", "/replication/request-now", {"site": "SiteC", "full": False})
        requested = time.time()
        poll(lambda: lab.replication_peer("sitea", "SiteC")["backlog"] >= 1, timeout=30,
             what="a replication backlog for SiteC at SiteA")
        flow.finish()
        assert len(lab.queued_for("sitea", "User3@microsoft.com")) >= 10
    finally:
        lab.connect("sitec")
    back_at = time.monotonic()
    assert len([m for m, t in flow.sent if cut_at <= t <= back_at]) >= 10
    everything = [m for m, _ in flow.sent]

    counts = poll(lambda: delivered_once(lab, "sitec", "User3", everything), timeout=120,
                  what="all 30 messages in User3's Maildir after SiteC was reconnected")
    assert {m: counts[m] for m in everything} == {m: 1 for m in everything}
    poll(lambda: not lab.queued_for("sitea", "User3@microsoft.com"), timeout=60, what="SiteA's queue to drain")
    # replication drained both ways: SiteC learnt FaultUser, SiteA got SiteC's answer
    poll(lambda: lab.admin_up("sitec") and ("SiteA", "FaultUser") in lab.primaries("sitec"), timeout=90,
         what="SiteC to learn SiteA's new mailbox FaultUser")
    poll(lambda: (p := lab.replication_peer("sitea", "SiteC"))["backlog"] == 0
         and (p["last_reply"] or 0) >= requested, timeout=90, what="SiteC's answer at SiteA")
    poll(lambda: lab.replication_peer("sitec", "SiteA")["backlog"] == 0, timeout=60,
         what="SiteC's replication queue to drain")
    assert lab.primaries("sitec")[("SiteA", "FaultUser")] == "FaultUser@microsoft.com"


def test_logs_are_readable_and_every_container_stops_with_exit_0(lab: ComposeLab):
    """Last (it stops the lab): `docker logs` of a site are key=value lines, not JSON
    (IMSRELAY_LOG_FORMAT=json asks for JSON), and `docker stop` — Ctrl-C of
    `docker compose up` — ends every container with exit status 0."""
    out = lab.docker("logs", lab.container("sitea"))
    logs = (out.stdout + out.stderr).splitlines()
    events = [line for line in logs if "site.started" in line]
    assert events, logs[-20:]
    assert not events[0].lstrip().startswith("{") and "listen=" in events[0], events[0]
    for service in ("internet", "sitea", "siteb", "sitec", "dns"):
        started = time.monotonic()
        lab.docker("stop", lab.container(service), timeout=60)
        took = time.monotonic() - started
        state = lab.state(service)
        if (state["Status"], state["ExitCode"]) != ("exited", 0):  # what it was doing when it was stopped
            tail = lab.docker("logs", "--tail", "40", lab.container(service))
            raise AssertionError(f"{service}: {state['Status']} {state['ExitCode']} after {took:.1f} s; "
                                 f"its last log lines:\n{tail.stdout}{tail.stderr}")
