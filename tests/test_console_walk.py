"""KB Q196927 walked in the console, every step by clicking, from `imsrelay lab --stage install`
(Debian's chromium driven by Playwright, as tests/test_console_browser.py).

The article's steps in order, at each site: Connected Sites (New: General and Routing
Address tabs), the E-Mail Domain table (Connections tab, E-Mail Domain…, Add), Directory
Replication Connectors (New, "No, the remote site is not available on this network")
— first at SiteA only, so the article's NOTE shows: SiteA's Request Now to SiteB waits
as a backlog until SiteB is configured too, then drains —, Check Now (the new sites
appear in the left window), Request Now ("Update only New and Modified Items"), Site
Addressing @microsoft.com with Yes to "update all the recipient mailboxes", at SiteA,
SiteB and SiteC in turn with Request Now between.  Mail is sent by SMTP at each stage
and followed in the console's Message Tracking as the article predicts.  A screenshot
per step goes to the test's directory (or to $IMSRELAY_WALK_SHOTS when set).
"""

from __future__ import annotations

import os
import re
import time
import urllib.error
from pathlib import Path
from typing import Any

import pytest
from console_kit import (
    SITE_ADDRESSES,
    TOKEN,
    chromium,
    launch_browser,
    log_in,
    sample_message,
    start_lab,
)
from playwright.sync_api import expect, sync_playwright

pytestmark = pytest.mark.slow
TIMEOUT = 45_000  # ms
expect.set_options(timeout=TIMEOUT)
SITES = ("SiteA", "SiteB", "SiteC")
SERVERS = {"SiteA": "ServerA", "SiteB": "ServerB", "SiteC": "ServerC"}
USERS = {"SiteA": "User1", "SiteB": "User2", "SiteC": "User3"}
WALK_LIMIT = 420.0  # seconds: the whole walk, bounded


class EmbeddedTarget:
    """`imsrelay lab --stage install`: the lab restarts a site whose file changed, and
    shows the article's stage; the Internet host is an imsrelay site."""

    staged = True
    install_path = ["SiteA", "Internet", "SiteB"]  # SiteB.microsoft.com by the Internet's MX forwarding

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.console_url = lab.console_url
        self.smtp_port = lab.smtp_port

    def host(self, site: str) -> str:
        return SITE_ADDRESSES[site]

    def admin(self, site: str, method: str, path: str) -> Any:
        return self.lab.admin(site, method, path)

    def send(self, via: str, sender: str, to: str, subject: str, message_id: str) -> None:
        self.lab.send(via, sample_message(subject, sender=sender, to=to, message_id=message_id), sender, [to])

    def from_internet(self, to: str, subject: str, message_id: str) -> list[str]:
        self.send("Internet", "alice@example.net", to, subject, message_id)
        return ["Internet", "SiteA"]


