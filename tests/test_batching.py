"""Natural batching (``pipeline.batching``): the in-flight count and items submitted as a call ends."""

from __future__ import annotations

import asyncio

from pipeline.batching import NaturalBatcher, Waiting, first


def gated_batcher(gate: asyncio.Event, sent: list[list[int]]) -> NaturalBatcher[int, int]:
    """One call at a time; each call waits for ``gate``, records its batch and settles each item with itself."""

    async def send(batch: list[Waiting[int, int]]) -> None:
        await gate.wait()
        sent.append([w.item for w in batch])
        for w in batch:
            w.settle(w.item)

    return NaturalBatcher(send, first(10), error=RuntimeError, max_calls=1)


async def test_an_item_submitted_in_the_turn_the_last_call_ends_still_gets_a_call() -> None:
    """The drain that has just sent the last batch must not count as in flight any more: a caller woken in the
    same event-loop turn (before the finished task's done-callbacks run) submits, and is sent, not stranded."""
    gate, sent = asyncio.Event(), []
    batcher = gated_batcher(gate, sent)
    early = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the drain is now inside send(), waiting on the gate

    async def woken_with_the_call() -> int:
        await gate.wait()  # queued behind the call's own wait: resumes right after the drain finishes
        return await batcher.submit(2)

    late = asyncio.create_task(woken_with_the_call())
    await asyncio.sleep(0)
    gate.set()
    assert await early == 1
    assert await asyncio.wait_for(late, 2) == 2
    assert sent == [[1], [2]]


async def test_items_that_arrive_during_a_call_go_together_in_the_next() -> None:
    gate, sent = asyncio.Event(), []
    batcher = gated_batcher(gate, sent)
    tasks = [asyncio.create_task(batcher.submit(1))]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(batcher.submit(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*tasks), 2) == [1, 2, 3, 4]
    assert sent == [[1], [2, 3, 4]]
