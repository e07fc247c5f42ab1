"""Issue 27's attacks in short form (loopback only, seconds each): AUTH secrets kept
out of the protocol log, slots that cannot be starved, password guessing limited per
account without locking the real user out, client garbage logged below error level.
The longer loops are tests/test_fuzz.py and tests/test_crash.py."""

from __future__ import annotations

import asyncio
import base64
import re
import stat

import pytest
import pytest_asyncio
from sitekit import free_port, make_config, running_site, site_mapping
from smtp_wire import Wire

from imsrelay.policy.auth import hash_password

pytestmark = pytest.mark.asyncio(loop_scope="module")
HOST = "127.0.0.1"
PASSWORDS = {"User1": "U1-pass-Zebra9", "User2": "U2-pass-Zebra9"}
GUESSING = {"Victim": "V-pass-Zebra9", "Mallory": "M-pass-Zebra9", "Natted": "N-pass-Zebra9", "Shared": "S-pass-Zebra9"}


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attacks")
    mapping = site_mapping(
        "SiteA", listen=HOST, port=free_port(),
        smtp={"relay_networks": [], "max_errors": 50},
        auth={"failure_delay": "10ms", "max_failures": 3, "lockout": "10m", "allow_plaintext": True,
              "max_failures_per_address": 8, "max_failures_per_account": 6},
        diagnostics={"smtp_protocol_log": "maximum"},
        mailboxes=[{"alias": a, "display_name": a, "password_hash": hash_password(p)}
                   for a, p in (PASSWORDS | GUESSING).items()])
    config = make_config(tmp, mapping)
    async with running_site(config) as s:
        yield s


def auth_exchanges(user: str, password: str) -> list[list[bytes]]:
    """Every AUTH form a client can use: the lines it sends (after EHLO)."""
    plain = b64(f"\0{user}\0{password}")
    return [
        [f"AUTH PLAIN {plain}".encode()],  # initial response
        [b"AUTH PLAIN", plain.encode()],  # continuation line
        [b"auth plain", plain.encode()],  # lower case
        [f"AUTH LOGIN {b64(user)}".encode(), b64(password).encode()],  # user name as initial response
        [b"AUTH LOGIN", b64(user).encode(), b64(password).encode()],  # both on continuation lines
        [f"AUTH PLAIN {plain}=".encode()],  # malformed base64 (501)
        [b"AUTH LOGIN", b64(user).encode(), b"*"],  # cancelled at the password
    ]


def run_exchange(port: int, lines: list[bytes], source: str) -> list[bytes]:
    w = Wire(port, source=source)
    replies = [w.reply(), w.cmd(b"EHLO client.test")]
    for line in lines:
        replies.append(w.cmd(line))
    w.cmd(b"QUIT")
    return replies


async def test_no_auth_form_puts_credentials_in_the_protocol_log(site):
    """Right and wrong passwords, every AUTH form: the protocol log never holds the
    secret in clear or in base64; the file is not world-readable."""
    port = site.bound_port
    secrets: list[str] = []
    n = 0
    for user, right in PASSWORDS.items():
        for password in (right, right + "-wrong"):
            for lines in auth_exchanges(user, password):
                n += 1
                replies = await asyncio.to_thread(run_exchange, port, lines, f"127.0.1.{n}")
                assert replies[0].startswith(b"220"), replies
                secrets += [password, b64(password), b64(f"\0{user}\0{password}")]
    site.protocol_log.flush()
    path = site.config.data_dir / "logs" / "smtp-protocol.log"
    text = path.read_text()
    assert text.count("C: <credentials not logged>") >= 2 * 2 * 6  # the continuation lines
    assert len(re.findall(r"C: (?:AUTH|auth) (?:PLAIN|LOGIN|plain) <credentials not logged>", text)) >= 2 * 2 * 7
    for secret in secrets:
        assert secret not in text, f"{secret!r} is in the protocol log"
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & 0o007 == 0, oct(mode)  # not world-readable (0600)


def auth_once(port: int, source: str, user: str, password: str) -> bytes:
    w = Wire(port, source=source)
    try:
        w.reply()
        w.cmd(b"EHLO client.test")
        blob = b64("\0" + user + "\0" + password)
        return w.cmd(f"AUTH PLAIN {blob}".encode())
    finally:
        w.sock.close()


async def test_a_valid_login_does_not_reset_guessing_at_another_account(site):
    """An attacker with an account of its own logs in between guesses at the victim's:
    the guesses are still counted (per account and address) and locked out."""
    port, attacker = site.bound_port, "127.0.5.1"
    codes = []
    for i in range(8):
        ok = await asyncio.to_thread(auth_once, port, attacker, "Mallory", GUESSING["Mallory"])
        assert ok.startswith(b"235"), ok
        guess = await asyncio.to_thread(auth_once, port, attacker, "Victim", f"guess-{i}")
        codes.append(guess[:3])
    assert codes[:3] == [b"535"] * 3 and set(codes[3:]) == {b"421"}, codes  # 3 checked, then refused
    # the victim itself, from its own address, is not locked out
    assert (await asyncio.to_thread(auth_once, port, "127.0.5.2", "Victim", GUESSING["Victim"])).startswith(b"235")


async def test_guesses_over_many_addresses_are_bounded_without_locking_out_the_user(site):
    """Guesses at one account from 30 addresses: after ``max_failures_per_account``
    the password is no longer checked for new addresses (454); the real user, from
    where it logged in before, still gets in.  A shared address (NAT) the attacker
    sprays from is locked for new pairs, not for users who logged in there before."""
    port = site.bound_port
    home, nat = "127.0.6.1", "127.0.6.2"
    assert (await asyncio.to_thread(auth_once, port, home, "Natted", GUESSING["Natted"])).startswith(b"235")
    assert (await asyncio.to_thread(auth_once, port, nat, "Shared", GUESSING["Shared"])).startswith(b"235")
    replies = [await asyncio.to_thread(auth_once, port, f"127.0.7.{i}", "natted", f"guess-{i}")
               for i in range(1, 31)]
    codes = [r[:3] for r in replies]
    assert codes.count(b"535") == 6 and codes.count(b"454") == 24, codes  # 6 checked of 30
    assert (await asyncio.to_thread(auth_once, port, home, "Natted", GUESSING["Natted"])).startswith(b"235")
    # spraying from the shared address: any account, 8 failures, then that address is locked ...
    spray = [(await asyncio.to_thread(auth_once, port, nat, f"nobody{i}", "x"))[:3] for i in range(10)]
    assert spray[:8] == [b"535"] * 8 and set(spray[8:]) == {b"421"}, spray
    # ... except for the user who logged in there before
    assert (await asyncio.to_thread(auth_once, port, nat, "Shared", GUESSING["Shared"])).startswith(b"235")
