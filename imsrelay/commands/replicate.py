"""``imsrelay replicate request-now|status`` — Directory Replication Connectors.

Both talk to the running site's admin endpoint (``[admin]`` in the site's file).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imsrelay.admin.client import cli_call
from imsrelay.commands import add_site_options
from imsrelay.config.loader import load_config
from imsrelay.directory.keys import generate_private_key, public_key_text, write_private_key
from imsrelay.model.errors import UserError
from imsrelay.model.settings import schedule_text


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser("replicate", help="directory replication: Request Now, status",
                       description="Directory replication between the sites of the organisation (by mail).")
    rsub = r.add_subparsers(dest="replicate_command", metavar="ACTION")
    rsub.required = True
    now = rsub.add_parser("request-now", help="ask a site for its directory changes now",
                          description="Request Now: by default 'update only new and modified items' "
                                      "(since the high-water mark); --all requests everything.")
    add_site_options(now, data=False)
    now.add_argument("--site", required=True, help="the remote site's directory name (e.g. SiteB)")
    now.add_argument("--all", action="store_true", help="request every item, not only new and modified ones")
    now.set_defaults(func=cmd_request_now)
    st = rsub.add_parser("status", help="per peer: high-water mark, last request/reply, backlog")
    add_site_options(st, data=False)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status)
    sv = rsub.add_parser("servers", help="intra-site replication: this server's view of the site's other servers",
                         description="A site of several servers ([[servers]]): every server holds the whole "
                                     "directory; each pulls the others' changes by USN when told of them and on a "
                                     "backstop (replication.intrasite_interval; Exchange: 300 s + 30 s per "
                                     "server, KB Q199354). --pull-now pulls from every other server now.")
    add_site_options(sv, data=False)
    sv.add_argument("--pull-now", action="store_true", help="pull every other server's changes now")
    sv.add_argument("--json", action="store_true", help="machine-readable output")
    sv.set_defaults(func=cmd_servers)
    kg = rsub.add_parser("keygen", help="make this site's Ed25519 replication key; print its public key",
                         description="Write a new Ed25519 private key (PEM, mode 0600) for replication.signing_key "
                                     "and print the line to add to every site's [replication.trusted_keys].")
    kg.add_argument("--out", required=True, type=Path, help="where to write the private key")
    kg.add_argument("--site", required=True, help="this site's directory name (for the printed line)")
    kg.add_argument("--force", action="store_true", help="replace an existing key file")
    kg.set_defaults(func=cmd_keygen)


def when(ts: float | None) -> str:
    if not ts:
        return "never"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise UserError(f"{args.out} exists already (use --force to replace it)")
    key = generate_private_key()
    if args.force:
        args.out.unlink(missing_ok=True)
    try:
        write_private_key(args.out, key)
    except FileExistsError:
        raise UserError(f"{args.out} exists already (use --force to replace it)") from None
    except OSError as exc:
        raise UserError(f"{args.out}: {exc.strerror or exc}") from None
    print(f'{args.site} = "{public_key_text(key)}"')
    return 0


def cmd_request_now(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    result = cli_call(config, "POST", "/replication/request-now", {"site": args.site, "full": bool(args.all)})
    what = "all items" if result["full"] else f"new and modified items since USN {result['since_usn']}"
    print(f"{config.site}: Request Now sent to {result['site']} ({result['recipient']}): {what}; "
          f"queue id {result['queue_id']}")
    return 0


def key_scheme_line(status: dict[str, Any]) -> str:
    """``per-site ed25519 (trusted: SiteA, SiteB, SiteC)`` or ``shared organisation key``."""
    scheme = str(status.get("key_scheme") or "unknown")
    trusted = status.get("trusted_sites") or []
    return scheme + (f" (trusted: {', '.join(trusted)})" if trusted else "")


def cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    status = cli_call(config, "GET", "/replication/status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(status["rejected"].items())) or "none"
    print(f"{status['site']}: invocation {status['invocation']}, highest USN {status['highest_usn']}, "
          f"rejected messages: {rejected}")
    print(f"keys: {key_scheme_line(status)}")
    header = (f"{'peer':<10} {'schedule':<21} {'high-water':>10} {'invocation':<17} {'last request':<21} "
              f"{'last reply':<21} {'applied':>7} {'backlog':>7}  last error")
    print(header)
    for p in status["peers"]:
        schedule = schedule_text(p["schedule"]) if p["connector"] else "-"
        hw = str(p["high_water"]) + ("+" if p["pending_ranges"] else "")
        print(f"{p['site']:<10} {schedule:<21} {hw:>10} {(p['invocation'] or '-'):<17} "
              f"{when(p['last_request']):<21} {when(p['last_reply']):<21} {p['applied']:>7} "
              f"{p['backlog']:>7}  {p['last_error'] or '-'}")
    if not status["peers"]:
        print("(no replication connectors and no peers yet)")
    return 0


def cmd_servers(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    failed = False
    if args.pull_now:
        pulled = cli_call(config, "POST", "/directory/intrasite/pull-now")
        if args.json:
            print(json.dumps(pulled, indent=2))
        for r in pulled["pulled"]:
            failed = failed or "error" in r
            if not args.json:
                print(f"{config.server}: pulled from {r['server']}: " + (
                    f"failed: {r['error']}" if "error" in r else
                    f"{r['applied']} object(s) applied, {r['ignored']} already known, "
                    f"{r.get('passwords', 0)} password(s), {r['batches']} batch(es)"))
        if args.json:
            return 1 if failed else 0
    status = cli_call(config, "GET", "/directory/intrasite")
    if args.json:
        print(json.dumps(status, indent=2))
        return 1 if failed else 0
    print(f"{status['site']}/{status['server']}: highest USN {status['highest_usn']}, invocation "
          f"{status['invocation']}, backstop every {status['interval']:g}s, "
          + ("bridgehead (runs the replication connectors)" if status["bridgehead"] else "not the bridgehead"))
    print(f"{'server':<12} {'high-water':>10} {'invocation':<17} {'last pull':<21} {'applied':>7}  last error")
    for p in status["peers"]:
        print(f"{p['server']:<12} {p['high_water']:>10} {(p['invocation'] or '-'):<17} {when(p['last_pull']):<21} "
              f"{p['applied']:>7}  {p['last_error'] or '-'}")
    if not status["peers"]:
        print("(no other server of the site has an admin endpoint in [[servers]])")
    return 1 if failed else 0
