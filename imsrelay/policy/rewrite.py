"""Address rewriting driven by Site Addressing (pure).

When a site's SMTP Site Addressing is no longer its install-time site domain (after
KB Q196927's "change to @microsoft.com"), mail from its users leaves with their
primary address: the envelope sender and the ``From:``/``Sender:``/``Reply-To:``
header addresses that are any proxy address of a mailbox homed here become that
mailbox's primary address, and other senders at the site domain (e.g.
``postmaster@SiteA.microsoft.com``) are masqueraded to the new domain.  Only the
affected header lines change; every other byte of the message stays as it was.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from email._parseaddr import AddressList  # type: ignore[import-not-found]  # no stub: private module

from imsrelay.model.addresses import AddressError, parse_address
from imsrelay.model.message import header_block, split_message

REWRITTEN_HEADERS = ("from", "sender", "reply-to")
MAX_REWRITTEN_FIELDS = 100  # a message has one From:; beyond this many, fields stay as they are (hostile input)


def getaddresses(values: list[str]) -> list[tuple[str, str]]:
    """``email.utils.getaddresses`` (the same parser) without importing email.utils,
    which loads the socket module: this module stays free of I/O."""
    return list(AddressList(", ".join(values)).addresslist)


@dataclass(frozen=True)
class RewriteRules:
    site_domain: str  # install-time site domain, e.g. "sitea.microsoft.com"
    addressing_domain: str  # current Site Addressing domain, e.g. "microsoft.com"

    @property
    def active(self) -> bool:
        return self.site_domain.lower() != self.addressing_domain.lower()


def rewrite_address(address: str, rules: RewriteRules, primaries: Mapping[str, str]) -> str:
    """The address to show for ``address``; ``primaries`` maps lookup keys of local
    mailboxes' proxy addresses to their primary address."""
    if not rules.active or not address:
        return address
    try:
        parsed = parse_address(address)
    except AddressError:
        return address
    primary = primaries.get(parsed.key)
    if primary:
        return primary
    if parsed.domain == rules.site_domain.lower():
        return f"{parsed.local}@{rules.addressing_domain}"
    return address


def header_fields(header: bytes) -> list[bytes]:
    """Raw header fields, each with its continuation lines and line endings."""
    fields: list[bytes] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def header_addresses(message: bytes) -> list[str]:
    """Addresses in the headers that rewriting may change."""
    header = header_block(message)
    found = []
    fields = 0
    for f in header_fields(header):
        name, sep, value = f.partition(b":")
        if sep and name.strip().lower().decode("ascii", "replace") in REWRITTEN_HEADERS:
            fields += 1
            if fields > MAX_REWRITTEN_FIELDS:
                break
            text = value.decode("utf-8", "surrogateescape")
            found += [addr for _, addr in getaddresses([text]) if "@" in addr]
    return found


def rewrite_message(message: bytes, rules: RewriteRules, primaries: Mapping[str, str]) -> bytes:
    if not rules.active:
        return message
    header, body = split_message(message)
    fields = header_fields(header)
    changed = False
    seen = 0
    for i, f in enumerate(fields):
        name, sep, value = f.partition(b":")
        if not sep or name.strip().lower().decode("ascii", "replace") not in REWRITTEN_HEADERS:
            continue
        seen += 1
        if seen > MAX_REWRITTEN_FIELDS:
            break
        text = value.decode("utf-8", "surrogateescape")
        new_text = text
        for _, addr in getaddresses([text]):
            if "@" not in addr:
                continue
            new = rewrite_address(addr, rules, primaries)
            if new != addr:
                new_text = re.sub(re.escape(addr), new.replace("\\", "\\\\"), new_text, flags=re.IGNORECASE)
        if new_text != text:
            fields[i] = name + b":" + new_text.encode("utf-8", "surrogateescape")
            changed = True
    return b"".join(fields) + body if changed else message
