"""The work queue against a real moto server: batched sends, receive, visibility, delete."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pipeline.aws import AwsClients
from pipeline.models import WorkMessage
from pipeline.workqueue import QueueError, WorkQueue


@pytest.fixture
async def queue_url(aws: AwsClients, unique: str) -> str:
    resp = await aws.sqs.create_queue(QueueName=f"wq-{unique}")
    return str(resp["QueueUrl"])


def counting_queue(aws: AwsClients, queue_url: str, **kw: Any) -> tuple[WorkQueue, list[int]]:
    """A work queue whose SendMessageBatch calls are recorded (their entry counts) on the way to moto."""
    calls: list[int] = []
    original = aws.sqs.send_message_batch

    async def counting(**params: Any) -> Any:
        calls.append(len(params["Entries"]))
        return await original(**params)

    queue = WorkQueue(aws.sqs, queue_url, **kw)
    queue.sqs = type("Sqs", (), {"send_message_batch": staticmethod(counting)})()
    return queue, calls


async def test_concurrent_sends_are_batched_and_all_stored(aws: AwsClients, queue_url: str) -> None:
    queue, calls = counting_queue(aws, queue_url, max_send_calls=2)
    ids = await asyncio.gather(*(queue.send(WorkMessage(job_id=f"{i:032x}")) for i in range(45)))
    assert len(set(ids)) == 45
    assert sum(calls) == 45
    assert len(calls) < 45 and max(calls) <= 10
    real = WorkQueue(aws.sqs, queue_url)
    seen: set[str] = set()
    for _ in range(20):
        for work in await real.receive(10, wait_time_s=0, visibility_s=30):
            assert work.message is not None
            seen.add(work.message.job_id)
            await real.delete(work.receipt_handle)
        if len(seen) == 45:
            break
    assert seen == {f"{i:032x}" for i in range(45)}


async def test_with_linger_a_burst_of_sends_shares_a_call(aws: AwsClients, queue_url: str) -> None:
    """``send_linger_s``: the first message of a burst goes at once, the rest (arriving while it is in flight,
    less than the linger apart) wait for one another and go in one call."""
    queue, calls = counting_queue(aws, queue_url, send_linger_s=0.5)

    async def send_later(i: int) -> str:
        await asyncio.sleep(0.01 * i)
        return await queue.send(WorkMessage(job_id=f"{i:032x}"))

    ids = await asyncio.gather(*(send_later(i) for i in range(5)))
    assert len(set(ids)) == 5
    assert calls == [1, 4]


async def test_with_linger_a_failed_send_fails_every_caller_waiting(aws: AwsClients, queue_url: str) -> None:
    """Messages lingering for a batch are not left waiting when the call fails: each caller gets the error (the
    receiver then answers 5xx, so Zuora calls again: nothing is acknowledged that was not stored)."""
    queue = WorkQueue(aws.sqs, queue_url + "-missing", send_linger_s=0.2)

    async def send_later(i: int) -> str:
        await asyncio.sleep(0.01 * i)
        return await queue.send(WorkMessage(job_id=f"{i:032x}"))

    results = await asyncio.wait_for(asyncio.gather(*(send_later(i) for i in range(12)), return_exceptions=True), 10)
    assert all(isinstance(r, QueueError) for r in results), results


async def test_a_single_send_goes_at_once(aws: AwsClients, queue_url: str) -> None:
    queue = WorkQueue(aws.sqs, queue_url)
    assert await queue.send(WorkMessage(job_id="a" * 32))
    assert await queue.depth() == 1


async def test_send_to_a_missing_queue_fails_every_caller(aws: AwsClients, queue_url: str) -> None:
    queue = WorkQueue(aws.sqs, queue_url + "-missing")
    results = await asyncio.gather(
        *(queue.send(WorkMessage(job_id=f"{i:032x}")) for i in range(12)), return_exceptions=True
    )
    assert all(isinstance(r, QueueError) for r in results)


async def test_delayed_send_and_poison_message(aws: AwsClients, queue_url: str) -> None:
    queue = WorkQueue(aws.sqs, queue_url)
    await queue.send(WorkMessage(job_id="b" * 32), delay_s=1)
    await aws.sqs.send_message(QueueUrl=queue_url, MessageBody="{not a work message")
    got: list[Any] = []
    for _ in range(10):
        got += await queue.receive(10, wait_time_s=1, visibility_s=30)
        if len(got) == 2:
            break
    assert sorted(w.message is None for w in got) == [False, True]


async def next_work(queue: WorkQueue) -> Any:
    for _ in range(15):
        got = await queue.receive(1, wait_time_s=1, visibility_s=30)
        if got:
            return got[0]
    raise AssertionError("no message came back")


@pytest.mark.parametrize("age_h", [0, 25])
async def test_a_job_that_waits_does_not_use_up_its_receives(aws: AwsClients, queue_url: str, age_h: int) -> None:
    """Waiting is no failure (here: the job is leased by another worker, as while a duplicate callback's message
    waits for the first one's transfer). At the end of its receive budget the message is sent again, fresh, and
    this one deleted, so SQS never moves it to the DLQ for waiting; unless its callback is older than
    ``MAX_WAIT_S``, when it takes the normal path (its receive count goes on)."""
    from datetime import timedelta

    from pipeline.metrics import Metrics
    from pipeline.models import utcnow
    from pipeline.processor import Outcome, ProcessResult
    from pipeline.settings import QueueSettings
    from pipeline.worker import MAX_WAIT_S, Worker

    assert MAX_WAIT_S < 25 * 3600
    queue = WorkQueue(aws.sqs, queue_url)
    sent = WorkMessage(job_id="c" * 32, submission_id="s" * 22, received_at=utcnow() - timedelta(hours=age_h))
    await queue.send(sent)
    finals: list[bool] = []

    async def busy(job_id: str, *, final_attempt: bool, **_: Any) -> ProcessResult:
        finals.append(final_attempt)
        return ProcessResult(Outcome.BUSY, retry_after_s=1)

    worker = Worker(queue=queue, process=busy, settings=QueueSettings(max_receives=3), metrics=Metrics())
    seen = []
    for _ in range(3):
        work = await next_work(queue)
        seen.append((work.receive_count, work.message.submission_id, work.message.received_at))
        await worker._handle(work)
    if age_h == 0:
        # received twice, then re-enqueued: the copy starts at 1, keeps the callback's time, needs no admission
        assert seen == [(1, "s" * 22, sent.received_at), (2, "s" * 22, sent.received_at), (1, None, sent.received_at)]
        assert finals == [False, False, False]
    else:
        assert [count for count, _, _ in seen] == [1, 2, 3]
        assert finals == [False, False, True]
