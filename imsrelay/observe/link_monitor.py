"""The Link Monitor at work (KB Q246674): pings out, answers in, state kept and shown.

Each administrator-defined monitor (``[[link_monitors]]``, ``model.settings.LinkMonitorConfig``)
sends, every polling interval, a ping message to each of its targets:

* a site (``SiteB``) or an ``attendant@domain`` address: the remote site's *system
  attendant* (``attendant@`` its routing domain, ``routing.router.ATTENDANT``) sends the
  ping back to its sender, as Exchange's system attendant returned the Link Monitor's
  test message;
* any other address: a foreign system, whose NDR (RFC 3464, carrying the ping's
  headers) is the answer, as Exchange watched foreign links through a non-existent
  custom recipient.

A ping is a normal message through the queue's door (``enqueue_local``): it waits
in the queue, is retried and its link can be cut like any mail.  Its sender is this
site's system attendant (``attendant@`` the install-time site domain, unique per
site), so answers come back to the attendant route, never to a mailbox.  The ping
carries ``X-Link-Monitor: ping <id>``, the answer ``X-Link-Monitor: reply <id>``
(or the NDR quotes the ping's headers); the id matches the answer to the ping and
gives the round trip.  The decisions (up, warning, alert) are
``imsrelay.policy.link_monitor``'s; this module keeps the states, sends the pings,
recognises answers, and mails the administrator on alert and on recovery.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import SMTP
from typing import Any

from imsrelay.model.envelope import Envelope, RecipientState, new_queue_id
from imsrelay.model.settings import LinkMonitorConfig
from imsrelay.observe.metrics import SiteMetrics
from imsrelay.policy import link_monitor as lm

HEADER = "X-Link-Monitor"
_ID = re.compile(r"^\s*(ping|reply)\s+(lm-[0-9a-f]{20})\s*$", re.I)
_QUOTED_PING = re.compile(rb"X-Link-Monitor:\s*ping\s+(lm-[0-9a-f]{20})", re.I)
_FAILED = re.compile(rb"^Action:\s*failed\s*$", re.I | re.M)
_EXPIRED = re.compile(rb"^Status:\s*[45]\.4\.7\b", re.I | re.M)  # our own queue gave up: no answer
MAX_PENDING = 10_000  # pings remembered at once (all monitors): the oldest go first
MAX_SCAN = 256 * 1024  # bytes of an NDR searched for the ping's id

Enqueue = Callable[[Envelope, bytes], Awaitable[None]]


@dataclass(frozen=True)
class Ping:
    monitor: str
    target: str
    address: str
    sent_at: float


def thresholds_of(m: LinkMonitorConfig) -> lm.Thresholds:
    return lm.Thresholds(m.interval, m.warning_after, m.alert_after)


def parse_marker(value: str | None) -> tuple[str, str] | None:
    """(``ping``|``reply``, id) from an ``X-Link-Monitor`` header, or None (pure)."""
    if not value:
        return None
    found = _ID.match(value)
    return (found.group(1).lower(), found.group(2).lower()) if found else None


def quoted_ping(message: bytes) -> str | None:
    """The id of a ping an NDR quotes, when the report says the delivery failed (pure).
    A ping that expired in a queue (4.4.7/5.4.7) was never answered: its NDR is no answer."""
    head = message[:MAX_SCAN]
    found = _QUOTED_PING.search(head)
    if found is None or not _FAILED.search(head) or _EXPIRED.search(head):
        return None
    return found.group(1).decode().lower()


def _render(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=SMTP)


class LinkMonitors:
    """The site's Link Monitors: their targets' states, the ping loop and the attendant."""

    def __init__(self, monitors: tuple[LinkMonitorConfig, ...], *, site: str, attendant: str, hostname: str,
                 resolve: Callable[[str], Awaitable[str | None]], enqueue: Enqueue,
                 notify_address: Callable[[str | None], Awaitable[str | None]],
                 answers_to: Callable[[str], Awaitable[bool]], metrics: SiteMetrics,
                 log: Any, clock: Callable[[], float] = time.time) -> None:
        """``attendant``: this site's system attendant address (the pings' sender);
        ``resolve``: a target → the address its ping goes to (None: no route yet);
        ``notify_address``: a monitor's ``notify`` → where its alert mail goes (None: nowhere);
        ``answers_to``: whether a ping's sender is a system attendant of the organisation
        (only those are answered: the attendant is no reflector for forged senders)."""
        self.monitors = monitors
        self.site = site
        self.attendant = attendant
        self.hostname = hostname
        self.resolve = resolve
        self.enqueue = enqueue
        self.notify_address = notify_address
        self.answers_to = answers_to
        self.metrics = metrics
        self.log = log
        self.clock = clock
        now = clock()
        self.status: dict[tuple[str, str], lm.TargetStatus] = {
            (m.name, t): lm.initial(t, now) for m in monitors for t in m.targets}
        self.problems: dict[tuple[str, str], str] = {}  # a target that cannot be pinged now, and why
        self.pending: dict[str, Ping] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        for m in monitors:
            for t in m.targets:
                metrics.set_link_state(m.name, t, lm.UNKNOWN)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self.monitors and self._task is None:
            self._task = asyncio.create_task(self._run(), name="link-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _step(self) -> float:
        """How often the loop looks: a tenth of the shortest threshold, 50 ms to 5 s."""
        shortest = min(min(m.interval, m.warning_after) for m in self.monitors)
        return min(5.0, max(0.05, shortest / 10))

    async def _run(self) -> None:
        step = self._step()
        while True:
            try:
                await self.poll()
            except Exception as exc:  # keep monitoring: one bad round is logged, not fatal
                self.log.warning("link_monitor.poll_failed", error=repr(exc))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=step)
            except TimeoutError:
                pass

    async def poll(self) -> None:
        """One round: each target's state from the time passed, and the pings due."""
        for m in self.monitors:
            th = thresholds_of(m)
            for target in m.targets:
                key = (m.name, target)
                status, change = lm.tick(self.status[key], self.clock(), th)
                self.status[key] = status
                if change is not None:
                    await self._changed(m, change)
                if lm.due(self.status[key], self.clock(), th):
                    await self._ping(m, target)

    # ------------------------------------------------------------ pings out

    async def _ping(self, m: LinkMonitorConfig, target: str) -> None:
        key = (m.name, target)
        now = self.clock()
        address = await self.resolve(target)
        if address is None:
            self.problems[key] = f"no route to site {target} yet (Connected Sites, or Check Now)"
            self.status[key] = replace(self.status[key], last_sent=now)  # try again next interval
            return
        self.problems.pop(key, None)
        ping_id = f"lm-{secrets.token_hex(10)}"
        msg = EmailMessage()
        msg["From"] = f"System Attendant ({self.site}) <{self.attendant}>"
        msg["To"] = address
        msg["Subject"] = f"Link Monitor {m.name}: ping {target}"
        msg["Date"] = email.utils.formatdate(now, localtime=False)
        msg["Message-ID"] = f"<{ping_id}@{self.hostname}>"
        msg[HEADER] = f"ping {ping_id}"
        msg.set_content(f"A Link Monitor test message from site {self.site} (monitor {m.name}, "
                        f"target {target}).\nThe system attendant of the remote site returns it; "
                        "a foreign system's non-delivery report answers it too (KB Q246674).\n")
        raw = _render(msg)
        env = Envelope(queue_id=new_queue_id(), sender=self.attendant,
                       recipients=[RecipientState(address, address, notify="FAILURE")], received_at=now,
                       origin="local", extra={"link_monitor": ping_id}, envid=ping_id, ret="HDRS")
        await self.enqueue(env, raw)
        self.pending[ping_id] = Ping(m.name, target, address, now)
        while len(self.pending) > MAX_PENDING:
            self.pending.pop(next(iter(self.pending)))
        self.status[key] = lm.sent(self.status[key], now)
        self.metrics.link_pings.labels(m.name, target).inc()
        self.log.debug("link_monitor.ping", monitor=m.name, target=target, address=address, ping=ping_id,
                      queue_id=env.queue_id)

    # ------------------------------------------------------------ the attendant: answers in

    async def receive(self, env: Envelope, message: bytes) -> str:
        """A message to this site's system attendant: a ping of another site (answered),
        an answer to one of ours (recorded), an NDR of one of ours (recorded).  Returns
        what it was, for the delivery's diagnostic."""
        headers = BytesHeaderParser().parsebytes(message)
        marker = parse_marker(headers.get(HEADER))
        if marker is not None and marker[0] == "ping":
            if not env.sender:
                self.log.info("link_monitor.ignored", queue_id=env.queue_id, reason="a ping with a null sender")
                return "ping with a null sender: not answered"
            if not await self.answers_to(env.sender):
                self.log.info("link_monitor.ignored", queue_id=env.queue_id, sender=env.sender,
                              reason="a ping from no system attendant of the organisation: not answered")
                return f"ping from {env.sender}: not a system attendant of the organisation, not answered"
            await self._answer_ping(env, headers, marker[1])
            return f"ping {marker[1]} answered"
        ping_id = marker[1] if marker is not None else (quoted_ping(message) if not env.sender else None)
        how = "reply" if marker is not None else "ndr"
        if ping_id is None:
            self.log.info("link_monitor.ignored", queue_id=env.queue_id, sender=env.sender or "<>",
                          reason="not a Link Monitor ping, answer or failure report")
            return "not a Link Monitor message: discarded by the system attendant"
        ping = self.pending.pop(ping_id, None)
        if ping is None:
            self.log.info("link_monitor.ignored", queue_id=env.queue_id, ping=ping_id,
                          reason="an answer to a ping this site does not know (answered already, or before a restart)")
            return f"{how} to unknown ping {ping_id}"
        await self._answered(ping, how)
        return f"{how} to ping {ping_id}"

    async def _answer_ping(self, env: Envelope, headers: Any, ping_id: str) -> None:
        now = self.clock()
        reply = EmailMessage()
        reply["From"] = f"System Attendant ({self.site}) <{self.attendant}>"
        reply["To"] = env.sender
        reply["Subject"] = f"Re: {headers.get('Subject', 'Link Monitor ping')}"
        reply["Date"] = email.utils.formatdate(now, localtime=False)
        reply["Message-ID"] = email.utils.make_msgid(domain=self.hostname)
        if headers.get("Message-ID"):
            reply["In-Reply-To"] = headers["Message-ID"]
        reply["Auto-Submitted"] = "auto-replied"
        reply[HEADER] = f"reply {ping_id}"
        reply.set_content(f"The system attendant of site {self.site} returns Link Monitor ping {ping_id}.\n")
        out = Envelope(queue_id=new_queue_id(), sender="", recipients=[RecipientState(env.sender, env.sender)],
                       received_at=now, origin="local", extra={"link_monitor_reply": ping_id, "report_for": env.queue_id})
        await self.enqueue(out, _render(reply))
        self.log.debug("link_monitor.answered_ping", ping=ping_id, to=env.sender, queue_id=env.queue_id)

    async def _answered(self, ping: Ping, how: str) -> None:
        m = next((x for x in self.monitors if x.name == ping.monitor), None)
        key = (ping.monitor, ping.target)
        if m is None or key not in self.status:
            return
        now = self.clock()
        status, change = lm.answered(self.status[key], ping.sent_at, now, thresholds_of(m))
        self.status[key] = status
        if status.last_rtt is not None:
            self.metrics.link_rtt.labels(m.name, ping.target).set(status.last_rtt)
        self.metrics.link_answers.labels(m.name, ping.target).inc()
        self.log.debug("link_monitor.answer", monitor=m.name, target=ping.target, how=how,
                      round_trip=round(now - ping.sent_at, 3))
        if change is not None:
            await self._changed(m, change)

    # ------------------------------------------------------------ state changes

    async def _changed(self, m: LinkMonitorConfig, change: lm.Transition) -> None:
        self.metrics.set_link_state(m.name, change.target, change.state)
        self.log.info("link_monitor.state", monitor=m.name, target=change.target, state=change.state,
                      previous=change.previous, reason=change.reason)
        if lm.mails_administrator(change):
            await self._mail_administrator(m, change)

    async def _mail_administrator(self, m: LinkMonitorConfig, change: lm.Transition) -> None:
        to = await self.notify_address(m.notify)
        if to is None:
            self.log.info("link_monitor.no_notify", monitor=m.name,
                          reason="no notify address and no notifications.administrator: no alert mail")
            return
        word = {lm.ALERT: "ALERT", lm.UP: "back up"}.get(change.state, change.state)
        msg = EmailMessage()
        msg["From"] = f"System Attendant ({self.site}) <{self.attendant}>"
        msg["To"] = to
        msg["Subject"] = f"Link Monitor {m.name}: {change.target} {word}"
        msg["Date"] = email.utils.formatdate(change.at, localtime=False)
        msg["Message-ID"] = email.utils.make_msgid(domain=self.hostname)
        msg["Auto-Submitted"] = "auto-generated"
        status = self.status[(m.name, change.target)]
        msg.set_content(
            f"Link Monitor {m.name} at site {self.site}: the link to {change.target} is now {change.state} "
            f"(was {change.previous}).\nReason: {change.reason}.\n"
            f"Thresholds: warning after {m.warning_after:g}s, alert after {m.alert_after:g}s; "
            f"a ping every {m.interval:g}s.\n"
            f"Pings sent {status.pings}, answered {status.answers}.\n(KB Q246674)\n")
        env = Envelope(queue_id=new_queue_id(), sender="", recipients=[RecipientState(to, to)],
                       received_at=self.clock(), origin="local", extra={"link_monitor_alert": m.name})
        await self.enqueue(env, _render(msg))
        self.log.info("link_monitor.notified", monitor=m.name, target=change.target, state=change.state, to=to)

    # ------------------------------------------------------------ what is shown

    def snapshot(self) -> list[dict[str, Any]]:
        """The monitors with their targets' states (the console's monitor window, the API)."""
        now = self.clock()
        out = []
        for m in self.monitors:
            targets = []
            for t in m.targets:
                d = self.status[(m.name, t)].as_dict(now)
                d["problem"] = self.problems.get((m.name, t))
                targets.append(d)
            out.append({"name": m.name, "state": lm.worst([str(t["state"]) for t in targets]),
                        "interval": m.interval, "warning_after": m.warning_after, "alert_after": m.alert_after,
                        "notify": m.notify, "targets": targets})
        return out

    def summary(self) -> dict[str, str]:
        """``monitor: target`` → state, for ``/ready``'s details."""
        return {f"{m}: {t}": s.state for (m, t), s in self.status.items()}
