"""Check Now: Exchange 5.5's knowledge consistency check (KCC), for one site.

Replication brings other sites' *site objects* (name, Site Addressing, routing
address) into the directory.  The KCC makes the ones this site does not already
reach through Connected Sites known to routing (directory meta ``kcc.sites``, read
by ``Site.routing_table``), and reports what does not fit together:

* a Connected Sites entry whose routing address differs from the routing address
  that site publishes (KB Q180401: directory messages then come back as NDRs);
* a site whose Site Addressing moved away from its routing address — normal after
  KB Q196927's "change to @microsoft.com": each site keeps accepting its site
  domain for directory traffic, so this is a note, not an error;
* a replication connector to a site nobody knows, or that has no route;
* mailboxes homed at a site that has no route; addresses claimed by two mailboxes.

``plan`` is the pure decision; ``check_now`` reads the directory, writes the learned
sites, refreshes the running site and logs each finding.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from imsrelay.directory.store import Directory
from imsrelay.model.objects import SiteObject
from imsrelay.model.settings import ConnectedSite, ReplicationConnector, SiteConfig

ERROR = "error"
WARNING = "warning"
INFO = "info"
KCC_SITES_KEY = "kcc.sites"
KCC_KNOWN_KEY = "kcc.known"  # the sites the last Check Now made appear (shown by the console)


def known_after_check(directory: Directory) -> dict[str, list[str]] | None:
    """What the last Check Now made known: ``known_sites`` and ``awaiting_replication``
    (synchronous: on the directory's thread); None before the first Check Now."""
    raw = directory.get_meta(KCC_KNOWN_KEY)
    if not raw:
        return None
    data = json.loads(raw)
    arrived = {s.name for s in directory.sites()}  # replication has brought their site objects since
    return {"known_sites": sorted({str(x) for x in data.get("known_sites", [])} | arrived),
            "awaiting_replication": [str(x) for x in data.get("awaiting_replication", []) if str(x) not in arrived]}


def learned_sites(directory: Directory) -> list[tuple[str, str]]:
    """(site, routing domain) pairs the last Check Now stored in the directory
    (synchronous: on the directory's thread, or offline)."""
    raw = directory.get_meta(KCC_SITES_KEY)
    return [(str(name), str(domain)) for name, domain in json.loads(raw)] if raw else []


@dataclass(frozen=True)
class Finding:
    severity: str  # error | warning | info
    site: str
    message: str


@dataclass(frozen=True)
class KccResult:
    learned: tuple[tuple[str, str], ...]  # (site, routing domain) newly known to routing
    findings: tuple[Finding, ...]
    known_sites: tuple[str, ...] = ()  # every site object in the directory, and the sites below
    awaiting: tuple[str, ...] = ()  # known through a replication connector; no objects replicated yet

    def as_dict(self) -> dict[str, Any]:
        return {"learned": [list(x) for x in self.learned], "known_sites": list(self.known_sites),
                "awaiting_replication": list(self.awaiting), "findings": [asdict(f) for f in self.findings]}


def _domain(address: str) -> str:
    return address.strip().lstrip("@").lower()


def plan(own_site: str, sites: Sequence[SiteObject], connected: Sequence[ConnectedSite],
         connectors: Sequence[ReplicationConnector], *, mailbox_homes: dict[str, int] | None = None,
         address_conflicts: Sequence[tuple[str, str, Sequence[str]]] = ()) -> KccResult:
    """What Check Now learns and reports (pure)."""
    by_name = {s.name: s for s in sites}
    connected_names = {c.name for c in connected}
    findings: list[Finding] = []
    learned: list[tuple[str, str]] = []

    for s in sorted(sites, key=lambda x: x.name):
        if s.name == own_site or s.name in connected_names:
            continue
        if not s.routing_address:
            findings.append(Finding(ERROR, s.name, f"site {s.name} has no routing address: no route to it"))
            continue
        learned.append((s.name, s.routing_address.strip().lstrip("@")))

    connector_sites = {rc.site for rc in connectors}
    awaiting: list[str] = []
    for c in connected:
        site = by_name.get(c.name)
        if site is None and c.name in connector_sites:
            # KB Q196927 "Speeding up Initial Directory Replication", step 3: Check Now
            # and the new sites appear; only their Site and Configuration objects until
            # replication completes (the article's NOTE to step 6)
            awaiting.append(c.name)
            findings.append(Finding(INFO, c.name, f"{c.name} appears through its Directory Replication "
                                                  f"Connector (routing address SMTP {c.routing_address}): "
                                                  "its directory arrives with replication (Request Now)"))
            continue
        if site is None:
            findings.append(Finding(INFO, c.name, f"Connected Sites lists {c.name} (routing address SMTP "
                                                  f"{c.routing_address}), which replication has not brought "
                                                  "into the directory yet (add a Directory Replication "
                                                  "Connector to it, then Request Now)"))
            continue
        ours = _domain(c.routing_address)
        if site.routing_address and ours != _domain(site.routing_address):
            findings.append(Finding(WARNING, c.name, (
                f"Connected Sites routing address SMTP {c.routing_address} for {c.name} does not match the "
                f"routing address {site.routing_address} that {c.name} publishes: directory and mail "
                "messages for it may come back as NDRs (KB Q180401)")))
        elif site.smtp_address and ours != _domain(site.smtp_address):
            findings.append(Finding(INFO, c.name, (
                f"{c.name}'s Site Addressing is now {site.smtp_address}; its routing address stays "
                f"{c.routing_address}, which {c.name} keeps accepting for mail and directory traffic (KB Q180401 "
                "note; nothing to change)")))

    reachable = {own_site} | connected_names | {name for name, _ in learned}
    for rc in connectors:
        if rc.site == own_site:
            findings.append(Finding(ERROR, rc.site, f"a replication connector points at this site ({rc.site})"))
        elif rc.site not in by_name and rc.site not in connected_names:
            findings.append(Finding(ERROR, rc.site, (
                f"replication connector to unknown site {rc.site}: it is neither in Connected Sites nor "
                "in the directory, so requests to it have no route")))
        elif rc.site not in reachable:
            findings.append(Finding(ERROR, rc.site, f"replication connector to {rc.site}: no route to it"))

    for home, count in sorted((mailbox_homes or {}).items()):
        if home not in reachable:
            findings.append(Finding(WARNING, home, (
                f"{count} mailbox(es) homed at {home}, which has no route (no site object with a routing "
                "address, not in Connected Sites): their mail is deferred")))

    for address, owner, others in address_conflicts:
        findings.append(Finding(WARNING, own_site, (
            f"address {address} is claimed by several mailboxes: it belongs to {owner}; "
            f"also claimed by {', '.join(others)}")))

    return KccResult(tuple(learned), tuple(findings), tuple(sorted(set(by_name) | set(awaiting))),
                     tuple(sorted(awaiting)))


def _gather(directory: Directory) -> tuple[list[SiteObject], dict[str, int], list[tuple[str, str, list[str]]]]:
    homes = Counter(m.home_site for m in directory.mailboxes())
    return directory.sites(), dict(homes), directory.address_conflicts()


async def check_now(directory: Directory, cfg: SiteConfig, *, refresh: Callable[[], Awaitable[None]],
                    log: Any) -> KccResult:
    """Run the knowledge consistency check at a running site; ``refresh`` makes the
    site re-read what it derives from its directory."""
    sites, homes, conflicts = await directory.run(_gather, directory)
    result = plan(cfg.site, sites, cfg.connected_sites, cfg.replication.connectors,
                  mailbox_homes=homes, address_conflicts=conflicts)
    await directory.run(directory.set_meta, KCC_SITES_KEY, json.dumps([list(x) for x in result.learned]))
    await directory.run(directory.set_meta, KCC_KNOWN_KEY, json.dumps(
        {"known_sites": list(result.known_sites), "awaiting_replication": list(result.awaiting)}))
    await refresh()
    log = log.bind(component="kcc")
    for f in result.findings:
        log_fn = log.warning if f.severity in (ERROR, WARNING) else log.info
        log_fn("kcc.finding", severity=f.severity, peer=f.site, finding=f.message)
    log.info("kcc.checked", sites=list(result.known_sites), learned=[n for n, _ in result.learned],
             awaiting_replication=list(result.awaiting),
             errors=sum(f.severity == ERROR for f in result.findings),
             warnings=sum(f.severity == WARNING for f in result.findings),
             notes=sum(f.severity == INFO for f in result.findings))
    return result
