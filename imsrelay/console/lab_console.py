"""The embedded lab's console: the whole organisation (every site and the Internet
host), with the article's stage and its "next step" control."""

from __future__ import annotations

import asyncio
from typing import Any

from imsrelay.console.backend import Organisation
from imsrelay.console.server import ConsoleServer
from imsrelay.lab.embedded import ADMIN_TOKEN, INTERNET, ORGANISATION, SITES, STAGES, LabStepRefused

LAB_CONSOLE_LISTEN = "127.10.10.1"
LAB_CONSOLE_PORT = 8080


class LabStage:
    """The lab's walk through KB Q196927, for the console's "next step" control."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.lock: asyncio.Lock = lab.step_lock
        self.last: str | None = None

    def state(self) -> dict[str, Any]:
        """Where the walk is (read from the sites' files and directories: call it off the loop)."""
        index = self.lab.stage
        following = STAGES[index + 1] if 0 <= index + 1 < len(STAGES) else None
        return {"index": index, "total": len(STAGES), "name": STAGES[index][0] if index >= 0 else None,
                "text": STAGES[index][1] if index >= 0 else None, "busy": self.lock.locked(),
                "next": {"name": following[0], "text": following[1]} if following else None,
                "stages": [{"name": n, "text": t} for n, t, _ in STAGES], "last_step": self.last}

    async def next(self) -> dict[str, Any]:
        """Take the next step not done yet (as ``imsrelay lab next``); a step that would
        change what a person wrote is refused, with the reason."""
        async with self.lock:
            try:
                done = await self.lab.next_stage()
            except LabStepRefused as exc:
                return {"done": None, "refused": str(exc), **await asyncio.to_thread(self.state)}
        self.last = done
        return {"done": done, **await asyncio.to_thread(self.state)}


def lab_console(lab: Any, *, listen: str = LAB_CONSOLE_LISTEN, port: int = LAB_CONSOLE_PORT,
                with_stage: bool = False) -> ConsoleServer:
    """One console for the embedded lab's organisation: every site and the Internet host."""
    endpoints = [f"http://{s.address}:{lab.admin_port}" for s in (*SITES, INTERNET)]
    return ConsoleServer(Organisation(endpoints, ADMIN_TOKEN), ADMIN_TOKEN, listen=listen, port=port,
                         stage=LabStage(lab) if with_stage else None, title=ORGANISATION)
