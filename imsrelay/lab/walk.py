"""Where the embedded lab stands in KB Q196927's walk — read from what the sites'
files and directories actually are, not from a stored stage number — and what the
next step would change.

A person may walk the article by hand at any time (edit ``<data>/config/SiteX.toml``,
run ``imsrelay kcc check-now``, ``replicate request-now``, ``site-addressing set``):
``observe`` looks at each site's TOML file (Connected Sites, E-Mail Domain table,
replication connectors) and each site's directory (Check Now's learned sites, which
mailboxes replication brought, Site Addressing and the addresses it gave), and says
for every step whether it is done and, if not, what is missing.  ``plan_config_step``
says what a configuration step adds to one site's file — only the entries that are
missing, keeping everything the person wrote — or why it cannot (an entry of the same
name that says something else).  Pure except ``observe``, which only reads.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imsrelay.directory.kcc import KCC_SITES_KEY
from imsrelay.directory.store import Directory
from imsrelay.model.addresses import AddressError, parse_address

# A configuration step's entries: (TOML array of tables, key field, the entries).
ConfigEntries = tuple[tuple[str, str, tuple[dict[str, Any], ...]], ...]


@dataclass(frozen=True)
class StepState:
    name: str
    text: str
    done: bool
    missing: tuple[str, ...] = ()  # what is not there yet, one short phrase each


@dataclass(frozen=True)
class ConfigPlan:
    """What a configuration step would append to one site's file."""

    site: str
    additions: tuple[tuple[str, dict[str, Any]], ...]  # (array-of-tables name, entry)
    conflicts: tuple[str, ...]  # entries of the same name the person wrote differently


def _array(raw: Mapping[str, Any], dotted: str) -> list[Any]:
    value: Any = raw
    for part in dotted.split("."):
        value = value.get(part, {}) if isinstance(value, Mapping) else {}
    return value if isinstance(value, list) else []


def _same(key_field: str, want: Mapping[str, Any], have: Mapping[str, Any]) -> list[str]:
    """The fields in which ``have`` differs from ``want`` (domains compared without case)."""
    differ = []
    for field, value in want.items():
        got = have.get(field, "always" if field == "schedule" else None)
        if field == "schedule":
            continue  # the person's schedule is theirs to choose
        if isinstance(value, str) and isinstance(got, str):
            if value.lower() == got.lower():
                continue
        elif got == value:
            continue
        written = "no " + field if got is None else f"{field} = {got!r}"
        differ.append(f"{written} (the article's step has {value!r})")
    return differ


def plan_config_step(site: str, file_name: str, raw: Mapping[str, Any], entries: ConfigEntries) -> ConfigPlan:
    """The entries of a configuration step that ``raw`` (the site's parsed file) lacks,
    and the ones it has under the same name with different values (pure)."""
    additions: list[tuple[str, dict[str, Any]]] = []
    conflicts: list[str] = []
    for array, key_field, wanted in entries:
        present = [e for e in _array(raw, array) if isinstance(e, Mapping)]
        for want in wanted:
            key = str(want[key_field]).lower()
            same_name = [e for e in present if str(e.get(key_field, "")).lower() == key]
            if not same_name:
                additions.append((array, dict(want)))
                continue
            differ = _same(key_field, want, same_name[0])
            if differ:
                conflicts.append(f"{file_name} [[{array}]] {key_field} = {want[key_field]!r} has "
                                 + ", ".join(differ))
    return ConfigPlan(site, tuple(additions), tuple(conflicts))


def read_raw(path: Path) -> dict[str, Any] | str:
    """The parsed TOML file, or a one-line reason it cannot be read."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return f"{path.name} cannot be read: {exc}"


@dataclass(frozen=True)
class SiteFacts:
    """What one site's directory says, for the action steps (read-only snapshot)."""

    checked: bool  # Check Now has run (its learned sites are recorded)
    mailboxes: tuple[tuple[str, str, str], ...]  # (home site, alias, primary address) of every mailbox known
    addressing: str | None  # the site's own Site Addressing


def read_facts(db: Path, site: str) -> SiteFacts | None:
    """The directory facts of a site, or None when its database does not exist yet."""
    if not db.exists():
        return None
    directory = Directory(db, site)
    try:
        own = directory.site_object()
        return SiteFacts(checked=directory.get_meta(KCC_SITES_KEY) is not None,
                         mailboxes=tuple((m.home_site, m.alias, m.primary_address or "")
                                         for m in directory.mailboxes()),
                         addressing=own.smtp_address if own else None)
    finally:
        directory.close()


def _domain_of(address: str) -> str:
    try:
        return parse_address(address).domain
    except AddressError:
        return ""


def action_step_missing(name: str, sites: Sequence[tuple[str, str]], facts: Mapping[str, SiteFacts | None],
                        company_domain: str) -> list[str]:
    """What is missing for an action step (pure). ``sites``: (site, its lab user)."""
    missing: list[str] = []
    names = [s for s, _ in sites]
    for site in names:
        if facts.get(site) is None:
            missing.append(f"{site} has not started yet (no directory)")
    if missing:
        return missing
    if name == "check-now":
        return [f"Check Now has not run at {s}" for s in names if not facts[s].checked]  # type: ignore[union-attr]
    if name == "request-now":
        for site in names:
            known = {(home, alias) for home, alias, _ in facts[site].mailboxes}  # type: ignore[union-attr]
            for other, user in sites:
                if other != site and (other, user) not in known:
                    missing.append(f"{site} does not know {user} of {other} (Request Now from {other})")
        return missing
    if name.startswith("site-addressing-"):
        target = names[ord(name[-1]) - ord("a")]
        own = facts[target]
        assert own is not None
        if (own.addressing or "").lower() != f"@{company_domain}".lower():
            return [f"{target}'s Site Addressing is {own.addressing}, not @{company_domain}"]
        for site in names:
            for home, alias, primary in facts[site].mailboxes:  # type: ignore[union-attr]
                if home == target and _domain_of(primary) != company_domain.lower():
                    where = "" if site == target else f" at {site} (Request Now from {target})"
                    missing.append(f"{alias} of {target} is still {primary}{where}")
        return missing
    raise ValueError(f"not an action step: {name}")


def config_step_missing(plans: Sequence[ConfigPlan]) -> list[str]:
    missing = []
    for p in plans:
        for array, entry in p.additions:
            first = next(iter(entry.values()))
            missing.append(f"{p.site} has no [[{array}]] {first}")
        missing.extend(p.conflicts)
    return missing
