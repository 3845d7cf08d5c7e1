"""Submissions in flight. Before a submitter asks AQuA for a job it writes the submission down (the token's
binding item, ``sub#{submission_id}``, with the request and its Idempotency-Key), so a submitter that
dies after AQuA accepted the job but before the ledger knew of it does not lose the job: the reconciler submits
again with the same key, AQuA answers with the job it already made, and the job is recorded
(:meth:`pipeline.submission.Submitter.resume`). :class:`~pipeline.ledger.JobLedger` builds on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.dynamo import Expr, decode
from pipeline.ledger_callbacks import CallbackLedger

SUBMISSION_PREFIX = "sub#"


@dataclass(frozen=True)
class PendingSubmission:
    """A submit that was started and not seen to end: what it sent, and under which key."""

    submission_id: str
    idempotency_key: str
    request: dict[str, Any]
    """The JSON body to send to AQuA, without its notifyUrl: the token in it is signed afresh for each send and
    never stored."""
    entity_ids: str | None = None
    pending_since: float = 0.0

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> PendingSubmission:
        """Decode a ``sub#`` item written by :meth:`SubmissionLedger.record_pending_submission`."""
        raw = {k: decode(v) for k, v in item.items()}
        return cls(
            submission_id=str(raw["job_id"]).removeprefix(SUBMISSION_PREFIX),
            idempotency_key=str(raw["idempotency_key"]),
            request=orjson.loads(raw["pending_request"]),
            entity_ids=raw.get("entity_ids"),
            pending_since=float(raw["pending_since"]),
        )


class SubmissionLedger(CallbackLedger):
    """The writes and reads of submissions in flight."""

    @staticmethod
    def _sub_key(submission_id: str) -> dict[str, Any]:
        return {"job_id": {"S": f"{SUBMISSION_PREFIX}{submission_id}"}}

    async def record_pending_submission(self, pending: PendingSubmission) -> bool:
        """Write the submission down before it is sent; False (nothing written) when it is already bound to a
        job, as when a caller retries, with the same Idempotency-Key, a submit that landed."""
        now = self._clock()
        e = Expr()
        fields: dict[str, Any] = {
            "kind": "submission",
            "idempotency_key": pending.idempotency_key,
            "pending_request": orjson.dumps(pending.request).decode(),
            "expires_at": self._expires(now),
        }
        if pending.entity_ids:
            fields["entity_ids"] = pending.entity_ids
        written = await self._update_if(
            self._sub_key(pending.submission_id),
            e,
            # pending_since is the key's first use: AQuA's 24-hour key window does not restart with a retry
            f"SET {e.sets(fields)}, {e.n('pending_since')} = if_not_exists({e.n('pending_since')}, "
            f"{e.v(pending.pending_since or now)}) REMOVE {e.n('abandoned')}",
            condition=f"attribute_not_exists({e.n('bound_job')})",
        )
        return written

    async def rekey_submission(self, pending: PendingSubmission, new_key: str) -> bool:
        """Send a pending submission under ``new_key`` from now on, its key window restarting now. For a refusal
        that made no job (the job limit): AQuA answers the old key from its idempotency store with that refusal.
        False (nothing written) when the submission moved on meanwhile: bound to a job, abandoned or re-keyed."""
        e = Expr()
        update = f"SET {e.sets({'idempotency_key': new_key, 'pending_since': self._clock()})}"
        unchanged = (
            f"{e.n('idempotency_key')} = {e.v(pending.idempotency_key)} AND "
            f"attribute_exists({e.n('pending_since')}) AND attribute_not_exists({e.n('bound_job')})"
        )
        return await self._update_if(self._sub_key(pending.submission_id), e, update, condition=unchanged)

    async def abandon_submission(self, submission_id: str, reason: str) -> None:
        """Take the submission off the reconciler's list (it ended, or must not be sent again); ``reason`` stays
        on the item for operators."""
        e = Expr()
        update = f"SET {e.sets({'abandoned': reason})} REMOVE {e.n('pending_since')}"
        # no such submission (expired, or never written) means nothing is pending
        await self._update_if(self._sub_key(submission_id), e, update, condition=f"attribute_exists({e.n('job_id')})")

    async def find_pending_submissions(self, older_than_s: float) -> list[PendingSubmission]:
        """Submissions started more than ``older_than_s`` ago that never got to a job, oldest first."""
        now = self._clock()
        e = Expr()
        expr = (
            f"{e.n('kind')} = {e.v('submission')} AND attribute_not_exists({e.n('bound_job')}) AND "
            f"{e.n('pending_since')} < {e.v(now - older_than_s)}"
        )
        found = [PendingSubmission.from_item(i) for i in await self._scan_items(expr, e)]
        return sorted(found, key=lambda p: p.pending_since)

    async def try_resume_submission(self, submission_id: str, owner: str, *, hold_s: float) -> bool:
        """Elect one reconciler per pending submission per round: True for the replica that may send it again."""
        e = Expr()
        still = f"attribute_exists({e.n('pending_since')}) AND attribute_not_exists({e.n('bound_job')})"
        return await self._elect(f"{SUBMISSION_PREFIX}{submission_id}", owner, hold_s, e, still)

    async def _elect(self, key: str, owner: str, hold_s: float, e: Expr, condition: str) -> bool:
        """Hold item ``key`` for ``owner`` for ``hold_s`` if ``condition`` holds and nobody else holds it."""
        now = self._clock()
        free = f"(attribute_not_exists({e.n('reconcile_until')}) OR {e.n('reconcile_until')} < {e.v(now)})"
        update = f"SET {e.sets({'reconcile_owner': owner, 'reconcile_until': now + hold_s})}"
        return await self._update_if({"job_id": {"S": key}}, e, update, condition=f"{condition} AND {free}")
