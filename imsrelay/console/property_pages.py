"""The admin calls behind the console's property pages (``static/properties.js``):
the site's file (Connected Sites, E-Mail Domain table, Directory Replication
Connectors), Check Now's known sites, and mailboxes (``imsrelay.admin.property_routes``
and the CLI's ``/directory/mailboxes``).  Added to the console's allow-list."""

from __future__ import annotations

import re

_KEY = r"[A-Za-z0-9][A-Za-z0-9_.#-]{0,252}"
PROPERTY_CALLS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((m, re.compile(p)) for m, p in (
    ("GET", r"/config/file"), ("GET", r"/kcc/known"), ("POST", r"/ims/restart"),
    ("POST", r"/config/(connected-sites|email-domains|replication-connectors)"),
    ("PUT", rf"/config/(connected-sites|email-domains|replication-connectors)/{_KEY}"),
    ("DELETE", rf"/config/(connected-sites|email-domains|replication-connectors)/{_KEY}"),
    ("POST", r"/directory/mailboxes"),
    ("PUT", r"/directory/mailboxes/[A-Za-z0-9][A-Za-z0-9._-]{0,63}"),
    ("DELETE", r"/directory/mailboxes/[A-Za-z0-9][A-Za-z0-9._-]{0,63}"),
))
