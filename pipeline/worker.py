"""The SQS consumer: long-polls the work queue, runs a bounded number of jobs at once, keeps each message
(and the job's ledger lease) alive while its transfer runs, and settles the message by the outcome.

Stateless: everything it needs to resume lives in SQS and the ledger, so any replica can finish any job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from pipeline.errors import PipelineError
from pipeline.logs import bound
from pipeline.metrics import Metrics
from pipeline.models import WorkMessage
from pipeline.processor import Outcome, ProcessResult
from pipeline.settings import QueueSettings
from pipeline.workqueue import ReceivedWork, WorkQueue

log = logging.getLogger(__name__)

ProcessFn = Callable[..., Coroutine[Any, Any, ProcessResult]]

MAX_WAIT_S = 24 * 3600
"""How long after its callback a job may keep waiting (busy lease, busy session, AQuA not done) without using up
its receives; after that a waiting message follows the normal path to the DLQ."""


def retry_delay_s(receive_count: int, *, base: int = 5, cap: int = 900) -> int:
    """Visibility delay before a message is retried: grows with its receive count."""
    return int(min(cap, base * 2 ** max(receive_count - 1, 0)))


class Worker:
    """Consumes work messages until stopped."""

    def __init__(
        self,
        *,
        queue: WorkQueue,
        process: ProcessFn,
        settings: QueueSettings,
        metrics: Metrics,
        lease_extender: Callable[[str, str, float], Awaitable[bool]] | None = None,
        ledger_release: Callable[[str, str], Awaitable[None]] | None = None,
        admit: Callable[[WorkMessage], Awaitable[bool]] | None = None,
    ) -> None:
        self.queue = queue
        self.process = process
        self.settings = settings
        self.metrics = metrics
        self.lease_extender = lease_extender
        self.ledger_release = ledger_release
        self.admit = admit
        self.worker_id = uuid.uuid4().hex[:12]
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._poll_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        """Jobs being worked on right now."""
        return len(self._tasks)

    def start(self) -> None:
        """Start polling in the background (owned by this object; see :meth:`stop`)."""
        self._poll_task = asyncio.create_task(self._poll_loop(), name="worker-poll")

    async def _poll_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            free = self.settings.concurrency - len(self._tasks)
            if free <= 0:
                await self._wait_for_slot()
                continue
            try:
                batch = await self.queue.receive(
                    min(free, 10),
                    wait_time_s=self.settings.wait_time_s,
                    visibility_s=self.settings.visibility_timeout_s,
                )
                failures = 0
            except PipelineError as exc:
                failures += 1
                delay = min(30.0, 0.5 * 2**failures)
                log.warning("work queue receive failed (%s); retrying in %.1fs", exc, delay)
                await self._sleep_unless_stopping(delay)
                continue
            for work in batch:
                if self._stopping.is_set():
                    await self._hand_back(work)
                    continue
                task = asyncio.create_task(self._handle(work), name=f"work-{work.receipt_handle[-8:]}")
                self._tasks.add(task)
                task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.metrics.in_flight.set(len(self._tasks))
        if not task.cancelled() and task.exception() is not None:
            log.error("work task crashed", exc_info=task.exception())

    async def _wait_for_slot(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED, timeout=1.0)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def _handle(self, work: ReceivedWork) -> None:
        self.metrics.in_flight.set(len(self._tasks))
        if work.message is None:
            # Poison: make it visible again soon; after max receives SQS moves it to the DLQ.
            await self._settle(self.queue.set_visibility(work.receipt_handle, 1))
            return
        job_id = work.message.job_id
        # The callback's Zuora-Track-Id, else one id for this attempt: every line of the job carries it.
        track_id = work.message.track_id or f"aqp-{job_id[:12]}-{uuid.uuid4().hex[:8]}"
        with bound(job_id=job_id, track_id=track_id):
            if self.admit is not None and work.message.submission_id is not None and not await self._admitted(work):
                return
            await self._run(work, job_id)

    async def _admitted(self, work: ReceivedWork) -> bool:
        """Count a callback the receiver deferred (see :mod:`pipeline.callback_record`); settle the message when it
        is refused (deleted) or the ledger cannot be reached (retried later)."""
        assert self.admit is not None and work.message is not None
        try:
            if await self.admit(work.message):
                return True
        except PipelineError as exc:
            log.warning("could not count the deferred callback (%s); retrying later", exc)
            await self._settle(self.queue.set_visibility(work.receipt_handle, retry_delay_s(work.receive_count)))
            return False
        await self._settle(self.queue.delete(work.receipt_handle))
        return False

    async def _run(self, work: ReceivedWork, job_id: str) -> None:
        if work.sent_at_ms:
            self.metrics.work_lag.observe(max(0.0, time.time() - work.sent_at_ms / 1000))
        owner = f"{self.worker_id}-{uuid.uuid4().hex[:8]}"
        lease_s = float(self.settings.visibility_timeout_s)
        final = work.receive_count >= self.settings.max_receives and not self._within_retry_window(work)
        job = asyncio.create_task(
            self.process(job_id, owner=owner, lease_s=lease_s, final_attempt=final), name=f"job-{job_id}"
        )
        heartbeat = asyncio.create_task(self._heartbeat(work, job_id, owner, lease_s), name=f"heartbeat-{job_id}")
        try:
            await asyncio.wait((job, heartbeat), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            log.warning("job %s interrupted; handing its message back", job_id)
            await asyncio.shield(self._abandon(work, job_id, owner, (job, heartbeat), delay_s=0))
            raise
        if not job.done():
            # The heartbeat ended: the lease went to another worker, or would lapse before it could be extended.
            log.warning("job %s: lease lost; stopping its work and handing its message back", job_id)
            delay = retry_delay_s(work.receive_count)
            await asyncio.shield(self._abandon(work, job_id, owner, (job, heartbeat), delay_s=delay))
            return
        await _stop(heartbeat)
        await self._settle_result(work, await self._result(job, job_id, owner))

    async def _result(self, job: asyncio.Task[ProcessResult], job_id: str, owner: str) -> ProcessResult:
        """What the finished ``job`` came to; an error it raised is retried, its lease dropped."""
        try:
            return job.result()
        except Exception:
            log.exception("job %s: unexpected error; message will be retried", job_id)
            if self.ledger_release is not None:
                with contextlib.suppress(PipelineError):
                    await self.ledger_release(job_id, owner)
            return ProcessResult(Outcome.RETRY, reason="internal_error")

    async def _abandon(
        self, work: ReceivedWork, job_id: str, owner: str, tasks: tuple[asyncio.Task[Any], ...], *, delay_s: int
    ) -> None:
        """Stop the job's work (its multipart upload is aborted) and its heartbeat, then hand the message back: the
        heartbeat is gone first, so no visibility extension of its lands after the hand-back."""
        await asyncio.gather(*(_stop(t) for t in tasks))
        await self._hand_back(work, job_id=job_id, owner=owner, delay_s=delay_s)

    async def _settle_result(self, work: ReceivedWork, result: ProcessResult) -> None:
        o = result.outcome
        if o in (Outcome.PUBLISHED, Outcome.FAILED, Outcome.DUPLICATE):
            await self._settle(self.queue.delete(work.receipt_handle))
        elif o == Outcome.FAILED_FINAL:
            await self._settle(self.queue.set_visibility(work.receipt_handle, 0))
        elif o == Outcome.BUSY:
            busy_for = result.retry_after_s or retry_delay_s(work.receive_count, base=2, cap=60)
            await self._wait(work, int(busy_for))
        elif o == Outcome.NOT_READY:
            await self._wait(work, max(retry_delay_s(work.receive_count), int(result.retry_after_s or 0)))
        else:
            delay = retry_delay_s(work.receive_count)
            if work.message is not None:  # later in a long outage, further apart: a quarter of the time so far
                delay = max(delay, min(900, int(self._age_s(work.message) / 4)))
            if result.retry_after_s:
                delay = max(delay, int(result.retry_after_s))
            await self._wait(work, delay, limit_s=self.settings.retry_window_s)

    def _within_retry_window(self, work: ReceivedWork) -> bool:
        """Whether the job's retryable failures are still tried again rather than failing it: for
        ``retry_window_s`` after its callback (an outage of AQuA or AWS outlasts a few receives)."""
        return work.message is not None and self._age_s(work.message) < self.settings.retry_window_s

    @staticmethod
    def _age_s(msg: WorkMessage) -> float:
        return time.time() - msg.received_at.timestamp()

    async def _wait(self, work: ReceivedWork, delay_s: int, *, limit_s: float = MAX_WAIT_S) -> None:
        """Hand a message back for a wait that is no failure (the job is leased by another worker, its stateful
        session is busy with an earlier job, AQuA still runs it), or for a retry within the retry window. Each
        receive counts towards the queue's ``max_receives``, after which SQS moves the message to the DLQ, so a
        message at the end of that budget is sent again as a new one (delayed, its receive count starting over) and
        this one deleted; waiting then never sends a job to the DLQ, for up to ``limit_s`` after its callback
        (:data:`MAX_WAIT_S` for waits)."""
        msg = work.message
        near_the_end = work.receive_count >= self.settings.max_receives - 1
        if msg is not None and near_the_end and self._age_s(msg) < limit_s:
            # The copy needs no second admission: this message passed the deferred ledger check already.
            copy = msg.model_copy(update={"submission_id": None})
            try:
                await self.queue.send(copy, delay_s=max(1, delay_s))
            except PipelineError as exc:
                log.warning("could not re-enqueue a waiting job (%s); handing its message back instead", exc)
            else:
                log.info("job waits %d s more; re-enqueued it with a fresh receive count", delay_s)
                await self._settle(self.queue.delete(work.receipt_handle))
                return
        await self._settle(self.queue.set_visibility(work.receipt_handle, delay_s))

    async def _settle(self, op: Awaitable[None]) -> None:
        try:
            await op
        except PipelineError as exc:
            # The message reappears after its visibility timeout and is handled again (idempotently).
            log.warning("could not settle work message: %s", exc)

    async def _heartbeat(self, work: ReceivedWork, job_id: str, owner: str, lease_s: float) -> None:
        """Keep the message hidden and the job's lease alive while the job runs; return (the job's work is then
        stopped) once the lease is lost to another worker, or could not be extended and would lapse before the
        next beat. The two extensions run side by side, each within ``interval / 2``: an SQS call that hangs must
        not let the lease lapse, and vice versa."""
        interval = max(1.0, lease_s / 3)
        bound_s = interval / 2
        expires = time.monotonic() + lease_s  # the job claims its lease just after this: a safe, early guess
        beat = time.monotonic()
        while True:
            beat = max(beat + interval, time.monotonic())  # on schedule, however long the last beat took
            await asyncio.sleep(beat - time.monotonic())
            _, held = await asyncio.gather(
                self._extend_visibility(work, lease_s, bound_s), self._extend_lease(job_id, owner, lease_s, bound_s)
            )
            if held is False:
                log.warning("job %s: its lease is held by another worker now", job_id)
                return
            if held:
                expires = beat + lease_s
            elif beat + interval + bound_s >= expires:
                log.warning("job %s: its lease could not be extended and would lapse before the next try", job_id)
                return

    async def _extend_visibility(self, work: ReceivedWork, lease_s: float, bound_s: float) -> None:
        try:
            await asyncio.wait_for(self.queue.set_visibility(work.receipt_handle, int(lease_s)), bound_s)
        except (PipelineError, TimeoutError) as exc:
            log.warning("heartbeat could not extend the message's visibility: %r", exc)

    async def _extend_lease(self, job_id: str, owner: str, lease_s: float, bound_s: float) -> bool | None:
        """True: the lease is extended (or there is none to keep); False: it is another worker's; None: unknown."""
        if self.lease_extender is None:
            return True
        try:
            return await asyncio.wait_for(self.lease_extender(job_id, owner, lease_s), bound_s)
        except (PipelineError, TimeoutError) as exc:
            log.warning("heartbeat could not extend the job's lease: %r", exc)
            return None

    async def _hand_back(
        self, work: ReceivedWork, *, job_id: str | None = None, owner: str | None = None, delay_s: int = 0
    ) -> None:
        """Make the message visible again (now, or after ``delay_s``), and drop our lease, so another replica (or
        this one, later) takes the job."""
        await self._settle(self.queue.set_visibility(work.receipt_handle, delay_s))
        if job_id and owner and self.ledger_release is not None:
            try:
                await self.ledger_release(job_id, owner)
            except PipelineError as exc:
                log.warning("could not release lease of %s: %s", job_id, exc)

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` has been called."""
        return self._stopping.is_set()

    async def stop(self, grace_s: float) -> None:
        """Stop receiving, let in-flight jobs finish for ``grace_s``, then cancel and hand back the rest.

        Idempotent: a second call (e.g. the app's cleanup after ``serve`` began draining) waits for the first.
        Cancelled jobs abort their multipart uploads, make their messages visible again and release their
        ledger leases before this returns, so it must run before the AWS clients close.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(grace_s), name="worker-stop")
        await asyncio.shield(self._stop_task)

    async def _stop(self, grace_s: float) -> None:
        self._stopping.set()
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        if self._tasks:
            log.info("draining %d in-flight job(s) for up to %.0fs", len(self._tasks), grace_s)
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("handing back %d unfinished job(s)", len(pending))
                _, stuck = await asyncio.wait(pending, timeout=15)
                if stuck:
                    log.error("%d job(s) did not finish handing back; their messages reappear on timeout", len(stuck))
        log.info("worker stopped")


async def _stop(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has unwound; its cancellation (or a late error, logged) is not raised, a
    cancellation of the caller is."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if me is not None and me.cancelling():
            raise
    except Exception:
        log.exception("%s ended with an error", task.get_name())
