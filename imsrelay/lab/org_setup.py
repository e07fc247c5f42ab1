"""Organisation set-up — the administrator's actions of KB Q196927, over the sites'
admin endpoints, in the article's order, so an organisation whose sites are
*configured* (Connected Sites, E-Mail Domain entries, replication connectors) ends
up *set up*: every site knows every mailbox and every user is ``alias@company``.

1. Check Now at each site (knowledge consistency check);
2. Request Now ("update only new and modified items") at each site from each peer
   whose directory it does not mirror yet; wait until every site knows every mailbox;
3. for each site in turn (the order given): Site Addressing ``@company`` with "update
   all recipient mailboxes"; the other sites Request Now from it; wait until they
   all see its new addresses;
4. Check Now at each site again.

Each step first looks at what the sites' directories say and is skipped when its
result is already there, so running it again on a set-up organisation changes
nothing (no directory write, no replication traffic).  ``--check`` only reports.

The decisions (who lacks what, which site still needs Site Addressing) are pure
functions of the sites' ``GET /directory`` snapshots; the I/O is a small blocking
JSON client (urllib, proxies ignored).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imsrelay.admin.client import AdminClient, AdminRequestError, AdminUnavailable
from imsrelay.directory.keys import PER_SITE_KEYS

# ============================================================================ pure


@dataclass(frozen=True)
class Seen:
    """One mailbox as a site's directory shows it."""

    alias: str
    primary: str
    proxies: tuple[str, ...]  # sorted

    @property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        """What must match between sites (addresses compare without case)."""
        return self.alias.lower(), self.primary.lower(), tuple(p.lower() for p in self.proxies)


@dataclass(frozen=True)
class View:
    """What one site's directory says about one home site's objects."""

    site_addressing: str  # the home site's Site Addressing as seen there ("" if unknown)
    mailboxes: dict[str, Seen]  # by lower-case alias


def view_of(snapshot: Mapping[str, Any], home: str) -> View:
    """The part of a ``GET /directory`` answer that concerns ``home``'s objects."""
    addressing = ""
    for s in snapshot.get("sites", []):
        if s.get("name") == home:
            addressing = str(s.get("smtp_address") or "")
    boxes = {}
    for m in snapshot.get("mailboxes", []):
        if m.get("home_site") == home:
            seen = Seen(str(m["alias"]), str(m.get("primary_address") or ""),
                        tuple(sorted(str(p) for p in m.get("proxy_addresses", []))))
            boxes[seen.alias.lower()] = seen
    return View(addressing, boxes)


def lagging(snapshots: Mapping[str, Mapping[str, Any]], home: str) -> dict[str, list[str]]:
    """Sites whose directory does not (yet) mirror ``home``'s own objects, and how
    (pure).  ``home``'s own snapshot is the truth about its site and mailboxes."""
    truth = view_of(snapshots[home], home)
    out: dict[str, list[str]] = {}
    for viewer, snap in snapshots.items():
        if viewer == home:
            continue
        seen = view_of(snap, home)
        problems: list[str] = []
        if seen.site_addressing.lower() != truth.site_addressing.lower():
            problems.append(f"sees Site Addressing {seen.site_addressing or '(none)'} for {home}, "
                            f"not {truth.site_addressing}")
        for alias, m in sorted(truth.mailboxes.items()):
            other = seen.mailboxes.get(alias)
            if other is None:
                problems.append(f"does not know mailbox {m.primary or m.alias} of {home}")
            elif other.key != m.key:
                problems.append(f"has {home}'s mailbox {m.alias} as {other.primary}, not {m.primary}"
                                if other.primary.lower() != m.primary.lower() else
                                f"has other proxy addresses for {home}'s mailbox {m.alias}")
        for alias in sorted(set(seen.mailboxes) - set(truth.mailboxes)):
            problems.append(f"still lists mailbox {seen.mailboxes[alias].alias} of {home}, deleted there")
        if problems:
            out[viewer] = problems
    return out


def needs_site_addressing(snapshot: Mapping[str, Any], site: str, address: str) -> bool:
    """Does ``site`` (from its own snapshot) still need Site Addressing ``address``
    with "update all recipient mailboxes"? (pure)"""
    domain = address.lstrip("@").lower()
    own = view_of(snapshot, site)
    if own.site_addressing.lower() != "@" + domain:
        return True
    return any(not m.primary.lower().endswith("@" + domain) for m in own.mailboxes.values())


