"""``serve`` with ``[console] enabled``: the web console of one site."""

from __future__ import annotations

from typing import Any

from imsrelay.console.backend import Organisation
from imsrelay.console.server import ConsoleServer


def site_console(site: Any) -> ConsoleServer:
    """``serve`` with ``[console] enabled``: a console for this one site."""
    cfg = site.config
    host, port = site.admin.bound
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    token = cfg.admin.resolved_token()
    return ConsoleServer(Organisation([base], token), token, listen=cfg.console.listen, port=cfg.console.port,
                         title=cfg.organisation)
