"""Where consoles come from: the embedded lab's (the whole organisation, with the
article's stage), one site's (``serve`` with ``[console]``), and ``imsrelay console``."""

from __future__ import annotations

import asyncio
from typing import Any

from imsrelay.console.backend import Organisation
from imsrelay.console.server import ConsoleServer

LAB_CONSOLE_LISTEN = "127.10.10.1"
LAB_CONSOLE_PORT = 8080


class LabStage:
    """The lab's walk through KB Q196927, for the console's "next step" control."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.lock: asyncio.Lock = lab.step_lock
        self.last: str | None = None

    def state(self) -> dict[str, Any]:
        from imsrelay.lab import STAGES

        index = self.lab.stage
        following = STAGES[index + 1] if 0 <= index + 1 < len(STAGES) else None
        return {"index": index, "total": len(STAGES), "name": STAGES[index][0] if index >= 0 else None,
                "text": STAGES[index][1] if index >= 0 else None, "busy": self.lock.locked(),
                "next": {"name": following[0], "text": following[1]} if following else None,
                "stages": [{"name": n, "text": t} for n, t, _ in STAGES], "last_step": self.last}

    async def next(self) -> dict[str, Any]:
        async with self.lock:
            done = await self.lab.next_stage()
        self.last = done
        return {"done": done, **self.state()}


def lab_console(lab: Any, *, listen: str = LAB_CONSOLE_LISTEN, port: int = LAB_CONSOLE_PORT,
                with_stage: bool = False) -> ConsoleServer:
    """One console for the embedded lab's organisation: every site and the Internet host."""
    from imsrelay.lab import ADMIN_TOKEN, INTERNET, ORGANISATION, SITES

    endpoints = [f"http://{s.address}:{lab.admin_port}" for s in (*SITES, INTERNET)]
    return ConsoleServer(Organisation(endpoints, ADMIN_TOKEN), ADMIN_TOKEN, listen=listen, port=port,
                         stage=LabStage(lab) if with_stage else None, title=ORGANISATION)


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
