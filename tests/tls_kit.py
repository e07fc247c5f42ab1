"""A throwaway CA and server certificates made with the openssl command, for TLS tests."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", "2", "-subj", "/CN=imsrelay test CA", cwd=directory)
    return directory / "ca.pem"


def make_cert(directory: Path, name: str, san: str, *, ca: Path | None) -> tuple[Path, Path]:
    """(cert, key) for ``san`` (e.g. "IP:127.0.0.1"), signed by ``ca`` or self-signed."""
    key, csr, cert = f"{name}.key", f"{name}.csr", f"{name}.pem"
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    if ca is None:
        _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2",
             "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}", cwd=directory)
    else:
        _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}",
             cwd=directory)
        _run("x509", "-req", "-in", csr, "-CA", str(ca), "-CAkey", str(ca.with_suffix(".key")),
             "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", str(ext), cwd=directory)
    return directory / cert, directory / key
