"""Submitting jobs: the service builds each job's notifyUrl itself (public base URL + callback route +
``${JOBID}``/``${STATUS}`` placeholders + a per-submission token), submits with an Idempotency-Key so a
retried submit does not start a second job, and records the submission in the ledger: first as a submission in
flight (so a submitter that dies mid-submit loses nothing: :meth:`Submitter.resume`), then as the job AQuA
made."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

from pydantic import ValidationError

from pipeline.aqua.client import AquaClient
from pipeline.aqua.models import Job, SubmitRequest
from pipeline.errors import AquaValidationError, LedgerError
from pipeline.ledger import JobLedger, PendingSubmission
from pipeline.settings import HttpSettings
from pipeline.tokens import TokenSigner, build_notify_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submitted:
    """A job AQuA accepted, and the submission that names it."""

    job: Job
    submission_id: str
    notify_url: str


def default_idempotency_key(request: SubmitRequest, submission_id: str) -> str:
    """A key unique to this submission (callers pass their own to make retries of *their* submit safe)."""
    digest = hashlib.sha256(request.model_dump_json(by_alias=True).encode()).hexdigest()[:24]
    return f"aqp-{submission_id[:24]}-{digest}"


def new_idempotency_key(submission_id: str) -> str:
    """A fresh key for a submission AQuA refused without making a job (see :meth:`Submitter.resume`)."""
    return f"aqp-{submission_id[:24]}-{uuid.uuid4().hex[:24]}"


def _refused_for_now(exc: Exception) -> bool:
    """Whether AQuA refused the submit with an error it asks to retry (an error code in its answer, so no job was
    made). Not a 409: that is the first request under the key, still in progress, and it may make the job."""
    return isinstance(exc, AquaValidationError) and exc.retryable and exc.error_code is not None and exc.status != 409


class Submitter:
    """Submits AQuA jobs on behalf of the service."""

    def __init__(self, *, aqua: AquaClient, ledger: JobLedger, signer: TokenSigner, http: HttpSettings) -> None:
        self.aqua = aqua
        self.ledger = ledger
        self.signer = signer
        self.http = http

    async def submit(
        self,
        request: SubmitRequest,
        *,
        idempotency_key: str | None = None,
        entity_ids: str | None = None,
    ) -> Submitted:
        """Sign a notifyUrl, submit, record. Raises the client's typed errors on refusal."""
        if idempotency_key:
            # The same caller key always maps to the same submission id, so a retried submit that AQuA
            # answers from its idempotency store binds to the same token.
            submission_id = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
        else:
            submission_id = None
        request = request.model_copy(update={"notify_url": None})
        issued = self.signer.issue(submission_id)
        key = idempotency_key or default_idempotency_key(request, issued.submission_id)
        pending = PendingSubmission(
            submission_id=issued.submission_id, idempotency_key=key, request=request.to_body(), entity_ids=entity_ids
        )
        # Written down first: if this process dies once AQuA has the job, the reconciler finishes the submit.
        await self.ledger.record_pending_submission(pending)
        try:
            job, notify_url = await self._send(pending, request)
        except Exception as exc:
            # AQuA refused, or its answer never came: the caller is told and owns the retry, so the reconciler
            # must not send it again behind the caller's back. (A job AQuA did make still lands by its callback.)
            await self._abandon(issued.submission_id, f"submit raised {type(exc).__name__}")
            raise
        await self._record(pending, request, job)
        log.info("submitted job %s (%s)", job.id, request.name)
        return Submitted(job=job, submission_id=issued.submission_id, notify_url=notify_url)

    async def resume(self, pending: PendingSubmission, now: float) -> Resumed:
        """Finish a submit whose submitter died: send it again under its own Idempotency-Key, so AQuA answers with
        the job it already made (or makes it, if the first request never reached it), and record that job.

        A refusal (AQuA will not make this job) takes it off the list; a refusal AQuA asks to retry (the concurrent
        job limit 90028, an internal error such as 90022) gives it a new key for the next round
        (:attr:`Resumed.deferred`). Raises the client's other retryable errors, and a
        409 (a request with the same key still in progress), for the next round to try again.
        """
        if now - pending.pending_since > IDEMPOTENCY_WINDOW_S:
            # Sending it now could start a second job: AQuA may have forgotten the key.
            await self.ledger.abandon_submission(pending.submission_id, "idempotency window passed")
            return Resumed.expired
        try:
            request = SubmitRequest.model_validate(pending.request)
            job, _ = await self._send(pending, request)
        except (AquaValidationError, ValidationError) as exc:
            if _refused_for_now(exc):
                # AQuA made no job under this key (over the job limit, an internal error it asks to retry), and
                # would answer any resend of the key with the same stored refusal for 24 hours: the next round
                # sends it under a new key.
                await self.ledger.rekey_submission(pending, new_idempotency_key(pending.submission_id))
                return Resumed.deferred
            if isinstance(exc, AquaValidationError) and (exc.retryable or exc.status == 409):
                raise  # e.g. an internal AQuA error, or the first request still in progress
            await self.ledger.abandon_submission(pending.submission_id, f"refused: {exc}"[:500])
            return Resumed.refused
        await self._record(pending, request, job)
        return Resumed.recorded

    async def _send(self, pending: PendingSubmission, request: SubmitRequest) -> tuple[Job, str]:
        """POST the submission with a notifyUrl signed for it now (the token is never stored)."""
        issued = self.signer.issue(pending.submission_id)
        notify_url = build_notify_url(self.http.public_base_url, self.http.callback_path, issued.token)
        body = request.model_copy(update={"notify_url": notify_url})
        job = await self.aqua.submit(body, idempotency_key=pending.idempotency_key, entity_ids=pending.entity_ids)
        if not job.id:
            raise ValueError("AQuA accepted the job but returned no id")
        return job, notify_url

    async def _record(self, pending: PendingSubmission, request: SubmitRequest, job: Job) -> None:
        """Record the job AQuA made (state ``submitted``), then bind the submission's token to it.

        In that order, so a crash between the two loses nothing: the job is in the ledger (the reconciler looks for
        its callback) and the submission still pending (the reconciler sends it again and AQuA answers with the same
        job); both writes are idempotent, so a second run finishes what the first began.
        """
        assert job.id
        await self.ledger.record_submission(
            job.id,
            submission_id=pending.submission_id,
            job_name=request.name,
            partner=request.partner,
            project=request.project,
            request=pending.request,
        )
        if request.stateful and request.partner and request.project:
            # AQuA runs a session's jobs in the order it got them: they are landed in that order too
            submitted_at = pending.pending_since or time.time()
            await self.ledger.add_session_job(request.partner, request.project, job.id, submitted_at)
        if not await self.ledger.bind_submission(pending.submission_id, job.id):
            raise LedgerError(f"submission {pending.submission_id[:8]} is bound to a job other than {job.id}")

    async def _abandon(self, submission_id: str, reason: str) -> None:
        try:
            await self.ledger.abandon_submission(submission_id, reason)
        except LedgerError as exc:
            log.warning("submission %s: could not mark it ended (%s); it may be sent again", submission_id[:8], exc)


IDEMPOTENCY_WINDOW_S = 23 * 3600.0
"""How long after a submit it may be sent again under the same Idempotency-Key: AQuA keeps a key 24 hours
(REFERENCE.md §2.2); an hour is left for clocks and the reconciler's interval."""


class Resumed(StrEnum):
    """What :meth:`Submitter.resume` did with a pending submission."""

    recorded = "recorded"
    refused = "refused"
    expired = "expired"
    deferred = "deferred"
    """Over AQuA's concurrent job limit (90028): sent again under a new Idempotency-Key in a later round."""
