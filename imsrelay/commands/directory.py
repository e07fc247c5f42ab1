"""``imsrelay directory list|add|delete`` — the site's directory.

``list`` reads the database; ``add``/``delete`` go through the running site's admin
endpoint, or (``--offline``) change the stopped site's database directly.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from imsrelay.admin_client import cli_call, ensure_offline
from imsrelay.commands import add_site_options
from imsrelay.config import load_config
from imsrelay.directory import Directory, DirectoryError, DirectoryNotFound
from imsrelay.errors import UserError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("directory", help="show or change the site's directory (mailboxes, sites)",
                       description="Mailboxes and sites in a site's directory database.")
    dsub = d.add_subparsers(dest="directory_command", metavar="ACTION")
    dsub.required = True
    ls = dsub.add_parser("list", help="list mailboxes (all sites) and their proxy addresses")
    add_site_options(ls)
    ls.add_argument("--site", help="only mailboxes homed at this site")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)
    add = dsub.add_parser("add", help="create a mailbox homed at this site (it replicates)")
    add.add_argument("alias", help="the mailbox alias (letters, digits, . _ -)")
    add.add_argument("--display-name", help="display name (default: the alias)")
    add_site_options(add)
    add.add_argument("--offline", action="store_true", help="change the stopped site's database directly")
    add.set_defaults(func=cmd_add)
    rm = dsub.add_parser("delete", help="delete a mailbox homed at this site (a tombstone replicates)")
    rm.add_argument("alias", help="the mailbox alias")
    add_site_options(rm)
    rm.add_argument("--offline", action="store_true", help="change the stopped site's database directly")
    rm.set_defaults(func=cmd_delete)


def open_directory(args: argparse.Namespace) -> Directory:
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

        raise UserError(str(exc)) from None
    finally:
        directory.close()


def cmd_add(args: argparse.Namespace) -> int:

    config = load_config(args.config, data_dir=args.data)
    if not args.offline:
        m = cli_call(config, "POST", "/directory/mailboxes", {"alias": args.alias, "display_name": args.display_name})
        print(f"{config.site}: mailbox {m['alias']} created, SMTP:{m['primary_address']}")
        return 0
    mbx = _offline(args, config, lambda d: d.add_mailbox(args.alias, args.display_name))
    print(f"{config.site}: mailbox {mbx.alias} created, SMTP:{mbx.primary_address} (offline)")
    return 0


def _offline(args: argparse.Namespace, config: Any, change: Callable[[Directory], Any]) -> Any:
    """``--offline``: make the change in the stopped site's database directly."""

    ensure_offline(config)
    directory = open_directory(args)
    try:
        return change(directory)
    except DirectoryNotFound as exc:
        raise UserError(f"{config.site}: {exc}", status=1) from None
    except DirectoryError as exc:
        raise UserError(f"{config.site}: {exc}") from None
    finally:
        directory.close()


def cmd_delete(args: argparse.Namespace) -> int:

    config = load_config(args.config, data_dir=args.data)
    if not args.offline:
        cli_call(config, "DELETE", f"/directory/mailboxes/{args.alias}")
        print(f"{config.site}: mailbox {args.alias} deleted (the deletion replicates as a tombstone)")
        return 0
    _offline(args, config, lambda d: d.delete_mailbox(args.alias))
    print(f"{config.site}: mailbox {args.alias} deleted (offline; the deletion replicates as a tombstone)")
    return 0
