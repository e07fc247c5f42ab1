"""Directory replication over SMTP: Exchange 5.5's Directory Replication Connectors.

Two halves, kept apart:

* **Pure builders and verifiers** (no I/O): ``build_request`` / ``build_updates``
  produce the payloads, ``render_message`` turns a payload into an RFC 5322 message
  signed with the organisation key (HMAC-SHA256), ``verify`` checks one received
  message and returns either a ``Dirsync`` (trustworthy payload, objects parsed) or a
  ``Rejection`` with a stable reason, ``advance_high_water`` moves a requester's
  high-water mark over contiguous USN coverage, ``bounce_info`` reads an NDR about
  one of our own replication messages.
* **The Replicator** (the I/O edge): sends requests on each connector's schedule, on
  start-up and on demand (Request Now), answers requests with updates in bounded
  batches, applies updates, and keeps per-peer state in the directory database.

A message, as it travels::

    From: dirsync@SiteA.microsoft.com
    To: dirsync@SiteB.microsoft.com
    Subject: Directory replication request SiteA -> SiteB
    X-IMS-Dirsync-Type: request
    X-IMS-Dirsync-Signature: hmac-sha256=<hex>
    Content-Type: application/json; charset=us-ascii
    Content-Transfer-Encoding: base64

    <base64 of canonical JSON: v, org, type, from_site, to_site, id, ts, ...>

The signature covers a fixed prefix naming the type, sites and organisation, then the
exact body bytes (which carry the same fields again).  Replication messages ride the
normal queue: durable, retried, visible as backlog while a peer is unreachable.  A
rejected message is logged (``replication.rejected``) and never applied; the queue
manager still marks it delivered to the directory service, so a forger never gets an
NDR.  Requests name the responder's invocation id as the requester knows it; a
responder whose database was rebuilt (new invocation) answers from USN 0, and a
requester that sees a new invocation in an update restarts its high-water mark.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.errors
import email.utils
import json
import re
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import Message
from typing import Any

from imsrelay.directory.keys import ReplicationKeyError, Trust, object_signing_bytes, trust_from
from imsrelay.directory.store import Directory
from imsrelay.model.addresses import AddressError, normalise_domain, parse_address
from imsrelay.model.envelope import Envelope, RecipientState, new_queue_id
from imsrelay.model.object_rules import object_problem
from imsrelay.model.objects import DIRSYNC_LOCAL, DirObject
from imsrelay.model.settings import SiteConfig, schedule_text
from imsrelay.routing.router import RoutingTable, site_routing_domain

PROTOCOL_VERSION = 1
REQUEST = "request"
UPDATE = "update"
TYPES = (REQUEST, UPDATE)
HEADER_TYPE = "X-IMS-Dirsync-Type"
HEADER_SIGNATURE = "X-IMS-Dirsync-Signature"
FUTURE_TOLERANCE = 300.0  # seconds a sender's clock may run ahead of ours
MAX_BATCH_BYTES = 4 * 1024 * 1024  # wire JSON per update message, whatever batch_size says

# Stable rejection reasons (logged, counted, documented in docs/events.md).
NOT_DIRSYNC = "not-dirsync"
UNSIGNED = "unsigned"
MALFORMED = "malformed"
FOREIGN_ORGANISATION = "foreign-organisation"
BAD_SIGNATURE = "bad-signature"
WRONG_SITE = "wrong-site"
STALE = "stale"
FUTURE = "future"
REPLAY = "replay"
FORGED_BOUNCE = "forged-bounce"
UNTRUSTED_SITE = "untrusted-site"
REFUSED_OBJECT = "refused-object"


class ReplicationError(Exception):
    """A replication operation that cannot be done (a clear one-line message)."""


# =========================================================================== pure


@dataclass(frozen=True)
class Dirsync:
    """A verified replication message."""

    type: str
    organisation: str
    from_site: str
    to_site: str
    message_id: str
    timestamp: float
    payload: dict[str, Any]
    objects: tuple[DirObject, ...] = ()

    @property
    def invocation(self) -> str:
        return str(self.payload.get("invocation", ""))


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str
    peer: str | None = None  # the site the message claims to come from, if readable
    message_id: str | None = None


@dataclass(frozen=True)
class Bounce:
    """An NDR about one of our replication messages (as it claims: the caller checks
    ``message_id`` against the messages it really sent)."""

    peer: str | None
    status: str
    diagnostic: str
    message_id: str | None = None


def dirsync_address(domain: str) -> str:
    return f"{DIRSYNC_LOCAL}@{domain}"


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def signed_bytes(body: bytes, *, type: str, from_site: str, to_site: str, organisation: str) -> bytes:
    """What a signature covers: the type, sites and organisation, then the body bytes."""
    return (f"imsrelay-dirsync-v{PROTOCOL_VERSION}\n{type}\n{from_site}\n{to_site}\n{organisation}\n".encode()
            + body)


def as_trust(key: str | Trust, site: str = "") -> Trust:
    return key if isinstance(key, Trust) else Trust(site, hmac_key=key)


def sign(key: str | Trust, body: bytes, *, type: str, from_site: str, to_site: str, organisation: str) -> str:
    """``hmac-sha256=<hex>`` with the organisation key, or ``ed25519=<base64>`` with
    this site's own key."""
    return as_trust(key).sign(signed_bytes(body, type=type, from_site=from_site, to_site=to_site,
                                           organisation=organisation))


