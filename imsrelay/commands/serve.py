"""``imsrelay serve`` and ``imsrelay check-config``."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from imsrelay.config import load_config
from imsrelay.logs import configure_logging


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one site's Internet Mail Service",
                       description="Run one site: SMTP server, queue, delivery, replication, admin endpoint.")
    p.add_argument("--config", "-c", required=True, type=Path, help="the site's TOML file")
    p.add_argument("--data", type=Path, help="data directory (overrides site.data_dir)")
    p.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-config", help="validate a site's TOML file and print a summary",
                       description="Validate a site configuration file; exit 0 if it is usable.")
    c.add_argument("config", type=Path, help="the site's TOML file")
    c.set_defaults(func=cmd_check_config)


def install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_until_signalled(main_factory) -> None:
    """Run ``main_factory(stop_event)`` until SIGINT/SIGTERM set the event."""
    install_event_loop_policy()

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main_factory(stop)

    asyncio.run(runner())


def cmd_serve(args: argparse.Namespace) -> int:
    from imsrelay.cli import UserError
    from imsrelay.site import run_site
    from imsrelay.spool import SpoolLocked

    config = load_config(args.config, data_dir=args.data)
    configure_logging(config.logging.level, config.logging.format)
    try:
        run_until_signalled(lambda stop: run_site(config, stop))
    except SpoolLocked:
        raise UserError(f"site {config.site} is already running with data in {config.data_dir}") from None
    except OSError as exc:  # e.g. the address is in use, or not configured on this host
        raise UserError(f"cannot start site {config.site}: {exc.strerror or exc} "
                        f"({config.smtp.listen}:{config.smtp.port}, data {config.data_dir})") from None
    return 0


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
