"""Faults on demand for the lab: a site misbehaves on purpose, at run time.

What Mailpit's chaos and smtp4dev's error rules do, per site and per peer:

==========  ==================================================================
kind        effect
==========  ==================================================================
``reply``   answer a chosen 4xx/5xx at ``connect``, ``helo``, ``mail``, ``rcpt``
            or ``data`` instead of going on (at connect the session then ends)
``drop``    close the connection without a reply at that stage; at ``data``
            after the ``354`` and the first line of the message (mid-DATA)
``latency`` wait ``delay`` seconds before answering at that stage (``any``:
            every reply)
``link``    refuse outbound traffic to one peer (a site name, another server
            of this site by name, a host or ``host:port``): deliveries there
            defer with ``4.4.1`` as if the link were cut, while both keep running
==========  ==================================================================

Each fault fires always, with a ``probability``, or for the next ``sessions``
attempts; every fault has an expiry.  An *attempt* is what a client retries: a
connection for ``connect`` and ``helo`` faults, one mail transaction (``MAIL`` to
the end of ``DATA``) for ``mail``, ``rcpt`` and ``data`` faults, so a client that
keeps its connection open and tries again on it (as SMTP clients with a connection
cache do) meets exactly N refusals.  A ``connect`` fault added while a client's
connection is already open (a warm link) applies at that connection's next
transaction: its reply answers the ``MAIL`` and the connection is closed, as a
server that went away would.  A used-up fault leaves the list.  Inbound faults may be limited to one
``peer`` (a client address or network).  Faults live in the running site's memory
(``imsrelay faults add|list|clear``, ``/faults`` on the admin endpoint): a restart
clears them, like the lab conditions they model.

``fires`` and ``matches_*`` are the pure decisions; ``FaultBook`` keeps the list,
the session counters and the expiry.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from imsrelay.model.settings import parse_duration

STAGES = ("connect", "helo", "mail", "rcpt", "data")
KINDS = ("reply", "drop", "latency", "link")
DEFAULT_EXPIRY = 3600.0
MAX_EXPIRY = 7 * 86400.0
MAX_DELAY = 600.0
MAX_FAULTS = 100  # armed at once: each is looked at in every SMTP session (5,000 cost ~55 ms a transaction)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class FaultError(ValueError):
    """A fault request that cannot be honoured (one line, for the CLI or a 400)."""


@dataclass(frozen=True)
class Fault:
    id: str
    kind: str  # reply | drop | latency | link
    expires_at: float
    created_at: float
    stage: str | None = None  # reply/drop/latency: a STAGE (latency also "any"); link: None
    code: int | None = None  # reply: the reply code
    text: str = ""  # reply: the text after the code
    probability: float = 1.0
    sessions: int | None = None  # only the next N sessions (None: every session until expiry)
    peer: str | None = None  # inbound: client address/network; link: site, host or host:port
    delay: float = 0.0  # latency: seconds

    def reply_line(self) -> str:
        text = self.text or f"fault {self.id} injected by the administrator"
        return f"{self.code} {text}"

    def describe(self) -> str:
        what = {
            "reply": f"answer {self.reply_line()!r} at {self.stage}",
            "drop": f"drop the connection at {self.stage}" + (" (mid-DATA)" if self.stage == "data" else ""),
            "latency": f"wait {self.delay:g}s before answering at {self.stage}",
            "link": f"refuse outbound traffic to {self.peer}",
        }[self.kind]
        if self.kind != "link" and self.peer:
            what += f" for sessions from {self.peer}"
        if self.probability < 1.0:
            what += f", probability {self.probability:g}"
        if self.sessions is not None:
            what += f", next {self.sessions} attempt(s)"
        return what

    def as_dict(self, *, remaining: int | None = None, now: float | None = None) -> dict[str, Any]:
        d = asdict(self)
        d["description"] = self.describe()
        if self.sessions is not None:
            d["sessions_left"] = remaining
        if now is not None:
            d["expires_in"] = max(0.0, self.expires_at - now)
        return d


# --------------------------------------------------------------------------- pure decisions


def active(fault: Fault, now: float) -> bool:
    return now < fault.expires_at


def matches_client(fault: Fault, client_ip: str | None) -> bool:
    """Whether an inbound fault applies to a session from ``client_ip``."""
    if fault.kind == "link":
        return False
    if not fault.peer:
        return True
    if client_ip is None:
        return False
    try:
        return ipaddress.ip_address(client_ip) in ipaddress.ip_network(fault.peer, strict=False)
    except ValueError:
        return False


def matches_stage(fault: Fault, stage: str) -> bool:
    return fault.stage == stage or (fault.kind == "latency" and fault.stage == "any")


def fires(fault: Fault, *, stage: str, roll: float) -> bool:
    """Whether an armed inbound fault fires at ``stage`` given a uniform ``roll`` in [0, 1)."""
    return matches_stage(fault, stage) and roll < fault.probability


def matches_link(fault: Fault, *, site: str | None, host: str | None, port: int | None,
                 domain: str | None) -> bool:
    """Whether a ``link`` fault cuts an outbound route (to a site, a host or a domain)."""
    if fault.kind != "link" or not fault.peer:
        return False
    peer = fault.peer.lower()
    candidates = {x.lower() for x in (site, host, domain) if x}
    if host and port:
        candidates.add(f"{host.lower()}:{port}")
    return peer in candidates


def fault_from_request(body: Mapping[str, Any], *, fault_id: str, now: float) -> Fault:
    """Validate a request (CLI or admin JSON) into a Fault; FaultError names the field."""
    def get(name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = body.get(name, default)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            raise FaultError(f"{name} has the wrong type ({type(value).__name__})")
        return value

    known = {"kind", "stage", "code", "reply", "text", "probability", "sessions", "peer", "delay", "expires"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise FaultError(f"{unknown[0]} is not a fault setting ({', '.join(sorted(known))})")
    kind = get("kind", str, "reply")
    if kind not in KINDS:
        raise FaultError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    stage = get("stage", str)
    peer = get("peer", str)
    code: int | None = None
    text = ""
    delay = 0.0
    if kind == "link":
        if not peer:
            raise FaultError("a link fault needs peer (a site name, a host or host:port)")
        stage = None
    else:
        stages = STAGES + (("any",) if kind == "latency" else ())
        if stage is None:
            stage = "any" if kind == "latency" else None
        if stage not in stages:
            raise FaultError(f"stage must be one of {', '.join(stages)}, not {stage!r}")
        if peer:
            try:
                ipaddress.ip_network(peer, strict=False)
            except ValueError:
                raise FaultError(f"peer {peer!r} is not a client address or network") from None
    if kind == "reply":
        reply = get("reply", str)
        code = get("code", int)
        text = get("text", str) or ""
        if reply:
            head, _, rest = reply.strip().partition(" ")
            if not head.isdigit():
                raise FaultError(f"reply {reply!r} must start with a code, e.g. \"451 4.3.0 try later\"")
            code, text = int(head), rest.strip()
        if code is None:
            raise FaultError("a reply fault needs reply (\"451 4.3.0 text\") or code")
        if not 400 <= code <= 599:
            raise FaultError(f"the reply code must be 4xx or 5xx, not {code}")
        if any(c in text for c in "\r\n"):
            raise FaultError("the reply text must be one line")
        if _CONTROL.search(text):
            raise FaultError("the reply text must not hold control characters (NUL, TAB, ESC, DEL ...)")
    if kind == "latency":
        delay = _number(get("delay", (int, float, str)), "delay")
        if not 0 < delay <= MAX_DELAY:
            raise FaultError(f"delay must be more than 0 and at most {MAX_DELAY:g}s")
    try:
        probability = float(get("probability", (int, float), 1.0))
    except OverflowError:
        raise FaultError("probability must be more than 0 and at most 1") from None
    if not 0.0 < probability <= 1.0:
        raise FaultError("probability must be more than 0 and at most 1")
    sessions = get("sessions", int)
    if sessions is not None and sessions < 1:
        raise FaultError("sessions must be at least 1")
    expires = _number(get("expires", (int, float, str), DEFAULT_EXPIRY), "expires")
    if not 0 < expires <= MAX_EXPIRY:
        raise FaultError(f"expires must be more than 0 and at most {MAX_EXPIRY:g}s (7d)")
    return Fault(id=fault_id, kind=kind, expires_at=now + expires, created_at=now, stage=stage, code=code,
                 text=text, probability=probability, sessions=sessions, peer=peer, delay=delay)


def _number(value: Any, name: str) -> float:
    if value is None:
        raise FaultError(f"{name} is required")
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise FaultError(f"{name}: {exc}") from None


# --------------------------------------------------------------------------- state


TRANSACTION_STAGES = ("mail", "rcpt", "data")  # a counted fault at these stages counts transactions


@dataclass
class SessionFaults:
    """What one SMTP session knows about counted faults: which it armed (for this
    connection, or for its current transaction) and when it began."""

    client_ip: str | None
    started_at: float = 0.0
    seen: set[str] = field(default_factory=set)
    armed: set[str] = field(default_factory=set)


class FaultBook:
    """The running site's faults: add, list, clear; expired ones vanish."""

    def __init__(self, *, clock: Callable[[], float] = time.time,
                 rng: Callable[[], float] = random.random) -> None:
        self.clock = clock
        self.rng = rng
        self._faults: dict[str, Fault] = {}
        self._left: dict[str, int] = {}
        self._ids = itertools.count(1)
        self.listeners: list[Callable[[str, Fault], None]] = []  # ("added"|"cleared"|"expired"|"used_up"|"fired", fault)

    def __bool__(self) -> bool:
        return bool(self._faults)

    def add(self, body: Mapping[str, Any]) -> Fault:
        fault = fault_from_request(body, fault_id=f"f{next(self._ids)}", now=self.clock())
        self._expire()
        if len(self._faults) >= MAX_FAULTS:
            raise FaultError(f"too many faults ({MAX_FAULTS} armed): clear some first (imsrelay faults clear)")
        self._faults[fault.id] = fault
        if fault.sessions is not None:
            self._left[fault.id] = fault.sessions
        self._tell("added", fault)
        return fault

    def faults(self) -> list[Fault]:
        """The faults in force: not expired, and a counted one with attempts left."""
        self._expire()
        return [f for f in self._faults.values() if self._left.get(f.id, 1) > 0]

    def listing(self) -> list[dict[str, Any]]:
        """The faults still in force: a counted fault with no attempt left is not listed."""
        now = self.clock()
        return [f.as_dict(remaining=self._left.get(f.id), now=now) for f in self.faults()]

    def clear(self, ids: Iterable[str] | None = None) -> list[Fault]:
        """Remove the given faults (all when None); returns those removed.  Raises
        FaultError for an id that is not there."""
        in_force = {f.id for f in self.faults()}
        if ids is None:
            chosen = list(self._faults)  # the used-up ones go too, silently
        else:
            chosen = list(ids)
            missing = [i for i in chosen if i not in in_force]
            if missing:
                raise FaultError(f"no fault {', '.join(missing)} (see imsrelay faults list)")
        for i in chosen:
            self._left.pop(i, None)
        removed = [f for f in (self._faults.pop(i) for i in chosen) if f.id in in_force]
        for f in removed:
            self._tell("cleared", f)
        return removed

    def _expire(self) -> None:
        now = self.clock()
        for f in [f for f in self._faults.values() if not active(f, now)]:
            del self._faults[f.id]
            self._left.pop(f.id, None)
            self._tell("expired", f)

    def _tell(self, what: str, fault: Fault) -> None:
        for listener in list(self.listeners):
            listener(what, fault)

    # ------------------------------------------------------------ decisions at run time

    def session(self, client_ip: str | None) -> SessionFaults:
        return SessionFaults(client_ip, started_at=self.clock())

    def _armed(self, session: SessionFaults, f: Fault) -> bool:
        """A counted fault is armed for this attempt when it still has attempts left
        the first time the attempt meets it (that uses one)."""
        if f.sessions is None:
            return True
        if f.id not in session.seen:
            session.seen.add(f.id)
            if self._left.get(f.id, 0) > 0:
                self._left[f.id] -= 1
                session.armed.add(f.id)
        return f.id in session.armed

    def _used_up(self, session: SessionFaults) -> None:
        """A counted fault whose every attempt has begun leaves the book once the
        attempt at hand no longer holds it (``listing`` hides it already)."""
        for fid in [fid for fid, left in self._left.items() if left <= 0 and fid not in session.armed]:
            fault = self._faults.pop(fid, None)
            del self._left[fid]
            if fault is not None:
                self._tell("used_up", fault)

    def firing(self, session: SessionFaults, stage: str) -> list[Fault]:
        """The inbound faults that fire now for this session at ``stage``, latency first.
        ``mail`` begins a new attempt for the transaction stages' counted faults."""
        if not self._faults:
            return []
        self._expire()
        if stage == "mail":
            session.seen -= {f.id for f in self._faults.values() if f.stage in TRANSACTION_STAGES}
            session.armed -= {f.id for f in self._faults.values() if f.stage in TRANSACTION_STAGES}
        out = []
        for f in list(self._faults.values()):
            if f.kind == "link" or not matches_stage(f, stage) or not matches_client(f, session.client_ip):
                continue
            if not self._armed(session, f):
                continue
            if fires(f, stage=stage, roll=self.rng()):
                out.append(f)
                self._tell("fired", f)
        self._used_up(session)
        out.sort(key=lambda f: f.kind != "latency")
        return out

    def late_connect(self, session: SessionFaults) -> list[Fault]:
        """``connect`` faults added after this session began (its client reuses a warm
        connection): they fire at its next transaction instead, once per session."""
        if not self._faults:
            return []
        self._expire()
        out = []
        for f in list(self._faults.values()):
            if f.kind == "link" or f.stage != "connect" or f.created_at < session.started_at \
                    or f.id in session.seen or not matches_client(f, session.client_ip):
                continue
            armed = self._armed(session, f)
            session.seen.add(f.id)  # once per session (the adapter closes it when it fires)
            if not armed:
                continue
            if fires(f, stage="connect", roll=self.rng()):
                out.append(f)
                self._tell("fired", f)
        self._used_up(session)
        out.sort(key=lambda f: f.kind != "latency")
        return out

    def link_cut(self, *, site: str | None, host: str | None, port: int | None,
                 domain: str | None) -> Fault | None:
        if not self._faults:
            return None
        self._expire()
        for f in self._faults.values():
            if matches_link(f, site=site, host=host, port=port, domain=domain) and self.rng() < f.probability:
                self._tell("fired", f)
                return f
        return None
