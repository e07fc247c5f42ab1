"""A site that stops while a client is inside DATA answers that client before it
closes: a message made durable and never answered would be sent again (a duplicate)."""

from __future__ import annotations

import asyncio
import smtplib
import threading

from sitekit import make_config, running_site, site_mapping, wait_for

from imsrelay.ingress.adapter import close_sessions
from imsrelay.queue.spool import Spool
from imsrelay.site import Site

MESSAGE = b"Subject: stop\r\nMessage-ID: <stop-1@example.net>\r\n\r\nbody\r\n"


def _slow_accept(site: Site, durable: threading.Event, hold: float) -> None:
    accept = site.accept

    async def accept_then_pause(env, message):  # the message is durable, the reply not yet written
        await accept(env, message)
        durable.set()
        await asyncio.sleep(hold)

    site.accept = accept_then_pause  # type: ignore[method-assign]


def _send_in_thread(port: int, outcome: dict[str, object]) -> threading.Thread:
    """One transaction on a thread; ``outcome`` gets the DATA reply or the error."""
    def client() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
                s.ehlo("client.example")
                s.mail("alice@example.net")
                s.rcpt("User1@SiteA.microsoft.com")
                outcome["data"] = s.data(MESSAGE)
        except (smtplib.SMTPException, OSError) as exc:
            outcome["error"] = repr(exc)

    thread = threading.Thread(target=client)
    thread.start()
    return thread


async def test_stop_during_data_still_answers_the_message_it_made_durable(tmp_path):
    config = make_config(tmp_path, site_mapping("SiteA"))
    site = Site(config)
    await site.start()
    durable = threading.Event()
    _slow_accept(site, durable, hold=0.8)
    replies: dict[str, object] = {}
    thread = _send_in_thread(site.bound_port, replies)
    try:
        await wait_for(durable.is_set, timeout=15)
        await site.stop()  # while the session waits to write its 250
    finally:
        await asyncio.to_thread(thread.join, 20)
    assert "error" not in replies, replies
    code, text = replies["data"]
    assert code == 250 and b"queued as" in text, replies


async def test_idle_sessions_close_at_once_and_a_stuck_one_at_the_deadline(tmp_path):
    config = make_config(tmp_path, site_mapping("SiteA"))
    async with running_site(config) as site:
        durable = threading.Event()
        _slow_accept(site, durable, hold=30.0)  # a reply that would come too late
        idle = await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", site.bound_port, timeout=10)
        await asyncio.to_thread(idle.ehlo, "idle.example")
        outcome: dict[str, object] = {}
        thread = _send_in_thread(site.bound_port, outcome)
        await wait_for(lambda: durable.is_set() or outcome, timeout=15)
        assert durable.is_set(), outcome
        cut = await close_sessions(list(site.listeners.sessions), grace=0.5)
        await asyncio.to_thread(thread.join, 20)
        assert cut == 1  # the session still inside DATA at the deadline
        assert "error" in outcome, outcome  # cut off: no reply (the sender retries; at worst a duplicate)
        try:
            await asyncio.to_thread(idle.noop)
            raise AssertionError("the idle session is still open")
        except (smtplib.SMTPServerDisconnected, OSError):
            pass
        # what was made durable stays queued or delivered: nothing accepted is lost
        assert Spool(config.data_dir).queue_ids() or list((config.data_dir / "mailboxes" / "User1" / "new").iterdir())
