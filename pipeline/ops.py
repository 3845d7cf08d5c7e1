"""Operator actions shared by the CLI and the admin API: submit, status, list, replay, cancel."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.aqua.models import Job
from pipeline.errors import PipelineError
from pipeline.jobdefs import JobDefinition
from pipeline.ledger import JobState, LedgerItem
from pipeline.models import WorkMessage
from pipeline.submission import Submitted, Submitter

if TYPE_CHECKING:
    from pipeline.app import Components


@dataclass(frozen=True)
class JobView:
    """What an operator sees of one job: our ledger and AQuA's view."""

    ledger: LedgerItem | None
    aqua: Job | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        out: dict[str, Any] = {"ledger": None, "aqua": None}
        if self.ledger is not None:
            out["ledger"] = ledger_dict(self.ledger)
        if self.aqua is not None:
            out["aqua"] = self.aqua.model_dump(by_alias=True, exclude_none=True, mode="json")
            if "notifyUrl" in out["aqua"]:
                out["aqua"]["notifyUrl"] = redact_notify_url(out["aqua"]["notifyUrl"])
        return out


def redact_notify_url(url: str) -> str:
    """``url`` with the value of its ``token`` (and ``secret``) parameters hidden: a live callback token lets
    whoever holds it call back for its job, and status output ends up in terminals, tickets and chat."""
    return _SECRET_PARAM.sub(r"\1***", url)


_SECRET_PARAM = re.compile(r"([?&](?:token|secret)=)[^&#]*", re.IGNORECASE)


def ledger_dict(item: LedgerItem) -> dict[str, Any]:
    """A ledger item as plain JSON values."""
    return {
        "job_id": item.job_id,
        "state": str(item.state),
        "job_name": item.job_name,
        "partner": item.partner,
        "project": item.project,
        "submitted_at": item.submitted_at,
        "updated_at": item.updated_at,
        "attempts": item.attempts,
        "manifest_key": item.manifest_key,
        "record_count": item.record_count,
        "total_bytes": item.total_bytes,
        "error_reason": item.error_reason,
        "error_message": item.error_message,
    }


def submitter(c: Components) -> Submitter:
    """A Submitter wired from the components."""
    return Submitter(aqua=c.aqua, ledger=c.ledger, signer=c.signer, http=c.settings.http)


async def submit(c: Components, definition: JobDefinition) -> Submitted:
    """Submit one job definition."""
    return await submitter(c).submit(
        definition.request, idempotency_key=definition.idempotency_key, entity_ids=definition.entity_ids
    )


class PartlySubmitted(Exception):
    """Some of several jobs were submitted, then one was not: ``cause`` says why; ``not_submitted`` names that job
    and those after it, so that a retry sends only them."""

    def __init__(self, cause: Exception, not_submitted: list[str]) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.not_submitted = not_submitted


async def submit_each(c: Components, definitions: Sequence[JobDefinition]) -> AsyncIterator[Submitted]:
    """Submit ``definitions`` in order, yielding each as AQuA accepts it. The first one's error is raised as is;
    a later one's as :class:`PartlySubmitted` (the jobs before it exist in AQuA)."""
    for i, d in enumerate(definitions):
        try:
            s = await submit(c, d)
        except (PipelineError, ValueError) as exc:
            if i == 0:
                raise
            raise PartlySubmitted(exc, [x.request.name or "(unnamed)" for x in definitions[i:]]) from exc
        yield s


async def status(c: Components, job_id: str) -> JobView:
    """The ledger's and AQuA's view of one job."""
    item = await c.ledger.get(job_id)
    job = await c.aqua.get_job(job_id)
    return JobView(item, job)


async def recent(c: Components, limit: int = 50) -> list[LedgerItem]:
    """Recent jobs, newest first."""
    return await c.ledger.list_recent(limit)


async def replay(c: Components, job_id: str) -> LedgerItem:
    """Re-run a job's transfer and event: same keys, same manifest, same event id (idempotent downstream)."""
    item = await c.ledger.reset_for_replay(job_id)
    await c.queue.send(WorkMessage(job_id=job_id, reason="replay"))
    return item


async def cancel(c: Components, job_id: str) -> Job:
    """Cancel a job in AQuA (only while it has not finished)."""
    return await c.aqua.cancel_job(job_id)


FINAL_STATES = (JobState.published, JobState.failed)
