"""``imsrelay transfer-mode show|set MODE`` — the IMS's Transfer mode, at run time.

Through the running site's admin endpoint (the change applies at once, without a
restart; mail it holds is released when the mode allows it again); ``--offline``
writes a stopped site's directory database, read at its next start.
"""

from __future__ import annotations

import argparse

from imsrelay.admin.client import cli_call, ensure_offline
from imsrelay.commands import add_site_options
from imsrelay.config.loader import load_config
from imsrelay.directory.store import Directory
from imsrelay.model.errors import UserError
from imsrelay.model.settings import SiteConfig
from imsrelay.policy.transfer_mode import MODE_NAMES, TRANSFER_MODE_KEY, parse_mode


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("transfer-mode", help="show or change the Transfer mode (inbound-outbound, inbound, "
                                             "outbound, none)",
                       description="The IMS Connections tab's Transfer mode, changed without a restart.")
    psub = p.add_subparsers(dest="transfer_command", metavar="ACTION")
    psub.required = True
    show = psub.add_parser("show", help="the current mode")
    add_site_options(show, offline=True)
    show.set_defaults(func=cmd_show)
    set_ = psub.add_parser("set", help=f"change it: {MODE_NAMES}")
    set_.add_argument("mode", help=MODE_NAMES)
    add_site_options(set_, offline=True)
    set_.set_defaults(func=cmd_set)


def _offline_directory(args: argparse.Namespace) -> tuple[SiteConfig, Directory]:
    config = load_config(args.config, data_dir=args.data)
    ensure_offline(config)
    return config, Directory(config.data_dir / "directory.sqlite3", config.site)


def cmd_show(args: argparse.Namespace) -> int:
    if args.offline:
        config, directory = _offline_directory(args)
        try:
            mode = directory.get_meta(TRANSFER_MODE_KEY) or config.transfer.mode
        finally:
            directory.close()
        print(f"{config.site}: transfer mode {mode} (site stopped)")
        return 0
    config = load_config(args.config, data_dir=args.data)
    answer = cli_call(config, "GET", "/transfer-mode")
    print(f"{answer['site']}: transfer mode {answer['mode']}; {answer['held_messages']} message(s) held")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    try:
        mode = parse_mode(args.mode)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.offline:
        config, directory = _offline_directory(args)
        try:
            directory.set_meta(TRANSFER_MODE_KEY, mode.value)
        finally:
            directory.close()
        print(f"{config.site}: transfer mode is now {mode.value} (applies at the next start)")
        return 0
    config = load_config(args.config, data_dir=args.data)
    answer = cli_call(config, "PUT", "/transfer-mode", {"mode": mode.value})
    print(f"{answer['site']}: transfer mode is now {answer['mode']} (was {answer['previous']})")
    return 0
