"""Message tracking across the embedded lab's sites: the hop chain of a delivered
message, where and why a bounced one stopped, the retries of a deferred one;
``imsrelay track`` and ``GET /api/v1/tracking``; pure parts unit-tested."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

from imsrelay.observe.tracking import (
    TrackingEvent,
    TrackingQuery,
    follow,
    format_story,
    message_id_of,
    remote_queue_id,
)
from imsrelay.testing import LAB_TOKEN, LabClient


def wait_story(lab: LabClient, message_id: str, done, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = lab.track(message_id)
        story = next((m for m in body["messages"] if m["message_id"] == message_id), None)
        if story is not None and done(story):
            return story
        assert time.monotonic() < deadline, f"tracking of {message_id} did not settle: {body}"
        time.sleep(0.2)


def test_pure_parts():
    assert message_id_of(b"From: a\r\nMessage-ID:\r\n <x@y>\r\n\r\nMessage-ID: <body@no>\r\n") == "<x@y>"
    assert message_id_of(b"From: a\r\n\r\nMessage-ID: <body@no>\r\n") is None
    assert remote_queue_id("smtp; 250 2.0.0 Ok: queued as 66198ABC.") == "66198ABC"
    assert remote_queue_id("smtp; 250 2.0.0 OK") is None
    ev = [TrackingEvent(1.0, "A", "received", "Q1", "<m>", "s@x", None, None, {"recipients": ["r@y"]}),
          TrackingEvent(2.0, "A", "transferred", "Q1", "<m>", "s@x", "r@y", None,
                        {"next_hop": "b", "remote_queue_id": "Q2"}),
          TrackingEvent(2.1, "B", "received", "Q2", "<m>", "s@x", None, None, {"recipients": ["r@y"]}),
          TrackingEvent(2.5, "B", "deferred", "Q2", "<m>", "s@x", "r@y", None,
                        {"status": "4.4.1", "diagnostic": "connect refused", "attempts": 1})]
    (story,) = follow(ev)
    assert [h.site for h in story.hops] == ["A", "B"]
    (r,) = story.recipients
    assert r.state == "deferred" and r.site == "B" and r.path == ("A", "B") and "connect refused" in r.detail


def test_internet_to_user2_every_hop(imsrelay_lab: LabClient):
    lab = imsrelay_lab
    mid = lab.send("User2@microsoft.com", subject="tracked " + uuid.uuid4().hex[:8], via="Internet")
    lab.wait_for(f"message-id:{mid}", timeout=30)
    story = wait_story(lab, mid, lambda s: s["recipients"] and s["recipients"][0]["state"] == "delivered")
    assert story["chain"] == ["Internet", "SiteA", "SiteB"]
    (r,) = story["recipients"]
    assert r["site"] == "SiteB" and "mailbox User2" in r["detail"] and r["path"] == ["Internet", "SiteA", "SiteB"]
    hops = {h["site"]: h for h in story["hops"]}
    events = {site: [e["event"] for e in h["events"]] for site, h in hops.items()}
    assert events["Internet"] == ["received", "routed", "transferred"]
    assert events["SiteA"] == ["received", "routed", "transferred"]
    assert events["SiteB"] == ["received", "routed", "delivered"]
    a_routed = next(e for e in hops["SiteA"]["events"] if e["event"] == "routed")
    assert "home site SiteB" in a_routed["detail"]["why"] and "E-Mail Domain table" in a_routed["detail"]["why"]
    a_out = next(e for e in hops["SiteA"]["events"] if e["event"] == "transferred")
    assert a_out["detail"]["remote_queue_id"] == hops["SiteB"]["queue_id"]
    received = next(e for e in hops["SiteB"]["events"] if e["event"] == "received")
    assert received["detail"]["size"] > 0 and received["detail"]["client"]
    times = [h["received_at"] for h in story["hops"]]
    assert times == sorted(times)
    # the CLI prints the same chain, following it from the lab endpoint
    out = subprocess.run([sys.executable, "-m", "imsrelay", "track", "--message-id", mid,
                          "--site", f"{lab.endpoints[0].url}={LAB_TOKEN}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "path: Internet -> SiteA -> SiteB" in out.stdout
    assert "delivered at SiteB to mailbox User2" in out.stdout
    # ... and by queue id at one site: it finds the rest by Message-ID
    by_queue = lab.track(queue_id=hops["SiteA"]["queue_id"])
    assert any(m["chain"] == ["Internet", "SiteA", "SiteB"] for m in by_queue["messages"])


def test_bounced_shows_where_and_why(imsrelay_lab: LabClient):
    lab = imsrelay_lab
    mid = lab.send("nobody@microsoft.com", subject="bounce " + uuid.uuid4().hex[:8], via="Internet")
    story = wait_story(lab, mid, lambda s: s["recipients"] and s["recipients"][0]["state"] == "bounced")
    (r,) = story["recipients"]
    assert r["site"] == "Internet" and "5.1.1" in r["detail"] and "NDR" in r["detail"]
    assert "alice@example.net" in r["detail"]
    events = [e["event"] for h in story["hops"] for e in h["events"]]
    assert "failed" in events and "ndr_sent" in events
    out = subprocess.run([sys.executable, "-m", "imsrelay", "track", "--message-id", mid,
                          "--site", f"{lab.endpoints[0].url}={LAB_TOKEN}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "bounced" in out.stdout and "stopped at Internet" in out.stdout


async def test_deferred_shows_the_retry(tmp_path):
    """A site whose smart host refuses connections: tracking shows each deferral
    with its reason and next attempt, and where the message waits."""
    import asyncio
    import json
    import smtplib
    import urllib.request

    from sitekit import free_port, make_config, running_site, site_mapping

    dead = free_port()  # nothing listens there
    admin = free_port()
    cfg = make_config(tmp_path, site_mapping(
        "SiteA", delivery={"smart_host": f"127.0.0.1:{dead}", "retry_intervals": [0.3, 0.3, 0.3]},
        admin={"port": admin, "token": "t0ken"}))
    async with running_site(cfg) as site:
        def send() -> None:
            with smtplib.SMTP("127.0.0.1", site.bound_port, timeout=10) as s:
                s.sendmail("User1@SiteA.microsoft.com", ["someone@example.org"],
                           b"Message-ID: <defer-1@test>\r\nSubject: defer\r\n\r\nhello\r\n")

        def track() -> dict:
            req = urllib.request.Request(f"http://127.0.0.1:{admin}/api/v1/tracking?message_id=defer-1@test",
                                         headers={"Authorization": "Bearer t0ken"})
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as r:
                return json.loads(r.read())

        await asyncio.to_thread(send)
        deadline = time.monotonic() + 30
        while True:
            body = await asyncio.to_thread(track)
            deferred = [e for e in body["events"] if e["event"] == "deferred"]
            if len(deferred) >= 2:
                break
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.2)
    assert [e["detail"]["attempts"] for e in deferred][:2] == [1, 2]
    assert all(e["detail"]["status"].startswith("4.") and str(dead) in e["detail"]["diagnostic"]
               for e in deferred)
    assert all(e["detail"]["next_attempt"] > e["time"] for e in deferred)
    (story,) = body["messages"]
    (r,) = story["recipients"]
    assert r["state"] == "deferred" and r["site"] == "SiteA" and "next attempt" in r["detail"]


def test_track_cli_errors():
    def track(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "imsrelay", "track", *args], capture_output=True, text=True,
                              timeout=60)

    out = track()
    assert out.returncode == 2 and "--message-id" in out.stderr and "Traceback" not in out.stderr
    out = track("--since", "tomorrow")
    assert out.returncode == 2 and "--since" in out.stderr and "not a date" in out.stderr
    from imsrelay.testing import free_port

    out = track("--message-id", "<x@y>", "--site", f"http://127.0.0.1:{free_port()}=t")
    assert out.returncode == 3 and "not running" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_replication_mail_is_tracked_too(imsrelay_lab: LabClient):
    """The lab's Request Now mail: generated at one site, delivered to the directory
    service of another."""
    body = imsrelay_lab.track(recipient="dirsync@SiteB.microsoft.com")
    stories = [m for m in body["messages"] if m["recipients"]]
    assert stories, body
    story = stories[0]
    first = story["hops"][0]["events"][0]
    assert first["event"] == "received" and first["detail"]["origin"] == "dirsync"
    assert story["recipients"][0]["state"] == "delivered"
    assert story["recipients"][0]["detail"] == "delivered at SiteB to the directory service (replication)"


async def test_events_older_than_the_retention_are_deleted(tmp_path):
    from imsrelay.observe.tracking import TrackingLog, TrackingQuery

    now = [1_000_000.0]
    log = TrackingLog(tmp_path / "t.sqlite3", "SiteA", days=2, clock=lambda: now[0])
    await log.start()
    log.record("received", "OLD", message_id="<old@x>", sender="a@x", recipients=["b@y"], size=1)
    now[0] += 1 * 86400
    log.record("received", "NEW", message_id="<new@x>", sender="a@x", recipients=["b@y"], size=1)
    log.record("routed", "NEW", recipient="b@y", route="local mailbox b")
    await log.stop()
    now[0] += 1.5 * 86400  # OLD is 2.5 days old, NEW 1.5
    log = TrackingLog(tmp_path / "t.sqlite3", "SiteA", days=2, clock=lambda: now[0])
    await log.start()  # purges at start (and hourly)
    try:
        assert await log.query(TrackingQuery(message_id="old@x")) == []
        new = await log.query(TrackingQuery(message_id="new@x"))
        assert [e.event for e in new] == ["received", "routed"]
        assert new[1].message_id == "<new@x>" and new[1].sender == "a@x"  # filled in from the received event
        # after a restart the writer fills a message's Message-ID in from the table
        log.record("delivered", "NEW", recipient="b@y", mailbox="mailbox b")
        new = await log.query(TrackingQuery(queue_id="NEW"))
        assert new[-1].event == "delivered" and new[-1].message_id == "<new@x>"
    finally:
        await log.stop()


async def test_expired_shows_the_lifetime_and_the_ndr(tmp_path):
    """A message that outlives delivery.lifetime: tracking says it expired where it
    waited, and that the NDR went back to the sender."""
    import asyncio
    import smtplib

    from sitekit import free_port, make_config, running_site, site_mapping

    cfg = make_config(tmp_path, site_mapping(
        "SiteA", delivery={"smart_host": f"127.0.0.1:{free_port()}", "retry_intervals": [0.2], "lifetime": "1s"}))
    async with running_site(cfg) as site:
        def send() -> None:
            with smtplib.SMTP("127.0.0.1", site.bound_port, timeout=10) as s:
                s.sendmail("User1@SiteA.microsoft.com", ["someone@example.org"],
                           b"Message-ID: <expire-1@test>\r\nSubject: expire\r\n\r\nhello\r\n")

        await asyncio.to_thread(send)
        deadline = time.monotonic() + 30
        while True:
            events = await site.tracking.query(TrackingQuery(message_id="<expire-1@test>"))
            if any(e.event == "ndr_sent" for e in events):
                break
            assert time.monotonic() < deadline, events
            await asyncio.sleep(0.2)
    (story,) = [s for s in follow(events) if s.message_id == "<expire-1@test>"]
    (r,) = story.recipients
    assert r.state == "expired" and r.site == "SiteA"
    assert "4.4.7" in r.detail and "maximum time" in r.detail and "User1@SiteA.microsoft.com" in r.detail
    assert [e.event for e in story.hops[0].events if e.event in ("deferred", "expired", "ndr_sent")][-2:] == \
        ["expired", "ndr_sent"]


def _ev(t, site, event, qid, rcpt=None, **detail):
    return TrackingEvent(t, site, event, qid, "<m>", "User1@microsoft.com", rcpt, None, detail)


def test_fan_out_is_drawn_as_branches():
    rcpts = ["User2@microsoft.com", "User3@microsoft.com", "bob@example.net"]
    ev = [_ev(1.0, "SiteA", "received", "QA", recipients=rcpts)]
    for i, (rcpt, site, box) in enumerate(zip(rcpts, ["SiteB", "SiteC", "Internet"], ["User2", "User3", "bob"],
                                              strict=True)):
        ev += [_ev(2.0 + i, "SiteA", "transferred", "QA", rcpt, next_hop=site, remote_queue_id=f"Q{site}"),
               _ev(2.1 + i, site, "received", f"Q{site}", recipients=[rcpt]),
               _ev(2.2 + i, site, "delivered", f"Q{site}", rcpt, mailbox=f"mailbox {box}")]
    (story,) = follow(ev)
    body = story.as_dict()
    assert body["chain"] == ["SiteA"]  # the way every recipient shares
    assert body["path"] == "SiteA -> {SiteB -> mailbox User2, SiteC -> mailbox User3, Internet -> mailbox bob}"
    tree = body["tree"]
    assert tree["site"] == "SiteA" and [b["site"] for b in tree["next"]] == ["SiteB", "SiteC", "Internet"]
    assert [b["recipients"][0]["mailbox"] for b in tree["next"]] == ["User2", "User3", "bob"]
    assert "path: SiteA -> {SiteB -> mailbox User2," in format_story(story)
    # one way is one chain, ending at the mailbox
    (single,) = follow(ev[:1] + ev[1:4])
    assert single.as_dict()["path"] == "SiteA -> {SiteB -> mailbox User2, User3@microsoft.com queued, " \
        "bob@example.net queued}"


def test_deleted_and_held_recipients_are_shown_as_such():
    ev = [_ev(1.0, "SiteA", "received", "QA", recipients=["User2@microsoft.com"]),
          _ev(1.1, "SiteA", "deferred", "QA", "User2@microsoft.com", status="4.4.1", diagnostic="link cut",
              attempts=1, next_attempt=99.0),
          _ev(2.0, "SiteA", "deleted", "QA")]
    (story,) = follow(ev)
    (r,) = story.recipients
    assert r.state == "deleted" and "next attempt" not in r.detail and "by an operator" in r.detail
    held = [_ev(1.0, "SiteA", "received", "QA", recipients=["x@example.net"]),
            _ev(1.1, "SiteA", "deferred", "QA", "x@example.net", held=True,
                diagnostic="Transfer mode inbound: outbound mail is held", next_attempt=5.0)]
    (r,) = follow(held)[0].recipients
    assert r.state == "held" and "next attempt" not in r.detail and "Transfer mode inbound" in r.detail
