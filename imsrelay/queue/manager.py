"""The queue manager: schedules deliveries, applies outcomes, retries, expires, NDRs.

Like Postfix's qmgr: it takes messages from the spool, asks the router where each
pending recipient goes, hands groups of recipients to a transport (Maildir, the
directory service, or SMTP), and records each recipient's outcome durably by the
rules of ``imsrelay.queue.rules`` (the pure state machine; this module applies it):

- delivered → terminal;
- permanent failure → an NDR is queued durably to the envelope sender, then the
  recipient is terminal (``bounced``); with a null sender, or for a report that
  must not be answered, it is terminal as ``failed`` and logged;
- temporary failure → retried on the schedule (``retry_intervals``, the last one
  repeating) until the message's lifetime expires, then NDR'd ("the maximum time
  for delivering the message expired").

A message leaves the spool only when every recipient is terminal
(docs/design.md invariant 2).  The queue manager is also the one owner of
per-destination concurrency (``delivery.max_per_destination`` slots per relay host
or MX domain, taken before a global delivery slot).  Disk and directory work run
off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Protocol

from imsrelay.model.envelope import (
    DELIVERED,
    FAILED,
    PENDING,
    Envelope,
    RecipientState,
    new_queue_id,
)
from imsrelay.model.objects import Mailbox
from imsrelay.model.outcome import Outcome
from imsrelay.model.priority import NORMAL, PriorityTimeouts
from imsrelay.model.settings import DeliveryConfig
from imsrelay.observe import tracking
from imsrelay.observe.metrics import SiteMetrics
from imsrelay.policy import internet_mail
from imsrelay.policy.internet_mail import DomainMailSettings, OutboundRules, Verdict
from imsrelay.queue import dsn
from imsrelay.queue.agents import Transports
from imsrelay.queue.rules import (
    DEFERRED_EVENT,
    DELIVERED_EVENT,
    EXPIRED_EVENT,
    FAILED_EVENT,
    RetryPolicy,
    Transition,
    after_attempt,
    after_internal_error,
    report_status,
)
from imsrelay.queue.spool import Spool
from imsrelay.routing.router import (
    ATTENDANT,
    DIRECTORY,
    LOCAL,
    MX,
    RELAY,
    Route,
    RoutingTable,
    route_for,
    shares_load,
)

MAX_CACHED_BODIES = 64 * 1024 * 1024  # bytes of queued messages kept in memory
MAX_CACHED_ROUTES = 1024  # routing decisions remembered for the current routing table


@dataclass
class QmgrHealth:
    """What the queue manager's supervisor knows: failures so far, and the stages
    failing now (each backed off exponentially, 0.5 s doubling up to 30 s)."""

    failures: int = 0
    failing: dict[str, tuple[str, float, float]] = field(default_factory=dict)  # stage -> (error, retry at, delay)

    def failed(self, stage: str, exc: BaseException, now: float) -> float:
        self.failures += 1
        previous = self.failing.get(stage)
        delay = min(30.0, previous[2] * 2) if previous else 0.5
        self.failing[stage] = (repr(exc), now + delay, delay)
        return delay

    def succeeded(self, stage: str) -> None:
        self.failing.pop(stage, None)

    def due(self, stage: str, now: float) -> bool:
        entry = self.failing.get(stage)
        return entry is None or now >= entry[1]

    @property
    def ok(self) -> bool:
        return not self.failing

    def reason(self) -> str:
        return "; ".join(f"{stage} failing: {err}" for stage, (err, _, _) in sorted(self.failing.items()))



@dataclass(frozen=True)
class Recorded:
    recipient: RecipientState
    outcome: Outcome


class QueueInputs(Protocol):
    """What the queue manager asks its site: the router's live inputs, who signs the
    reports, and the queue door for the reports themselves (``imsrelay.site.Site``)."""

    async def lookup_mailboxes(self, addresses: list[str]) -> list[Mailbox | None]: ...

    async def routing_table(self) -> RoutingTable: ...

    def reporting_site(self) -> dsn.ReportingSite: ...

    def postmaster_address(self) -> str: ...

    async def enqueue_local(self, env: Envelope, message: bytes) -> None: ...

    def hold_reason(self, queue_id: str, route: Route) -> str | None: ...

    async def ndr_copy_address(self) -> str | None: ...

    @property
    def metrics(self) -> SiteMetrics: ...


def return_freed_memory() -> bool:
    """Return freed heap pages to the system (glibc's ``malloc_trim``; it keeps them
    otherwise).  False where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def held_text(reason: str) -> str:
    """A hold reason (``transfer:inbound``, ``etrn:domain:entry``) as a person reads it."""
    kind, _, rest = reason.partition(":")
    if kind == "transfer":
        return f"Transfer mode {rest}: outbound mail is held"
    if kind == "etrn":
        return f"held until the peer issues ETRN for {rest.partition(':')[2] or rest}"
    if kind == "intrasite":
        return (f"server {rest} handed this mail here, yet this server's directory says it is homed there: "
                "held until the directory changes (intra-site replication), not sent back")
    return reason