def sign_own_objects(objects: Sequence[DirObject], trust: Trust, organisation: str) -> list[DirObject]:
    """With per-site keys, the objects homed at this site carry its signature
    (objects of other sites keep the signature their home gave them)."""
    if not trust.per_site:
        return list(objects)
    return [replace(o, sig=trust.sign(object_signing_bytes(organisation, replace(o, sig="").to_wire())))
            if o.home_site == trust.site else o for o in objects]


def object_signed_by_home(obj: DirObject, trust: Trust, organisation: str) -> bool:
    return not trust.per_site or (bool(obj.sig) and trust.check(
        obj.sig, obj.home_site, object_signing_bytes(organisation, obj.to_wire())))


def new_message_id() -> str:
    return secrets.token_hex(16)


def build_request(*, organisation: str, from_site: str, to_site: str, reply_to: str, since_usn: int,
                  invocation: str, full: bool, now: float, message_id: str | None = None) -> dict[str, Any]:
    """A request for "everything above ``since_usn``" of ``to_site``'s directory.
    ``invocation`` is the responder's invocation id as the requester knows it ('' = none);
    ``reply_to`` is the requester's routing domain (where the updates should go)."""
    return {"v": PROTOCOL_VERSION, "org": organisation, "type": REQUEST, "from_site": from_site,
            "to_site": to_site, "id": message_id or new_message_id(), "ts": now, "reply_to": reply_to,
            "since_usn": int(since_usn), "invocation": invocation, "full": bool(full)}


def build_updates(*, organisation: str, from_site: str, to_site: str, invocation: str, highest_usn: int,
                  since_usn: int, full: bool, in_reply_to: str,
                  batches: Sequence[tuple[int, int, Sequence[DirObject]]], now: float) -> list[dict[str, Any]]:
    """One update payload per batch; batch i covers USNs ``(from_usn, to_usn]`` completely."""
    out = []
    for i, (from_usn, to_usn, objects) in enumerate(batches, 1):
        out.append({"v": PROTOCOL_VERSION, "org": organisation, "type": UPDATE, "from_site": from_site,
                    "to_site": to_site, "id": new_message_id(), "ts": now, "in_reply_to": in_reply_to,
                    "invocation": invocation, "highest_usn": int(highest_usn), "since_usn": int(since_usn),
                    "full": bool(full),
                    "batch": {"index": i, "count": len(batches), "from_usn": int(from_usn), "to_usn": int(to_usn)},
                    "objects": [o.to_wire() for o in objects]})
    return out


def render_message(payload: dict[str, Any], *, key: str | Trust, from_domain: str, to_domain: str,
                   hostname: str) -> bytes:
    """The signed RFC 5322 message (CRLF line ends, lines of at most 78 octets)."""
    body = canonical_json(payload)
    signature = sign(key, body, type=payload["type"], from_site=payload["from_site"],
                     to_site=payload["to_site"], organisation=payload["org"])
    subject = f"Directory replication {payload['type']} {payload['from_site']} -> {payload['to_site']}"
    batch = payload.get("batch")
    if batch and batch.get("count", 1) > 1:
        subject += f" (batch {batch['index']} of {batch['count']})"
    date = datetime.fromtimestamp(float(payload["ts"]), UTC)
    headers = [
        f"From: {dirsync_address(from_domain)}",
        f"To: {dirsync_address(to_domain)}",
        f"Subject: {subject}",
        f"Date: {email.utils.format_datetime(date)}",
        f"Message-ID: <{payload['id']}.dirsync@{hostname}>",
        "MIME-Version: 1.0",
        "Content-Type: application/json; charset=us-ascii",
        "Content-Transfer-Encoding: base64",
        f"{HEADER_TYPE}: {payload['type']}",
        f"X-IMS-Dirsync-From-Site: {payload['from_site']}",
        f"X-IMS-Dirsync-To-Site: {payload['to_site']}",
        f"{HEADER_SIGNATURE}: {signature}",
    ]
    encoded = base64.b64encode(body)
    lines = [encoded[i:i + 76] for i in range(0, len(encoded), 76)]
    head = "\r\n".join(_fold(h) for h in headers)
    return (head + "\r\n\r\n").encode("ascii") + b"\r\n".join(lines) + b"\r\n"


