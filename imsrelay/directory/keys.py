"""Who may sign replication messages: the organisation's shared key (HMAC-SHA256),
or per-site Ed25519 keys (``cryptography``).

With per-site keys each site holds its own private key
(``replication.signing_key``) and every site's file lists the organisation's
trusted public keys (``[replication.trusted_keys]``, provisioned at set-up with
``imsrelay replicate keygen``).  A message verifies only with the key of the site
it says it comes from, and every directory object it carries must bear its *home*
site's signature: a site can speak only for the objects it owns, also when another
site relays them.  With the shared key any holder can speak for any site; only
objects homed at the receiving site are protected (docs/explanation/replication.md, "Security")."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from imsrelay.model.settings import ReplicationConfig

HMAC_SCHEME = "hmac-sha256"
ED25519_SCHEME = "ed25519"
# What ``/status`` and ``imsrelay replicate status`` call the two ways of trusting
PER_SITE_KEYS = "per-site ed25519"
ORGANISATION_KEY = "shared organisation key"


class ReplicationKeyError(Exception):
    """A key that cannot be read or parsed (a clear one-line message)."""


@dataclass(frozen=True)
class Trust:
    """How this site signs and whom it believes."""

    site: str
    hmac_key: str | None = None
    private_key: Ed25519PrivateKey | None = field(default=None, compare=False)
    public_keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict, compare=False)

    @property
    def per_site(self) -> bool:
        return self.private_key is not None

    @property
    def scheme(self) -> str:
        """``PER_SITE_KEYS`` or ``ORGANISATION_KEY``."""
        return PER_SITE_KEYS if self.per_site else ORGANISATION_KEY

    @property
    def trusted_sites(self) -> tuple[str, ...]:
        """The sites whose public keys this site holds (none with the organisation key)."""
        return tuple(sorted(self.public_keys)) if self.per_site else ()

    def sign(self, data: bytes) -> str:
        if self.private_key is not None:
            return f"{ED25519_SCHEME}={base64.b64encode(self.private_key.sign(data)).decode()}"
        assert self.hmac_key is not None
        return f"{HMAC_SCHEME}={hmac.new(self.hmac_key.encode(), data, hashlib.sha256).hexdigest()}"

    def check(self, signature: str, signer: str, data: bytes) -> bool:
        """Whether ``signature`` over ``data`` is ``signer``'s (its site key, or the
        organisation key when this site uses one)."""
        scheme, _, value = signature.strip().partition("=")
        if self.per_site:
            key = self.public_keys.get(signer)
            if scheme != ED25519_SCHEME or key is None:
                return False
            try:
                key.verify(base64.b64decode(value, validate=True), data)
            except (InvalidSignature, binascii.Error, ValueError):
                return False
            return True
        if scheme != HMAC_SCHEME or self.hmac_key is None:
            return False
        expected = hmac.new(self.hmac_key.encode(), data, hashlib.sha256).hexdigest()
        return hmac.compare_digest(value.encode(), expected.encode())

    def knows(self, site: str) -> bool:
        return not self.per_site or site in self.public_keys


def object_signing_bytes(organisation: str, wire: Mapping[str, Any]) -> bytes:
    """What a home site signs for one of its objects: the object's wire form without
    its signature, canonical JSON, prefixed with the organisation."""
    import json

    body = {k: v for k, v in wire.items() if k != "sig"}
    return (f"imsrelay-object-v1\n{organisation}\n".encode()
            + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"{ED25519_SCHEME}:{base64.b64encode(raw).decode()}"


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ReplicationKeyError(f"{path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ReplicationKeyError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReplicationKeyError(f"{path}: not an Ed25519 key")
    return key


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write ``key`` as PEM to a new file readable by its owner only (0600); an
    existing file is never replaced (``FileExistsError``): a site's key is its
    identity, and the other sites trust only its public key.  The key is written
    to a temporary file first and linked into place, so ``path`` never holds half
    a key (a crash leaves at most a ``.tmp`` file behind)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists already")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crash of a process that had this pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:  # 0600: a umask can only take bits away
            f.write(private_key_pem(key))
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # FileExistsError when someone else was first: never replaced
    finally:
        tmp.unlink(missing_ok=True)


def site_key(path: Path) -> Ed25519PrivateKey:
    """The site's private key at ``path``: made (0600) the first time, read after
    that, so a restart keeps the key the other sites trust."""
    path = Path(path)
    if not path.exists():
        try:
            write_private_key(path, generate_private_key())
        except FileExistsError:
            pass  # made at the same moment by someone else: theirs is the key
    return load_private_key(path)


def parse_public_key(text: str) -> Ed25519PublicKey:
    """``ed25519:<base64 of the 32 raw bytes>``; ValueError when it is not one."""
    scheme, _, value = text.strip().partition(":")
    if scheme != ED25519_SCHEME:
        raise ValueError("must look like ed25519:<base64> (imsrelay replicate keygen prints it)")
    try:
        raw = base64.b64decode(value, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise ValueError("is not a base64 Ed25519 public key (32 bytes)") from None


def trust_from(site: str, settings: ReplicationConfig) -> Trust:
    """The site's replication trust from its ``[replication]`` settings (per-site
    Ed25519 keys when ``signing_key`` is set, else the organisation key);
    ``ReplicationKeyError`` when the key cannot be read, when the site's own entry
    in ``trusted_keys`` is not its key's public half, or when there is no key."""
    if settings.signing_key:
        try:
            private = load_private_key(settings.signing_key)
        except ReplicationKeyError as exc:
            raise ReplicationKeyError(f"replication.signing_key: {exc}") from None
        keys = {name: parse_public_key(text) for name, text in settings.trusted_keys}
        own = keys.get(site)
        if own is None or public_key_text(own) != public_key_text(private):
            raise ReplicationKeyError(f"replication.trusted_keys must list this site ({site}) with the public "
                                      "key of replication.signing_key")
        return Trust(site, private_key=private, public_keys=keys)
    key = settings.resolved_key()
    if not key:
        raise ReplicationKeyError("replication needs an organisation key (replication.key or "
                                  f"${settings.key_env}) or per-site keys (replication.signing_key)")
    return Trust(site, hmac_key=key)
