"""``imsrelay kcc check-now`` — the knowledge consistency check (Check Now)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from imsrelay.admin.client import cli_call, server_calls
from imsrelay.commands import add_site_options
from imsrelay.config.loader import load_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    k = sub.add_parser("kcc", help="knowledge consistency check (Check Now)",
                       description="Make sites that arrived by replication known to routing and report "
                                   "inconsistencies (e.g. routing addresses, KB Q180401).")
    ksub = k.add_subparsers(dest="kcc_command", metavar="ACTION")
    ksub.required = True
    now = ksub.add_parser("check-now", help="run the knowledge consistency check at the running site")
    add_site_options(now, data=False)
    now.add_argument("--json", action="store_true", help="machine-readable output")
    now.add_argument("--all-servers", action="store_true",
                     help="run it at every server of the site ([[servers]] with their admin endpoints), not only "
                          "at this one")
    now.set_defaults(func=cmd_check_now)


def print_result(site: str, result: dict[str, Any]) -> None:
    known = result["known_sites"]
    awaiting = set(result.get("awaiting_replication", []))
    shown = [f"{n} (Site and Configuration only until replication completes)" if n in awaiting else n for n in known]
    print(f"Check Now at {site}: {len(known)} site(s) known ({', '.join(shown) or 'none'})")
    if result["learned"]:
        learned = ", ".join(f"{name} (@{domain})" for name, domain in result["learned"])
        print(f"known to routing by replication: {learned}")
    else:
        print("no sites beyond Connected Sites learned by replication")
    for f in result["findings"]:
        print(f"{f['severity']:<7} {f['site']}: {f['message']}")
    if not result["findings"]:
        print("no inconsistencies found")


def cmd_check_now(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.all_servers:
        results = {s.name: result for s, result in server_calls(config, "POST", "/kcc/check-now")}
    else:
        results = {config.server: cli_call(config, "POST", "/kcc/check-now")}
    if args.json:
        print(json.dumps(results if args.all_servers else results[config.server], indent=2))
    else:
        for server, result in results.items():
            print_result(f"{config.site}/{server}" if args.all_servers else config.site, result)
    return 1 if any(f["severity"] == "error" for r in results.values() for f in r["findings"]) else 0
