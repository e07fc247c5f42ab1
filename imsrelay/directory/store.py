"""The site's directory: an SQLite store of directory objects (mailboxes, custom
recipients and distribution lists — KB Q258203, Q185194 — and sites).

Exchange 5.5 kept a multi-master directory replicated between sites.  We keep its
shape: every object has a home site, a *version* stamp ``(version, changed_at,
origin)`` that orders concurrent changes deterministically (the greatest stamp wins),
and a local update sequence number (USN) stamped whenever the row changes here, so a
peer can ask for "everything above my high-water mark".  A deletion is a tombstone:
the object stays, ``deleted`` set, until it is older than the tombstone lifetime.

Applying a remote object is a join (max by stamp): idempotent and order-independent.
Equal stamps with different content (which a healthy organisation never produces) are
ordered by the content itself, so the join is a total order either way.

Mailboxes, custom recipients and lists share one address space: an address
belongs to one of them.  An SMTP address claimed by several live objects (two sites gave it out concurrently,
before replication told each about the other) belongs to one owner derived from *all*
claims, never from the order they arrived in: the mailbox that has it as its primary
address, then the smallest object id.  The rule uses nothing an unrelated edit would
change, so a display-name change never moves an address.  ``address_conflicts`` lists
such addresses (Check Now reports them).
All methods are synchronous; the async site calls them through one executor thread
(``Directory.run``) so SQLite never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from imsrelay.model.addresses import AddressError, normalise_domain, parse_address, parse_proxy
from imsrelay.model.object_rules import recipient_object_id
from imsrelay.model.objects import (
    RECIPIENT_KINDS,
    RECIPIENT_NAMES,
    BulkReport,
    CustomRecipient,
    DirObject,
    DistributionList,
    Mailbox,
    Protocols,
    Recipient,
    SiteObject,
    Stamp,
)
from imsrelay.policy.expansion import expands_here
from imsrelay.policy.restrictions import FILTER_ACTIONS, check_entries, rules_from_data

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects(
    object_id  TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    home_site  TEXT NOT NULL,
    version    INTEGER NOT NULL,
    changed_at REAL NOT NULL,
    origin     TEXT NOT NULL,
    deleted    INTEGER NOT NULL DEFAULT 0,
    data       TEXT NOT NULL,
    usn        INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS objects_usn ON objects(usn);
CREATE TABLE IF NOT EXISTS proxy_addresses(
    address   TEXT PRIMARY KEY,
    object_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS proxy_object ON proxy_addresses(object_id);
CREATE TABLE IF NOT EXISTS address_claims(
    address    TEXT NOT NULL,
    object_id  TEXT NOT NULL,
    is_primary INTEGER NOT NULL,
    PRIMARY KEY(address, object_id)
);
CREATE INDEX IF NOT EXISTS claims_object ON address_claims(object_id);
CREATE TABLE IF NOT EXISTS peers(
    site          TEXT PRIMARY KEY,
    invocation    TEXT NOT NULL DEFAULT '',
    high_water    INTEGER NOT NULL DEFAULT 0,
    ranges        TEXT NOT NULL DEFAULT '[]',
    last_request  REAL,
    last_reply    REAL,
    last_error    TEXT,
    applied       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS credentials(
    object_id  TEXT PRIMARY KEY,
    hash       TEXT NOT NULL,
    changed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS seen_messages(
    message_id TEXT PRIMARY KEY,
    seen_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sent_messages(
    message_id TEXT PRIMARY KEY,
    peer       TEXT NOT NULL,
    sent_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rejections(
    reason TEXT PRIMARY KEY,
    count  INTEGER NOT NULL
);
"""

TOMBSTONE_LIFETIME = 30 * 86400.0
ADDRESS_INDEX_VERSION = "3"  # address_claims + derived proxy_addresses (3: custom recipients, lists)
T = TypeVar("T")


class DirectoryError(Exception):
    """A directory operation a user asked for that cannot be done (clear message)."""


def site_addressing_domain(smtp_address: str) -> str:
    """The domain of a Site Addressing value such as ``@microsoft.com`` (normalised);
    ``DirectoryInputError`` for anything else (``@``, ``@a..b``, ``@-x.com``, a literal)."""
    text = smtp_address.strip()
    example = "give the site address as @domain, e.g. @microsoft.com"
    if not text.startswith("@") or len(text) == 1:
        raise DirectoryInputError(f"{smtp_address!r} is not a site address: {example}")
    domain = text[1:]
    if domain.startswith("["):
        raise DirectoryInputError(f"{smtp_address!r}: Site Addressing needs a domain name, not an address literal")
    try:
        normalised = normalise_domain(domain)
    except AddressError:
        raise DirectoryInputError(f"{smtp_address!r} is not a site address: {domain!r} is not a valid domain "
                                  f"({example})") from None
    return normalised


class DirectoryInputError(DirectoryError):
    """The request itself is malformed (a bad alias, address or domain): HTTP 400."""


class DirectoryNotFound(DirectoryError):
    """The object asked for does not exist: HTTP 404."""


def merge_order(obj: DirObject) -> tuple[Any, ...]:
    """The total order the join uses: stamp first; the content only breaks ties."""
    return (obj.stamp.key(), obj.deleted, json.dumps(obj.data, sort_keys=True), obj.home_site, obj.kind)


def mailbox_id(home_site: str, alias: str) -> str:
    return f"mailbox:{home_site}:{alias.lower()}"


def site_id(name: str) -> str:
    return f"site:{name}"


def _mailbox_from(obj_data: dict[str, Any], home: str, deleted: bool) -> Mailbox:
    rules = rules_from_data(obj_data)
    return Mailbox(obj_data["alias"], obj_data.get("display_name", obj_data["alias"]), home,
                   tuple(obj_data.get("proxy_addresses", ())), deleted, rules,
                   Protocols.from_data(obj_data.get("protocols")), obj_data.get("home_server", ""))


