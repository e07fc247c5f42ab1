"""Issue 27 items 5-8 against a served site (admin endpoint and console on loopback):
an empty search never deletes everything, hostile inputs get 4xx (never 500 with a
traceback), the console's log-in is rate limited and its allow-list cannot be walked
around with ``..``, faults are capped and refuse control characters."""

from __future__ import annotations

import asyncio
import smtplib
import socket

import aiohttp
import pytest
import structlog
from sitekit import free_port, make_config, site_mapping, wait_for
from yarl import URL

from imsrelay.commands.serve import run_site
from imsrelay.console.server import site_call_allowed
from imsrelay.console.sessions import LOGIN_FAILURES_PER_CLIENT, LOGIN_FAILURES_TOTAL, LoginThrottle
from imsrelay.observe.faults import MAX_FAULTS

TOKEN = "attack-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def served(tmp_path):
    admin_port, console_port, smtp_port = free_port(), free_port(), free_port()
    config = make_config(tmp_path, site_mapping(
        "SiteA", port=smtp_port, admin={"port": admin_port, "token": TOKEN},
        console={"enabled": True, "listen": "127.0.0.1", "port": console_port}))
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(run_site(config, stop))

        async def answers() -> bool:  # the admin endpoint, the console and the SMTP port
            try:
                async with aiohttp.ClientSession() as s:
                    for url in (f"http://127.0.0.1:{admin_port}/ready", f"http://127.0.0.1:{console_port}/"):
                        async with s.get(url) as r:
                            if r.status != 200:
                                return False
                socket.create_connection(("127.0.0.1", smtp_port), timeout=2).close()
                return True
            except (aiohttp.ClientError, OSError):
                return False
        await wait_for(answers, timeout=30)
        yield {"admin": f"http://127.0.0.1:{admin_port}", "console": f"http://127.0.0.1:{console_port}",
               "admin_port": admin_port, "smtp": smtp_port, "logs": logs}
        stop.set()
        await asyncio.wait_for(task, 30)
    errors = [e for e in logs if e.get("log_level") == "error" or e.get("level") == "error"]
    assert errors == []  # nothing here is our fault


