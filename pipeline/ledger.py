"""The DynamoDB job ledger: one item per AQuA job, moved through its states by conditional writes.

::

    submitted ──► notified ──► transferring ──► stored ──► published
        └────────────┴──────────────┴──────────────┴─────► failed

A worker ``claim``s a job (an atomic lease) before touching it; every ``mark_*`` is conditional on the
caller still owning the lease (``lease_owner`` matches — an expired lease that nobody re-claimed still
counts) and on the transition being legal, and raises :class:`LeaseLost` otherwise. ``published`` is
final; ``failed`` is final once its failure event id is recorded. Items expire (DynamoDB TTL on
``expires_at``) ``retention_days`` after their last write. Session items (``session#{partner}#{project}``)
serialise stateful AQuA sessions in the same table.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.dynamo import ConditionFailed, Expr, decode
from pipeline.errors import LedgerError
from pipeline.sessions import SessionLedger, SessionRecord
from pipeline.settings import LedgerSettings

log = logging.getLogger(__name__)

__all__ = ["CallbackRecord", "JobLedger", "JobState", "LeaseLost", "LedgerItem", "SessionRecord"]


class JobState(StrEnum):
    """Where a job is in the pipeline."""

    submitted = "submitted"
    notified = "notified"
    transferring = "transferring"
    stored = "stored"
    published = "published"
    failed = "failed"


UNFINISHED = (JobState.submitted, JobState.notified, JobState.transferring, JobState.stored)
_DAY = 86400


class LeaseLost(LedgerError):
    """A conditional write lost: someone else holds the lease, or the transition is not legal (any more)."""

    retryable = False

    def __init__(self, message: str, *, current: LedgerItem | None = None) -> None:
        super().__init__(message)
        self.current = current


_KNOWN = {
    "job_id", "state", "submission_id", "job_name", "partner", "project", "submitted_at", "updated_at",
    "notified_at", "callback_count", "lease_owner", "lease_until", "attempts", "manifest_key", "record_count",
    "total_bytes", "event_id", "error_reason", "error_message", "expires_at", "notification_ids",
    "last_callback_status", "request",
}  # fmt: skip


@dataclass(frozen=True)
class LedgerItem:
    """One job as the ledger knows it (times are epoch seconds)."""

    job_id: str
    state: JobState
    submission_id: str | None = None
    job_name: str | None = None
    partner: str | None = None
    project: str | None = None
    submitted_at: float | None = None
    updated_at: float | None = None
    notified_at: float | None = None
    callback_count: int = 0
    lease_owner: str | None = None
    lease_until: float | None = None
    attempts: int = 0
    manifest_key: str | None = None
    record_count: int | None = None
    total_bytes: int | None = None
    event_id: str | None = None
    error_reason: str | None = None
    error_message: str | None = None
    last_callback_status: str | None = None
    notification_ids: frozenset[str] = frozenset()
    request: dict[str, Any] | None = None
    expires_at: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """True when nothing is left to do: published, or failed with its failure event published."""
        return self.state is JobState.published or (self.state is JobState.failed and self.event_id is not None)

    def lease_live(self, now: float) -> bool:
        """True when somebody holds an unexpired lease."""
        return self.lease_owner is not None and self.lease_until is not None and self.lease_until >= now

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> LedgerItem:
        """Build from a raw DynamoDB item (attribute-value map)."""
        raw = {k: decode(v) for k, v in item.items()}
        request = raw.get("request")
        return cls(
            job_id=raw["job_id"],
            state=JobState(raw["state"]),
            submission_id=raw.get("submission_id"),
            job_name=raw.get("job_name"),
            partner=raw.get("partner"),
            project=raw.get("project"),
            submitted_at=raw.get("submitted_at"),
            updated_at=raw.get("updated_at"),
            notified_at=raw.get("notified_at"),
            callback_count=int(raw.get("callback_count", 0)),
            lease_owner=raw.get("lease_owner"),
            lease_until=raw.get("lease_until"),
            attempts=int(raw.get("attempts", 0)),
            manifest_key=raw.get("manifest_key"),
            record_count=raw.get("record_count"),
            total_bytes=raw.get("total_bytes"),
            event_id=raw.get("event_id"),
            error_reason=raw.get("error_reason"),
            error_message=raw.get("error_message"),
            last_callback_status=raw.get("last_callback_status"),
            notification_ids=frozenset(raw.get("notification_ids", ())),
            request=orjson.loads(request) if isinstance(request, str) else None,
            expires_at=raw.get("expires_at"),
            extra={k: v for k, v in raw.items() if k not in _KNOWN},
        )


@dataclass(frozen=True)
class CallbackRecord:
    """What :meth:`JobLedger.record_callback` found: whether the notification id was already seen.
    ``callback_count`` (this one included) is None when the callback was counted in a batch."""

    duplicate: bool
    state: JobState
    created: bool
    callback_count: int | None


@dataclass(frozen=True)
class TokenCallback:
    """A callback for the token fast path: the job, the verified token's submission, what it said."""

    job_id: str
    submission_id: str
    status: str | None
    notification_id: str | None = None


