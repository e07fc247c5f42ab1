"""Directory objects as values: mailboxes, sites and their replicated form (no I/O).

``Directory`` (SQLite) stores them, replication carries ``DirObject`` in dirsync
messages, the router and the KCC decide with ``Mailbox`` and ``SiteObject``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imsrelay.model.addresses import parse_proxy

RECIPIENT_KINDS = ("mailbox", "custom", "dl")  # the directory objects that own SMTP addresses
RECIPIENT_NAMES = {"mailbox": "mailbox", "custom": "custom recipient", "dl": "distribution list"}
DIRSYNC_LOCAL = "dirsync"  # the local part of every site's directory service address (dirsync@domain)
# the local part of every site's system attendant address (attendant@domain): it answers the
# Link Monitor's pings of other sites and receives this site's replies and NDRs (KB Q246674)
ATTENDANT_LOCAL = "attendant"


@dataclass(frozen=True)
class SenderRules:
    """A mailbox's Delivery Restrictions and Message Filter (they replicate with it)."""

    accept_from: tuple[str, ...] = ()
    reject_from: tuple[str, ...] = ()
    filter_senders: tuple[str, ...] = ()
    filter_action: str = "turf"


@dataclass(frozen=True)
class Protocols:
    """Protocol settings as Exchange 5.5's Protocols tabs keep them (site, server,
    mailbox; Q233081): per protocol enabled (True), disabled (False) or unset (None:
    use the defaults of the level above).  Kept in an object's data as
    ``{"protocols": {"imap4": true, ...}}`` (unset ones left out)."""

    imap4: bool | None = None
    pop3: bool | None = None

    def get(self, protocol: str) -> bool | None:
        if protocol == "imap4":
            return self.imap4
        if protocol == "pop3":
            return self.pop3
        raise ValueError(f"unknown protocol {protocol!r} (imap4 or pop3)")

    def as_data(self) -> dict[str, bool]:
        return {k: v for k, v in (("imap4", self.imap4), ("pop3", self.pop3)) if v is not None}

    @classmethod
    def from_data(cls, data: Any) -> Protocols:
        if not isinstance(data, dict):
            return cls()

        def flag(key: str) -> bool | None:
            value = data.get(key)
            return value if isinstance(value, bool) else None

        return cls(flag("imap4"), flag("pop3"))


@dataclass(frozen=True)
class Stamp:
    version: int
    changed_at: float
    origin: str

    def key(self) -> tuple[int, float, str]:
        return (self.version, self.changed_at, self.origin)


@dataclass(frozen=True)
class DirObject:
    """One replicated directory object, as stored and as carried in dirsync messages."""

    object_id: str
    kind: str  # "mailbox" | "custom" | "dl" | "site" (RECIPIENT_KINDS and "site")
    home_site: str
    stamp: Stamp
    deleted: bool
    data: dict[str, Any] = field(hash=False, compare=False)
    usn: int = 0
    sig: str = field(default="", hash=False, compare=False)  # the home site's Ed25519 signature, if any

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"id": self.object_id, "kind": self.kind, "home": self.home_site,
                "version": self.stamp.version, "changed_at": self.stamp.changed_at,
                "origin": self.stamp.origin, "deleted": self.deleted, "data": self.data}
        if self.sig:
            wire["sig"] = self.sig
        return wire

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> DirObject:
        kind = w["kind"]
        if kind not in (*RECIPIENT_KINDS, "site"):
            raise ValueError(f"unknown object kind {kind!r}")
        data = w["data"]
        if not isinstance(data, dict):
            raise ValueError("object data must be a mapping")
        return cls(str(w["id"]), kind, str(w["home"]),
                   Stamp(int(w["version"]), float(w["changed_at"]), str(w["origin"])),
                   bool(w["deleted"]), data, sig=str(w.get("sig", "")))


@dataclass(frozen=True)
class Mailbox:
    alias: str
    display_name: str
    home_site: str
    proxy_addresses: tuple[str, ...]
    deleted: bool = False
    sender_rules: SenderRules = SenderRules()  # Delivery Restrictions and Message Filter
    protocols: Protocols = Protocols()  # IMAP4 and POP3 for this mailbox (they replicate with it)
    home_server: str = ""  # the server of its home site holding its Maildir ("": the site's only server)

    @property
    def primary_address(self) -> str:
        for p in self.proxy_addresses:
            proxy = parse_proxy(p)
            if proxy.type == "SMTP" and proxy.primary:
                return proxy.address
        return ""

    @property
    def smtp_addresses(self) -> list[str]:
        return [parse_proxy(p).address for p in self.proxy_addresses if parse_proxy(p).type == "SMTP"]


def primary_smtp(proxy_addresses: tuple[str, ...]) -> str:
    """The primary SMTP address among proxy addresses ("" when none)."""
    return next((parse_proxy(p).address for p in proxy_addresses
                 if parse_proxy(p).type == "SMTP" and parse_proxy(p).primary), "")


@dataclass(frozen=True)
class CustomRecipient:
    """A custom recipient: a directory object for someone outside the organisation
    (KB Q258203: one SMTP namespace shared with a foreign system needs one per outside
    user).  It has the site's proxy addresses like a mailbox, and mail to any of them
    is redirected to ``target`` (the envelope recipient is rewritten, then routed as
    usual).  It replicates between sites like a mailbox."""

    alias: str
    display_name: str
    home_site: str
    proxy_addresses: tuple[str, ...]
    target: str  # the external address mail is redirected to, e.g. partner@example.net
    deleted: bool = False

    @property
    def primary_address(self) -> str:
        return primary_smtp(self.proxy_addresses)


@dataclass(frozen=True)
class DistributionList:
    """A distribution list (KB Q185194): members named by address (mailboxes, custom
    recipients, other lists); expanded at ``expansion_site`` ("" = wherever the mail
    first arrives); NDRs for members that cannot be reached go to ``owner`` when set,
    else to the sender (Exchange 5.5's "report to distribution list owner")."""

    alias: str
    display_name: str
    home_site: str
    proxy_addresses: tuple[str, ...]
    members: tuple[str, ...] = ()
    owner: str = ""  # an address; "" = NDRs go to the message's sender
    expansion_site: str = ""  # the site that expands it; "" = any site
    deleted: bool = False

    @property
    def primary_address(self) -> str:
        return primary_smtp(self.proxy_addresses)


Recipient = Mailbox | CustomRecipient | DistributionList  # whatever owns an SMTP address


@dataclass(frozen=True)
class SiteObject:
    name: str
    server: str
    organisation: str
    smtp_address: str  # Site Addressing: "@SiteA.microsoft.com" or "@microsoft.com"
    routing_address: str  # where IMS traffic for this site goes: "@SiteA.microsoft.com"
    hostname: str = ""
    protocols: Protocols = Protocols()  # the site's protocol defaults (the site's Protocols container)


@dataclass(frozen=True)
class BulkReport:
    """Result of a Site Addressing bulk update (Exchange events 2043/2044/2053)."""

    scanned: int
    updated: int
    failed: int
    substitutes: tuple[tuple[str, str], ...]  # (alias, the unique address chosen instead)
