"""The queue's door: the one way a message enters the queue.

Postfix's cleanup(8) writes a message into the incoming queue and tells qmgr; here
``QueueDoor`` makes the message and its envelope durable in the spool (the journal's
group commit, docs/design.md invariant 1), records the message tracking "received"
event, and hands the envelope (and the bytes, while memory allows) to the queue
manager.  Both doors lead here: ``accept`` for mail an SMTP session received (the
ingress answers ``250`` only after it returns), ``enqueue_local`` for mail the site
writes itself (NDRs, delay notices, replication messages).
"""

from __future__ import annotations

from typing import Any

from imsrelay.model.envelope import Envelope
from imsrelay.observe import tracking
from imsrelay.observe.metrics import SiteMetrics
from imsrelay.queue.manager import QueueManager
from imsrelay.queue.spool import Spool


class QueueDoor:
    def __init__(self, spool: Spool, qmgr: QueueManager, *, tracking_log: tracking.TrackingLog,
                 metrics: SiteMetrics, log: Any) -> None:
        self.spool = spool
        self.qmgr = qmgr
        self.tracking = tracking_log
        self.metrics = metrics
        self.log = log

    async def accept(self, env: Envelope, message: bytes) -> None:
        """A message an SMTP session received: durable when this returns."""
        await self.spool.enqueue(env, message)
        self._track_received(env, message)
        self.qmgr.submit(env, message)
        self.metrics.messages_in.inc()
        self.metrics.bytes_in.inc(len(message))

    async def enqueue_local(self, env: Envelope, message: bytes) -> None:
        """Queue a message this site generates itself (NDRs, replication)."""
        await self.spool.enqueue(env, message)
        self._track_received(env, message)
        self.qmgr.submit(env, message)
        self.log.info("message.queued", queue_id=env.queue_id, sender=env.sender or "<>",
                      recipients=[r.address for r in env.recipients], origin=env.origin, size=len(message))

    def _track_received(self, env: Envelope, message: bytes) -> None:
        self.tracking.record(tracking.RECEIVED, env.queue_id, message_id=tracking.message_id_of(message),
                             sender=env.sender, related=env.extra.get("report_for"), origin=env.origin,
                             client=env.client or None, helo=env.helo or None, size=len(message),
                             recipients=[r.address for r in env.recipients], auth=env.extra.get("auth"))