class Retry(enum.Enum):
    """:meth:`JobLedger.record_token_callbacks`: not counted, for no fault of this callback; count it again."""

    RETRY = "retry"


RETRY = Retry.RETRY


def _callback_record(
    old: LedgerItem | None, state: JobState, created: bool, notification_id: str | None
) -> CallbackRecord:
    """What a counted callback found, from the item as it was before (None: the callback created it)."""
    seen = old.notification_ids if old else frozenset()
    return CallbackRecord(
        duplicate=notification_id is not None and notification_id in seen,
        state=state,
        created=created,
        callback_count=(old.callback_count if old else 0) + 1,
    )


class JobLedger(SessionLedger):
    """The job ledger over an injected aiobotocore DynamoDB client."""

    def __init__(
        self, dynamodb_client: Any, settings: LedgerSettings, *, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(dynamodb_client, settings.table_name, clock=clock)
        self._retention_s = settings.retention_days * _DAY

    def _expires(self, now: float) -> int:
        return int(now + self._retention_s)

    async def ensure_table(self) -> None:
        """Create the table (on-demand, pk ``job_id``) with TTL on ``expires_at``; idempotent; waits until active."""
        try:
            await self._ddb.create_table(
                TableName=self._table,
                AttributeDefinitions=[{"AttributeName": "job_id", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
                BillingMode="PAY_PER_REQUEST",
            )
            log.info("created ledger table %s", self._table)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceInUseException":
                raise LedgerError(f"cannot create table {self._table}: {exc}") from exc
        try:
            waiter = self._ddb.get_waiter("table_exists")
            await waiter.wait(TableName=self._table, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
            ttl = await self._ddb.describe_time_to_live(TableName=self._table)
            if ttl.get("TimeToLiveDescription", {}).get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
                await self._ddb.update_time_to_live(
                    TableName=self._table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"}
                )
        except (ClientError, BotoCoreError) as exc:
            raise LedgerError(f"cannot prepare table {self._table}: {exc}") from exc

    # -- writes from the callback / submit side -------------------------------------------------------

    async def record_submission(
        self,
        job_id: str,
        *,
        submission_id: str | None,
        job_name: str | None,
        partner: str | None,
        project: str | None,
        request: Mapping[str, Any] | None = None,
    ) -> bool:
        """Record a job we submitted; True if the item is new. Never overwrites a field or moves the state."""
        now = self._clock()
        e = Expr()
        fields: dict[str, Any] = {
            "state": JobState.submitted.value,
            "submitted_at": now,
            "submission_id": submission_id,
            "job_name": job_name,
            "partner": partner,
            "project": project,
            "callback_count": 0,
            "attempts": 0,
        }
        if request is not None:
            fields["request"] = orjson.dumps(request).decode()
        keep = ", ".join(f"{e.n(k)} = if_not_exists({e.n(k)}, {e.v(v)})" for k, v in fields.items() if v is not None)
        update = f"SET {keep}, {e.sets({'updated_at': now, 'expires_at': self._expires(now)})}"
        resp = await self._update({"job_id": {"S": job_id}}, e, update, returns="ALL_OLD")
        return not resp.get("Attributes")

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
        return _callback_record(old, state, created, notification_id)

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
        return _callback_record(old, JobState.notified, old is None, notification_id)

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

    # -- leases and transitions, used by the worker ----------------------------------------------------

    def _claimable(self, e: Expr) -> str:
        states = ", ".join(e.v(s.value) for s in UNFINISHED)
        return (
            f"({e.n('state')} IN ({states}) OR "
            f"({e.n('state')} = {e.v(JobState.failed.value)} AND attribute_not_exists({e.n('event_id')})))"
        )

    async def claim(self, job_id: str, owner: str, lease_s: float) -> LedgerItem | None:
        """Take the lease on an unfinished job; None if it is unknown, done, or leased to someone else."""
        now = self._clock()
        e = Expr()
        free = (
            f"(attribute_not_exists({e.n('lease_owner')}) OR {e.n('lease_until')} < {e.v(now)} "
            f"OR {e.n('lease_owner')} = {e.v(owner)})"
        )
        cond = f"attribute_exists({e.n('job_id')}) AND {self._claimable(e)} AND {free}"
        update = (
            f"SET {e.sets({'lease_owner': owner, 'lease_until': now + lease_s, 'expires_at': self._expires(now)})} "
            f"ADD {e.n('attempts')} {e.v(1)}"
        )
        try:
            resp = await self._update({"job_id": {"S": job_id}}, e, update, condition=cond, returns="ALL_NEW")
        except ConditionFailed:
            log.info("job %s not claimed by %s: unknown, done or leased", job_id, owner)
            return None
        item = LedgerItem.from_item(resp["Attributes"])
        log.info("job %s claimed by %s (attempt %d, state %s)", job_id, owner, item.attempts, item.state)
        return item

    async def extend_lease(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Heartbeat: push ``lease_until`` to now + ``lease_s``; False if the lease is no longer ours."""
        now = self._clock()
        e = Expr()
        cond = f"{e.n('lease_owner')} = {e.v(owner)} AND {self._claimable(e)}"
        try:
            await self._update(
                {"job_id": {"S": job_id}}, e, f"SET {e.sets({'lease_until': now + lease_s})}", condition=cond
            )
        except ConditionFailed:
            log.warning("job %s: lease of %s could not be extended", job_id, owner)
            return False
        return True

    async def release(self, job_id: str, owner: str) -> None:
        """Hand the lease back (graceful shutdown); a no-op if it is not ours any more."""
        e = Expr()
        try:
            await self._update(
                {"job_id": {"S": job_id}},
                e,
                f"REMOVE {e.n('lease_owner')}, {e.n('lease_until')}",
                condition=f"{e.n('lease_owner')} = {e.v(owner)}",
            )
        except ConditionFailed:
            log.info("job %s: release by %s ignored, lease not held", job_id, owner)

    async def _transition(
        self, job_id: str, owner: str, to: JobState, sources: tuple[JobState, ...], fields: Mapping[str, Any]
    ) -> LedgerItem:
        now = self._clock()
        e = Expr()
        values = {"state": to.value, "updated_at": now, "expires_at": self._expires(now), **fields}
        update = f"SET {e.sets({k: v for k, v in values.items() if v is not None})}"
        if to in (JobState.published, JobState.failed):
            update += f" REMOVE {e.n('lease_owner')}, {e.n('lease_until')}"
        cond = f"{e.n('lease_owner')} = {e.v(owner)} AND {e.n('state')} IN ({', '.join(e.v(s.value) for s in sources)})"
        if to is JobState.failed:
            cond += f" AND attribute_not_exists({e.n('event_id')})"
        try:
            resp = await self._update(
                {"job_id": {"S": job_id}}, e, update, condition=cond, returns="ALL_NEW", returns_on_failure=True
            )
        except ConditionFailed as exc:
            current = LedgerItem.from_item(exc.item) if exc.item else None
            if current is None:
                why = "unknown job"
            elif current.lease_owner != owner:
                why = f"lease held by {current.lease_owner!r}"
            else:
                why = f"illegal transition {current.state} -> {to}"
            raise LeaseLost(f"job {job_id}: {owner} cannot mark {to}: {why}", current=current) from None
        log.info("job %s -> %s", job_id, to)
        return LedgerItem.from_item(resp["Attributes"])

    async def mark_transferring(self, job_id: str, owner: str) -> LedgerItem:
        """submitted/notified/transferring → transferring."""
        sources = (JobState.submitted, JobState.notified, JobState.transferring)
        return await self._transition(job_id, owner, JobState.transferring, sources, {})

    async def mark_stored(
        self, job_id: str, owner: str, *, manifest_key: str, record_count: int, total_bytes: int
    ) -> LedgerItem:
        """The manifest is committed: → stored (from submitted/notified/transferring/stored)."""
        fields = {"manifest_key": manifest_key, "record_count": record_count, "total_bytes": total_bytes}
        return await self._transition(job_id, owner, JobState.stored, UNFINISHED, fields)

    async def mark_published(self, job_id: str, owner: str, *, event_id: str) -> LedgerItem:
        """The completion event is out: stored → published (final); the lease is dropped."""
        return await self._transition(job_id, owner, JobState.published, (JobState.stored,), {"event_id": event_id})

    async def mark_failed(
        self, job_id: str, owner: str, *, reason: str, message: str, event_id: str | None = None
    ) -> LedgerItem:
        """→ failed (from any unfinished state, or failed without an event). Final once ``event_id`` is set."""
        fields = {"error_reason": reason, "error_message": message[:2000], "event_id": event_id}
        return await self._transition(job_id, owner, JobState.failed, (*UNFINISHED, JobState.failed), fields)

    async def annotate(self, job_id: str, fields: Mapping[str, Any]) -> None:
        """Set extra attributes (e.g. stateful session details) on an existing job; they land in ``extra``."""
        clash = set(fields) & (_KNOWN | {"kind"})
        if clash:
            raise ValueError(f"reserved ledger attributes: {sorted(clash)}")
        e = Expr()
        try:
            await self._update(
                {"job_id": {"S": job_id}}, e, f"SET {e.sets(fields)}", condition=f"attribute_exists({e.n('state')})"
            )
        except ConditionFailed:
            raise LedgerError(f"job {job_id} is not in the ledger", retryable=False) from None

    async def bind_submission(self, submission_id: str, job_id: str) -> bool:
        """Bind a notifyUrl token's submission to one job id, first come first served; True when the
        submission is (now or already) bound to ``job_id``, False when it names another job."""
        e = Expr()
        now = self._clock()
        try:
            await self._update(
                {"job_id": {"S": f"sub#{submission_id}"}},
                e,
                "SET " + e.sets({"bound_job": job_id, "kind": "submission", "expires_at": self._expires(now)}),
                condition=f"attribute_not_exists({e.n('bound_job')}) OR {e.n('bound_job')} = {e.v(job_id)}",
            )
        except ConditionFailed:
            log.warning("submission %s is bound to another job; refusing %s", submission_id[:8], job_id)
            return False
        return True

    async def try_reconcile(self, job_id: str, owner: str, *, hold_s: float) -> bool:
        """Elect one reconciler per job per round: True for the replica that may act on it now."""
        now = self._clock()
        e = Expr()
        cond = (
            f"attribute_exists({e.n('state')}) AND "
            f"(attribute_not_exists({e.n('reconcile_until')}) OR {e.n('reconcile_until')} < {e.v(now)})"
        )
        try:
            await self._update(
                {"job_id": {"S": job_id}},
                e,
                f"SET {e.sets({'reconcile_owner': owner, 'reconcile_until': now + hold_s})}",
                condition=cond,
            )
        except ConditionFailed:
            return False
        return True

    async def reset_for_replay(self, job_id: str) -> LedgerItem:
        """Make a finished job workable again (state ``notified``, outcome cleared); refused while leased."""
        now = self._clock()
        e = Expr()
        cond = (
            f"attribute_exists({e.n('state')}) AND "
            f"(attribute_not_exists({e.n('lease_until')}) OR {e.n('lease_until')} < {e.v(now)})"
        )
        update = (
            f"SET {e.sets({'state': JobState.notified.value, 'updated_at': now})} "
            f"REMOVE {e.n('event_id')}, {e.n('error_reason')}, {e.n('error_message')}, {e.n('manifest_key')}, "
            f"{e.n('reconcile_until')}"
        )
        try:
            resp = await self._update({"job_id": {"S": job_id}}, e, update, condition=cond, returns="ALL_NEW")
        except ConditionFailed:
            raise LedgerError(f"job {job_id} is unknown or being worked on right now", retryable=False) from None
        return LedgerItem.from_item(resp["Attributes"])

    async def ping(self) -> None:
        """A cheap read that proves the table answers (readiness)."""
        await self._call("get_item", Key={"job_id": {"S": "__ping__"}})

    # -- reads ----------------------------------------------------------------------------------------

    async def get(self, job_id: str) -> LedgerItem | None:
        """The job's item (strongly consistent read), or None."""
        resp = await self._call("get_item", Key={"job_id": {"S": job_id}}, ConsistentRead=True)
        item = resp.get("Item")
        return LedgerItem.from_item(item) if item and "state" in item else None

    async def _scan(self, filter_expr: str, e: Expr) -> list[LedgerItem]:
        items: list[LedgerItem] = []
        kw: dict[str, Any] = {"FilterExpression": filter_expr, **e.kwargs()}
        while True:
            resp = await self._call("scan", **kw)
            items.extend(LedgerItem.from_item(i) for i in resp.get("Items", []))
            if not resp.get("LastEvaluatedKey"):
                return items
            kw["ExclusiveStartKey"] = resp["LastEvaluatedKey"]

    async def list_recent(self, limit: int = 50) -> list[LedgerItem]:
        """The ``limit`` most recently updated jobs (a full scan: fine for an operator view)."""
        e = Expr()
        items = await self._scan(f"attribute_exists({e.n('state')})", e)
        items.sort(key=lambda i: i.updated_at or 0.0, reverse=True)
        return items[:limit]

    async def find_unfinished(self, older_than_s: float) -> list[LedgerItem]:
        """Jobs not done, untouched for ``older_than_s`` and with no live lease (for the reconciler).

        Includes ``failed`` jobs whose failure event was never published.
        """
        now = self._clock()
        e = Expr()
        expr = (
            f"{self._claimable(e)} AND {e.n('updated_at')} < {e.v(now - older_than_s)} AND "
            f"(attribute_not_exists({e.n('lease_until')}) OR {e.n('lease_until')} < {e.v(now)})"
        )
        items = await self._scan(expr, e)
        items.sort(key=lambda i: i.updated_at or 0.0)
        return items
