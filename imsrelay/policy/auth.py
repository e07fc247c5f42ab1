"""SMTP AUTH (RFC 4954): password hashes, credential checks, failed-attempt limits.

Credentials are the mailboxes' accounts in the site's directory; a password is
kept only as a salted ``hashlib.scrypt`` hash (memory-hard), never in clear:

    scrypt$<n>$<r>$<p>$<salt, base64>$<hash, base64>

Everything here is pure except the hashing itself (CPU-bound: the SMTP edge runs
it off the event loop).  ``FailureLimiter`` keeps the failed attempts per key (``GuessGuard``:
per account and address, address, account); clocks are passed in (tested without waiting).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass

SCRYPT_N = 2**14  # 16 MiB of memory per hash with r = 8
SCRYPT_R = 8
SCRYPT_P = 1
HASH_BYTES = 32
MAX_PASSWORD = 1024  # bytes; longer is refused (and would only cost CPU)
MECHANISMS = ("PLAIN", "LOGIN")


class PasswordError(ValueError):
    """A password or stored hash that cannot be used (clear one-line message)."""


def hash_password(password: str, *, salt: bytes | None = None, n: int = SCRYPT_N, r: int = SCRYPT_R,
                  p: int = SCRYPT_P) -> str:
    """The storable hash of ``password`` (a fresh 16-byte salt unless given)."""
    raw = password.encode("utf-8")
    if not raw:
        raise PasswordError("the password must not be empty")
    if len(raw) > MAX_PASSWORD:
        raise PasswordError(f"the password is longer than {MAX_PASSWORD} bytes")
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(raw, salt=salt, n=n, r=r, p=p, dklen=HASH_BYTES, maxmem=256 * 1024 * 1024)
    return "$".join(["scrypt", str(n), str(r), str(p), _b64(salt), _b64(digest)])


def parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """(n, r, p, salt, digest) of a stored hash; PasswordError when it is not one."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise PasswordError("not an scrypt password hash (scrypt$n$r$p$salt$hash)")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise PasswordError("a malformed scrypt password hash") from None
    if n < 2 or n & (n - 1) or n > 2**20 or not 1 <= r <= 32 or not 1 <= p <= 16 or len(salt) < 8 or not digest:
        raise PasswordError("scrypt parameters out of range")
    return n, r, p, salt, digest


def verify_password(password: str | bytes, stored: str) -> bool:
    """Whether ``password`` matches the stored hash (constant-time comparison)."""
    raw = password.encode("utf-8") if isinstance(password, str) else password
    try:
        n, r, p, salt, digest = parse_hash(stored)
    except PasswordError:
        return False
    if not raw or len(raw) > MAX_PASSWORD:
        return False
    candidate = hashlib.scrypt(raw, salt=salt, n=n, r=r, p=p, dklen=len(digest), maxmem=256 * 1024 * 1024)
    return hmac.compare_digest(candidate, digest)


@functools.cache
def dummy_hash() -> str:
    """Checked when the login names no account, so that an unknown user costs the same time."""
    return hash_password("imsrelay-no-such-account", salt=b"imsrelay-dummy-salt")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ------------------------------------------------------------------ SASL messages


@dataclass(frozen=True)
class Credentials:
    login: str
    password: bytes
    authzid: str = ""


def decode_plain(blob: bytes) -> Credentials:
    """RFC 4616 PLAIN: ``authzid NUL authcid NUL passwd``; ValueError when malformed."""
    parts = blob.split(b"\x00")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ValueError("PLAIN needs authzid NUL login NUL password")
    try:
        return Credentials(parts[1].decode("utf-8"), parts[2], parts[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("the login is not UTF-8") from None


# ------------------------------------------------------------------ identity


@dataclass(frozen=True)
class Identity:
    """Who an authenticated session is: a mailbox and the addresses it may send as."""

    alias: str
    home_site: str
    addresses: tuple[str, ...]  # the mailbox's SMTP proxy addresses

    @property
    def name(self) -> str:
        return self.alias


# ------------------------------------------------------------------ failed attempts


@dataclass(frozen=True)
class AuthLimits:
    max_failures: int = 5  # failures in ``window`` before the client is locked out
    window: float = 900.0
    lockout: float = 900.0
    failure_delay: float = 1.0  # the first 535 waits this long; each further one twice as long
    max_delay: float = 8.0


class FailureLimiter:
    """Failed AUTH attempts per client address (bounded: the oldest clients are forgotten)."""

    def __init__(self, limits: AuthLimits, *, max_clients: int = 10_000) -> None:
        self.limits = limits
        self.max_clients = max_clients
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._locked_until: dict[str, float] = {}

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(client, []) if now - t < self.limits.window]
        if times:
            self._failures[client] = times
        else:
            self._failures.pop(client, None)
        return times

    def locked_for(self, client: str, now: float) -> float:
        """Seconds the client is still locked out (0: it may try)."""
        until = self._locked_until.get(client)
        if until is None:
            return 0.0
        if now >= until:
            del self._locked_until[client]
            self._failures.pop(client, None)
            return 0.0
        return until - now

    def failure(self, client: str, now: float) -> int:
        """Record a failure; the number of failures in the window (locks out at the limit)."""
        times = self._recent(client, now) + [now]
        self._failures[client] = times
        self._failures.move_to_end(client)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)
        if len(times) >= self.limits.max_failures:
            self._locked_until[client] = now + self.limits.lockout
            if len(self._locked_until) > self.max_clients:
                oldest = min(self._locked_until, key=self._locked_until.__getitem__)
                del self._locked_until[oldest]
        return len(times)

    def delay(self, failures: int) -> float:
        """How long the reply to the ``failures``-th failure waits (doubling, capped)."""
        if failures <= 0 or self.limits.failure_delay <= 0:
            return 0.0
        return float(min(self.limits.failure_delay * 2.0 ** (failures - 1), self.limits.max_delay))

    def success(self, client: str) -> None:
        self._failures.pop(client, None)


