"""What the mailbox-access service asks of its site (``imsrelay.site.Site`` matches it)."""

from __future__ import annotations

from typing import Protocol

from imsrelay.policy.auth import GuessGuard, Identity


class AccessSite(Protocol):
    @property
    def auth_guard(self) -> GuessGuard:
        """Failed logins counted per account and address, per address and per account:
        shared with SMTP AUTH (one lock-out for every protocol)."""
        ...

    async def account_of(self, login: str) -> str:
        """The key a login's failures are counted under (the account it names)."""
        ...

    async def authenticate(self, login: str, password: bytes) -> Identity | None:
        """The mailbox a login (alias or any SMTP address) and password name, if right."""
        ...

    async def protocol_refusal(self, identity: Identity, protocol: str) -> str | None:
        """Why ``identity`` may not use ``protocol`` (imap4/pop3) here, or None."""
        ...
