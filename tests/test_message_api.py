"""The message API (/api/v1) against a real embedded lab: the lab endpoint and a site's
admin endpoint, every query form, pagination, raw bytes, HTML and attachments,
delete, long-poll wait, errors, the OpenAPI document and a schema-driven run."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from imsrelay.admin.message_store import SearchError, parse_search
from imsrelay.testing import LAB_TOKEN, LabClient, LabError

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url: str, *, token: str | None = LAB_TOKEN, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with OPENER.open(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def tag() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def lab(imsrelay_lab: LabClient) -> LabClient:
    return imsrelay_lab


@pytest.fixture(scope="module")
def api(lab: LabClient) -> str:
    return lab.endpoints[0].url + "/api/v1"


def site_info(lab: LabClient, site: str) -> dict:
    return next(s for s in lab.sites() if s["site"] == site)


def admin_url(lab: LabClient, site: str) -> str:
    admin = site_info(lab, site)["admin"]
    return f"http://{admin['host']}:{admin['port']}"


# ------------------------------------------------------------------ search syntax (pure)


def test_search_syntax():
    q = parse_search('from:alice to:User2 subject:"two words" message-id:<a@b> mailbox:User2 site:SiteB '
                     'after:2026-12-01 before:2026-12-02T10:00:00Z hello world')
    assert q.from_ == ("alice",) and q.to == ("user2",) and q.subject == ("two words",)
    assert q.message_id == ("<a@b>",) and q.mailbox == ("user2",) and q.site == ("siteb",)
    assert q.after == 1796083200.0 and q.before == 1796205600.0
    assert q.text == ("hello", "world")
    for bad, why in [("colour:red", "unknown search field"), ('subject:"open', "cannot read"),
                     ("after:yesterday", "not a date"), ("from:", "needs a value")]:
        with pytest.raises(SearchError, match=why):
            parse_search(bad)


# ------------------------------------------------------------------ listing, search, pagination


def test_mailboxes_and_messages_newest_first_paginated(lab: LabClient, api: str):
    t = tag()
    ids = []
    for i in range(5):  # one after the other: each arrives after the previous one
        ids.append(lab.send("User2@microsoft.com", subject=f"page {t} {i}", text=f"number {i}"))
        lab.wait_for(f"message-id:{ids[-1]}", timeout=30)
        time.sleep(0.02)
    boxes = json.loads(http(f"{api}/mailboxes")[1])["mailboxes"]
    user2 = next(b for b in boxes if b["site"] == "SiteB" and b["mailbox"] == "User2")
    assert user2["messages"] >= 5
    q = urllib.parse.quote(f'subject:"page {t}"')
    status, body = http(f"{api}/messages?site=SiteB&mailbox=User2&query={q}&limit=2")
    page1 = json.loads(body)
    assert status == 200 and page1["total"] == 5 and page1["count"] == 2
    subjects = [m["subject"] for m in page1["messages"]]
    assert subjects == [f"page {t} 4", f"page {t} 3"]  # newest first
    page3 = json.loads(http(f"{api}/messages?site=SiteB&mailbox=User2&query={q}&limit=2&start=4")[1])
    assert [m["subject"] for m in page3["messages"]] == [f"page {t} 0"]
    m = page1["messages"][0]
    assert m["site"] == "SiteB" and m["mailbox"] == "User2"
    assert m["envelope_sender"] == "alice@example.net" and m["envelope_recipient"] == "User2@microsoft.com"
    assert m["from"] == "alice@example.net" and m["to"] == "User2@microsoft.com"
    assert m["message_id"] == ids[4] and m["size"] > 0 and m["read"] is False and m["date"]


def test_every_search_form(lab: LabClient, api: str):
    t = tag()
    before = time.time() - 1
    mid = lab.send(["User1@microsoft.com", "User3@microsoft.com"], sender="bob@example.net",
                   subject=f"forms {t}", text=f"the secret word is zebra{t}")
    lab.wait_for(f"message-id:{mid} site:SiteA", timeout=30)
    lab.wait_for(f"message-id:{mid} site:SiteC", timeout=30)

    def count(query: str) -> int:
        status, body = http(f"{api}/search?query={urllib.parse.quote(query)}")
        assert status == 200, body
        return json.loads(body)["total"]

    assert count(f"subject:{t}") == 2
    assert count(f"subject:{t} from:bob@example.net") == 2
    assert count(f"subject:{t} from:alice") == 0
    assert count(f"subject:{t} to:User3@microsoft.com") == 2  # the To header of both copies
    assert count(f"subject:{t} to:User2@microsoft.com") == 0
    assert count(f"subject:{t} to:User3@microsoft.com mailbox:User3") == 1
    assert count(f"message-id:{mid}") == 2
    assert count(f"message-id:{mid.strip('<>')} mailbox:User1") == 1
    assert count(f"message-id:{mid} site:SiteC") == 1
    assert count(f"zebra{t}") == 2  # free text, found in the decoded body
    assert count(f"zebra{t} site:SiteA") == 1
    assert count(f"subject:{t} after:{before:.0f}") == 2
    assert count(f"subject:{t} before:{before:.0f}") == 0
    assert count(f'subject:"forms {t}" after:2000-01-01 before:2999-01-01') == 2


def test_one_message_html_attachments_and_raw(lab: LabClient, api: str):
    t = tag()
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40
    mid = lab.send("User2@microsoft.com", subject=f"rich {t}", text="plain part ünïcode",
                   html=f"<p>html <b>{t}</b></p>", attachments=[("report.pdf", "application/pdf", pdf),
                                                                 ("notes.txt", "text/plain", b"hello\n")])
    summary = lab.wait_for(f"message-id:{mid}", timeout=30)
    detail = lab.message(summary["id"])
    assert detail["text"].strip() == "plain part ünïcode"
    assert f"<b>{t}</b>" in detail["html"]
    atts = {a["filename"]: a for a in detail["attachments"]}
    assert atts["report.pdf"]["content_type"] == "application/pdf" and atts["report.pdf"]["size"] == len(pdf)
    assert atts["notes.txt"]["size"] == 6
    names = [h["name"].lower() for h in detail["headers"]]
    assert names[:3] == ["return-path", "delivered-to", "received"] and "subject" in names
    raw = lab.raw(summary["id"])
    site, mailbox, unique = summary["id"].split(":", 2)
    root = Path(site_info(lab, site)["data_dir"]) / "mailboxes" / mailbox
    files = [p for sub in ("new", "cur") for p in (root / sub).iterdir()
             if p.name.split(":")[0] == unique]
    assert len(files) == 1 and raw == files[0].read_bytes()
    status, _ = http(f"{api}/messages/{urllib.parse.quote(summary['id'], safe='')}/raw")
    assert status == 200
    req = urllib.request.Request(f"{api}/messages/{urllib.parse.quote(summary['id'], safe='')}/raw",
                                 headers={"Authorization": f"Bearer {LAB_TOKEN}"})
    with OPENER.open(req, timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("message/rfc822")
        assert ".eml" in resp.headers["Content-Disposition"]


def test_read_flag_and_delete(lab: LabClient, api: str):
    t = tag()
    ids = [lab.send("User2@microsoft.com", subject=f"del {t} {i}") for i in range(3)]
    for mid in ids:
        lab.wait_for(f"message-id:{mid}", timeout=30)
    first = lab.messages(f"message-id:{ids[0]}")[0]
    req = urllib.request.Request(f"{api}/messages/{urllib.parse.quote(first['id'], safe='')}", method="PATCH",
                                 data=b'{"read": true}', headers={"Authorization": f"Bearer {LAB_TOKEN}",
                                                                  "Content-Type": "application/json"})
    with OPENER.open(req, timeout=30) as resp:
        assert json.loads(resp.read())["read"] is True
    assert lab.messages(f"message-id:{ids[0]}")[0]["read"] is True
    assert lab.raw(first["id"])  # same id after the move to cur/
    for bad in (b"[" * 5_000, b'{"read": "yes"}', b"not json"):  # nested past json's recursion: still 400
        req = urllib.request.Request(f"{admin_url(lab, 'SiteB')}/api/v1/messages/{urllib.parse.quote(first['id'], safe='')}",
                                     method="PATCH", data=bad, headers={"Authorization": f"Bearer {LAB_TOKEN}",
                                                                        "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            OPENER.open(req, timeout=30)
        assert refused.value.code == 400 and "JSON object" in json.loads(refused.value.read())["error"]
    status, body = http(f"{api}/messages/{urllib.parse.quote(first['id'], safe='')}", method="DELETE")
    assert status == 200 and json.loads(body)["deleted"] == 1
    assert http(f"{api}/messages/{urllib.parse.quote(first['id'], safe='')}")[0] == 404
    assert lab.delete(f'subject:"del {t}"') == 2
    assert lab.messages(f'subject:"del {t}"') == []


def test_wait_answers_on_arrival_and_408_on_timeout(lab: LabClient, api: str):
    t = tag()
    sender = threading.Timer(1.0, lambda: lab.send("User2@microsoft.com", subject=f"wait {t}"))
    sender.start()
    started = time.monotonic()
    got = lab.wait_for(f"subject:{t}", timeout=60)
    sender.join()
    assert got["subject"] == f"wait {t}" and time.monotonic() - started < 55
    started = time.monotonic()
    status, body = http(f"{api}/wait?query={urllib.parse.quote('subject:never-' + t)}&timeout=0.5")
    assert status == 408 and "within 0.5s" in json.loads(body)["error"]
    assert time.monotonic() - started < 20
    with pytest.raises(TimeoutError):
        lab.wait_for(f"subject:never-{t}", timeout=0.3)


def test_bad_queries_are_400_and_no_token_is_401(lab: LabClient, api: str):
    cases = {
        "search?query=colour:red": "unknown search field",
        "search?query=": "query is required",
        "messages?limit=0": "limit must be between",
        "messages?start=-1": "start must be at least",
        "messages?limit=abc": "whole number",
        "wait?query=x&timeout=soon": "number of seconds",
        "tracking?since=yesterday": "not a date",
        "tracking?colour=red": "unknown parameter",
        "search?query=after:tomorrow": "not a date",
    }
    for path, why in cases.items():
        status, body = http(f"{api}/{path}")
        assert status == 400, (path, body)
        assert why in json.loads(body)["error"], (path, body)
    for path in ("messages", "mailboxes", "search?query=x", "tracking?queue_id=x", "sites"):
        status, body = http(f"{api}/{path}", token=None)
        assert status == 401 and "token" in json.loads(body)["error"]
        assert http(f"{api}/{path}", token="wrong")[0] == 401
    assert http(f"{api}/messages/SiteB:User2:nothing")[0] == 404
    assert http(f"{api}/messages/nowhere")[0] == 404
    with pytest.raises(LabError) as info:
        lab.message("SiteB:User2:nothing")
    assert info.value.status == 404


def test_site_admin_endpoint_serves_its_own_site(lab: LabClient):
    """The same API on SiteB's own admin endpoint: only SiteB's mail, bearer token needed."""
    t = tag()
    mid = lab.send("User2@microsoft.com", subject=f"admin {t}")
    lab.wait_for(f"message-id:{mid}", timeout=30)
    base = admin_url(lab, "SiteB")
    assert http(f"{base}/health", token=None)[0] == 200
    assert http(f"{base}/ready", token=None)[0] == 200
    status, body = http(f"{base}/api/v1/search?query={urllib.parse.quote('subject:' + t)}")
    found = json.loads(body)
    assert status == 200 and found["total"] == 1 and found["messages"][0]["site"] == "SiteB"
    assert json.loads(http(f"{base}/api/v1/messages?site=SiteA")[1])["error"].startswith("no site")
    assert http(f"{base}/api/v1/messages", token=None)[0] == 401
    queue = json.loads(http(f"{base}/api/v1/sites/SiteB/queue")[1])
    assert queue["site"] == "SiteB" and isinstance(queue["messages"], list)
    assert lab.replication("SiteB")["enabled"] is True
    assert isinstance(lab.queue("SiteA"), list)


# ------------------------------------------------------------------ the OpenAPI document


def test_openapi_document_validates(api: str):
    from openapi_spec_validator import validate

    status, body = http(f"{api}/openapi.json", token=None)
    assert status == 200
    doc = json.loads(body)
    validate(doc)
    assert {"/api/v1/messages", "/api/v1/search", "/api/v1/wait", "/api/v1/messages/{id}/raw",
            "/api/v1/tracking", "/ready", "/health"} <= set(doc["paths"])


def test_schema_driven_run_finds_no_server_error(lab: LabClient, api: str):
    """schemathesis generates requests for every operation; none may answer 5xx.
    Deleting operations run against SiteC's own endpoint (no other test reads its mail)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    base = lab.endpoints[0].url
    site_c = admin_url(lab, "SiteC")
    schema = schemathesis.openapi.from_url(f"{api}/openapi.json")
    headers = {"Authorization": f"Bearer {LAB_TOKEN}"}
    calls = 0
    def fuzz(op, target: str) -> None:
        @given(case=op.as_strategy())
        @settings(max_examples=10, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            nonlocal calls
            if case.query and "timeout" in case.query:
                case.query["timeout"] = 0.1  # keep the long-poll short
            response = case.call(base_url=target, headers=headers, timeout=60)
            calls += 1
            case.validate_response(response, checks=[not_a_server_error])

        run()

    for result in schema.get_all_operations():
        op = result.ok()
        fuzz(op, site_c if op.method.upper() in ("DELETE", "PATCH") else base)
    assert calls > 50


def test_a_large_message_streams_whole(lab: LabClient, api: str):
    t = tag()
    blob = bytes(range(256)) * (5 * 1024 * 4)  # 5 MiB attachment, ~6.8 MB on the wire
    mid = lab.send("User2@microsoft.com", subject=f"large {t}", attachments=[("big.bin", "application/octet-stream", blob)])
    summary = lab.wait_for(f"message-id:{mid}", timeout=60)
    assert summary["size"] > len(blob)
    raw = lab.raw(summary["id"])
    assert len(raw) == summary["size"] and raw.startswith(b"Return-Path: <alice@example.net>")
    detail = lab.message(summary["id"])
    assert detail["attachments"] == [{"filename": "big.bin", "content_type": "application/octet-stream",
                                      "size": len(blob), "disposition": "attachment"}]
    assert http(f"{lab.endpoints[0].url}/health", token=None)[0] == 200


def test_a_header_with_a_broken_charset_is_shown_as_written(tmp_path):
    """An encoded word naming a charset that is not even ASCII (found by tests/test_fuzz.py:
    the email package raises CharsetError, which is no ValueError) is shown as it was
    written, not answered with a 500."""
    from imsrelay.admin.message_store import message_detail, summarise

    new = tmp_path / "new"
    new.mkdir()
    path = new / "1.R0.host"
    path.write_bytes("Subject: =?u\ufffdtf-8?q?hi?=\r\nFrom: =?\udcff?b?eA==?= <a@b>\r\n\r\nbody\r\n"
                     .encode("utf-8", "surrogateescape"))
    summary = summarise("SiteA", "User1", path)
    assert summary.subject.startswith("=?u") and "a@b" in summary.from_
    assert {h["name"] for h in message_detail(summary)["headers"]} >= {"Subject", "From"}
