"""Unit tests for imsrelay.policy.auth: scrypt hashes, SASL PLAIN, the failed-attempt limiter."""

from __future__ import annotations

import base64

import pytest

from imsrelay.policy.auth import (
    AuthLimits,
    FailureLimiter,
    GuessGuard,
    GuessLimits,
    PasswordError,
    decode_plain,
    dummy_hash,
    hash_password,
    parse_hash,
    verify_password,
)


def test_hash_is_salted_scrypt_and_never_the_password() -> None:
    a = hash_password("s3cret")
    b = hash_password("s3cret")
    assert a.startswith("scrypt$16384$8$1$")
    assert a != b  # a fresh salt each time
    assert "s3cret" not in a
    assert verify_password("s3cret", a) and verify_password(b"s3cret", b)
    assert not verify_password("s3cret ", a)
    assert not verify_password("", a)


def test_fixed_salt_is_reproducible() -> None:
    assert hash_password("x", salt=b"0123456789abcdef") == hash_password("x", salt=b"0123456789abcdef")


@pytest.mark.parametrize("bad", ["", "plain-text", "scrypt$1$8$1$AAAAAAAAAAA=$AAAA", "scrypt$16384$8$1$!!$AAAA",
                                 "bcrypt$16384$8$1$AAAAAAAAAAA=$AAAA"])
def test_malformed_hashes_never_verify(bad: str) -> None:
    assert not verify_password("anything", bad)
    with pytest.raises(PasswordError):
        parse_hash(bad)


def test_empty_or_huge_password_refused() -> None:
    with pytest.raises(PasswordError):
        hash_password("")
    with pytest.raises(PasswordError):
        hash_password("x" * 2000)


def test_dummy_hash_matches_nothing_users_send() -> None:
    assert not verify_password("password", dummy_hash())


def test_decode_plain() -> None:
    c = decode_plain(b"\x00User1\x00pw")
    assert (c.authzid, c.login, c.password) == ("", "User1", b"pw")
    assert decode_plain(b"User1\x00User1\x00pw").authzid == "User1"
    for bad in (b"User1pw", b"\x00\x00pw", b"\x00User1\x00", b"a\x00b\x00c\x00d"):
        with pytest.raises(ValueError):
            decode_plain(bad)
    assert base64.b64encode(b"\x00User1\x00pw")  # (what swaks/smtplib send)


def test_limiter_locks_out_after_max_failures_and_expires() -> None:
    lim = FailureLimiter(AuthLimits(max_failures=3, window=60, lockout=100, failure_delay=1, max_delay=4))
    assert lim.locked_for("192.0.2.1", 0) == 0
    assert lim.failure("192.0.2.1", 0) == 1
    assert lim.failure("192.0.2.1", 1) == 2
    assert lim.locked_for("192.0.2.1", 1) == 0
    assert lim.failure("192.0.2.1", 2) == 3
    assert lim.locked_for("192.0.2.1", 2) == pytest.approx(100)
    assert lim.locked_for("192.0.2.2", 2) == 0  # per client
    assert lim.locked_for("192.0.2.1", 50) == pytest.approx(52)
    assert lim.locked_for("192.0.2.1", 103) == 0  # lockout over, failures forgotten
    assert lim.failure("192.0.2.1", 104) == 1


def test_limiter_window_forgets_old_failures_and_success_clears() -> None:
    lim = FailureLimiter(AuthLimits(max_failures=3, window=10, lockout=100))
    lim.failure("c", 0)
    lim.failure("c", 1)
    assert lim.failure("c", 20) == 1  # the first two fell out of the window
    lim.failure("c", 21)
    lim.success("c")
    assert lim.failure("c", 22) == 1


def test_limiter_delay_doubles_and_is_capped() -> None:
    lim = FailureLimiter(AuthLimits(failure_delay=0.5, max_delay=3))
    assert [lim.delay(n) for n in range(0, 6)] == [0, 0.5, 1, 2, 3, 3]
    assert FailureLimiter(AuthLimits(failure_delay=0)).delay(3) == 0


def test_limiter_memory_is_bounded() -> None:
    lim = FailureLimiter(AuthLimits(max_failures=100), max_clients=50)
    for i in range(500):
        lim.failure(f"10.0.{i // 256}.{i % 256}", float(i))
    assert len(lim._failures) <= 50


def test_guess_guard_counts_per_pair_address_and_account():

    guard = GuessGuard(GuessLimits(pair=AuthLimits(max_failures=3, window=60, lockout=100),
                                   address=AuthLimits(max_failures=5, window=60, lockout=100),
                                   account=AuthLimits(max_failures=4, window=60, lockout=100), trusted_for=1000))
    # a valid login of the attacker's own account clears nothing of the victim's count
    for t in range(3):
        assert guard.refusal("victim", "x", t) is None
        guard.failure("victim", "x", t)
        guard.success("mallory", "x", t)
    refused = guard.refusal("victim", "x", 3)
    assert refused is not None and refused.close and refused.reply.startswith("421 4.7.0")
    assert guard.refusal("mallory", "x", 3) is None  # its own pair is trusted
    # the victim from its own trusted address is never refused for the account's count
    guard.success("victim", "home", 4)
    for i in range(10):
        guard.failure("victim", f"a{i}", 5)
    far = guard.refusal("victim", "elsewhere", 6)
    assert far is not None and not far.close and far.reply.startswith("454 4.7.0")
    assert guard.refusal("victim", "home", 6) is None
    # the address lock spares pairs that logged in there before
    for i in range(5):
        guard.failure(f"nobody{i}", "nat", 7)
    assert guard.refusal("carol", "nat", 8) is not None
    guard.success("dave", "nat", 0)  # (logged in there earlier)
    assert guard.refusal("dave", "nat", 8) is None
    # trust and counts expire
    assert guard.refusal("victim", "elsewhere", 5 + 101) is None
    assert not guard.trusted("dave", "nat", 1001)


def test_guess_guard_memory_is_bounded():

    lim = AuthLimits(max_failures=3, window=60, lockout=100)
    guard = GuessGuard(GuessLimits(pair=lim, address=lim, account=lim), max_keys=50)
    for i in range(1000):
        guard.failure(f"acct{i}", f"addr{i}", 0)
        guard.success(f"ok{i}", f"addr{i}", 0)
    assert len(guard._trusted) <= 50
    assert len(guard.pairs._failures) <= 50 and len(guard.accounts._failures) <= 50
