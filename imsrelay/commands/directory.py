"""``imsrelay directory list|add|delete|passwd|restrict|hash-password`` — the site's directory.

``list`` reads the database; ``add``/``delete``/``passwd``/``restrict`` go through the
running site's admin endpoint, or (``--offline``) change the stopped site's database
directly.  ``passwd`` hashes the password here (scrypt) and sends only the hash.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from imsrelay.admin.client import cli_call, ensure_offline
from imsrelay.commands import add_site_options
from imsrelay.config.loader import load_config
from imsrelay.directory.store import Directory, DirectoryError, DirectoryNotFound
from imsrelay.model.errors import UserError
from imsrelay.model.objects import Mailbox
from imsrelay.policy.auth import PasswordError, hash_password


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
    pw = dsub.add_parser("passwd", help="set the SMTP AUTH password of a mailbox homed at this site",
                         description="Set a mailbox's password (stored as a salted scrypt hash, never in clear). "
                                     "Reads it from the terminal (twice) or, with --password-stdin or when stdin "
                                     "is not a terminal, one line from stdin.")
    pw.add_argument("alias", help="the mailbox alias")
    add_site_options(pw)
    pw.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    pw.add_argument("--offline", action="store_true", help="change the stopped site's database directly")
    pw.set_defaults(func=cmd_passwd)
    hp = dsub.add_parser("hash-password", help="print the scrypt hash of a password (for mailboxes.password_hash)")
    hp.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    hp.set_defaults(func=cmd_hash_password)
    rs = dsub.add_parser("restrict", help="Delivery Restrictions and Message Filter of a mailbox (they replicate)",
                         description="Set who may send to a mailbox homed at this site (--accept-from, "
                                     "--reject-from: addresses or @domains; reject wins) and whose mail to it is "
                                     "filtered (--filter, deleted or kept in the turf directory).  A list given "
                                     "replaces the old one; --clear-* empties it.  Without options: show them.")
    rs.add_argument("alias", help="the mailbox alias")
    add_site_options(rs)
    for name, what in (("accept-from", "accept mail only from these senders / @domains"),
                       ("reject-from", "refuse mail from these senders / @domains (550 5.7.1)"),
                       ("filter", "filter mail from these senders / @domains (Message Filtering)")):
        rs.add_argument(f"--{name}", action="append", metavar="SENDER", help=what)
        rs.add_argument(f"--clear-{name}", action="store_true", help=f"empty the {name} list")
    rs.add_argument("--filter-action", choices=("delete", "turf"), help="what filtering does (default turf)")
    rs.add_argument("--offline", action="store_true", help="change the stopped site's database directly")
    rs.set_defaults(func=cmd_restrict)


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


def read_password(args: argparse.Namespace) -> str:
    if args.password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != password:
            raise UserError("the passwords differ; nothing changed")
    if not password:
        raise UserError("the password must not be empty")
    return password


def _hash(password: str) -> str:
    try:
        return hash_password(password)
    except PasswordError as exc:
        raise UserError(str(exc)) from None


def cmd_hash_password(args: argparse.Namespace) -> int:
    print(_hash(read_password(args)))
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    config = load_config(args.config, data_dir=args.data)
    stored = _hash(read_password(args))
    if not args.offline:
        cli_call(config, "POST", f"/directory/mailboxes/{args.alias}/password", {"password_hash": stored})
        print(f"{config.site}: password of {args.alias} set")
        return 0
    _offline(args, config, lambda d: d.set_password_hash(args.alias, stored,
                                                         replicate=config.auth.replicate_credentials))
    print(f"{config.site}: password of {args.alias} set (offline)")
    return 0


def cmd_restrict(args: argparse.Namespace) -> int:
    config = load_config(args.config, data_dir=args.data)
    lists: dict[str, list[str]] = {}
    for opt, key in (("accept_from", "accept_from"), ("reject_from", "reject_from"), ("filter", "filter_senders")):
        values = getattr(args, opt)
        if getattr(args, f"clear_{opt}"):
            lists[key] = []
        elif values:
            lists[key] = [v for item in values for v in item.split(",") if v.strip()]
    action: str | None = args.filter_action
    if not args.offline:
        if lists or action:
            body: dict[str, object] = {**lists, **({"filter_action": action} if action else {})}
            m = cli_call(config, "PUT", f"/directory/mailboxes/{args.alias}/restrictions", body)
        else:
            snap = cli_call(config, "GET", f"/directory?site={config.site}")
            found = [x for x in snap["mailboxes"] if x["alias"].lower() == args.alias.lower()]
            if not found:
                raise UserError(f"{config.site}: no mailbox {args.alias}")
            m = found[0]
        _print_rules(config.site, m["alias"], m["accept_from"], m["reject_from"], m["filter_senders"],
                     m["filter_action"])
        return 0

    def apply(d: Directory) -> Mailbox:
        if not lists and not action:
            mbx = d.mailbox(args.alias)
            if mbx is None:
                raise DirectoryError(f"no mailbox {args.alias} at {config.site}")
            return mbx
        return d.set_sender_rules(args.alias, accept_from=lists.get("accept_from"),
                                  reject_from=lists.get("reject_from"), filter_senders=lists.get("filter_senders"),
                                  filter_action=action)

    mbx: Mailbox = _offline(args, config, apply)
    r = mbx.sender_rules
    _print_rules(config.site, mbx.alias, r.accept_from, r.reject_from, r.filter_senders, r.filter_action)
    return 0


def _print_rules(site: str, alias: str, accept: Sequence[str], reject: Sequence[str], filtered: Sequence[str],
                 action: str) -> None:
    def show(items: Sequence[str], empty: str) -> str:
        return ", ".join(items) or empty

    print(f"{site}: {alias}: accept from {show(accept, '(everyone)')}; reject from {show(reject, '(nobody)')}; "
          f"filter {show(filtered, '(nobody)')} ({action})")