class Walk:
    def __init__(self, page: Any, target: Any, shots: Path) -> None:
        self.page, self.lab, self.shots = page, target, shots
        self.step = 0
        self.started = time.monotonic()

    def shot(self, name: str, *, dialog: bool = False) -> None:
        """One step's picture: the whole page, or the window with its open dialog."""
        self.step += 1
        assert time.monotonic() - self.started < WALK_LIMIT, f"the walk took over {WALK_LIMIT:g}s at {name}"
        self.page.screenshot(path=str(self.shots / f"{self.step:02d}-{name}.png"), full_page=not dialog)

    def go(self, hash_: str) -> None:
        self.page.goto(self.lab.console_url + hash_)

    def settled(self, site: str, timeout: float = 60.0) -> None:
        """The site runs its file as it is now and answers: the lab restarts it by
        itself; elsewhere the administrator clicks "Restart the Internet Mail Service
        now" (Exchange asked to restart the IMS after such a change)."""
        if not self.lab.staged:
            button = self.page.locator("#ims-restart")
            expect(button).to_be_visible()
            button.click()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self.lab.admin(site, "GET", "/config/file")["pending_restart"]:
                    if self.lab.admin(site, "GET", "/status")["site"] == site:
                        expect(self.page.locator("#restart-note")).to_have_count(0)
                        return
            except (urllib.error.URLError, ConnectionError, OSError, RuntimeError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"{site} did not take its changed file within {timeout:g}s")

    def stage(self, name: str, **kw: Any) -> None:
        if self.lab.staged:
            expect(self.page.locator("#stage-name")).to_have_text(name, **kw)

    def ok(self, dialog: str) -> None:
        self.page.click(f"#{dialog}-ok")
        expect(self.page.locator(f"#{dialog}")).to_have_count(0)

    def track(self, message_id: str, sites: list[str]) -> None:
        """Message Tracking shows the message delivered, through exactly ``sites``."""
        self.go("#/tracking?q=" + message_id)
        story = self.page.locator("article.story")
        expect(story.locator(".hop-node.mailbox")).to_have_count(1)
        hops = [h.strip() for h in story.locator("li.hop > h4").all_inner_texts()]
        assert [h.split()[0] for h in hops] == sites, hops


def _send(lab: Any, via: str, sender: str, to: str, subject: str, message_id: str) -> None:
    lab.send(via, sender, to, subject, message_id)


def in_browser(target: Any, shots: Path, token: str, run: Any) -> None:
    """``run(walk)`` in Debian's chromium, logged in to ``target``'s console."""
    assert chromium(), "the console tests need Debian's chromium (./dev test installs it)"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch_browser(p)
        context = browser.new_context(viewport={"width": 1366, "height": 860})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        log_in(page, target.console_url, token)
        run(Walk(page, target, shots))
        assert not errors, errors
        browser.close()


def test_the_article_walked_in_the_console(tmp_path):
    lab = start_lab(tmp_path / "lab", stage="install")
    try:
        in_browser(EmbeddedTarget(lab), Path(os.environ.get("IMSRELAY_WALK_SHOTS") or tmp_path / "walk"), TOKEN,
                   walk_the_article)
    finally:
        lab.stop()


