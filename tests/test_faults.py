"""Faults on demand, seen from smtplib and in the peers' queues (retries, NDRs,
replication backlog while a link is cut, drain when it is restored)."""

from __future__ import annotations

import asyncio
import smtplib
import time

import pytest
from ims_kit import TOKEN, admin, mailbox, message, queued, status_text, submit
from sitekit import (
    free_port,
    maildir_messages,
    running_site,
    site_mapping,
    wait_for,
    write_site_file,
)

from imsrelay.admin.client import AdminRequestError
from imsrelay.cli import main
from imsrelay.observe.tracking import TrackingEvent, TrackingQuery
from imsrelay.site import Site

HOSTS = {"SiteA": "127.0.0.31", "SiteB": "127.0.0.32"}


def site_files(tmp_path, names=("SiteA", "SiteB"), **extra):
    ports = {n: free_port(HOSTS[n]) for n in names}
    out = {}
    for name in names:
        others = [o for o in names if o != name]
        mapping = site_mapping(
            name, listen=HOSTS[name], port=ports[name],
            connected_sites=[{"name": o, "routing_address": f"@{o}.microsoft.com"} for o in others],
            email_domains=[{"domain": f"{o}.microsoft.com", "host": HOSTS[o], "port": ports[o]} for o in others],
            delivery={"retry_intervals": [0.3], "connect_timeout": 5, "command_timeout": 2},
            replication={"key": "fault-test-key", "startup_delay": "1h",
                         "connectors": [{"site": o, "schedule": "never"} for o in others]},
            admin={"listen": HOSTS[name], "port": free_port(HOSTS[name]), "token": TOKEN},
            logging={"level": "warning", "format": "json"}, **extra)
        out[name] = write_site_file(tmp_path, mapping)
    return out


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


def session(host: str, port: int, *steps: str) -> list[tuple[int, bytes]]:
    """Run commands with smtplib; the replies, until one is a 4xx/5xx."""
    replies = []
    with smtplib.SMTP(host, port, timeout=20) as s:
        for step in steps:
            if step == "ehlo":
                reply = s.ehlo("client.test")
            elif step == "mail":
                reply = s.mail("User1@SiteA.microsoft.com")
            elif step == "rcpt":
                reply = s.rcpt("User2@SiteB.microsoft.com")
            else:
                try:
                    reply = s.data(message("fault test"))
                except smtplib.SMTPDataError as exc:  # the reply to DATA itself
                    reply = (exc.smtp_code, exc.smtp_error)
            replies.append(reply)
            if reply[0] >= 400:
                break
    return replies


