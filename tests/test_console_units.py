"""The console's pure parts: sessions and CSRF, the HTML neutraliser, the
organisation-wide views, the tracking query, the [console] config section."""

from __future__ import annotations

import pytest
from sitekit import make_config, site_mapping

from imsrelay.console.html_safety import CONSOLE_CSP, MESSAGE_CSP, message_document, neutralise_html
from imsrelay.console.mail_views import tracking_queries
from imsrelay.console.sessions import MAX_SESSIONS, Sessions
from imsrelay.console.views import changed_topics, recipients
from imsrelay.model.errors import ConfigError
from imsrelay.model.settings import schedule_text

# ---------------------------------------------------------------------------- sessions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_log_in_only_with_the_token_and_csrf_is_per_session():
    sessions = Sessions("s3cret")
    assert sessions.log_in("guess") is None
    assert sessions.log_in("") is None
    a, b = sessions.log_in("s3cret"), sessions.log_in(" s3cret ")
    assert a and b and a.id != b.id and a.csrf != b.csrf
    assert "s3cret" not in a.id + a.csrf
    assert sessions.find(a.id).csrf == a.csrf
    assert Sessions.csrf_ok(a, a.csrf)
    assert not Sessions.csrf_ok(a, b.csrf)
    assert not Sessions.csrf_ok(a, None) and not Sessions.csrf_ok(a, "")
    sessions.log_out(a.id)
    assert sessions.find(a.id) is None and sessions.find(b.id) is not None
    assert sessions.find(None) is None and sessions.find("made-up") is None


def test_sessions_expire_when_idle_and_are_bounded():
    clock = Clock()
    sessions = Sessions("t", clock=clock, idle_lifetime=60)
    s = sessions.log_in("t")
    clock.now += 50
    assert sessions.find(s.id) is not None  # use keeps it alive
    clock.now += 50
    assert sessions.find(s.id) is not None
    clock.now += 61
    assert sessions.find(s.id) is None
    sessions = Sessions("t", clock=clock)
    first = sessions.log_in("t")
    for _ in range(MAX_SESSIONS + 5):
        clock.now += 1
        sessions.log_in("t")
    assert sessions.find(first.id) is None  # the oldest went first
    assert len(sessions._by_id) == MAX_SESSIONS


# ---------------------------------------------------------------------------- hostile HTML


@pytest.mark.parametrize("html, gone", [
    ("<script>alert(1)</script>ok", "alert"),
    ("<img src=x onerror=alert(1)>", "onerror"),
    ("<body onload=alert(1)>", "onload"),
    ('<meta http-equiv="refresh" content="0;url=http://127.0.0.1:9/">', "refresh"),
    ('<img src="http://127.0.0.1:9/pixel.png">', "127.0.0.1"),
    ('<img srcset="http://127.0.0.1:9/a.png 2x">', "127.0.0.1"),
    ('<a href="javascript:alert(1)">x</a>', "javascript"),
    ('<a href=" JaVa\tScRiPt:alert(1)">x</a>', "ript:"),
    ('<base href="http://evil/">', "evil"),
    ('<link rel=stylesheet href="http://127.0.0.1:9/s.css">', "127.0.0.1"),
    ("<style>@import url(http://127.0.0.1:9/i.css)</style>", "import"),
    ('<div style="background:url(http://127.0.0.1:9/b.png)">x</div>', "127.0.0.1"),
    ('<iframe src="http://127.0.0.1:9/"></iframe>', "iframe"),
    ('<form action="http://127.0.0.1:9/"><input autofocus onfocus=alert(1)></form>', "onfocus"),
    ("<svg><script>alert(1)</script></svg>", "alert"),
    ("<!--[if IE]><script>alert(1)</script><![endif]-->", "alert"),
    ('<object data="http://127.0.0.1:9/x"></object>', "127.0.0.1"),
    ('<video poster="http://127.0.0.1:9/p.png"></video>', "127.0.0.1"),
])
def test_neutraliser_removes_active_and_remote_parts(html, gone):
    out, blocked = neutralise_html(html)
    assert gone.lower() not in out.lower(), out
    assert blocked >= 1


def test_neutraliser_keeps_the_message_readable():
    out, blocked = neutralise_html('<p class="x">Hello <b>you</b> &amp; &lt;them&gt;</p>'
                                   '<a href="https://example.net/">link</a><img src="data:image/png;base64,AAAA">')
    assert blocked == 0
    assert '<p class="x">Hello <b>you</b> &amp; &lt;them&gt;</p>' in out
    assert 'href="https://example.net/" rel="noopener noreferrer"' in out
    assert 'src="data:image/png;base64,AAAA"' in out
    assert neutralise_html('<img src="data:image/svg+xml,<svg onload=alert(1)>">')[0] == "<img>"


