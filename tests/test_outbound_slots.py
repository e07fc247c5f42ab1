"""Two small parts of the outbound client against what they replaced: its connection
slots (``imsrelay.transport.smtp._Slots``: a free slot taken without a coroutine)
against ``asyncio.Semaphore`` — the same tasks get slots in the same order, also when
waiters are cancelled; and the outcomes it keeps per reply to a message
(``SmtpClient._final_outcome``) against ``reply_outcome`` made afresh."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from imsrelay.transport.smtp import _Slots

task_plan = st.tuples(st.integers(0, 4), st.integers(0, 4), st.one_of(st.none(), st.integers(0, 8)))


async def _steps(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _run(slots: int, plan: list[tuple[int, int, int | None]], plain: bool) -> list[tuple[str, int]]:
    events: list[tuple[str, int]] = []
    semaphore = asyncio.Semaphore(slots)
    ours = _Slots(slots)

    async def user(i: int, start: int, hold: int) -> None:
        await _steps(start)
        events.append(("wait", i))
        if plain:
            await semaphore.acquire()
        elif not ours.take():
            await ours.wait()
        try:
            events.append(("in", i))
            await _steps(hold)
        finally:
            events.append(("out", i))
            semaphore.release() if plain else ours.give()

    tasks = [asyncio.ensure_future(user(i, start, hold)) for i, (start, hold, _) in enumerate(plan)]

    async def cancel(i: int, after: int) -> None:
        await _steps(after)
        if not tasks[i].done():
            events.append(("cancel", i))
            tasks[i].cancel()

    cancellers = [asyncio.ensure_future(cancel(i, after)) for i, (_, _, after) in enumerate(plan) if after is not None]
    await asyncio.gather(*tasks, *cancellers, return_exceptions=True)
    inside = 0
    for kind, _ in events:  # never more inside than there are slots
        inside += {"in": 1, "out": -1}.get(kind, 0)
        assert inside <= slots
    return events


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3), st.lists(task_plan, min_size=1, max_size=8))
def test_slots_serve_as_asyncio_semaphore_does(slots, plan):
    assert asyncio.run(_run(slots, plan, plain=False)) == asyncio.run(_run(slots, plan, plain=True))


async def test_a_slot_handed_to_a_cancelled_waiter_goes_on_to_the_next():
    slots = _Slots(1)
    assert slots.take() and not slots.take()
    first = asyncio.ensure_future(slots.wait())
    second = asyncio.ensure_future(slots.wait())
    await asyncio.sleep(0)
    slots.give()  # handed to ``first`` ...
    first.cancel()  # ... which is cancelled before it runs
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)  # the slot went on to ``second``
    assert not slots.take()
    slots.give()
    assert slots.take()


# ------------------------------------------------------------------ outcomes of the reply to a message


@given(st.lists(st.tuples(st.sampled_from([250, 251, 354, 421, 450, 451, 550, 554, 599, 199]),
                          st.sampled_from(["2.0.0 Ok", "2.0.0 Ok: queued as 4Xy", "5.7.1 no", "4.3.0 later", "",
                                           "Ok\nsecond line"]),
                          st.sampled_from(["a [192.0.2.1]:25", "b [192.0.2.2]:25"]), st.booleans()),
                min_size=1, max_size=40))
@settings(max_examples=200, deadline=None)
def test_kept_outcomes_are_what_reply_outcome_gives(replies):
    """_final_outcome (kept per reply) against reply_outcome made afresh, also past the
    bound of outcomes kept."""
    import structlog
    from sitekit import config_of, site_mapping

    from imsrelay.transport import smtp
    from imsrelay.transport.smtp import SmtpClient, reply_outcome

    client = SmtpClient(config_of(site_mapping("SiteA")), None, frozenset(), structlog.get_logger("test"))  # type: ignore[arg-type]
    old_bound, smtp.OUTCOMES_KEPT = smtp.OUTCOMES_KEPT, 3
    try:
        for code, message, remote, dsn in replies * 2:
            fresh = reply_outcome(code, message, remote)
            if fresh.ok and dsn:
                fresh = type(fresh)(True, False, fresh.status, fresh.diagnostic, fresh.remote, dsn_passed=True)
            assert client._final_outcome(code, message, remote, dsn) == fresh
            assert len(client._outcomes) <= 3
    finally:
        smtp.OUTCOMES_KEPT = old_bound
