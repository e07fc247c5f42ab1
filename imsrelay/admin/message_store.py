"""Reading a site's Maildirs for the message API: summaries, full messages, search.

The Maildir stays the store (``<data>/mailboxes/<alias>/{new,cur}``).  A
``MessageStore`` keeps an in-memory index of the header summaries, rebuilt from the
files: each scan lists the directories and parses only files it has not seen (by
name, size and mtime), so it costs a ``listdir`` and a ``stat`` per message.
Everything here is blocking file I/O: callers run it in a thread (the API does),
never on the event loop.

A message id is ``<site>:<mailbox>:<unique>`` (the Maildir unique name, without
the ``:2,`` flags), stable while the message moves between new/ and cur/.

Search syntax (``parse_search``, pure): ``from:`` ``to:`` (To, Cc, the envelope
recipient and the distribution lists it came through) ``subject:`` ``message-id:`` (``<whole@id>``, or any part without the
angle brackets) ``mailbox:`` ``site:`` ``after:``/``before:``
(a date ``2026-12-01``, an ISO time, or a Unix time) and free text (headers and
the text of the message), combined with AND; ``"quoted values"`` keep spaces.
"""

from __future__ import annotations

import email.errors
import email.header
import email.parser
import email.policy
import os
import re
import shlex
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from imsrelay.policy.expansion import EXPANDED_HEADER

MAX_HEADER = 256 * 1024  # bytes of a message's header read for its summary
MAX_TEXT_SEARCH = 8 * 1024 * 1024  # messages larger than this are free-text searched in their headers only
LISTING_SETTLE = 2.0  # seconds: a mailbox directory changed more recently is listed again on every scan
SEARCH_FIELDS = ("from", "to", "subject", "message-id", "mailbox", "site", "after", "before")


class SearchError(ValueError):
    """A search the user wrote cannot be understood (the API answers 400)."""


class NotFound(LookupError):
    pass


# ------------------------------------------------------------------ values


@dataclass(frozen=True)
class Summary:
    id: str
    site: str
    mailbox: str
    path: str
    envelope_sender: str | None
    envelope_recipient: str | None
    from_: str
    to: str
    cc: str
    subject: str
    date: str | None
    message_id: str | None
    size: int
    received: float  # when the file was delivered (mtime)
    read: bool
    server: str | None = None  # a site of several servers: the server holding it (None: a site of one)
    lists: str = ""  # the distribution lists it came through (X-IMS-Expanded-DL, KB Q185194), comma-separated

    def as_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "site": self.site, "mailbox": self.mailbox,
             "envelope_sender": self.envelope_sender, "envelope_recipient": self.envelope_recipient,
             "from": self.from_, "to": self.to, "cc": self.cc, "subject": self.subject, "date": self.date,
             "message_id": self.message_id, "size": self.size, "received": self.received,
             "received_iso": _iso(self.received), "read": self.read, "lists": self.lists}
        if self.server:
            d["server"] = self.server
        return d


@dataclass(frozen=True)
class Search:
    """A parsed search: every criterion must hold."""

    from_: tuple[str, ...] = ()
    to: tuple[str, ...] = ()
    subject: tuple[str, ...] = ()
    message_id: tuple[str, ...] = ()
    mailbox: tuple[str, ...] = ()
    site: tuple[str, ...] = ()
    after: float | None = None
    before: float | None = None
    text: tuple[str, ...] = ()

    @property
    def needs_body(self) -> bool:
        return bool(self.text)

    @property
    def empty(self) -> bool:
        """No criterion at all (``query=""`` or blanks): it would match every message."""
        return self == Search()


NAME_MAX = 255  # bytes in one file name (Linux): a longer "name" is no message here


def _file_name(part: str) -> bool:
    """Whether ``part`` of a message id can name a file at all (ENAMETOOLONG, NUL)."""
    return "\0" not in part and len(part.encode("utf-8", "surrogateescape")) <= NAME_MAX


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ------------------------------------------------------------------ search (pure)


