"""The web console in a real browser (Debian's chromium driven by Playwright).

One `imsrelay lab --stage site-addressing-a` process for the module (the article
walked up to SiteA's Site Addressing); the tests use its console as the lab's
Exchange Administrator would, in this order: log in, look at the organisation, see
mail arrive live and read it, Request Now, Site Addressing at SiteB (substitutes),
trace a message Internet → SiteA → SiteB, retry and delete from a queue, open a
hostile message, take the next step of the article.  Each test leaves a
screenshot in its temporary directory (``console.png``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from email.message import EmailMessage
from pathlib import Path

import pytest
import tomli_w
from console_kit import (
    TOKEN,
    CountingServer,
    chromium,
    launch_browser,
    log_in,
    readme_picture,
    sample_message,
    start_lab,
    text_of,
)
from playwright.sync_api import expect, sync_playwright
from sitekit import free_port

pytestmark = pytest.mark.slow
TIMEOUT = 45_000  # ms: the machine is shared; behaviour is checked, not speed
expect.set_options(timeout=TIMEOUT)  # assertions wait as long as actions do (Playwright's default is 5 s)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    assert chromium(), "the console tests need Debian's chromium (./dev test installs it)"
    lab = start_lab(tmp_path_factory.mktemp("console") / "lab")
    yield lab
    lab.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = launch_browser(p)
        yield b
        b.close()


@pytest.fixture
def page(browser, lab, tmp_path):
    context = browser.new_context(viewport={"width": 1366, "height": 820})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.dialogs = []

    def on_dialog(dialog):
        page.dialogs.append((dialog.type, dialog.message))
        dialog.accept() if dialog.type == "confirm" else dialog.dismiss()
    page.on("dialog", on_dialog)
    log_in(page, lab.console_url)
    yield page
    page.screenshot(path=str(tmp_path / "console.png"), full_page=True)
    assert not page.errors, page.errors
    context.close()


def _http(url: str, *, method: str = "GET", body: dict | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


# ---------------------------------------------------------------------------- log-in


def test_login_session_cookie_and_csrf(browser, lab, tmp_path):
    # without a session the API answers 401, and the wrong token gets no session
    status, _, body = _http(lab.console_url + "api/organisation")
    assert status == 401 and "log in" in body["error"]
    status, _, body = _http(lab.console_url + "login", method="POST", body={"token": "guess"})
    assert status == 401
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    page.goto(lab.console_url)
    page.fill("#token", "wrong-token")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not the admin token")
    resp_headers = {}
    page.on("response", lambda r: resp_headers.update(r.headers) if r.url.endswith("/login") else None)
    log_in(page, lab.console_url)
    assert TOKEN not in page.url
    cookie = next(c for c in context.cookies() if c["name"] == "imsrelay_console")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert TOKEN not in cookie["value"]
    assert "script-src 'self'" in resp_headers["content-security-policy"]
    # the page cannot read the cookie; a change without the CSRF token is refused
    assert "imsrelay_console" not in page.evaluate("document.cookie")
    status = page.evaluate("""async () => (await fetch('/api/site/SiteA/queue/retry',
        {method: 'POST', headers: {'Content-Type': 'application/json'}, body: '{}'})).status""")
    assert status == 403
    status = page.evaluate("""async () => (await fetch('/api/site/SiteA/queue/retry',
        {method: 'POST', headers: {'Content-Type': 'application/json', 'X-CSRF-Token': 'forged'},
         body: '{}'})).status""")
    assert status == 403
    # only allow-listed admin calls go through the console
    assert page.evaluate("async () => (await fetch('/api/site/SiteA/replication/secret')).status") == 404
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("async () => (await fetch('/api/organisation')).status") == 401
    page.screenshot(path=str(tmp_path / "console.png"))
    context.close()


# ---------------------------------------------------------------------------- organisation


def test_organisation_tree_and_property_pages(page, lab):
    cards = page.locator(".site-card")
    expect(cards).to_have_count(3)
    site_a = page.locator(".site-card[data-site=SiteA]")
    expect(site_a).to_contain_text("ServerA")
    expect(site_a).to_contain_text("@microsoft.com")  # SiteA's Site Addressing (stage site-addressing-a)
    expect(site_a).to_contain_text("SiteB @SiteB.microsoft.com")  # a Connected Site
    expect(site_a).to_contain_text("SiteC.microsoft.com → 127.10.10.20")  # the E-Mail Domain table
    expect(site_a).to_contain_text("Smart host")
    expect(page.locator(".internet-bar")).to_contain_text("mail.example.net")
    expect(page.locator("#tree")).to_contain_text("Outside the organisation")
    page.click("#tree a[href='#/site/SiteB/config']")
    view = page.locator("#view")
    expect(view).to_contain_text("Internet Mail Service")
    expect(view).to_contain_text(f"127.10.10.15:{lab.smtp_port}")
    expect(view.locator("table").nth(0)).to_contain_text("@SiteA.microsoft.com")
    expect(view.locator("table").nth(1)).to_contain_text("SiteC.microsoft.com")
    expect(view).to_contain_text("Directory Replication Connectors")
    # a lab walked by hand (--stage) writes Exchange's 3-hour connector schedule
    expect(view.locator("table").nth(2)).to_contain_text(re.compile(r"SiteA\s*every 3 h"))
    expect(view).to_contain_text(f"127.10.10.100:{lab.smtp_port}")  # smart host
    protocols = view.locator("#protocols")  # the Protocols page: site defaults, the server's own setting
    expect(protocols).to_contain_text("site default, server uses the site's defaults")
    expect(protocols).to_contain_text("Listeners")


def test_the_ims_internet_mail_tab_shows_the_settings(page, lab):
    """The IMS property page's Internet Mail tab (read-only): the lab's sites keep Exchange's
    defaults: every automatic message sent, no outbound limit, no journaling."""
    page.goto(lab.console_url + "#/site/SiteA/ims?tab=internet-mail")
    view = page.locator("#view")
    expect(view.locator("#ims-tab-internet-mail.current")).to_have_count(1)
    expect(view.locator("#im-inbound")).to_contain_text("MiB")
    expect(view.locator("#im-outbound")).to_have_text("no limit")
    expect(view.locator("table.internet-mail tbody tr")).to_have_count(1)
    expect(view.locator("table.internet-mail")).to_contain_text(re.compile(r"\* \(default\)\s*sent\s*sent\s*sent\s*sent"))
    expect(view.locator("#im-journaling")).to_contain_text("Off")
    expect(view.locator("button")).to_have_count(0)  # nothing to edit here


def test_recipients_with_proxy_addresses_and_where_known(page):
    page.click("#tree a[href='#/recipients']")
    user1 = page.locator("tr[data-alias=User1]")
    expect(user1.locator("li.primary")).to_contain_text("User1@microsoft.com")
    expect(user1.locator("li.primary")).to_contain_text("primary")
    expect(user1).to_contain_text("User1@SiteA.microsoft.com")  # the old address kept as secondary
    expect(user1.locator("td").nth(2)).to_have_text("SiteA")
    for s in ("SiteA", "SiteB", "SiteC"):
        expect(user1.locator(".badge.ok", has_text=s)).to_have_count(1)
    expect(user1.locator("td.protocols")).to_contain_text("IMAP4 default")  # the mailbox's Protocols tab
    expect(page.locator("tr[data-alias=alice]")).to_have_count(0)  # the Internet is not the organisation
    page.fill("#recipient-filter", "user two")
    expect(page.locator("table.recipients tbody tr")).to_have_count(1)
    expect(page.locator("tr[data-alias=User2]")).to_contain_text("User2@SiteB.microsoft.com")


def test_recipients_show_custom_recipients_and_lists(lab, page):
    lab.admin("SiteA", "POST", "/directory/custom-recipients", {"alias": "Partner", "target": "partner@example.net"})
    lab.admin("SiteA", "POST", "/directory/lists", {"alias": "Staff", "members": ["User1@microsoft.com",
                                                                                "Partner@microsoft.com"]})
    page.click("#tree a[href='#/recipients']")
    partner = page.locator("tr[data-alias=Partner][data-kind=custom]")
    expect(partner).to_contain_text("custom recipient → partner@example.net")  # KB Q258203
    expect(partner.locator("li.primary")).to_contain_text("Partner@microsoft.com")
    staff = page.locator("tr[data-alias=Staff][data-kind=dl]")
    expect(staff).to_contain_text("distribution list: 2 member(s)")  # KB Q185194
    expect(staff.locator(".badge.ok", has_text="SiteA")).to_have_count(1)
    page.fill("#recipient-filter", "partner@example")
    expect(page.locator("table.recipients tbody tr")).to_have_count(1)
    lab.admin("SiteA", "DELETE", "/directory/lists/Staff")
    lab.admin("SiteA", "DELETE", "/directory/custom-recipients/Partner")


# ---------------------------------------------------------------------------- mail


def test_new_mail_appears_live_and_reads(page, lab):
    page.goto(lab.console_url + "#/mail?site=SiteB&mailbox=User2")
    expect(page.locator("#page-info")).to_be_visible()
    page.evaluate("window.__noReload = 'still here'")
    lab.send("SiteA", sample_message("Live arrival 1", to="User2@SiteB.microsoft.com",
                                     message_id="<live-1@example.net>"),
             "alice@example.net", ["User2@SiteB.microsoft.com"])
    row = page.locator("table.message-list tr", has_text="Live arrival 1")
    expect(row).to_have_count(1)
    assert page.evaluate("window.__noReload") == "still here"  # it came by the live feed, no reload
    expect(row.locator(".from")).to_have_text("Alice <alice@example.net>")
    row.locator("a.subject").click()
    expect(page.locator("#message-subject")).to_have_text("Live arrival 1")
    expect(page.locator("pre.text-part")).to_contain_text("A message for the console, sent by SMTP.")
    page.click("#tab-html")
    frame = page.frame_locator("#html-frame")
    expect(frame.locator("b")).to_have_text("HTML")
    assert page.get_attribute("#html-frame", "sandbox") == ""
    page.click("#tab-headers")
    expect(page.locator("table.headers")).to_contain_text("Message-ID")
    expect(page.locator("table.headers")).to_contain_text("<live-1@example.net>")
    page.click("#tab-attachments")
    expect(page.locator("tr.attachment")).to_contain_text("numbers.csv")
    expect(page.locator("tr.attachment")).to_contain_text("text/csv")
    page.click("#tab-raw")
    expect(page.locator("#raw")).to_contain_text("Subject: Live arrival 1")
    expect(page.locator("#raw")).to_contain_text("Received:")
    page.click("#delete-message")
    expect(page.locator("#page-info")).to_be_visible()
    expect(page.locator("table.message-list tr", has_text="Live arrival 1")).to_have_count(0)
    assert any(kind == "confirm" for kind, _ in page.dialogs)


def test_mail_pagination_and_search(page, lab):
    messages = []
    for i in range(57):
        m = EmailMessage()
        m["From"] = "Bob <bob@example.net>"
        m["To"] = "User3@SiteC.microsoft.com"
        m["Subject"] = f"Batch {i:02d}" + (" needle" if i == 33 else "")
        m.set_content(f"batch message {i}\n")
        messages.append(m)
    import smtplib

    with smtplib.SMTP("127.10.10.20", lab.smtp_port, timeout=30) as s:
        for m in messages:
            s.send_message(m, from_addr="bob@example.net", to_addrs=["User3@SiteC.microsoft.com"])
    page.goto(lab.console_url + "#/mail?site=SiteC&mailbox=User3")
    expect(page.locator("#page-info")).to_have_text(re.compile(r"^1–50 of 57$"))
    expect(page.locator("table.message-list tbody tr")).to_have_count(50)
    page.click("#older")
    expect(page.locator("#page-info")).to_have_text("51–57 of 57")
    expect(page.locator("table.message-list tbody tr")).to_have_count(7)
    page.click("#newer")
    expect(page.locator("#page-info")).to_have_text("1–50 of 57")
    page.fill("#mail-search", "subject:needle")
    page.press("#mail-search", "Enter")
    expect(page.locator("#page-info")).to_have_text("1–1 of 1")
    expect(page.locator("table.message-list")).to_contain_text("Batch 33 needle")
    # organisation-wide: every site's mail, merged newest first
    page.goto(lab.console_url + "#/mail?query=from%3Abob%40example.net")
    expect(page.locator("#page-info")).to_have_text("1–50 of 57")
    expect(page.locator(".mailboxes")).to_contain_text("SiteC")


# ---------------------------------------------------------------------------- replication


def test_request_now_moves_the_peers_high_water_mark(page, lab):
    lab.admin("SiteB", "POST", "/directory/mailboxes", {"alias": "NewUser", "display_name": "New User"})
    page.goto(lab.console_url + "#/site/SiteA/replication")
    hwm = page.locator("tr[data-peer=SiteB] td.hwm")
    expect(hwm).to_have_text(re.compile(r"^\d+$"))
    before = int(hwm.inner_text())
    page.locator("tr[data-peer=SiteB] button.request-new").click()
    expect(page.locator("#request-result")).to_contain_text("Asked SiteB for new and modified items since USN")
    page.wait_for_function(
        "before => Number(document.querySelector('tr[data-peer=SiteB] td.hwm').textContent) > before",
        arg=before, timeout=TIMEOUT)
    assert int(hwm.inner_text()) > before
    page.locator("tr[data-peer=SiteC] button.request-all").click()
    expect(page.locator("#request-result")).to_contain_text("Asked SiteC for all items")
    page.click("#check-now")
    expect(page.locator("#kcc-result")).to_contain_text("Sites in the directory: SiteA, SiteB, SiteC")
    expect(page.locator("tr[data-peer=SiteB]")).to_contain_text("none")  # no errors


# ---------------------------------------------------------------------------- Site Addressing


SLOW_ORGANISATION = """() => {
  const plain = window.fetch;
  window.fetch = (url, options) => String(url).includes("/api/organisation")
    ? new Promise((wake) => setTimeout(wake, 2500)).then(() => plain(url, options))
        .finally(() => { window.__slowOrganisation = "answered"; })
    : plain(url, options);
}"""


def test_site_addressing_bulk_update_shows_substitutes(page, lab):
    # A page still waiting on its data (a slow organisation view) must not take the
    # console back when its answer finally comes: the last page opened owns the view.
    page.evaluate(SLOW_ORGANISATION)
    page.evaluate("location.hash = '#/organisation'")
    page.goto(lab.console_url + "#/site/SiteB/addressing")
    expect(page.locator("#sa-current")).to_have_text("@SiteB.microsoft.com")
    page.wait_for_function("() => window.__slowOrganisation === 'answered'", timeout=TIMEOUT)
    page.wait_for_timeout(300)  # the late view's own drawing after its answer
    expect(page.locator("body")).to_have_attribute("data-view", "site/SiteB/addressing")
    expect(page.locator("#view h2")).to_have_text("SiteB — Site Addressing")
    page.fill("#sa-address", "@microsoft.com")
    page.click("#sa-apply")
    # Exchange's question: update all the recipient mailboxes? (KB Q196927: Yes)
    expect(page.locator("#sa-question")).to_contain_text("update all recipient e-mail addresses of SiteB")
    page.click("#sa-question-yes")
    result = page.locator("#sa-result")
    expect(result.locator("tr.event-2043")).to_contain_text("@microsoft.com")
    expect(result.locator("tr.event-2053")).to_contain_text("Administrator2@microsoft.com")
    expect(result.locator("tr.event-2044")).to_contain_text("scanned")
    expect(result.locator("ul.substitutes")).to_contain_text("Administrator → Administrator2@microsoft.com")
    expect(page.locator("#sa-current")).to_have_text("@microsoft.com")  # the page shows the new address
    expect(page.locator("#view")).to_contain_text("User2@microsoft.com")


# ---------------------------------------------------------------------------- tracking


def test_trace_a_message_through_the_organisation(page, lab):
    # SiteA learns User2's new address (Site Addressing at SiteB above) by Request Now
    lab.admin("SiteA", "POST", "/replication/request-now", {"site": "SiteB", "full": False})
    page.goto(lab.console_url + "#/recipients")
    expect(page.locator("tr[data-alias=User2] li.primary")).to_contain_text("User2@microsoft.com")
    expect(page.locator("tr[data-alias=User2] .badge.ok", has_text="SiteA")).to_have_count(1)
    page.click("#tree a[href='#/tracking']")
    page.fill("#track-query", "<trace-1@example.net>")
    page.click("#track-form button")
    expect(page.locator("#view .notice")).to_contain_text("No message found")
    page.evaluate("window.__noReload = 'still here'")
    lab.send("Internet", sample_message("Traced", to="User2@microsoft.com", message_id="<trace-1@example.net>"),
             "alice@example.net", ["User2@microsoft.com"])
    story = page.locator("article.story")  # the tracking events arrive live
    expect(story.locator(".hop-node.mailbox")).to_have_text(re.compile("User2"))
    labels = [t.strip().strip("→").strip() for t in story.locator(".hop-node .node-label").all_inner_texts()]
    assert labels[-4:-1] == ["Internet", "SiteA", "SiteB"] and labels[-1].endswith("User2"), labels
    hops = story.locator("li.hop")
    expect(hops).to_have_count(3)
    expect(hops.nth(0)).to_contain_text("microsoft.com matches entry")  # Internet: MX-like domain route
    expect(hops.nth(1)).to_contain_text("home site SiteB")  # SiteA: the directory says where User2 lives
    expect(hops.nth(1).locator(".badge.transferred")).to_have_count(1)
    expect(hops.nth(2).locator(".badge.delivered")).to_have_count(1)
    expect(story.locator("ul.outcomes")).to_contain_text("delivered at SiteB to mailbox User2")
    assert page.evaluate("window.__noReload") == "still here"
    # a fan-out is drawn as branches: SiteA -> {SiteB -> User2, SiteC -> User3}
    lab.send("Internet", sample_message("Fan", to="User2@microsoft.com", message_id="<trace-2@example.net>"),
             "alice@example.net", ["User2@microsoft.com", "User3@SiteC.microsoft.com"])
    page.fill("#track-query", "<trace-2@example.net>")
    page.click("#track-form button")
    fan = page.locator("article.story", has_text="trace-2@example.net")
    expect(fan.locator(".hop-node.mailbox")).to_have_count(2)
    branches = fan.locator("ul.branches.fan-out > li.branch")
    expect(branches).to_have_count(2)
    expect(branches.nth(0)).to_contain_text("SiteB")
    expect(branches.nth(0)).to_contain_text("mailbox User2")
    expect(branches.nth(1)).to_contain_text("SiteC")
    expect(branches.nth(1)).to_contain_text("mailbox User3")


# ---------------------------------------------------------------------------- queues


def test_link_monitor_window_shows_each_target_up(page, lab, tmp_path):
    """SiteA's Link Monitor (KB Q246674): the monitor window lists SiteB, SiteC and the
    foreign address, each up once its ping came back (or its NDR did), with a round trip."""
    page.click("#tree a[href='#/site/SiteA/link-monitors']")
    expect(page.locator("#view h2")).to_have_text("SiteA — Link Monitors")
    rows = page.locator("table.link-monitors tr[data-target]")
    expect(rows).to_have_count(3)
    for target in ("SiteB", "SiteC", "no-such-user@example.net"):
        row = page.locator(f"table.link-monitors tr[data-target='{target}']")
        expect(row).to_have_attribute("data-state", "up")  # the live feed redraws as answers come
        expect(row.locator("td.rtt")).not_to_have_text("—")
    page.screenshot(path=str(tmp_path / "console.png"))
    assert page.errors == []


def test_queue_retry_and_delete(page, lab, tmp_path):
    # the Internet host forwards unreachable.example to a loopback port where nothing listens
    closed = free_port("127.0.0.1")
    path = lab.data / "config" / "Internet.toml"
    mapping = tomllib.loads(path.read_text())
    mapping.setdefault("email_domains", []).append({"domain": "unreachable.example", "host": "127.0.0.1",
                                                    "port": closed})
    path.write_text(tomli_w.dumps(mapping))
    for _ in range(300):  # the lab restarts the Internet host: wait until it runs with the new table
        try:
            domains = [d["domain"] for d in lab.admin("Internet", "GET", "/config")["email_domains"]]
            ready = lab.admin("Internet", "GET", "/ready")["ready"]  # 503 (an OSError) until it listens
        except OSError:  # restarting
            domains, ready = [], False
        if "unreachable.example" in domains and ready:
            break
        page.wait_for_timeout(200)
    assert "unreachable.example" in domains, lab.output[-20:]
    lab.send("Internet", sample_message("Stuck", to="carol@unreachable.example"), "alice@example.net",
             ["carol@unreachable.example"])
    page.goto(lab.console_url + "#/site/Internet/queue")
    row = page.locator("table.queue tbody tr", has_text="carol@unreachable.example")
    expect(row).to_have_count(1)
    expect(row.locator(".badge.queued, .badge.deferred")).to_have_count(1)  # one name per state, as the CLI
    page.wait_for_function(
        "() => /attempts [1-9]/.test(document.querySelector('table.queue tbody tr').textContent)", timeout=TIMEOUT)
    expect(row.locator(".diag")).to_contain_text("refused")
    attempts = int(re.search(r"attempts (\d+)", row.inner_text()).group(1))
    row.locator("button.retry").click()
    expect(page.locator(".result")).to_contain_text("Retrying")
    page.wait_for_function(
        "n => Number((/attempts (\\d+)/.exec(document.querySelector('table.queue tbody tr').textContent) || [0, 0])[1]) > n",
        arg=attempts, timeout=TIMEOUT)
    expect(page.locator("#tree [data-queue=Internet]")).to_have_text("1")
    page.screenshot(path=str(tmp_path / "queue.png"), full_page=True)
    row.locator("button.delete").click()
    expect(page.locator(".result")).to_contain_text("Deleted")
    expect(page.locator("table.queue tbody tr", has_text="carol@unreachable.example")).to_have_count(0)
    assert lab.admin("Internet", "GET", "/queue")["messages"] == []


# ---------------------------------------------------------------------------- hostile mail


def hostile_message(remote: str) -> bytes:
    boundary = "HOSTILE-BOUNDARY"
    flag = "window.__pwned=1"
    html = (f'<html><head><meta http-equiv="refresh" content="0;url={remote}/refresh">'
            f'<link rel="stylesheet" href="{remote}/style.css"><base href="{remote}/">'
            f'<style>@import url({remote}/import.css); body {{ background: url({remote}/bg.png) }}</style>'
            f'<script>{flag};parent.__pwned=1;fetch("{remote}/fetch")</script></head>'
            f'<body onload="{flag}"><p id="greeting">Hostile HTML body</p>'
            f'<img src="{remote}/pixel.png" onerror="{flag}"><img src=x onerror="{flag}">'
            f'<iframe src="{remote}/frame"></iframe><object data="{remote}/obj"></object>'
            f'<form action="{remote}/form"><input autofocus onfocus="{flag}"></form>'
            f'<a href="javascript:{flag}">click</a><svg onload="{flag}"><script>{flag}</script></svg>'
            f'<div style="background-image:url({remote}/div.png)">styled</div></body></html>')
    script = f"<script>{flag}</script><img src=x onerror={flag}>"
    return (
        f'From: "{script}" <evil@example.net>\r\n'
        f"To: User3@SiteC.microsoft.com\r\n"
        f"Subject: {script} hostile subject\r\n"
        f"Message-ID: <hostile-1@example.net>\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        f"--{boundary}\r\nContent-Type: multipart/alternative; boundary=ALT\r\n\r\n"
        f"--ALT\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain {script}\r\n"
        f"--ALT\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--ALT--\r\n"
        f'--{boundary}\r\nContent-Type: text/html; name="{script}.html"\r\n'
        f'Content-Disposition: attachment; filename="<img src=x onerror={flag}>.html"\r\n\r\n'
        f"{script}\r\n--{boundary}--\r\n").encode()


def test_hostile_message_runs_nothing_and_loads_nothing(page, lab, tmp_path):
    remote = CountingServer()
    try:
        lab.send("SiteA", hostile_message(remote.url), "evil@example.net", ["User3@SiteC.microsoft.com"])
        page.goto(lab.console_url + "#/mail?site=SiteC&mailbox=User3&query=message-id%3Ahostile-1%40example.net")
        row = page.locator("table.message-list tbody tr", has_text="hostile subject")
        expect(row).to_have_count(1)
        expect(row.locator("a.subject")).to_contain_text("<script>window.__pwned=1</script>")
        expect(row.locator(".from")).to_contain_text("<img src=x onerror=window.__pwned=1>")
        row.locator("a.subject").click()
        expect(page.locator("#message-subject")).to_contain_text("<script>")
        expect(page.locator("#message-from")).to_contain_text("<script>")
        expect(page.locator("pre.text-part")).to_contain_text("plain <script>")
        with page.expect_response(re.compile(r"/message-html/")) as info:
            page.click("#tab-html")
        csp = info.value.headers["content-security-policy"]
        assert "script-src 'none'" in csp and "sandbox" in csp and "form-action 'none'" in csp
        expect(page.frame_locator("#html-frame").locator("#greeting")).to_have_text("Hostile HTML body")
        page.click("#tab-attachments")
        expect(page.locator("td.att-name")).to_contain_text("<img src=x onerror=window.__pwned=1>.html")
        page.click("#tab-headers")
        expect(page.locator("table.headers")).to_contain_text("<script>")
        page.click("#tab-raw")
        expect(page.locator("#raw")).to_contain_text("<script>")
        page.click("#tab-html")
        expect(page.frame_locator("#html-frame").locator("#greeting")).to_be_visible()
        page.wait_for_timeout(2500)  # time for a refresh, a late image or a script to act
        assert page.evaluate("typeof window.__pwned") == "undefined"
        for frame in page.frames:
            assert frame.evaluate("typeof window.__pwned") == "undefined", frame.url
        assert remote.requests == [], remote.requests
        assert page.dialogs == []
        assert page.locator("#html-frame").count() == 1  # the frame was not navigated away
        frame_urls = [f.url for f in page.frames]
        assert not any(remote.url in u for u in frame_urls), frame_urls
        page.screenshot(path=str(tmp_path / "hostile.png"), full_page=True)
    finally:
        remote.close()


# ---------------------------------------------------------------------------- stage, width, picture


def test_next_step_control_walks_the_article(page, lab):
    expect(page.locator("#stage-name")).to_have_text("site-addressing-a")
    expect(page.locator("#next-step")).to_have_text("Next step: site-addressing-b")
    page.click("#next-step")
    expect(page.locator("#stage-name")).to_have_text("site-addressing-b", timeout=120_000)
    expect(page.locator("#next-step")).to_have_text("Next step: site-addressing-c")
    status = subprocess.run([sys.executable, "-m", "imsrelay", "lab", "status", "--data", str(lab.data)],
                            capture_output=True, text=True, timeout=60)
    assert status.stdout.startswith("stage site-addressing-b"), status.stdout + status.stderr
    assert any("stage site-addressing-b" in line for line in lab.output)


@pytest.mark.parametrize("width", [1280, 1024, 800])
def test_fits_a_laptop_and_makes_the_readme_picture(page, lab, tmp_path, width):
    page.set_viewport_size({"width": width, "height": 760})
    for view in ("#/", "#/recipients", "#/site/SiteA/replication", "#/mail?site=SiteC&mailbox=User3"):
        page.goto(lab.console_url + view)
        page.wait_for_selector("#view .data")
        page.wait_for_timeout(200)
        overflow = page.evaluate("document.scrollingElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (view, width, overflow)
        page.screenshot(path=str(tmp_path / f"width-{width}-{view.strip('#/').split('?')[0].replace('/', '-') or 'org'}.png"))
    picture = readme_picture(page, lab.console_url, tmp_path / "readme.png")
    assert picture.stat().st_size > 20_000
    assert text_of(page, "#brand-title") == "ExchangeORG"


def test_readme_pictures_exist():
    for name in ("console.png", "console-organisation.png"):
        picture = Path(__file__).parent.parent / "docs" / name
        assert picture.exists() and picture.stat().st_size > 20_000, "make them: python tests/console_kit.py docs/console.png"
    assert "docs/console.png" in (Path(__file__).parent.parent / "README.md").read_text()


def test_the_frame_policy_alone_stops_scripts_and_remote_loads(browser, tmp_path):
    """Defence in depth: even HTML the neutraliser never saw runs nothing and loads
    nothing in the console's sandboxed frame under MESSAGE_CSP (a meta refresh is the
    one thing a policy cannot stop: the neutraliser removes it, tested above)."""
    import http.server
    import threading

    from imsrelay.console.html_safety import MESSAGE_CSP

    remote = CountingServer()
    hostile = re.sub(r'<meta http-equiv="refresh"[^>]*>', "", hostile_message(remote.url).decode()
                     .split("text/html; charset=utf-8\r\n\r\n", 1)[1].split("\r\n--ALT--", 1)[0])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/msg":
                body, headers = hostile.encode(), {"Content-Security-Policy": MESSAGE_CSP}
            else:
                body, headers = b'<iframe id="f" sandbox="" src="/msg"></iframe>', {}
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        expect(page.frame_locator("#f").locator("#greeting")).to_have_text("Hostile HTML body")
        page.wait_for_timeout(2000)
        for frame in page.frames:
            assert frame.evaluate("typeof window.__pwned") == "undefined"
        assert remote.requests == [], remote.requests
        page.screenshot(path=str(tmp_path / "policy-only.png"))
    finally:
        context.close()
        server.shutdown()
        server.server_close()
        remote.close()
