"""Fuzzing a real site (a subprocess on loopback) over SMTP, replication mail and the
admin API with a seeded generator: the site stays up and ready, answers only RFC 5321
codes (with RFC 3463 enhanced codes on 4xx/5xx), never logs an internal error or a
traceback for garbage, and its RSS returns near its baseline.

Each surface runs ``IMSRELAY_FUZZ_SECONDS`` seconds (default 15: about a minute for
the three); set it higher for a longer run, ``IMSRELAY_FUZZ_SEED`` to replay one."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from sitekit import free_port
from smtp_wire import Wire

SECONDS = float(os.environ.get("IMSRELAY_FUZZ_SECONDS", "15"))
SEED = int(os.environ.get("IMSRELAY_FUZZ_SEED", str(int(time.time()))))
HOST = "127.0.0.1"
TOKEN = "fuzz-token"
CODES = {211, 214, 220, 221, 235, 250, 251, 252, 334, 354, 421, 432, 450, 452, 454, 455, 500, 501, 502, 503, 504,
         521, 530, 534, 535, 538,  # RFC 5321, RFC 4954 (AUTH)
         550, 551, 552, 553, 554, 555}
ENHANCED = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}")


@pytest.fixture(scope="module")
def fuzzed_site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    port, admin = free_port(), free_port()
    config = tmp / "SiteA.toml"
    config.write_text(f"""
[site]
organisation = "ExchangeORG"
name = "SiteA"
server = "ServerA"
email_domain = "SiteA.microsoft.com"
company_domain = "microsoft.com"
data_dir = "data"

[smtp]
listen = "{HOST}"
port = {port}
max_message_size = 1048576
max_errors = 1000

[[mailboxes]]
alias = "User1"

[[mailboxes]]
alias = "Administrator"

[dns]
nameservers = ["127.0.0.1"]

[replication]
key = "fuzz-org-key"
startup_delay = "1h"

[admin]
port = {admin}
token = "{TOKEN}"