def parse_time(value: str) -> float:
    """``2026-12-01``, ``2026-12-01T10:00:00[Z|+01:00]`` or a Unix time → seconds (UTC)."""
    v = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", v):
        return float(v)
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise SearchError(f"{value!r} is not a date or time (use 2026-12-01, 2026-12-01T10:00:00Z "
                          "or a Unix time)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def parse_search(query: str) -> Search:
    """``from:alice subject:"two words" after:2026-12-01 hello`` → ``Search``."""
    try:
        tokens = shlex.split(query or "", posix=True)
    except ValueError as exc:
        raise SearchError(f"cannot read the search {query!r}: {exc}") from None
    fields: dict[str, list[str]] = {k: [] for k in SEARCH_FIELDS}
    text: list[str] = []
    for tok in tokens:
        if not tok.strip():  # '""' is no criterion (it would match every message)
            continue
        m = re.fullmatch(r"([A-Za-z][A-Za-z-]*):(.*)", tok, re.DOTALL)
        if m is None:
            text.append(tok.lower())
            continue
        key, value = m.group(1).lower(), m.group(2)
        if key == "msgid":
            key = "message-id"
        if key not in fields:
            raise SearchError(f"unknown search field {key!r} (known: {', '.join(f + ':' for f in SEARCH_FIELDS)} "
                              "and free text)")
        if not value:
            raise SearchError(f"{key}: needs a value (e.g. {key}:something)")
        fields[key].append(value)
    after = before = None
    if fields["after"]:
        after = max(parse_time(v) for v in fields["after"])
    if fields["before"]:
        before = min(parse_time(v) for v in fields["before"])
    low = {k: tuple(v.lower() for v in vs) for k, vs in fields.items()}
    return Search(from_=low["from"], to=low["to"], subject=low["subject"], message_id=low["message-id"],
                  mailbox=low["mailbox"], site=low["site"], after=after, before=before, text=tuple(text))


def header_matches(s: Summary, q: Search) -> bool:
    """Every criterion but free text (which may need the body)."""
    if q.site and s.site.lower() not in q.site:
        return False
    if q.mailbox and s.mailbox.lower() not in q.mailbox:
        return False
    if q.after is not None and s.received < q.after:
        return False
    if q.before is not None and s.received >= q.before:
        return False
    sender = f"{s.from_} {s.envelope_sender or ''}".lower()
    if any(v not in sender for v in q.from_):
        return False
    rcpts = f"{s.to} {s.cc} {s.envelope_recipient or ''} {s.lists}".lower()  # a list's members: by the list too
    if any(v not in rcpts for v in q.to):
        return False
    subject = s.subject.lower()
    if any(v not in subject for v in q.subject):
        return False
    mid = (s.message_id or "").lower()
    # <id@host> is the whole Message-ID; without angle brackets, any part of it
    return all(mid == v if v.startswith("<") and v.endswith(">") else v.strip("<>") in mid
               for v in q.message_id)


def text_matches(s: Summary, words: tuple[str, ...], body_text: str | None) -> bool:
    hay = " ".join([s.from_, s.to, s.cc, s.subject, s.message_id or "", s.envelope_sender or "",
                    s.envelope_recipient or "", body_text or ""]).lower()
    return all(w in hay for w in words)


# ------------------------------------------------------------------ reading files


def _flags(name: str) -> str:
    return name.split(":2,", 1)[1] if ":2," in name else ""


def _unique(name: str) -> str:
    return name.split(":", 1)[0]


def _headers_of(path: Path) -> tuple[bytes, int]:
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER)
        size = os.fstat(f.fileno()).st_size
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = head.find(sep)
        if end >= 0:
            return head[:end + len(sep)], size
    return head, size


def summarise(site: str, mailbox: str, path: Path, server: str | None = None) -> Summary:
    head, size = _headers_of(path)
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)

    def h(name: str) -> str:
        value = msg.get(name)
        if value is None:
            return ""
        try:
            return str(email.header.make_header(email.header.decode_header(str(value))))
        except (ValueError, LookupError, email.errors.MessageError):  # (CharsetError, HeaderParseError)
            return str(value)

    return_path = h("Return-Path").strip().strip("<>") if msg.get("Return-Path") is not None else None
    return Summary(
        id=f"{site}:{mailbox}:{_unique(path.name)}", site=site, mailbox=mailbox, path=str(path),
        envelope_sender=return_path, envelope_recipient=h("Delivered-To") or None,
        from_=h("From"), to=h("To"), cc=h("Cc"), subject=h("Subject"), date=h("Date") or None,
        message_id=re.sub(r"\s+", "", h("Message-ID")) or None, size=size,
        received=path.stat().st_mtime, read="S" in _flags(path.name), server=server,
        lists=", ".join(str(v).strip() for v in msg.get_all(EXPANDED_HEADER) or ()))


