"""The worker's heartbeat against a real ledger and work queue (moto): the message's visibility and the job's lease
are kept alive independently, each call within a deadline; a lease taken over, or about to lapse, stops the job's
work and hands its message back; and nothing of the heartbeat lands after a hand-back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pipeline.aws import AwsClients
from pipeline.ledger import JobLedger, JobState, LedgerItem
from pipeline.metrics import Metrics
from pipeline.models import WorkMessage
from pipeline.processor import Outcome, ProcessResult
from pipeline.settings import LedgerSettings, QueueSettings
from pipeline.worker import Worker, retry_delay_s
from pipeline.workqueue import ReceivedWork, WorkQueue

JOB = "d" * 32
LEASE_S = 5  # the shortest visibility the settings allow: a beat every 5/3 s, each call bounded to half of that


class Clock:
    """The ledger's clock: real time, moved on when a test lets a lease run out."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class SlowQueue(WorkQueue):
    """A work queue whose heartbeat extensions (visibility > 0) wait ``extend_delay_s`` before reaching SQS (None:
    forever, as a ChangeMessageVisibility that hangs); ``sent`` lists the visibilities that reached SQS, in order,
    ``deleted`` the messages deleted."""

    def __init__(self, *args: Any, extend_delay_s: float | None = 0.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.extend_delay_s = extend_delay_s
        self.extending = asyncio.Event()
        self.sent: list[int] = []
        self.deleted: list[str] = []

    async def delete(self, receipt_handle: str) -> None:
        self.deleted.append(receipt_handle)
        await super().delete(receipt_handle)

    async def in_flight(self) -> int:
        """Messages received and not yet visible again (a handed-back message is one; a deleted one is not)."""
        resp = await self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"]
        )
        return int(resp["Attributes"]["ApproximateNumberOfMessagesNotVisible"])

    async def set_visibility(self, receipt_handle: str, seconds: int) -> None:
        if seconds > 0:
            self.extending.set()
            await asyncio.sleep(3600 if self.extend_delay_s is None else self.extend_delay_s)
        self.sent.append(seconds)
        await super().set_visibility(receipt_handle, seconds)


@dataclass
class Transfer:
    """A process function that claims the job as the processor does, then works ``work_s`` (or until cancelled)."""

    ledger: JobLedger
    work_s: float
    claimed: asyncio.Event = field(default_factory=asyncio.Event)
    lease: LedgerItem | None = None
    at_end: LedgerItem | None = None
    cancelled_at: float | None = None

    async def __call__(self, job_id: str, *, owner: str, lease_s: float, final_attempt: bool) -> ProcessResult:
        self.lease = await self.ledger.claim(job_id, owner, lease_s)
        assert self.lease is not None
        self.claimed.set()
        try:
            await asyncio.sleep(self.work_s)
        except asyncio.CancelledError:
            self.cancelled_at = self.ledger._clock()
            raise
        self.at_end = await self.ledger.get(job_id)
        return ProcessResult(Outcome.PUBLISHED)


@dataclass
class Rig:
    aws: AwsClients
    clock: Clock
    ledger: JobLedger
    queue_url: str

    def queue(self, **kw: Any) -> SlowQueue:
        return SlowQueue(self.aws.sqs, self.queue_url, **kw)

    def worker(self, queue: WorkQueue, process: Any, **kw: Any) -> Worker:
        kw.setdefault("lease_extender", self.ledger.extend_lease)
        kw.setdefault("ledger_release", self.ledger.release)
        settings = QueueSettings(visibility_timeout_s=LEASE_S)
        return Worker(queue=queue, process=process, settings=settings, metrics=Metrics(), **kw)

    async def received(self, queue: WorkQueue) -> ReceivedWork:
        await queue.send(WorkMessage(job_id=JOB))
        for _ in range(10):
            got = await queue.receive(1, wait_time_s=1, visibility_s=30)
            if got:
                return got[0]
        raise AssertionError("the work message never came")