def _fold(field: str) -> str:
    """Fold a long header field after its colon (RFC 5322 2.2.3: lines of 78 at most)."""
    if len(field) <= 78:
        return field
    name, _, value = field.partition(": ")
    return f"{name}:\r\n {value}"


def _header(msg: Message, name: str) -> str | None:
    value = msg.get(name)
    return None if value is None else " ".join(str(value).split())


def verify(message: bytes, *, key: str | Trust, organisation: str, site: str, now: float,
           max_age: float) -> Dirsync | Rejection:
    """Check one received message addressed to this site's directory service.

    Order: is it a replication message at all, signed, well-formed, of our
    organisation, correctly signed, for this site, fresh.  (Replay is checked by the
    caller against the database of message ids already seen.)  Never raises for what
    a message contains: anything the parsers refuse (an RFC 2231 charset the email
    package hands to the codecs as a tuple, a NUL; found by tests/test_fuzz.py) is ``MALFORMED``."""
    try:
        return _verify(message, key=key, organisation=organisation, site=site, now=now, max_age=max_age)
    except (ValueError, TypeError, LookupError, email.errors.MessageError) as exc:
        return Rejection(MALFORMED, f"unreadable: {exc!r}")


def _verify(message: bytes, *, key: str | Trust, organisation: str, site: str, now: float,
            max_age: float) -> Dirsync | Rejection:
    msg = message_from_bytes(message)
    type_header = _header(msg, HEADER_TYPE)
    if type_header is None:
        return Rejection(NOT_DIRSYNC, f"no {HEADER_TYPE} header")
    signature = _header(msg, HEADER_SIGNATURE)
    if not signature:
        return Rejection(UNSIGNED, f"no {HEADER_SIGNATURE} header")
    raw = msg.get_payload()
    if msg.is_multipart() or not isinstance(raw, str):
        return Rejection(MALFORMED, "the body is not a single base64 JSON part")
    try:
        body = base64.b64decode("".join(raw.split()), validate=True)
        payload = json.loads(body)
    except (binascii.Error, ValueError) as exc:
        return Rejection(MALFORMED, f"body is not base64 JSON: {exc}")
    if not isinstance(payload, dict):
        return Rejection(MALFORMED, "body is not a JSON object")
    peer = payload.get("from_site") if isinstance(payload.get("from_site"), str) else None
    mid = payload.get("id") if isinstance(payload.get("id"), str) else None
    try:
        fields = (str(payload["type"]), str(payload["org"]), str(payload["from_site"]),
                  str(payload["to_site"]), str(payload["id"]), float(payload["ts"]))
    except (KeyError, TypeError, ValueError) as exc:
        return Rejection(MALFORMED, f"missing or bad field {exc}", peer, mid)
    type_, org, from_site, to_site, message_id, ts = fields
    if type_ not in TYPES or type_ != type_header:
        return Rejection(MALFORMED, f"type {type_!r} (header says {type_header!r})", peer, mid)
    if not re.fullmatch(r"[0-9a-fA-F]{16,64}", message_id):
        return Rejection(MALFORMED, "bad message id", peer, mid)
    if org != organisation:
        return Rejection(FOREIGN_ORGANISATION, f"organisation {org!r} is not {organisation!r}", peer, mid)
    trust = as_trust(key, site)
    if not trust.knows(from_site):
        return Rejection(UNTRUSTED_SITE, f"no trusted public key for site {from_site!r}", peer, mid)
    data = signed_bytes(body, type=type_, from_site=from_site, to_site=to_site, organisation=org)
    if not trust.check(signature, from_site, data):
        return Rejection(BAD_SIGNATURE, f"the signature does not match {'the key of site ' + from_site if trust.per_site else 'the organisation key'}", peer, mid)
    if to_site != site:
        return Rejection(WRONG_SITE, f"addressed to site {to_site!r}, this is {site!r}", peer, mid)
    if ts < now - max_age:
        return Rejection(STALE, f"written {now - ts:.0f}s ago, older than replication.max_age "
                                f"({max_age:.0f}s)", peer, mid)
    if ts > now + FUTURE_TOLERANCE:
        return Rejection(FUTURE, f"dated {ts - now:.0f}s in the future", peer, mid)
    objects: tuple[DirObject, ...] = ()
    try:
        if type_ == REQUEST:
            int(payload["since_usn"])
            str(payload.get("invocation", ""))
            if payload.get("reply_to"):
                normalise_domain(str(payload["reply_to"]))
        else:
            batch = payload["batch"]
            int(batch["from_usn"]), int(batch["to_usn"]), int(payload["highest_usn"])
            if int(batch["from_usn"]) > int(batch["to_usn"]):
                raise ValueError("batch from_usn > to_usn")
            objects = tuple(DirObject.from_wire(w) for w in payload["objects"])
    except (KeyError, TypeError, ValueError, AddressError) as exc:
        return Rejection(MALFORMED, f"bad {type_} content: {exc!r}", peer, mid)
    return Dirsync(type_, org, from_site, to_site, message_id, ts, payload, objects)