def body_text(path: Path) -> str:
    """The decoded text (plain, else HTML) of a message, for free-text search."""
    if path.stat().st_size > MAX_TEXT_SEARCH:
        return ""
    msg = parse_message(path.read_bytes())
    parts = []
    for part in msg.walk():
        if part.get_content_maintype() == "text" and not part.is_attachment():
            try:
                parts.append(part.get_content())
            except (LookupError, ValueError):
                continue
    return "\n".join(parts)


def parse_message(raw: bytes) -> EmailMessage:
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


def message_detail(summary: Summary) -> dict[str, Any]:
    """Headers, text and HTML parts (decoded) and attachments of one message."""
    raw = Path(summary.path).read_bytes()
    msg = parse_message(raw)
    headers = []
    for name, value in msg.raw_items():
        try:
            decoded = str(email.header.make_header(email.header.decode_header(str(value))))
        except (ValueError, LookupError, email.errors.MessageError):  # (CharsetError, HeaderParseError)
            decoded = str(value)
        headers.append({"name": name, "value": re.sub(r"\r?\n[ \t]*", " ", decoded)})
    text = html = None
    for kind in ("plain", "html"):
        part = msg.get_body(preferencelist=(kind,))
        if part is not None and part.get_content_subtype() == kind:
            try:
                content = part.get_content()
            except (LookupError, ValueError):  # an unknown charset: the bytes as Latin-1
                payload = part.get_payload(decode=True)
                content = payload.decode("latin-1") if isinstance(payload, bytes) else ""
            if kind == "plain":
                text = content
            else:
                html = content
    attachments = []
    for part in msg.iter_attachments():
        payload = part.get_payload(decode=True)
        attachments.append({"filename": part.get_filename(), "content_type": part.get_content_type(),
                            "size": len(payload) if isinstance(payload, bytes) else 0,
                            "disposition": part.get_content_disposition()})
    return {**summary.as_dict(), "headers": headers, "text": text, "html": html, "attachments": attachments}


# ------------------------------------------------------------------ the store