async def test_every_inbound_fault_kind_seen_from_smtplib(tmp_path, capsys):
    files = site_files(tmp_path, ("SiteB",))
    path, config = files["SiteB"]
    host = HOSTS["SiteB"]
    async with running_site(config) as site:
        port = site.bound_port

        def connect() -> tuple[int, bytes]:
            try:
                with smtplib.SMTP(host, port, timeout=10):
                    pass
            except smtplib.SMTPConnectError as exc:
                return exc.smtp_code, exc.smtp_error
            return 220, b""

        # a chosen reply at connect, through the CLI
        assert await cli("faults", "add", "--config", str(path), "--stage", "connect",
                         "--reply", "554 5.7.1 go away") == 0
        assert "answer '554 5.7.1 go away' at connect" in capsys.readouterr().out
        assert await asyncio.to_thread(connect) == (554, b"5.7.1 go away")
        assert await cli("faults", "clear", "--config", str(path)) == 0
        assert "cleared f1" in capsys.readouterr().out
        assert (await asyncio.to_thread(connect))[0] == 220

        # HELO, MAIL, RCPT and DATA each with their own reply
        for stage, reply, steps in (("helo", "550 5.7.1 no hello", ("ehlo",)),
                                    ("mail", "451 4.3.0 mail later", ("ehlo", "mail")),
                                    ("rcpt", "550 5.1.1 no such user", ("ehlo", "mail", "rcpt")),
                                    ("data", "452 4.3.1 no room", ("ehlo", "mail", "rcpt", "data"))):
            fault = await admin(site, "POST", "/faults", {"stage": stage, "reply": reply})
            replies = await asyncio.to_thread(session, host, port, *steps)
            assert replies[-1] == (int(reply[:3]), reply[4:].encode()), stage
            await admin(site, "DELETE", f"/faults/{fault['id']}")
        assert queued(site) == []

        # drop the connection mid-DATA: the client never sees a 250, nothing is queued
        await admin(site, "POST", "/faults", {"kind": "drop", "stage": "data"})
        with pytest.raises(smtplib.SMTPServerDisconnected):
            await asyncio.to_thread(session, host, port, "ehlo", "mail", "rcpt", "data")
        await asyncio.sleep(0.2)
        assert queued(site) == []

        # drop at connect: no greeting at all
        await admin(site, "POST", "/faults", {"kind": "drop", "stage": "connect"})
        with pytest.raises(smtplib.SMTPServerDisconnected):
            await asyncio.to_thread(connect)

        # latency at MAIL (a lower bound only: the machine may be slow, never faster)
        await admin(site, "DELETE", "/faults")
        await admin(site, "POST", "/faults", {"kind": "latency", "stage": "mail", "delay": "0.5s"})
        started = time.monotonic()
        replies = await asyncio.to_thread(session, host, port, "ehlo", "mail")
        assert replies[-1][0] == 250 and time.monotonic() - started >= 0.45

        # the next N sessions only
        await admin(site, "DELETE", "/faults")
        await admin(site, "POST", "/faults", {"stage": "mail", "reply": "421 4.3.2 busy", "sessions": 2})
        codes = [(await asyncio.to_thread(session, host, port, "ehlo", "mail"))[-1][0] for _ in range(4)]
        assert codes == [421, 421, 250, 250]

        # with a probability: some sessions, not all (40 tries: the chance of all-or-none is 2^-39)
        await admin(site, "DELETE", "/faults")
        await admin(site, "POST", "/faults", {"stage": "rcpt", "reply": "451 4.3.0 flaky", "probability": 0.5})
        codes = [(await asyncio.to_thread(session, host, port, "ehlo", "mail", "rcpt"))[-1][0] for _ in range(40)]
        assert 451 in codes and 250 in codes

        # every fault has an expiry
        await admin(site, "DELETE", "/faults")
        await admin(site, "POST", "/faults", {"stage": "mail", "reply": "451 4.3.0 soon over", "expires": "1s"})
        assert (await asyncio.to_thread(session, host, port, "ehlo", "mail"))[-1][0] == 451
        assert await cli("faults", "list", "--config", str(path)) == 0
        assert "answer '451 4.3.0 soon over' at mail; expires in" in capsys.readouterr().out
        await asyncio.sleep(1.2)
        assert (await asyncio.to_thread(session, host, port, "ehlo", "mail"))[-1][0] == 250
        assert (await admin(site, "GET", "/faults"))["faults"] == []

        # only sessions from one peer
        await admin(site, "POST", "/faults", {"stage": "mail", "reply": "450 4.7.1 not you", "peer": "127.0.0.99"})
        assert (await asyncio.to_thread(session, host, port, "ehlo", "mail"))[-1][0] == 250
        await admin(site, "DELETE", "/faults")

        # user errors: one line, HTTP 400 / non-zero exit
        with pytest.raises(AdminRequestError) as err:
            await admin(site, "POST", "/faults", {"stage": "rcpt", "reply": "250 fine"})
        assert err.value.status == 400 and "4xx or 5xx" in str(err.value)
        assert await cli("faults", "add", "--config", str(path), "--kind", "link") == 2
        assert "needs peer" in capsys.readouterr().err
        assert await cli("faults", "clear", "--config", str(path), "f99") == 1  # not found (HTTP 404)
        assert "no fault f99" in capsys.readouterr().err


