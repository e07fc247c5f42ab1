"""``imsrelay check-config`` — validate a site's TOML file; every error is reported."""

from __future__ import annotations

import argparse
from pathlib import Path

from imsrelay.config import load_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("check-config", help="validate a site's TOML file and print a summary",
                       description="Validate a site configuration file; exit 0 if it is usable.")
    c.add_argument("config", type=Path, help="the site's TOML file")
    c.set_defaults(func=cmd_check_config)


def cmd_check_config(args: argparse.Namespace) -> int:
    c = load_config(args.config)
    print(f"{c.path}: ok")
    print(f"  organisation {c.organisation}, site {c.site}, server {c.server} ({c.hostname})")
    print(f"  site address @{c.site_domain}, company domain {c.company_domain}")
    print(f"  SMTP {c.smtp.listen}:{c.smtp.port}, data {c.data_dir}")
    print(f"  mailboxes: {', '.join(m.alias for m in c.mailboxes) or '(none)'}")
    for cs in c.connected_sites:
        print(f"  connected site {cs.name}: SMTP {cs.routing_address}")
    for r in c.email_domains:
        print(f"  e-mail domain {r.domain} -> {r.host}:{r.port}")
    if c.delivery.smart_host:
        print(f"  smart host {c.delivery.smart_host}:{c.delivery.smart_host_port}")
    for rc in c.replication.connectors:
        print(f"  replication connector to {rc.site}")
    return 0