def test_message_document_says_what_it_left_out():
    doc = message_document("<script>x</script><p>hi</p>")
    assert doc.startswith("<!doctype html>") and "<p>hi</p>" in doc
    assert "1 active or remote part of this message" in doc


def test_policies():
    assert "script-src 'none'" in MESSAGE_CSP and "sandbox" in MESSAGE_CSP and "form-action 'none'" in MESSAGE_CSP
    assert "default-src 'none'" in MESSAGE_CSP and "img-src data:" in MESSAGE_CSP
    assert "script-src 'self'" in CONSOLE_CSP and "unsafe-inline" not in CONSOLE_CSP.split("style-src")[0]
    assert "frame-ancestors 'none'" in CONSOLE_CSP


# ---------------------------------------------------------------------------- views


def _mbx(alias, home, *proxies):
    return {"alias": alias, "display_name": alias.title(), "home_site": home, "primary_address": proxies[0][5:],
            "proxy_addresses": list(proxies)}


def test_recipients_join_the_sites_directories():
    fresh = _mbx("User2", "SiteB", "SMTP:User2@microsoft.com", "smtp:User2@SiteB.microsoft.com")
    stale = _mbx("User2", "SiteB", "SMTP:User2@SiteB.microsoft.com")
    rows = recipients({
        "SiteA": {"mailboxes": [stale, _mbx("User1", "SiteA", "SMTP:User1@microsoft.com")]},
        "SiteB": {"mailboxes": [{**fresh, "proxy_addresses": list(reversed(fresh["proxy_addresses"]))}]},
        "SiteC": {"mailboxes": [fresh]},
    })
    assert [(r["home_site"], r["alias"]) for r in rows] == [("SiteA", "User1"), ("SiteB", "User2")]
    user2 = rows[1]
    assert user2["proxy_addresses"][0] == {"type": "SMTP", "address": "User2@microsoft.com", "primary": True}
    assert user2["proxy_addresses"][1]["primary"] is False
    assert user2["known_at"] == ["SiteA", "SiteB", "SiteC"]
    assert user2["differs_at"] == ["SiteA"]  # SiteA has not replicated SiteB's change yet
    assert rows[0]["known_at"] == ["SiteA"] and rows[0]["home_copy"] is True
    assert rows[0]["protocols"] == {}  # no Protocols settings: the defaults
    rows = recipients({"SiteB": {"mailboxes": [{**fresh, "protocols": {"imap4": False, "pop3": None}}]},
                       "SiteC": {"mailboxes": [fresh]}})
    assert rows[0]["protocols"] == {"imap4": False, "pop3": None}  # the home site's copy speaks


def test_changed_topics():
    assert changed_topics({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}) == ["b", "c"]
    assert changed_topics({"a": "1"}, {}) == ["a"]


def test_tracking_queries_from_what_the_user_typed():
    assert tracking_queries(" <m@x> ") == [{"message_id": "<m@x>"}]
    assert tracking_queries("User2@microsoft.com") == [
        {"recipient": "User2@microsoft.com"}, {"sender": "User2@microsoft.com"},
        {"message_id": "<User2@microsoft.com>"}]
    assert tracking_queries("66197FEA6CC8F9EA7E400") == [{"queue_id": "66197FEA6CC8F9EA7E400"}]
    assert tracking_queries("") == []


def test_schedule_text():
    assert schedule_text(900.0) == "always (every 15 min)"
    assert schedule_text(10800.0) == "every 3 h"  # the default schedule (Q195918), one way everywhere
    assert schedule_text(None) == "never"
    assert schedule_text(7200.0) == "every 2 h"
    assert schedule_text(300.0) == "every 5 min"
    assert schedule_text(12.5) == "every 12.5 s"


# ---------------------------------------------------------------------------- [console]


def test_console_config_section(tmp_path):
    cfg = make_config(tmp_path, site_mapping("SiteA"))
    assert cfg.console.enabled is False and cfg.console.port == 8080
    cfg = make_config(tmp_path, site_mapping("SiteA", admin={"port": 8025, "token": "t"},
                                             console={"enabled": True, "listen": "127.0.0.2", "port": 8090}))
    assert (cfg.console.enabled, cfg.console.listen, cfg.console.port) == (True, "127.0.0.2", 8090)
    with pytest.raises(ConfigError, match="console.enabled: the console needs the admin endpoint"):
        make_config(tmp_path, site_mapping("SiteA", console={"enabled": True}))
    with pytest.raises(ConfigError, match="console.colour"):
        make_config(tmp_path, site_mapping("SiteA", console={"colour": "blue"}))
