"""Local delivery into Maildir (``<data>/mailboxes/<alias>/{tmp,new,cur}``).

A delivered file starts with ``Return-Path``, ``Delivered-To`` and a ``Received:``
line, followed by the message bytes exactly as queued.  The file name is derived
from the queue id and the recipient, so a delivery repeated after a crash finds
its own earlier file and does not deliver twice.
"""

from __future__ import annotations

import os
import socket
from email.utils import format_datetime
from datetime import UTC, datetime
from pathlib import Path

_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


def mailbox_dir(data_dir: Path, alias: str) -> Path:
    return Path(data_dir) / "mailboxes" / alias


def ensure_maildir(path: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)


def trace_headers(*, sender: str, recipient: str, hostname: str, queue_id: str, now: datetime | None = None) -> bytes:
    now = now or datetime.now(UTC)
    return (
        f"Return-Path: <{sender}>\r\n"
        f"Delivered-To: {recipient}\r\n"
        f"Received: by {hostname} (imsrelay) with local id {queue_id}\r\n"
        f"\tfor <{recipient}>; {format_datetime(now)}\r\n"
    ).encode("utf-8", "surrogateescape")


def deliver(maildir: Path, *, queue_id: str, index: int, message: bytes, sender: str, recipient: str,
            hostname: str) -> Path:
    """Deliver durably (tmp → fsync → rename into new/ → fsync new/); idempotent per
    (queue id, recipient index). Returns the file's path."""
    ensure_maildir(maildir)
    unique = f"{queue_id}.R{index}.{_HOST}"
    for sub in ("new", "cur"):
        for existing in (maildir / sub).glob(unique + "*"):
            return existing
    tmp = maildir / "tmp" / unique
    final = maildir / "new" / unique
    data = trace_headers(sender=sender, recipient=recipient, hostname=hostname, queue_id=queue_id) + message
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dfd = os.open(maildir / "new", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final


def list_messages(maildir: Path) -> list[Path]:
    """Messages in new/ and cur/, oldest first."""
    files = [p for sub in ("new", "cur") if (maildir / sub).is_dir() for p in (maildir / sub).iterdir()]
    return sorted(files, key=lambda p: p.name)