def advance_high_water(high_water: int, ranges: Sequence[Sequence[int]], from_usn: int,
                       to_usn: int) -> tuple[int, list[list[int]]]:
    """Record that USNs ``(from_usn, to_usn]`` of a peer were received completely.

    The high-water mark moves only over contiguous coverage starting at it; ranges
    beyond a gap are kept (merged) until the gap is filled — batches may arrive in
    any order, any number of times.  Returns the new (high_water, ranges)."""
    spans = sorted([[int(a), int(b)] for a, b in ranges] + [[int(from_usn), int(to_usn)]])
    merged: list[list[int]] = []
    for a, b in spans:
        if b <= high_water:
            continue
        if a <= high_water:
            high_water = b
            continue
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    rest: list[list[int]] = []
    for a, b in merged:
        if a <= high_water:
            high_water = max(high_water, b)
        else:
            rest.append([a, b])
    return high_water, rest


def bounce_info(message: bytes) -> Bounce | None:
    """If ``message`` is a delivery status report about one of our replication
    messages, who it was for and why it failed (Q180401: a wrong routing address
    sends directory messages back as NDRs)."""
    msg = message_from_bytes(message)
    if msg.get_content_type() != "multipart/report":
        return None
    status, diagnostic, peer, ours = "", "", None, False
    message_id: str | None = None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/delivery-status":
            text = _part_text(part)
            m = re.search(r"^Status:\s*(\S+)", text, re.MULTILINE | re.IGNORECASE)
            status = status or (m.group(1) if m else "")
            m = re.search(r"^Diagnostic-Code:\s*(.+)$", text, re.MULTILINE | re.IGNORECASE)
            diagnostic = diagnostic or (m.group(1).strip() if m else "")
        elif ctype in ("text/rfc822-headers", "message/rfc822"):
            text = _part_text(part)
            if re.search(rf"^{HEADER_TYPE}:", text, re.MULTILINE | re.IGNORECASE):
                ours = True
                m = re.search(r"^X-IMS-Dirsync-To-Site:\s*(\S+)", text, re.MULTILINE | re.IGNORECASE)
                peer = m.group(1) if m else None
                m = re.search(r"^Message-ID:\s*<([0-9a-fA-F]{16,64})\.dirsync@", text, re.MULTILINE | re.IGNORECASE)
                message_id = m.group(1).lower() if m else None
    if not ours:
        return None
    return Bounce(peer, status or "5.0.0", diagnostic[:300], message_id)


def _part_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode("utf-8", "replace")
    inner = part.get_payload()
    if isinstance(inner, list):
        return "\n".join(p.as_string() if isinstance(p, Message) else str(p) for p in inner)
    return str(inner or "")


