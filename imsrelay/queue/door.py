"""The queue's door: the one way a message enters the queue.

Postfix's cleanup(8) writes a message into the incoming queue and tells qmgr; here
``QueueDoor`` makes the message and its envelope durable in the spool (the journal's
group commit, docs/design.md invariant 1), records the message tracking "received"
event, and hands the envelope (and the bytes, while memory allows) to the queue
manager.  Both doors lead here: ``accept`` for mail an SMTP session received (the
ingress answers ``250`` only after it returns), ``enqueue_local`` for mail the site
writes itself (NDRs, delay notices, replication messages).

Message Journaling (KB Q239427; ``imsrelay.policy.journaling``): when the site has a
journal recipient, a message that gets a journal copy enters with it, in the same
commit (the copy's record first: a torn tail after a crash never keeps the message
without its copy), so the copy is as durable as the message.

Custom recipients and distribution lists (KB Q258203, Q185194;
``imsrelay.policy.expansion``): before a message enters, its ``expander`` (the site)
says what its recipients become; a custom recipient's target replaces it, a list
expanded here is replaced by its members and named in an ``X-IMS-Expanded-DL`` trace
header, and members whose NDRs go to the list owner enter as a message of their own
whose envelope sender is the owner (its id in the first one's ``expanded_into``).
The journal copy is of the message as it came, once.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Protocol

from imsrelay.model.envelope import Envelope, RecipientState, new_queue_id
from imsrelay.model.header_date import header_date_now
from imsrelay.observe import tracking
from imsrelay.observe.metrics import SiteMetrics
from imsrelay.policy import journaling
from imsrelay.policy.expansion import Delivery, Expansion, mark_lines
from imsrelay.queue import dsn
from imsrelay.queue.manager import QueueManager
from imsrelay.queue.spool import Spool

OFF_LOOP_AT = 256 * 1024  # a journal copy of a bigger message is built on a worker thread


class JournalInputs(Protocol):
    """What the door asks its site for Message Journaling (``imsrelay.site.Site``)."""

    async def journal_address(self) -> str | None:
        """The journal recipient's address now (None: no journaling)."""
        ...

    def reporting_site(self) -> dsn.ReportingSite: ...

    def postmaster_address(self) -> str: ...


class RecipientExpander(Protocol):
    """What the door asks its site about custom recipients and lists (``imsrelay.site.Site``)."""

    async def expansion(self, env: Envelope, message: bytes) -> Expansion | None:
        """What the message's recipients become here (None: nothing to change)."""
        ...


