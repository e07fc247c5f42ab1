"""Accounts and mailbox restrictions in the directory: the CLI (offline and through the
admin endpoint), the admin API, ``imsrelay route --from``, and what replicates."""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import tomli_w
from sitekit import free_port, running_site, site_mapping, wait_for, write_site_file

from imsrelay.directory.store import Directory
from imsrelay.policy.auth import verify_password
from imsrelay.site import Site

HOST = "127.0.0.1"
TOKEN = "auth-test-token"


def cli(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imsrelay", *args, "--config", str(config)], input=stdin,
                          capture_output=True, text=True, timeout=60)


async def acli(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, config, *args, stdin=stdin)


def login(port: int, user: str, password: str, host: str = HOST) -> int:
    with smtplib.SMTP(host, port, timeout=20) as s:
        s.ehlo()
        try:
            return s.login(user, password)[0]
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code


def a_site(tmp_path: Path, **extra) -> tuple[Path, object]:
    mapping = site_mapping("SiteA", listen=HOST, port=free_port(), auth={"allow_plaintext": True},
                           admin={"listen": HOST, "port": free_port(), "token": TOKEN},
                           mailboxes=[{"alias": "User1", "display_name": "User One"},
                                      {"alias": "Boss", "display_name": "The Boss"}],
                           logging={"level": "warning", "format": "json"}, **extra)
    return write_site_file(tmp_path, mapping)


async def test_passwd_offline_then_through_the_admin_endpoint(tmp_path):
    path, config = a_site(tmp_path)
    async with running_site(config):
        pass  # provisions the directory
    out = await acli(path, "directory", "passwd", "User1", "--offline", "--password-stdin", stdin="first-pw\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SiteA: password of User1 set (offline)"
    db = config.data_dir / "directory.sqlite3"
    async with running_site(config) as site:
        assert await asyncio.to_thread(login, site.bound_port, "User1", "first-pw") == 235
        assert await asyncio.to_thread(login, site.bound_port, "User1", "other") == 535
        # offline refuses while the site runs; through the admin endpoint it works
        out = await acli(path, "directory", "passwd", "User1", "--offline", stdin="x\n")
        assert out.returncode != 0 and "is running" in out.stderr
        out = await acli(path, "directory", "passwd", "User1", stdin="second-pw\n")
        assert out.returncode == 0, out.stderr
        assert await asyncio.to_thread(login, site.bound_port, "User1", "second-pw") == 235
        assert await asyncio.to_thread(login, site.bound_port, "User1", "first-pw") == 535
        # errors are one line
        out = await acli(path, "directory", "passwd", "Nobody", stdin="x\n")
        assert out.returncode != 0 and out.stderr.count("\n") == 1 and "no mailbox Nobody" in out.stderr
        out = await acli(path, "directory", "passwd", "User1", stdin="\n")
        assert out.returncode != 0 and "must not be empty" in out.stderr
    raw = b"".join(p.read_bytes() for p in db.parent.glob("directory.sqlite3*"))
    assert b"first-pw" not in raw and b"second-pw" not in raw  # never in clear
    d = Directory(db, "SiteA")
    try:
        stored = d.credential("User1")
        assert stored is not None and stored[1].startswith("scrypt$") and verify_password("second-pw", stored[1])
    finally:
        d.close()


async def test_hash_password_for_config_files(tmp_path):
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "imsrelay", "directory", "hash-password",
                                                   "--password-stdin"], input="cfg-pw\n", capture_output=True,
                                  text=True, timeout=60)
    assert out.returncode == 0
    stored = out.stdout.strip()
    assert verify_password("cfg-pw", stored)
    mapping = site_mapping("SiteA", listen=HOST, port=free_port(), auth={"allow_plaintext": True},
                           mailboxes=[{"alias": "User1", "display_name": "U", "password_hash": stored}])
    _, config = write_site_file(tmp_path, mapping)
    async with running_site(config) as site:
        assert await asyncio.to_thread(login, site.bound_port, "User1", "cfg-pw") == 235
    mapping["mailboxes"] = [{"alias": "User1", "password_hash": "cfg-pw"}]  # a password where the hash goes
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(mapping))
    out = await acli(path, "route", "User1@SiteA.microsoft.com")
    assert out.returncode != 0 and "mailboxes[0].password_hash: not an scrypt password hash" in out.stderr