def sending_site(sender: str, table: RoutingTable) -> str | None:
    """The site of the organisation whose directory service ``sender`` is
    (``dirsync@`` its routing domain, through Connected Sites or Check Now), or None."""
    try:
        address = parse_address(sender)
    except AddressError:
        return None
    if address.local.lower() != DIRSYNC_LOCAL:
        return None
    for c in table.connected_sites:
        if c.routing_domain.lower() == address.domain:
            return c.name
    for name, domain in table.learned_sites:
        if domain.lower() == address.domain:
            return name
    return None


def unconfigured_peer_reply(sender: str, own_site: str, connectors: Sequence[str], table: RoutingTable) -> str | None:
    """The RCPT reply for replication mail from a site of the organisation this site
    has no Directory Replication Connector to, or None to accept it (pure).

    KB Q196927's NOTE: replication connectors set up at one site only give "a backlog
    of replication messages that cannot be sent to the remote sites that are not
    configured".  So the message is deferred (4xx): it waits in the sender's queue,
    counted as its backlog, and goes through on a retry once this site has a
    connector back.  Mail from no known site, and NDRs (null sender), are not held."""
    peer = sending_site(sender, table) if sender and sender != "<>" else None
    if peer is None or peer == own_site or peer in connectors:
        return None
    return (f"450 4.3.2 the directory service of {own_site} has no Directory Replication Connector to {peer} "
            "yet: replication mail waits until both sites are configured (KB Q196927)")


# =========================================================================== I/O edge


def trust_for(config: SiteConfig) -> Trust:
    """The site's replication trust from its configuration (per-site Ed25519 keys
    when ``replication.signing_key`` is set, else the organisation key)."""
    try:
        return trust_from(config.site, config.replication)
    except ReplicationKeyError as exc:
        raise ReplicationError(str(exc)) from None


