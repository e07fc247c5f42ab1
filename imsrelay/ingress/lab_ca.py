"""A throwaway certificate authority for the labs, so that TLS works out of the box.

``ensure_ca`` makes a CA (EC P-256, ten years) in a directory once; ``ensure_certificate``
issues a server certificate from it for a site's host names and addresses.  The
files are PEM: ``ca.crt`` is what a client trusts (``swaks --tls-ca-path``,
``ssl.create_default_context(cafile=...)``, ``SSL_CERT_FILE``); the keys are
readable by their owner only.  Nothing here is meant for production use.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

CA_NAME = "imsrelay lab CA (throwaway)"


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One process at a time makes the files (``serve --workers`` start together)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_ca(directory: Path, *, name: str = CA_NAME) -> tuple[Path, Path]:
    """``directory/ca.crt`` and ``directory/ca.key``, made when missing."""
    with _locked(directory):
        return _ensure_ca(directory, name)


def _ensure_ca(directory: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def ensure_certificate(directory: Path, stem: str, *, ca: tuple[Path, Path], hostnames: Iterable[str],
                       addresses: Iterable[str] = ()) -> tuple[Path, Path]:
    """``directory/<stem>.crt`` and ``.key`` signed by ``ca`` for the names and IP
    addresses given (made when missing, or when the names changed)."""
    with _locked(directory):
        return _ensure_certificate(directory, stem, ca, list(hostnames), list(addresses))


def _ensure_certificate(directory: Path, stem: str, ca: tuple[Path, Path], hostnames: list[str],
                        addresses: list[str]) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names = sorted({h.lower().rstrip(".") for h in hostnames if h})
    ips = sorted({str(ipaddress.ip_address(a)) for a in addresses if a}, key=str)
    wanted: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    wanted += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    if cert_path.exists() and key_path.exists():
        try:
            old = x509.load_pem_x509_certificate(cert_path.read_bytes())
            san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if set(san) == set(wanted):
                return cert_path, key_path
        except (ValueError, x509.ExtensionNotFound):
            pass
    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else stem)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def trust_hint(ca_cert: Path) -> str:
    """How to trust the lab CA, in one paragraph for the lab's start-up output."""
    return (f"TLS: certificates from a throwaway lab CA, {ca_cert}; trust it for the lab only, e.g.\n"
            f"  swaks --tls --tls-ca-path {ca_cert} ...   |   SSL_CERT_FILE={ca_cert} python ...\n"
            f"  python: ssl.create_default_context(cafile='{ca_cert}')   |   "
            f"openssl s_client -CAfile {ca_cert} -starttls smtp ...")
