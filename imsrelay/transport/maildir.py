"""Local delivery into Maildir (``<data>/mailboxes/<alias>/{tmp,new,cur}``): the local
delivery agent, ``MaildirTransport``.

A delivered file starts with ``Return-Path``, ``Delivered-To`` and a ``Received:``
line, followed by the message bytes exactly as queued.  The file name is derived
from the queue id and the recipient, so a delivery repeated after a crash finds
its own earlier file (in ``new/``, or in ``cur/`` without flags) and does not
deliver twice.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence
from datetime import datetime
from email.utils import format_datetime
from functools import lru_cache
from pathlib import Path

from imsrelay.durable.committer import GroupCommitter, Write
from imsrelay.model.envelope import Envelope, RecipientState
from imsrelay.model.header_date import header_date_now
from imsrelay.model.object_rules import safe_alias
from imsrelay.model.outcome import Outcome
from imsrelay.routing.router import Route

_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


def mailbox_dir(data_dir: Path, alias: str) -> Path:
    """``<data>/mailboxes/<alias>``; an alias that could leave that directory is refused."""
    if not safe_alias(alias):
        raise ValueError(f"{alias!r} is not a mailbox alias")
    return Path(data_dir) / "mailboxes" / alias


def ensure_maildir(path: Path, owner: tuple[int, int] | None = None) -> None:
    """The Maildir's tmp/, new/ and cur/; with ``owner`` (uid, gid), the Maildir and
    its three directories belong to that user (Dovecot's mail processes, when the
    site runs as root: see imsrelay/access)."""
    if not ((path / "new").is_dir() and (path / "tmp").is_dir() and (path / "cur").is_dir()):
        for sub in ("tmp", "new", "cur"):
            (path / sub).mkdir(parents=True, exist_ok=True)
    if owner is not None:
        for d in (path, path / "tmp", path / "new", path / "cur"):
            st = d.stat()
            if (st.st_uid, st.st_gid) != owner:
                os.chown(d, *owner)


def trace_headers(*, sender: str, recipient: str, hostname: str, queue_id: str, now: datetime | None = None) -> bytes:
    date = format_datetime(now) if now is not None else header_date_now()
    return (
        f"Return-Path: <{sender}>\r\n"
        f"Delivered-To: {recipient}\r\n"
        f"Received: by {hostname} (imsrelay) with local id {queue_id}\r\n"
        f"\tfor <{recipient}>; {date}\r\n"
    ).encode("utf-8", "surrogateescape")


def unique_name(queue_id: str, index: int) -> str:
    return f"{queue_id}.R{index}.{_HOST}"


def delivery_write(maildir: Path, *, queue_id: str, index: int, message: bytes, sender: str, recipient: str,
                   hostname: str, owner: tuple[int, int] | None = None) -> Write:
    """The spool write that delivers one message into ``maildir``: written in its
    tmp/, fsynced, renamed into new/ (new/ fsynced by the group commit); skipped if
    this (queue id, recipient) was delivered before, in new/ or unflagged in cur/."""
    unique = unique_name(queue_id, index)
    data = (trace_headers(sender=sender, recipient=recipient, hostname=hostname, queue_id=queue_id), message)
    new, cur, tmp = _subdirs(maildir)
    final = new / unique
    return Write(final, data, tmp_dir=tmp, unless_exists=(final, cur / unique, cur / f"{unique}:2,"), owner=owner)


@lru_cache(maxsize=256)
def _subdirs(maildir: Path) -> tuple[Path, Path, Path]:
    """``new/``, ``cur/`` and ``tmp/`` of a Maildir (paths only: nothing is looked up)."""
    return maildir / "new", maildir / "cur", maildir / "tmp"


def list_messages(maildir: Path) -> list[Path]:
    """Messages in new/ and cur/, oldest first."""
    files = [p for sub in ("new", "cur") if (maildir / sub).is_dir() for p in (maildir / sub).iterdir()]
    return sorted(files, key=lambda p: p.name)


class MaildirTransport:
    """The local delivery agent: one file per recipient in its mailbox's Maildir under
    ``<data>/mailboxes``, made durable by the site's group committer (the same
    rounds as the queue's own records).  ``owner`` (uid, gid): who the Maildirs and
    delivered files belong to, when not the site's own user (IMAP/POP3 as root)."""

    def __init__(self, data_dir: Path, committer: GroupCommitter, *, hostname: str,
                 owner: tuple[int, int] | None = None) -> None:
        self.data_dir = data_dir
        self.committer = committer
        self.hostname = hostname
        self.owner = owner
        self._maildirs: set[str] = set()  # mailboxes whose Maildir is known to exist

    async def deliver(self, route: Route, env: Envelope, recipients: Sequence[RecipientState],
                      message: bytes) -> dict[str, Outcome]:
        return {r.address: await self._deliver_one(route, env, r, message) for r in recipients}

    async def _deliver_one(self, route: Route, env: Envelope, r: RecipientState, message: bytes) -> Outcome:
        assert route.mailbox is not None
        try:
            path = mailbox_dir(self.data_dir, route.mailbox)
        except ValueError as exc:  # never a path outside the data directory
            return Outcome(False, True, "5.1.3", f"local delivery refused: {exc}")
        write = delivery_write(path, queue_id=env.queue_id, index=env.recipients.index(r),
                               message=message, sender=env.sender, recipient=r.address,
                               hostname=self.hostname, owner=self.owner)
        try:
            if route.mailbox not in self._maildirs:
                await asyncio.to_thread(ensure_maildir, path, self.owner)
                self._maildirs.add(route.mailbox)
            await self.committer.commit([write])
        except OSError as exc:
            self._maildirs.discard(route.mailbox)
            return Outcome.temporary("4.3.0", f"local delivery failed: {exc.strerror or exc}")
        return Outcome.delivered(f"delivered to {write.path}")

    def forget_unreachable(self) -> None:
        pass