class QueueDoor:
    def __init__(self, spool: Spool, qmgr: QueueManager, *, tracking_log: tracking.TrackingLog,
                 metrics: SiteMetrics, log: Any, journal: JournalInputs | None = None,
                 journal_reports: bool = True, expander: RecipientExpander | None = None) -> None:
        """``journal``: the site's journaling inputs (None: the site does not journal);
        ``journal_reports``: NDRs and delay notices are journaled too."""
        self.spool = spool
        self.qmgr = qmgr
        self.tracking = tracking_log
        self.metrics = metrics
        self.log = log
        self.journal = journal
        self.journal_reports = journal_reports
        self.expander = expander

    async def accept(self, env: Envelope, message: bytes) -> None:
        """A message an SMTP session received: durable when this returns."""
        await self._enter(env, message)
        self.metrics.messages_in.inc()
        self.metrics.bytes_in.inc(len(message))

    async def enqueue_local(self, env: Envelope, message: bytes) -> None:
        """Queue a message this site generates itself (NDRs, replication)."""
        await self._enter(env, message)
        self.log.info("message.queued", queue_id=env.queue_id, sender=env.sender or "<>",
                      recipients=[r.address for r in env.recipients], origin=env.origin, size=len(message))

    async def _enter(self, env: Envelope, message: bytes) -> None:
        queue_id = env.queue_id  # (expansion may hand this id to the part sent first)
        copy = await self._journal_copy(env, message)
        parts = await self._expanded(env, message)
        entering = ([copy] if copy is not None else []) + parts
        if len(entering) == 1:
            await self.spool.enqueue(*entering[0])
        elif entering:
            await self.spool.enqueue_many(entering)
        for part_env, part_message in parts:
            self._track_received(part_env, part_message)
            self.qmgr.submit(part_env, part_message)
        if copy is not None:
            journal_env, journal_message = copy
            self._track_received(journal_env, journal_message)
            self.tracking.record(tracking.JOURNALED, queue_id, journal_id=journal_env.queue_id,
                                 journal=journal_env.recipients[0].address)
            self.qmgr.submit(journal_env, journal_message)
            self.log.debug("message.journaled", queue_id=queue_id, journal_id=journal_env.queue_id,
                           journal=journal_env.recipients[0].address)

    async def _expanded(self, env: Envelope, message: bytes) -> list[tuple[Envelope, bytes]]:
        """The message (and any messages to list owners' members) after its custom
        recipients and lists are resolved; ``[]`` when nothing is left (lists in loops)."""
        if self.expander is None or env.origin == "dirsync":
            return [(env, message)]
        expansion = await self.expander.expansion(env, message)
        if expansion is None or not expansion.changed:
            return [(env, message)]
        queue_id = env.queue_id
        marked = mark_lines(expansion.expanded) + message
        before = {r.address.lower(): r for r in env.recipients}
        parts: list[tuple[Envelope, bytes]] = []
        for report_to, deliveries in expansion.groups():
            states = [_state(d, before) for d in deliveries]
            if report_to is None:
                env.recipients = states
                parts.append((env, marked))
            else:  # NDRs to the list owner: its own envelope, the owner as sender
                parts.append((Envelope(queue_id=new_queue_id(), sender=report_to, recipients=states,
                                       received_at=env.received_at, client=env.client, helo=env.helo,
                                       smtputf8=env.smtputf8, body_8bit=env.body_8bit, size=len(marked),
                                       origin=env.origin, extra={**env.extra, "expanded_from": env.queue_id}),
                              marked))
        if parts and parts[0][0] is not env:
            parts[0][0].queue_id, env.queue_id = env.queue_id, parts[0][0].queue_id  # the id the client was given
            parts[0][0].extra.pop("expanded_from", None)
        ids = [p.queue_id for p, _ in parts]
        if len(ids) > 1:
            parts[0][0].extra["expanded_into"] = ids[1:]
        self.log.info("recipient.expanded", queue_id=queue_id, lists=list(expansion.expanded),
                      redirected=[f"{a} -> {t}" for a, t in expansion.redirected],
                      forwarded=[f"{a} -> {s}" for a, s in expansion.forwarded], loops=list(expansion.loops),
                      duplicates=list(expansion.duplicates), truncated=expansion.truncated, queue_ids=ids)
        if not parts:
            self.log.warning("message.no_recipients_left", queue_id=queue_id, sender=env.sender or "<>",
                             loops=list(expansion.loops))
        return parts

    async def _journal_copy(self, env: Envelope, message: bytes) -> tuple[Envelope, bytes] | None:
        """The journal copy of a message entering the queue, if it gets one."""
        if self.journal is None:
            return None
        address = await self.journal.journal_address()
        if not address or not journaling.journal_wanted(
                origin=env.origin, recipients=[r.address for r in env.recipients], message=message,
                journal_address=address, reports=self.journal_reports):
            return None
        site = self.journal.reporting_site()
        record = journaling.JournalEnvelope(
            queue_id=env.queue_id, sender=env.sender, site=site.site, hostname=site.hostname,
            recipients=tuple((r.address, r.original) for r in env.recipients),
            received=header_date_now(env.received_at), client=env.client, helo=env.helo, origin=env.origin)
        build = functools.partial(journaling.build_journal_copy, message, record, journal_address=address,
                                  from_address=self.journal.postmaster_address(),
                                  date=header_date_now(env.received_at))
        # (copying a large message: off the event loop, as the reports are built)
        copy = build() if len(message) <= OFF_LOOP_AT else await asyncio.to_thread(build)
        journal_env = Envelope(queue_id=new_queue_id(), sender="", recipients=[RecipientState(address, address)],
                               received_at=env.received_at, origin=journaling.ORIGIN,
                               smtputf8=env.smtputf8 or not address.isascii(), body_8bit=not copy.isascii(),
                               extra={"journal_of": env.queue_id})
        return journal_env, copy

    def _track_received(self, env: Envelope, message: bytes) -> None:
        self.tracking.record(tracking.RECEIVED, env.queue_id, message_id=tracking.message_id_of(message),
                             sender=env.sender, related=env.extra.get("report_for") or env.extra.get("journal_of")
                             or env.extra.get("expanded_from"), origin=env.origin,
                             client=env.client or None, helo=env.helo or None, size=len(message),
                             recipients=[r.address for r in env.recipients], auth=env.extra.get("auth"))


def _state(d: Delivery, before: dict[str, RecipientState]) -> RecipientState:
    """The queue state of one recipient after expansion (a recipient the client named
    keeps its RFC 3461 NOTIFY and ORCPT)."""
    named = before.get(d.address.lower()) or before.get(d.original.lower())
    if named is not None and d.report_to is None:
        return RecipientState(d.address, named.original or d.original, notify=named.notify, orcpt=named.orcpt)
    return RecipientState(d.address, d.original)
