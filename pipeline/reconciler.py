"""Callbacks are lossy. The reconciler periodically finds jobs we submitted whose callback never came,
re-reads them from AQuA, and feeds the finished ones into the same worker path; it also re-drives jobs
stuck in an intermediate state past a deadline, and finishes the submits whose submitter died mid-submit.
Every replica may run one: a conditional write in the ledger elects one reconciler per job (or submission)
per round, and the worker's lease makes the work itself single."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from pipeline.aqua.client import AquaClient
from pipeline.errors import AquaNotFound, PipelineError
from pipeline.ledger import JobLedger, JobState, LedgerItem
from pipeline.logs import bound
from pipeline.metrics import Metrics
from pipeline.models import WorkMessage
from pipeline.settings import ReconcilerSettings
from pipeline.submission import Resumed, Submitter
from pipeline.workqueue import WorkQueue

log = logging.getLogger(__name__)

_WAITING = (JobState.submitted,)
_STUCK = (JobState.notified, JobState.transferring, JobState.stored)


class Reconciler:
    """Finds lost and stuck jobs and enqueues them."""

    def __init__(
        self,
        *,
        ledger: JobLedger,
        aqua: AquaClient,
        queue: WorkQueue,
        settings: ReconcilerSettings,
        metrics: Metrics,
        submitter: Submitter | None = None,
    ) -> None:
        """``submitter`` finishes the submits whose submitter died; without one they are left alone."""
        self.submitter = submitter
        self.ledger = ledger
        self.aqua = aqua
        self.queue = queue
        self.settings = settings
        self.metrics = metrics
        self.owner = f"reconciler-{uuid.uuid4().hex[:10]}"

    async def run_forever(self) -> None:
        """Run a round every ``interval_s`` until cancelled; a failed round is logged and retried.

        Nothing but cancellation ends the loop: the reconciler is the safety net for lost callbacks, and a task
        that died of one unexpected answer would leave every later lost callback lost for good.
        """
        while True:
            try:
                await self.run_once()
            except PipelineError as exc:
                log.warning("reconcile round failed: %s", exc)
            except Exception:
                log.exception("reconcile round failed unexpectedly; trying again next round")
            await asyncio.sleep(self.settings.interval_s)

    async def run_once(self) -> int:
        """One round; returns how many jobs were enqueued."""
        try:
            await self._resume_submissions()
        except Exception as exc:  # the scan itself failed: the jobs below still get their round
            self._failed("could not look for submissions in flight", exc)
        horizon = min(self.settings.callback_grace_s, self.settings.stuck_after_s)
        candidates = await self.ledger.find_unfinished(horizon)
        enqueued = 0
        now = time.time()
        for item in candidates:
            try:
                enqueued += await self._reconcile(item, now)
            except Exception as exc:
                # One job's trouble (AQuA answering 5xx or something no model expects for it) is that job's: the
                # rest of the round still runs, and the job is looked at again next round.
                with bound(job_id=item.job_id):
                    self._failed("could not reconcile job", exc)
        return enqueued

    def _failed(self, what: str, exc: Exception) -> None:
        """Log one item's failure (a traceback only for what is not one of ours) and count it."""
        if isinstance(exc, PipelineError):
            log.warning("%s: %s", what, exc)
        else:
            log.exception(what, exc_info=exc)
        self.metrics.reconcile_errors.inc()

    async def _resume_submissions(self) -> None:
        """Finish the submits whose submitter died between starting them and recording the job. The job they
        made is then ``submitted`` in the ledger, and the rest of this loop covers it like any other."""
        if self.submitter is None:
            return
        now = time.time()
        for pending in await self.ledger.find_pending_submissions(self.settings.submit_grace_s):
            sid = pending.submission_id[:8]
            try:
                if not await self.ledger.try_resume_submission(
                    pending.submission_id, self.owner, hold_s=self.settings.interval_s * 2
                ):
                    continue
                outcome = await self.submitter.resume(pending, now)
            except Exception as exc:
                self._failed(f"could not finish submission {sid}, in flight when its submitter died", exc)
                continue
            log_at = {Resumed.recorded: logging.INFO, Resumed.deferred: logging.WARNING}.get(outcome, logging.ERROR)
            log.log(log_at, "submission %s, in flight when its submitter died: %s", sid, outcome.value)
            self.metrics.resumed_submissions.labels(outcome.value).inc()

    async def _reconcile(self, item: LedgerItem, now: float) -> int:
        age = now - (item.updated_at or now)
        if item.state in _WAITING and age >= self.settings.callback_grace_s:
            return await self._lost_callback(item)
        if item.state is JobState.notified and age >= self.settings.callback_grace_s and not item.lease_live(now):
            # The callback was recorded but its work message may never have been sent (SQS was down and we
            # answered 503; AQuA does not retry): as good as a lost callback.
            return await self._lost_callback(item, why="unqueued_callback")
        if item.state in _STUCK and age >= self.settings.stuck_after_s:
            return await self._stuck(item)
        return 0

    async def _elect(self, item: LedgerItem) -> bool:
        return await self.ledger.try_reconcile(item.job_id, self.owner, hold_s=self.settings.interval_s * 2)

    async def _lost_callback(self, item: LedgerItem, *, why: str = "lost_callback") -> int:
        with bound(job_id=item.job_id):
            if not await self._elect(item):
                return 0
            try:
                job = await self.aqua.get_job(item.job_id, track_id=f"aqp-{item.job_id[:12]}-rec")
            except AquaNotFound:
                log.warning("submitted job is unknown to AQuA; sending it to the worker to fail it")
                job = None
            if job is not None and not job.finished:
                log.debug("job still %s in AQuA", job.status)
                return 0
            log.info("callback never came; job is %s in AQuA: enqueueing", job.status if job else "unknown")
            await self.queue.send(WorkMessage(job_id=item.job_id, reason="reconcile"))
            self.metrics.reconciled.labels(why).inc()
            await self._hold(item, self.settings.callback_grace_s)
            return 1

    async def _stuck(self, item: LedgerItem) -> int:
        with bound(job_id=item.job_id):
            if not await self._elect(item):
                return 0
            log.warning("job stuck in %s; re-driving it", item.state)
            await self.queue.send(WorkMessage(job_id=item.job_id, reason="redrive"))
            self.metrics.reconciled.labels("stuck").inc()
            await self._hold(item, self.settings.stuck_after_s)
            return 1

    async def _hold(self, item: LedgerItem, hold_s: float) -> None:
        """After a re-drive: leave the job alone for ``hold_s``. A job that waits on purpose (a busy stateful
        session, a retry's backoff) keeps its state and age, and would otherwise get one more work message (and
        one more AQuA read) every round. Best effort: a failure here costs at most that."""
        try:
            await self.ledger.hold_reconcile(item.job_id, self.owner, hold_s=max(hold_s, self.settings.interval_s * 2))
        except PipelineError as exc:
            log.warning("could not hold the re-driven job: %s", exc)