async def test_restrict_cli_admin_api_and_route_explains(tmp_path):
    path, config = a_site(tmp_path, restrictions={"filter_senders": ["@spam.example"]})
    async with running_site(config) as site:
        out = await acli(path, "directory", "restrict", "Boss", "--accept-from", "@corp.example,User1@SiteA.microsoft.com",
                         "--reject-from", "mallory@corp.example", "--filter", "@junk.example", "--filter-action",
                         "delete")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == ("SiteA: Boss: accept from @corp.example, user1@sitea.microsoft.com; reject from "
                                      "mallory@corp.example; filter @junk.example (delete)")
        out = await acli(path, "directory", "restrict", "Boss", "--reject-from", "not an address")
        assert out.returncode != 0 and "not a sender address or @domain" in out.stderr
        await site.refresh()

        def rcpt(sender: str) -> int:
            with smtplib.SMTP(HOST, site.bound_port, timeout=20) as s:
                s.ehlo()
                s.mail(sender)
                return s.rcpt("Boss@SiteA.microsoft.com")[0]
        assert await asyncio.to_thread(rcpt, "mallory@corp.example") == 550
        assert await asyncio.to_thread(rcpt, "ok@corp.example") == 250

        base = f"http://{HOST}:{config.admin.port}"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(base + "/restrictions") as r:
                rules = await r.json()
            assert rules["message_filtering"]["filter_senders"] == ["@spam.example"]
            assert rules["routing_restrictions"]["relay_networks"] == ["127.0.0.0/8"]
            async with http.post(base + "/restrictions/explain", json={
                    "recipient": "Boss@SiteA.microsoft.com", "sender": "mallory@corp.example",
                    "client": "192.0.2.1"}) as r:
                lines = (await r.json())["lines"]
            assert any("reject from mallory@corp.example" in line and "550 5.7.1" in line for line in lines)
            async with http.put(base + "/directory/mailboxes/Boss/restrictions",
                                json={"accept_from": [], "reject_from": ["@bad.example"]}) as r:
                assert r.status == 200
                assert (await r.json())["reject_from"] == ["@bad.example"]
            async with http.put(base + "/directory/mailboxes/Boss/restrictions", json={"reject_from": "x"}) as r:
                assert r.status == 400 and "must be a list" in (await r.json())["error"]
            async with http.post(base + "/directory/mailboxes/Boss/password", json={}) as r:
                assert r.status == 400
            async with http.post(base + "/directory/mailboxes/Boss/password", json={"password": "api-pw"}) as r:
                assert r.status == 200 and (await r.json())["password"] == "set"
            async with http.post(base + "/directory/mailboxes/Nobody/password", json={"password": "x"}) as r:
                assert r.status == 409
        assert await asyncio.to_thread(login, site.bound_port, "Boss", "api-pw") == 235

    # imsrelay route --from: which rule applied (the site stopped; the same decisions)
    def route(*args: str) -> list[str]:
        out = cli(path, "route", *args)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()
    lines = route("Boss@SiteA.microsoft.com", "--from", "eve@bad.example")
    assert "  delivery restrictions of Boss: accept from (everyone); reject from @bad.example" in lines
    assert any("550 5.7.1 Sender <eve@bad.example> not allowed: delivery restrictions of "
               "<Boss@SiteA.microsoft.com>: reject from @bad.example" in line for line in lines)
    lines = route("User1@SiteA.microsoft.com", "--from", "x@spam.example")
    assert any(line.startswith("  message filtering: turf (kept in ") and "site message filter: @spam.example"
               in line for line in lines)
    lines = route("Boss@SiteA.microsoft.com", "--from", "x@junk.example")
    assert "  message filtering: delete: mailbox message filter: @junk.example (delete)" in lines
    lines = route("someone@example.org", "--from", "x@example.org", "--client", "192.0.2.1")
    assert any(line.startswith("  RCPT TO:<someone@example.org>: 554 5.7.1") for line in lines)
    assert "  routing restrictions: no relay: no routing restriction allows relaying for this client" in lines
    lines = route("someone@example.org", "--from", "Boss@SiteA.microsoft.com", "--client", "192.0.2.1",
                  "--auth", "Boss")
    assert "  routing restrictions: relay allowed: client authenticated as Boss" in lines
    out = cli(path, "restrictions", "show", "--json")  # the site's rules, as GET /restrictions
    assert out.returncode == 0 and json.loads(out.stdout)["message_filtering"]["filter_senders"] == ["@spam.example"]
    assert "  filter_senders: @spam.example" in cli(path, "restrictions", "show").stdout.splitlines()


# ------------------------------------------------------------------ replication

SITES = {"SiteA": "127.0.0.21", "SiteB": "127.0.0.22"}


