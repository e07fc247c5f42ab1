"""Whether a mailbox may use IMAP4 or POP3 here (pure): Exchange 5.5's three levels.

Exchange 5.5 kept protocol settings at three levels (Q233081, Q171032): the site's
Protocols container holds the defaults; a server's Protocols container uses the
site's defaults or overrides them; a mailbox's Protocols tab uses the protocol
defaults or enables or disables a protocol for that mailbox.  A protocol the server
does not serve is closed to every mailbox on it, whatever the mailbox says.
"""

from __future__ import annotations

from imsrelay.model.objects import Protocols

NAMES = {"imap4": "IMAP4", "pop3": "POP3"}


def server_enabled(protocol: str, *, site: Protocols, server: bool | None) -> bool:
    """The server's effective setting: its own, else the site's default (enabled)."""
    if server is not None:
        return server
    site_value = site.get(protocol)
    return True if site_value is None else site_value


def refusal(protocol: str, *, site: Protocols, server: bool | None, mailbox: Protocols,
            site_name: str, server_name: str, alias: str) -> str | None:
    """Why ``alias`` may not use ``protocol`` (``imap4``/``pop3``) here, or None."""
    name = NAMES[protocol]
    if not server_enabled(protocol, site=site, server=server):
        where = f"server {server_name}" if server is not None else f"site {site_name}"
        return f"{name} is disabled at {where}"
    if mailbox.get(protocol) is False:
        return f"{name} is disabled for mailbox {alias}"
    return None
