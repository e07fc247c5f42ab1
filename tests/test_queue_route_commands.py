"""``imsrelay queue`` and ``imsrelay route`` against real data directories.

The queue commands run as separate processes beside a running site (which must
notice ``retry`` and ``delete`` without a restart) and against a stopped one.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nsd_server import NsdServer
from sitekit import free_port, running_site, send_mail, simple_message, site_mapping, wait_for
from smtp_sink import SmtpSink

from imsrelay.cli import main
from imsrelay.config.loader import load_config
from imsrelay.queue.spool import Spool

USER1 = "User1@SiteA.microsoft.com"


def to_toml(mapping: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for a site mapping (tables, arrays of tables, scalars, lists of scalars)."""
    out, nested = [], []
    for key, value in mapping.items():
        if isinstance(value, dict):
            nested.append(f"\n[{prefix}{key}]\n" + to_toml(value, f"{prefix}{key}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            nested += [f"\n[[{prefix}{key}]]\n" + to_toml(v, f"{prefix}{key}.") for v in value]
        else:
            out.append(f"{key} = {json.dumps(value)}")
    return "\n".join(out) + "\n" + "".join(nested)


def write_config(tmp_path: Path, **extra: Any) -> tuple[Path, Path]:
    mapping = site_mapping("SiteA", listen="127.0.0.1", port=0, **extra)
    mapping["logging"] = {"level": "warning", "format": "json"}
    path = tmp_path / "siteA.toml"
    path.write_text(to_toml(mapping))
    return path, tmp_path / "data"


def cli(config: Path, data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imsrelay", *args, "--config", str(config), "--data", str(data)],
                          capture_output=True, text=True, timeout=60)


async def acli(config: Path, data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, config, data, *args)


def send(port: int, rcpt: str, subject: str) -> None:
    send_mail("127.0.0.1", port, USER1, rcpt, simple_message(USER1, rcpt, subject))


def state(data: Path, qid: str):
    return Spool(data).load(qid)


async def test_queue_commands_on_a_running_and_a_stopped_site(tmp_path):
    peer = free_port()  # the peer is down until the end
    path, data = write_config(tmp_path, email_domains=[{"domain": "partner.test", "host": "127.0.0.1", "port": peer}],
                              delivery={"retry_intervals": ["1h"], "connect_timeout": 2})
    config = load_config(path, data_dir=data)
    async with running_site(config) as site:
        await asyncio.to_thread(send, site.bound_port, "bob@partner.test", "first")
        await asyncio.to_thread(send, site.bound_port, "carol@partner.test", "second")
        envs = await wait_for(lambda: len(s := [e for e in Spool(data).envelopes() if e.recipients[0].attempts]) == 2
                              and sorted(s, key=lambda e: e.recipients[0].address))
        first, second = (e.queue_id for e in envs)

        listing = await acli(path, data, "queue", "list")
        assert listing.returncode == 0, listing.stderr
        out = listing.stdout
        assert first in out and second in out and f"  {USER1}" in out
        assert "    deferred  bob@partner.test  attempts 1, next attempt 20" in out
        assert f"connect to 127.0.0.1 [127.0.0.1]:{peer}: Connection refused" in out
        assert out.rstrip().endswith("in 2 messages, 2 recipients pending")

        shown = await acli(path, data, "queue", "show", first)
        assert shown.returncode == 0, shown.stderr
        assert f"sender:     <{USER1}>" in shown.stdout and "Subject: first" in shown.stdout
        assert "hello" not in shown.stdout  # headers only without --body
        assert "hello" in (await acli(path, data, "queue", "show", first, "--body")).stdout

        retried = await acli(path, data, "queue", "retry", first)
        assert retried.returncode == 0 and retried.stdout.startswith("1 message (1 recipient) scheduled")
        again = await wait_for(lambda: state(data, first).recipients[0].attempts == 2 and state(data, first))
        # noticed without a restart, and the host really was tried again
        assert again.recipients[0].diagnostic.endswith(": Connection refused")
        assert state(data, second).recipients[0].attempts == 1  # only the one asked for

        deleted = await acli(path, data, "queue", "delete", second)
        assert deleted.returncode == 0 and deleted.stdout == f"{second}: removed\n"
        await wait_for(lambda: second not in site.qmgr.envelopes)
        assert state(data, second) is None

    # the site is stopped now
    listing = cli(path, data, "queue", "list", "--json")
    assert [m["queue_id"] for m in json.loads(listing.stdout)] == [first]
    before = time.time()
    assert cli(path, data, "queue", "retry").returncode == 0
    assert state(data, first).recipients[0].next_attempt >= before - 1  # due now, not in an hour
    with SmtpSink("127.0.0.1", peer) as sink:
        async with running_site(config):
            await wait_for(lambda: sink.messages() and not list(Spool(data).envelopes()))
    assert cli(path, data, "queue", "list").stdout == "Mail queue is empty\n"


def test_queue_command_errors(tmp_path):
    path, data = write_config(tmp_path)
    never = cli(path, data, "queue", "list")
    assert never.returncode == 2 and never.stdout == ""
    assert never.stderr.startswith("imsrelay: no queue at ") and never.stderr.count("\n") == 1
    Spool(data)  # an empty queue
    bad = cli(path, data, "queue", "show", "../etc")
    assert bad.returncode == 2 and "is not a queue id" in bad.stderr and "Traceback" not in bad.stderr
    missing = cli(path, data, "queue", "delete", "0123ABC")
    assert missing.returncode == 1 and missing.stderr == "imsrelay: not in the queue: 0123ABC\n"


# ------------------------------------------------------------------ imsrelay route

ROUTE_SITE = {
    "connected_sites": [{"name": "SiteB", "routing_address": "@SiteB.microsoft.com"}],
    "email_domains": [{"domain": "SiteB.microsoft.com", "host": "127.10.10.15", "port": 2525},
                      {"domain": "partner.example", "host": "127.0.0.40", "port": 2526}],
}


def route(capsys, path: Path, data: Path, address: str, *extra: str) -> list[str]:
    assert main(["route", address, "--config", str(path), "--data", str(data), *extra]) == 0
    return capsys.readouterr().out.splitlines()


def test_route_local_user_connected_site_and_table_domain(tmp_path, capsys):
    path, data = write_config(tmp_path, **ROUTE_SITE)
    local = route(capsys, path, data, "user1@sitea.microsoft.com")
    assert local[0] == (f"site SiteA (ServerA.SiteA.microsoft.com), no directory yet at {data}/directory.sqlite3 "
                        "(site never started): using the mailboxes of the config file")
    assert local[-1] == "=> local delivery to mailbox User1"
    assert not data.exists()  # explaining wrote nothing

    site = route(capsys, path, data, "User2@SiteB.microsoft.com")
    assert site[-2:] == [
        "  3. E-Mail Domain table: siteb.microsoft.com matches entry SiteB.microsoft.com → forward to host "
        "127.10.10.15:2525",
        "=> SMTP to 127.10.10.15:2525 (STARTTLS opportunistic)"]
    assert "  2. Connected Sites: siteb.microsoft.com is in the routing address of site SiteB" in site

    table = route(capsys, path, data, "someone@mail.partner.example", "--resolve")
    assert table[-3:] == [
        "  2. E-Mail Domain table: mail.partner.example matches entry partner.example → forward to host "
        "127.0.0.40:2526",
        "=> SMTP to 127.0.0.40:2526 (STARTTLS opportunistic)",
        "next hop: 127.0.0.40 [127.0.0.40]:2526 (fixed host, no DNS)"]


def test_route_smart_host(tmp_path, capsys):
    path, data = write_config(tmp_path, delivery={"smart_host": "127.0.0.50:2527"}, **ROUTE_SITE)
    out = route(capsys, path, data, "someone@example.net")
    assert out[-2:] == ["  3. smart host: forward all messages to host 127.0.0.50:2527",
                        "=> SMTP to 127.0.0.50:2527 (STARTTLS opportunistic)"]


def test_route_mx_domain_with_resolve_uses_the_configured_nameservers(tmp_path, capsys):
    zone = """\
$ORIGIN partner.test.
$TTL 60
@    IN SOA ns1 hostmaster 1 3600 600 86400 60
@    IN NS  ns1
ns1  IN A   127.0.0.1
@    IN MX  20 mx2
@    IN MX  10 mx1
mx1  IN A   127.0.0.21
mx2  IN A   127.0.0.22
"""
    with NsdServer({"partner.test": zone}, tmp_path) as nsd:
        path, data = write_config(tmp_path, dns={"nameservers": [nsd.address]}, delivery={"mx_port": 2525},
                                  **ROUTE_SITE)
        plain = route(capsys, path, data, "bob@partner.test")
        resolved = route(capsys, path, data, "bob@partner.test", "--resolve")
        missing = route(capsys, path, data, "bob@nowhere.partner.test", "--resolve")
    assert plain[-2:] == ["=> SMTP to the MX hosts of partner.test, port 2525 (STARTTLS opportunistic)",
                          "(add --resolve to look up the MX hosts)"]
    assert resolved[-3:] == [
        f"next hops: MX of partner.test via {nsd.address}, in the order they are tried:",
        "  1. mx1.partner.test [127.0.0.21]:2525 (MX preference 10)",
        "  2. mx2.partner.test [127.0.0.22]:2525 (MX preference 20)"]
    assert missing[-1] == (f"DNS via {nsd.address}: permanent failure 5.1.2: "
                           "domain nowhere.partner.test does not exist")


async def test_route_reads_the_directory_of_a_site_that_has_run(tmp_path, capsys):
    path, data = write_config(tmp_path, **ROUTE_SITE)
    async with running_site(load_config(path, data_dir=data)) as site:
        await site.directory.run(site.directory.add_mailbox, "Newcomer", "New Comer")
    out = await asyncio.to_thread(route, capsys, path, data, "newcomer@SiteA.microsoft.com")
    assert out[0] == f"site SiteA (ServerA.SiteA.microsoft.com), directory {data}/directory.sqlite3"
    assert out[-1] == "=> local delivery to mailbox Newcomer"


def test_route_rejects_a_bad_address(tmp_path, capsys):
    path, data = write_config(tmp_path)
    assert main(["route", "not-an-address", "--config", str(path), "--data", str(data)]) == 2
    assert "is not an address of the form user@domain" in capsys.readouterr().err


def test_route_explains_address_literals(tmp_path, capsys):
    path, data = write_config(tmp_path, delivery={"smart_host": "127.0.0.50:2527"}, **ROUTE_SITE)
    out = route(capsys, path, data, "a@[1.2.3.4]", "--resolve")
    assert out[-3:] == [
        "  2. address literal [1.2.3.4]: deliver to 1.2.3.4 directly, no E-Mail Domain table, smart host or MX "
        "(RFC 5321 §5.1)",
        "=> SMTP to 1.2.3.4:25 (STARTTLS opportunistic)",
        "next hop: 1.2.3.4 [1.2.3.4]:25 (fixed host, no DNS)"]
    v6 = route(capsys, path, data, "a@[IPv6:2001:db8::1]")
    assert v6[-1] == "=> SMTP to [2001:db8::1]:25 (STARTTLS opportunistic)"
    (tmp_path / "refuse").mkdir()
    path2, data2 = write_config(tmp_path / "refuse", routing={"address_literals": "refuse"}, **ROUTE_SITE)
    refused = route(capsys, path2, data2, "a@[1.2.3.4]")
    assert refused[-1] == "=> permanent failure 5.7.1: address literals such as [1.2.3.4] are not accepted here"