[logging]
level = "info"
format = "json"
""")
    log = tmp / "site.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "imsrelay", "serve", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if http("GET", admin, "/ready")[0] == 200:
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise AssertionError("the site did not become ready")
    yield {"proc": proc, "port": port, "admin": admin, "log": log, "data": tmp / "data"}
    proc.terminate()
    proc.wait(timeout=20)


def http(method, port, path, body=None, token=None, timeout=10):
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", data=body, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


def log_problems(site, since):
    """Internal errors, tracebacks and unparsable lines logged after byte ``since``."""
    problems = []
    with open(site["log"], "rb") as f:
        f.seek(since)
        for line in f.read().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                problems.append(line[:300])
                continue
            if (event.get("level") in ("error", "critical") or "exception" in event
                    or "internal_error" in str(event.get("event"))):
                problems.append(line[:600])
    return problems


def healthy(site):
    assert site["proc"].poll() is None, "the site died"
    status, body = http("GET", site["admin"], "/ready")
    assert status == 200, body
    with Wire(site["port"]) as w:
        assert w.reply().startswith(b"220")
        assert w.cmd(b"NOOP").startswith(b"250")


def check_replies(data: bytes, context):
    for line in data.split(b"\r\n"):
        if not line:
            continue
        assert re.match(rb"^\d{3}([ -]|$)", line), (line, context)
        code = int(line[:3])
        assert code in CODES, (line, context)
        if code >= 400 and line[3:4] == b" ":
            assert ENHANCED.match(line), (line, context)


# ------------------------------------------------------------------ generators

WORDS = [b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"QUIT", b"VRFY", b"EXPN", b"HELP",
         b"STARTTLS", b"AUTH", b"BDAT", b"ETRN", b"XCLIENT", b"\xff\xfe", b""]
ADDRESSES = [b"<User1@SiteA.microsoft.com>", b"<postmaster>", b"<Postmaster@SiteA.microsoft.com>", b"<>",
             b"<", b"<@a:", b"<@a:b@c>", b"<\"quoted local\"@SiteA.microsoft.com>", b"<a@[127.0.0.1]>",
             b"<\xff\xfe@example.org>", b"<j\xc3\xbcrgen@example.de>", b"<a\x00b@c.d>", b"<" + b"x" * 300 + b"@a.b>",
             b"<dirsync@SiteA.microsoft.com>", b"<nobody@SiteA.microsoft.com>", b"<bob@elsewhere.example>",
             b"User1@SiteA.microsoft.com", b"<<>>", b"<a@b>>", b"<a@-bad-.example>"]
PARAMS = [b"", b" SIZE=100", b" SIZE=\xc2\xb2", b" SIZE=99999999999999999999999", b" SIZE=", b" BODY=8BITMIME",
          b" BODY=BINARYMIME", b" SMTPUTF8", b" SMTPUTF8=yes", b" FOO=BAR", b" =", b" AUTH=<>", b" RET=HDRS"]


def mutate(rnd: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rnd.randint(0, 3)):
        op = rnd.random()
        pos = rnd.randint(0, len(data)) if data else 0
        if op < 0.3:
            data[pos:pos] = bytes([rnd.randint(0, 255)])
        elif op < 0.5 and data:
            del data[min(pos, len(data) - 1)]
        elif op < 0.7:
            data[pos:pos] = rnd.choice([b"\n", b"\r", b"\x00", b"\xff", b"<", b">", b":", b"@", b" ", b"\t"])
        else:
            data[pos:pos] = rnd.choice(WORDS)
    return bytes(data)


def smtp_command(rnd: random.Random) -> bytes:
    verb = rnd.choice(WORDS)
    if verb in (b"MAIL", b"RCPT"):
        line = verb + (b" FROM:" if verb == b"MAIL" else b" TO:") + rnd.choice(ADDRESSES) + rnd.choice(PARAMS)
    elif verb in (b"HELO", b"EHLO"):
        line = verb + b" " + rnd.choice([b"client.example", b"[127.0.0.1]", b"\xff", b"x" * 600, b""])
    else:
        line = verb + rnd.choice([b"", b" arg", b" \xff\xfe"])
    return mutate(rnd, line) if rnd.random() < 0.3 else line


def message(rnd: random.Random) -> bytes:
    headers = [b"From: " + rnd.choice([b"a@b.c", b"j\xfcrgen@example.de", b"User1@SiteA.microsoft.com",
                                        b"=?utf-8?b?w7w=?= <x@y.z>", b"<@", b"\"\\\" <a@b>"]),
               b"Subject: " + bytes(rnd.randint(32, 255) for _ in range(rnd.randint(0, 40)))]
    headers += [b"Received: from x by y" for _ in range(rnd.choice([0, 0, 3, 30]))]
    headers += [b"From: u%d@SiteA.microsoft.com" % i for i in range(rnd.choice([0, 0, 500]))]
    body = [bytes(rnd.randint(1, 255) for _ in range(rnd.randint(0, 120))).replace(b"\r\n.", b"") for _ in
            range(rnd.randint(0, 20))]
    raw = b"\r\n".join(headers) + b"\r\n\r\n" + b"\r\n".join(body)
    return mutate(rnd, raw) if rnd.random() < 0.5 else raw


def smtp_session(site, rnd: random.Random) -> None:
    try:
        w = Wire(site["port"], timeout=10)
    except OSError as exc:
        raise AssertionError(f"cannot connect: {exc}") from None
    with w:
        check_replies(w.reply(), "greeting")
        if rnd.random() < 0.8:
            check_replies(w.cmd(b"EHLO fuzz.example"), "EHLO")
        for _ in range(rnd.randint(1, 12)):
            r = rnd.random()
            if r < 0.15:  # a whole transaction
                replies = [w.cmd(b"MAIL FROM:" + rnd.choice(ADDRESSES) + rnd.choice(PARAMS)),
                           w.cmd(b"RCPT TO:" + rnd.choice(ADDRESSES[:4]))]
                for reply in replies:
                    check_replies(reply, "transaction")
                data = w.cmd(b"DATA")
                check_replies(data, "DATA")
                if data.startswith(b"354"):
                    reply = w.cmd(message(rnd) + b"\r\n.")
                    check_replies(reply, "end of data")
                    assert not reply.startswith(b"451"), reply  # 451 = an internal error here
            elif r < 0.2:  # pipelined burst, then hang up
                w.send(b"\r\n".join(smtp_command(rnd) for _ in range(5)) + b"\r\n")
                return
            else:
                line = smtp_command(rnd)
                end = rnd.choice([b"\r\n", b"\r\n", b"\r\n", b"\n"])
                if b"\n" in line or b"\r" in line:
                    w.send(line + end)
                    return
                reply = w.cmd(line, end=end)
                if not reply:
                    return  # the server closed (421 / QUIT)
                check_replies(reply, line)
                assert not reply.startswith(b"451"), (line, reply)
                if reply.startswith((b"221", b"421")) or line.upper().startswith(b"QUIT"):
                    return
                if line.upper().startswith(b"DATA") and reply.startswith(b"354"):
                    check_replies(w.cmd(message(rnd) + b"\r\n."), "DATA body")
                if line.upper().startswith(b"STARTTLS") and reply.startswith(b"220"):
                    return


def run_for(seconds, step):
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        step(n)
        n += 1
    return n


def settle_rss(site, baseline, slack_kib=40 * 1024):
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = rss_kib(site["proc"].pid)
        if now <= baseline + slack_kib:
            return now
        time.sleep(0.5)
    raise AssertionError(f"RSS {now} KiB did not return near the baseline {baseline} KiB")


def test_fuzz_smtp_sessions(fuzzed_site):
    site = fuzzed_site
    rnd = random.Random(SEED)
    since = site["log"].stat().st_size
    run_for(2, lambda n: smtp_session(site, rnd))  # warm up, then take the baseline
    baseline = rss_kib(site["proc"].pid)
    sessions = run_for(SECONDS, lambda n: smtp_session(site, rnd))
    healthy(site)
    settle_rss(site, baseline)
    assert log_problems(site, since) == [], f"seed {SEED}"
    assert sessions > 20, f"only {sessions} sessions (seed {SEED})"


def test_fuzz_replication_messages(fuzzed_site):
    from imsrelay.directory.replication import build_request, build_updates, render_message

    site = fuzzed_site
    rnd = random.Random(SEED + 1)
    since = site["log"].stat().st_size
    usn = http("GET", site["admin"], "/status", token=TOKEN)
    before = json.loads(usn[1])["directory"]["highest_usn"]

    def one(n):
        now = time.time()
        kind = rnd.random()
        if kind < 0.3:
            payload = build_request(organisation=rnd.choice(["ExchangeORG", "Evil"]), from_site="SiteB",
                                    to_site=rnd.choice(["SiteA", "SiteZ"]), reply_to="SiteB.microsoft.com",
                                    since_usn=rnd.randint(-5, 10), invocation="x", full=False, now=now)
        else:
            obj = {"id": rnd.choice(["mailbox:SiteA:user1", "mailbox:SiteB:../../pwned", "x"]), "kind": rnd.choice(
                ["mailbox", "site", "evil"]), "home": rnd.choice(["SiteA", "SiteB", "../x"]), "version": rnd.choice(
                [1, 10**40, -1, "x"]), "changed_at": now, "origin": "SiteB", "deleted": False,
                "data": rnd.choice([{"alias": "../../pwned"}, {"alias": "User1", "proxy_addresses": ["SMTP:h@x.y"]}, []])}
            payload = build_updates(organisation="ExchangeORG", from_site="SiteB", to_site="SiteA", invocation="i",
                                    highest_usn=3, since_usn=0, full=True, in_reply_to="ab" * 16,
                                    batches=[(0, 3, [])], now=now)[0]
            payload["objects"] = [obj]
        raw = render_message(payload, key=rnd.choice(["guessed", "wrong", "fuzz-org-key-not"]),
                             from_domain="SiteB.microsoft.com", to_domain="SiteA.microsoft.com", hostname="x")
        if rnd.random() < 0.5:
            raw = mutate(rnd, raw)
        if rnd.random() < 0.2:
            raw = (b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b\r\n"
                   b"Content-Type: message/delivery-status\r\n\r\nStatus: 5.1.1\r\nDiagnostic-Code: <script>\r\n"
                   b"--b\r\nContent-Type: text/rfc822-headers\r\n\r\nX-IMS-Dirsync-Type: request\r\n"
                   b"X-IMS-Dirsync-To-Site: Bogus" + base64.b64encode(rnd.randbytes(8)) + b"\r\n--b--\r\n")
        with Wire(site["port"]) as w:
            w.reply()
            w.cmd(b"EHLO fuzz.example")
            for line in (rnd.choice([b"MAIL FROM:<>", b"MAIL FROM:<dirsync@SiteB.microsoft.com>"]),
                         b"RCPT TO:<dirsync@SiteA.microsoft.com>", b"DATA"):
                check_replies(w.cmd(line), line)
            reply = w.cmd(raw.replace(b"\r\n.", b"\r\n..") + b"\r\n.")
            check_replies(reply, "dirsync DATA")
            assert reply[:1] in (b"2", b"5"), reply

    run_for(SECONDS, one)
    deadline = time.monotonic() + 20  # everything handled
    while time.monotonic() < deadline:
        if json.loads(http("GET", site["admin"], "/status", token=TOKEN)[1])["queue"]["messages"] == 0:
            break
        time.sleep(0.2)
    healthy(site)
    status = json.loads(http("GET", site["admin"], "/status", token=TOKEN)[1])
    assert status["directory"]["highest_usn"] == before  # no forged change applied
    assert status["queue"]["messages"] == 0
    peers = json.loads(http("GET", site["admin"], "/replication/status", token=TOKEN)[1])["peers"]
    assert all(p["last_error"] is None and "Bogus" not in p["site"] for p in peers), peers
    assert log_problems(site, since) == [], f"seed {SEED}"
    assert not (site["data"].parent / "pwned").exists()


def test_fuzz_admin_api(fuzzed_site):
    site = fuzzed_site
    rnd = random.Random(SEED + 2)
    since = site["log"].stat().st_size
    paths = ["/status", "/directory", "/directory/mailboxes", "/directory/mailboxes/User1", "/replication/request-now",
             "/replication/status", "/kcc/check-now", "/site-addressing", "/queue", "/queue/retry", "/ready",
             "/health", "/nope", "/directory/mailboxes/%2e%2e%2f", "/queue/../status",
             "/api/v1/sites", "/api/v1/sites/SiteA/queue", "/api/v1/sites/%00/queue", "/api/v1/mailboxes",
             "/api/v1/messages?q=%ff%fe", "/api/v1/messages?limit=99999999999999999999", "/api/v1/search?q=((((",
             "/api/v1/messages/..%2f..%2fetc", "/api/v1/messages/x/raw", "/api/v1/wait?timeout=0.1&q=to:x",
             "/api/v1/tracking?queue_id=%ff", "/api/v1/openapi.json"]
    values = [None, True, 1, -1, 10**40, 1e308, "x", "", "../../etc", "\udcff", "@microsoft.com", "@bad domain",
              "@" + "a" * 300 + ".com", [], {}, [[[[]]]], "SiteA", "SiteB", "Administrator"]

    def body():
        r = rnd.random()
        if r < 0.15:
            return b"[" * rnd.choice([10, 5000, 200000]) + b"]" * rnd.choice([0, 10])
        if r < 0.25:
            return b'{"alias": ' + b"9" * rnd.choice([10, 5000]) + b"}"
        if r < 0.35:
            return rnd.randbytes(rnd.randint(0, 64))
        obj = {k: rnd.choice(values) for k in rnd.sample(
            ["alias", "display_name", "addresses", "site", "full", "address", "update_mailboxes", "keep_old",
             "queue_id"], rnd.randint(0, 4))}
        return json.dumps(obj, default=str).encode("utf-8", "surrogatepass")

    def one(n):
        method = rnd.choice(["GET", "POST", "DELETE", "PUT", "PATCH"])
        path = rnd.choice(paths)  # (the arguments in the order the sequence has always drawn them)
        data = body() if method != "GET" else None
        status, answer = http(method, site["admin"], path, data,
                              token=rnd.choice([TOKEN, TOKEN, TOKEN, "wrong", None]), timeout=30)
        if status >= 500:  # say what the site logged, and how to draw this sequence again
            errors = [line[:3000] for line in site["log"].read_text(errors="replace").splitlines()
                      if "internal_error" in line]
            raise AssertionError(f"IMSRELAY_FUZZ_SEED={SEED} request {n}: {method} {path} -> {status} "
                                 f"{answer[:300]!r}; site log: {errors[-2:]}")

    run_for(SECONDS, one)
    healthy(site)
    assert log_problems(site, since) == [], f"seed {SEED}"


def test_socket_garbage_before_greeting(fuzzed_site):
    """Clients that write before the greeting or hang up at once (pre-greeting junk)."""
    rnd = random.Random(SEED + 3)
    site = fuzzed_site
    since = site["log"].stat().st_size
    for _ in range(100):
        s = socket.create_connection((HOST, site["port"]), timeout=5)
        s.sendall(rnd.randbytes(rnd.randint(0, 2000)))
        s.close()
    healthy(site)
    assert log_problems(site, since) == [], f"seed {SEED}"