class Replicator:
    """One site's directory replication: connectors, Request Now, request/update handling."""

    def __init__(self, config: SiteConfig, directory: Directory, *,
                 routing_table: Callable[[], Awaitable[RoutingTable]],
                 enqueue: Callable[[Envelope, bytes], Awaitable[None]],
                 queued: Callable[[], Iterable[Envelope]],
                 check_now: Callable[[], Awaitable[object]], log: Any,
                 clock: Callable[[], float]) -> None:
        """``routing_table``: the site's live routing inputs (where a peer's dirsync
        mail goes); ``enqueue``: the queue's door for messages the site writes itself;
        ``queued``: the envelopes in the queue (backlog per peer); ``check_now``: the
        site's Check Now, run on the KCC schedule."""
        self.config = config
        self.directory = directory
        self.settings = config.replication
        self._routing_table = routing_table
        self._enqueue = enqueue
        self._queued = queued
        self._check_now = check_now
        self._clock = clock
        self._key = trust_for(config)
        self.log = log.bind(component="replication")
        self.rejected: Counter[str] = Counter(directory.rejection_counts())  # kept across restarts
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if not self.config.bridgehead and self.settings.connectors:
            self.log.info("replication.not_bridgehead", server=self.config.server,
                          reason="another server of the site runs the Directory Replication Connectors "
                                 "(replication.bridgehead); this one gets other sites' objects by intra-site "
                                 "replication")
        for connector in self.settings.connectors:
            if connector.schedule is None or not self.config.bridgehead:
                continue  # "Never": only Request Now; or another server of the site is the bridgehead
            self._tasks.append(asyncio.create_task(
                self._connector_loop(connector.site, connector.schedule), name=f"dirsync-{connector.site}"))
        self._tasks.append(asyncio.create_task(self._kcc_loop(), name="kcc"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _connector_loop(self, peer: str, every: float) -> None:
        await asyncio.sleep(self.settings.startup_delay)
        while True:
            try:
                await self.request_now(peer)
            except ReplicationError as exc:
                self.log.warning("replication.request_failed", peer=peer, error=str(exc))
                await self._note_error(peer, str(exc))
            except Exception as exc:  # keep the schedule alive; the next round retries
                self.log.error("replication.request_failed", peer=peer, error=repr(exc), exc_info=exc)
            await asyncio.sleep(max(every, 1.0))

    async def _kcc_loop(self) -> None:
        await asyncio.sleep(self.settings.startup_delay)
        while True:
            try:
                await self._check_now()
                purged = await self.directory.run(self.directory.purge_tombstones)
                if purged:
                    self.log.info("directory.tombstones_purged", count=purged)
            except Exception as exc:
                self.log.error("kcc.failed", error=repr(exc), exc_info=exc)
            await asyncio.sleep(max(self.settings.kcc_interval, 1.0))

    # ------------------------------------------------------------ helpers

    def _now(self) -> float:
        return float(self._clock())

    async def peer_domain(self, peer: str) -> str | None:
        """The routing domain replication mail for ``peer`` goes to: Connected Sites,
        else a site learned by Check Now."""
        found = site_routing_domain(peer, await self._routing_table())
        return found[0] if found else None

    async def _note_error(self, peer: str, error: str) -> None:
        def save() -> None:
            with self.directory.transaction():
                state = self.directory.peer_state(peer)
                state["last_error"] = error
                self.directory.save_peer_state(state)

        await self.directory.run(save)

    async def _send(self, payload: dict[str, Any], to_domain: str, message: bytes) -> Envelope:
        recipient = dirsync_address(to_domain)
        env = Envelope(queue_id=new_queue_id(), sender=dirsync_address(self.config.site_domain),
                       recipients=[RecipientState(recipient, recipient)], received_at=self._now(),
                       client="", helo="", origin="dirsync",
                       extra={"dirsync": payload["type"], "peer": payload["to_site"], "message_id": payload["id"]})
        await self.directory.run(self.directory.remember_sent, payload["id"], payload["to_site"],
                                 self._seen_window)
        await self._enqueue(env, message)
        return env

    def _render(self, payload: dict[str, Any], to_domain: str) -> bytes:
        return render_message(payload, key=self._key, from_domain=self.config.site_domain,
                              to_domain=to_domain, hostname=self.config.hostname)

    # ------------------------------------------------------------ Request Now

    async def request_now(self, peer: str, *, full: bool = False) -> dict[str, Any]:
        """Ask ``peer`` for its changes: since our high-water mark ("Update only new
        and modified items"), or everything (``full``)."""
        if peer == self.config.site:
            raise ReplicationError(f"{peer} is this site: replication requests go to other sites")
        domain = await self.peer_domain(peer)
        if domain is None:
            raise ReplicationError(f"no routing address for site {peer}: add it to Connected Sites "
                                   "or run Check Now (imsrelay kcc check-now)")
        state = await self.directory.run(self.directory.peer_state, peer)
        since = 0 if full else int(state["high_water"])
        payload = build_request(organisation=self.config.organisation, from_site=self.config.site, to_site=peer,
                                reply_to=self.config.site_domain, since_usn=since,
                                invocation=state["invocation"], full=full, now=self._now())
        env = await self._send(payload, domain, self._render(payload, domain))

        def mark() -> None:
            with self.directory.transaction():
                s = self.directory.peer_state(peer)
                s["last_request"] = payload["ts"]
                self.directory.save_peer_state(s)

        await self.directory.run(mark)
        self.log.info("replication.request_sent", peer=peer, queue_id=env.queue_id, since_usn=since, full=full,
                      recipient=env.recipients[0].address, message_id=payload["id"])
        return {"site": peer, "queue_id": env.queue_id, "since_usn": since, "full": full,
                "recipient": env.recipients[0].address, "message_id": payload["id"]}

    # ------------------------------------------------------------ receiving

    async def handle_message(self, env: Envelope, message: bytes) -> None:
        """A message for this site's directory service. Never raises for bad input:
        a rejected message is logged and dropped (no NDR to a possible forger)."""
        result = await asyncio.to_thread(
            verify, message, key=self._key, organisation=self.config.organisation, site=self.config.site,
            now=self._now(), max_age=self.settings.max_age)
        if isinstance(result, Rejection):
            if result.reason == NOT_DIRSYNC:
                bounce = await asyncio.to_thread(bounce_info, message)
                if bounce is not None:
                    await self._handle_bounce(env, bounce)
                    return
            await self._reject(env, result)
            return
        # The id is recorded together with the work it stands for (an update: in the
        # same transaction as its objects; a request: once its answer is queued), so
        # a failure in between leaves the message to be retried, not lost as a "replay".
        if await self.directory.run(self.directory.seen_message, result.message_id):
            await self._replay(env, result)
            return
        if result.type == REQUEST:
            await self._answer(env, result)
            await self.directory.run(self.directory.remember_message, result.message_id, self._seen_window)
        else:
            await self._apply(env, result)

    @property
    def _seen_window(self) -> float:
        return self.settings.max_age + FUTURE_TOLERANCE

    async def _replay(self, env: Envelope, message: Dirsync) -> None:
        await self._reject(env, Rejection(REPLAY, "this message id was already processed", message.from_site,
                                          message.message_id))

    async def _reject(self, env: Envelope, rejection: Rejection) -> None:
        self.rejected[rejection.reason] += 1
        await self.directory.run(self.directory.count_rejection, rejection.reason)
        self.log.warning("replication.rejected", queue_id=env.queue_id, reason=rejection.reason,
                         detail=rejection.detail, peer=rejection.peer or "unknown",
                         sender=env.sender or "<>", client=env.client or "local",
                         message_id=rejection.message_id)

    async def _handle_bounce(self, env: Envelope, bounce: Bounce) -> None:
        """Believed only when it is a real NDR (null sender) about a message this site
        really sent (its id recorded at sending); the peer is the one we sent it to."""
        peer = None
        if env.sender == "" and bounce.message_id:
            peer = await self.directory.run(self.directory.sent_to, bounce.message_id)
        if peer is None:
            await self._reject(env, Rejection(FORGED_BOUNCE, "a delivery report about no replication message "
                                              "this site sent", bounce.peer, bounce.message_id))
            return
        diagnostic = re.sub(r"[^\x20-\x7e]", "?", bounce.diagnostic)
        status = bounce.status if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", bounce.status) else "5.0.0"
        self.log.warning("replication.ndr_received", queue_id=env.queue_id, peer=peer, status=status,
                         diagnostic=diagnostic)
        await self._note_error(peer, f"replication message returned as undeliverable: {status} {diagnostic}".strip())

    async def _answer(self, env: Envelope, request: Dirsync) -> None:
        peer = request.from_site
        domain = await self.peer_domain(peer) or str(request.payload.get("reply_to") or "")
        if not domain:
            await self._reject(env, Rejection(MALFORMED, f"no routing address for site {peer} and no reply_to",
                                              peer, request.message_id))
            return
        own_invocation = await self.directory.run(lambda: self.directory.invocation)
        since = int(request.payload["since_usn"])
        if request.invocation != own_invocation and since:
            self.log.info("replication.full_resync", peer=peer, queue_id=env.queue_id, since_usn=since,
                          reason="the request names another invocation of this directory")
            since = 0
        full = since == 0
        # keep each message well inside the SMTP size limit (base64 adds a third)
        max_bytes = min(MAX_BATCH_BYTES, max(64 * 1024, self.config.smtp.max_message_size // 2))
        batches, highest = await self.directory.run(self.directory.change_batches, since,
                                                    self.settings.batch_size, max_bytes=max_bytes)
        org = self.config.organisation

        def signed_batches() -> list[tuple[int, int, list[DirObject]]]:
            return [(a, b, sign_own_objects(objs, self._key, org)) for a, b, objs in batches]

        batches = await asyncio.to_thread(signed_batches)
        payloads = build_updates(organisation=self.config.organisation, from_site=self.config.site, to_site=peer,
                                 invocation=own_invocation, highest_usn=highest, since_usn=since, full=full,
                                 in_reply_to=request.message_id, batches=batches, now=self._now())
        messages = await asyncio.to_thread(lambda: [self._render(p, domain) for p in payloads])
        envs = await asyncio.gather(*(self._send(p, domain, m) for p, m in zip(payloads, messages, strict=True)))
        self.log.info("replication.request_answered", peer=peer, queue_id=env.queue_id, since_usn=since,
                      full=full, highest_usn=highest, batches=len(payloads),
                      objects=sum(len(b[2]) for b in batches), reply_queue_ids=[e.queue_id for e in envs],
                      recipient=dirsync_address(domain))

    async def _apply(self, env: Envelope, update: Dirsync) -> None:
        peer = update.from_site
        batch = update.payload["batch"]
        now = self._now()
        org = self.config.organisation
        problems = [(o, object_problem(o, receiving_site=self.config.site) or (
            None if object_signed_by_home(o, self._key, org)
            else f"{o.object_id} does not carry a valid signature of its home site {o.home_site}"))
            for o in update.objects]
        valid = [o for o, why in problems if why is None and o.home_site != self.config.site]
        own = [o for o, why in problems if why is None and o.home_site == self.config.site]
        for _, why in problems:
            if why is not None:  # the rest of the batch still applies; its USNs count as received
                await self._reject(env, Rejection(REFUSED_OBJECT, why, peer, update.message_id))

        def apply_sync() -> dict[str, Any]:
            switched_key = f"replication.{peer}.invocation_since"
            with self.directory.transaction():
                if not self.directory.remember_message(update.message_id, self._seen_window):
                    return {"replay": True}
                changed_own = [o for o in own if self.directory.would_change(o)]
                applied, ignored = self.directory.apply(valid)
                ignored += len(own)
                state = self.directory.peer_state(peer)
                reset = outdated = False
                if state["invocation"] != update.invocation:
                    switched = float(self.directory.get_meta(switched_key) or 0.0)
                    if state["invocation"] and update.timestamp < switched:
                        # a late batch written by the peer's previous database: its objects
                        # are merged (harmless), its USNs mean nothing any more
                        outdated = True
                    else:
                        reset = bool(state["invocation"])
                        state["invocation"], state["high_water"], state["ranges"] = update.invocation, 0, []
                        self.directory.set_meta(switched_key, repr(update.timestamp))
                if not outdated:
                    hw, ranges = advance_high_water(state["high_water"], state["ranges"],
                                                    int(batch["from_usn"]), int(batch["to_usn"]))
                    state.update(high_water=hw, ranges=ranges)
                state.update(last_reply=now, last_error=None, applied=int(state["applied"]) + applied)
                self.directory.save_peer_state(state)
            return {"applied": applied, "ignored": ignored, "high_water": state["high_water"], "own": changed_own,
                    "gaps": len(state["ranges"]), "reset": reset, "outdated": outdated}

        result = await self.directory.run(apply_sync)
        if result.get("replay"):
            await self._replay(env, update)
            return
        for o in result["own"]:  # a peer tried to change an object homed here
            await self._reject(env, Rejection(REFUSED_OBJECT, f"{o.object_id} is homed at this site: only "
                                              f"{self.config.site} changes it", peer, update.message_id))
        if result["reset"]:
            self.log.info("replication.invocation_changed", peer=peer, queue_id=env.queue_id,
                          invocation=update.invocation, reason="the peer's directory was rebuilt: high-water reset")
        self.log.info("replication.applied", peer=peer, queue_id=env.queue_id, applied=result["applied"],
                      ignored=result["ignored"], from_usn=batch["from_usn"], to_usn=batch["to_usn"],
                      batch=f"{batch['index']}/{batch['count']}", high_water=result["high_water"],
                      pending_ranges=result["gaps"], outdated_invocation=result["outdated"])

    # ------------------------------------------------------------ status

    def backlog(self, domain: str | None) -> int:
        """Queued messages (with a recipient still pending) for ``dirsync@domain``."""
        if not domain:
            return 0
        try:
            key = parse_address(dirsync_address(domain)).key
        except AddressError:
            return 0
        count = 0
        for env in list(self._queued()):
            for r in env.pending:
                try:
                    if parse_address(r.address).key == key:
                        count += 1
                        break
                except AddressError:
                    continue
        return count

    async def status(self) -> dict[str, Any]:
        states = {p["site"]: p for p in await self.directory.run(self.directory.peers)}
        schedules = {c.site: c.schedule for c in self.settings.connectors}
        invocation, highest = await self.directory.run(
            lambda: (self.directory.invocation, self.directory.highest_usn))
        peers = []
        for name in sorted(set(schedules) | set(states)):
            known = states.get(name)
            state = known if known is not None else await self.directory.run(self.directory.peer_state, name)
            domain = await self.peer_domain(name)
            peers.append({
                "site": name, "connector": name in schedules, "schedule": schedules.get(name),
                "schedule_text": schedule_text(schedules.get(name)) if name in schedules else None,
                "routing_domain": domain, "address": dirsync_address(domain) if domain else None,
                "invocation": state["invocation"], "high_water": state["high_water"],
                "pending_ranges": state["ranges"], "last_request": state["last_request"],
                "last_reply": state["last_reply"], "last_error": state["last_error"],
                "applied": state["applied"], "backlog": self.backlog(domain)})
        return {"site": self.config.site, "invocation": invocation, "highest_usn": highest,
                "key_scheme": self.key_scheme, "trusted_sites": list(self._key.trusted_sites),
                "rejected": dict(self.rejected), "peers": peers}

    @property
    def key_scheme(self) -> str:
        """How this site's replication is signed: ``per-site ed25519`` or ``shared organisation key``."""
        return self._key.scheme

    @property
    def trusted_sites(self) -> tuple[str, ...]:
        return self._key.trusted_sites
