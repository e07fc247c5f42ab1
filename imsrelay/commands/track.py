"""``imsrelay track`` — follow a message across sites (Exchange 5.5's Message Tracking Center).

Asks every endpoint given (sites' admin endpoints, or the embedded lab's endpoint,
which answers for all its hosts) for the tracking events of the messages found,
then for the events of the same Message-IDs everywhere, and prints each message's
hop chain with times and, per recipient, where it ended or stopped and why.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.parse
from pathlib import Path

from imsrelay.admin.client import AdminClient, AdminRequestError, AdminUnavailable, cli_client
from imsrelay.admin.message_store import SearchError, parse_time
from imsrelay.commands.org_setup import DEFAULT_TOKEN_ENV, parse_site_arg
from imsrelay.config.loader import load_config
from imsrelay.model.errors import UserError
from imsrelay.observe.tracking import (
    TrackingEvent,
    TrackingQuery,
    follow,
    format_story,
    gather,
    tracking_body,
)
from imsrelay.testing import LAB_API_HOST, LAB_TOKEN

LAB_ENDPOINT = f"http://{LAB_API_HOST}:8025"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "track", help="follow a message across sites: every hop, with times (Message Tracking Center)",
        description="Follow messages through every site reachable by its admin endpoint: received, routed, "
                    "transferred (with the next site's queue id), delivered, deferred, bounced.",
        epilog="examples:\n  imsrelay track --message-id '<abc@example.net>'            # the embedded lab\n"
               "  imsrelay track --recipient User2@microsoft.com --since 2026-12-01 \\\n"
               "      --site http://127.0.0.1:8510 --site http://127.0.0.1:8515 --site http://127.0.0.1:8520",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--message-id", help="the Message-ID header (with or without <>)")
    p.add_argument("--queue-id", help="a queue id at any site")
    p.add_argument("--sender", help="envelope sender (<> for NDRs)")
    p.add_argument("--recipient", help="envelope recipient")
    p.add_argument("--since", help="only messages from this time on (2026-12-01, ISO time, Unix time)")
    p.add_argument("--until", help="only messages up to this time")
    p.add_argument("--site", action="append", default=[], metavar="URL[=TOKEN]",
                   help=f"an admin endpoint or a lab endpoint (repeatable; default the embedded lab's, "
                        f"{LAB_ENDPOINT}); the token defaults to ${DEFAULT_TOKEN_ENV}, or the lab's")
    p.add_argument("--config", "-c", action="append", default=[], type=Path, metavar="FILE",
                   help="a site's TOML file: reach its admin endpoint (repeatable)")
    p.add_argument("--json", action="store_true", help="print the events and hop chains as JSON")
    p.set_defaults(func=cmd_track)


def _clients(args: argparse.Namespace) -> list[AdminClient]:
    clients = [cli_client(load_config(c)) for c in args.config]
    for value in args.site:
        if "=" not in value.rpartition("/")[2] and not os.environ.get(DEFAULT_TOKEN_ENV):
            value = f"{value}={LAB_TOKEN}"  # the lab's token when none is given
        url, token = parse_site_arg(value, DEFAULT_TOKEN_ENV)
        clients.append(AdminClient(url, token, timeout=30.0))
    if not clients:
        clients.append(AdminClient(LAB_ENDPOINT, os.environ.get(DEFAULT_TOKEN_ENV) or LAB_TOKEN, timeout=30.0))
    return clients


def cmd_track(args: argparse.Namespace) -> int:
    if not any([args.message_id, args.queue_id, args.sender, args.recipient, args.since]):
        raise UserError("say which messages: --message-id, --queue-id, --sender, --recipient or --since")
    for name in ("since", "until"):
        if getattr(args, name):
            try:
                parse_time(getattr(args, name))
            except SearchError as exc:
                raise UserError(f"--{name}: {exc}") from None
    clients = _clients(args)
    reached: list[str] = []

    def fetch(q: TrackingQuery) -> list[TrackingEvent]:
        params = {k: v for k, v in [("message_id", q.message_id), ("queue_id", q.queue_id), ("sender", q.sender),
                                    ("recipient", q.recipient), ("since", args.since if q is first else None),
                                    ("until", args.until if q is first else None)] if v is not None}
        params["limit"] = str(q.limit)
        events: list[TrackingEvent] = []
        for c in clients:
            try:
                body = c.call("GET", "/api/v1/tracking?" + urllib.parse.urlencode(params))
            except AdminUnavailable as exc:
                raise UserError(str(exc), status=3) from None
            except AdminRequestError as exc:
                raise UserError(f"{c.base}: {exc} (HTTP {exc.status})") from None
            if c.base not in reached:
                reached.append(c.base)
            events += [TrackingEvent.from_dict(e) for e in body.get("events", [])]
        return events

    first = TrackingQuery(message_id=args.message_id, queue_id=args.queue_id, sender=args.sender,
                          recipient=args.recipient, limit=200)
    events = gather(fetch, first)
    if args.json:
        print(json.dumps(tracking_body(events), indent=2))
        return 0 if events else 1
    if not events:
        print(f"no message found at {', '.join(reached)}")
        return 1
    print("\n\n".join(format_story(s) for s in follow(events)))
    return 0