class MessageStore:
    """One site's mailboxes, indexed in memory from the Maildir files (thread-safe);
    ``server``: on a site of several servers, this server's name, carried by every
    summary (the mailboxes homed here)."""

    def __init__(self, site: str, root: Path, *, server: str | None = None) -> None:
        self.site = site
        self.server = server
        self.root = Path(root)
        self._index: dict[str, tuple[int, int, Summary]] = {}  # path → (mtime_ns, size, summary)
        self._listings: dict[str, tuple[tuple[int, int], list[Summary]]] = {}  # mailbox → (dir mtimes, summaries)
        self._lock = threading.Lock()

    def mailbox_names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if (p / "new").is_dir() or (p / "cur").is_dir())
        except FileNotFoundError:
            return []

    def _files(self, mailbox: str) -> list[Path]:
        out = []
        for sub in ("new", "cur"):
            d = self.root / mailbox / sub
            try:
                out += [d / n for n in os.listdir(d) if not n.startswith(".")]
            except (FileNotFoundError, NotADirectoryError):
                continue
        return out

    def scan(self, mailboxes: list[str] | None = None) -> list[Summary]:
        """Summaries of every message (of the given mailboxes), newest first."""
        names = self.mailbox_names() if mailboxes is None else [m for m in mailboxes if m in self.mailbox_names()]
        if len(names) == 1 and mailboxes is not None:
            return list(self._scan_mailbox(names[0]))  # already newest first
        found: list[Summary] = []
        for mbx in names:
            found.extend(self._scan_mailbox(mbx))
        if mailboxes is None:
            seen = {s.path for s in found}
            with self._lock:
                for key in [k for k in self._index if k not in seen]:
                    del self._index[key]
        found.sort(key=lambda s: (s.received, s.id), reverse=True)
        return found

    def _stamp(self, mailbox: str) -> tuple[int, int] | None:
        """The mtimes of a mailbox's new/ and cur/: any delivery, move or delete changes one."""
        try:
            return (os.stat(self.root / mailbox / "new").st_mtime_ns, os.stat(self.root / mailbox / "cur").st_mtime_ns)
        except FileNotFoundError:
            return None

    def _scan_mailbox(self, mbx: str) -> list[Summary]:
        """One mailbox's summaries: from the listing cache while new/ and cur/ are
        unchanged (a page of a 100,000-message mailbox costs two stats, not 100,000);
        a directory changed less than ``LISTING_SETTLE`` ago is read again every time
        (its mtime may not show a second change within the same clock tick)."""
        stamp = self._stamp(mbx)
        with self._lock:
            cached = self._listings.get(mbx)
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1]
        found: list[Summary] = []
        for path in self._files(mbx):
            key = str(path)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # moved or deleted meanwhile
            with self._lock:
                hit = self._index.get(key)
            if hit and hit[0] == st.st_mtime_ns and hit[1] == st.st_size:
                found.append(hit[2])
                continue
            try:
                summary = summarise(self.site, mbx, path, self.server)
            except (FileNotFoundError, IsADirectoryError):
                continue
            with self._lock:
                self._index[key] = (st.st_mtime_ns, st.st_size, summary)
            found.append(summary)
        found.sort(key=lambda s: (s.received, s.id), reverse=True)
        if stamp is not None and time.time_ns() - max(stamp) > LISTING_SETTLE * 1e9:
            with self._lock:
                self._listings[mbx] = (stamp, found)
        return found

    def mailboxes(self) -> list[dict[str, Any]]:
        out = []
        for mbx in self.mailbox_names():
            msgs = self.scan([mbx])
            out.append({"site": self.site, "mailbox": mbx, "messages": len(msgs),
                        "unread": sum(1 for m in msgs if not m.read), "size": sum(m.size for m in msgs),
                        **({"server": self.server} if self.server else {})})
        return out

    def search(self, q: Search) -> list[Summary]:
        if q.site and self.site.lower() not in q.site:
            return []
        mailboxes = None
        if q.mailbox:
            mailboxes = [m for m in self.mailbox_names() if m.lower() in q.mailbox]
        hits = [s for s in self.scan(mailboxes) if header_matches(s, q)]
        if q.text:
            hits = [s for s in hits if text_matches(s, q.text, None) or self._body_has(s, q.text)]
        return hits

    def _body_has(self, s: Summary, words: tuple[str, ...]) -> bool:
        try:
            return text_matches(s, words, body_text(Path(s.path)))
        except FileNotFoundError:
            return False

    def find(self, message_id: str) -> Summary:
        site, mbx, unique = split_id(message_id)
        if site != self.site or "/" in mbx or mbx in ("", ".", "..") or not _file_name(mbx):
            raise NotFound(message_id)
        if "/" in unique or unique in (".", "..") or not _file_name(unique):
            raise NotFound(message_id)
        direct = self.root / mbx / "new" / unique  # where a delivery puts it: no directory listing
        candidates = [direct] if direct.is_file() else [p for p in self._files(mbx) if _unique(p.name) == unique]
        for path in candidates:
            try:
                return summarise(self.site, mbx, path, self.server)
            except FileNotFoundError:
                break
        raise NotFound(message_id)

    def detail(self, message_id: str) -> dict[str, Any]:
        try:
            return message_detail(self.find(message_id))
        except FileNotFoundError:  # marked read meanwhile: the file moved to cur/ under the same id
            return message_detail(self.find(message_id))

    def delete(self, message_id: str) -> bool:
        try:
            s = self.find(message_id)
        except NotFound:
            return False
        try:
            os.unlink(s.path)
        except FileNotFoundError:
            return False
        with self._lock:
            self._index.pop(s.path, None)
        return True

    def set_read(self, message_id: str, read: bool) -> Summary:
        """Set or clear the Maildir ``S`` (seen) flag: the file moves to cur/ with it."""
        s = self.find(message_id)
        path = Path(s.path)
        flags = set(_flags(path.name))
        flags = flags | {"S"} if read else flags - {"S"}
        target = path.parent.parent / "cur" / f"{_unique(path.name)}:2,{''.join(sorted(flags))}"
        if target != path:
            os.rename(path, target)
            with self._lock:
                self._index.pop(str(path), None)
        return self.find(message_id)


def split_id(message_id: str) -> tuple[str, str, str]:
    parts = message_id.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise NotFound(message_id)
    return parts[0], parts[1], parts[2]
