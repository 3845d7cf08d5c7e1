"""Counting a callback in the job ledger, and refusing one that is not ours: the check every callback passes,
for token callbacks in the worker when the work message arrives (``ledger.token_callbacks_at = "worker"``, the
default), otherwise in the receiver before it answers (callouts without a token of ours always; token callbacks
with ``"receiver"``).

Where the check runs is a trade between what the receiver can tell Zuora and what a callback costs it:

* ``receiver``: a token of another job is refused with 403 and a repeated callout answered 200 ``duplicate``,
  synchronously; each accepted callback costs the receiver a ledger write and a queue send.
* ``worker``: the receiver verifies the token's signature and expiry (no AWS call), sends the work message and
  answers 202. The worker makes the same ledger check first thing; a callback that fails it is dropped there
  (logged, counted in ``aqua_callbacks_total{outcome="dropped_<code>"}``) and does no work. Nothing accepted is
  lost either way: the receiver answers only once the work message is in SQS.
"""

from __future__ import annotations

import asyncio
import logging

from pipeline.callback_batch import TokenCallbackBatcher
from pipeline.errors import CallbackRejected, PipelineError
from pipeline.ledger import CallbackRecord, JobLedger
from pipeline.metrics import Metrics
from pipeline.models import WorkMessage

log = logging.getLogger(__name__)

UNKNOWN_JOB_WAIT_S = (0.1, 0.2, 0.4, 0.8)
"""A callout can outrun the submitter's ledger write for a fast job; look again briefly before refusing."""


class CallbackRecorder:
    """Counts callbacks in the ledger; raises :class:`CallbackRejected` for one that is not ours."""

    def __init__(
        self, ledger: JobLedger, fast_path: TokenCallbackBatcher | None = None, *, metrics: Metrics | None = None
    ) -> None:
        self.ledger = ledger
        self.fast_path = fast_path or TokenCallbackBatcher(ledger, max_items=1)
        self.metrics = metrics

    async def _known_job(self, job_id: str) -> bool:
        """True when the job was submitted by this service (callouts without a token of ours)."""
        for delay in (0.0, *UNKNOWN_JOB_WAIT_S):
            if delay:
                await asyncio.sleep(delay)
            if await self.ledger.get(job_id) is not None:
                return True
        return False

    async def record(
        self, job_id: str, *, submission_id: str | None, status: str | None, notification_id: str | None
    ) -> CallbackRecord:
        """Check the callback belongs to a job of ours and count it in the ledger.

        ``submission_id``: the one a verified callback token names (None: the callback carried no token of ours).
        With a token, first the fast path: one UpdateItem (under load, a share of one transaction: see
        :mod:`pipeline.callback_batch`) when our submitter recorded this job under the token's submission.
        Otherwise (the callback outran the submitter's ledger write, the token is another job's, the job is further
        along) the token's submission is bound first come, first served, refusing (403) a token bound to another
        job, and the callback counted. Without a token, only a job this service submitted (else 404).
        """
        if submission_id is not None:
            fast = await self.fast_path.record(
                job_id, submission_id=submission_id, status=status, notification_id=notification_id
            )
            if fast is not None:
                return fast
            if not await self.ledger.bind_submission(submission_id, job_id):
                raise CallbackRejected("callback token belongs to another job", status=403, code="token_job_mismatch")
        elif not await self._known_job(job_id):
            raise CallbackRejected("no job with this id was submitted by this service", status=404, code="unknown_job")
        return await self.ledger.record_callback(job_id, status=status, notification_id=notification_id)

    async def unrecord(self, job_id: str, notification_id: str) -> None:
        """Undo what :meth:`record` did for a callout identified by ``notification_id`` whose work message could
        not be sent, so its retry is not answered as a duplicate and left unqueued. Best effort: if the ledger is
        failing too, the reconciler re-drives the job after ``callback_grace_s``."""
        try:
            await self.ledger.forget_notification(job_id, notification_id)
        except PipelineError as exc:
            log.warning(
                "callout %s could not be taken back (the reconciler will re-drive the job): %s", notification_id, exc
            )

    async def admit(self, message: WorkMessage) -> bool:
        """The worker's side of a deferred token callback: count it as the receiver would have; False (drop the
        message, do no work) when it is refused. A ledger failure raises :class:`~pipeline.errors.PipelineError`
        (the message is retried). A message redelivered after a crash is counted again: ``callback_count`` is
        informational, and the job's lease, not the count, keeps the work from running twice."""
        if message.submission_id is None:
            return True
        try:
            await self.record(
                message.job_id,
                submission_id=message.submission_id,
                status=message.callback_status,
                notification_id=message.notification_id,
            )
        except CallbackRejected as exc:
            log.warning("deferred callback for job %s dropped: %s (%s)", message.job_id, exc.code, exc)
            if self.metrics is not None:
                self.metrics.callbacks.labels(f"dropped_{exc.code}").inc()
            return False
        return True
