"""The console's view of the organisation: the admin endpoints of its sites.

The console keeps no state of its own about mail or the directory: every page is
built from the sites' admin endpoints (``/status``, ``/config``, ``/directory``,
``/queue``, ``/replication/status``, ``/site-addressing``) and their message API
(``/api/v1``), called with the admin token over loopback (or the Docker lab's
network).  A site that is down is shown as unreachable, not as an error page.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp


class SiteUnavailable(Exception):
    """A site's admin endpoint cannot be reached."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # parsed JSON, or bytes when raw was asked for
    content_type: str = "application/json"

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error(self) -> str:
        if isinstance(self.body, dict) and "error" in self.body:
            return str(self.body["error"])
        return f"HTTP {self.status}"


class Organisation:
    """The sites a console shows, by their admin endpoint URLs."""

    def __init__(self, endpoints: Sequence[str], token: str, *, timeout: float = 60.0) -> None:
        if not endpoints:
            raise ValueError("the console needs at least one site admin endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._token = token
        self._timeout = timeout
        self._names: dict[str, str] = {}  # site name -> endpoint
        self._statuses: dict[str, dict[str, Any]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._discovering = asyncio.Lock()

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            trust_env=False, timeout=aiohttp.ClientTimeout(total=self._timeout, sock_connect=5),
            headers={"Authorization": f"Bearer {self._token}", "Accept": "application/json"})
        await self.discover()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # ------------------------------------------------------------ sites

    async def discover(self) -> None:
        """Learn each endpoint's site name (an endpoint that is down is asked again later)."""
        async with self._discovering:
            missing = [e for e in self.endpoints if e not in self._names.values()]
            replies = await asyncio.gather(*(self._request(e, "GET", "/status") for e in missing),
                                           return_exceptions=True)
            for endpoint, reply in zip(missing, replies, strict=True):
                if isinstance(reply, Reply) and reply.ok and isinstance(reply.body, dict):
                    self._names[str(reply.body["site"])] = endpoint
                    self._statuses[str(reply.body["site"])] = reply.body

    @property
    def sites(self) -> list[str]:
        """Known site names, in the order their endpoints were given."""
        order = {e: i for i, e in enumerate(self.endpoints)}
        return sorted(self._names, key=lambda n: order[self._names[n]])

    @property
    def organisation(self) -> str | None:
        """The organisation most of the sites belong to (a lab's Internet host is outside it)."""
        names = [str(s.get("organisation")) for s in self._statuses.values()]
        return max(sorted(set(names)), key=names.count) if names else None

    @property
    def outside(self) -> list[str]:
        """Sites of another organisation (the lab's Internet host): shown, but not in its directory."""
        org = self.organisation
        return [n for n in self.sites if self._statuses[n].get("organisation") != org]

    @property
    def unreachable(self) -> list[str]:
        return [e for e in self.endpoints if e not in self._names.values()]

    def endpoint(self, site: str) -> str:
        try:
            return self._names[site]
        except KeyError:
            raise SiteUnavailable(f"no site {site!r} in this console (sites: {', '.join(self.sites)})") from None

    # ------------------------------------------------------------ calls

    async def call(self, site: str, method: str, path: str, *, params: dict[str, str] | None = None,
                   body: Any = None, raw: bool = False) -> Reply:
        return await self._request(self.endpoint(site), method, path, params=params, body=body, raw=raw)

    async def each(self, method: str, path: str, *, params: dict[str, str] | None = None) -> dict[str, Reply]:
        """The same call at every known site, concurrently; an unreachable site answers 502."""
        if self.unreachable:
            await self.discover()
        names = self.sites

        async def one(name: str) -> Reply:
            try:
                return await self.call(name, method, path, params=params)
            except SiteUnavailable as exc:
                return Reply(502, {"error": str(exc)})
        replies = await asyncio.gather(*(one(n) for n in names))
        return dict(zip(names, replies, strict=True))

    async def _request(self, endpoint: str, method: str, path: str, *, params: dict[str, str] | None = None,
                       body: Any = None, raw: bool = False) -> Reply:
        if self._http is None:
            raise SiteUnavailable("the console is not started")
        try:
            async with self._http.request(method, endpoint + path, params=params,
                                          json=body if body is not None else None) as resp:
                ctype = resp.headers.get("Content-Type", "application/octet-stream").split(";")[0].strip()
                data = await resp.read()
                if raw and resp.status < 400:
                    return Reply(resp.status, data, ctype)
                if ctype.endswith("json"):
                    try:
                        return Reply(resp.status, await resp.json(content_type=None), ctype)
                    except ValueError:
                        pass
                return Reply(resp.status, {"error": data.decode("utf-8", "replace")[:500] or resp.reason},
                             ctype)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise SiteUnavailable(f"the admin endpoint {endpoint} does not answer ({exc.__class__.__name__}: "
                                  f"{exc})") from None
