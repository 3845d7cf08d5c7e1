"""``ledger.token_callbacks_at = "worker"``: the receiver verifies a token callback's signature, enqueues it and
answers 202 without an AWS call to the ledger; the worker makes the ledger check first and drops what fails it.
Over loopback HTTP on the moto server, plus the worker's settling rules against a scripted queue."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest

from pipeline.app import METRICS_KEY, RECORDER_KEY
from pipeline.errors import LedgerError
from pipeline.ledger import JobState
from pipeline.models import WorkMessage
from pipeline.processor import Outcome, ProcessResult
from pipeline.settings import QueueSettings, Settings
from pipeline.testing.moto import MotoServer
from pipeline.testing.stack import Stack, running_stack
from pipeline.worker import Worker, retry_delay_s
from pipeline.workqueue import ReceivedWork
from tests.test_callback_fastpath import dynamodb_calls
from tests.test_callback_security import (
    call,
    callback_counts,
    callback_url,
    checked_at,
    sim,
    submit_quietly,
    token_of,
    two_quiet_jobs,
)

deferred = checked_at("worker")


async def queue_counts(stack: Stack) -> tuple[int, int]:
    """(visible, in flight) messages on the work queue."""
    url = stack.components.queue.queue_url
    resp = await stack.clients.sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )
    a = resp["Attributes"]
    return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])


async def test_receiver_enqueues_without_the_ledger_and_the_worker_drops_a_cross_job_token(
    moto_server: MotoServer,
) -> None:
    async with running_stack(moto_server.url, sim_config=sim(), tweak=deferred, run_worker=False) as stack:
        c = stack.components
        a, b = await two_quiet_jobs(stack)
        job_a, job_b = a.job.id or "", b.job.id or ""
        async with aiohttp.ClientSession() as http:
            with dynamodb_calls(stack) as ops:
                good = await call(http, "GET", callback_url(stack, job_a, token_of(a)))
                cross = await call(http, "GET", callback_url(stack, job_b, token_of(a)))  # a's token, b's id
                forged = await call(http, "GET", callback_url(stack, job_a, token_of(a)[:-2] + "AA"))
            assert good == (202, {"accepted": True, "job_id": job_a})
            assert cross == (202, {"accepted": True, "job_id": job_b})  # only the worker can tell
            assert (forged[0], forged[1]["error"]) == (403, "token_invalid")  # the signature is still checked here
            assert ops == []  # no ledger call in the receiver
            for job in (job_a, job_b):
                item = await c.ledger.get(job)
                assert item is not None and (item.state, item.callback_count) == (JobState.submitted, 0)
            assert await c.queue.depth() == 2

            assert stack.app is not None
            worker = Worker(
                queue=c.queue,
                process=c.processor.process,
                settings=stack.settings.queue,
                metrics=stack.app[METRICS_KEY],
                lease_extender=c.ledger.extend_lease,
                ledger_release=c.ledger.release,
                admit=stack.app[RECORDER_KEY].admit,
            )
            worker.start()
            try:
                done = await stack.wait_final(job_a, timeout_s=30)
                for _ in range(150):  # b's message: received, refused, deleted
                    if not sum(await queue_counts(stack)):
                        break
                    await asyncio.sleep(0.1)
            finally:
                await worker.stop(5)
            counts = await callback_counts(http, stack)
        assert done.state is JobState.published and done.callback_count == 1
        item_b = await c.ledger.get(job_b)
        assert item_b is not None and (item_b.state, item_b.callback_count) == (JobState.submitted, 0)
        assert await queue_counts(stack) == (0, 0)  # b's message deleted, not retried
        assert (counts["accepted"], counts["dropped_token_job_mismatch"], counts["token_invalid"]) == (2, 1, 1)
        events = await stack.drain_events()
        assert [e["data"]["job_id"] for e in events] == [job_a]


async def test_duplicate_deferred_callbacks_publish_one_event(moto_server: MotoServer) -> None:
    def deferred_quick(s: Settings) -> Settings:  # the duplicates that lose the claim come back this soon
        s = deferred(s)
        return s.model_copy(update={"queue": s.queue.model_copy(update={"visibility_timeout_s": 3})})

    async with running_stack(moto_server.url, sim_config=sim(), tweak=deferred_quick) as stack:
        stack.sim.faults.lose_callbacks = True
        a = await submit_quietly(stack, "dup")
        job_a = a.job.id or ""
        async with aiohttp.ClientSession() as http:
            url = callback_url(stack, job_a, token_of(a))
            answers = await asyncio.gather(*(call(http, "GET", url) for _ in range(3)))
        assert [s for s, _ in answers] == [202, 202, 202]
        item = await stack.wait_final(job_a, timeout_s=30)
        assert item.state is JobState.published
        await stack.wait_drained(timeout_s=30)  # all three messages handled, not just set aside for later
        events = await stack.drain_events(wait_s=1)
        assert [e["data"]["job_id"] for e in events] == [job_a]


class ScriptedQueue:
    """The three calls the worker settles a message with, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def delete(self, receipt: str) -> None:
        self.calls.append(("delete", receipt))

    async def set_visibility(self, receipt: str, seconds: int) -> None:
        self.calls.append(("visibility", seconds))


def received(submission_id: str | None, receive_count: int = 2) -> ReceivedWork:
    msg = WorkMessage(job_id=uuid.uuid4().hex, submission_id=submission_id, callback_status="completed")
    return ReceivedWork(msg, "receipt-1", receive_count, 0, msg.model_dump_json())


@pytest.mark.parametrize(
    ("admit_answer", "expected"),
    [
        (True, [("delete", "receipt-1")]),  # admitted: processed (PUBLISHED), then deleted
        (False, [("delete", "receipt-1")]),  # refused: deleted without processing
        (LedgerError("ledger down"), [("visibility", retry_delay_s(2))]),  # unknown: retried later
    ],
)
async def test_worker_settles_deferred_callbacks_by_the_ledger_check(
    admit_answer: bool | Exception, expected: list[tuple[str, Any]]
) -> None:
    from pipeline.metrics import Metrics

    queue = ScriptedQueue()
    processed: list[str] = []
    admitted: list[str | None] = []

    async def process(job_id: str, **_: Any) -> ProcessResult:
        processed.append(job_id)
        return ProcessResult(Outcome.PUBLISHED)

    async def admit(message: WorkMessage) -> bool:
        admitted.append(message.submission_id)
        if isinstance(admit_answer, Exception):
            raise admit_answer
        return admit_answer

    worker = Worker(queue=queue, process=process, settings=QueueSettings(), metrics=Metrics(), admit=admit)  # type: ignore[arg-type]
    work = received("sub-1")
    await worker._handle(work)
    assert queue.calls == expected
    assert admitted == ["sub-1"]
    assert processed == ([work.message.job_id] if admit_answer is True else [])  # type: ignore[union-attr]

    plain = received(None)  # not deferred (a reconcile, or a receiver that counted it): no check at all
    queue.calls.clear()
    await worker._handle(plain)
    assert admitted == ["sub-1"] and queue.calls == [("delete", "receipt-1")]
