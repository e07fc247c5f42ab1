"""``imsrelay directory list|add|delete`` — the site's directory, read from its database."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from imsrelay.config import load_config
from imsrelay.directory import Directory, DirectoryError


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("directory", help="show or change the site's directory (mailboxes, sites)",
                       description="Mailboxes and sites in a site's directory database.")
    dsub = d.add_subparsers(dest="directory_command", metavar="ACTION")
    dsub.required = True
    ls = dsub.add_parser("list", help="list mailboxes (all sites) and their proxy addresses")
    _common(ls)
    ls.add_argument("--site", help="only mailboxes homed at this site")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, type=Path, help="the site's TOML file")
    p.add_argument("--data", type=Path, help="data directory (overrides site.data_dir)")


def open_directory(args: argparse.Namespace) -> Directory:
    from imsrelay.cli import UserError

    config = load_config(args.config, data_dir=args.data)
    db = config.data_dir / "directory.sqlite3"
    if not db.exists():
        raise UserError(f"no directory at {db}: the site has not been started yet (imsrelay serve)")
    return Directory(db, config.site)


def cmd_list(args: argparse.Namespace) -> int:
    directory = open_directory(args)
    try:
        boxes = directory.mailboxes(args.site)
        sites = directory.sites()
        if args.json:
            print(json.dumps({
                "sites": [s.__dict__ for s in sites],
                "mailboxes": [{"alias": m.alias, "display_name": m.display_name, "home_site": m.home_site,
                               "proxy_addresses": list(m.proxy_addresses)} for m in boxes]}, indent=2))
            return 0
        for s in sites:
            print(f"site {s.name} (server {s.server}): Site Addressing SMTP {s.smtp_address}, "
                  f"routing address {s.routing_address}")
        print(f"{'alias':<16} {'home site':<10} {'display name':<22} proxy addresses")
        for m in boxes:
            print(f"{m.alias:<16} {m.home_site:<10} {m.display_name:<22} {' '.join(m.proxy_addresses)}")
        return 0
    except DirectoryError as exc:
        from imsrelay.cli import UserError

        raise UserError(str(exc)) from None
    finally:
        directory.close()