def key_scheme_problem(replication: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why these sites (each one's ``/status`` ``replication`` part) cannot replicate
    with each other because of their keys, or None (pure): every site must use the
    same scheme — a site with the shared organisation key cannot verify per-site
    signatures, nor the other way round — and with per-site keys each site must
    trust every site of the set-up."""
    schemes: dict[str, list[str]] = {}
    for name, r in replication.items():
        schemes.setdefault(str(r.get("key_scheme") or "unknown"), []).append(name)
    if len(schemes) > 1:
        mix = "; ".join(f"{scheme}: {', '.join(sorted(names))}" for scheme, names in sorted(schemes.items()))
        return (f"the sites use different replication key schemes ({mix}): every site of the organisation "
                "must use per-site keys (replication.signing_key + [replication.trusted_keys]) or every "
                "site the shared organisation key")
    if PER_SITE_KEYS in schemes:
        for name, r in sorted(replication.items()):
            missing = sorted(set(replication) - set(r.get("trusted_sites") or []))
            if missing:
                return (f"{name} has no trusted public key for {', '.join(missing)}: add "
                        f"[replication.trusted_keys] entries (imsrelay replicate keygen prints them) at {name}")
    return None


# ============================================================================ I/O


class SetupError(Exception):
    """org-setup cannot go on (one clear line)."""


class SitesUnreachable(SetupError):
    """A site's admin endpoint never answered (exit status 3, as for every command)."""


class Endpoint(AdminClient):
    """One site's admin endpoint, with org-setup's errors: a refused request stops
    the setup (SetupError), an unreachable site is waited for (ConnectionError)."""

    def __init__(self, base: str, token: str, *, timeout: float = 30.0) -> None:
        super().__init__(base, token, timeout=timeout)
        self.name = self.base  # the site's directory name once known (GET /status)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            return super().call(method, path, body)
        except AdminRequestError as exc:
            raise SetupError(f"{self.name}: {method} {path}: {exc} (HTTP {exc.status})") from None
        except AdminUnavailable:
            raise ConnectionError(f"{self.name}: no admin endpoint at {self.base}") from None


class OrgSetup:
    def __init__(self, endpoints: Sequence[Endpoint], *, say: Callable[[str], None] = print,
                 poll: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoints = list(endpoints)
        self.say = say
        self.poll = poll
        self.clock = clock
        self.by_name: dict[str, Endpoint] = {}
        self.status: dict[str, dict[str, Any]] = {}
        self.actions = 0  # changes made (Request Now, Site Addressing)

    # ------------------------------------------------------------ helpers

    def names(self) -> list[str]:
        return [e.name for e in self.endpoints]

    def snapshots(self) -> dict[str, dict[str, Any]]:
        return {e.name: e.call("GET", "/directory") for e in self.endpoints}

    def wait_ready(self, timeout: float) -> None:
        """Wait until every endpoint answers ``GET /status``; learn the site names."""
        deadline = self.clock() + timeout
        for e in self.endpoints:
            while True:
                try:
                    status = e.call("GET", "/status")
                    break
                except ConnectionError as exc:
                    if self.clock() > deadline:
                        raise SitesUnreachable(f"{exc}; gave up after {timeout:g}s") from None
                    time.sleep(self.poll)
            e.name = status["site"]
            self.by_name[e.name] = e
            self.status[e.name] = status
        if len(self.by_name) != len(self.endpoints):
            raise SetupError(f"the same site was given twice ({', '.join(self.names())})")
        orgs = {s["organisation"] for s in self.status.values()}
        if len(orgs) > 1:
            raise SetupError(f"the sites belong to different organisations: {', '.join(sorted(orgs))}")
        for name, s in self.status.items():
            if not s["replication"]["enabled"]:
                raise SetupError(f"{name}: replication is not enabled (no replication key: set "
                                 "replication.signing_key and [replication.trusted_keys], or replication.key "
                                 "or $IMSRELAY_ORG_KEY, at that site)")
        problem = key_scheme_problem({n: s["replication"] for n, s in self.status.items()})
        if problem:
            raise SetupError(problem)

    def company_address(self) -> str:
        domains = {s["company_domain"].lower() for s in self.status.values()}
        if len(domains) != 1:
            raise SetupError(f"the sites name different company domains ({', '.join(sorted(domains))}): "
                             "give --address")
        return "@" + str(domains.pop())

    def wait_in_sync(self, homes: Sequence[str], timeout: float, what: str) -> None:
        start = self.clock()
        while True:
            snaps = self.snapshots()
            behind = {home: lagging(snaps, home) for home in homes}
            behind = {h: v for h, v in behind.items() if v}
            if not behind:
                self.say(f"  replicated: {what} ({self.clock() - start:.1f}s)")
                return
            if self.clock() - start > timeout:
                lines = [f"{viewer} {p}" for h in behind.values() for viewer, ps in h.items() for p in ps]
                raise SetupError(f"replication did not complete within {timeout:g}s ({what}): "
                                 + "; ".join(lines[:6]) + ("; ..." if len(lines) > 6 else ""))
            time.sleep(self.poll)

    def request_now(self, into: str, source: str) -> None:
        r = self.by_name[into].call("POST", "/replication/request-now", {"site": source, "full": False})
        self.actions += 1
        self.say(f"  Request Now at {into} from {source}: new and modified items since USN {r['since_usn']} "
                 f"(queue id {r['queue_id']})")

    # ------------------------------------------------------------ the article's actions

    def check_now(self) -> None:
        for name in self.names():
            r = self.by_name[name].call("POST", "/kcc/check-now")
            learned = ", ".join(n for n, _ in r["learned"]) or "none"
            self.say(f"  Check Now at {name}: sites in the directory {', '.join(r['known_sites'])}; "
                     f"learned by replication: {learned}")
            for f in r["findings"]:
                if f["severity"] in ("error", "warning"):
                    self.say(f"    {f['severity']}: {f['site']}: {f['message']}")

    def replicate_all(self, timeout: float) -> None:
        snaps = self.snapshots()
        pulls = [(viewer, home) for home in self.names() for viewer in lagging(snaps, home)]
        if not pulls:
            self.say("  every site already knows every mailbox: no Request Now needed")
            return
        for into in self.names():
            for into_, source in pulls:
                if into_ == into:
                    self.request_now(into, source)
        self.wait_in_sync(self.names(), timeout, "every site knows every mailbox")

    def site_addressing(self, name: str, address: str, timeout: float) -> None:
        snap = self.by_name[name].call("GET", "/directory")
        if needs_site_addressing(snap, name, address):
            r = self.by_name[name].call("POST", "/site-addressing",
                                        {"address": address, "update_mailboxes": True})
            self.actions += 1
            subs = "".join(f"; {s['alias']} -> {s['address']} (not unique)" for s in r["substitutes"])
            kept = "old address kept as secondary" if r["keep_old"] else "old address dropped"
            self.say(f"  {name}: Site Addressing SMTP {address}, update all recipient mailboxes: "
                     f"{r['scanned']} scanned, {r['updated']} updated, {r['failed']} failed ({kept}){subs}")
            if r["failed"]:
                raise SetupError(f"{name}: {r['failed']} mailbox(es) could not be re-addressed")
        else:
            self.say(f"  {name}: Site Addressing is already {address} for the site and its mailboxes")
        behind = lagging(self.snapshots(), name)
        for viewer in self.names():
            if viewer in behind:
                self.request_now(viewer, name)
        if behind:
            self.wait_in_sync([name], timeout, f"{name}'s addresses at every site")

    def run(self, *, address: str | None, wait: float, timeout: float) -> None:
        started = self.clock()
        self.wait_ready(wait)
        address = address or self.company_address()
        org = next(iter(self.status.values()))["organisation"]
        self.say(f"org-setup: organisation {org}, sites " + ", ".join(
            f"{e.name} ({e.base})" for e in self.endpoints) + f"; target Site Addressing {address}")
        self.say("Speeding up initial directory replication: Check Now at each site")
        self.check_now()
        self.say("Request Now at each site from each peer")
        self.replicate_all(timeout)
        for name in self.names():
            self.say(f"Single e-mail domain at {name}")
            self.site_addressing(name, address, timeout)
        self.say("Check Now at each site after replication")
        self.check_now()
        self.summary(self.snapshots())
        done = "set up" if self.actions else "already set up: nothing changed"
        self.say(f"org-setup: organisation {org} {done} ({self.clock() - started:.1f}s)")

    def check(self, *, address: str | None, wait: float) -> bool:
        self.wait_ready(wait)
        address = address or self.company_address()
        snaps = self.snapshots()
        ok = True
        for name in self.names():
            if needs_site_addressing(snaps[name], name, address):
                ok = False
                self.say(f"{name}: Site Addressing {address} not done (or not every mailbox updated)")
            for viewer, problems in lagging(snaps, name).items():
                ok = False
                for p in problems:
                    self.say(f"{viewer} {p}")
        self.summary(snaps)
        self.say("org-setup --check: " + ("the organisation is set up" if ok else "NOT set up"))
        return ok

    def summary(self, snaps: Mapping[str, Mapping[str, Any]]) -> None:
        for name in self.names():
            snap = snaps[name]
            addressing = next((s["smtp_address"] for s in snap["sites"] if s["name"] == name), "?")
            boxes = ", ".join(sorted(m["primary_address"] for m in snap["mailboxes"] if m["home_site"] == name))
            self.say(f"  {name:<8} Site Addressing {addressing:<22} mailboxes {boxes or '(none)'}; "
                     f"knows {len(snap['mailboxes'])} mailbox(es)")
