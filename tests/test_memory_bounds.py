"""Memory is bounded by configuration: attempts under way are capped (the rest wait in
the queue, not as tasks), and a queue that is too deep pushes back with 452 4.3.1."""

import asyncio
import gc
import time
import tracemalloc

from sitekit import free_port, make_config, running_site, site_mapping
from smtp_wire import Wire

from imsrelay.durable.journal import ENQUEUE
from imsrelay.model.envelope import Envelope, RecipientState, new_queue_id
from imsrelay.queue.spool import Spool, queue_file_bytes


async def test_active_attempts_are_capped(tmp_path):
    held = []

    async def black_hole(reader, writer):  # accepts, never greets
        held.append(writer)
        await reader.read()

    hole = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    port = hole.sockets[0].getsockname()[1]
    cfg = make_config(tmp_path, site_mapping(
        delivery={"max_active_messages": 20, "max_per_destination": 5, "retry_intervals": ["1h"]},
        email_domains=[{"domain": "hole.example", "host": "127.0.0.1", "port": port}]))
    try:
        async with running_site(cfg) as site:
            for i in range(300):
                env = Envelope(queue_id=new_queue_id(), sender="a@example.org",
                               recipients=[RecipientState(f"r{i}@hole.example")], received_at=time.time())
                await site.enqueue_local(env, b"Subject: m\r\n\r\nbody\r\n")
            worst_running = worst_tasks = 0
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                worst_running = max(worst_running, len(site.qmgr._running))
                worst_tasks = max(worst_tasks, len(asyncio.all_tasks()))
                await asyncio.sleep(0.05)
            assert 0 < worst_running <= 20, worst_running
            assert worst_tasks < 80, worst_tasks
            assert site.qmgr.backlog == 300
    finally:
        for w in held:
            w.close()
        hole.close()


async def test_a_deep_queue_pushes_back_with_452(tmp_path):
    dead = free_port()
    cfg = make_config(tmp_path, site_mapping(
        smtp={"max_queued_messages": 3}, delivery={"retry_intervals": ["1h"]},
        email_domains=[{"domain": "down.example", "host": "127.0.0.1", "port": dead}]))
    async with running_site(cfg) as site:
        def session():
            replies = []
            with Wire(site.bound_port) as w:
                w.reply()
                w.cmd(b"EHLO me.example")
                for i in range(4):
                    replies.append(w.cmd(b"MAIL FROM:<a@example.org>"))
                    if replies[-1].startswith(b"250"):
                        w.cmd(b"RCPT TO:<r%d@down.example>" % i)
                        w.cmd(b"DATA")
                        replies.append(w.cmd(b"Subject: q\r\n\r\nx\r\n."))
            return replies

        replies = await asyncio.to_thread(session)
        assert [r[:3] for r in replies] == [b"250"] * 6 + [b"452"], replies
        assert replies[-1].startswith(b"452 4.3.1")


def _queue_on_disk(data_dir, count: int) -> None:
    """``count`` queued 4 KB messages as an SMTP session leaves them (one recipient
    each, among 50 addresses of one remote domain), written straight to the journal."""
    body = b"Subject: queued\r\n\r\n" + (b"x" * 76 + b"\r\n") * 52
    spool = Spool(data_dir)
    spool.acquire()
    records = []
    for i in range(count):
        rcpt = f"r{i % 50}@far.example"
        env = Envelope(queue_id=new_queue_id(), sender="a@example.org",
                       recipients=[RecipientState(address=rcpt, original=rcpt)], received_at=time.time(),
                       client="127.0.0.1", helo="client.example", origin="smtp", extra={"priority": "normal"})
        records.append((ENQUEUE, queue_file_bytes(env, body)))
    spool.journal.append(records)
    spool.close()


def test_a_replayed_queue_keeps_about_a_kibibyte_per_message(tmp_path):
    """After a restart, what stays in memory per queued message is its envelope and
    index entry (README: about 1 KiB): not its body, not the journal's records, and
    not one copy per message of strings every message shares (sender, recipient
    addresses, states, the client)."""
    count = 5_000
    _queue_on_disk(tmp_path, count)
    spool = Spool(tmp_path)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        envelopes = spool.recover()
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        spool.close()
    assert len(envelopes) == count
    assert envelopes[0].recipients[0].address is envelopes[50].recipients[0].address
    assert envelopes[0].sender is envelopes[1].sender
    per_message = kept / count
    # 0.87 KiB measured (Python 3.11; 1.35 KiB before strings were shared and the
    # journal's locations lost their __dict__): a bound with headroom, under 1 KiB
    assert per_message < 1_000, f"{per_message:.0f} bytes per queued message after replay"