async def two_sites(tmp_path: Path, *, replicate_credentials: bool) -> dict[str, Site]:
    ports = {n: free_port(h) for n, h in SITES.items()}
    sites = {}
    for name, host in SITES.items():
        other = next(o for o in SITES if o != name)
        mapping = site_mapping(
            name, listen=host, port=ports[name], auth={"allow_plaintext": True,
                                                        "replicate_credentials": replicate_credentials},
            connected_sites=[{"name": other, "routing_address": f"@{other}.microsoft.com"}],
            email_domains=[{"domain": f"{other}.microsoft.com", "host": SITES[other], "port": ports[other]}],
            replication={"key": "k", "startup_delay": "1h", "connectors": [{"site": other, "schedule": "never"}]},
            logging={"level": "warning", "format": "json"})
        _, config = write_site_file(tmp_path, mapping)
        sites[name] = Site(config)
        await sites[name].start()
    return sites


@pytest.mark.parametrize("replicate", [False, True])
async def test_restrictions_replicate_credentials_only_when_the_org_allows(tmp_path, replicate):
    sites = await two_sites(tmp_path, replicate_credentials=replicate)
    a, b = sites["SiteA"], sites["SiteB"]
    try:
        from imsrelay.policy.auth import hash_password

        await a.directory.run(a.directory.set_password_hash, "User1", hash_password("repl-pw"),
                              replicate=replicate)
        await a.directory.run(a.directory.set_sender_rules, "User1", reject_from=["@spam.example"],
                              filter_senders=["@junk.example"])
        await b.replicator.request_now("SiteA")

        def replicated():
            m = b.directory.mailbox("User1", "SiteA")
            return m is not None and m.sender_rules.reject_from == ("@spam.example",) and m
        m = await wait_for(lambda: b.directory.run(replicated), timeout=30)
        assert m.sender_rules.filter_senders == ("@junk.example",)
        await b.refresh()
        # SiteB applies SiteA's mailbox's Delivery Restrictions at its own RCPT
        def rcpt() -> tuple[int, bytes]:
            with smtplib.SMTP(SITES["SiteB"], b.bound_port, timeout=20) as s:
                s.ehlo()
                s.mail("x@spam.example")
                return s.rcpt("User1@SiteA.microsoft.com")
        code, text = await asyncio.to_thread(rcpt)
        assert code == 550 and b"reject from @spam.example" in text
        # the password hash went along only if the organisation allows it
        code = await asyncio.to_thread(login, b.bound_port, "User1@SiteA.microsoft.com", "repl-pw", SITES["SiteB"])
        assert code == (235 if replicate else 535)
        raw = b"".join(p.read_bytes() for p in b.config.data_dir.glob("directory.sqlite3*"))
        assert (b"scrypt$" in raw) is replicate
    finally:
        for s in sites.values():
            await s.stop()


async def test_plaintext_auth_received_esmtpa_disabled_auth_and_internal_error_454(tmp_path):
    from sitekit import maildir_messages

    from imsrelay.policy.auth import hash_password

    mapping = site_mapping("SiteA", listen=HOST, port=free_port(), auth={"allow_plaintext": True},
                           mailboxes=[{"alias": "User1", "display_name": "U", "password_hash": hash_password("pw")}])
    _, config = write_site_file(tmp_path, mapping)
    async with running_site(config) as site:
        def send() -> dict:
            with smtplib.SMTP(HOST, site.bound_port, timeout=20) as s:
                s.login("User1", "pw")
                return s.sendmail("User1@SiteA.microsoft.com", ["User1@SiteA.microsoft.com"],
                                  b"Subject: plain-auth\r\n\r\nx\r\n")
        assert await asyncio.to_thread(send) == {}
        got = await wait_for(lambda: maildir_messages(config.data_dir, "User1"))
        assert b"with ESMTPA id" in got[0]  # RFC 3848: authenticated, no TLS
        # the directory fails under the credential check: 454 4.7.0, the client may retry
        site.directory._db.close()

        def auth() -> tuple[int, bytes]:
            with smtplib.SMTP(HOST, site.bound_port, timeout=20) as s:
                s.ehlo()
                return s.docmd("AUTH", "PLAIN AFVzZXIxAHB3")  # \0User1\0pw
        assert await asyncio.to_thread(auth) == (454, b"4.7.0 Temporary authentication failure; "
                                                      b"please try again later")
    mapping = site_mapping("SiteA", listen=HOST, port=free_port(), auth={"enabled": False, "allow_plaintext": True})
    (tmp_path / "off").mkdir()
    _, config = write_site_file(tmp_path / "off", mapping)
    async with running_site(config) as site:
        def off() -> tuple[bool, int]:
            with smtplib.SMTP(HOST, site.bound_port, timeout=20) as s:
                s.ehlo()
                return "auth" in s.esmtp_features, s.docmd("AUTH", "PLAIN AFVzZXIxAHB3")[0]
        assert await asyncio.to_thread(off) == (False, 504)
