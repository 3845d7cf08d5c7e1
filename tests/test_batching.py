"""Natural batching (``pipeline.batching``): the in-flight count and items submitted as a call ends."""

from __future__ import annotations

import asyncio
from typing import Any

from pipeline.batching import NaturalBatcher, Waiting, first
from pipeline.logs import bound, job_id_var


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


def recording_batcher(
    sent: list[list[int]], *, gate: asyncio.Event | None = None, **kw: Any
) -> NaturalBatcher[int, int]:
    """Records each call's batch (after ``gate``, when given, for a call whose first item is 1)."""

    async def send(batch: list[Waiting[int, int]]) -> None:
        if gate is not None and batch[0].item == 1:
            await gate.wait()
        sent.append([w.item for w in batch])
        for w in batch:
            w.settle(w.item)

    return NaturalBatcher(send, first(kw.pop("n", 10)), error=RuntimeError, **kw)


async def test_with_linger_a_lone_item_still_goes_at_once() -> None:
    sent: list[list[int]] = []
    batcher = recording_batcher(sent, linger_s=30.0, full=10)
    assert await asyncio.wait_for(batcher.submit(1), 5) == 1  # a 30 s linger would time out here
    assert sent == [[1]]


async def test_a_burst_lingers_and_shares_one_call() -> None:
    """The first item goes at once, with whatever arrived in the same loop turn; items that follow less than
    ``linger_s`` apart wait until the oldest of them has waited ``linger_s``, then go together."""
    loop = asyncio.get_running_loop()
    sent: list[list[int]] = []
    batcher = recording_batcher(sent, linger_s=0.2, full=10)
    tasks = [asyncio.create_task(batcher.submit(1)), asyncio.create_task(batcher.submit(2))]
    await asyncio.sleep(0.02)
    t0 = loop.time()
    tasks += [asyncio.create_task(batcher.submit(3))]
    await asyncio.sleep(0.02)
    tasks += [asyncio.create_task(batcher.submit(4))]
    assert await asyncio.wait_for(asyncio.gather(*tasks), 5) == [1, 2, 3, 4]
    assert sent == [[1, 2], [3, 4]]
    assert loop.time() - t0 >= 0.2


async def test_a_full_batch_never_lingers() -> None:
    sent: list[list[int]] = []
    batcher = recording_batcher(sent, n=3, linger_s=30.0, full=3)
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(1, 7))), 5)
    assert results == [1, 2, 3, 4, 5, 6]
    assert sent == [[1, 2, 3], [4, 5, 6]]


async def test_beyond_the_eager_call_a_partial_batch_waits_its_linger_and_a_full_one_does_not() -> None:
    """``eager_calls=1``: while one call is in flight, a partial batch goes once its oldest item has waited
    ``linger_s`` (not before), a full batch at once; neither waits for the call in flight to end."""
    loop = asyncio.get_running_loop()
    gate, sent = asyncio.Event(), []
    batcher = recording_batcher(sent, gate=gate, n=3, max_calls=3, eager_calls=1, full=3, linger_s=0.15)
    first_call = asyncio.create_task(batcher.submit(1))  # a lone item: goes at once, then hangs on the gate
    await asyncio.sleep(0.3)  # a quiet spell: the next item is not part of a burst
    t0 = loop.time()
    assert await asyncio.wait_for(batcher.submit(2), 5) == 2
    assert loop.time() - t0 >= 0.15
    full = asyncio.gather(*(batcher.submit(i) for i in (3, 4, 5)))
    assert await asyncio.wait_for(full, 0.1) == [3, 4, 5]
    assert sent == [[2], [3, 4, 5]] and not first_call.done()
    gate.set()
    assert await first_call == 1


async def test_without_linger_items_go_as_soon_as_a_call_is_free() -> None:
    """``linger_s=0`` (the default) is plain natural batching, whatever ``eager_calls`` and ``full`` say."""
    gate, sent = asyncio.Event(), []
    batcher = recording_batcher(sent, gate=gate, max_calls=2, eager_calls=1, full=10)
    first_call = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.01)
    assert await asyncio.wait_for(batcher.submit(2), 1) == 2
    gate.set()
    assert await first_call == 1
    assert sent == [[2], [1]]


async def test_an_item_that_lingers_past_the_last_call_still_goes() -> None:
    """One call at a time: an item arriving in a burst while the only call is in flight cannot start its own (and
    arms no timer then); when that call ends sooner than the linger, the item must still go once it has waited."""
    loop = asyncio.get_running_loop()
    gate, sent = asyncio.Event(), []
    batcher = recording_batcher(sent, gate=gate, max_calls=1, full=10, linger_s=0.2)
    first_call = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.01)
    t0 = loop.time()
    second = asyncio.create_task(batcher.submit(2))
    await asyncio.sleep(0.02)
    gate.set()  # the call in flight ends well within the second item's linger
    assert await asyncio.wait_for(asyncio.gather(first_call, second), 5) == [1, 2]
    assert sent == [[1], [2]] and loop.time() - t0 >= 0.2


async def test_a_call_does_not_run_in_the_context_of_the_caller_that_started_it() -> None:
    """One call serves several callers: its log lines must not carry the first caller's job id."""
    seen: list[str | None] = []

    async def send(batch: list[Waiting[int, int]]) -> None:
        await asyncio.sleep(0.01)
        seen.append(job_id_var.get())
        for w in batch:
            w.settle(w.item)

    for linger_s in (0.0, 0.005):  # a call started at once, and one started by the linger timer
        batcher = NaturalBatcher(send, first(10), error=RuntimeError, max_calls=1, linger_s=linger_s)

        async def caller(b: NaturalBatcher[int, int], i: int) -> int:
            with bound(job_id=f"job-{i}"):
                return await b.submit(i)

        assert await asyncio.gather(*(caller(batcher, i) for i in range(5))) == list(range(5))
    assert seen and set(seen) == {None}


async def test_a_sender_that_raises_fails_its_own_batch_only(caplog: Any) -> None:
    """A bug in a sender fails the items of that call; items waiting for a later call still get one."""
    gate, sent = asyncio.Event(), []

    async def send(batch: list[Waiting[int, int]]) -> None:
        await gate.wait()
        sent.append([w.item for w in batch])
        if batch[0].item == 1:
            raise KeyError("no MessageId in the answer")
        for w in batch:
            w.settle(w.item)

    batcher = NaturalBatcher(send, first(10), error=RuntimeError, max_calls=1)
    first_call = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    later = [asyncio.create_task(batcher.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(first_call, *later, return_exceptions=True), 2)
    assert isinstance(results[0], RuntimeError) and results[1:] == [2, 3]
    assert sent == [[1], [2, 3]]
    assert "a call raised; its 1 items fail" in caplog.text