@pytest.fixture
async def rig(aws: AwsClients, unique: str) -> AsyncIterator[Rig]:
    clock = Clock()
    ledger = JobLedger(aws.dynamodb, LedgerSettings(table_name=f"lease-{unique}"), clock=clock)
    await ledger.ensure_table()
    await ledger.record_submission(JOB, submission_id=None, job_name="n", partner=None, project=None)
    url = str((await aws.sqs.create_queue(QueueName=f"lease-{unique}"))["QueueUrl"])
    yield Rig(aws, clock, ledger, url)
    await aws.dynamodb.delete_table(TableName=ledger.table_name)
    await aws.sqs.delete_queue(QueueUrl=url)


async def test_a_hanging_visibility_call_does_not_let_the_lease_lapse(rig: Rig) -> None:
    queue = rig.queue(extend_delay_s=None)
    transfer = Transfer(rig.ledger, work_s=LEASE_S + 1.5)
    await asyncio.wait_for(rig.worker(queue, transfer)._handle(await rig.received(queue)), 20)
    assert transfer.cancelled_at is None and transfer.at_end is not None
    assert transfer.at_end.lease_live(rig.clock())  # extended while SQS hung: still ours, past the first lease
    assert queue.sent == []  # no extension reached SQS (the message was then deleted)


async def test_a_lease_taken_over_stops_the_work_and_hands_the_message_back(rig: Rig) -> None:
    queue = rig.queue()
    transfer = Transfer(rig.ledger, work_s=60)
    task = asyncio.create_task(rig.worker(queue, transfer)._handle(await rig.received(queue)))
    await asyncio.wait_for(transfer.claimed.wait(), 10)
    rig.clock.offset += LEASE_S + 1  # the lease ran out (say, a long pause), and another replica claimed the job
    assert await rig.ledger.claim(JOB, "other-replica", 60)
    await asyncio.wait_for(task, 10)
    assert transfer.cancelled_at is not None
    item = await rig.ledger.get(JOB)
    assert item is not None and (item.state, item.lease_owner) == (JobState.submitted, "other-replica")
    assert queue.sent[-1] == retry_delay_s(1)  # handed back for a later retry ...
    assert queue.deleted == [] and await queue.in_flight() == 1  # ... not deleted


async def test_a_lease_that_cannot_be_extended_stops_the_work_before_it_lapses(rig: Rig) -> None:
    async def hanging(job_id: str, owner: str, lease_s: float) -> bool:
        await asyncio.sleep(3600)
        return True

    queue = rig.queue()
    transfer = Transfer(rig.ledger, work_s=60)
    worker = rig.worker(queue, transfer, lease_extender=hanging)
    await asyncio.wait_for(worker._handle(await rig.received(queue)), 15)
    assert transfer.lease is not None and transfer.lease.lease_until is not None
    assert transfer.cancelled_at is not None and transfer.cancelled_at < transfer.lease.lease_until
    item = await rig.ledger.get(JOB)
    assert item is not None and (item.state, item.lease_owner) == (JobState.submitted, None)  # released, not failed
    assert queue.sent[-1] == retry_delay_s(1)
    assert queue.deleted == [] and await queue.in_flight() == 1  # handed back, not deleted


async def test_no_heartbeat_lands_after_the_hand_back(rig: Rig) -> None:
    """Cancelled (shutdown) while a heartbeat extension is on its way (botocore backing off before a retry, say):
    the heartbeat is stopped before the message is handed back, so the message is visible at once afterwards."""

    async def slow_release(job_id: str, owner: str) -> None:
        await asyncio.sleep(1.0)

    queue = rig.queue(extend_delay_s=0.5)
    worker = rig.worker(queue, Transfer(rig.ledger, work_s=60), ledger_release=slow_release)
    task = asyncio.create_task(worker._handle(await rig.received(queue)))
    await asyncio.wait_for(queue.extending.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert queue.sent == [0]
    assert len(await queue.receive(1, wait_time_s=0, visibility_s=30)) == 1
