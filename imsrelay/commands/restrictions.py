"""``imsrelay restrictions show`` — the site's rules on who may connect, relay and send.

Routing Restrictions, the submission restriction, accept connections, the site's
Message Filtering, AUTH and the submission listeners, as the config file sets them
(the same as the admin endpoint's ``GET /restrictions``).  Per-mailbox rules:
``imsrelay directory restrict``; which rule applies to a given mail:
``imsrelay route ADDRESS --from SENDER``.
"""

from __future__ import annotations

import argparse
import json

from imsrelay.commands import add_site_options
from imsrelay.config.loader import load_config
from imsrelay.directory.restrictions_report import site_rules


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("restrictions", help="show the site's relay, connection, submission and filter rules",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = p.add_subparsers(dest="restrictions_command", metavar="ACTION")
    psub.required = True
    show = psub.add_parser("show", help="print the rules (from the site's config file)")
    add_site_options(show, data=False)
    show.add_argument("--json", action="store_true", help="machine-readable output (as GET /restrictions)")
    show.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    rules = site_rules(load_config(args.config))
    if args.json:
        print(json.dumps(rules, indent=2))
        return 0
    print(f"site {rules.pop('site')}")
    for section, values in rules.items():
        print(f"{section.replace('_', ' ')}:")
        for key, value in values.items():
            shown = ", ".join(map(str, value)) or "(none)" if isinstance(value, list) else value
            print(f"  {key}: {shown}")
    return 0
