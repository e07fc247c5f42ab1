"""The outbound client's connection slots (``imsrelay.transport.smtp._Slots``: a free
slot taken without a coroutine) against ``asyncio.Semaphore``, which they replaced:
the same tasks get slots in the same order, also when waiters are cancelled."""

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
