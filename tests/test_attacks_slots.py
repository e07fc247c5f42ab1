"""Issue 27 item 3 in short form: slots that cannot be starved (loopback only, a few
seconds each).  Each listener has its own caps; a client must greet (or finish its
TLS handshake) within ``smtp.handshake_timeout``; a full listener closes an idle or
failing session to admit a newcomer; a client that has gone gives its slot back at
once.  The share of a normal client's transactions that get through during a
many-address password-guessing run is measured and printed (``-s`` shows it)."""

from __future__ import annotations

import asyncio
import base64
import random
import smtplib
import socket
import ssl
import threading
import time

import pytest
from sitekit import free_port, make_config, running_site, site_mapping
from smtp_wire import Wire

from imsrelay.policy.auth import hash_password
from imsrelay.policy.connection_limits import Holder, evictable

HOST = "127.0.0.1"


@pytest.fixture
async def site(tmp_path):
    mapping = site_mapping(
        "SiteA", listen=HOST, port=free_port(),
        smtp={"relay_networks": [], "tls_generate": True, "max_inbound_connections": 6,
              "max_connections_per_ip": 3, "handshake_timeout": "2s", "busy_idle_timeout": "1s"},
        submission={"port": free_port(), "tls_port": free_port(), "max_connections": 6,
                    "max_connections_per_ip": 3, "sender_must_match": True},
        auth={"allow_plaintext": True, "failure_delay": "1s", "max_failures": 3},
        mailboxes=[{"alias": "User1", "display_name": "User One", "password_hash": hash_password("pw-User1")},
                   {"alias": "Victim", "display_name": "Victim", "password_hash": hash_password("pw-Victim")}])
    config = make_config(tmp_path, mapping)
    async with running_site(config) as s:
        yield s


def tls_context(site) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(site.config.data_dir / "tls" / "ca.crt"))
    ctx.check_hostname = False
    return ctx


def idle_tls(site, source: str) -> ssl.SSLSocket:
    raw = socket.create_connection((HOST, site.submission_ports["smtps"]), timeout=10, source_address=(source, 0))
    s = tls_context(site).wrap_socket(raw, server_hostname="localhost")
    assert s.recv(1000).startswith(b"220")
    s.sendall(b"EHLO idle.example\r\n")
    time.sleep(0.05)
    s.recv(4000)
    return s


def greeting(port: int, source: str = HOST) -> bytes:
    w = Wire(port, source=source)
    try:
        return w.reply()
    finally:
        w.sock.close()


def test_eviction_choice_is_pure():
    h = {"busy": Holder(idle=100, errors=5, in_data=True), "fresh": Holder(idle=0.1, errors=0, in_data=False),
         "idle": Holder(idle=30, errors=0, in_data=False), "guesser": Holder(idle=0.5, errors=2, in_data=False)}
    assert evictable(h.items(), busy_idle=10) == "guesser"
    assert evictable([(k, v) for k, v in h.items() if k != "guesser"], busy_idle=10) == "idle"
    assert evictable([("fresh", h["fresh"]), ("busy", h["busy"])], busy_idle=10) is None
    talker = Holder(idle=0.2, errors=0, in_data=False, age=31, working=False)
    sender = Holder(idle=0.2, errors=0, in_data=False, age=30, working=True)
    assert evictable([("talker", talker), ("sender", sender), ("fresh", h["fresh"])], busy_idle=10) == "talker"
    assert evictable([("sender", sender)], busy_idle=10) is None


async def test_idle_tls_on_465_starves_neither_port_25_nor_a_newcomer(site):
    """Six idle TLS sessions from two addresses fill 465; port 25 and 587 still greet
    everyone, and a newcomer on 465 gets a slot once an idle one is idle long enough."""
    held = [await asyncio.to_thread(idle_tls, site, src) for src in ("127.0.2.1", "127.0.2.2") for _ in range(3)]
    try:
        assert len(site.listeners.slots["smtps"]) == 6
        assert (await asyncio.to_thread(greeting, site.bound_port)).startswith(b"220")
        assert (await asyncio.to_thread(greeting, site.submission_ports["submission"])).startswith(b"220")
        await asyncio.sleep(1.2)  # busy_idle_timeout
        newcomer = await asyncio.to_thread(idle_tls, site, "127.0.2.3")
        newcomer.close()
        assert site.listeners.slots["smtps"].evicted >= 1
    finally:
        for s in held:
            s.close()


async def test_silent_clients_are_closed_at_the_handshake_timeout(site):
    """A client that never greets (port 25) or never starts TLS (465) is gone after
    smtp.handshake_timeout (2 s here), not the 5-minute idle time-out."""
    def silent(port: int) -> float:
        s = socket.create_connection((HOST, port), timeout=15)
        start = time.monotonic()
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
        finally:
            s.close()
        return time.monotonic() - start
    plain, tls = await asyncio.gather(asyncio.to_thread(silent, site.bound_port),
                                      asyncio.to_thread(silent, site.submission_ports["smtps"]))
    assert 1.5 < plain < 5, plain
    assert 1.5 < tls < 5, tls


def close_wait(port: int) -> int:
    """Server sockets of ``port`` in CLOSE-WAIT (the client has closed, we have not)."""
    n = 0
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "08":
            n += 1
    return n