async def test_peer_faults_show_in_the_senders_queue(tmp_path):
    files = site_files(tmp_path, connections={"messages_per_connection": 1})  # each delivery greeted afresh
    a_cfg, b_cfg = files["SiteA"][1], files["SiteB"][1]
    async with running_site(b_cfg) as b, running_site(a_cfg) as a:
        # SiteB defers RCPT: SiteA retries (its queue shows the attempts and SiteB's reply)
        fault = await admin(b, "POST", "/faults", {"stage": "rcpt", "reply": "451 4.3.0 fault: try later"})
        qid = await submit(a, ["User2@SiteB.microsoft.com"], message("deferred by fault"))
        env = await wait_for(lambda: next((e for e in queued(a) if e.recipients[0].attempts >= 2), None))
        assert env.recipients[0].status == "4.3.0" and "fault: try later" in env.recipients[0].diagnostic
        deferred = await wait_for(lambda: tracked(a, qid, "deferred"))  # and in message tracking
        assert "fault: try later" in deferred[0].detail["diagnostic"]
        await admin(b, "DELETE", f"/faults/{fault['id']}")
        await wait_for(lambda: maildir_messages(b_cfg.data_dir, "User2"))
        await wait_for(lambda: not queued(a))

        # SiteB refuses RCPT with a 5xx: SiteA returns an NDR to the sender
        await admin(b, "POST", "/faults", {"stage": "rcpt", "reply": "550 5.1.1 fault: no such user"})
        qid = await submit(a, ["User2@SiteB.microsoft.com"], message("refused by fault"))
        ndrs = await wait_for(lambda: mailbox(a_cfg.data_dir, "User1"))
        assert "Status: 5.1.1" in status_text(ndrs[0]) and "fault: no such user" in status_text(ndrs[0])
        assert await wait_for(lambda: tracked(a, qid, "ndr_sent"))
        await admin(b, "DELETE", "/faults")

        # SiteB drops connections mid-DATA for the next session: SiteA retries and delivers once
        await admin(b, "POST", "/faults", {"kind": "drop", "stage": "data", "sessions": 1})
        await submit(a, ["User2@SiteB.microsoft.com"], message("dropped once"))
        await wait_for(lambda: len(maildir_messages(b_cfg.data_dir, "User2")) == 2)
        await wait_for(lambda: not queued(a))
        assert [m["Subject"] for m in mailbox(b_cfg.data_dir, "User2")].count("dropped once") == 1
        await admin(b, "DELETE", "/faults")

        # SiteB refuses connections for the next 2 sessions: SiteA's queue shows the 421, then delivers
        await admin(b, "POST", "/faults", {"stage": "connect", "reply": "421 4.3.2 fault: not now", "sessions": 2})
        await submit(a, ["User2@SiteB.microsoft.com"], message("refused at connect"))
        env = await wait_for(lambda: next((e for e in queued(a) if e.recipients[0].attempts >= 1), None))
        assert env.recipients[0].status == "4.3.2" and "fault: not now" in env.recipients[0].diagnostic
        await wait_for(lambda: len(maildir_messages(b_cfg.data_dir, "User2")) == 3)
        await wait_for(lambda: not queued(a))
        await admin(b, "DELETE", "/faults")

        # SiteB answers DATA slower than SiteA waits: a timeout, retried, delivered when the fault is cleared
        await admin(b, "POST", "/faults", {"kind": "latency", "stage": "data", "delay": "5s"})
        await submit(a, ["User2@SiteB.microsoft.com"], message("slow peer"))
        env = await wait_for(lambda: next((e for e in queued(a) if e.recipients[0].attempts >= 1), None), timeout=20)
        assert env.recipients[0].status == "4.4.2" and "timed out" in env.recipients[0].diagnostic
        await admin(b, "DELETE", "/faults")
        await wait_for(lambda: len(maildir_messages(b_cfg.data_dir, "User2")) >= 4, timeout=20)
        await wait_for(lambda: not queued(a))
        assert [m["Subject"] for m in mailbox(b_cfg.data_dir, "User2")].count("slow peer") == 1


