"""Diagnostics logging by category (Q146669) and the SMTP protocol log (Q189731)."""

from __future__ import annotations

import io
import json
import logging
import re

import structlog
from ims_kit import Peer, message, queued, start_peer, submit
from sitekit import free_port, make_config, running_site, site_mapping, wait_for

from imsrelay.observe.logs import (
    CategoryFilter,
    category_levels,
    category_of,
    configure_logging,
    site_logger,
)
from imsrelay.observe.protocol_log import ProtocolLog, format_line


async def test_protocol_log_records_both_directions_with_session_and_queue_ids(tmp_path):
    port = free_port()
    peer = Peer()
    server = await start_peer("127.0.0.1", port, peer)
    config = make_config(tmp_path, site_mapping(
        "SiteA", delivery={"retry_intervals": [0.3]},
        email_domains=[{"domain": "partner.test", "host": "127.0.0.1", "port": port}],
        diagnostics={"smtp_protocol_log": "maximum", "protocol_log_max_bytes": 4096, "protocol_log_files": 2}))
    try:
        async with running_site(config) as site:
            qid = await submit(site, ["bob@partner.test"], message("logged"))
            await wait_for(lambda: peer.messages)
            await wait_for(lambda: not queued(site))
            site.protocol_log.flush()
            text = (config.data_dir / "logs" / "smtp-protocol.log").read_text()
    finally:
        server.close()
    lines = text.splitlines()
    inbound = [ln for ln in lines if " in  " in ln]
    outbound = [ln for ln in lines if " out " in ln]
    assert inbound and outbound
    assert len({re.search(r"s=(\w+)", ln).group(1) for ln in inbound}) == 1  # one session id
    assert any("C: ehlo client.test" in ln for ln in inbound)  # as the client (smtplib) wrote it
    assert any("C: mail FROM:<User1@SiteA.microsoft.com>" in ln for ln in inbound)
    assert any("S: 250 2.1.0 <User1@SiteA.microsoft.com> sender ok" in ln for ln in inbound)
    assert any(f"q={qid} S: 250 2.0.0 Ok: queued as {qid}" in ln for ln in inbound)
    assert any("C: <message content>" in ln for ln in inbound)
    assert not any("Subject: logged" in ln for ln in lines)  # content is not logged
    assert any("S: 220 peer.partner.test" in ln for ln in outbound)
    assert any(f"q={qid} C: RCPT TO:<bob@partner.test>" in ln for ln in outbound)
    assert any(f"q={qid} C: DATA (then the message," in ln for ln in outbound)
    assert any(f"q={qid} S: 250 2.0.0 Ok: queued" in ln for ln in outbound)


def test_protocol_log_is_rotated_and_bounded(tmp_path):
    log = ProtocolLog(tmp_path, max_bytes=4096, files=2, name="rotation")
    for i in range(400):
        log.line(direction="in", session="s1", peer="127.0.0.1:1", queue_id=None, who="C", text=f"NOOP {i}")
    log.close()
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["smtp-protocol.log", "smtp-protocol.log.1", "smtp-protocol.log.2"]
    assert all((tmp_path / "logs" / f).stat().st_size <= 4096 for f in files)
    assert "NOOP 399" in (tmp_path / "logs" / "smtp-protocol.log").read_text()


def test_format_line_escapes_control_characters():
    line = format_line(when=0.5, direction="in", session="ab", peer="p", queue_id=None, who="C",
                       text="MAIL FROM:<a\x1b[31m@b>\r\n")
    assert line == "1970-01-01T00:00:00.500Z in  s=ab peer=p q=- C: MAIL FROM:<a\\x1b[31m@b>"


def test_categories_and_levels(tmp_path):
    assert category_of("site.started") == "initialization_termination"
    assert category_of("recipient.rejected") == "addressing"
    assert category_of("message.accepted") == "message_archival"
    assert category_of("delivery.smtp_reply") == "smtp_interface_events"
    assert category_of("replication.applied") == "internal_processing"
    cfg = make_config(tmp_path, site_mapping("SiteA", logging={"level": "info", "format": "json"},
                                             diagnostics={"addressing": "maximum", "message_archival": "none"}))
    levels = category_levels(cfg)
    assert levels["addressing"] == logging.DEBUG and levels["message_archival"] == logging.ERROR
    assert levels["internal_processing"] == logging.INFO  # from logging.level
    f = CategoryFilter(levels)
    assert f(None, "debug", {"event": "recipient.rejected"})
    for method, event in (("info", "message.accepted"), ("debug", "replication.applied")):
        try:
            f(None, method, {"event": event})
        except structlog.DropEvent:
            continue
        raise AssertionError(f"{event} at {method} was not dropped")


def test_a_site_logs_by_its_categories(tmp_path):
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        cfg = make_config(tmp_path, site_mapping("SiteA", logging={"level": "info", "format": "json"},
                                                 diagnostics={"addressing": "maximum", "message_archival": "none"}))
        log = site_logger(cfg).bind(site="SiteA")
        log.debug("recipient.looked_up", recipient="x@y")  # addressing at maximum: debug shows
        log.info("message.accepted", queue_id="Q")  # message archival at none: only errors
        log.error("message.lost_track", queue_id="Q")
        log.debug("replication.batch")  # internal processing at medium (logging.level info): no debug
        events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    finally:
        configure_logging("warning", "json")
    assert events == ["recipient.looked_up", "message.lost_track"]
