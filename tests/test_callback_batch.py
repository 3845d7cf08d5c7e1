"""The callback fast path batched under load (``pipeline.callback_batch``): against DynamoDB on the moto server,
and its retry rules against a scripted ledger."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from pipeline.aws import AwsClients
from pipeline.callback_batch import TokenCallbackBatcher
from pipeline.errors import LedgerError
from pipeline.ledger import RETRY, CallbackRecord, JobLedger, JobState, Retry, TokenCallback
from pipeline.settings import LedgerSettings


def job_ids(n: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]


@pytest.fixture
async def ledger(atomic_aws: AwsClients, unique: str) -> AsyncIterator[JobLedger]:
    ddb = atomic_aws.dynamodb
    led = JobLedger(ddb, LedgerSettings(table_name=f"batch-{unique}"))
    await led.ensure_table()
    yield led
    await ddb.delete_table(TableName=led.table_name)


async def submit(ledger: JobLedger, job_id: str, submission_id: str) -> None:
    await ledger.record_submission(
        job_id, submission_id=submission_id, job_name="n", partner=None, project=None, request={"format": "csv"}
    )


async def test_one_transaction_counts_every_callback_once(ledger: JobLedger) -> None:
    jobs = job_ids(5)
    for j in jobs:
        await submit(ledger, j, f"sub-{j}")
    calls = [TokenCallback(j, f"sub-{j}", "completed") for j in jobs]
    results = await ledger.record_token_callbacks(calls)
    assert results == [CallbackRecord(duplicate=False, state=JobState.notified, created=False, callback_count=None)] * 5
    for j in jobs:
        item = await ledger.get(j)
        assert item is not None
        assert (item.state, item.callback_count, item.last_callback_status) == (JobState.notified, 1, "completed")


async def test_a_failed_condition_cancels_the_transaction_and_writes_nothing(ledger: JobLedger) -> None:
    good, wrong_sub, unknown, done = job_ids(4)
    await submit(ledger, good, "sub-good")
    await submit(ledger, wrong_sub, "sub-real")
    await submit(ledger, done, "sub-done")
    assert await ledger.claim(done, "w1", 30)
    await ledger.mark_transferring(done, "w1")
    calls = [
        TokenCallback(good, "sub-good", None),
        TokenCallback(wrong_sub, "sub-forged", None),
        TokenCallback(unknown, "sub-x", None),
        TokenCallback(done, "sub-done", None),
    ]
    assert await ledger.record_token_callbacks(calls) == [RETRY, None, None, None]
    item = await ledger.get(good)
    assert item is not None and (item.state, item.callback_count) == (JobState.submitted, 0)
    assert await ledger.get(unknown) is None
    # the one that was fine goes again on its own, and is counted once
    assert await ledger.record_token_callbacks(calls[:1]) == [
        CallbackRecord(duplicate=False, state=JobState.notified, created=False, callback_count=None)
    ]
    item = await ledger.get(good)
    assert item is not None and (item.state, item.callback_count) == (JobState.notified, 1)


async def test_batches_refuse_repeated_jobs_and_notification_ids(ledger: JobLedger) -> None:
    j = job_ids(1)[0]
    with pytest.raises(ValueError):
        await ledger.record_token_callbacks([TokenCallback(j, "s", None), TokenCallback(j, "s", None)])
    with pytest.raises(ValueError):
        await ledger.record_token_callbacks([TokenCallback(j, "s", None, notification_id="n")])


async def test_concurrent_callbacks_are_batched_and_each_counted_once(ledger: JobLedger) -> None:
    jobs = job_ids(40)
    for j in jobs:
        await submit(ledger, j, f"sub-{j}")
    forged = job_ids(3)  # not ours: refused among the good ones
    batcher = TokenCallbackBatcher(ledger, max_items=10)
    calls = [(j, f"sub-{j}") for j in jobs] + [(j, "sub-forged") for j in forged]
    calls += [(jobs[0], f"sub-{jobs[0]}")]  # a second callback for one job: never in the same transaction
    results = await asyncio.gather(
        *(batcher.record(j, submission_id=s, status="completed", notification_id=None) for j, s in calls)
    )
    assert batcher.transactions >= 1 and batcher.batched >= 10  # the waiting ones went together
    by_job: dict[str, list[CallbackRecord | None]] = {}
    for (j, _), r in zip(calls, results, strict=True):
        by_job.setdefault(j, []).append(r)
    for j in forged:
        assert by_job[j] == [None]
        assert await ledger.get(j) is None
    for j in jobs:
        assert all(r is not None and r.state is JobState.notified for r in by_job[j])
        item = await ledger.get(j)
        assert item is not None and item.callback_count == len(by_job[j])
    first = await ledger.get(jobs[0])
    assert first is not None and first.callback_count == 2


async def test_a_lone_callback_makes_one_plain_update(ledger: JobLedger) -> None:
    j = job_ids(1)[0]
    await submit(ledger, j, "sub-1")
    batcher = TokenCallbackBatcher(ledger)
    rec = await batcher.record(j, submission_id="sub-1", status=None, notification_id=None)
    assert rec is not None and rec.callback_count == 1  # the single call returns the old item: exact count
    assert batcher.transactions == 0


class ScriptedLedger:
    """Answers the batcher's two calls from a script, to drive its retry rules."""

    def __init__(self, batch_answers: list[Any]) -> None:
        self.batch_answers = batch_answers
        self.batches: list[list[str]] = []
        self.singles: list[str] = []

    async def record_token_callback(self, job_id: str, **_: Any) -> CallbackRecord | None:
        self.singles.append(job_id)
        await asyncio.sleep(0.01)  # in flight long enough for the others to queue
        return CallbackRecord(duplicate=False, state=JobState.notified, created=False, callback_count=1)

    async def record_token_callbacks(self, calls: Sequence[TokenCallback]) -> list[CallbackRecord | Retry | None]:
        self.batches.append([c.job_id for c in calls])
        answer = self.batch_answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return [answer(c) for c in calls]


