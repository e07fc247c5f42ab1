"""``imsrelay faults add|list|clear`` — make a running site misbehave on purpose (lab).

Faults live in the running site (admin endpoint ``/faults``); each has an expiry
(``--expires``, default 1h).  See ``imsrelay.observe.faults`` for what each kind does.
"""

from __future__ import annotations

import argparse
from typing import Any

from imsrelay.admin.client import cli_call
from imsrelay.commands import add_site_options
from imsrelay.config.loader import load_config
from imsrelay.observe.faults import KINDS, STAGES


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("faults", help="faults on demand: chosen replies, dropped connections, latency, cut links",
                       description="Faults on demand at a running site (lab).")
    psub = p.add_subparsers(dest="faults_command", metavar="ACTION")
    psub.required = True

    add = psub.add_parser("add", help="add a fault")
    add_site_options(add, data=False)
    add.add_argument("--kind", choices=KINDS, default="reply", help="reply (default), drop, latency or link")
    add.add_argument("--stage", help=f"{', '.join(STAGES)} (latency also: any)")
    add.add_argument("--reply", help='the reply, e.g. "451 4.3.0 try again later" (kind reply)')
    add.add_argument("--probability", type=float, help="fire with this probability (0-1]; default always")
    add.add_argument("--sessions", type=int, help="only for the next N attempts: connections for connect/helo faults, "
                          "mail transactions for mail/rcpt/data faults (a client retrying on an open "
                          "connection meets exactly N refusals); used up, the fault leaves the list")
    add.add_argument("--peer", help="inbound: only sessions from this address/network; "
                                    "link: the peer site, host or host:port whose traffic is refused")
    add.add_argument("--delay", help="latency: how long to wait before answering, e.g. 2s")
    add.add_argument("--expires", default="1h", help="the fault ends after this long (default 1h)")
    add.set_defaults(func=cmd_add)

    ls = psub.add_parser("list", help="faults now in force")
    add_site_options(ls, data=False)
    ls.set_defaults(func=cmd_list)

    clear = psub.add_parser("clear", help="clear faults (all, or those given)")
    add_site_options(clear, data=False)
    clear.add_argument("fault_ids", metavar="ID", nargs="*")
    clear.set_defaults(func=cmd_clear)


def _config(args: argparse.Namespace) -> Any:
    return load_config(args.config)


def cmd_add(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"kind": args.kind, "expires": args.expires}
    for name in ("stage", "reply", "probability", "sessions", "peer", "delay"):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    config = _config(args)
    fault = cli_call(config, "POST", "/faults", body)
    print(f"{config.site}: fault {fault['id']}: {fault['description']} (expires in {fault['expires_in']:.0f}s)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    config = _config(args)
    answer = cli_call(config, "GET", "/faults")
    if not answer["faults"]:
        print(f"{config.site}: no faults")
        return 0
    for f in answer["faults"]:
        left = f" ({f['sessions_left']} attempt(s) left)" if f.get("sessions") is not None else ""
        print(f"{f['id']:<5} {f['description']}{left}; expires in {f['expires_in']:.0f}s")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.fault_ids:
        cleared = [cli_call(config, "DELETE", f"/faults/{i}")["cleared"][0] for i in args.fault_ids]
    else:
        cleared = cli_call(config, "DELETE", "/faults")["cleared"]
    print(f"{config.site}: cleared {', '.join(cleared) if cleared else 'nothing (no faults)'}")
    return 0
