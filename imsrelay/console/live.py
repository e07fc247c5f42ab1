"""Live updates: what changed in the organisation, for the console's open pages.

While at least one page listens (``/api/events``), the feed asks every site once a
second (``interval``) for a cheap picture — queue, replication, directory USN, the
tracking events since the last look (an indexed query: a ``delivered`` event is new
mail, without listing any mailbox), the lab stage — and tells the pages which
*topics* changed (``queue:SiteA``, ``mail:SiteB``, ``tracking:SiteB``,
``replication:SiteC``, ``directory:SiteA``, ``linkmon:SiteA`` (a Link Monitor target's
state or answers), ``stage``); a page re-reads only the views
those topics touch.  Nothing is asked while nobody listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from imsrelay.console.backend import Organisation, Reply
from imsrelay.console.views import (
    changed_topics,
    link_monitor_signature,
    queue_signature,
    replication_signature,
    signature,
)

MAX_SUBSCRIBERS = 32


class LiveFeed:
    def __init__(self, organisation: Organisation, *, stage: Any = None, interval: float = 1.0) -> None:
        self.org = organisation
        self.stage = stage
        self.interval = interval
        self._subscribers: list[asyncio.Queue[list[str] | None]] = []
        self._last: dict[str, str] = {}
        self._poke = asyncio.Event()
        self._seen: dict[str, tuple[float, float]] = {}  # site -> newest (event, delivery) time seen
        self._polled = 0.0

    def subscribe(self) -> asyncio.Queue[list[str] | None]:
        if len(self._subscribers) >= MAX_SUBSCRIBERS:  # the oldest page stops listening
            self._subscribers.pop(0).put_nowait(None)
        queue: asyncio.Queue[list[str] | None] = asyncio.Queue(maxsize=64)
        self._subscribers.append(queue)
        self._poke.set()
        return queue

    def unsubscribe(self, queue: asyncio.Queue[list[str] | None]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(queue)

    def poke(self) -> None:
        """Look again now (after an action from the console)."""
        self._poke.set()

    def close(self) -> None:
        for q in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)
        self._subscribers.clear()

    async def run(self) -> None:
        while True:
            if self._subscribers:
                try:
                    now = await self.snapshot()
                except Exception:  # noqa: BLE001 - a site going away must not end the feed
                    now = self._last
                changed = changed_topics(self._last, now) if self._last else []
                self._last = now
                if changed:
                    self._publish(changed)
            else:
                self._last = {}
                self._seen = {}
                self._polled = 0.0
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.interval)

    def _publish(self, topics: list[str]) -> None:
        for q in list(self._subscribers):
            try:
                q.put_nowait(topics)
            except asyncio.QueueFull:  # a page that does not read: drop the oldest news
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
                q.put_nowait(topics)

    async def snapshot(self) -> dict[str, str]:
        now = time.time()
        since = (self._polled or now) - 5.0  # events are written by a thread: look a little back
        self._polled = now
        statuses, queues, replication, monitors, recent = await asyncio.gather(
            self.org.each("GET", "/status"), self.org.each("GET", "/queue"),
            self.org.each("GET", "/replication/status"), self.org.each("GET", "/link-monitors"),
            self.org.each("GET", "/api/v1/tracking", params={"since": f"{since:.3f}", "limit": "200"}))
        picture: dict[str, str] = {"sites": signature(self.org.sites)}
        for site in self.org.sites:
            status = statuses[site]
            picture[f"directory:{site}"] = signature(_get(status, "directory", "learned_sites", "site_addressing"))
            picture[f"queue:{site}"] = signature(queue_signature(queues[site].body) if queues[site].ok else None)
            repl = replication[site]
            picture[f"replication:{site}"] = signature(replication_signature(repl.body) if repl.ok else None)
            picture[f"linkmon:{site}"] = signature(
                link_monitor_signature(monitors[site].body) if monitors[site].ok else None)
            newest = _newest(recent[site], self._seen.get(site, (now, now)))
            self._seen[site] = newest
            picture[f"tracking:{site}"] = signature(newest[0])
            picture[f"mail:{site}"] = signature(newest[1])
        if self.stage is not None:
            picture["stage"] = signature(await asyncio.to_thread(self.stage.state))
        return picture


def _get(reply: Reply, *keys: str) -> Any:
    if not reply.ok or not isinstance(reply.body, dict):
        return None
    return [reply.body.get(k) for k in keys]


def _newest(reply: Reply, seen: tuple[float, float]) -> tuple[float, float]:
    """(newest event time, newest delivery time) of a site: what it was, or later."""
    latest, delivered = seen
    if reply.ok and isinstance(reply.body, dict):
        for e in reply.body.get("events", []):
            t = float(e.get("time") or 0.0)
            latest = max(latest, t)
            if e.get("event") == "delivered":
                delivered = max(delivered, t)
    return latest, delivered