def fuzz_client(port: int, rnd: random.Random, source: str) -> None:
    """One fuzz-like session: connect, a few lines, hang up in one of several ways."""
    try:
        s = socket.create_connection((HOST, port), timeout=5, source_address=(source, 0))
    except OSError:
        return
    try:
        s.recv(1000)
        way = rnd.randrange(6)
        if way == 0:  # pipelined burst, half-close, never read again
            s.sendall(b"EHLO f\r\n" + b"NOOP\r\n" * rnd.randint(1, 3000))
            s.shutdown(socket.SHUT_WR)
            time.sleep(rnd.random() * 0.3)
        elif way == 1:  # STARTTLS, then hang up without a handshake
            s.sendall(b"EHLO f\r\nSTARTTLS\r\n")
            time.sleep(0.05)
            s.recv(4000)
        elif way == 2:  # a wrong password, hang up during the failure delay
            s.sendall(b"EHLO f\r\nAUTH PLAIN " + base64.b64encode(b"\0Victim\0guess") + b"\r\n")
            time.sleep(rnd.random() * 0.2)
        elif way == 3:  # mid-DATA
            s.sendall(b"EHLO f\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<User1@SiteA.microsoft.com>\r\nDATA\r\n")
            time.sleep(0.05)
            s.sendall(b"Subject: cut\r\n\r\npart")
        elif way == 4:  # garbage
            s.sendall(bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 600))) + b"\r\n")
        else:  # says nothing, just goes
            pass
    except OSError:
        pass
    finally:
        s.close()


FAILED: list[str] = []  # why the normal client's transactions failed (in assertion messages)


def normal_send(port: int, i: int) -> bool:
    try:
        with smtplib.SMTP(HOST, port, timeout=10) as c:
            c.sendmail("someone@example.net", ["User1@SiteA.microsoft.com"],
                       f"Subject: normal {i}\r\n\r\nhello\r\n".encode())
        return True
    except (smtplib.SMTPException, OSError) as exc:
        FAILED.append(repr(exc)[:100])
        return False


def under_load(site, client, *, seconds: float, threads: int, addresses: int) -> tuple[float, int, int]:
    """Run ``client`` in ``threads`` threads from ``addresses`` loopback addresses
    while a normal client sends mail; (normal share, worst CLOSE-WAIT, worst slots)."""
    port = site.bound_port
    stop = threading.Event()

    def attacker(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            client(port, rnd, f"127.0.9.{rnd.randint(1, addresses)}")

    workers = [threading.Thread(target=attacker, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    ok = tries = worst_wait = worst_slots = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            tries += 1
            ok += normal_send(port, tries)
            worst_wait = max(worst_wait, close_wait(port))
            worst_slots = max(worst_slots, site.connections.total)
            time.sleep(0.05)
    finally:
        stop.set()
        for t in workers:
            t.join(10)
    return ok / tries, worst_wait, worst_slots


async def test_fuzz_like_load_releases_slots_and_serves_a_normal_client(site):
    share, worst_wait, _ = await asyncio.to_thread(under_load, site, fuzz_client, seconds=4, threads=8,
                                                   addresses=40)
    print(f"\nfuzz-like load: normal client served {share:.0%}, worst CLOSE-WAIT {worst_wait}")
    assert share >= 0.9, ("fuzz", share, FAILED[-5:])
    deadline = time.monotonic() + 3
    while (site.connections.total or close_wait(site.bound_port)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert site.connections.total == 0 and close_wait(site.bound_port) == 0


def guesser(port: int, rnd: random.Random, source: str) -> None:
    try:
        w = Wire(port, source=source, timeout=15)
    except OSError:
        return
    try:
        if w.reply().startswith(b"220"):
            w.cmd(b"EHLO guess.example")
            for _ in range(3):
                r = w.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0Victim\0guess-%d" % rnd.randrange(10**9)))
                if not r.startswith(b"535"):
                    break
    except OSError:
        pass
    finally:
        w.sock.close()


async def test_a_normal_client_gets_through_a_many_address_guessing_run(site):
    share, _, worst_slots = await asyncio.to_thread(under_load, site, guesser, seconds=5, threads=12,
                                                    addresses=60)
    print(f"\nguessing from 60 addresses: normal client served {share:.0%} (slots in use at worst {worst_slots})")
    assert share >= 0.8, ("guessing", share, FAILED[-5:])


async def test_submission_ports_can_require_the_users_own_sender(site):
    """``submission.sender_must_match`` (the labs' setting): on 465/587 an authenticated
    user sends only as itself; port 25 keeps Exchange 5.5's default (anyone)."""
    def attempt(use_465: bool, sender: str) -> int:
        if use_465:
            c: smtplib.SMTP = smtplib.SMTP_SSL(HOST, site.submission_ports["smtps"], timeout=10,
                                               context=tls_context(site))
        else:
            c = smtplib.SMTP(HOST, site.bound_port, timeout=10)
        with c:
            c.ehlo()
            c.login("User1", "pw-User1")
            code, _ = c.mail(sender)
            return code
    assert await asyncio.to_thread(attempt, True, "User1@SiteA.microsoft.com") == 250
    assert await asyncio.to_thread(attempt, True, "ceo@example.com") == 550
    assert await asyncio.to_thread(attempt, True, "<>") == 550
    assert await asyncio.to_thread(attempt, False, "ceo@example.com") == 250


def test_the_labs_submission_ports_use_the_safe_setting():
    from imsrelay.lab.docker_configs import compose_site_mapping
    from imsrelay.lab.embedded import SITES
    from imsrelay.lab.embedded import site_mapping as lab_mapping
    from imsrelay.model.settings import RestrictionsConfig, SubmissionConfig
    assert RestrictionsConfig().sender_must_match is False and SubmissionConfig().sender_must_match is False
    from pathlib import Path
    embedded = lab_mapping(SITES[0], 0, port=25, data_dir=Path("/nonexistent"), trusted_keys={})
    assert embedded["submission"]["sender_must_match"] is True
    compose = compose_site_mapping(SITES[0], 0, {s.name: "ed25519:x" for s in SITES})
    assert compose["submission"]["sender_must_match"] is True
    assert "restrictions" not in embedded or not embedded["restrictions"].get("sender_must_match")