def counted(_: TokenCallback) -> CallbackRecord:
    return CallbackRecord(duplicate=False, state=JobState.notified, created=False, callback_count=None)


async def run(batcher: TokenCallbackBatcher, jobs: list[str]) -> list[Any]:
    return await asyncio.gather(
        *(batcher.record(j, submission_id="s", status=None, notification_id=None) for j in jobs),
        return_exceptions=True,
    )


async def test_cancelled_twice_goes_one_by_one() -> None:
    led = ScriptedLedger([lambda c: RETRY, lambda c: RETRY])
    batcher = TokenCallbackBatcher(led, max_items=10)  # type: ignore[arg-type]
    jobs = ["a", "b", "c", "d"]
    results = await run(batcher, jobs)
    # all four were waiting when the first call went: cancelled in a transaction, again in the next, then alone
    assert led.batches == [jobs, jobs]
    assert led.singles == jobs
    assert all(isinstance(r, CallbackRecord) for r in results)


async def test_only_the_cancelled_ones_are_retried() -> None:
    led = ScriptedLedger([lambda c: None if c.job_id == "c" else RETRY, lambda c: counted(c)])
    batcher = TokenCallbackBatcher(led, max_items=10)  # type: ignore[arg-type]
    results = await run(batcher, ["a", "b", "c", "d"])
    assert led.batches == [["a", "b", "c", "d"], ["a", "b", "d"]] and led.singles == []
    assert results[2] is None and all(isinstance(results[i], CallbackRecord) for i in (0, 1, 3))


async def test_a_failed_transaction_fails_its_callbacks_only() -> None:
    led = ScriptedLedger([LedgerError("dynamodb down"), lambda c: counted(c)])
    batcher = TokenCallbackBatcher(led, max_items=2)  # type: ignore[arg-type]
    results = await run(batcher, ["a", "b", "c", "d", "e"])
    assert led.batches == [["a", "b"], ["c", "d"]] and led.singles == ["e"]  # a batch of one is a single call
    assert [type(r).__name__ for r in results] == ["LedgerError"] * 2 + ["CallbackRecord"] * 3


async def test_notification_ids_and_batching_off_take_the_single_call() -> None:
    led = ScriptedLedger([])
    batcher = TokenCallbackBatcher(led)  # type: ignore[arg-type]
    await asyncio.gather(*(batcher.record(j, submission_id="s", status=None, notification_id="n") for j in "ab"))
    off = TokenCallbackBatcher(led, max_items=1)  # type: ignore[arg-type]
    await run(off, ["c", "d"])
    assert led.batches == [] and sorted(led.singles) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError):
        TokenCallbackBatcher(led, max_items=101)  # type: ignore[arg-type]


class StallingLedger:
    """Counts every callback at once, except job ``stalled``, whose UpdateItem hangs until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def record_token_callback(self, job_id: str, **_: Any) -> CallbackRecord:
        if job_id == "stalled":
            await self.release.wait()
        return CallbackRecord(duplicate=False, state=JobState.notified, created=False, callback_count=1)

    async def record_token_callbacks(self, calls: Sequence[TokenCallback]) -> list[Any]:
        return [CallbackRecord(False, JobState.notified, False, None)] * len(calls)


@pytest.mark.parametrize("max_calls", [2, 4])
async def test_one_stalled_ledger_call_does_not_hold_up_the_others(max_calls: int) -> None:
    """A stalled connection waits out the read timeout (a minute, times the retries): with one call slot, every
    token callback of the replica would wait behind it."""
    ledger = StallingLedger()
    batcher = TokenCallbackBatcher(ledger, max_items=25, max_calls=max_calls, linger_s=0.001)  # type: ignore[arg-type]
    stalled = asyncio.create_task(batcher.record("stalled", submission_id="s", status=None, notification_id=None))
    await asyncio.sleep(0.05)
    others = [batcher.record(f"job-{i}", submission_id="s", status=None, notification_id=None) for i in range(20)]
    counted = await asyncio.wait_for(asyncio.gather(*others), 5)  # not behind the stalled call
    assert len(counted) == 20 and not stalled.done()
    ledger.release.set()
    assert (await stalled) is not None


async def test_one_call_slot_is_what_the_stalled_call_blocks() -> None:
    """The same with ``max_calls=1``: the others wait (what the default of 2 avoids)."""
    ledger = StallingLedger()
    batcher = TokenCallbackBatcher(ledger, max_items=25, max_calls=1, linger_s=0.001)  # type: ignore[arg-type]
    stalled = asyncio.create_task(batcher.record("stalled", submission_id="s", status=None, notification_id=None))
    await asyncio.sleep(0.05)
    other = asyncio.ensure_future(batcher.record("job-1", submission_id="s", status=None, notification_id=None))
    await asyncio.sleep(0.3)
    assert not other.done()
    ledger.release.set()
    await asyncio.gather(stalled, other)
