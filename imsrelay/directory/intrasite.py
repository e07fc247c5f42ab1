"""Intra-site directory replication: every server of a site holds the whole directory.

Exchange 5.5 replicated the directory between the servers of one site multi-master,
by notification over RPC, with a backstop (KB Q199354: 300 s + 30 s per server; KB
Q170334).  Here each server keeps its own directory database (its own invocation id
and USNs) and, for each other server of the site (``[[servers]]``), a high-water mark
of that server's USNs:

* **pull** (``IntraSite.pull``): ``GET /directory/intrasite/changes?since=USN`` at the
  peer's admin endpoint gives the objects changed there above the mark, in batches;
  they are merged with ``Directory.apply`` (the greatest stamp wins: idempotent and
  order-independent, the same join as inter-site replication), and the mark advances;
* **notification**: a change made on a server (a mailbox added, Site Addressing, an
  update from another site received by the bridgehead) is announced to the site's
  other servers within a fraction of a second (``POST /directory/intrasite/notify``),
  which pull at once;
* **backstop**: each server also pulls from every other one on a schedule
  (``replication.intrasite_interval``), so a lost notification (a server down) costs
  at most that long.

The calls carry the site's admin token (every server of a site has the same one): a
direct call inside a site, as Exchange used RPC.  What a peer sends is checked with the
rules of every replicated object (``model.object_rules``) before it is merged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from imsrelay.directory.store import Directory
from imsrelay.model.object_rules import object_problem
from imsrelay.model.objects import DirObject
from imsrelay.model.settings import SiteConfig, SiteServer, intrasite_interval

BATCH = 500  # objects per pull answer
NOTIFY_DELAY = 0.05  # changes made together are announced together
TIMEOUT = 10.0


def _key(server: str, what: str) -> str:
    return f"intrasite.{server.lower()}.{what}"


# ------------------------------------------------------------------ pure-ish halves (one directory)


def changes_since(directory: Directory, server: str, since: int, invocation: str,
                  limit: int = BATCH, passwords_after: float | None = None) -> dict[str, Any]:
    """What this server answers a pull: the first batch of its objects changed above
    ``since`` (from 0 when the puller knows another invocation of this database), and
    with ``passwords_after`` the password hashes set after that time (the site's
    servers share their users' passwords, as Exchange's servers shared the domain's
    accounts; only scrypt hashes travel)."""
    own = directory.invocation
    if invocation != own:
        since = 0
    batches, highest = directory.change_batches(since, limit)
    from_usn, to_usn, objects = batches[0]
    answer: dict[str, Any] = {"server": server, "invocation": own, "highest_usn": highest, "since_usn": since,
                              "from_usn": from_usn, "to_usn": to_usn, "more": to_usn < highest,
                              "objects": [o.to_wire() for o in objects]}
    if passwords_after is not None:
        answer["passwords"] = [list(r) for r in directory.credentials_since(passwords_after)]
    return answer


def apply_changes(directory: Directory, peer: str, answer: dict[str, Any], *,
                  receiving_site: str, now: float) -> dict[str, Any]:
    """Merge one pull answer from ``peer`` and advance its high-water mark (one
    transaction).  Objects that break the rules of replicated objects are left out
    and reported; the rest apply whatever order or number of times they arrive."""
    objects = [DirObject.from_wire(w) for w in answer["objects"]]
    refused = [(o.object_id, why) for o in objects if (why := object_problem(o, receiving_site=receiving_site))]
    bad = {r[0] for r in refused}
    with directory.transaction():
        before = directory.highest_usn
        known = directory.get_meta(_key(peer, "invocation")) or ""
        mark = int(directory.get_meta(_key(peer, "high_water")) or 0)
        if known != answer["invocation"]:
            mark = 0  # another database there (rebuilt): it answered from USN 0
        applied, ignored = directory.apply(o for o in objects if o.object_id not in bad)
        passwords = [(str(r[0]), str(r[1]), float(r[2])) for r in answer.get("passwords", ())]
        passwords_set = directory.merge_credentials(passwords)
        if passwords:
            directory.set_meta(_key(peer, "passwords_after"),
                               repr(max(float(directory.get_meta(_key(peer, "passwords_after")) or 0.0),
                                        *(r[2] for r in passwords))))
        if int(answer["from_usn"]) <= mark:  # the answer covers (from_usn, to_usn] completely
            mark = max(mark, int(answer["to_usn"]))
        directory.set_meta(_key(peer, "invocation"), str(answer["invocation"]))
        directory.set_meta(_key(peer, "high_water"), str(mark))
        directory.set_meta(_key(peer, "last_pull"), repr(now))
        directory.set_meta(_key(peer, "applied"),
                           str(int(directory.get_meta(_key(peer, "applied")) or 0) + applied))
        directory.set_meta(_key(peer, "last_error"), "")
        highest = directory.highest_usn
        passwords_mark = directory.credentials_mark
    return {"applied": applied, "ignored": ignored, "refused": refused, "high_water": mark,
            "passwords": passwords_set,
            "more": bool(answer.get("more")), "highest_before": before, "highest_usn": highest,
            "passwords_mark": passwords_mark}


def peer_state(directory: Directory, peer: str) -> dict[str, Any]:
    def meta(what: str) -> str:
        return directory.get_meta(_key(peer, what)) or ""
    return {"server": peer, "invocation": meta("invocation"), "high_water": int(meta("high_water") or 0),
            "passwords_after": float(meta("passwords_after") or 0.0),
            "last_pull": float(meta("last_pull")) if meta("last_pull") else None,
            "last_error": meta("last_error") or None, "applied": int(meta("applied") or 0)}


# ------------------------------------------------------------------ the I/O edge


class IntraSite:
    """One server's side of its site's directory replication."""

    def __init__(self, config: SiteConfig, directory: Directory, *, log: Any,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.directory = directory
        self.peers: tuple[SiteServer, ...] = tuple(s for s in config.peer_servers if s.admin)
        self.interval = intrasite_interval(config.replication, len(config.servers))
        self.log = log.bind(component="intrasite")
        self._clock = clock
        self._token = config.admin.resolved_token() or ""
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._locks = {p.name.lower(): asyncio.Lock() for p in self.peers}
        self._wanted: dict[str, asyncio.Event] = {p.name.lower(): asyncio.Event() for p in self.peers}
        self._notify_task: asyncio.Task[None] | None = None
        # the directory's state already announced to (or learned from) the peers: (highest USN, last password set)
        self._announced: tuple[int, float] = (-1, -1.0)
        self._loop: asyncio.AbstractEventLoop | None = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for s in self.config.peer_servers:
            if not s.admin:
                self.log.warning("intrasite.no_admin_endpoint", peer=s.name,
                                 reason="[[servers]] gives no admin URL for it: the directory does not replicate "
                                        "with that server")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))
        self.directory.listeners.append(self._changed)
        for peer in self.peers:
            self._tasks.append(asyncio.create_task(self._peer_loop(peer), name=f"intrasite-{peer.name}"))
        for peer in self.peers:
            self._wanted[peer.name.lower()].set()  # catch up at start
        if self.peers:
            self._schedule_notify()  # and tell the others this server is back: they pull what it has

    async def stop(self) -> None:
        if self._changed in self.directory.listeners:
            self.directory.listeners.remove(self._changed)
        tasks = [*self._tasks, *([self._notify_task] if self._notify_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------ notification

    def _changed(self) -> None:
        """(The directory's thread) something changed here: announce it soon."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._schedule_notify)

    def _schedule_notify(self) -> None:
        if self.peers and (self._notify_task is None or self._notify_task.done()):
            self._notify_task = asyncio.create_task(self._notify_soon(), name="intrasite-notify")

    async def _notify_soon(self) -> None:
        await asyncio.sleep(NOTIFY_DELAY)
        state = await self.directory.run(self._state)
        if state[0] <= self._announced[0] and state[1] <= self._announced[1]:
            return  # only what was pulled from the peers themselves: nothing new for them
        self._announced = state
        await asyncio.gather(*(self._notify(p) for p in self.peers))

    async def _notify(self, peer: SiteServer) -> None:
        assert self._session is not None
        try:
            async with self._session.post(f"{peer.admin}/directory/intrasite/notify",
                                          json={"server": self.config.server}, headers=self._headers()) as r:
                if r.status >= 300:
                    raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
            self.log.debug("intrasite.notified", peer=peer.name)
        except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError) as exc:
            self.log.info("intrasite.notify_failed", peer=peer.name, error=str(exc) or repr(exc),
                          reason=f"the backstop pull ({self.interval:.0f}s) brings the change there")

    def _state(self) -> tuple[int, float]:
        return self.directory.highest_usn, self.directory.credentials_mark

    def notified(self, server: str) -> bool:
        """A peer announced a change: pull from it now.  False: not a server of this site."""
        event = self._wanted.get(server.lower())
        if event is None:
            return False
        event.set()
        return True

    # ------------------------------------------------------------ pulling

    async def _peer_loop(self, peer: SiteServer) -> None:
        wanted = self._wanted[peer.name.lower()]
        while True:
            try:
                await asyncio.wait_for(wanted.wait(), self.interval)
            except TimeoutError:
                pass  # the backstop
            wanted.clear()
            try:
                await self.pull(peer)
            except Exception as exc:  # keep the schedule; the next round retries
                self.log.info("intrasite.pull_failed", peer=peer.name, error=str(exc) or repr(exc))
                await self.directory.run(self.directory.set_meta, _key(peer.name, "last_error"),
                                         str(exc) or repr(exc))

    async def pull(self, peer: SiteServer) -> dict[str, Any]:
        """Pull every change of ``peer`` above this server's mark of it (Request Now
        inside the site)."""
        assert self._session is not None
        counts = {"applied": 0, "ignored": 0, "refused": 0, "passwords": 0, "batches": 0}
        async with self._locks[peer.name.lower()]:
            for _ in range(10_000):  # bounded: a batch always advances the mark
                state = await self.directory.run(peer_state, self.directory, peer.name)
                params = {"since": str(state["high_water"]), "invocation": state["invocation"],
                          "passwords_after": repr(state["passwords_after"])}
                async with self._session.get(f"{peer.admin}/directory/intrasite/changes", params=params,
                                             headers=self._headers()) as r:
                    if r.status != 200:
                        raise RuntimeError(f"{peer.name}: HTTP {r.status}: {(await r.text())[:200]}")
                    answer = await r.json()
                result = await self.directory.run(apply_changes, self.directory, peer.name, answer,
                                                  receiving_site=self.config.site, now=self._clock())
                if result["highest_before"] <= self._announced[0]:  # what the pull added came from the peers
                    self._announced = (max(self._announced[0], result["highest_usn"]),
                                       max(self._announced[1], result["passwords_mark"]))
                counts["applied"] += result["applied"]
                counts["ignored"] += result["ignored"]
                counts["refused"] += len(result["refused"])
                counts["passwords"] += result["passwords"]
                counts["batches"] += 1
                for object_id, why in result["refused"]:
                    self.log.warning("intrasite.refused_object", peer=peer.name, object_id=object_id, reason=why)
                if not result["more"]:
                    break
        if counts["applied"] or counts["passwords"]:
            self.log.info("intrasite.applied", peer=peer.name, applied=counts["applied"], ignored=counts["ignored"],
                          batches=counts["batches"], passwords=counts["passwords"])
        return {"server": peer.name, **counts}

    async def pull_all(self) -> list[dict[str, Any]]:
        """Pull from every other server of the site now."""
        out = []
        for peer in self.peers:
            try:
                out.append(await self.pull(peer))
            except Exception as exc:
                await self.directory.run(self.directory.set_meta, _key(peer.name, "last_error"), str(exc) or repr(exc))
                out.append({"server": peer.name, "error": str(exc) or repr(exc)})
        return out

    async def status(self) -> dict[str, Any]:
        invocation, highest = await self.directory.run(lambda: (self.directory.invocation, self.directory.highest_usn))
        peers = [dict(await self.directory.run(peer_state, self.directory, p.name), admin=p.admin,
                      host=f"{p.host}:{p.port}") for p in self.peers]
        return {"server": self.config.server, "site": self.config.site, "invocation": invocation,
                "highest_usn": highest, "interval": self.interval, "bridgehead": self.config.bridgehead,
                "servers": [s.name for s in self.config.servers], "peers": peers}
