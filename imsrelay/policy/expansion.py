"""Custom recipients and distribution lists: what a message's recipients become (pure).

Exchange 5.5 resolved both in the directory before routing:

- a **custom recipient** (KB Q258203: one SMTP namespace shared with a foreign system,
  e.g. ``Partner@microsoft.com`` → ``partner@example.net``) redirects mail to its
  target address; the envelope recipient is rewritten and the target routed as usual;
- a **distribution list** (KB Q185194) is expanded by its expansion server/site; mail
  for it arriving at another site is sent there unexpanded.  Its members (mailboxes,
  custom recipients, other lists) replace it; nested lists are expanded in turn, a
  list met again inside itself is a loop (skipped, reported), a recipient reached
  twice is delivered once, and NDRs for its members go to the list owner when the
  list has one ("report to distribution list owner"), else to the sender.

A list is expanded once: the message records each list expanded in an
``X-IMS-Expanded-DL`` trace header, and a site that receives it later does not expand
those lists again (a list that comes back is a loop).

``expand`` decides all of it from a ``resolve`` look-up (address → directory object);
the queue's door applies the result (``imsrelay.queue.door``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from imsrelay.model.addresses import AddressError, parse_address
from imsrelay.model.objects import CustomRecipient, DistributionList, Recipient

EXPANDED_HEADER = "X-IMS-Expanded-DL"
MAX_EXPANDED = 20_000  # recipients one message may grow to by expansion


def address_key(address: str) -> str:
    """How recipients are compared (the directory's look-up key; else lower case)."""
    try:
        return parse_address(address).key
    except AddressError:
        return address.lower()


@dataclass(frozen=True)
class Delivery:
    """One recipient after expansion: where it goes, what it was, who gets its NDR."""

    address: str
    original: str
    report_to: str | None = None  # None: the message's sender; else the list owner's address


@dataclass(frozen=True)
class Expansion:
    recipients: tuple[Delivery, ...]
    expanded: tuple[str, ...] = ()  # lists expanded here (primary addresses)
    redirected: tuple[tuple[str, str], ...] = ()  # (custom recipient, its target)
    forwarded: tuple[tuple[str, str], ...] = ()  # (list, its expansion site): sent there unexpanded
    loops: tuple[str, ...] = ()  # lists met again inside themselves or expanded upstream: skipped
    duplicates: tuple[str, ...] = ()  # recipients reached more than once: delivered once
    truncated: bool = False  # MAX_EXPANDED reached: the rest were left out

    @property
    def changed(self) -> bool:
        return bool(self.expanded or self.redirected or self.loops or self.duplicates)

    def groups(self) -> list[tuple[str | None, list[Delivery]]]:
        """The recipients by who gets their NDRs (None: the sender first), in order."""
        out: dict[str | None, list[Delivery]] = {}
        for d in self.recipients:
            out.setdefault(d.report_to, []).append(d)
        return sorted(out.items(), key=lambda item: item[0] is not None)


@dataclass
class _Work:
    out: dict[str, Delivery] = field(default_factory=dict)
    expanded: list[str] = field(default_factory=list)
    redirected: list[tuple[str, str]] = field(default_factory=list)
    forwarded: list[tuple[str, str]] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    truncated: bool = False

    def add(self, address: str, original: str, report_to: str | None) -> None:
        key = address_key(address)
        if key in self.out:
            self.duplicates.append(address)
        elif len(self.out) >= MAX_EXPANDED:
            self.truncated = True
        else:
            self.out[key] = Delivery(address, original, report_to)


def expands_here(dl: DistributionList, site: str) -> bool:
    """Whether this site expands the list (its expansion site, or any site when unset)."""
    return not dl.expansion_site or dl.expansion_site.lower() == site.lower()


def expand(recipients: Sequence[tuple[str, str | None]], resolve: Callable[[str], Recipient | None], *,
           site: str, already_expanded: Iterable[str] = ()) -> Expansion:
    """What ``recipients`` ((address, original) pairs) become at ``site``.

    ``resolve``: the directory object owning an address (None: not in the directory);
    ``already_expanded``: lists the message's ``X-IMS-Expanded-DL`` headers name."""
    work = _Work()
    upstream = {address_key(a) for a in already_expanded}
    queue: list[tuple[DistributionList, str, str | None, tuple[str, ...]]] = []

    def place(address: str, original: str, report_to: str | None, path: tuple[str, ...]) -> None:
        entry = resolve(address)
        if isinstance(entry, CustomRecipient):
            work.redirected.append((address, entry.target))
            work.add(entry.target, original, report_to)
        elif isinstance(entry, DistributionList) and not expands_here(entry, site):
            work.forwarded.append((address, entry.expansion_site))
            work.add(address, original, report_to)
        elif isinstance(entry, DistributionList):
            queue.append((entry, address, report_to, path))
        else:
            work.add(address, original, report_to)

    for address, original in recipients:
        place(address, original or address, None, ())
    seen: set[str] = set()
    while queue:
        dl, address, report_to, path = queue.pop(0)
        key = address_key(dl.primary_address or address)
        if key in path or key in upstream:
            work.loops.append(address)
            continue
        if key in seen:
            work.duplicates.append(address)
            continue
        seen.add(key)
        work.expanded.append(dl.primary_address or address)
        report = dl.owner or report_to
        for member in dl.members:
            place(member, member, report, (*path, key))
    return Expansion(tuple(work.out.values()), tuple(work.expanded), tuple(work.redirected),
                     tuple(work.forwarded), tuple(work.loops), tuple(work.duplicates), work.truncated)


def expanded_marks(header_block: str) -> list[str]:
    """The lists a message's ``X-IMS-Expanded-DL`` headers name (its header block as text)."""
    marks: list[str] = []
    prefix = EXPANDED_HEADER.lower() + ":"
    for line in header_block.splitlines():
        if line.lower().startswith(prefix):
            marks.extend(a.strip() for a in line[len(prefix):].split(",") if a.strip())
    return marks


def mark_lines(expanded: Sequence[str]) -> bytes:
    """The trace header lines recording the lists expanded here (prepended to the message)."""
    return b"".join(f"{EXPANDED_HEADER}: {a}\r\n".encode() for a in expanded)
