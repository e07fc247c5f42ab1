"""Message Filtering's turf directory: filtered copies kept for the administrator.

A recipient whose Message Filter (site or mailbox) says ``turf`` does not get the
message; it is written to ``<turf_dir>/<queue id>.eml`` with ``<queue id>.json``
(who sent it, from where, which rule filtered whom), both fsync'ed before the
session's ``250``.  A ``delete`` decision is only logged.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imsrelay.policy.restrictions import Client, FilterDecision


class Turf:
    def __init__(self, turf_dir: Path, *, log: Any, clock: Callable[[], float]) -> None:
        self.turf_dir = turf_dir
        self.log = log
        self.clock = clock

    async def keep_filtered(self, queue_id: str, sender: str, filtered: dict[str, FilterDecision],
                            message: bytes, client: Client) -> None:
        """Message Filtering: recipients whose copy is deleted or kept in the turf
        directory (``<queue id>.eml`` and ``.json``, written durably before the 250)."""
        kept = {r: d for r, d in filtered.items() if d.action == "turf"}
        if kept:
            await asyncio.to_thread(write_turf, self.turf_dir, queue_id, sender, kept, message, client,
                                    self.clock())
        for rcpt, decision in filtered.items():
            self.log.info("message.filtered", queue_id=queue_id, peer=client.ip, sender=sender or "<>",
                          recipient=rcpt, action=decision.action, rule=decision.rule,
                          turf=str(self.turf_dir / f"{queue_id}.eml") if decision.action == "turf" else None)


def write_turf(turf_dir: Path, queue_id: str, sender: str, kept: dict[str, FilterDecision], message: bytes,
               client: Client, now: float) -> None:
    """One filtered message in the turf directory: the message as received and what
    filtered it (both fsync'ed)."""
    turf_dir.mkdir(parents=True, exist_ok=True)
    meta = {"queue_id": queue_id, "sender": sender or "<>", "received_at": now, "client": client.ip,
            "auth": client.authenticated,
            "recipients": [{"address": r, "rule": d.rule} for r, d in kept.items()]}
    for name, data in ((f"{queue_id}.eml", message), (f"{queue_id}.json", json.dumps(meta, indent=2).encode())):
        tmp = turf_dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, turf_dir / name)
    fd = os.open(turf_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
