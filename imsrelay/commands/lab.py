"""``imsrelay lab`` — the embedded three-site KB Q196927 lab (no Docker, no root)."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from imsrelay.commands.serve import run_until_signalled
from imsrelay.console.lab_console import lab_console
from imsrelay.errors import UserError
from imsrelay.lab import ADMIN_TOKEN, API_HOST, STAGE_NAMES, STAGES, Lab, stage_index
from imsrelay.logs import configure_logging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:

    p = sub.add_parser(
        "lab", help="run SiteA, SiteB, SiteC and an Internet host on loopback (KB Q196927)",
        description="Run the seed organisation on 127.10.10.10/.15/.20 (+ Internet on 127.10.10.100). "
                    "By default it comes up in the article's end state; --stage install starts at step 1. "
                    "`imsrelay lab next` (another terminal) advances a running lab one step.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages: " + ", ".join(STAGE_NAMES) + ", end")
    p.add_argument("action", nargs="?", default="run", choices=["run", "next", "status"],
                   help="run the lab (default); next: advance a running lab one stage; status: print its stage")
    p.add_argument("--data", type=Path, default=Path("lab-data"), help="data directory (default ./lab-data)")
    p.add_argument("--port", type=int, default=2525, help="SMTP port of every host (default 2525)")
    p.add_argument("--admin-port", type=int, default=8025,
                   help="port of each site's admin endpoint on its own address (default 8025)")
    p.add_argument("--api-host", default=None,
                   help="address of the lab endpoint (message API for every host; default 127.10.10.1)")
    p.add_argument("--api-port", type=int, default=8025,
                   help="port of the lab endpoint (default 8025; 0: any free port)")
    p.add_argument("--stage", default=None,
                   help="stage to reach at start: install … site-addressing-c, or end (default); given, the "
                        "console shows the stage with a 'next step' control")
    p.add_argument("--console-listen", default="127.10.10.1",
                   help="address of the web console for the organisation (default 127.10.10.1)")
    p.add_argument("--console-port", type=int, default=8080,
                   help="port of the web console (default 8080; 0: no console)")
    p.add_argument("--exchange-timers", action="store_true",
                   help="use Exchange's real retry intervals (15m, 30m, 1h, 4h) instead of lab-speed ones")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="log level of the sites' events on stderr (default warning)")
    p.set_defaults(func=cmd_lab)


def cmd_lab(args: argparse.Namespace) -> int:

    data = args.data
    if args.action == "next":
        pid = _running_pid(data)
        if pid is None:
            raise UserError(f"no lab is running with data in {data} (start it with: imsrelay lab --data {data})")
        (data / "lab-next").touch()
        print(f"asked the lab (pid {pid}) to take the next step; it prints what it did")
        return 0
    if args.action == "status":
        lab = Lab(data, port=args.port)
        if lab.stage < 0:
            raise UserError(f"no lab in {data} yet")
        running = "running" if _running_pid(data) else "not running"
        print(f"stage {STAGE_NAMES[lab.stage]} ({STAGES[lab.stage][1]}); lab {running}")
        return 0
    staged = args.stage is not None
    args.stage = args.stage or "end"
    try:
        target = stage_index(args.stage)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if _running_pid(data) is not None:
        raise UserError(f"a lab is already running with data in {data}")
    configure_logging(args.log_level, "console" if args.log_level != "warning" else "auto")

    async def main(stop: asyncio.Event) -> None:
        lab = Lab(data, port=args.port, admin_port=args.admin_port, fast=not args.exchange_timers,
                  say=lambda s: print(s, flush=True), api_host=args.api_host or API_HOST, api_port=args.api_port)
        if 0 <= lab.stage and target < lab.stage and args.stage != "end":
            print(f"lab: {data} is already at stage {STAGE_NAMES[lab.stage]}; "
                  f"delete it to start again from {args.stage}")
        data.mkdir(parents=True, exist_ok=True)
        pidfile = data / "lab.pid"
        pidfile.write_text(str(os.getpid()))
        console = None
        try:
            await lab.start(target)
            print(await lab.describe(), flush=True)
            if args.console_port:
                console = lab_console(lab, listen=args.console_listen, port=args.console_port, with_stage=staged)
                try:
                    await console.start()
                    print(f"console  {console.url}  (log in with the admin token {ADMIN_TOKEN})", flush=True)
                except OSError as exc:  # the lab works without its console
                    await console.stop()
                    console = None
                    print(f"lab: no web console: {args.console_listen}:{args.console_port}: "
                          f"{exc.strerror or exc} (choose another with --console-port)", flush=True)
            print("imsrelay lab: ready", flush=True)
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except TimeoutError:
                    pass
                if (data / "lab-next").exists():
                    (data / "lab-next").unlink()
                    async with lab.step_lock:
                        done = await lab.next_stage()
                    print(f"lab: now at stage {done}" if done else "lab: already at the last stage", flush=True)
                await lab.restart_changed()
        finally:
            if console is not None:
                await console.stop()
            await lab.stop()
            pidfile.unlink(missing_ok=True)
            print("lab: stopped", flush=True)

    try:
        run_until_signalled(main)
    except OSError as exc:
        raise UserError(f"cannot start the lab: {exc.strerror or exc} (another lab or site running? "
                        f"choose other ports with --port / --admin-port)") from None
    return 0


def _running_pid(data: Path) -> int | None:
    try:
        pid = int((data / "lab.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
