"""Submitting jobs: the service builds each job's notifyUrl itself (public base URL + callback route +
``${JOBID}``/``${STATUS}`` placeholders + a per-submission token), submits with an Idempotency-Key so a
retried submit does not start a second job, and records the submission in the ledger."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from pipeline.aqua.client import AquaClient
from pipeline.aqua.models import Job, SubmitRequest
from pipeline.ledger import JobLedger
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
        issued = self.signer.issue(submission_id)
        notify_url = build_notify_url(self.http.public_base_url, self.http.callback_path, issued.token)
        body = request.model_copy(update={"notify_url": notify_url})
        key = idempotency_key or default_idempotency_key(request, issued.submission_id)
        job = await self.aqua.submit(body, idempotency_key=key, entity_ids=entity_ids)
        if not job.id:
            raise ValueError("AQuA accepted the job but returned no id")
        await self.ledger.bind_submission(issued.submission_id, job.id)
        await self.ledger.record_submission(
            job.id,
            submission_id=issued.submission_id,
            job_name=request.name,
            partner=request.partner,
            project=request.project,
            request=request.to_body(),
        )
        log.info("submitted job %s (%s)", job.id, request.name)
        return Submitted(job=job, submission_id=issued.submission_id, notify_url=notify_url)
