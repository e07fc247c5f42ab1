"""``imsrelay directory list|show|add|delete|passwd|restrict|protocols|hash-password`` — the site's directory;
``add-custom|delete-custom`` (custom recipients, KB Q258203) and ``add-list|set-list|delete-list``
(distribution lists, KB Q185194).

``list`` reads the database; ``add``/``delete``/``passwd``/``restrict`` go through the
running site's admin endpoint, or (``--offline``) change the stopped site's database
directly.  ``passwd`` hashes the password here (scrypt) and sends only the hash.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from imsrelay.admin.client import cli_call, ensure_offline
from imsrelay.admin.server import recipient_dict
from imsrelay.commands import add_site_options
from imsrelay.config.loader import load_config
from imsrelay.directory.store import Directory, DirectoryError, DirectoryNotFound
from imsrelay.model.errors import UserError
from imsrelay.model.objects import CustomRecipient, DistributionList, Mailbox, Protocols, SiteObject
from imsrelay.model.settings import ACCESS_PROTOCOLS, SiteConfig
from imsrelay.policy import protocols as protocol_policy
from imsrelay.policy.auth import PasswordError, hash_password

CHANGE_OFFLINE = "change the stopped site's database directly"  # the help of every changing command's --offline


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
    add_site_options(add, offline=True, offline_help=CHANGE_OFFLINE)
    add.set_defaults(func=cmd_add)
    rm = dsub.add_parser("delete", help="delete a mailbox homed at this site (a tombstone replicates)")
    rm.add_argument("alias", help="the mailbox alias")
    add_site_options(rm, offline=True, offline_help=CHANGE_OFFLINE)
    rm.set_defaults(func=cmd_delete)
    pw = dsub.add_parser("passwd", help="set the SMTP AUTH password of a mailbox homed at this site",
                         description="Set a mailbox's password (stored as a salted scrypt hash, never in clear). "
                                     "Reads it from the terminal (twice) or, with --password-stdin or when stdin "
                                     "is not a terminal, one line from stdin.")
    pw.add_argument("alias", help="the mailbox alias")
    add_site_options(pw)
    pw.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    pw.add_argument("--offline", action="store_true", help=CHANGE_OFFLINE)
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
    rs.add_argument("--offline", action="store_true", help=CHANGE_OFFLINE)
    rs.set_defaults(func=cmd_restrict)
    sh = dsub.add_parser("show", help="a mailbox's properties: addresses, restrictions, protocols",
                         description="Show a mailbox's property pages as the directory holds them (read from the "
                                     "site's database): General, E-mail Addresses, Delivery Restrictions, and "
                                     "Protocols with what is in force at this server (site, server, mailbox).")
    sh.add_argument("alias", help="the mailbox alias")
    add_site_options(sh)
    sh.add_argument("--site", help="the mailbox's home site (default: this site)")
    sh.add_argument("--json", action="store_true", help="machine-readable output")
    sh.set_defaults(func=cmd_show)
    pr = dsub.add_parser("protocols", help="enable or disable IMAP4 and POP3 for a mailbox or the site",
                         description="Exchange 5.5's Protocols settings (Q233081): for a mailbox homed at this "
                                     "site (ALIAS; replicates with it) or, with --site-defaults, the site's "
                                     "defaults (they replicate with the site).  on / off, or default: use the "
                                     "defaults of the level above (the server's [access] imap4/pop3, then the "
                                     "site's).  Without --imap4/--pop3: show them.")
    pr.add_argument("alias", nargs="?", help="the mailbox alias")
    pr.add_argument("--site-defaults", action="store_true", help="change the site's protocol defaults")
    for name in ("imap4", "pop3"):
        pr.add_argument(f"--{name}", choices=("on", "off", "default"), help=f"{name.upper()}: on, off or default")
    add_site_options(pr, offline=True, offline_help=CHANGE_OFFLINE)
    pr.set_defaults(func=cmd_protocols)
    _register_recipients(dsub)


def _register_recipients(dsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ac = dsub.add_parser("add-custom", help="create a custom recipient here: mail to it goes to TARGET (Q258203)",
                         description="A custom recipient (KB Q258203): a directory object with the site's proxy "
                                     "addresses (alias@ the Site Addressing domain) whose mail is redirected to "
                                     "an external TARGET address.  It replicates like a mailbox.")
    ac.add_argument("alias", help="the alias (letters, digits, . _ -)")
    ac.add_argument("target", help="the external address, e.g. partner@example.net")
    ac.add_argument("--display-name", help="display name (default: the alias)")
    ac.add_argument("--address", action="append", default=[], help="a secondary SMTP address (repeatable)")
    add_site_options(ac, offline=True, offline_help=CHANGE_OFFLINE)
    ac.set_defaults(func=cmd_add_custom)
    al = dsub.add_parser("add-list", help="create a distribution list here (Q185194)",
                         description="A distribution list (KB Q185194): members by address (mailboxes, custom "
                                     "recipients, other lists), expanded once at its expansion site (any site "
                                     "when left out); NDRs for members go to --owner if set, else to the sender.")
    al.add_argument("alias", help="the alias (letters, digits, . _ -)")
    al.add_argument("--member", action="append", default=[], help="a member's address (repeatable)")
    al.add_argument("--owner", default="", help="the address NDRs for the members go to (default: the sender)")
    al.add_argument("--expansion-site", default="", help="the site that expands it (default: any site)")
    al.add_argument("--display-name", help="display name (default: the alias)")
    al.add_argument("--address", action="append", default=[], help="a secondary SMTP address (repeatable)")
    add_site_options(al, offline=True, offline_help=CHANGE_OFFLINE)
    al.set_defaults(func=cmd_add_list)
    sl = dsub.add_parser("set-list", help="change a distribution list's members, owner or expansion site")
    sl.add_argument("alias", help="the list's alias")
    sl.add_argument("--add", action="append", default=[], metavar="ADDRESS", help="add a member (repeatable)")
    sl.add_argument("--remove", action="append", default=[], metavar="ADDRESS", help="remove a member (repeatable)")
    sl.add_argument("--owner", help="the owner's address (\"\": none, NDRs to the sender)")
    sl.add_argument("--expansion-site", help="the site that expands it (\"\": any site)")
    add_site_options(sl, offline=True, offline_help=CHANGE_OFFLINE)
    sl.set_defaults(func=cmd_set_list)
    for kind, name, what in (("custom", "delete-custom", "a custom recipient"),
                             ("dl", "delete-list", "a distribution list")):
        dp = dsub.add_parser(name, help=f"delete {what} homed at this site (a tombstone replicates)")
        dp.add_argument("alias", help="its alias")
        add_site_options(dp, offline=True, offline_help=CHANGE_OFFLINE)
        dp.set_defaults(func=cmd_delete_recipient, kind=kind)


def describe(r: CustomRecipient | DistributionList | dict[str, Any]) -> str:
    """One line for a custom recipient or list (an object or the API's dict)."""
    d = r if isinstance(r, dict) else recipient_dict(r)
    if d["kind"] == "custom":
        return f"custom recipient {d['alias']} (SMTP:{d['primary_address']}) -> {d['target']}"
    extra = (f", owner {d['owner']}" if d["owner"] else "") + (
        f", expanded at {d['expansion_site']}" if d["expansion_site"] else "")
    return (f"distribution list {d['alias']} (SMTP:{d['primary_address']}): "
            f"{len(d['members'])} member(s){extra}")


def cmd_add_custom(args: argparse.Namespace) -> int:
    config = load_config(args.config, data_dir=args.data)
    if not args.offline:
        r = cli_call(config, "POST", "/directory/custom-recipients",
                     {"alias": args.alias, "target": args.target, "display_name": args.display_name,
                      "addresses": args.address})
        print(f"{config.site}: {describe(r)} created")
        return 0
    entry = _offline(args, config, lambda d: d.add_custom_recipient(args.alias, args.target, args.display_name,
                                                                    args.address))
    print(f"{config.site}: {describe(entry)} created (offline)")
    return 0


def cmd_add_list(args: argparse.Namespace) -> int:
    config = load_config(args.config, data_dir=args.data)
    if not args.offline:
        r = cli_call(config, "POST", "/directory/lists",
                     {"alias": args.alias, "members": args.member, "owner": args.owner,
                      "expansion_site": args.expansion_site, "display_name": args.display_name,
                      "addresses": args.address})
        print(f"{config.site}: {describe(r)} created")
        return 0
    entry = _offline(args, config, lambda d: d.add_distribution_list(
        args.alias, args.member, args.display_name, owner=args.owner, expansion_site=args.expansion_site,
        extra_addresses=args.address))
    print(f"{config.site}: {describe(entry)} created (offline)")
    return 0


def cmd_set_list(args: argparse.Namespace) -> int:
    config = load_config(args.config, data_dir=args.data)
    if not args.offline:
        r = cli_call(config, "PUT", f"/directory/lists/{args.alias}",
                     {"add": args.add, "remove": args.remove, "owner": args.owner,
                      "expansion_site": args.expansion_site})
        print(f"{config.site}: {describe(r)}")
        return 0
    entry = _offline(args, config, lambda d: d.set_distribution_list(
        args.alias, add=args.add, remove=args.remove, owner=args.owner, expansion_site=args.expansion_site))
    print(f"{config.site}: {describe(entry)} (offline)")
    return 0


def cmd_delete_recipient(args: argparse.Namespace) -> int:
    config = load_config(args.config, data_dir=args.data)
    what = "custom recipient" if args.kind == "custom" else "distribution list"
    if not args.offline:
        path = "custom-recipients" if args.kind == "custom" else "lists"
        cli_call(config, "DELETE", f"/directory/{path}/{args.alias}")
        print(f"{config.site}: {what} {args.alias} deleted (the deletion replicates as a tombstone)")
        return 0
    _offline(args, config, lambda d: d.delete_recipient(args.kind, args.alias))
    print(f"{config.site}: {what} {args.alias} deleted (offline; the deletion replicates as a tombstone)")
    return 0


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
        others = [r for r in directory.recipients("custom", args.site) + directory.recipients("dl", args.site)
                  if isinstance(r, CustomRecipient | DistributionList)]
        if args.json:
            print(json.dumps({
                "sites": [dataclasses.asdict(s) for s in sites],
                "mailboxes": [{"alias": m.alias, "display_name": m.display_name, "home_site": m.home_site,
                               "proxy_addresses": list(m.proxy_addresses)} for m in boxes],
                "custom_recipients": [dataclasses.asdict(r) for r in others if isinstance(r, CustomRecipient)],
                "distribution_lists": [dataclasses.asdict(r) for r in others if isinstance(r, DistributionList)]},
                indent=2))
            return 0
        for s in sites:
            print(f"site {s.name} (server {s.server}): Site Addressing SMTP {s.smtp_address}, "
                  f"routing address {s.routing_address}")
        print(f"{'alias':<16} {'home site':<10} {'display name':<22} proxy addresses")
        for m in boxes:
            print(f"{m.alias:<16} {m.home_site:<10} {m.display_name:<22} {' '.join(m.proxy_addresses)}")
        for r in others:
            print(f"{r.home_site}: {describe(r)}" + (f" [{', '.join(r.members)}]"
                                                      if isinstance(r, DistributionList) else ""))
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
    mbx = _offline(args, config, lambda d: d.add_mailbox(args.alias, args.display_name,
                                                         home_server=config.home_server_for(None) or None))
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


# ------------------------------------------------------------------ show, protocols

_SETTING = {True: "on", False: "off", None: "default"}


def protocol_lines(config: SiteConfig, site: SiteObject | None, mbx: Mailbox) -> list[str]:
    """The Protocols page of a mailbox homed here: each level's setting and the result."""
    site_protocols = site.protocols if site is not None else Protocols()
    lines = []
    for p in ACCESS_PROTOCOLS:
        server = config.access.server_setting(p)
        refusal = protocol_policy.refusal(p, site=site_protocols, server=server, mailbox=mbx.protocols,
                                          site_name=config.site, server_name=config.server, alias=mbx.alias)
        served = "" if config.access.enabled else " (this server does not run IMAP4/POP3: [access] enabled)"
        lines.append(f"  {protocol_policy.NAMES[p]:<6} site {_SETTING[site_protocols.get(p)]:<8} "
                     f"server {_SETTING[server]:<8} mailbox {_SETTING[mbx.protocols.get(p)]:<8} -> "
                     + ("enabled" if refusal is None else f"disabled ({refusal})") + served)
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    config = load_config(args.config, data_dir=args.data)
    directory = open_directory(args)
    try:
        home = args.site or config.site
        mbx = directory.mailbox(args.alias, home)
        if mbx is None:
            raise UserError(f"{config.site}: no mailbox {args.alias} homed at {home}", status=1)
        site = directory.site_object(home)
        has_password = directory.has_password(mbx.alias) if home == config.site else None
    finally:
        directory.close()
    r = mbx.sender_rules
    if args.json:
        print(json.dumps({"alias": mbx.alias, "display_name": mbx.display_name, "home_site": mbx.home_site,
                          "proxy_addresses": list(mbx.proxy_addresses), "password": has_password,
                          "accept_from": list(r.accept_from), "reject_from": list(r.reject_from),
                          "filter_senders": list(r.filter_senders), "filter_action": r.filter_action,
                          "protocols": {"imap4": mbx.protocols.imap4, "pop3": mbx.protocols.pop3},
                          "site_protocols": ({"imap4": site.protocols.imap4, "pop3": site.protocols.pop3}
                                             if site else None)}, indent=2))
        return 0
    print(f"{mbx.alias} ({mbx.display_name}), homed at {mbx.home_site}")
    print("  E-mail addresses: " + " ".join(mbx.proxy_addresses))
    if has_password is not None:
        print(f"  password: {'set' if has_password else 'none (no SMTP AUTH, IMAP4 or POP3 login)'}")
    print(f"  delivery restrictions: accept from {', '.join(r.accept_from) or '(everyone)'}; "
          f"reject from {', '.join(r.reject_from) or '(nobody)'}; filter {', '.join(r.filter_senders) or '(nobody)'}")
    print("Protocols:")
    if home == config.site:
        for line in protocol_lines(config, site, mbx):
            print(line)
    else:
        print(f"  IMAP4 {_SETTING[mbx.protocols.imap4]}, POP3 {_SETTING[mbx.protocols.pop3]} "
              f"(in force at {home}'s server)")
    return 0


def _protocol_changes(args: argparse.Namespace) -> dict[str, bool | None]:
    values = {"on": True, "off": False, "default": None}
    return {p: values[getattr(args, p)] for p in ACCESS_PROTOCOLS if getattr(args, p) is not None}


def cmd_protocols(args: argparse.Namespace) -> int:
    config = load_config(args.config, data_dir=args.data)
    if bool(args.alias) == bool(args.site_defaults):
        raise UserError("name a mailbox (ALIAS) or give --site-defaults")
    changes = _protocol_changes(args)
    if args.site_defaults:
        if changes and not args.offline:
            site = cli_call(config, "PUT", "/directory/protocols", changes)
            p = Protocols.from_data({k: v for k, v in site["protocols"].items() if v is not None})
        elif changes:
            p = _offline(args, config, lambda d: d.set_site_protocols(changes)).protocols
        else:
            directory = open_directory(args)
            try:
                own = directory.site_object()
            finally:
                directory.close()
            p = own.protocols if own else Protocols()
        print(f"{config.site}: site protocol defaults: IMAP4 {_SETTING[p.imap4]}, POP3 {_SETTING[p.pop3]}")
        return 0
    if changes and not args.offline:
        cli_call(config, "PUT", f"/directory/mailboxes/{args.alias}/protocols", changes)
    elif changes:
        _offline(args, config, lambda d: d.set_mailbox_protocols(args.alias, changes))
    directory = open_directory(args)
    try:
        mbx = directory.mailbox(args.alias)
        site = directory.site_object()
    finally:
        directory.close()
    if mbx is None:
        raise UserError(f"{config.site}: no mailbox {args.alias}", status=1)
    print(f"{config.site}: {mbx.alias}: protocols")
    for line in protocol_lines(config, site, mbx):
        print(line)
    return 0
