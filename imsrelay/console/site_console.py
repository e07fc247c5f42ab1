"""``serve`` with ``[console] enabled``: the web console of one site."""

from __future__ import annotations

from imsrelay.console.backend import Organisation
from imsrelay.console.server import ConsoleServer
from imsrelay.model.settings import SiteConfig


def site_console(cfg: SiteConfig, admin: tuple[str, int], token: str) -> ConsoleServer:
    """``serve`` with ``[console] enabled``: a console for this one site, whose admin
    endpoint listens at ``admin`` (host, port) and answers ``token``."""
    host, port = admin
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return ConsoleServer(Organisation([base], token), token, listen=cfg.console.listen, port=cfg.console.port, backlog=cfg.smtp.listen_backlog,
                         title=cfg.organisation)
