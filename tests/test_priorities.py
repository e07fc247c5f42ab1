"""Time-outs by priority (Q184051, Q166587): lifetimes and delay notices chosen from
Priority: / Importance: / X-Priority:, the NDR text, and `imsrelay queue show`."""

from __future__ import annotations

import asyncio

from ims_kit import human_text, mailbox, message, queued, status_text, submit
from sitekit import free_port, running_site, site_mapping, wait_for, write_site_file

from imsrelay.cli import main
from imsrelay.model.priority import NON_URGENT, NORMAL, URGENT, priority_of


async def test_lifetimes_and_delay_notices_by_priority(tmp_path, capsys):
    dead = free_port()  # nothing listens: every attempt fails with a temporary error
    path, config = write_site_file(tmp_path, site_mapping(
        "SiteA", email_domains=[{"domain": "partner.test", "host": "127.0.0.1", "port": dead}],
        delivery={"retry_intervals": [0.2], "connect_timeout": 2, "lifetime": "4s"},
        priorities={"urgent_lifetime": "1s", "urgent_delay_notice": "0.3s", "non_urgent_lifetime": "1h"}))
    async with running_site(config) as site:
        urgent = await submit(site, ["bob@partner.test"], message("urgent", headers="X-Priority: 1 (Highest)\r\n"))
        normal = await submit(site, ["bob@partner.test"], message("normal"))
        low = await submit(site, ["bob@partner.test"], message("low", headers="Importance: low\r\n"))

        assert await asyncio.to_thread(main, ["queue", "show", urgent, "--config", str(path)]) == 0
        out = capsys.readouterr().out
        assert "priority:   urgent (lifetime 1s: NDR at " in out and "; delay notice " in out
        assert await asyncio.to_thread(main, ["queue", "show", low, "--config", str(path)]) == 0
        assert "priority:   non-urgent (lifetime 1h: NDR at " in capsys.readouterr().out

        def reports():
            return [(m["Subject"], human_text(m), status_text(m)) for m in mailbox(config.data_dir, "User1")]

        # urgent: a delay notice, then its NDR after 1 s, while the others still wait
        await wait_for(lambda: any("Action: failed" in s for _, _, s in reports()), timeout=15)
        first = reports()
        assert any("Action: delayed" in s for _, _, s in first)
        failed = [(subj, text) for subj, text, s in first if "Action: failed" in s]
        assert len(failed) == 1 and "urgent" in failed[0][0]
        assert "The maximum time for delivering the message expired" in failed[0][1]
        assert {e.queue_id for e in queued(site) if e.origin == "smtp"} >= {normal, low}

        # normal: 4 s (delivery.lifetime); non-urgent keeps waiting (1 h)
        await wait_for(lambda: sum("Action: failed" in s for _, _, s in reports()) == 2, timeout=20)
        assert [e.queue_id for e in queued(site) if e.origin == "smtp"] == [low]
        assert sum("Action: delayed" in s for _, _, s in reports()) == 1  # only urgent asked for a notice


def test_priority_headers():
    def msg(h: str) -> bytes:
        return f"From: a@b\r\n{h}Subject: x\r\n\r\nPriority: urgent\r\n".encode()

    assert priority_of(msg("")) == NORMAL  # the body does not count
    assert priority_of(msg("Priority: urgent\r\n")) == URGENT
    assert priority_of(msg("Priority: non-urgent\r\n")) == NON_URGENT
    assert priority_of(msg("Importance: High\r\n")) == URGENT
    assert priority_of(msg("Importance: low\r\n")) == NON_URGENT
    assert priority_of(msg("X-Priority: 2\r\n")) == URGENT
    assert priority_of(msg("X-Priority: 3 (Normal)\r\n")) == NORMAL
    assert priority_of(msg("X-Priority: 5 (Lowest)\r\n")) == NON_URGENT
    # Priority: (the X.400 priority the time-outs are named after) wins, then Importance:
    assert priority_of(msg("X-Priority: 1\r\nImportance: low\r\nPriority: normal\r\n")) == NORMAL
    assert priority_of(msg("X-Priority: 1\r\nImportance: low\r\n")) == NON_URGENT
    assert priority_of(msg("Importance: bogus\r\nX-Priority: 1\r\n")) == URGENT  # unreadable: the next one
    assert priority_of(msg("importance:\r\n  high\r\n")) == URGENT  # folded
