"""Recipient look-ups in the directory, answered from memory when possible.

The ingress asks for every RCPT and the queue manager for every due recipient, so
the answers are kept (at most ``MAX_CACHED`` addresses) until the directory
changes: ``clear`` is called when this process or another one (an offline CLI
command, another worker) wrote to it.  A look-up that raced with a change is
answered but not kept.
"""

from __future__ import annotations

from collections.abc import Callable

from imsrelay.directory.store import Directory
from imsrelay.model.addresses import parse_address
from imsrelay.model.envelope import Envelope
from imsrelay.model.objects import CustomRecipient, DistributionList, Mailbox, Recipient
from imsrelay.policy.expansion import Expansion, expand, expanded_marks
from imsrelay.routing.router import directory_lookup_address

MAX_CACHED = 10_000  # addresses whose answer is kept
HEADER_SCAN = 256 * 1024  # where a message's X-IMS-Expanded-DL trace headers are looked for


class MailboxLookups:
    def __init__(self, directory: Directory, *, site: str, site_domain: str, postmaster: str,
                 accepted_domains: tuple[str, ...], addressing_domain: Callable[[], str],
                 own_addresses: Callable[[], frozenset[str]]) -> None:
        """``postmaster``: the alias of the ``smtp.postmaster`` mailbox;
        ``addressing_domain``: the Site Addressing domain now; ``own_addresses``: this
        site's own IP addresses now (``user@[address]`` is ``user@site domain``)."""
        self.directory = directory
        self.site = site
        self.site_domain = site_domain
        self.postmaster = postmaster
        self.accepted_domains = accepted_domains
        self.addressing_domain = addressing_domain
        self.own_addresses = own_addresses
        self._cache: dict[str, Mailbox | None] = {}
        self._entries: dict[str, Recipient | None] = {}  # custom recipients and lists too
        self._generation = 0

    def clear(self) -> None:
        """The directory changed: forget every answer."""
        self._cache.clear()
        self._entries.clear()
        self._generation += 1

    async def lookup_entries(self, addresses: list[str]) -> list[Recipient | None]:
        """The mailbox, custom recipient or list owning each address (kept in memory
        like ``lookup``'s answers)."""
        cache = self._entries
        if len(addresses) == 1:  # one RCPT's question (the common case)
            key = addresses[0].lower()
            if key in cache:
                return [cache[key]]
        missing = [a for a in addresses if a.lower() not in cache]
        if missing:
            generation = self._generation
            found = await self.directory.run(self.directory.find_entries, missing)
            answers = {a.lower(): m for a, m in zip(missing, found, strict=True)}
            if generation == self._generation and len(cache) < MAX_CACHED:
                cache.update(answers)
            return [answers[a.lower()] if a.lower() in answers else cache.get(a.lower()) for a in addresses]
        return [cache.get(a.lower()) for a in addresses]

    async def expansion(self, env: Envelope, message: bytes) -> Expansion | None:
        """What the message's recipients become here (custom recipients redirected,
        lists expanded: ``imsrelay.policy.expansion``); None when none of them is a
        custom recipient or a list (the common case: answered from memory)."""
        entries = await self.lookup_entries([r.address for r in env.recipients])
        if not any(isinstance(e, CustomRecipient | DistributionList) for e in entries):
            return None
        end = message.find(b"\r\n\r\n", 0, HEADER_SCAN)
        if end < 0:
            end = message.find(b"\n\n", 0, HEADER_SCAN)
        header = message[:end if end >= 0 else HEADER_SCAN].decode("utf-8", "replace")
        return await self.directory.run(expand, [(r.address, r.original) for r in env.recipients],
                                        self.directory.find_entry, site=self.site,
                                        already_expanded=expanded_marks(header))

    async def lookup_mailboxes(self, addresses: list[str]) -> list[Mailbox | None]:
        """Directory look-ups by address (postmaster at a local domain is the
        ``smtp.postmaster`` mailbox, RFC 5321 4.5.1)."""
        found = await self.lookup(addresses)
        if len(found) == 1:  # one RCPT's question (the common case: no generator)
            if found[0] is not None or not self._is_postmaster(addresses[0]):
                return found
        elif not any(m is None and self._is_postmaster(a) for a, m in zip(addresses, found, strict=True)):
            return found
        admin = await self.directory.run(self.directory.mailbox, self.postmaster)
        return [admin if m is None and self._is_postmaster(a) else m for a, m in zip(addresses, found, strict=True)]

    async def local_primaries(self, addresses: list[str]) -> dict[str, str]:
        """Lookup key → primary address, for addresses of mailboxes homed here."""
        found = await self.lookup(addresses)  # postmaster stays postmaster (masqueraded)
        out: dict[str, str] = {}
        for addr, mbx in zip(addresses, found, strict=True):
            if mbx is not None and mbx.home_site == self.site and mbx.primary_address:
                out[parse_address(addr).key] = mbx.primary_address
        return out

    async def lookup(self, addresses: list[str]) -> list[Mailbox | None]:
        """Directory look-ups by address, answered from memory when possible."""
        cache = self._cache
        if len(addresses) == 1 and "[" not in addresses[0]:  # one RCPT's question (the common case)
            key = addresses[0].lower()
            if key in cache:
                return [cache[key]]
        elif any("[" in a for a in addresses) and (own := self.own_addresses()):
            # user@[this site's address] is user@site domain
            addresses = [directory_lookup_address(a, self.site_domain, own) for a in addresses]
        missing = [a for a in addresses if a.lower() not in cache]
        if missing:
            generation = self._generation
            found = await self.directory.run(self.directory.find_recipients, missing)
            if generation == self._generation and len(cache) < MAX_CACHED:
                for a, m in zip(missing, found, strict=True):
                    cache[a.lower()] = m
            else:
                answers = {a.lower(): m for a, m in zip(missing, found, strict=True)}
                return [answers[a.lower()] if a.lower() in answers else cache.get(a.lower())
                        for a in addresses]
        return [cache.get(a.lower()) for a in addresses]

    def _is_postmaster(self, address: str) -> bool:
        local, _, domain = address.rpartition("@")
        if local.lower() != "postmaster":
            return False
        domain = domain.lower().rstrip(".")
        return domain in {self.site_domain.lower(), self.addressing_domain(),
                          *(d.lower() for d in self.accepted_domains if not d.startswith("#")),
                          *(d[1:].lower() for d in self.accepted_domains if d.startswith("#"))}