# ------------------------------------------------------------------ password guessing


@dataclass(frozen=True)
class GuessLimits:
    """The three counts of failed AUTH attempts (``[auth]``) and how long a success
    keeps an (account, address) pair trusted."""

    pair: AuthLimits  # one account from one address: ``max_failures`` then locked out
    address: AuthLimits  # any account from one address: ``max_failures_per_address``
    account: AuthLimits  # one account from any address: ``max_failures_per_account``
    trusted_for: float = 30 * 86400.0


@dataclass(frozen=True)
class GuessRefusal:
    reply: str
    close: bool  # 421: the session ends; 454: the client may try another way later
    reason: str
    retry_after: float


class GuessGuard:
    """Failed AUTH attempts counted three ways, so that an attacker can neither guess
    much nor lock the real user out (pure; the clock is passed in).

    * per (account, address): ``max_failures`` then that pair is locked out for
      ``lockout`` (``421``): the usual brute force from one place;
    * per address, any account: a higher limit (password spraying from one place);
      the lock-out spares pairs that logged in successfully before (``trusted``), so
      the users behind a shared NAT keep working;
    * per account, any address: a higher limit (guesses spread over many addresses);
      then only trusted pairs may try that account (``454 4.7.0``, temporary, no
      lock-out of the real user at the places it logged in from).

    A success clears only its own pair's failures and makes that pair trusted: a
    valid login never clears another account's count nor its address's count, so
    an attacker with one account of its own gains nothing by logging in with it.
    The memory used is bounded (``max_keys`` per count, oldest forgotten)."""

    def __init__(self, limits: GuessLimits, *, max_keys: int = 10_000) -> None:
        self.limits = limits
        self.pairs = FailureLimiter(limits.pair, max_clients=max_keys)
        self.addresses = FailureLimiter(limits.address, max_clients=max_keys)
        self.accounts = FailureLimiter(limits.account, max_clients=max_keys)
        self.max_keys = max_keys
        self._trusted: OrderedDict[tuple[str, str], float] = OrderedDict()  # pair -> until

    def trusted(self, account: str, address: str, now: float) -> bool:
        until = self._trusted.get((account, address))
        if until is None:
            return False
        if now >= until:
            del self._trusted[(account, address)]
            return False
        return True

    def refusal(self, account: str, address: str, now: float) -> GuessRefusal | None:
        """Why this attempt is not even checked (None: check the password)."""
        pair = self.pairs.locked_for(f"{account}\0{address}", now)
        if pair > 0:
            return GuessRefusal(f"421 4.7.0 Too many failed authentication attempts from {address}; "
                                f"try again in {int(pair) + 1} s", True, "account and address", pair)
        if self.trusted(account, address, now):
            return None
        by_address = self.addresses.locked_for(address, now)
        if by_address > 0:
            return GuessRefusal(f"421 4.7.0 Too many failed authentication attempts from {address}; "
                                f"try again in {int(by_address) + 1} s", True, "address", by_address)
        by_account = self.accounts.locked_for(account, now)
        if by_account > 0:
            return GuessRefusal("454 4.7.0 Temporary authentication failure: too many failed attempts for "
                                "this account; try again later", False, "account", by_account)
        return None

    def failure(self, account: str, address: str, now: float) -> int:
        """Record a failure; the pair's failures in the window (``delay`` of it: how
        long its ``535`` waits, doubling, capped)."""
        failures = self.pairs.failure(f"{account}\0{address}", now)
        self.addresses.failure(address, now)
        self.accounts.failure(account, now)
        return failures

    def delay(self, failures: int) -> float:
        return self.pairs.delay(failures)

    def success(self, account: str, address: str, now: float) -> None:
        self.pairs.success(f"{account}\0{address}")
        self._trusted[(account, address)] = now + self.limits.trusted_for
        self._trusted.move_to_end((account, address))
        while len(self._trusted) > self.max_keys:
            self._trusted.popitem(last=False)
