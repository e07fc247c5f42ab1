"""``imsrelay lab`` — the embedded three-site KB Q196927 lab (no Docker, no root)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from imsrelay.commands import PORT, positive_seconds, whole_number
from imsrelay.commands.serve import run_until_signalled
from imsrelay.console.lab_console import lab_console
from imsrelay.console.server import ConsoleServer
from imsrelay.lab.embedded import (
    ACCESS_PORTS,
    ADMIN_TOKEN,
    API_HOST,
    STAGE_NAMES,
    Lab,
    LabStepRefused,
    parse_servers,
    stage_index,
)
from imsrelay.model.errors import UserError
from imsrelay.observe.logs import configure_logging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lab", help="run SiteA, SiteB, SiteC and an Internet host on loopback (KB Q196927)",
        description="Run the seed organisation on 127.10.10.10/.15/.20 (+ Internet on 127.10.10.100). "
                    "By default it comes up in the article's end state (replication at lab speed); "
                    "--stage install starts at step 1 for a walk by hand (Exchange's replication timing: "
                    "first requests 5 minutes after a site starts, lab-added connectors every 3 hours). "
                    "`imsrelay lab next` (another terminal) takes the first step the sites' files and "
                    "directories show not done; `imsrelay lab status` lists them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages: " + ", ".join(STAGE_NAMES) + ", end")
    p.add_argument("action", nargs="?", default="run", choices=["run", "next", "status"],
                   help="run the lab (default); next: a running lab takes the next step not done yet; "
                        "status: which of the article's steps the files and directories show done")
    p.add_argument("--data", type=Path, default=Path("lab-data"), help="data directory (default ./lab-data)")
    p.add_argument("--port", type=PORT, default=2525, help="SMTP port of every host (default 2525)")
    p.add_argument("--admin-port", type=PORT, default=8025,
                   help="port of each site's admin endpoint on its own address (default 8025)")
    p.add_argument("--submission-port", type=int, default=2587,
                   help="each site's submission port, STARTTLS + AUTH (default 2587)")
    p.add_argument("--smtps-port", type=int, default=2465,
                   help="each site's implicit-TLS submission port (default 2465)")
    for option, key, what in (("--imap-port", "imap_port", "IMAP4 port, STARTTLS"),
                              ("--imaps-port", "imaps_port", "IMAP4 implicit-TLS port"),
                              ("--pop3-port", "pop3_port", "POP3 port, STLS"),
                              ("--pop3s-port", "pop3s_port", "POP3 implicit-TLS port")):
        p.add_argument(option, type=whole_number(0, 65535, "a TCP port (0: that listener off)"),
                       default=ACCESS_PORTS[key], help=f"each site's {what} (default {ACCESS_PORTS[key]}; Dovecot)")
    p.add_argument("--dovecot", default="dovecot",
                   help="the Dovecot binary the sites run for IMAP4/POP3 (default: dovecot, from PATH or /usr/sbin)")
    p.add_argument("--api-host", default=None,
                   help="address of the lab endpoint (message API for every host; default 127.10.10.1)")
    p.add_argument("--api-port", type=whole_number(0, 65535, "a TCP port (0: any free one)"), default=8025,
                   help="port of the lab endpoint (default 8025; 0: any free port)")
    p.add_argument("--servers", action="append", default=[], metavar="SITE=N",
                   help="run a site as N servers, each on its own address (SiteA=2: ServerA on 127.10.10.10 and "
                        "Server1 on 127.10.10.11, as the seed's A and MX records name them); at the lab's first start")
    p.add_argument("--stage", default=None,
                   help="stage to reach at start: install … site-addressing-c, or end (default); given, the "
                        "web console shows the stage with a 'next step' control")
    p.add_argument("--console-listen", default="127.10.10.1",
                   help="address of the web console for the organisation (default 127.10.10.1)")
    p.add_argument("--console-port", type=whole_number(0, 65535, "a TCP port (0: no console)"), default=8080,
                   help="port of the web console (default 8080; 0: no console)")
    p.add_argument("--exchange-timers", action="store_true",
                   help="use Exchange's real retry intervals (15m, 30m, 1h, 4h) instead of lab-speed ones")
    p.add_argument("--wait", type=positive_seconds, default=300.0, metavar="SECONDS",
                   help="next: how long to wait for the running lab's answer (default 300)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="log level of the sites' events on stderr (default warning)")
    p.set_defaults(func=cmd_lab)


def cmd_lab(args: argparse.Namespace) -> int:
    data = args.data
    if args.action == "next":
        return _ask_next(data, args.wait)
    if args.action == "status":
        lab = Lab(data, port=args.port)
        if not lab.exists:
            raise UserError(f"no lab in {data.resolve()} yet (start one with: imsrelay lab --data {data})")
        pid = _running_pid(data)
        for line in lab.status_lines(f"running (pid {pid})" if pid else "not running"):
            print(line)
        return 0
    try:
        servers = parse_servers(args.servers)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    staged = args.stage is not None  # the console shows the walk and its "next step" control
    args.stage = args.stage or "end"
    try:
        target = stage_index(args.stage)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if _running_pid(data) is not None:
        raise UserError(f"a lab is already running with data in {data}")
    if staged:
        existing = Lab(data, port=args.port)
        if existing.exists and target < existing.stage:
            at = "end" if existing.stage == len(STAGE_NAMES) - 1 else STAGE_NAMES[existing.stage]
            raise UserError(f"the lab in {data} is already at stage {at}, past {args.stage}, and a lab does not "
                            f"go back: give another --data (or delete {data}) to start from {args.stage}")
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the lab's data directory {data}: {exc.strerror or exc}") from None
    configure_logging(args.log_level, "console")  # a person reads this console: key=value lines
    verbose = args.log_level in ("debug", "info")

    async def main(stop: asyncio.Event) -> None:
        # walking by hand (--stage before the end): Exchange's replication timing in
        # what the lab writes, so nothing replicates before the person asks for it
        lab = Lab(data, port=args.port, admin_port=args.admin_port, fast=not args.exchange_timers,
                  hand=args.stage != "end", say=lambda s: print(s, flush=True),
                  detail=(lambda s: print(s, flush=True)) if verbose else None,
                  api_host=args.api_host or API_HOST, api_port=args.api_port,
                  submission_port=args.submission_port, smtps_port=args.smtps_port,
                  access_ports={k: getattr(args, k) for k in ACCESS_PORTS}, dovecot=args.dovecot, servers=servers)
        data.mkdir(parents=True, exist_ok=True)
        pidfile = data / "lab.pid"
        pidfile.write_text(str(os.getpid()))
        (data / NEXT_REQUEST).unlink(missing_ok=True)
        console: ConsoleServer | None = None
        started = False
        try:
            await lab.start(target)
            started = True
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
                request = data / NEXT_REQUEST
                if request.exists():
                    async with lab.step_lock:
                        await _answer_next(lab, request)
                await lab.restart_changed()
        finally:
            if console is not None:
                await console.stop()
            await lab.stop()
            pidfile.unlink(missing_ok=True)
            if started:
                print("lab: stopped", flush=True)

    try:
        run_until_signalled(main)
    except OSError as exc:
        raise UserError(f"cannot start the lab: {exc.strerror or exc} (another lab or site running? "
                        f"{busy_port_hint(str(exc), args)})") from None
    return 0


_BIND = re.compile(r"\('([^']*)', (\d+)\)")


def busy_port_hint(message: str, args: argparse.Namespace) -> str:
    """Which option moves the port a bind error names (pure)."""
    found = _BIND.search(message)
    options = [("--port", args.port), ("--admin-port", args.admin_port), ("--submission-port", args.submission_port),
               ("--smtps-port", args.smtps_port)]
    if found is not None:
        host, port = found.group(1), int(found.group(2))
        if host == (args.api_host or API_HOST) and port == args.api_port:
            return "choose another port with --api-port (the lab endpoint), or 0 for any free one"
        if host == args.console_listen and port == args.console_port:
            return "choose another port with --console-port, or 0 for no console"
        for option, value in options:
            if port == value:
                return f"choose another port with {option}"
    return "choose other ports with --port / --admin-port / --api-port"


NEXT_REQUEST = "lab-next"
NEXT_ANSWER = "lab-next.answer"


async def _answer_next(lab: Any, request: Path) -> None:
    """Take the next step for ``imsrelay lab next`` and leave it the answer."""
    token = request.read_text().strip()
    request.unlink(missing_ok=True)
    try:
        done = await lab.next_stage()
        stage = lab.stage
        if done is None:
            answer = {"ok": True, "message": "lab: already at the end: every step of KB Q196927 is done"}
        else:
            reached = "end" if stage == len(STAGE_NAMES) - 1 else STAGE_NAMES[stage]
            answer = {"ok": True, "message": f"lab: did {done}; now at stage {reached}"}
    except LabStepRefused as exc:
        answer = {"ok": False, "message": str(exc)}
    except Exception as exc:  # keep the lab running; tell the person what failed
        answer = {"ok": False, "message": f"lab next: failed: {exc}"}
    print(answer["message"], flush=True)
    tmp = lab.data_dir / (NEXT_ANSWER + ".tmp")
    tmp.write_text(json.dumps({"token": token, **answer}))
    os.replace(tmp, lab.data_dir / NEXT_ANSWER)


def _ask_next(data: Path, wait: float) -> int:
    """``imsrelay lab next``: ask the running lab for the next step, print its answer."""
    pid = _running_pid(data)
    if pid is None:
        raise UserError(f"no lab is running with data in {data} (start it with: imsrelay lab --data {data})")
    token = secrets.token_hex(8)
    answer_file = data / NEXT_ANSWER
    answer_file.unlink(missing_ok=True)
    tmp = data / (NEXT_REQUEST + ".tmp")
    tmp.write_text(token)
    os.replace(tmp, data / NEXT_REQUEST)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            answer = json.loads(answer_file.read_text())
        except (FileNotFoundError, ValueError):
            answer = None
        if answer and answer.get("token") == token:
            if not answer["ok"]:
                raise UserError(str(answer["message"]).removeprefix("lab next: "))
            print(answer["message"])
            return 0
        if _running_pid(data) is None:
            raise UserError("the lab stopped before it answered", status=1)
        time.sleep(0.2)
    raise UserError(f"the lab (pid {pid}) has not answered within {wait:g}s; its console says what it is doing",
                    status=1)


def _running_pid(data: Path) -> int | None:
    try:
        pid = int((data / "lab.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None