def walk_the_article(walk: Walk) -> None:
    page, lab = walk.page, walk.lab
    walk.stage("install")
    walk.shot("install")

    # 1. installed: SiteA reaches SiteB.microsoft.com the way DNS says, through the Internet
    _send(lab, "SiteA", "User1@SiteA.microsoft.com", "User2@SiteB.microsoft.com", "Step 1", "<walk-1@SiteA>")
    walk.track("<walk-1@SiteA>", lab.install_path)
    walk.shot("install-mail-through-the-internet")

    # 2-5. Connected Sites: New; General (the site's directory name), Routing Address (SMTP)
    for s in SITES:
        for other in (o for o in SITES if o != s):
            walk.go(f"#/site/{s}/ims")
            page.click("#cs-new")
            expect(page.locator("#cs-org")).to_have_value("ExchangeORG")
            page.fill("#cs-name", other)
            page.click("#cs-dialog-tabhead-routing")
            if (s, other) == ("SiteA", "SiteB"):  # the article says: upper case
                page.fill("#cs-type", "smtp")
                page.fill("#cs-address", f"@{other}.microsoft.com")
                page.click("#cs-dialog-ok")
                expect(page.locator("#cs-dialog-error")).to_contain_text("type SMTP, in upper case")
                walk.shot("connected-sites-refused", dialog=True)
            page.fill("#cs-type", "SMTP")
            page.fill("#cs-address", f"@{other}.microsoft.com")
            walk.ok("cs-dialog")
            expect(page.locator("#ims-result")).to_contain_text(f"Connected Sites {other}: added")
            walk.settled(s)
            expect(page.locator(f"tr[data-connected-site={other}]")).to_contain_text(f"@{other}.microsoft.com")
        walk.shot(f"connected-sites-{s}")
    walk.stage("connected-sites")
    # Properties of an entry: the Routing Address tab's cost; the file keeps everything else
    walk.go("#/site/SiteC/ims")
    page.locator("tr[data-connected-site=SiteA] button.cs-properties").click()
    expect(page.locator("#cs-name")).to_have_value("SiteA")
    page.click("#cs-dialog-tabhead-routing")
    page.fill("#cs-cost", "2")
    walk.ok("cs-dialog")
    walk.settled("SiteC")
    expect(page.locator("tr[data-connected-site=SiteA] td.num")).to_have_text("2")

    # Domain-specific routing: Connections tab, E-Mail Domain…, Add, forward to the site's host
    for s in SITES:
        for other in (o for o in SITES if o != s):
            walk.go(f"#/site/{s}/ims?tab=connections")
            page.click("#ed-open")
            page.click("#ed-add")
            page.fill("#ed-domain", f"{other}.microsoft.com")
            page.fill("#ed-host", lab.host(other))
            page.fill("#ed-port", str(lab.smtp_port))
            walk.ok("ed-dialog")
            walk.settled(s)
            expect(page.locator(f"tr[data-domain='{other}.microsoft.com']")).to_contain_text(lab.host(other))
        walk.shot(f"email-domains-{s}")
    walk.stage("domain-table")
    # Edit and Remove in the E-Mail Domain table (an entry the article does not need)
    walk.go("#/site/SiteC/ims?tab=connections")
    page.click("#ed-open")
    page.click("#ed-add")
    page.fill("#ed-domain", "branch.example")
    page.fill("#ed-host", "127.10.10.99")
    page.fill("#ed-port", "70000")
    page.click("#ed-dialog-ok")
    expect(page.locator("#ed-dialog-error")).to_contain_text("port must be a whole number from 1 to 65535")
    page.fill("#ed-port", "2525")
    walk.ok("ed-dialog")
    walk.settled("SiteC")
    page.locator("tr[data-domain='branch.example'] button.ed-edit").click()
    page.fill("#ed-host", "127.10.10.98")
    walk.ok("ed-dialog")
    walk.settled("SiteC")
    expect(page.locator("tr[data-domain='branch.example']")).to_contain_text("127.10.10.98")
    page.locator("tr[data-domain='branch.example'] button.ed-remove").click()
    page.click("#ed-remove-q-yes")
    expect(page.locator("tr[data-domain='branch.example']")).to_have_count(0)
    walk.settled("SiteC")
    walk.shot("email-domain-edit-and-remove")
    _send(lab, "SiteA", "User1@SiteA.microsoft.com", "User2@SiteB.microsoft.com", "Step 3", "<walk-3@SiteA>")
    walk.track("<walk-3@SiteA>", ["SiteA", "SiteB"])  # straight to SiteB now, no DNS
    expect(page.locator("article.story .ev-routed").first).to_contain_text("E-Mail Domain table")
    walk.shot("domain-table-mail-direct")

    # Directory Replication Connectors at SiteA only, first: the article's NOTE
    def new_connector(at: str, to: str) -> None:
        walk.go(f"#/site/{at}/dirrep")
        page.click("#drc-new")
        page.select_option("#drc-site", to)
        page.fill("#drc-server", SERVERS[to])
        page.check("#drc-on-network-no")
        walk.ok("drc-dialog")
        walk.settled(at)
        expect(page.locator(f"tr[data-connector={to}]")).to_contain_text(SERVERS[to])

    def request_now(at: str, source: str) -> None:
        walk.go(f"#/site/{at}/dirrep")
        page.locator(f"tr[data-connector={source}] button.drc-properties").click()
        page.click("#drcp-dialog-tabhead-sites")
        page.click("#drcp-request-now")
        expect(page.locator("#rn-new")).to_be_checked()  # Update only New and Modified Items
        walk.ok("rn-dialog")
        expect(page.locator("#drc-result")).to_contain_text(f"Request Now sent to {source}")

    walk.go("#/site/SiteA/dirrep")
    page.click("#drc-new")
    page.select_option("#drc-site", "SiteB")
    page.check("#drc-on-network-yes")
    page.click("#drc-dialog-ok")
    expect(page.locator("#drc-dialog-error")).to_contain_text("not available on this network")
    page.click("#drc-dialog-cancel")
    new_connector("SiteA", "SiteB")
    new_connector("SiteA", "SiteC")
    request_now("SiteA", "SiteB")
    warning = page.locator("#backlog-warning p[data-peer=SiteB]")
    expect(warning).to_contain_text("1 replication message for SiteB waits in the queue of SiteA")
    walk.shot("backlog-warning")
    walk.go("#/site/SiteA/queue")
    row = page.locator("table.queue tbody tr", has_text="dirsync@SiteB.microsoft.com")
    expect(row).to_contain_text("no Directory Replication Connector to SiteA")
    walk.shot("backlog-in-the-queue")
    page.locator("#tree a[href='#/site/SiteA/dirrep']").click()
    page.locator("#backlog-warning a", has_text="Message Tracking").click()
    expect(page.locator("article.story .ev-deferred").first).to_contain_text("no Directory Replication Connector")
    walk.shot("backlog-in-tracking")

    # ... then SiteB and SiteC are configured too, and the backlog drains
    for at in ("SiteB", "SiteC"):
        for to in (o for o in SITES if o != at):
            new_connector(at, to)
    walk.stage("replication-connectors")
    # a connector's Properties: its schedule (General tab)
    walk.go("#/site/SiteC/dirrep")
    page.locator("tr[data-connector=SiteB] button.drc-properties").click()
    page.select_option("#drcp-schedule", "1h")
    walk.ok("drcp-dialog")
    walk.settled("SiteC")
    expect(page.locator("tr[data-connector=SiteB]")).to_contain_text("1h")
    walk.go("#/site/SiteA/queue")
    page.click("#retry-all")
    walk.go("#/site/SiteA/dirrep")
    expect(page.locator("#backlog-clear")).to_be_visible()
    expect(page.locator("tr[data-connector=SiteB] .hwm")).not_to_have_text(re.compile(r"^(–|0)$"))
    walk.shot("backlog-drained")

    # Speeding up Initial Directory Replication: Check Now, and the new sites appear on the left
    for s in SITES:
        walk.go(f"#/site/{s}/ds")
        page.click("#ds-check-now")
        for other in SITES:
            expect(page.locator("#ds-known")).to_contain_text(other)
            expect(page.locator("#ds-sites")).to_contain_text(other)
        for other in (o for o in SITES if o != s):
            expect(page.locator(f"[data-known-sites={s}] .known-site[data-site={other}]")).to_be_visible()
        walk.shot(f"check-now-{s}")
    walk.stage("check-now")

    for s in SITES:
        for source in (o for o in SITES if o != s):
            if (s, source) != ("SiteA", "SiteB"):  # that one went out above and was answered
                request_now(s, source)
    walk.go("#/recipients")
    for s in SITES:
        row = page.locator(f"tr[data-alias={USERS[s]}]")
        for at in SITES:
            expect(row.locator(".badge.ok", has_text=at)).to_have_count(1)
    walk.shot("request-now-everyone-known")
    walk.stage("request-now")
    _send(lab, "SiteC", "User3@SiteC.microsoft.com", "User1@SiteA.microsoft.com", "Step 6", "<walk-6@SiteC>")
    walk.track("<walk-6@SiteC>", ["SiteC", "SiteA"])

    # a new mailbox at SiteA (New Mailbox; Properties: E-mail Addresses), before the single domain
    walk.go("#/site/SiteA/mailboxes")
    page.click("#mbx-new")
    page.fill("#mbx-alias", "User 4")
    page.click("#mbx-dialog-ok")
    expect(page.locator("#mbx-dialog-error")).to_contain_text("is not a valid alias")
    page.fill("#mbx-alias", "User4")
    page.fill("#mbx-display", "User Four")
    walk.ok("mbx-dialog")
    user4 = page.locator("tr[data-alias=User4]")
    expect(user4.locator(".primary-address")).to_have_text("User4@SiteA.microsoft.com")
    user4.locator("button.mbx-properties").click()
    page.click("#mbxp-dialog-tabhead-addresses")
    page.fill("#mbxp-addresses", "u4@SiteA.microsoft.com")
    walk.ok("mbxp-dialog")
    expect(user4).to_contain_text("smtp:u4@SiteA.microsoft.com")
    walk.shot("new-mailbox-User4")
    _send(lab, "SiteB", "User2@SiteB.microsoft.com", "u4@SiteA.microsoft.com", "To User4", "<walk-u4@SiteB>")
    walk.track("<walk-u4@SiteB>", ["SiteB", "SiteA"])

    # Single domain: Site Addressing @microsoft.com, Yes to updating every mailbox; the others pull
    walk.go("#/site/SiteA/addressing")
    expect(page.locator("#sa-current")).to_have_text("@SiteA.microsoft.com")  # drawn: the field holds it
    page.fill("#sa-address", "@microsoft.com")
    page.click("#sa-apply")
    page.click("#sa-question-no")  # No: the site's address changes, the mailboxes keep theirs
    expect(page.locator("#sa-current")).to_have_text("@microsoft.com")
    expect(page.locator("#view")).to_contain_text("User1@SiteA.microsoft.com")
    walk.shot("site-addressing-answered-no")
    for n, s in enumerate(SITES):
        walk.go(f"#/site/{s}/addressing")
        expect(page.locator("#sa-current")).to_be_visible()  # drawn: the field holds the current address
        page.fill("#sa-address", "@microsoft.com")
        expect(page.locator("#sa-address")).to_have_value("@microsoft.com")
        page.click("#sa-apply")
        expect(page.locator("#sa-question")).to_contain_text("update all recipient e-mail addresses")
        walk.shot(f"site-addressing-question-{s}", dialog=True)
        page.click("#sa-question-yes")
        expect(page.locator("#sa-result .event-2044")).to_be_visible()
        expect(page.locator("#sa-current")).to_have_text("@microsoft.com")
        for at in (o for o in SITES if o != s):
            request_now(at, s)
        walk.go("#/recipients")
        primary = page.locator(f"tr[data-alias={USERS[s]}] li.primary")
        expect(primary).to_contain_text(f"{USERS[s]}@microsoft.com")
        for at in SITES:
            expect(page.locator(f"tr[data-alias={USERS[s]}] .badge.ok", has_text=at)).to_have_count(1)
        walk.shot(f"site-addressing-{s}")
        walk.stage(f"site-addressing-{'abc'[n]}", timeout=60_000)

    # the end: every user at @microsoft.com; mail from the Internet to each arrives
    walk.go("#/recipients")
    for s in SITES:
        expect(page.locator(f"tr[data-alias={USERS[s]}] li.primary")).to_contain_text(f"{USERS[s]}@microsoft.com")
    expect(page.locator("tr[data-alias=User4] li.primary")).to_contain_text("User4@microsoft.com")
    primaries = page.locator("table.recipients li.primary .addr").all_inner_texts()
    assert primaries and all(p.endswith("@microsoft.com") for p in primaries), primaries
    if lab.staged:
        expect(page.locator("#next-step")).to_have_text("Last step done")
    walk.shot("end-every-user-at-microsoft-com")
    for s in ("SiteB", "SiteC"):
        mid = f"<walk-end-{s}@example.net>"
        path = lab.from_internet(f"{USERS[s]}@microsoft.com", f"End {s}", mid)
        walk.track(mid, [*path, s])  # MX → Server1.SiteA, then to the user's home site
    walk.shot("end-mail-from-the-internet")