async def test_a_cut_link_builds_a_replication_backlog_that_drains_when_restored(tmp_path, capsys):
    files = site_files(tmp_path)
    a_path, a_cfg = files["SiteA"]
    b_cfg = files["SiteB"][1]
    a, b = Site(a_cfg), Site(b_cfg)
    await b.start()
    await a.start()
    try:
        assert await cli("faults", "add", "--config", str(a_path), "--kind", "link", "--peer", "SiteB") == 0
        assert "refuse outbound traffic to SiteB" in capsys.readouterr().out
        # both sites keep running: SiteB still reaches SiteA, SiteA cannot send to SiteB
        qid = await submit(a, ["User2@SiteB.microsoft.com"], message("across a cut link"))
        await admin(a, "POST", "/replication/request-now", {"site": "SiteB"})
        status = await wait_for(lambda: _backlog(a, "SiteB"))
        assert status == 1
        env = await wait_for(lambda: next((e for e in queued(a) if e.recipients[0].attempts >= 2
                                           and e.origin == "smtp"), None))
        assert env.recipients[0].status == "4.4.1" and "link to SiteB is cut" in env.recipients[0].diagnostic
        deferred = await wait_for(lambda: tracked(a, qid, "deferred"))
        assert "link to SiteB is cut (fault f1)" in deferred[0].detail["diagnostic"]
        assert maildir_messages(b_cfg.data_dir, "User2") == []
        await submit(b, ["User1@SiteA.microsoft.com"], message("the other way"))
        await wait_for(lambda: maildir_messages(a_cfg.data_dir, "User1"))
        assert mailbox(a_cfg.data_dir, "User1")[0]["Subject"] == "the other way"

        # restored: the backlog drains, the mail arrives once, SiteB's reply comes back
        assert await cli("faults", "clear", "--config", str(a_path)) == 0
        await wait_for(lambda: maildir_messages(b_cfg.data_dir, "User2"))
        await wait_for(lambda: _backlog(a, "SiteB") == 0 and not [e for e in queued(a)])
        await wait_for(lambda: _last_reply(a, "SiteB"))
        assert len(maildir_messages(b_cfg.data_dir, "User2")) == 1
        assert not [h for h in mailbox(a_cfg.data_dir, "User1") if h.get_content_type() == "multipart/report"]
    finally:
        await a.stop()
        await b.stop()


def _backlog(site: Site, peer: str) -> int | None:
    domain = next(c.routing_domain for c in site.config.connected_sites if c.name == peer)
    return site.replicator.backlog(domain)



async def tracked(site: Site, queue_id: str, event: str) -> list[TrackingEvent]:
    """The site's message tracking events of one kind for a message."""
    return [e for e in await site.tracking.query(TrackingQuery(queue_id=queue_id)) if e.event == event]


async def _last_reply(site: Site, peer: str) -> float | None:
    return (await site.directory.run(site.directory.peer_state, peer))["last_reply"]


async def test_faults_of_a_stopped_site_are_one_line(tmp_path, capsys):
    path, _ = site_files(tmp_path, ("SiteA",))["SiteA"]
    assert await cli("faults", "list", "--config", str(path)) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not running" in err


async def test_sessions_n_means_n_refused_attempts_on_a_reused_connection(tmp_path, capsys):
    """SiteA keeps its connection to SiteB open and retries on it (its connection
    cache): ``--sessions 1`` at rcpt is one deferral, then delivery at the next
    attempt; a connect fault added on a warm link refuses the next attempts; a
    used-up fault leaves the list."""
    files = site_files(tmp_path)
    a_cfg, (b_path, b_cfg) = files["SiteA"][1], files["SiteB"]
    async with running_site(b_cfg) as b, running_site(a_cfg) as a:
        await submit(a, ["User2@SiteB.microsoft.com"], message("warm up"))  # the link is warm now
        await wait_for(lambda: maildir_messages(b_cfg.data_dir, "User2"))
        reused = a.smtp_client.connections_reused
        assert await cli("faults", "add", "--config", str(b_path), "--stage", "rcpt", "--reply",
                         "451 4.3.0 fault: later", "--sessions", "1", "--peer", HOSTS["SiteA"]) == 0
        assert "next 1 attempt(s)" in capsys.readouterr().out
        qid = await submit(a, ["User2@SiteB.microsoft.com"], message("refused once"))
        await wait_for(lambda: len(maildir_messages(b_cfg.data_dir, "User2")) == 2)
        assert len(await tracked(a, qid, "deferred")) == 1  # exactly one refused attempt
        assert a.smtp_client.connections_reused > reused  # ... on the reused connection
        assert await cli("faults", "list", "--config", str(b_path)) == 0
        assert "fault: later" not in capsys.readouterr().out  # used up: not listed

        opened = a.smtp_client.connections_opened
        await admin(b, "POST", "/faults", {"stage": "connect", "reply": "421 4.3.2 fault: not now", "sessions": 2})
        qid = await submit(a, ["User2@SiteB.microsoft.com"], message("refused at connect twice"))
        await wait_for(lambda: len(maildir_messages(b_cfg.data_dir, "User2")) == 3)
        deferred = await tracked(a, qid, "deferred")
        assert len(deferred) == 2 and all("fault: not now" in d.detail["diagnostic"] for d in deferred)
        assert a.smtp_client.connections_opened > opened  # the warm connection was closed by the 421
        assert (await admin(b, "GET", "/faults"))["faults"] == []
