"""The callback side of the job ledger: counting callbacks (one conditional UpdateItem, or a share of a
TransactWriteItems under load) and binding a callback token's submission to one job. :class:`~pipeline.ledger.
JobLedger` builds on it."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.dynamo import ConditionFailed, Expr
from pipeline.errors import LedgerError
from pipeline.ledger_items import RETRY, CallbackRecord, JobState, LedgerItem, Retry, TokenCallback, callback_record
from pipeline.sessions import SessionLedger
from pipeline.settings import LedgerSettings

log = logging.getLogger(__name__)

_DAY = 86400


class CallbackLedger(SessionLedger):
    """The ledger's table, its retention, and the writes a callback makes."""

    def __init__(
        self, dynamodb_client: Any, settings: LedgerSettings, *, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(dynamodb_client, settings.table_name, clock=clock)
        self._retention_s = settings.retention_days * _DAY

    def _expires(self, now: float) -> int:
        return int(now + self._retention_s)

    async def record_callback(self, job_id: str, *, status: str | None, notification_id: str | None) -> CallbackRecord:
        """Count a callback: creates the item (``notified``) if unknown and moves ``submitted`` → ``notified``.

        One conditional UpdateItem while the job is submitted/notified/unknown; for a job already further
        along, a second UpdateItem that only counts the callback (the state is left alone).
        """
        now = self._clock()
        try:
            old = await self._count_callback(job_id, now, status, notification_id, set_notified=True)
            state, created = JobState.notified, old is None
        except ConditionFailed:
            old = await self._count_callback(job_id, now, status, notification_id, set_notified=False)
            if old is None:  # vanished between the two calls (TTL); the first branch will create it next time
                raise LedgerError(f"job {job_id} disappeared while recording a callback") from None
            state, created = old.state, False
        return callback_record(old, state, created, notification_id)

    async def record_token_callback(
        self, job_id: str, *, submission_id: str, status: str | None, notification_id: str | None
    ) -> CallbackRecord | None:
        """The fast path for a callback whose verified token names ``submission_id``: one conditional UpdateItem
        that counts it as :meth:`record_callback` does, provided our submitter recorded the job under that very
        submission (the item's ``submission_id`` matches) and it is still ``submitted`` or ``notified``.

        None when that does not hold (job not recorded yet, recorded under another submission, or further
        along): nothing was written, and the caller takes the general path (:meth:`bind_submission`, then
        :meth:`record_callback`).
        """
        now = self._clock()
        try:
            old = await self._count_callback(
                job_id, now, status, notification_id, set_notified=True, submission_id=submission_id
            )
        except ConditionFailed:
            return None
        return callback_record(old, JobState.notified, old is None, notification_id)

    async def record_token_callbacks(self, calls: Sequence[TokenCallback]) -> list[CallbackRecord | Retry | None]:
        """The fast path of :meth:`record_token_callback` for several callbacks of distinct jobs, none with a
        notification id, in one TransactWriteItems (all or nothing).

        For each: its :class:`CallbackRecord` when counted (``callback_count`` is None: a transaction returns no
        old item), None when its condition did not hold (take the general path, as for
        :meth:`record_token_callback`), or :data:`RETRY` when the transaction was cancelled for another reason
        (another callback's condition, a conflicting write): nothing of it was written; count it again.
        """
        if not calls:
            return []
        if len({c.job_id for c in calls}) != len(calls) or any(c.notification_id is not None for c in calls):
            raise ValueError("batched token callbacks must be of distinct jobs and carry no notification id")
        now = self._clock()
        updates = []
        for c in calls:
            e, update, cond = self._callback_update(
                now, c.status, None, set_notified=True, submission_id=c.submission_id
            )
            updates.append(self._update_params({"job_id": {"S": c.job_id}}, e, update, condition=cond))
        codes = await self._transact_updates(updates, request_token=uuid.uuid4().hex)
        if codes is None:
            counted = CallbackRecord(duplicate=False, state=JobState.notified, created=False, callback_count=None)
            return [counted] * len(calls)
        return [None if code == "ConditionalCheckFailed" else RETRY for code in codes]

    def _callback_update(
        self,
        now: float,
        status: str | None,
        notification_id: str | None,
        *,
        set_notified: bool,
        submission_id: str | None = None,
    ) -> tuple[Expr, str, str]:
        """The update and condition expressions that count one callback (see :meth:`_count_callback`)."""
        e = Expr()
        sets = [e.sets({"updated_at": now, "expires_at": self._expires(now)})]
        if status is not None:
            sets.append(e.sets({"last_callback_status": status}))
        adds = [f"{e.n('callback_count')} {e.v(1)}"]
        if notification_id is not None:
            adds.append(f"{e.n('notification_ids')} {e.v({notification_id})}")
        if set_notified:
            sets.append(e.sets({"state": JobState.notified.value}))
            sets.append(f"{e.n('notified_at')} = if_not_exists({e.n('notified_at')}, {e.v(now)})")
            sets.append(f"{e.n('attempts')} = if_not_exists({e.n('attempts')}, {e.v(0)})")
            workable = f"{e.n('state')} IN ({e.v(JobState.submitted.value)}, {e.v(JobState.notified.value)})"
            if submission_id is not None:
                cond = f"{e.n('submission_id')} = {e.v(submission_id)} AND {workable}"
            else:
                cond = f"attribute_not_exists({e.n('job_id')}) OR {workable}"
        else:
            sets.append(f"{e.n('notified_at')} = if_not_exists({e.n('notified_at')}, {e.v(now)})")
            cond = f"attribute_exists({e.n('job_id')})"
        return e, f"SET {', '.join(sets)} ADD {', '.join(adds)}", cond

    async def _count_callback(
        self,
        job_id: str,
        now: float,
        status: str | None,
        notification_id: str | None,
        *,
        set_notified: bool,
        submission_id: str | None = None,
    ) -> LedgerItem | None:
        """One UpdateItem counting a callback (ALL_OLD). ``set_notified``: also move the state to ``notified``,
        only while it is submitted/notified (or the item is new; with ``submission_id``, only on an existing item
        recorded under that submission), raising :class:`ConditionFailed` otherwise."""
        e, update, cond = self._callback_update(
            now, status, notification_id, set_notified=set_notified, submission_id=submission_id
        )
        try:
            resp = await self._update({"job_id": {"S": job_id}}, e, update, condition=cond, returns="ALL_OLD")
        except ConditionFailed:
            if set_notified:
                raise
            log.warning("callback for job %s: item vanished", job_id)
            return None
        attrs = resp.get("Attributes")
        return LedgerItem.from_item(attrs) if attrs else None

    async def forget_notification(self, job_id: str, notification_id: str) -> None:
        """Take ``notification_id`` back out of the job's seen set: its callout was counted but could not be
        enqueued (and was answered 503), so Zuora's retry of it must be taken as new, not as a duplicate."""
        e = Expr()
        update = f"DELETE {e.n('notification_ids')} {e.v({notification_id})}"
        # the item gone (TTL) means nothing to forget
        await self._update_if({"job_id": {"S": job_id}}, e, update, condition=f"attribute_exists({e.n('job_id')})")

    async def bind_submission(self, submission_id: str, job_id: str) -> bool:
        """Bind a notifyUrl token's submission to one job id, first come first served; True when the
        submission is (now or already) bound to ``job_id``, False when it names another job."""
        e = Expr()
        now = self._clock()
        bound = await self._update_if(
            {"job_id": {"S": f"sub#{submission_id}"}},
            e,
            "SET " + e.sets({"bound_job": job_id, "kind": "submission", "expires_at": self._expires(now)}),
            condition=f"attribute_not_exists({e.n('bound_job')}) OR {e.n('bound_job')} = {e.v(job_id)}",
        )
        if not bound:
            log.warning("submission %s is bound to another job; refusing %s", submission_id[:8], job_id)
        return bound
