"""One view of a site of several servers: the other servers' admin endpoints, asked together.

In Exchange 5.5 the Message Tracking Center read the tracking log of every server of a
site, and the Administrator showed each server's queues (issue 24 item 5).  Here each
server of a site (``[[servers]]``) keeps its own queue, tracking log and the Maildirs of
its home mailboxes; a view of the whole site asks every server's admin endpoint at once
(``SiteServers.ask``: aiohttp, in parallel, a bounded time-out each), merges the answers
and labels each item with the server it came from.  A server that does not answer is
named in the answer (``"servers": {"Server1": {"ok": false, "error": ...}}``): a partial
answer, never an error of the whole request.

Two query parameters steer it (``scope``):

* ``?local=1``: this server's own answer, never forwarded.  A server asking the others
  always adds it, so a request fans out one level and no further;
* ``?server=NAME``: one server's answer (this one's from its own parts, another's
  through its admin endpoint).

A site of one server (no ``[[servers]]``, or no other server with an admin endpoint)
answers as it always did: no labels, no ``servers`` key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from imsrelay.model.settings import SiteConfig, SiteServer

LOCAL_PARAM = "local"  # ?local=1: this server's own answer only (what the servers send each other)
SERVER_PARAM = "server"  # ?server=NAME: one server's answer
FEDERATION_TIMEOUT = 5.0  # seconds one server has to answer a federated request
CONNECT_TIMEOUT = 2.0


class UnknownServer(LookupError):
    """``?server=`` names no server of this site (the API answers 404)."""


@dataclass(frozen=True)
class ServerAnswer:
    """One server's answer to a federated call: ``status`` 0 when it did not answer."""

    server: str
    status: int
    body: Any  # parsed JSON; bytes for a raw call
    error: str | None = None
    content_type: str = "application/json"

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def answered(self) -> bool:
        return self.status != 0


@dataclass(frozen=True)
class Scope:
    """Which servers a request is about: this one (``local``) and the others to ask."""

    local: bool
    peers: tuple[str, ...]
    labelled: bool  # the site has several servers: items carry their server's name

    @property
    def federated(self) -> bool:
        return bool(self.peers)


def servers_report(own: str, answers: Mapping[str, ServerAnswer], *, local: bool = True) -> dict[str, Any]:
    """``"servers"`` of a federated answer: which servers answered, and why not (pure)."""
    report: dict[str, Any] = {own: {"ok": True, "error": None}} if local else {}
    for name, a in answers.items():
        report[name] = {"ok": a.ok, "error": None if a.ok else (a.error or f"HTTP {a.status}")}
    return report


def labelled(items: Sequence[dict[str, Any]], server: str) -> list[dict[str, Any]]:
    """Items with ``"server"`` set (an item a peer already labelled keeps its label)."""
    return [item if item.get("server") else {**item, "server": server} for item in items]


