"""``imsrelay console`` — the web console for sites given by their admin endpoints
(the Docker lab's console service; any set of running sites)."""

from __future__ import annotations

import argparse
import asyncio
import os

from imsrelay.commands.serve import run_until_signalled
from imsrelay.console.backend import Organisation
from imsrelay.console.server import ConsoleServer
from imsrelay.model.errors import UserError
from imsrelay.observe.logs import configure_logging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("console", help="serve the web console for running sites (their admin endpoints)",
                       description="Serve the web console (the organisation tree, recipients, queues, "
                                   "replication, Site Addressing, mailboxes, message tracking) for the sites "
                                   "whose admin endpoints are given. Log in with their admin token.")
    p.add_argument("--site", action="append", required=True, metavar="URL", dest="sites",
                   help="a site's admin endpoint, e.g. http://127.0.0.1:8025 (repeat for each site)")
    p.add_argument("--listen", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")
    p.add_argument("--token-env", default="IMSRELAY_ADMIN_TOKEN",
                   help="environment variable holding the sites' admin token (default IMSRELAY_ADMIN_TOKEN)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_console)


def cmd_console(args: argparse.Namespace) -> int:
    token = os.environ.get(args.token_env, "")
    if not token:
        raise UserError(f"no admin token: set the environment variable {args.token_env}")
    for url in args.sites:
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--site {url}: give the admin endpoint as a URL, e.g. http://127.0.0.1:8025")
    if not 0 < args.port < 65536:
        raise UserError("--port must be between 1 and 65535")
    configure_logging(args.log_level, "auto")

    async def main(stop: asyncio.Event) -> None:
        console = ConsoleServer(Organisation(args.sites, token), token, listen=args.listen, port=args.port)
        await console.start()
        print(f"console  {console.url}  sites {', '.join(console.org.sites) or '(none answering yet)'}",
              flush=True)
        try:
            await stop.wait()
        finally:
            await console.stop()

    try:
        run_until_signalled(main)
    except OSError as exc:
        raise UserError(f"cannot serve the console on {args.listen}:{args.port}: {exc.strerror or exc}") from None
    return 0