def send(port: int, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        for i in range(n):
            s.sendmail("someone@example.net", ["User1@SiteA.microsoft.com"],
                       f"Subject: keep {i}\r\n\r\nbody\r\n".encode())


async def test_an_empty_search_after_parsing_is_400_and_deletes_nothing(served):
    await asyncio.to_thread(send, served["smtp"], 3)
    api = served["admin"] + "/api/v1"
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async def count() -> int:
            async with http.get(api + "/messages") as r:
                return int((await r.json())["total"])
        for _ in range(100):
            if await count() == 3:
                break
            await asyncio.sleep(0.1)
        assert await count() == 3
        for query in ('""', "''", '"" ""', " ", '" "'):
            async with http.delete(api + "/search", params={"query": query}) as r:
                assert r.status == 400, (query, r.status, await r.text())
                assert "query is required" in (await r.json())["error"]
            async with http.get(api + "/search", params={"query": query}) as r:
                assert r.status == 400, query
        assert await count() == 3  # nothing deleted


def raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


async def test_hostile_inputs_get_4xx_not_500(served):
    port = served["admin_port"]
    for value in ("Bearer \xe9\xe9".encode("latin-1"), "Bearer ☃".encode(), b"\xff\xfe \xff"):
        answer = await asyncio.to_thread(raw_http, port, b"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: "
                                         + value + b"\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    async with aiohttp.ClientSession(headers=AUTH) as http:
        long_id = "SiteA:" + "a" * 5000 + ":1234.x"
        for mid in (long_id, "SiteA:User1:" + "b" * 5000, "SiteA:" + "é" * 200 + ":x"):
            for method in ("GET", "DELETE", "PATCH"):
                async with http.request(method, served["admin"] + "/api/v1/messages/" + mid,
                                        json={"read": True} if method == "PATCH" else None) as r:
                    assert r.status == 404, (method, mid[:20], r.status, await r.text())
        for body in ('{"kind": "reply", "stage": "rcpt", "reply": "451 4.3.0 x", "expires": 1' + "0" * 400 + "}",
                     '{"kind": "latency", "delay": 1' + "0" * 400 + "}",
                     '{"kind": "reply", "stage": "rcpt", "code": 451, "probability": 1' + "0" * 400 + "}"):
            async with http.post(served["admin"] + "/faults", data=body,
                                 headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400, (body[:50], r.status, await r.text())
                assert "Traceback" not in (await r.json())["error"]


async def test_faults_are_capped_and_refuse_control_characters(served):
    url = served["admin"] + "/faults"
    async with aiohttp.ClientSession(headers=AUTH) as http:
        for text in ("try \x00later", "tab\there", "esc\x1b[31m", "del\x7f"):
            async with http.post(url, json={"kind": "reply", "stage": "rcpt", "reply": f"451 4.3.0 {text}"}) as r:
                assert r.status == 400, text
                assert "control characters" in (await r.json())["error"]
        for i in range(MAX_FAULTS):
            async with http.post(url, json={"kind": "reply", "stage": "rcpt", "peer": "127.0.0.99",
                                            "reply": f"451 4.3.0 fault {i}"}) as r:
                assert r.status == 201, (i, await r.text())
        async with http.post(url, json={"kind": "reply", "stage": "rcpt", "reply": "451 4.3.0 one more"}) as r:
            assert r.status == 400
            assert f"too many faults ({MAX_FAULTS} armed)" in (await r.json())["error"]
        async with http.delete(url) as r:
            assert r.status == 200
        async with http.post(url, json={"kind": "reply", "stage": "rcpt", "reply": "451 4.3.0 again"}) as r:
            assert r.status == 201  # room again once cleared


async def test_console_allow_list_cannot_be_walked_with_dot_dot(served):
    base = served["console"]
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.post(base + "/login", json={"token": TOKEN}) as r:
            assert r.status == 200
        async with http.get(base + "/api/site/SiteA/status") as r:
            assert r.status == 200  # on the list
        for path in ("/api/site/SiteA/api/v1/../../faults", "/api/site/SiteA/api/v1/%2e%2e/%2e%2e/faults",
                     "/api/site/SiteA/api/v1/%2E%2E/%2e%2E/status", "/api/site/SiteA/api/v1/./../../faults",
                     "/api/site/SiteA/api/v1/%252e%252e/%252e%252e/faults", "/api/site/SiteA/api/v1//faults",
                     "/api/site/SiteA/api/v1/..%2f..%2ffaults"):
            async with http.get(URL(base + path, encoded=True)) as r:
                assert r.status == 404, (path, r.status)
                assert "faults" not in (await r.text()).lower() or "does not offer" in await r.text()


def test_site_call_allowed_is_pure_and_refuses_dot_segments():
    assert site_call_allowed("GET", "/api/v1/messages")
    assert site_call_allowed("GET", "/api/v1/messages/SiteA:User1:1.x")
    assert not site_call_allowed("GET", "/api/v1/../../faults")
    assert not site_call_allowed("GET", "/api/v1/%2e%2e/faults")
    assert not site_call_allowed("GET", "/faults")
    assert not site_call_allowed("POST", "/api/v1/messages")


def test_login_throttle_per_client_and_in_all():
    t = LoginThrottle(window=60, per_client=3, total=5)
    for i in range(3):
        assert t.retry_after("a", 100 + i) == 0
        t.failure("a", 100 + i)
    assert t.retry_after("a", 103) == pytest.approx(57)  # its own limit
    assert t.retry_after("b", 103) == 0  # others may still try
    t.failure("b", 104)
    t.failure("c", 105)
    assert t.retry_after("d", 106) == pytest.approx(54)  # 5 failures in all: everyone waits
    assert t.retry_after("d", 160.5) == 0  # the oldest aged out
    assert t.retry_after("a", 160.5) == 0


async def test_console_login_is_rate_limited(served):
    """50 wrong tokens from one address, then 3 each from 20 addresses: the console
    looks at no more than its limits allow, answering 429 with Retry-After."""
    base = served["console"]

    async def attempt(source: str) -> int:
        connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http, \
                http.post(base + "/login", json={"token": "wrong-" + source}) as r:
            if r.status == 429:
                assert int(r.headers["Retry-After"]) >= 1
            return r.status

    one = await asyncio.gather(*(attempt("127.0.3.1") for _ in range(50)))
    assert one.count(401) == LOGIN_FAILURES_PER_CLIENT and one.count(429) == 50 - LOGIN_FAILURES_PER_CLIENT
    many = await asyncio.gather(*(attempt(f"127.0.4.{i}") for i in range(1, 21) for _ in range(3)))
    assert many.count(401) + one.count(401) == LOGIN_FAILURES_TOTAL, many
    assert set(many) == {401, 429}