class SiteServers:
    """The servers of this site and how to reach the others (typed; built by ``site.py``).

    ``own`` is this server; ``peers`` the others with an admin endpoint.  Every server of
    a site shares the site's admin token (``[admin] token``)."""

    def __init__(self, *, own: str, servers: Sequence[SiteServer], token: str,
                 timeout: float = FEDERATION_TIMEOUT, log: Any = None) -> None:
        self.own = own
        self.servers = tuple(servers)
        self.peers = tuple(s for s in self.servers if s.name.lower() != own.lower() and s.admin)
        self._unreachable = tuple(s for s in self.servers if s.name.lower() != own.lower() and not s.admin)
        self._token = token
        self._timeout = timeout
        self._log = log
        self._http: aiohttp.ClientSession | None = None

    @classmethod
    def of(cls, config: SiteConfig, *, timeout: float = FEDERATION_TIMEOUT, log: Any = None) -> SiteServers:
        return cls(own=config.server, servers=config.servers, token=config.admin.resolved_token() or "",
                   timeout=timeout, log=log)

    @property
    def several(self) -> bool:
        """Whether the site has other servers (its views are labelled by server)."""
        return len(self.servers) > 1

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.servers] or [self.own]

    def canonical(self, name: str) -> str:
        """A server's name as ``[[servers]]`` spells it, or ``UnknownServer``."""
        for s in self.names:
            if s.lower() == name.lower():
                return s
        raise UnknownServer(f"no server {name!r} in this site (servers: {', '.join(self.names)})")

    def scope(self, query: Mapping[str, str]) -> Scope:
        """The servers a request with these parameters is about (``?local=1``, ``?server=NAME``)."""
        if query.get(LOCAL_PARAM) not in (None, "", "0"):
            return Scope(True, (), self.several)
        wanted = query.get(SERVER_PARAM)
        if wanted:
            name = self.canonical(wanted)
            if name.lower() == self.own.lower():
                return Scope(True, (), self.several)
            return Scope(False, (name,), True)
        others = tuple(s.name for s in self.peers) + tuple(s.name for s in self._unreachable)
        return Scope(True, others, self.several)

    async def start(self) -> None:
        if self.peers and self._http is None:
            self._http = aiohttp.ClientSession(
                trust_env=False, headers={"Authorization": f"Bearer {self._token}", "Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self._timeout, sock_connect=min(CONNECT_TIMEOUT, self._timeout)))

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def report(self, scope: Scope, answers: Mapping[str, ServerAnswer]) -> dict[str, Any]:
        return servers_report(self.own, answers, local=scope.local)

    async def gather_lists(self, scope: Scope, path: str, key: str, local_items: Sequence[dict[str, Any]], *,
                           params: Mapping[str, str] | None = None
                           ) -> tuple[list[dict[str, Any]], dict[str, ServerAnswer]]:
        """This server's ``local_items`` and the ``key`` list of every other server's answer
        to ``GET path``, each item labelled with its server (when the site has several)."""
        items = labelled(local_items, self.own) if scope.labelled else list(local_items)
        answers = await self.ask("GET", path, scope.peers, params=params) if scope.peers else {}
        for name, a in answers.items():
            if a.ok and isinstance(a.body, dict):
                items += labelled([i for i in a.body.get(key) or [] if isinstance(i, dict)], name)
        return items, answers

    async def ask(self, method: str, path: str, servers: Sequence[str], *,
                  params: Mapping[str, str] | None = None, body: Any = None,
                  raw: bool = False) -> dict[str, ServerAnswer]:
        """The same call at each of ``servers`` (other servers of the site), in parallel,
        each with ``?local=1`` so that none forwards it again."""
        answers = await asyncio.gather(*(self.ask_one(name, method, path, params=params, body=body, raw=raw)
                                         for name in servers))
        return {a.server: a for a in answers}

    async def ask_one(self, server: str, method: str, path: str, *, params: Mapping[str, str] | None = None,
                      body: Any = None, raw: bool = False) -> ServerAnswer:
        peer = next((s for s in self.peers if s.name == server), None)
        if peer is None or peer.admin is None:
            return ServerAnswer(server, 0, None, f"{server} has no admin endpoint in [[servers]] (admin = ...)")
        if self._http is None:
            return ServerAnswer(server, 0, None, "the site's federation client is not started")
        query = {k: v for k, v in (params or {}).items() if k not in (LOCAL_PARAM, SERVER_PARAM)}
        query[LOCAL_PARAM] = "1"
        url = peer.admin.rstrip("/") + path
        try:
            async with self._http.request(method, url, params=query, json=body) as resp:
                ctype = resp.headers.get("Content-Type", "application/octet-stream").split(";")[0].strip()
                data = await resp.read()
                if raw and resp.status < 400:
                    return ServerAnswer(server, resp.status, data, None, ctype)
                try:
                    parsed = await resp.json(content_type=None)
                except ValueError:
                    parsed = {"error": data.decode("utf-8", "replace")[:500] or resp.reason}
                error = str(parsed.get("error")) if isinstance(parsed, dict) and resp.status >= 400 else None
                return ServerAnswer(server, resp.status, parsed, error, ctype)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            detail = f": {exc}" if str(exc) else ""
            why = f"{server} does not answer at {peer.admin} ({exc.__class__.__name__}{detail})"
            if self._log is not None:
                self._log.warning("federation.unanswered", server=server, path=path, error=repr(exc))
            return ServerAnswer(server, 0, None, why)
