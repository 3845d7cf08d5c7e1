"""The reconciler against a real ledger and work queue (moto): one job's trouble never costs the others their
round, and nothing but cancellation ends its loop (it is the safety net for lost callbacks)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pipeline.aqua.models import Job
from pipeline.aws import AwsClients
from pipeline.errors import AquaUnavailable
from pipeline.ledger import JobLedger
from pipeline.metrics import Metrics
from pipeline.reconciler import Reconciler
from pipeline.settings import LedgerSettings, ReconcilerSettings
from pipeline.workqueue import WorkQueue

BROKEN, DOWN, DONE = ("a" * 32, "b" * 32, "c" * 32)


class Clock:
    """The ledger's clock, set back so the jobs look submitted two minutes ago (the reconciler reads real time)."""

    def __init__(self) -> None:
        self.now = time.time() - 120

    def __call__(self) -> float:
        return self.now


class Aqua:
    """AQuA as the reconciler sees it: one job whose body no model accepts, one that AQuA cannot serve now (5xx
    after the client's retries), one finished."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def get_job(self, job_id: str, *, track_id: str | None = None) -> Job:
        self.asked.append(job_id)
        if job_id == BROKEN:
            return Job.model_validate({"id": job_id, "status": {"not": "a status"}})  # pydantic refuses it
        if job_id == DOWN:
            raise AquaUnavailable("AQuA answered 503 three times")
        return Job.model_validate({"id": job_id, "status": "completed", "batches": []})


@pytest.fixture
async def parts(aws: AwsClients, unique: str) -> Any:
    clock = Clock()
    ledger = JobLedger(aws.dynamodb, LedgerSettings(table_name=f"rec-{unique}"), clock=clock)
    await ledger.ensure_table()
    url = (await aws.sqs.create_queue(QueueName=f"rec-{unique}"))["QueueUrl"]
    yield clock, ledger, WorkQueue(aws.sqs, url)
    await aws.dynamodb.delete_table(TableName=ledger.table_name)
    await aws.sqs.delete_queue(QueueUrl=url)


async def test_one_jobs_error_does_not_cost_the_others_their_round(parts: Any) -> None:
    clock, ledger, queue = parts
    for job_id in (BROKEN, DOWN, DONE):
        await ledger.record_submission(
            job_id, submission_id=f"s-{job_id[0]}", job_name="n", partner=None, project=None, request={}
        )
    clock.now = time.time()
    metrics = Metrics()
    aqua = Aqua()
    settings = ReconcilerSettings(interval_s=60, callback_grace_s=30, stuck_after_s=600)
    rec = Reconciler(ledger=ledger, aqua=aqua, queue=queue, settings=settings, metrics=metrics)  # type: ignore[arg-type]

    assert await rec.run_once() == 1
    assert sorted(aqua.asked) == [BROKEN, DOWN, DONE]  # every job was looked at, whatever came first
    got = await queue.receive(10, wait_time_s=0, visibility_s=30)
    assert [w.message.job_id for w in got if w.message] == [DONE]
    assert metrics.reconcile_errors._value.get() == 2
    assert metrics.reconciled.labels("lost_callback")._value.get() == 1


class FailingLedger:
    """A ledger whose scan fails with something that is not a PipelineError (say, a shape botocore never sent)."""

    def __init__(self) -> None:
        self.scans = 0

    async def find_unfinished(self, older_than_s: float) -> list[Any]:
        self.scans += 1
        raise ValueError("unexpected item shape")


async def test_an_unexpected_error_does_not_end_the_loop() -> None:
    ledger = FailingLedger()
    settings = ReconcilerSettings(interval_s=0.01, callback_grace_s=0, stuck_after_s=1)
    rec = Reconciler(ledger=ledger, aqua=Aqua(), queue=None, settings=settings, metrics=Metrics())  # type: ignore[arg-type]
    task = asyncio.create_task(rec.run_forever())
    for _ in range(200):
        await asyncio.sleep(0.01)
        if ledger.scans >= 3:
            break
    assert ledger.scans >= 3 and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