class QueueManager:
    def __init__(self, spool: Spool, *, inputs: QueueInputs, transports: Transports,
                 delivery: DeliveryConfig, log: Any,
                 priorities: PriorityTimeouts | None = None, clock: Callable[[], float] = time.time,
                 tracking_log: tracking.TrackingLog | None = None, outbound: OutboundRules | None = None) -> None:
        """``tracking_log``: where routing decisions and outcomes are recorded (message tracking);
        ``outbound``: the Internet Mail tab's settings by domain and the outbound size limit."""
        self.outbound = outbound or OutboundRules()
        self.spool = spool
        self.tracking = tracking_log
        self.inputs = inputs
        self.transports = transports  # route kind -> delivery agent (imsrelay.queue.agents)
        self.delivery = delivery
        self.policy = RetryPolicy(delivery.retry_intervals, delivery.lifetime, delivery.delay_notice)
        self.priorities = priorities  # Time-outs by priority (None: delivery.lifetime for every message)
        self._policies: dict[str, RetryPolicy] = {}  # priority -> its retry policy (the settings are fixed)
        self.clock = clock
        self.log = log.bind(component="qmgr")
        self.envelopes: dict[str, Envelope] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._running: set[str] = set()
        self._wake = asyncio.Event()
        self._limit = asyncio.Semaphore(delivery.max_deliveries)
        self._destinations: dict[str, tuple[asyncio.Semaphore, int]] = {}  # remote destination → (slots, users)
        self._tasks: set[asyncio.Task[None]] = set()
        self._main: asyncio.Task[None] | None = None
        self._stopping = False
        self.idle = asyncio.Event()
        self._bodies: dict[str, bytes] = {}  # messages accepted by this process, kept while queued
        self._body_bytes = 0
        self._next_compaction = 0.0
        self._next_control_check = 0.0
        self._held: dict[str, dict[str, str]] = {}  # queue id -> recipient -> why it waits (transfer mode, ETRN)
        self.etrn_released: set[str] = set()  # messages an ETRN let go for their next attempt
        self.health = QmgrHealth()
        self._last_trim = -60.0
        self._incoming: set[str] = set()  # accepted here, waiting for their first attempt (backpressure)
        self._routes: dict[tuple[str, Mailbox | None], Route] = {}  # routing decisions of _routes_table
        self._routes_table: RoutingTable | None = None
        self._route_notes: dict[int, tuple[Route, dict[str, Any]]] = {}  # id(route) -> (route, its tracking fields)
        self._routes_shared = False  # _routes_table spreads messages over equal-cost routes
        self.on_progress: Callable[[], None] | None = None  # one of them left that wait (imsrelay.ingress.flow_gate)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        recovered = await asyncio.to_thread(self.spool.recover)
        for env in recovered:
            self._track(env)
        if recovered:
            self.log.info("queue.recovered", messages=len(recovered))
            # The replay read whole segments and parsed every record: give that heap
            # back, so RSS after a restart is the queue's envelopes, not the journal.
            await asyncio.to_thread(return_freed_memory)
        self._main = asyncio.create_task(self._supervised(), name="qmgr")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._main:
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def running(self) -> bool:
        """The main loop is running (under its supervisor: a failing stage does not end it)."""
        return self._main is not None and not self._main.done()

    def submit(self, env: Envelope, message: bytes | None = None) -> None:
        """A message just made durable: schedule it now.  Its bytes are kept in memory
        (within a bound) so the first attempt needs no disk read."""
        if message is not None and self._body_bytes + len(message) <= MAX_CACHED_BODIES:
            self._bodies[env.queue_id] = message
            self._body_bytes += len(message)
        self._incoming.add(env.queue_id)
        self._track(env)

    def retry_now(self, queue_id: str | None = None) -> int:
        """Make deferred recipients due now (all messages, or one). Returns how many."""
        now = self.clock()
        count = 0
        for qid, env in list(self.envelopes.items()):
            if queue_id and qid != queue_id:
                continue
            for r in env.pending:
                r.next_attempt = now
            self._push(env)
            count += 1
        self._wake.set()
        return count

    def forget_unreachable(self) -> None:
        """Every agent forgets the next hops it found unreachable (an operator's retry)."""
        for transport in {id(t): t for t in self.transports.values()}.values():
            transport.forget_unreachable()

    def forget(self, queue_id: str) -> None:
        self._first_attempt_started(queue_id)
        self.envelopes.pop(queue_id, None)
        self._held.pop(queue_id, None)
        self.etrn_released.discard(queue_id)
        body = self._bodies.pop(queue_id, None)
        if body is not None:
            self._body_bytes -= len(body)

    @property
    def backlog(self) -> int:
        return len(self.envelopes)

    @property
    def incoming(self) -> int:
        """Messages accepted by this process still waiting for their first attempt
        (for the queue manager, or for a delivery slot): the work delivery has not
        caught up with.  Deferred mail does not count, nor attempts under way."""
        return len(self._incoming)

    def _first_attempt_started(self, queue_id: str) -> None:
        if queue_id in self._incoming:
            self._incoming.discard(queue_id)
            if self.on_progress is not None:
                self.on_progress()

    def _track(self, env: Envelope) -> None:
        self.envelopes[env.queue_id] = env
        self.idle.clear()
        self._push(env)
        self._wake.set()

    def _push(self, env: Envelope) -> None:
        due = self._next_due(env)
        if due is not None:
            heapq.heappush(self._heap, (due, next(self._seq), env.queue_id))

    def _next_due(self, env: Envelope) -> float | None:
        """When the message has a recipient to attempt; held recipients do not count."""
        held = self._held.get(env.queue_id)
        if not held:
            return env.next_due()
        times = [r.next_attempt for r in env.pending if r.address not in held]
        return min(times) if times else None

    # ------------------------------------------------------------ held mail (transfer mode, ETRN)

    def held_recipients(self, queue_id: str) -> dict[str, str]:
        """Recipient -> why it waits (``transfer:MODE`` or ``etrn:DOMAIN:ENTRY``)."""
        return dict(self._held.get(queue_id, {}))

    def held_messages(self) -> int:
        return sum(1 for held in self._held.values() if held)

    def release_held(self, reason_prefix: str) -> int:
        """Recipients held for a reason starting with ``reason_prefix`` are attempted
        again (their due times are kept: a recipient waiting for a retry still waits)."""
        released = 0
        for qid, held in list(self._held.items()):
            gone = [a for a, why in held.items() if why.startswith(reason_prefix)]
            for a in gone:
                del held[a]
            if not held:
                del self._held[qid]
            env = self.envelopes.get(qid)
            if gone and env is not None:
                released += 1
                self._push(env)
        self._wake.set()
        return released

    def release_etrn(self, node: str) -> int:
        """ETRN ``node`` (RFC 1985; ``@node`` = the domain and its sub-domains): mail held
        for it is delivered now.  Returns how many messages were started."""
        node = node.strip().lower()
        subdomains = node.startswith("@")
        name = node.lstrip("@#")

        def wanted(reason: str) -> bool:
            _, domain, entry = reason.split(":", 2)
            return any(d == name or (subdomains and d.endswith("." + name)) for d in (domain, entry))

        started = 0
        for qid, held in list(self._held.items()):
            gone = [a for a, why in held.items() if why.startswith("etrn:") and wanted(why)]
            if not gone:
                continue
            for a in gone:
                del held[a]
            if not held:
                del self._held[qid]
            env = self.envelopes.get(qid)
            if env is None:
                continue
            started += 1
            self.etrn_released.add(qid)
            for r in env.pending:
                if r.address in gone:
                    r.next_attempt = min(r.next_attempt, self.clock())
            self._push(env)
        self._wake.set()
        return started

    def _without_held(self, env: Envelope, routed: list[tuple[RecipientState, Route]]
                      ) -> list[tuple[RecipientState, Route]]:
        go = []
        for r, route in routed:
            reason = self.inputs.hold_reason(env.queue_id, route)
            if reason is None:
                go.append((r, route))
                continue
            reason = sys.intern(reason)  # one string for every message held for the same reason
            held = self._held.setdefault(env.queue_id, {})
            if r.address not in held:
                self.inputs.metrics.delivery_outcome("held").inc()
                self.log.info("delivery.held", queue_id=env.queue_id, recipient=r.address, reason=reason,
                              route=route.destination)
                self._note(tracking.DEFERRED, env.queue_id, recipient=r.address, held=True,
                            diagnostic=held_text(reason))
            r.route = sys.intern(route.destination)
            held[r.address] = reason
        return go

    # ------------------------------------------------------------ scheduling

    async def _supervised(self) -> None:
        """The main loop under supervision (docs/design.md invariant 8): an unexpected
        error is logged with its traceback, counted, backed off and the loop runs
        again; it never ends the queue manager."""
        while not self._stopping:
            try:
                await self._loop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self.health.failed("main loop", exc, time.monotonic())
                self.log.error("qmgr.internal_error", stage="main loop", error=repr(exc),
                               failures=self.health.failures, retry_in=delay, exc_info=exc)
                await asyncio.sleep(delay)

    async def _stage(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        """One housekeeping stage (operator requests, compaction): its failure (EMFILE,
        ENOSPC...) is logged, counted and backed off without stopping deliveries."""
        if not self.health.due(name, time.monotonic()):
            return
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            delay = self.health.failed(name, exc, time.monotonic())
            self.log.error("qmgr.internal_error", stage=name, error=repr(exc), failures=self.health.failures,
                           retry_in=delay, exc_info=exc)
        else:
            self.health.succeeded(name)

    async def _loop(self) -> None:
        while not self._stopping:
            now = self.clock()
            if now >= self._next_control_check:  # imsrelay queue retry/delete, at most twice a second
                self._next_control_check = now + 0.5
                await self._stage("operator requests", self._operator_requests)
            if now >= self._next_compaction:
                self._next_compaction = now + 60.0
                await self._stage("compaction", self._compact)
            self.health.succeeded("main loop")
            max_active = self.delivery.max_active_messages
            while self._heap and self._heap[0][0] <= now and len(self._running) < max_active:
                _, _, qid = heapq.heappop(self._heap)
                env = self.envelopes.get(qid)
                if env is None or qid in self._running:
                    continue
                due = self._next_due(env)
                if due is None or due > now:
                    continue
                if self._destination_crowded(env):  # leave room for the other destinations
                    heapq.heappush(self._heap, (now + 1.0, next(self._seq), qid))
                    continue
                self._running.add(qid)
                task = asyncio.create_task(self._attempt(env), name=f"deliver-{qid}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if not self.envelopes and not self._running:
                if not self.idle.is_set():
                    self._give_memory_back()
                self.idle.set()
            timeout = 1.0
            if self._heap and len(self._running) < max_active:
                timeout = min(timeout, max(0.0, self._heap[0][0] - self.clock()))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _destination_crowded(self, env: Envelope) -> bool:
        """The destination of this message's last attempt already has twice its slots
        in attempts waiting: don't add to the crowd (bounded memory, no starvation)."""
        hint = next((r.route for r in env.pending if r.route), None)
        entry = self._destinations.get(hint) if hint else None
        return entry is not None and entry[1] >= 2 * self.delivery.max_per_destination

    def _give_memory_back(self) -> None:
        """The queue just emptied: return freed heap memory to the system (glibc keeps
        it otherwise), so RSS follows the queue down, not its deepest point."""
        now = time.monotonic()
        if now - self._last_trim < 30.0:
            return
        self._last_trim = now
        return_freed_memory()

    async def _operator_requests(self) -> None:
        """``imsrelay queue retry|delete`` ran beside us: they leave requests in the
        spool's control/ directory (only this process writes the journal)."""
        for action, qid in self.spool.take_control_requests():
            if action == "retry":
                self.forget_unreachable()  # a retry really tries hosts marked unreachable
                n = self.retry_now(None if qid == "*" else qid)
                self.log.info("queue.retry_requested", queue_id=None if qid == "*" else qid, messages=n)
            elif action == "delete" and qid in self.envelopes:
                self.forget(qid)  # an attempt under way is not recorded
                await self.spool.remove(qid)
                self._note(tracking.DELETED, qid)
                self.log.info("queue.deleted", queue_id=qid)

    async def _compact(self) -> None:
        """Copy messages that stay long in the queue out of old journal segments."""
        moved = await self.spool.compact(self.envelopes)
        if moved:
            self.log.info("queue.compacted", messages=moved)

    # ------------------------------------------------------------ one attempt

    async def _attempt(self, env: Envelope) -> None:
        try:
            routed = self._without_held(env, await self._route_due(env))
            async with self._destination_slots(routed), self._limit:
                self._first_attempt_started(env.queue_id)
                await self._deliver(env, routed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never lose the message: log, retry later
            self.log.error("delivery.internal_error", queue_id=env.queue_id, error=repr(exc), exc_info=exc)
            for r in env.pending:
                r.next_attempt = after_internal_error(r, now=self.clock(), policy=self.policy).next_attempt
        finally:
            self._running.discard(env.queue_id)
            self._first_attempt_started(env.queue_id)  # (held: it waits for its link, not for us)
            self.etrn_released.discard(env.queue_id)
            body = self._bodies.pop(env.queue_id, None)  # a message that stays waits on disk, not in memory
            if body is not None:
                self._body_bytes -= len(body)
            if env.queue_id in self.envelopes:
                self._push(env)
            self._wake.set()

    async def _route_due(self, env: Envelope) -> list[tuple[RecipientState, Route]]:
        """The router's decision for each recipient due now (asked once per attempt)."""
        now = self.clock()
        due = [r for r in env.pending if r.next_attempt <= now]
        if not due:
            return []
        mailboxes = await self.inputs.lookup_mailboxes([r.address for r in due])
        table = await self.inputs.routing_table()
        return [(r, self.route_for_cached(r.address, mbx, table, env.queue_id)) for r, mbx in zip(due, mailboxes, strict=True)]

    def route_for_cached(self, recipient: str, mailbox: Mailbox | None, table: RoutingTable, queue_id: str) -> Route:
        """``router.route_for``, remembered for the routing table it was made with (a pure
        function of the recipient, its mailbox and the table; a new table — the site
        refreshes it from its settings and directory — starts afresh).  Not when the
        table spreads messages over equal-cost routes: then the queue id matters."""
        if table is not self._routes_table:
            self._routes.clear()
            self._route_notes.clear()
            self._routes_table = table
            self._routes_shared = shares_load(table)
        if self._routes_shared:
            return route_for(recipient, mailbox, table, queue_id)
        key = (recipient, mailbox)
        route = self._routes.get(key)
        if route is None:
            route = route_for(recipient, mailbox, table, queue_id)
            if len(self._routes) < MAX_CACHED_ROUTES:
                self._routes[key] = route
        return route

    @contextlib.asynccontextmanager
    async def _destination_slots(self, routed: list[tuple[RecipientState, Route]]) -> AsyncIterator[None]:
        """One of ``max_per_destination`` slots for each remote destination of the due
        recipients, taken (in a fixed order) *before* a global delivery slot: messages
        waiting for a slow or dead destination never hold the slots that other
        destinations need (Postfix's per-destination concurrency in qmgr)."""
        keys = sorted({route.destination for _, route in routed if route.kind in (RELAY, MX)})
        joined: list[str] = []  # destinations counted as used by this attempt
        held: list[asyncio.Semaphore] = []  # their slots taken so far
        try:
            for key in keys:
                sem, users = self._destinations.get(key) or (
                    asyncio.Semaphore(self.delivery.max_per_destination), 0)
                self._destinations[key] = (sem, users + 1)
                joined.append(key)
                await sem.acquire()
                held.append(sem)
            yield
        finally:
            for sem in held:
                sem.release()
            for key in joined:
                self._leave_destination(key)

    def _leave_destination(self, key: str) -> None:
        sem, users = self._destinations[key]
        if users <= 1:
            del self._destinations[key]
        else:
            self._destinations[key] = (sem, users - 1)

    async def _deliver(self, env: Envelope, routed: list[tuple[RecipientState, Route]]) -> None:
        if not routed:
            return
        message = self._bodies.get(env.queue_id)
        if message is None:
            try:
                message = await asyncio.to_thread(self.spool.read_message, env.queue_id)
            except FileNotFoundError:
                self.forget(env.queue_id)
                self.log.info("queue.deleted", queue_id=env.queue_id)
                return
        for r, route in routed:
            destination = route.destination
            if r.route != destination:  # a new decision (first attempt, or the route changed)
                self._track_route(env, r, route)
                r.route = sys.intern(destination)
        stopped: list[Recorded] = []
        plain = True  # display names kept for every recipient
        if self.outbound.active:
            routed, stopped, plain = self._outbound_checks(env, message, routed)
        groups: dict[tuple[str, bool], list[tuple[RecipientState, Route]]] = defaultdict(list)
        for r, route in routed:
            names = plain or self._keeps_display_names(r, route)
            groups[(r.route or route.destination, names)].append((r, route))  # (r.route: its destination)
        stripped = message if plain else internet_mail.strip_display_names(message)

        if len(groups) == 1:  # the common case: no task and no gathering future for it
            ((_, names), only), = groups.items()
            recorded = await self._deliver_group(env, message if names else stripped, only)
        else:
            results = await asyncio.gather(*(self._deliver_group(env, message if names else stripped, g)
                                             for (_, names), g in groups.items()))
            recorded = [rec for group in results for rec in group]
        await self._record(env, message, stopped + recorded)

    # ------------------------------------------------------------ Internet Mail tab, outbound size limit

    def _internet_settings(self, r: RecipientState, route: Route) -> DomainMailSettings | None:
        """The Internet Mail settings for a recipient leaving the organisation by SMTP
        (or to the lab's catch-all, the rest of the Internet); None for another site of
        the organisation or a local delivery."""
        if route.site is not None or not (route.kind in (RELAY, MX) or (route.kind == LOCAL and route.domain)):
            return None
        return self.outbound.settings_for(r.address.rpartition("@")[2])

    def _keeps_display_names(self, r: RecipientState, route: Route) -> bool:
        settings = self._internet_settings(r, route)
        return settings is None or settings.display_names

    def _outbound_checks(self, env: Envelope, message: bytes, routed: list[tuple[RecipientState, Route]]
                         ) -> tuple[list[tuple[RecipientState, Route]], list[Recorded], bool]:
        """Apply ``internet_mail.outbound_verdict`` to the recipients leaving by SMTP:
        (recipients that go on, failures to record (5.3.4: an NDR), whether no
        recipient has display names disabled).  Discarded recipients (an automatic
        message the domain's settings disable) are terminal here, without an NDR."""
        go: list[tuple[RecipientState, Route]] = []
        stopped: list[Recorded] = []
        plain = True
        kind: str | None = None
        classified = False
        for r, route in routed:
            remote = route.kind in (RELAY, MX) or (route.kind == LOCAL and bool(route.domain))
            if not remote:
                go.append((r, route))
                continue
            settings = self._internet_settings(r, route)
            if settings is not None and not classified and not (
                    settings.out_of_office and settings.auto_replies and settings.auto_forwards):
                kind, classified = internet_mail.classify(message), True
            verdict = internet_mail.outbound_verdict(
                kind=kind if settings is not None else None, size=len(message),
                domain=r.address.rpartition("@")[2], settings=settings,
                outbound_limit=self.outbound.max_message_size)
            if verdict is None:
                go.append((r, route))
                plain = plain and (settings is None or settings.display_names)
            elif verdict.action == internet_mail.FAIL:
                stopped.append(Recorded(r, Outcome.permanent_failure(verdict.status, verdict.text)))
            else:
                self._discard(env, r, verdict)
        return go, stopped, plain

    def _discard(self, env: Envelope, r: RecipientState, verdict: Verdict) -> None:
        """Exchange's IMS discarded such a message (Q176161): terminal, no NDR, tracked."""
        r.state, r.status, r.diagnostic, r.attempts = FAILED, verdict.status, verdict.text, r.attempts + 1
        self.inputs.metrics.delivery_outcome("discarded").inc()
        self.log.info("delivery.discarded", queue_id=env.queue_id, sender=env.sender, recipient=r.address,
                      kind=verdict.kind, status=verdict.status, diagnostic=verdict.text)
        self._note(tracking.DISCARDED, env.queue_id, recipient=r.address, kind=verdict.kind,
                   status=verdict.status, diagnostic=verdict.text)

    # ------------------------------------------------------------ message tracking

    def _note(self, event: str, queue_id: str, **fields: Any) -> None:
        """Record a message tracking event (when the site keeps them)."""
        if self.tracking is not None:
            self.tracking.record(event, queue_id, **fields)

    def _track_route(self, env: Envelope, r: RecipientState, route: Route) -> None:
        noted = self._route_notes.get(id(route))
        if noted is None or noted[0] is not route:
            noted = (route, self._route_fields(route))
            if len(self._route_notes) < MAX_CACHED_ROUTES:  # (the route is kept: its id stays its own)
                self._route_notes[id(route)] = noted
        self._note(tracking.ROUTED, env.queue_id, recipient=r.address, **noted[1])

    @staticmethod
    def _route_fields(route: Route) -> dict[str, Any]:
        """The ``routed`` tracking event's fields for a route (the same for every
        message taking it: made once per route the routing cache hands out)."""
        if route.kind == LOCAL and route.domain:  # a lab's catch-all: the rest of the Internet
            where = f"the lab's catch-all mailbox {route.mailbox} (the rest of the Internet: {route.domain})"
        elif route.kind == LOCAL:
            where = f"local mailbox {route.mailbox}"
        elif route.kind == DIRECTORY:
            where = "this site's directory service (replication)"
        elif route.kind == ATTENDANT:
            where = "this site's system attendant (Link Monitor)"
        elif route.kind == RELAY and route.server:
            where = f"SMTP to {route.host}:{route.port}, intra-site hop to the home server {route.server}"
        elif route.kind == RELAY:
            where = route.next_hop_text()
        elif route.kind == MX:
            where = f"SMTP to the MX hosts of {route.domain}"
        else:
            where = f"{'permanent' if route.permanent else 'temporary'} failure {route.status}: {route.reason}"
        extra: dict[str, str] = {"left_to": route.domain} if route.kind == LOCAL and route.domain else {}
        if route.server:
            extra["to_server"] = route.server
        return {"route": where, "kind": route.kind, "to_site": route.site, "why": "; ".join(route.steps), **extra}

    def _track_outcome(self, env: Envelope, r: RecipientState, o: Outcome, event: str) -> None:
        if event == "delivery.delivered":
            kind, _, mailbox = (r.route or "").partition(":")
            if kind == LOCAL:
                self._note(tracking.DELIVERED, env.queue_id, recipient=r.address, mailbox=f"mailbox {mailbox}",
                            diagnostic=o.diagnostic)
            elif kind == DIRECTORY:
                self._note(tracking.DELIVERED, env.queue_id, recipient=r.address,
                            mailbox="the directory service (replication)", replication=True)
            elif kind == ATTENDANT:
                self._note(tracking.DELIVERED, env.queue_id, recipient=r.address,
                            mailbox="the system attendant (Link Monitor)", diagnostic=o.diagnostic)
            else:
                self._note(tracking.TRANSFERRED, env.queue_id, recipient=r.address, next_hop=o.remote,
                            remote_queue_id=tracking.remote_queue_id(o.diagnostic), reply=o.diagnostic)
        elif event == "delivery.deferred":
            self._note(tracking.DEFERRED, env.queue_id, recipient=r.address, status=o.status,
                        diagnostic=o.diagnostic, remote=o.remote, attempts=r.attempts, next_attempt=r.next_attempt)
        elif event in ("delivery.failed", "delivery.expired"):
            self._note(tracking.FAILED if event == "delivery.failed" else tracking.EXPIRED, env.queue_id,
                        recipient=r.address, status=r.status, diagnostic=r.diagnostic, remote=o.remote,
                        attempts=r.attempts, notify=r.notify)

    async def _deliver_group(self, env: Envelope, message: bytes,
                             group: list[tuple[RecipientState, Route]]) -> list[Recorded]:
        """One group of recipients sharing a route, handed to the agent for its kind."""
        route = group[0][1]
        recipients = [r for r, _ in group]
        try:
            outcomes = await self.transports[route.kind].deliver(route, env, recipients, message)
        except Exception as exc:
            self.log.error("delivery.transport_error", queue_id=env.queue_id, error=repr(exc), exc_info=exc)
            outcomes = {r.address: Outcome.temporary("4.3.0", f"transport error: {exc}") for r in recipients}
        return [Recorded(r, outcomes.get(r.address, Outcome.temporary("4.3.0", "no result from transport")))
                for r in recipients]

    # ------------------------------------------------------------ outcomes

    async def _record(self, env: Envelope, message: bytes, recorded: list[Recorded]) -> None:
        """Apply ``queue_rules.after_attempt`` to each outcome: reports are queued
        durably first, only then is a recipient recorded as bounced (or, with a
        success report the sender asked for, before its state is saved)."""
        now = self.clock()
        policy = self.policy_for(env)
        metrics = self.inputs.metrics
        # (read the header only when something failed, or a success report is asked for)
        asked = any(rec.outcome.ok and dsn.report_wanted(rec.recipient.notify, "delivered") for rec in recorded)
        may_report = (asked or not all(rec.outcome.ok for rec in recorded)) and dsn.may_send_report(env.sender, message)
        bounce: list[tuple[RecipientState, Transition]] = []
        delayed: list[RecipientState] = []
        succeeded: list[tuple[RecipientState, str]] = []
        for rec in recorded:
            r, o = rec.recipient, rec.outcome
            if o.ok and r.state == PENDING:
                delivered(r, o)  # the common case, without after_attempt's copy (the same result)
                step = _DELIVERED
            else:
                step = after_attempt(r, o, now=now, received_at=env.received_at, policy=policy,
                                     may_report=may_report and dsn.report_wanted(r.notify, "failed"),
                                     may_warn=may_report and dsn.report_wanted(r.notify, "delayed"))
                _assign(r, step.recipient, keep_pending=step.ndr)
            fields = dict(queue_id=env.queue_id, sender=env.sender, recipient=r.address, status=o.status,
                          diagnostic=o.diagnostic, remote=o.remote, attempts=r.attempts)
            outcome = _OUTCOMES[step.event]
            metrics.delivery_outcome(outcome).inc()
            if step.event == DEFERRED_EVENT:
                self.log.info(step.event, outcome=outcome, next_attempt=r.next_attempt, **fields)
            elif step.event == EXPIRED_EVENT:
                self.log.info(step.event, outcome=outcome, priority=env.extra.get("priority", NORMAL), **fields)
            else:
                self.log.info(step.event, outcome=outcome, **fields)
            self._track_outcome(env, r, o, step.event)
            if step.ndr:
                bounce.append((r, step))
            elif step.suppressed:
                self.log.warning("delivery.ndr_suppressed", queue_id=env.queue_id, sender=env.sender or "<>",
                                 recipient=r.address, status=r.status, reason=_no_report_reason(may_report, r))
            if step.delay_notice:
                delayed.append(r)
            if may_report and o.ok and dsn.report_wanted(r.notify, "delivered"):
                action = dsn.success_action(final=(r.route or "").partition(":")[0] in (LOCAL, DIRECTORY, ATTENDANT),
                                            passed_on=o.dsn_passed)
                if action is not None:
                    succeeded.append((r, action))
        if bounce:
            await self._send_report(env, message, [(r, "failed") for r, _ in bounce])
            for r, step in bounce:
                r.state = step.recipient.state
        if delayed:
            await self._send_report(env, message, [(r, "delayed") for r in delayed])
        if succeeded:
            await self._send_report(env, message, succeeded)
        if env.queue_id not in self.envelopes:
            return  # deleted by an operator meanwhile (imsrelay queue delete)
        if env.finished:
            self.spool.finish(env.queue_id, functools.partial(self._done_failed, env.queue_id))
            self.forget(env.queue_id)
            self.log.info("message.finished", queue_id=env.queue_id, sender=env.sender)
        else:
            await self.spool.save_state(env)

    def _done_failed(self, queue_id: str, exc: BaseException) -> None:
        """A finished message's DONE record could not be written: it stays in the
        journal and is delivered again after a restart."""
        self.log.error("delivery.internal_error", queue_id=queue_id, error=repr(exc), exc_info=exc)

    def policy_for(self, env: Envelope) -> RetryPolicy:
        """The retry policy with the lifetime and delay-notice time of the message's
        priority (the IMS's Time-outs by priority)."""
        if self.priorities is None:
            return self.policy
        priority = str(env.extra.get("priority", NORMAL))
        policy = self._policies.get(priority)
        if policy is None:
            t = self.priorities.for_priority(priority)
            policy = RetryPolicy(self.delivery.retry_intervals, t.lifetime, t.delay_notice)
            if len(self._policies) < 16:  # (the priorities there are, not whatever a header says)
                self._policies[priority] = policy
        return policy

    async def _send_report(self, env: Envelope, message: bytes, reported: list[tuple[RecipientState, str]]) -> None:
        """Queue a report durably about ``reported`` (recipient, RFC 3464 action): an
        NDR (``failed``), a delay notice (``delayed``), or a success report
        (``delivered``, ``relayed``: RFC 3461 NOTIFY=SUCCESS)."""
        now = self.clock()
        kind = reported[0][1] if reported[0][1] in ("failed", "delayed") else "success"
        delay = kind == "delayed"
        statuses = [
            dsn.RecipientStatus(
                final_recipient=r.address, original_recipient=r.orcpt or r.original, action=action,
                status=report_status(r.status, delay=delay) if kind != "success" else "2.0.0",
                diagnostic="" if action == "delivered" else r.diagnostic or "",  # (not a mailbox's file name)
                remote_mta=r.remote if action != "delivered" else None,
                last_attempt=datetime.fromtimestamp(now, UTC),
                will_retry_until=datetime.fromtimestamp(env.received_at + self.policy_for(env).lifetime, UTC) if delay else None)
            for r, action in reported
        ]
        report = await asyncio.to_thread(  # the email package on a large original: off the loop
            dsn.build_report,
            original=message, envelope_sender=env.sender, recipients=statuses,
            reporter=self.inputs.reporting_site(), queue_id=env.queue_id,
            arrival_date=datetime.fromtimestamp(env.received_at, UTC), now=datetime.fromtimestamp(now, UTC),
            postmaster=self.inputs.postmaster_address(),
            include_full_message=dsn.returns_full_message(env.ret, kind), envid=env.envid)
        ndr_recipients = [RecipientState(env.sender, env.sender)]
        copy_to = await self.inputs.ndr_copy_address() if kind == "failed" else None
        if copy_to and copy_to.lower() != env.sender.lower():
            ndr_recipients.append(RecipientState(copy_to, copy_to))  # Q190708: a copy for the administrator
        ndr = Envelope(queue_id=new_queue_id(), sender="", recipients=ndr_recipients,
                       received_at=now, client="", helo="", origin="ndr", extra={"report_for": env.queue_id},
                       body_8bit=not report.isascii())
        await self.inputs.enqueue_local(ndr, report)
        addresses = [r.address for r, _ in reported]
        if kind == "failed":
            self.inputs.metrics.ndrs.inc()
            self._note(tracking.NDR_SENT, env.queue_id, ndr_id=ndr.queue_id, recipients=addresses)
            self.log.info("delivery.ndr_queued", queue_id=env.queue_id, ndr_id=ndr.queue_id, sender=env.sender,
                          recipients=addresses)
        elif delay:
            self._note(tracking.DELAY_NOTICE_SENT, env.queue_id, ndr_id=ndr.queue_id, recipients=addresses)
            self.log.info("delivery.delay_notice_queued", queue_id=env.queue_id, ndr_id=ndr.queue_id,
                          sender=env.sender, recipients=addresses)
        else:
            actions = {r.address: action for r, action in reported}
            self._note(tracking.DSN_SENT, env.queue_id, dsn_id=ndr.queue_id, recipients=addresses, actions=actions,
                       envid=env.envid)
            self.log.info("delivery.dsn_queued", queue_id=env.queue_id, dsn_id=ndr.queue_id, sender=env.sender,
                          recipients=addresses, actions=actions)


def _no_report_reason(may_report: bool, r: RecipientState) -> str:
    """Why a failed recipient gets no NDR (``delivery.ndr_suppressed``)."""
    if may_report:
        return f"the sender asked for no failure report (NOTIFY={r.notify}, RFC 3461)"
    return "null sender or automatic report: no NDR is sent"


_RECIPIENT_FIELDS = tuple(f.name for f in fields(RecipientState))
_OUTCOMES = {e: e.split(".")[1] for e in (DELIVERED_EVENT, FAILED_EVENT, EXPIRED_EVENT, DEFERRED_EVENT)}
_DELIVERED = Transition(RecipientState("", state=DELIVERED), DELIVERED_EVENT)  # (its recipient is never read)


def delivered(live: RecipientState, outcome: Outcome) -> None:
    """A pending recipient delivered by ``outcome``: what ``after_attempt`` and
    ``_assign`` make of it, set in place (one attempt more, the outcome's status,
    reply and host, ``delivered``), without copying the recipient twice."""
    live.attempts += 1
    live.status, live.diagnostic, live.remote = outcome.status, outcome.diagnostic, outcome.remote
    live.state = DELIVERED


def _assign(live: RecipientState, new: RecipientState, *, keep_pending: bool) -> None:
    """Record ``new`` in the envelope's own recipient object (the envelope holds it)."""
    state = live.state if keep_pending else new.state
    for name in _RECIPIENT_FIELDS:  # slotted dataclass: no __dict__
        setattr(live, name, getattr(new, name))
    live.state = state
