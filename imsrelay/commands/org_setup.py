"""``imsrelay org-setup`` — KB Q196927's administrator actions across the sites'
admin endpoints (the work itself is ``imsrelay.lab.org_setup``, which the lab uses too)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from imsrelay.admin.client import cli_client
from imsrelay.commands import positive_seconds
from imsrelay.config.loader import load_config
from imsrelay.lab.org_setup import Endpoint, OrgSetup, SetupError, SitesUnreachable
from imsrelay.model.errors import UserError
from imsrelay.model.settings import AdminConfig

DEFAULT_TOKEN_ENV = str(AdminConfig.token_env)  # the site setting's default


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "org-setup", help="run KB Q196927's administrator actions across all sites (idempotent)",
        description="KB Q196927's administrator actions across the sites of one organisation:\n"
                    "Check Now at every site, Request Now between the sites until every site knows every\n"
                    "mailbox, then Site Addressing @<company domain> (update all recipient mailboxes) at\n"
                    "each site in turn, replicated to the others. Steps already done are skipped.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  imsrelay org-setup --site http://10.10.10.10:8025 --site http://10.10.10.15:8025 \\\n"
               "                     --site http://10.10.10.20:8025        # token from $IMSRELAY_ADMIN_TOKEN\n"
               "  imsrelay org-setup -c config/siteA.toml -c config/siteB.toml -c config/siteC.toml")
    p.add_argument("--site", action="append", default=[], metavar="URL[=TOKEN]",
                   help="a site's admin endpoint (repeat, in the order Site Addressing is done); the token "
                        "defaults to the environment variable named by --token-env")
    p.add_argument("--config", "-c", action="append", default=[], type=Path, metavar="FILE",
                   help="a site's TOML file: its [admin] listen, port and token (repeatable)")
    p.add_argument("--token-env", default=DEFAULT_TOKEN_ENV,
                   help=f"environment variable holding the admin token (default {DEFAULT_TOKEN_ENV})")
    p.add_argument("--address", help="the Site Addressing to give every site (default: @<company domain>)")
    p.add_argument("--wait", type=positive_seconds, default=120.0, metavar="SECONDS",
                   help="how long to wait for every admin endpoint to answer (default 120)")
    p.add_argument("--timeout", type=positive_seconds, default=300.0, metavar="SECONDS",
                   help="how long to wait for each round of replication (default 300)")
    p.add_argument("--check", action="store_true",
                   help="change nothing: report whether the organisation is set up (exit 1 if not)")
    p.set_defaults(func=cmd_org_setup)


def parse_site_arg(value: str, token_env: str) -> tuple[str, str]:
    """``URL`` or ``URL=TOKEN`` → (url, token); the token defaults to ``$token_env``."""

    url, token = value, ""
    head, sep, tail = value.rpartition("=")
    if sep and "?" not in head and "/" not in tail:
        url, token = head, tail
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--site {value!r}: expected the admin endpoint's URL, e.g. http://10.10.10.10:8025")
    token = token or os.environ.get(token_env, "")
    if not token:
        raise UserError(f"--site {url}: no admin token (give URL=TOKEN or set ${token_env})")
    return url, token


def _endpoints(args: argparse.Namespace) -> list[Endpoint]:
    endpoints = []
    for value in args.site:
        url, token = parse_site_arg(value, args.token_env)
        endpoints.append(Endpoint(url, token))
    for path in args.config:
        config = load_config(path)
        client = cli_client(config)  # a one-line error when the endpoint is disabled or has no token
        endpoints.append(Endpoint(client.base, config.admin.resolved_token() or ""))
    if len(endpoints) < 2:
        raise UserError("org-setup needs the admin endpoints of at least two sites (--site URL or --config FILE)")
    return endpoints


def cmd_org_setup(args: argparse.Namespace) -> int:
    setup = OrgSetup(_endpoints(args))
    try:
        if args.check:
            return 0 if setup.check(address=args.address, wait=args.wait) else 1
        setup.run(address=args.address, wait=args.wait, timeout=args.timeout)
    except (SitesUnreachable, ConnectionError) as exc:
        raise UserError(f"org-setup: {exc}", status=3) from None
    except SetupError as exc:
        raise UserError(f"org-setup: {exc}", status=1) from None
    return 0
