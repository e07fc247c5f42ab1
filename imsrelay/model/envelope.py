"""The queue's values: a message's envelope and each recipient's delivery state.

No I/O here: the spool stores these (``imsrelay.queue.spool``), the queue manager changes
them by the rules of ``imsrelay.queue.rules``, the admin endpoint and the CLI show them.
A recipient is ``pending`` until it reaches one of the ``TERMINAL`` states
(docs/design.md invariant 2).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

PENDING = "pending"
DELIVERED = "delivered"
BOUNCED = "bounced"  # failed, NDR queued to the sender
FAILED = "failed"  # failed, no NDR possible (null sender) or suppressed: logged
TERMINAL = frozenset({DELIVERED, BOUNCED, FAILED})
# A pending recipient as the CLI, the API and the console name it (one name each):
QUEUED = "queued"  # not attempted yet
DEFERRED = "deferred"  # attempted, waiting for its next attempt
HELD = "held"  # not attempted while a hold lasts (Transfer mode, ETRN): no next attempt
QUEUE_STATES = (QUEUED, DEFERRED, HELD, DELIVERED, BOUNCED, FAILED)

_ID_PREFIX = secrets.token_hex(2).upper()
_ID_COUNTER = itertools.count(secrets.randbelow(1 << 16))
_BASE_PREFIX = _ID_PREFIX  # inherited unchanged by forked workers


def _new_id_source() -> None:
    """A forked process draws its own prefix and counter start."""
    global _ID_PREFIX, _ID_COUNTER
    old = _ID_PREFIX
    while _ID_PREFIX == old:
        _ID_PREFIX = secrets.token_hex(2).upper()
    _ID_COUNTER = itertools.count(secrets.randbelow(1 << 16))


os.register_at_fork(after_in_child=_new_id_source)


def use_worker_ids(worker: int) -> None:
    """Worker N of ``serve --workers`` uses the supervisor's prefix + 1 + N: the
    workers of one site never hand out the same queue id (Maildir's duplicate check
    relies on it)."""
    global _ID_PREFIX
    _ID_PREFIX = f"{(int(_BASE_PREFIX, 16) + 1 + worker) & 0xFFFF:04X}"


def new_queue_id() -> str:
    """Sortable and unique: 13 hex digits of microseconds, 4 of this process's random
    prefix, 4 of a per-process counter (no system call per id)."""
    return f"{int(time.time() * 1_000_000):013X}{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFF:04X}"


def check_queue_id(queue_id: str) -> str:
    if not queue_id.isalnum() or not queue_id.isascii():
        raise ValueError(f"{queue_id!r} is not a queue id")
    return queue_id


def queue_state(state: str, attempts: int, *, held: bool = False) -> str:
    """A recipient's state in the queue as every view names it (``QUEUE_STATES``)."""
    if state != PENDING:
        return state
    if held:
        return HELD
    return DEFERRED if attempts else QUEUED


@dataclass(slots=True)
class RecipientState:
    address: str
    original: str | None = None
    state: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    first_failure: float | None = None
    status: str | None = None  # RFC 3463 code of the last outcome
    diagnostic: str | None = None  # last reply / reason
    remote: str | None = None  # the host that gave the last answer
    delay_notified: bool = False
    route: str | None = None
    notify: str | None = None  # RFC 3461 NOTIFY (imsrelay.model.dsn_params); None: not given
    orcpt: str | None = None  # RFC 3461 ORCPT as "addr-type;address"; None: not given


@dataclass(slots=True)
class Envelope:
    queue_id: str
    sender: str  # "" = null sender <>
    recipients: list[RecipientState]
    received_at: float
    client: str = ""
    helo: str = ""
    smtputf8: bool = False
    body_8bit: bool = False
    size: int = 0
    origin: str = "smtp"  # smtp | ndr | dirsync | local
    extra: dict[str, Any] = field(default_factory=dict)
    ret: str | None = None  # RFC 3461 RET: FULL | HDRS; None: not given
    envid: str | None = None  # RFC 3461 ENVID, decoded; None: not given

    @property
    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.state not in TERMINAL]

    @property
    def finished(self) -> bool:
        return not self.pending

    def next_due(self) -> float | None:
        pending = self.pending
        return min(r.next_attempt for r in pending) if pending else None

    def to_json(self) -> bytes:
        """The envelope as compact JSON with sorted keys: the same bytes as
        ``json.dumps(dataclasses.asdict(self), separators=(",", ":"), sort_keys=True)``,
        without asdict's recursive deep copy (it cost ~50 µs a message, on the loop)."""
        d = dict(zip(_ENVELOPE_FIELDS, _envelope_values(self), strict=True))
        d["recipients"] = [dict(zip(_RECIPIENT_FIELDS, _recipient_values(r), strict=True))
                           for r in self.recipients]
        return _ENCODER.encode(d).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        """An envelope from its JSON.  Its strings that repeat from message to message
        (addresses, states, routes, the client, priorities) are interned: a replayed
        queue of 100,000 messages to a few destinations holds each of them once, not
        once per message (docs/explanation/promises.md, "Limits": memory per queued message)."""
        d = json.loads(raw)
        d["recipients"] = [RecipientState(**_interned(r)) for r in d["recipients"]]
        if isinstance(d.get("extra"), dict):
            _interned(d["extra"])
        return cls(**_interned(d, skip=("queue_id",)))


def _plain(value: Any) -> Any:
    """What ``dataclasses.asdict`` makes of a dataclass nested in ``extra``; the JSON
    encoder calls this only for values it cannot encode itself."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_ENVELOPE_FIELDS = tuple(sorted(f.name for f in dataclasses.fields(Envelope)))
_RECIPIENT_FIELDS = tuple(sorted(f.name for f in dataclasses.fields(RecipientState)))
_envelope_values = attrgetter(*_ENVELOPE_FIELDS)
_recipient_values = attrgetter(*_RECIPIENT_FIELDS)
# json.dumps(..., separators=...) builds a new encoder on every call; this one is reused
_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True, default=_plain)


def _interned(d: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``d`` with its string values (not nested ones) interned, except ``skip``."""
    for key, value in d.items():
        if type(value) is str and key not in skip:
            d[key] = sys.intern(value)
    return d