def recipient_from(kind: str, data: dict[str, Any], home: str, deleted: bool) -> Recipient:
    """A mailbox, custom recipient or distribution list from its object data."""
    alias = data["alias"]
    display = data.get("display_name", alias)
    proxies = tuple(data.get("proxy_addresses", ()))
    if kind == "custom":
        return CustomRecipient(alias, display, home, proxies, data.get("target", ""), deleted)
    if kind == "dl":
        return DistributionList(alias, display, home, proxies, tuple(data.get("members", ())),
                                data.get("owner", ""), data.get("expansion_site", ""), deleted)
    return _mailbox_from(data, home, deleted)


def _site_from(data: dict[str, Any]) -> SiteObject:
    return SiteObject(data["name"], data.get("server", ""), data.get("organisation", ""),
                      data.get("smtp_address", ""), data.get("routing_address", ""),
                      data.get("hostname", ""), Protocols.from_data(data.get("protocols")))


class Directory:
    """One site's directory database (``<data>/directory.sqlite3``)."""

    def __init__(self, path: Path, site: str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.site = site
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)
        if "sig" not in {r[1] for r in self._db.execute("PRAGMA table_info(objects)").fetchall()}:
            self._db.execute("ALTER TABLE objects ADD COLUMN sig TEXT NOT NULL DEFAULT ''")  # older databases
        self._executor: ThreadPoolExecutor | None = None
        if self._meta("invocation") is None:
            self._set_meta("invocation", secrets.token_hex(8))
            self._set_meta("usn", "0")
        if self._meta("address_index") != ADDRESS_INDEX_VERSION:
            self._rebuild_address_index()
        self.listeners: list[Callable[[], None]] = []

    # ---------------------------------------------------------------- plumbing

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a directory method on the directory's own thread (never on the loop)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"dir-{self.site}")
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._db.close()

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                         (key, value))

    def _next_usn(self) -> int:
        usn = int(self._meta("usn") or "0") + 1
        self._set_meta("usn", str(usn))
        return usn

    @property
    def invocation(self) -> str:
        return self._meta("invocation") or ""

    @property
    def highest_usn(self) -> int:
        return int(self._meta("usn") or "0")

    def _notify(self) -> None:
        for listener in list(self.listeners):
            listener()

    def _transaction(self) -> _Tx:
        return _Tx(self._db)

    def transaction(self) -> _Tx:
        """``with directory.transaction():`` — several changes committed together
        (nestable; only the outermost level commits)."""
        return _Tx(self._db)

    def get_meta(self, key: str) -> str | None:
        return self._meta(key)

    def set_meta(self, key: str, value: str) -> None:
        self._set_meta(key, value)

    # ---------------------------------------------------------------- objects

    def _load(self, object_id: str) -> DirObject | None:
        row = self._db.execute(
            "SELECT object_id, kind, home_site, version, changed_at, origin, deleted, data, usn, sig "
            "FROM objects WHERE object_id=?", (object_id,)).fetchone()
        return _row_object(row) if row else None

    def _store(self, obj: DirObject) -> None:
        """Write obj (stamped with a fresh local USN) and re-index its addresses."""
        usn = self._next_usn()
        self._db.execute(
            "INSERT INTO objects(object_id, kind, home_site, version, changed_at, origin, deleted, data, usn, sig) "
            "VALUES(?,?,?,?,?,?,?,?,?,?) ON CONFLICT(object_id) DO UPDATE SET kind=excluded.kind, "
            "home_site=excluded.home_site, version=excluded.version, changed_at=excluded.changed_at, "
            "origin=excluded.origin, deleted=excluded.deleted, data=excluded.data, usn=excluded.usn, "
            "sig=excluded.sig",
            (obj.object_id, obj.kind, obj.home_site, obj.stamp.version, obj.stamp.changed_at,
             obj.stamp.origin, int(obj.deleted), json.dumps(obj.data, sort_keys=True), usn, obj.sig))
        self._index_addresses(obj)

    @staticmethod
    def _claims_of(obj: DirObject) -> dict[str, bool]:
        """Lookup key → is-primary, for the SMTP addresses a live mailbox, custom
        recipient or distribution list claims (one namespace: they never share one)."""
        claims: dict[str, bool] = {}
        if obj.kind not in RECIPIENT_KINDS or obj.deleted:
            return claims
        for proxy in obj.data.get("proxy_addresses", ()):
            try:
                p = parse_proxy(proxy)
                if p.type != "SMTP":
                    continue
                key = parse_address(p.address).key
            except AddressError:
                continue
            claims[key] = claims.get(key, False) or p.primary
        return claims

    def _index_addresses(self, obj: DirObject) -> None:
        """Replace obj's address claims and re-derive the owner of every address
        touched.  The owner depends only on the set of live claims (order-independent)."""
        before = [r[0] for r in self._db.execute(
            "SELECT address FROM address_claims WHERE object_id=?", (obj.object_id,)).fetchall()]
        self._db.execute("DELETE FROM address_claims WHERE object_id=?", (obj.object_id,))
        claims = self._claims_of(obj)
        self._db.executemany("INSERT INTO address_claims(address, object_id, is_primary) VALUES(?,?,?)",
                             [(k, obj.object_id, int(primary)) for k, primary in claims.items()])
        for key in set(before) | set(claims):
            self._resolve_owner(key)

    def _resolve_owner(self, key: str) -> None:
        row = self._db.execute(
            "SELECT object_id FROM address_claims WHERE address=? "
            "ORDER BY is_primary DESC, object_id ASC LIMIT 1", (key,)).fetchone()
        if row is None:
            self._db.execute("DELETE FROM proxy_addresses WHERE address=?", (key,))
        else:
            self._db.execute("INSERT OR REPLACE INTO proxy_addresses(address, object_id) VALUES(?, ?)",
                             (key, row[0]))

    def _rebuild_address_index(self) -> None:
        """Derive address_claims and proxy_addresses from the objects (new or older databases)."""
        with self._transaction():
            self._db.execute("DELETE FROM address_claims")
            self._db.execute("DELETE FROM proxy_addresses")
            rows = self._db.execute(
                "SELECT object_id, kind, home_site, version, changed_at, origin, deleted, data, usn, sig "
                "FROM objects WHERE kind IN ('mailbox', 'custom', 'dl') AND deleted=0").fetchall()
            for row in rows:
                obj = _row_object(row)
                self._db.executemany("INSERT INTO address_claims(address, object_id, is_primary) VALUES(?,?,?)",
                                     [(k, obj.object_id, int(p)) for k, p in self._claims_of(obj).items()])
            for (key,) in self._db.execute("SELECT DISTINCT address FROM address_claims").fetchall():
                self._resolve_owner(key)
            self._set_meta("address_index", ADDRESS_INDEX_VERSION)

    def address_conflicts(self) -> list[tuple[str, str, list[str]]]:
        """Addresses claimed by more than one live mailbox: (address, owner, the others)."""
        rows = self._db.execute(
            "SELECT c.address, c.object_id FROM address_claims c JOIN "
            "(SELECT address FROM address_claims GROUP BY address HAVING COUNT(*) > 1) d "
            "ON d.address = c.address ORDER BY c.address, c.object_id").fetchall()
        owners = dict(self._db.execute(
            "SELECT address, object_id FROM proxy_addresses WHERE address IN "
            "(SELECT address FROM address_claims GROUP BY address HAVING COUNT(*) > 1)").fetchall())
        grouped: dict[str, list[str]] = {}
        for address, object_id in rows:
            grouped.setdefault(address, []).append(object_id)
        return [(a, owners.get(a, ""), [o for o in ids if o != owners.get(a)]) for a, ids in grouped.items()]

    def _local_change(self, object_id: str, kind: str, data: dict[str, Any], deleted: bool = False) -> DirObject:
        old = self._load(object_id)
        version = (old.stamp.version + 1) if old else 1
        now = max(self.clock(), old.stamp.changed_at if old else 0.0)
        obj = DirObject(object_id, kind, self.site, Stamp(version, now, self.site), deleted, data)
        self._store(obj)
        return obj

    def would_change(self, obj: DirObject) -> bool:
        """Whether merging ``obj`` would change what is stored (it wins the join)."""
        current = self._load(obj.object_id)
        return current is None or merge_order(current) < merge_order(obj)

    def apply(self, objects: Iterable[DirObject]) -> tuple[int, int]:
        """Merge remote objects; returns (applied, ignored). Greatest stamp wins
        (``merge_order``), so applying twice or in any order gives the same result."""
        applied = ignored = 0
        with self._transaction():
            for obj in objects:
                current = self._load(obj.object_id)
                if current is not None and merge_order(current) >= merge_order(obj):
                    ignored += 1
                    continue
                self._store(obj)
                applied += 1
        if applied:
            self._notify()
        return applied, ignored

    def change_batches(self, usn: int, limit: int, *, max_bytes: int = 4 * 1024 * 1024
                       ) -> tuple[list[tuple[int, int, list[DirObject]]], int]:
        """Everything changed here above ``usn``, cut into batches of at most ``limit``
        objects (and about ``max_bytes`` of wire JSON), read as one consistent snapshot.

        Returns ``([(from_usn, to_usn, objects), ...], highest_usn)``: each batch
        covers the USN interval ``(from_usn, to_usn]`` completely — no other object
        here had a USN in it — and the last one ends at ``highest_usn``, so a
        requester may advance its high-water mark over every interval it received.
        There is always at least one batch (possibly empty)."""
        limit = max(1, limit)
        with self._transaction():
            highest = self.highest_usn
            rows = self._db.execute(
                "SELECT object_id, kind, home_site, version, changed_at, origin, deleted, data, usn, sig "
                "FROM objects WHERE usn > ? ORDER BY usn", (usn,)).fetchall()
        batches: list[tuple[int, int, list[DirObject]]] = []
        current: list[DirObject] = []
        size = 0
        start = usn
        for row in rows:
            obj = _row_object(row)
            cost = len(row[7]) + 200
            if current and (len(current) >= limit or size + cost > max_bytes):
                batches.append((start, current[-1].usn, current))
                start, current, size = current[-1].usn, [], 0
            current.append(obj)
            size += cost
        batches.append((start, max(highest, start, current[-1].usn if current else start), current))
        return batches, max(highest, usn)

    def all_objects(self) -> list[DirObject]:
        rows = self._db.execute(
            "SELECT object_id, kind, home_site, version, changed_at, origin, deleted, data, usn, sig "
            "FROM objects ORDER BY usn").fetchall()
        return [_row_object(r) for r in rows]

    def purge_tombstones(self, older_than: float = TOMBSTONE_LIFETIME) -> int:
        cutoff = self.clock() - older_than
        with self._transaction():
            cur = self._db.execute("DELETE FROM objects WHERE deleted=1 AND changed_at < ?", (cutoff,))
        return cur.rowcount

    # ---------------------------------------------------------------- provisioning

    @property
    def provisioned(self) -> bool:
        return self._meta("provisioned") == "1"

    def provision(self, *, organisation: str, server: str, site_domain: str, hostname: str,
                  mailboxes: Sequence[tuple[str, str, Sequence[str]] | tuple[str, str, Sequence[str], str]]
                  ) -> bool:
        """First start only: create the site object and the configured mailboxes
        (``(alias, display name, extra addresses[, home server])``).
        Returns False (and changes nothing) when already provisioned."""
        if self.provisioned:
            return False
        with self._transaction():
            site_address = "@" + site_domain
            self._local_change(site_id(self.site), "site", {
                "name": self.site, "server": server, "organisation": organisation,
                "smtp_address": site_address, "routing_address": site_address, "hostname": hostname})
            for alias, display, extra, *home in mailboxes:
                proxies = [f"SMTP:{alias}@{site_domain}"] + [p for p in extra]
                self._check_free(proxies, mailbox_id(self.site, alias))
                self._local_change(mailbox_id(self.site, alias), "mailbox",
                                   {"alias": alias, "display_name": display, "proxy_addresses": proxies,
                                    **({"home_server": home[0]} if home and home[0] else {})})
            self._set_meta("provisioned", "1")
        self._notify()
        return True

    # ---------------------------------------------------------------- mailboxes

    def find_entry(self, address: str) -> Recipient | None:
        """The live mailbox, custom recipient or distribution list that owns ``address``
        as any of its SMTP proxy addresses."""
        try:
            key = parse_address(address).key
        except AddressError:
            return None
        row = self._db.execute(
            "SELECT o.home_site, o.data, o.kind FROM proxy_addresses p JOIN objects o ON o.object_id = p.object_id "
            "WHERE p.address=? AND o.deleted=0", (key,)).fetchone()
        if not row:
            return None
        return recipient_from(row[2], json.loads(row[1]), row[0], False)

    def find_entries(self, addresses: Sequence[str]) -> list[Recipient | None]:
        return [self.find_entry(a) for a in addresses]

    def find_recipient(self, address: str) -> Mailbox | None:
        """The live mailbox that owns ``address``, as the router and the ingress see it.
        A distribution list that another site expands (KB Q185194) is seen as a
        mailbox homed at its expansion site, so the router sends its mail there; custom
        recipients and lists expanded here are not mailboxes (the queue's door replaces
        them by their targets and members before routing)."""
        entry = self.find_entry(address)
        if isinstance(entry, DistributionList) and not expands_here(entry, self.site):
            return Mailbox(entry.alias, entry.display_name, entry.expansion_site, entry.proxy_addresses)
        return entry if isinstance(entry, Mailbox) else None

    def find_recipients(self, addresses: Sequence[str]) -> list[Mailbox | None]:
        return [self.find_recipient(a) for a in addresses]

    def mailboxes(self, site: str | None = None, *, include_deleted: bool = False) -> list[Mailbox]:
        return [_mailbox_from(data, h, x) for h, data, x in self._objects_of("mailbox", site, include_deleted)]

    def _objects_of(self, kind: str, site: str | None,
                    include_deleted: bool) -> list[tuple[str, dict[str, Any], bool]]:
        """(home site, data, deleted) of every object of ``kind`` (of ``site``), by site and id."""
        sql = "SELECT home_site, data, deleted FROM objects WHERE kind=?"
        args: list[Any] = [kind]
        if site is not None:
            sql += " AND home_site=?"
            args.append(site)
        if not include_deleted:
            sql += " AND deleted=0"
        rows = self._db.execute(sql + " ORDER BY home_site, object_id", args).fetchall()
        return [(h, json.loads(d), bool(x)) for h, d, x in rows]

    def mailbox(self, alias: str, site: str | None = None) -> Mailbox | None:
        obj = self._load(mailbox_id(site or self.site, alias))
        if obj is None or obj.deleted:
            return None
        return _mailbox_from(obj.data, obj.home_site, False)

    def _claimed_by_other(self, key: str, object_id: str) -> str | None:
        """Another live mailbox that claims the address (owner or not), if any."""
        row = self._db.execute(
            "SELECT object_id FROM address_claims WHERE address=? AND object_id<>? "
            "ORDER BY is_primary DESC, object_id ASC LIMIT 1", (key, object_id)).fetchone()
        return row[0] if row else None

    def _check_free(self, proxies: Iterable[str], object_id: str) -> None:
        for p in proxies:
            try:
                proxy = parse_proxy(p)
                if proxy.type != "SMTP":
                    continue
                key = parse_address(proxy.address).key
            except AddressError as exc:
                raise DirectoryInputError(str(exc)) from None
            other = self._claimed_by_other(key, object_id)
            if other is not None:
                raise DirectoryError(f"address {proxy.address} already belongs to {other}")

    def add_mailbox(self, alias: str, display_name: str | None = None,
                    extra_addresses: Sequence[str] = (), home_server: str | None = None) -> Mailbox:
        """Create a mailbox homed at this site, addressed by the site's Site Addressing;
        ``home_server``: the server of the site holding its Maildir (a site of several servers)."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", alias):
            raise DirectoryInputError(f"{alias!r} is not a valid alias (letters, digits, . _ -)")
        existing = self._load(mailbox_id(self.site, alias))
        if existing is not None and not existing.deleted:
            raise DirectoryError(f"mailbox {alias} already exists at {self.site}")
        domain = self.site_addressing().lstrip("@")
        proxies = [f"SMTP:{alias}@{domain}"] + [p if ":" in p else f"smtp:{p}" for p in extra_addresses]
        with self._transaction():
            primary = self._unique_address(alias, domain, mailbox_id(self.site, alias))
            proxies[0] = f"SMTP:{primary}"
            self._check_free(proxies, mailbox_id(self.site, alias))
            obj = self._local_change(mailbox_id(self.site, alias), "mailbox",
                                     {"alias": alias, "display_name": display_name or alias,
                                      "proxy_addresses": proxies,
                                      **({"home_server": home_server} if home_server else {})})
        self._notify()
        return _mailbox_from(obj.data, self.site, False)

    # ---------------------------------------------------------------- custom recipients, lists

    def _alias_taken(self, alias: str) -> str | None:
        """The live object of this site (mailbox, custom recipient, list) with ``alias``."""
        for kind in RECIPIENT_KINDS:
            obj = self._load(recipient_object_id(kind, self.site, alias))
            if obj is not None and not obj.deleted:
                return f"{RECIPIENT_NAMES[kind]} {obj.data.get('alias', alias)}"
        return None

    def _new_recipient(self, kind: str, alias: str, display_name: str | None,
                       extra_addresses: Sequence[str], data: dict[str, Any]) -> Recipient:
        """Create a custom recipient or list homed here, addressed like a mailbox: its
        primary ``alias@`` the Site Addressing domain (the company domain once the site
        address is rewritten, KB Q258203), no address another object has."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", alias) or ".." in alias:
            raise DirectoryInputError(f"{alias!r} is not a valid alias (letters, digits, . _ -)")
        if display_name is not None and (len(display_name) > 256 or any(ord(c) < 32 for c in display_name)):
            raise DirectoryInputError("the display name must be at most 256 printable characters")
        domain = self.site_addressing().lstrip("@")
        object_id = recipient_object_id(kind, self.site, alias)
        with self._transaction():
            taken = self._alias_taken(alias)
            if taken is not None:
                raise DirectoryError(f"alias {alias} is taken at {self.site} by {taken}")
            proxies = [f"SMTP:{self._unique_address(alias, domain, object_id)}"]
            for p in extra_addresses:
                text = p if ":" in p else f"smtp:{p}"
                try:
                    parse_address(parse_proxy(text).address)
                except AddressError as exc:
                    raise DirectoryInputError(f"{p!r} is not an address: {exc}") from None
                proxies.append(text)
            self._check_free(proxies, object_id)
            target = data.get("target")
            if target and parse_address(target).key in {parse_address(parse_proxy(p).address).key for p in proxies
                                                        if parse_proxy(p).type == "SMTP"}:
                raise DirectoryInputError(f"the target {target} is one of the custom recipient's own addresses")
            obj = self._local_change(object_id, kind, {"alias": alias, "display_name": (display_name or alias).strip()
                                                      or alias, "proxy_addresses": proxies, **data})
        self._notify()
        return recipient_from(kind, obj.data, self.site, False)

    @staticmethod
    def _address(what: str, address: str) -> str:
        text = address.strip()
        text = text.split(":", 1)[1] if text.lower().startswith("smtp:") else text
        try:
            parse_address(text)
        except AddressError as exc:
            raise DirectoryInputError(f"{what} {address!r} is not an SMTP address: {exc}") from None
        return text

    def add_custom_recipient(self, alias: str, target: str, display_name: str | None = None,
                             extra_addresses: Sequence[str] = ()) -> CustomRecipient:
        """A custom recipient homed here: mail to its addresses goes to ``target``
        (KB Q258203).  It replicates like a mailbox."""
        entry = self._new_recipient("custom", alias, display_name, extra_addresses,
                                    {"target": self._address("target", target)})
        assert isinstance(entry, CustomRecipient)
        return entry

    def add_distribution_list(self, alias: str, members: Sequence[str] = (), display_name: str | None = None, *,
                              owner: str = "", expansion_site: str = "",
                              extra_addresses: Sequence[str] = ()) -> DistributionList:
        """A distribution list homed here (KB Q185194): ``members`` by address (mailboxes,
        custom recipients, other lists); ``owner`` gets the NDRs for its members (""
        = the sender); ``expansion_site`` expands it ("" = any site)."""
        entry = self._new_recipient("dl", alias, display_name, extra_addresses,
                                    self._list_data(members, owner, expansion_site))
        assert isinstance(entry, DistributionList)
        return entry

    def _list_data(self, members: Sequence[str], owner: str, expansion_site: str) -> dict[str, Any]:
        seen: dict[str, str] = {}
        for m in members:
            text = self._address("member", m)
            seen.setdefault(parse_address(text).key, text)
        if len(seen) > 5000:
            raise DirectoryInputError("a list has at most 5000 members")
        data: dict[str, Any] = {"members": list(seen.values())}
        if owner:
            data["owner"] = self._address("owner", owner)
        if expansion_site:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", expansion_site):
                raise DirectoryInputError(f"{expansion_site!r} is not a site name")
            data["expansion_site"] = expansion_site
        return data

    def set_distribution_list(self, alias: str, *, members: Sequence[str] | None = None,
                              add: Sequence[str] = (), remove: Sequence[str] = (), owner: str | None = None,
                              expansion_site: str | None = None) -> DistributionList:
        """Change a local list: its members (replaced, or some added/removed), owner
        ("" clears it) or expansion site ("" = any site).  Replicates with it."""
        obj = self._load(recipient_object_id("dl", self.site, alias))
        if obj is None or obj.deleted:
            raise DirectoryNotFound(f"no distribution list {alias} at {self.site}")
        current = list(obj.data.get("members", [])) if members is None else list(members)
        gone = {parse_address(self._address("member", r)).key for r in remove}
        current = [m for m in current + [self._address("member", a) for a in add]
                   if parse_address(m).key not in gone]
        data = {k: v for k, v in obj.data.items() if k not in ("members", "owner", "expansion_site")}
        data.update(self._list_data(current, obj.data.get("owner", "") if owner is None else owner,
                                    obj.data.get("expansion_site", "") if expansion_site is None else expansion_site))
        if data != obj.data:
            with self._transaction():
                obj = self._local_change(obj.object_id, "dl", data)
            self._notify()
        entry = recipient_from("dl", obj.data, self.site, False)
        assert isinstance(entry, DistributionList)
        return entry

    def delete_recipient(self, kind: str, alias: str) -> None:
        """Delete a local custom recipient or list (a tombstone that replicates)."""
        obj = self._load(recipient_object_id(kind, self.site, alias))
        if obj is None or obj.deleted:
            raise DirectoryNotFound(f"no {RECIPIENT_NAMES.get(kind, kind)} {alias} at {self.site}")
        with self._transaction():
            self._local_change(obj.object_id, kind, dict(obj.data), deleted=True)
        self._notify()

    def recipients(self, kind: str, site: str | None = None, *, include_deleted: bool = False) -> list[Recipient]:
        """The custom recipients (``custom``) or lists (``dl``) of every site, or of ``site``."""
        return [recipient_from(kind, data, h, x) for h, data, x in self._objects_of(kind, site, include_deleted)]

    def ensure_configured(self, customs: Sequence[tuple[str, str, str, Sequence[str]]],
                          lists: Sequence[tuple[str, str, Sequence[str], str, str, Sequence[str]]]) -> list[str]:
        """Create the site file's ``[[custom_recipients]]`` and ``[[distribution_lists]]``
        that the directory has never had (once deleted, they stay deleted, as a
        provisioned mailbox does); returns the aliases created (or why one was not)."""
        created = []
        for alias, display, target, extra in customs:
            if self._load(recipient_object_id("custom", self.site, alias)) is None:
                created.append(self._configured(alias, functools.partial(
                    self.add_custom_recipient, alias, target, display, extra)))
        for alias, display, members, owner, expansion_site, extra in lists:
            if self._load(recipient_object_id("dl", self.site, alias)) is None:
                created.append(self._configured(alias, functools.partial(
                    self.add_distribution_list, alias, members, display, owner=owner,
                    expansion_site=expansion_site, extra_addresses=extra)))
        return created

    @staticmethod
    def _configured(alias: str, create: Callable[[], Any]) -> str:
        try:
            create()
        except DirectoryError as exc:
            return f"{alias}: not created: {exc}"
        return alias

    def delete_mailbox(self, alias: str) -> None:
        obj = self._load(mailbox_id(self.site, alias))
        if obj is None or obj.deleted:
            raise DirectoryNotFound(f"no mailbox {alias} at {self.site}")
        with self._transaction():
            self._db.execute("DELETE FROM credentials WHERE object_id=?", (obj.object_id,))
            data = {k: v for k, v in obj.data.items() if k != "password_hash"}
            self._local_change(obj.object_id, "mailbox", data, deleted=True)
        self._notify()

    def set_mailbox_properties(self, alias: str, *, display_name: str | None = None,
                               secondary: Sequence[str] | None = None) -> Mailbox:
        """A local mailbox's General page (display name) and E-mail Addresses page
        (the secondary SMTP proxies; the primary stays, Site Addressing owns it).
        None keeps a value; the change replicates with the mailbox."""
        obj = self._load(mailbox_id(self.site, alias))
        if obj is None or obj.deleted:
            raise DirectoryNotFound(f"no mailbox {alias} at {self.site}")
        data = dict(obj.data)
        if display_name is not None:
            if not display_name.strip() or len(display_name) > 256 or any(ord(c) < 32 for c in display_name):
                raise DirectoryInputError("the display name must be 1 to 256 printable characters")
            data["display_name"] = display_name.strip()
        if secondary is not None:
            proxies = [p for p in data.get("proxy_addresses", [])
                       if parse_proxy(p).primary or parse_proxy(p).type != "SMTP"]
            for address in secondary:
                text = address.strip()
                text = text.split(":", 1)[1] if text.lower().startswith("smtp:") else text
                try:
                    key = parse_address(text).key
                except AddressError as exc:
                    raise DirectoryInputError(f"{address!r} is not an SMTP address: {exc}") from None
                if any(parse_address(parse_proxy(p).address).key == key for p in proxies
                       if parse_proxy(p).type == "SMTP"):
                    continue  # the primary, or given twice
                proxies.append(f"smtp:{text}")
            data["proxy_addresses"] = proxies
        if data != obj.data:
            with self._transaction():
                self._check_free(data["proxy_addresses"], obj.object_id)
                obj = self._local_change(obj.object_id, "mailbox", data)
            self._notify()
        return _mailbox_from(obj.data, self.site, False)

    def set_sender_rules(self, alias: str, *, accept_from: Sequence[str] | None = None,
                         reject_from: Sequence[str] | None = None, filter_senders: Sequence[str] | None = None,
                         filter_action: str | None = None) -> Mailbox:
        """Change a local mailbox's Delivery Restrictions / Message Filter (a list given
        replaces the old one; None keeps it).  The change replicates with the mailbox."""
        obj = self._load(mailbox_id(self.site, alias))
        if obj is None or obj.deleted:
            raise DirectoryError(f"no mailbox {alias} at {self.site}")
        data = dict(obj.data)
        try:
            for key, value in (("accept_from", accept_from), ("reject_from", reject_from),
                               ("filter_senders", filter_senders)):
                if value is not None:
                    data[key] = list(check_entries(value))
                    if not data[key]:
                        del data[key]
        except ValueError as exc:
            raise DirectoryError(f"not a sender address or @domain: {exc}") from None
        if filter_action is not None:
            if filter_action not in FILTER_ACTIONS:
                raise DirectoryError(f"filter action must be one of {', '.join(FILTER_ACTIONS)}")
            data["filter_action"] = filter_action
        if data != obj.data:
            with self._transaction():
                obj = self._local_change(obj.object_id, "mailbox", data)
            self._notify()
        return _mailbox_from(obj.data, self.site, False)

    # ---------------------------------------------------------------- protocols (IMAP4, POP3)

    def set_mailbox_protocols(self, alias: str, changes: dict[str, bool | None]) -> Mailbox:
        """A local mailbox's Protocols settings: per protocol True, False or None (use
        the defaults); protocols not named keep their setting.  Replicates with it."""
        obj = self._load(mailbox_id(self.site, alias))
        if obj is None or obj.deleted:
            raise DirectoryNotFound(f"no mailbox {alias} at {self.site}")
        return _mailbox_from(self._change_protocols(obj, "mailbox", changes).data, self.site, False)

    def set_site_protocols(self, changes: dict[str, bool | None]) -> SiteObject:
        """This site's protocol defaults (the site's Protocols container); they replicate."""
        obj = self._load(site_id(self.site))
        if obj is None or obj.deleted:
            raise DirectoryError("this site is not provisioned")
        return _site_from(self._change_protocols(obj, "site", changes).data)

    def _change_protocols(self, obj: DirObject, kind: str, changes: dict[str, bool | None]) -> DirObject:
        """``obj`` with its Protocols settings changed (a local change when they differ)."""
        data = dict(obj.data)
        data["protocols"] = _changed_protocols(data.get("protocols"), changes)
        if not data["protocols"]:
            del data["protocols"]
        if data != obj.data:
            with self._transaction():
                obj = self._local_change(obj.object_id, kind, data)
            self._notify()
        return obj

    # ---------------------------------------------------------------- credentials

    def set_password_hash(self, alias: str, password_hash: str, *, replicate: bool = False) -> None:
        """Store a local mailbox's password hash.  Kept in this site's ``credentials``
        table only; with ``replicate`` (the organisation allows it) also in the
        mailbox object, so the hash replicates with it; without, any replicated copy
        is removed from the object."""
        object_id = mailbox_id(self.site, alias)
        obj = self._load(object_id)
        if obj is None or obj.deleted:
            raise DirectoryError(f"no mailbox {alias} at {self.site}")
        with self._transaction():
            self._db.execute(
                "INSERT INTO credentials(object_id, hash, changed_at) VALUES(?,?,?) ON CONFLICT(object_id) "
                "DO UPDATE SET hash=excluded.hash, changed_at=excluded.changed_at",
                (object_id, password_hash, self.clock()))
            data = dict(obj.data)
            if replicate:
                data["password_hash"] = password_hash
            else:
                data.pop("password_hash", None)
            if data != obj.data:
                self._local_change(object_id, "mailbox", data)
        self._notify()

    def ensure_password_hash(self, alias: str, password_hash: str, *, replicate: bool = False) -> bool:
        """Set the hash only when the local mailbox has none yet; True when set."""
        row = self._db.execute("SELECT 1 FROM credentials WHERE object_id=?",
                               (mailbox_id(self.site, alias),)).fetchone()
        if row is not None or self.mailbox(alias) is None:
            return False
        self.set_password_hash(alias, password_hash, replicate=replicate)
        return True

    def credentials_since(self, changed_after: float) -> list[tuple[str, str, float]]:
        """(object id, hash, changed at) of this site's passwords set after ``changed_after``:
        what the site's other servers pull (intra-site replication)."""
        return [(r[0], r[1], float(r[2])) for r in self._db.execute(
            "SELECT object_id, hash, changed_at FROM credentials WHERE changed_at > ? ORDER BY changed_at",
            (changed_after,)).fetchall()]

    @property
    def credentials_mark(self) -> float:
        """When a password was last set here (0: never)."""
        row = self._db.execute("SELECT MAX(changed_at) FROM credentials").fetchone()
        return float(row[0] or 0.0)

    def merge_credentials(self, rows: Iterable[tuple[str, str, float]]) -> int:
        """Passwords set on another server of the site: the later one wins (equal times:
        the greater hash, so every server keeps the same); returns how many changed."""
        changed = 0
        with self._transaction():
            for object_id, password_hash, changed_at in rows:
                if not object_id.startswith(f"mailbox:{self.site}:"):
                    continue  # only this site's mailboxes have passwords here
                row = self._db.execute("SELECT hash, changed_at FROM credentials WHERE object_id=?",
                                       (object_id,)).fetchone()
                if row is not None and (float(row[1]), row[0]) >= (float(changed_at), password_hash):
                    continue
                self._db.execute(
                    "INSERT INTO credentials(object_id, hash, changed_at) VALUES(?,?,?) ON CONFLICT(object_id) "
                    "DO UPDATE SET hash=excluded.hash, changed_at=excluded.changed_at",
                    (object_id, password_hash, float(changed_at)))
                changed += 1
        return changed

    def has_password(self, alias: str) -> bool:
        return self._db.execute("SELECT 1 FROM credentials WHERE object_id=?",
                                (mailbox_id(self.site, alias),)).fetchone() is not None

    def credential(self, login: str, *, replicated: bool = False) -> tuple[Mailbox, str] | None:
        """The mailbox a login names (a local alias, or any of a mailbox's SMTP
        addresses) and its password hash; None when there is no such account.
        ``replicated``: also accept hashes that came with replicated mailboxes."""
        if "@" in login:
            try:
                key = parse_address(login).key
            except AddressError:
                return None
            row = self._db.execute("SELECT object_id FROM proxy_addresses WHERE address=?", (key,)).fetchone()
            if row is None:
                return None
            object_id = row[0]
        else:
            object_id = mailbox_id(self.site, login)
        obj = self._load(object_id)
        if obj is None or obj.deleted or obj.kind != "mailbox":
            return None
        mbx = _mailbox_from(obj.data, obj.home_site, False)
        row = self._db.execute("SELECT hash FROM credentials WHERE object_id=?", (object_id,)).fetchone()
        if row is not None:
            return mbx, row[0]
        replica = obj.data.get("password_hash")
        if replicated and isinstance(replica, str):
            return mbx, replica
        return None

    # ---------------------------------------------------------------- sites / addressing

    def sites(self) -> list[SiteObject]:
        rows = self._db.execute("SELECT data FROM objects WHERE kind='site' AND deleted=0 ORDER BY object_id").fetchall()
        return [_site_from(json.loads(r[0])) for r in rows]

    def site_object(self, name: str | None = None) -> SiteObject | None:
        obj = self._load(site_id(name or self.site))
        return _site_from(obj.data) if obj and not obj.deleted else None

    def site_addressing(self, name: str | None = None) -> str:
        site = self.site_object(name)
        if site is None:
            raise DirectoryError(f"site {name or self.site} is not in the directory (not provisioned?)")
        return site.smtp_address

    def _unique_address(self, alias: str, domain: str, object_id: str) -> str:
        """``alias@domain``, or ``alias2@domain``, ``alias3``… when another live
        mailbox claims it (Exchange's non-unique address substitution, event 2053)."""
        n = 1
        while True:
            candidate = f"{alias}{'' if n == 1 else n}@{domain}"
            if self._claimed_by_other(parse_address(candidate).key, object_id) is None:
                return candidate
            n += 1

    def set_site_addressing(self, smtp_address: str, *, update_mailboxes: bool,
                            keep_old: bool = True) -> BulkReport:
        """Change this site's SMTP Site Addressing; optionally re-address every local
        mailbox (new primary ``alias@new``; the old primary kept as secondary or dropped)."""
        new_domain = site_addressing_domain(smtp_address)
        site = self._load(site_id(self.site))
        if site is None:
            raise DirectoryError("this site is not provisioned")
        scanned = updated = failed = 0
        substitutes: list[tuple[str, str]] = []
        with self._transaction():
            data = dict(site.data)
            data["smtp_address"] = "@" + new_domain
            self._local_change(site.object_id, "site", data)
            if update_mailboxes:  # custom recipients and lists are addressed like mailboxes
                for mbx in [*self.mailboxes(self.site), *self.recipients("custom", self.site),
                            *self.recipients("dl", self.site)]:
                    scanned += 1
                    kind = "custom" if isinstance(mbx, CustomRecipient) else (
                        "dl" if isinstance(mbx, DistributionList) else "mailbox")
                    object_id = recipient_object_id(kind, self.site, mbx.alias)
                    old_primary = mbx.primary_address
                    if old_primary and parse_address(old_primary).domain == new_domain:
                        continue
                    try:
                        new_primary = self._unique_address(mbx.alias, new_domain, object_id)
                    except AddressError:
                        failed += 1
                        continue
                    if new_primary.split("@")[0] != mbx.alias:
                        substitutes.append((mbx.alias, new_primary))
                    proxies = [f"SMTP:{new_primary}"]
                    for p in mbx.proxy_addresses:
                        proxy = parse_proxy(p)
                        if proxy.type == "SMTP" and proxy.address.lower() == new_primary.lower():
                            continue
                        if proxy.type == "SMTP" and proxy.primary:
                            if keep_old:
                                proxies.append(f"smtp:{proxy.address}")
                            continue
                        proxies.append(p)
                    obj = self._load(object_id)
                    assert obj is not None
                    self._local_change(object_id, kind, {**obj.data, "proxy_addresses": proxies})
                    updated += 1
        self._notify()
        return BulkReport(scanned, updated, failed, tuple(substitutes))

    # ---------------------------------------------------------------- replication state

    def peer_state(self, site: str) -> dict[str, Any]:
        row = self._db.execute(
            "SELECT site, invocation, high_water, ranges, last_request, last_reply, last_error, applied "
            "FROM peers WHERE site=?", (site,)).fetchone()
        if not row:
            return {"site": site, "invocation": "", "high_water": 0, "ranges": [], "last_request": None,
                    "last_reply": None, "last_error": None, "applied": 0}
        return {"site": row[0], "invocation": row[1], "high_water": row[2], "ranges": json.loads(row[3]),
                "last_request": row[4], "last_reply": row[5], "last_error": row[6], "applied": row[7]}

    def peers(self) -> list[dict[str, Any]]:
        return [self.peer_state(r[0]) for r in self._db.execute("SELECT site FROM peers ORDER BY site").fetchall()]

    def save_peer_state(self, state: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT INTO peers(site, invocation, high_water, ranges, last_request, last_reply, last_error, applied) "
            "VALUES(?,?,?,?,?,?,?,?) ON CONFLICT(site) DO UPDATE SET invocation=excluded.invocation, "
            "high_water=excluded.high_water, ranges=excluded.ranges, last_request=excluded.last_request, "
            "last_reply=excluded.last_reply, last_error=excluded.last_error, applied=excluded.applied",
            (state["site"], state["invocation"], state["high_water"], json.dumps(state["ranges"]),
             state["last_request"], state["last_reply"], state["last_error"], state["applied"]))

    def seen_message(self, message_id: str) -> bool:
        """Whether a replication message id was recorded by ``remember_message``."""
        return self._db.execute("SELECT 1 FROM seen_messages WHERE message_id=?", (message_id,)).fetchone() is not None

    def remember_message(self, message_id: str, max_age: float) -> bool:
        """Record a replication message id; False when it was seen already (replay)."""
        now = self.clock()
        with self._transaction():
            self._db.execute("DELETE FROM seen_messages WHERE seen_at < ?", (now - max_age,))
            try:
                self._db.execute("INSERT INTO seen_messages(message_id, seen_at) VALUES(?, ?)", (message_id, now))
            except sqlite3.IntegrityError:
                return False
        return True


    def remember_sent(self, message_id: str, peer: str, max_age: float) -> None:
        """A replication message this site sent (an NDR about it is believed)."""
        now = self.clock()
        with self._transaction():
            self._db.execute("DELETE FROM sent_messages WHERE sent_at < ?", (now - max_age,))
            self._db.execute("INSERT OR REPLACE INTO sent_messages(message_id, peer, sent_at) VALUES(?,?,?)",
                             (message_id.lower(), peer, now))

    def sent_to(self, message_id: str) -> str | None:
        row = self._db.execute("SELECT peer FROM sent_messages WHERE message_id=?", (message_id.lower(),)).fetchone()
        return row[0] if row else None

    def count_rejection(self, reason: str) -> None:
        self._db.execute("INSERT INTO rejections(reason, count) VALUES(?, 1) "
                         "ON CONFLICT(reason) DO UPDATE SET count = count + 1", (reason,))

    def rejection_counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT reason, count FROM rejections").fetchall())


def _changed_protocols(current: Any, changes: dict[str, bool | None]) -> dict[str, bool]:
    """``current`` protocol data with ``changes`` applied (None removes a setting)."""
    known = ("imap4", "pop3")
    data = Protocols.from_data(current).as_data()
    for protocol, value in changes.items():
        if protocol not in known:
            raise DirectoryInputError(f"unknown protocol {protocol!r} (imap4 or pop3)")
        if value is None:
            data.pop(protocol, None)
        else:
            data[protocol] = bool(value)
    return data


class _Tx:
    """BEGIN IMMEDIATE … COMMIT, nestable (inner levels are no-ops)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.outer = False

    def __enter__(self) -> _Tx:
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
            self.outer = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.outer:
            return
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")


def _row_object(row: Sequence[Any]) -> DirObject:
    return DirObject(row[0], row[1], row[2], Stamp(row[3], row[4], row[5]), bool(row[6]), json.loads(row[7]), row[8],
                     sig=row[9] if len(row) > 9 else "")
