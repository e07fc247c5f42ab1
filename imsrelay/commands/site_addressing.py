"""``imsrelay site-addressing set|show`` — the site's SMTP Site Addressing.

``set @microsoft.com --update-mailboxes`` is KB Q196927's last step: the site's
SMTP address changes and every mailbox homed here gets ``alias@microsoft.com`` as its
primary address (the old one kept as a secondary unless ``--drop-old``), in a bulk
job that reports scanned/updated/failed and non-unique substitutes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from imsrelay.admin.client import cli_call, ensure_offline
from imsrelay.commands import add_site_options
from imsrelay.commands.directory import open_directory
from imsrelay.config.loader import load_config
from imsrelay.directory.site_addressing import report_dict, site_addressing_job
from imsrelay.directory.store import DirectoryError
from imsrelay.model.errors import UserError
from imsrelay.observe.logs import configure_logging, get_logger


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("site-addressing", help="show or change the site's SMTP Site Addressing",
                       description="The site-default SMTP address (Site Addressing) and the bulk update of "
                                   "recipient addresses that follows a change.")
    ssub = s.add_subparsers(dest="site_addressing_command", metavar="ACTION")
    ssub.required = True
    st = ssub.add_parser("set", help="change the Site Addressing SMTP address, e.g. @microsoft.com")
    st.add_argument("address", help="the new site address, e.g. @microsoft.com")
    st.add_argument("--update-mailboxes", action="store_true",
                    help="update all recipient mailboxes here to the new address (Exchange's 'Yes')")
    old = st.add_mutually_exclusive_group()
    old.add_argument("--drop-old", action="store_true",
                     help="do not keep the old primary address as a secondary (Exchange 5.5 behaviour)")
    old.add_argument("--keep-old", action="store_true", help="keep the old primary address as a secondary")
    add_site_options(st, offline=True, data_help="data directory, with --offline (overrides site.data_dir)")
    st.set_defaults(func=cmd_set)
    sh = ssub.add_parser("show", help="show the Site Addressing and routing address")
    add_site_options(sh, offline=True, data_help="data directory, with --offline (overrides site.data_dir)")
    sh.set_defaults(func=cmd_show)


def print_report(site: str, r: dict[str, Any]) -> None:
    print(f"{site}: Site Addressing SMTP is now {r['address']}")
    if r["update_mailboxes"]:
        kept = "old primary kept as a secondary address" if r["keep_old"] else "old primary address dropped"
        print(f"recipients: {r['scanned']} scanned, {r['updated']} updated, {r['failed']} failed ({kept})")
        for s in r["substitutes"]:
            print(f"substitute: {s['alias']} -> {s['address']} (the address was not unique)")
    else:
        print("recipients: not updated (use --update-mailboxes to give every mailbox the new address)")


def cmd_set(args: argparse.Namespace) -> int:

    config = load_config(args.config, data_dir=args.data)
    keep_old = True if args.keep_old else (False if args.drop_old else None)
    if not args.offline:
        body: dict[str, Any] = {"address": args.address, "update_mailboxes": bool(args.update_mailboxes)}
        if keep_old is not None:
            body["keep_old"] = keep_old
        print_report(config.site, cli_call(config, "POST", "/site-addressing", body))
        return 0
    ensure_offline(config)
    if keep_old is None:
        keep_old = config.replication.keep_old_address
    configure_logging("warning", "json", stream=sys.stderr)
    directory = open_directory(args)
    try:
        report = site_addressing_job(directory, get_logger("imsrelay").bind(site=config.site, offline=True),
                                     args.address, update_mailboxes=bool(args.update_mailboxes), keep_old=keep_old)
    except DirectoryError as exc:
        raise UserError(f"{config.site}: {exc}") from None
    finally:
        directory.close()
    print_report(config.site, report_dict(args.address, report, update_mailboxes=bool(args.update_mailboxes),
                                          keep_old=keep_old))
    return 0


def cmd_show(args: argparse.Namespace) -> int:

    config = load_config(args.config, data_dir=args.data)
    if args.offline:
        directory = open_directory(args)
        try:
            own = directory.site_object()
        finally:
            directory.close()
        info = {"smtp_address": own.smtp_address if own else None,
                "routing_address": own.routing_address if own else None}
    else:
        info = cli_call(config, "GET", "/site-addressing")
    print(f"{config.site}: Site Addressing SMTP {info['smtp_address']}, routing address "
          f"{info['routing_address']} (site domain {config.site_domain})")
    return 0
