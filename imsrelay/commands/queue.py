"""``imsrelay queue list|show|retry|delete`` — the site's mail queue, like Postfix's
``postqueue -p`` / ``postcat -q`` / ``postqueue -f`` / ``postsuper -d``.

Works on the data directory whether the site runs or not:

- ``list`` and ``show`` only read the spool; ``list --all-servers`` asks the running
  server's admin endpoint for the queue of every server of its site (``[[servers]]``),
  each message naming its server, and names a server that does not answer;
- ``retry`` makes each chosen message's pending recipients due now: in a stopped
  site's queue journal directly (a STATE record; it delivers them at its next
  start), else as a request in the running worker's ``queue/control*/``
  directory, which its queue manager reads at most twice a second (only the
  running process writes its journal) — it also forgets which hosts it had marked
  unreachable;
- ``delete`` removes the message (a DONE record; no NDR is sent — an operator's
  decision, as with ``postsuper -d``), the same way: directly, or by a request to
  the running worker, which forgets it at once.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime

from imsrelay.admin.client import AdminClient, AdminRequestError, AdminUnavailable
from imsrelay.commands import add_site_options
from imsrelay.config.loader import load_config
from imsrelay.directory.store import Directory
from imsrelay.model.envelope import PENDING, Envelope, RecipientState, queue_state
from imsrelay.model.errors import UserError
from imsrelay.model.message import split_message
from imsrelay.model.priority import NORMAL, PriorityTimeouts
from imsrelay.model.settings import SiteConfig
from imsrelay.policy.transfer_mode import TRANSFER_MODE_KEY, holds, parse_mode
from imsrelay.queue.manager import held_text
from imsrelay.queue.spool import Spool


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("queue", help="list, show, retry or delete queued messages",
                       description="The site's mail queue (works whether the site runs or not).")
    qsub = q.add_subparsers(dest="queue_command", metavar="ACTION")
    qsub.required = True

    ls = qsub.add_parser("list", help="every queued message with its recipients' states (postqueue -p)")
    add_site_options(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--all-servers", action="store_true",
                    help="the queue of every server of the site ([[servers]]), through the running server's "
                         "admin endpoint; each message names its server (exit status 3 when a server does "
                         "not answer: the others' queues are still listed)")
    ls.set_defaults(func=cmd_list)

    show = qsub.add_parser("show", help="one message: envelope, recipients and headers (postcat -q)")
    add_site_options(show)
    show.add_argument("queue_id", metavar="ID")
    show.add_argument("--body", action="store_true", help="print the whole message, not only its headers")
    show.set_defaults(func=cmd_show)

    retry = qsub.add_parser("retry", help="make deferred recipients due now (postqueue -f / -i ID)")
    add_site_options(retry)
    retry.add_argument("queue_ids", metavar="ID", nargs="*", help="only these messages (default: all)")
    retry.set_defaults(func=cmd_retry)

    delete = qsub.add_parser("delete", help="remove messages from the queue without an NDR (postsuper -d)")
    add_site_options(delete)
    delete.add_argument("queue_ids", metavar="ID", nargs="+")
    delete.set_defaults(func=cmd_delete)


def open_spool(args: argparse.Namespace) -> Spool:
    config = load_config(args.config, data_dir=args.data)
    if not (config.data_dir / "queue" / "journal").is_dir():
        raise UserError(f"no queue at {config.data_dir / 'queue'}: the site has not been started yet "
                        f"(imsrelay serve --config {args.config})")
    return Spool(config.data_dir)


def _load(spool: Spool, queue_id: str) -> Envelope:
    try:
        env = spool.load(queue_id)
    except ValueError:
        raise UserError(f"{queue_id!r} is not a queue id (see imsrelay queue list)") from None
    if env is None:
        raise UserError(f"no message {queue_id} in the queue", status=1)
    return env


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def recipient_state(r: RecipientState, held: str | None = None) -> str:
    return queue_state(r.state, r.attempts, held=held is not None)


def held_by_transfer_mode(config: SiteConfig, r: RecipientState) -> str | None:
    """Why a pending recipient is held by the site's Transfer mode (read from its
    directory, where the site keeps it), or None: outbound SMTP routes wait in
    ``inbound`` and ``none``."""
    remote = (r.route or "").startswith(("relay:", "mx:"))
    if r.state != PENDING or not remote:
        return None
    db = config.data_dir / "directory.sqlite3"
    if not db.exists():
        return None
    directory = Directory(db, config.site)
    try:
        mode = parse_mode(directory.get_meta(TRANSFER_MODE_KEY) or config.transfer.mode)
    finally:
        directory.close()
    return held_text(f"transfer:{mode.value}") if holds(mode, remote=True) else None


def running_holds(config: SiteConfig) -> dict[tuple[str, str], str] | None:
    """What the running site holds (Transfer mode, ETRN: it keeps that in memory), by
    (queue id, recipient); None when the site is not running (or has no admin endpoint)."""
    if config.admin.port == 0 or not config.admin.resolved_token():
        return None
    try:
        queue = AdminClient.for_config(config, timeout=5.0).call("GET", "/queue?local=1")  # this server's
    except (AdminUnavailable, AdminRequestError):
        return None
    return {(m["queue_id"], r["address"]): r["held"] for m in queue.get("messages", [])
            for r in m.get("recipients", []) if r.get("held")}


def recipient_lines(r: RecipientState, now: float, held: str | None = None) -> list[str]:
    state = recipient_state(r, held)
    line = f"    {state:<9} {r.address}"
    if held is not None:
        line += f"  attempts {r.attempts}, no attempt while held: {held}"
    elif r.state == PENDING:
        due = "now" if r.next_attempt <= now else when(r.next_attempt)
        line += f"  attempts {r.attempts}, next attempt {due}"
    elif r.attempts:
        line += f"  attempts {r.attempts}"
    lines = [line]
    if r.diagnostic and r.state != "delivered":
        remote = f" [{r.remote}]" if r.remote and r.remote not in r.diagnostic else ""
        lines.append(f"              ({r.status or '-'} {r.diagnostic}){remote}")
    return lines


def cmd_list(args: argparse.Namespace) -> int:
    if args.all_servers:
        return list_site_queue(load_config(args.config, data_dir=args.data), as_json=args.json)
    spool = open_spool(args)
    config = load_config(args.config, data_dir=args.data)
    envelopes = list(spool.envelopes())
    if args.json:
        print(json.dumps([json.loads(e.to_json()) for e in envelopes], indent=2))
        return 0
    if not envelopes:
        print("Mail queue is empty")
        return 0
    now = time.time()
    holds_now = running_holds(config)

    def held(env: Envelope, r: RecipientState) -> str | None:
        if holds_now is not None:
            return holds_now.get((env.queue_id, r.address))
        return held_by_transfer_mode(config, r)

    width = max(len(e.queue_id) for e in envelopes)
    print(f"{'-Queue ID-':<{width}} {'--Size--':>8} {'----Arrival Time----':<20}  -Sender/Recipient-")
    pending = 0
    for env in envelopes:
        print(f"{env.queue_id:<{width}} {env.size:>8} {when(env.received_at):<20}  {env.sender or '<>'}")
        for r in env.recipients:
            for line in recipient_lines(r, now, held(env, r)):
                print(line)
        pending += len(env.pending)
        print()
    total = sum(e.size for e in envelopes)
    print(f"-- {total / 1024:.0f} KiB in {len(envelopes)} message{'s' if len(envelopes) != 1 else ''}, "
          f"{pending} recipient{'s' if pending != 1 else ''} pending")
    return 0


def list_site_queue(config: SiteConfig, *, as_json: bool = False) -> int:
    """``queue list --all-servers``: every server's queue, from the running server's
    admin endpoint (``GET /queue``, which asks the site's other servers)."""
    try:
        queue = AdminClient.for_config(config, timeout=30.0).call("GET", "/queue")
    except AdminUnavailable as exc:
        raise UserError(f"{exc} (--all-servers asks the running server)", status=3) from None
    except AdminRequestError as exc:
        raise UserError(f"{exc} (HTTP {exc.status})") from None
    if as_json:
        print(json.dumps(queue, indent=2))
        return 0
    messages = queue.get("messages", [])
    silent = {name: s.get("error") for name, s in (queue.get("servers") or {}).items() if not s.get("ok")}
    if messages:
        width = max(len(m["queue_id"]) for m in messages)
        server_width = max([len(m.get("server") or config.server) for m in messages] + [8])
        print(f"{'-Queue ID-':<{width}} {'-Server-':<{server_width}} {'--Size--':>8} {'----Arrival Time----':<20}"
              "  -Sender/Recipient-")
        for m in messages:
            print(f"{m['queue_id']:<{width}} {m.get('server') or config.server:<{server_width}} {m['size']:>8} "
                  f"{when(m['received_at']):<20}  {m['sender'] or '<>'}")
            for r in m["recipients"]:
                due = f", next attempt {when(r['next_attempt'])}" if r.get("next_attempt") else ""
                held = f", no attempt while held: {r['held']}" if r.get("held") else ""
                print(f"    {r['state']:<9} {r['address']}  attempts {r['attempts']}{due}{held}")
                if r.get("diagnostic") and r["state"] != "delivered":
                    print(f"              ({r.get('status') or '-'} {r['diagnostic']})")
            print()
    else:
        print("Mail queue is empty" + (" at the servers that answered" if silent else ""))
    servers = queue.get("servers") or {config.server: {"ok": True}}
    print(f"-- {len(messages)} message{'s' if len(messages) != 1 else ''} at "
          f"{len(servers) - len(silent)} of {len(servers)} server{'s' if len(servers) != 1 else ''}")
    for name, error in silent.items():
        print(f"-- {name}: not answering ({error})")
    return 3 if silent else 0


def timeout_lines(env: Envelope, priorities: PriorityTimeouts) -> list[str]:
    """The message's priority and the Time-outs it gets (lifetime, delay notice)."""
    priority = env.extra.get("priority", NORMAL)
    t = priorities.for_priority(priority)
    notice = f"delay notice {when(env.received_at + t.delay_notice)}" if t.delay_notice is not None \
        else "no delay notice"
    return [f"priority:   {priority} (lifetime {_span(t.lifetime)}: NDR at {when(env.received_at + t.lifetime)}; "
            f"{notice})"]


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def cmd_show(args: argparse.Namespace) -> int:
    spool = open_spool(args)
    env = _load(spool, args.queue_id)
    config = load_config(args.config, data_dir=args.data)
    message = spool.read_message(env.queue_id)
    flags = [f for f, on in (("8BITMIME", env.body_8bit), ("SMTPUTF8", env.smtputf8)) if on]
    print(f"queue id:   {env.queue_id}")
    print(f"arrival:    {when(env.received_at)}")
    print(f"size:       {env.size} bytes")
    print(f"sender:     <{env.sender}>")
    print(f"client:     {env.client or '-'} (helo {env.helo or '-'})")
    print(f"origin:     {env.origin}{'  ' + ' '.join(flags) if flags else ''}")
    for line in timeout_lines(env, config.priorities):
        print(line)
    if env.ret or env.envid:  # RFC 3461, as the sender gave them at MAIL FROM
        print("dsn:        " + " ".join(f"{k}={v}" for k, v in (("RET", env.ret), ("ENVID", env.envid)) if v))
    now = time.time()
    for r in env.recipients:
        print("recipient:")
        for line in recipient_lines(r, now):
            print(line)
        if r.route:
            print(f"              route {r.route}")
        if r.notify or r.orcpt:
            print("              dsn " + " ".join(f"{k}={v}" for k, v in (("NOTIFY", r.notify), ("ORCPT", r.orcpt)) if v))
    print()
    if args.body:
        text = message
    else:
        text, _ = split_message(message)
    print(text.decode("utf-8", "replace").replace("\r\n", "\n"), end="")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    spool = open_spool(args)
    chosen = [_load(spool, q) for q in args.queue_ids] if args.queue_ids else list(spool.envelopes())
    now = time.time()
    messages = recipients = 0
    for env in chosen:
        pending = env.pending
        if not pending:
            continue
        for r in pending:
            r.next_attempt = now
        spool.save_state_sync(env)  # a running site is asked instead (only it writes the journal)
        messages += 1
        recipients += len(pending)
    print(f"{messages} message{'s' if messages != 1 else ''} ({recipients} recipient"
          f"{'s' if recipients != 1 else ''}) scheduled for delivery now; a running site picks this up "
          "within a second, a stopped one at its next start")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    spool = open_spool(args)
    missing = []
    for qid in args.queue_ids:
        _load_id_check(qid)
        if spool.remove_sync(qid):
            print(f"{qid}: removed")
        else:
            missing.append(qid)
    if missing:
        raise UserError(f"not in the queue: {', '.join(missing)}", status=1)
    return 0


def _load_id_check(queue_id: str) -> None:
    if not queue_id.isalnum():
        raise UserError(f"{queue_id!r} is not a queue id (see imsrelay queue list)")
