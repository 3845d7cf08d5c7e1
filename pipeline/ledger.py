"""The DynamoDB job ledger: one item per AQuA job, moved through its states by conditional writes.

::

    submitted ──► notified ──► transferring ──► stored ──► published
        └────────────┴──────────────┴─────► failed

A worker ``claim``s a job (an atomic lease) before touching it; every ``mark_*`` is conditional on the
caller still owning the lease (``lease_owner`` matches — an expired lease that nobody re-claimed still
counts) and on the transition being legal, and raises :class:`LeaseLost` otherwise. ``published`` is
final; ``failed`` is final once its failure event id is recorded. A ``stored`` job never fails: its completion
event may be out already, so it only ever moves on to ``published``. Items expire (DynamoDB TTL on
``expires_at``) ``retention_days`` after their last write. Session items (``session#{partner}#{project}``)
serialise stateful AQuA sessions in the same table; submission items (``sub#{submission_id}``) bind a
notifyUrl token to its job and hold a submit in flight (:mod:`pipeline.ledger_submissions`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.dynamo import ConditionFailed, Expr
from pipeline.errors import JobBusy, JobNotInLedger, LedgerError
from pipeline.ledger_items import (
    FAILABLE,
    KNOWN_FIELDS,
    RETRY,
    UNFINISHED,
    CallbackRecord,
    JobState,
    LeaseLost,
    LedgerItem,
    Retry,
    TokenCallback,
)
from pipeline.ledger_submissions import PendingSubmission, SubmissionLedger
from pipeline.sessions import SessionRecord

log = logging.getLogger(__name__)

__all__ = [
    "FAILABLE",
    "RETRY",
    "UNFINISHED",
    "CallbackRecord",
    "JobLedger",
    "JobState",
    "LeaseLost",
    "LedgerItem",
    "PendingSubmission",
    "Retry",
    "SessionRecord",
    "TokenCallback",
]


TTL_ATTRIBUTE = "expires_at"
"""The item attribute DynamoDB's TTL expires ledger items on (epoch seconds)."""


class JobLedger(SubmissionLedger):
    """The job ledger over an injected aiobotocore DynamoDB client."""

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
            ttl = (await self._ddb.describe_time_to_live(TableName=self._table)).get("TimeToLiveDescription", {})
            if ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
                await self._ddb.update_time_to_live(
                    TableName=self._table, TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE}
                )
        except (ClientError, BotoCoreError) as exc:
            raise LedgerError(f"cannot prepare table {self._table}: {exc}") from exc
        if ttl.get("AttributeName", TTL_ATTRIBUTE) != TTL_ATTRIBUTE:  # a table has one TTL attribute at most
            raise LedgerError(
                f"table {self._table} expires items on {ttl['AttributeName']!r}, not on {TTL_ATTRIBUTE!r}: the "
                f"ledger's items would never expire; point LEDGER__TABLE_NAME at another table, or disable that "
                f"TTL (it can then be set on {TTL_ATTRIBUTE!r})"
            )

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

    # -- leases and transitions, used by the worker ----------------------------------------------------

    def _open(self, e: Expr, states: tuple[JobState, ...]) -> str:
        """The job is in one of ``states``, or ``failed`` without its failure event published."""
        listed = ", ".join(e.v(s.value) for s in states)
        return (
            f"({e.n('state')} IN ({listed}) OR "
            f"({e.n('state')} = {e.v(JobState.failed.value)} AND attribute_not_exists({e.n('event_id')})))"
        )

    def _claimable(self, e: Expr) -> str:
        return self._open(e, UNFINISHED)

    def _failable(self, e: Expr) -> str:
        return self._open(e, FAILABLE)

    @staticmethod
    def _stored(e: Expr) -> str:
        return f"{e.n('state')} = {e.v(JobState.stored.value)}"

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
        """Heartbeat: push ``lease_until`` to now + ``lease_s``; False if the lease is no longer ours (another worker
        took the job over, or it was released). A job that finished meanwhile counts as held: its final transition
        dropped the lease, and nothing is left to stop."""
        try:
            await self._extend(job_id, owner, lease_s, self._claimable, returns_on_failure=True)
        except ConditionFailed as exc:
            if exc.item and LedgerItem.from_item(exc.item).done:
                return True
            log.warning("job %s: lease of %s could not be extended", job_id, owner)
            return False
        return True

    async def hold_for_event(self, job_id: str, owner: str, lease_s: float, *, failure: bool) -> bool:
        """Before an event goes out: extend our lease, provided the job may still end that way (``stored`` for its
        completion; for its failure, not ``stored`` yet: a stored job's completion event may be out). False if not."""
        try:
            await self._extend(job_id, owner, lease_s, self._failable if failure else self._stored)
        except ConditionFailed:
            log.warning("job %s: %s may not publish its %s", job_id, owner, "failure" if failure else "completion")
            return False
        return True

    async def _extend(
        self,
        job_id: str,
        owner: str,
        lease_s: float,
        state_cond: Callable[[Expr], str],
        *,
        returns_on_failure: bool = False,
    ) -> None:
        """Push the lease of ``owner`` to now + ``lease_s`` while ``state_cond`` holds; raises ConditionFailed."""
        e = Expr()
        cond = f"{e.n('lease_owner')} = {e.v(owner)} AND {state_cond(e)}"
        update = f"SET {e.sets({'lease_until': self._clock() + lease_s})}"
        await self._update({"job_id": {"S": job_id}}, e, update, condition=cond, returns_on_failure=returns_on_failure)

    async def release(self, job_id: str, owner: str) -> None:
        """Hand the lease back (graceful shutdown); a no-op if it is not ours any more."""
        e = Expr()
        update = f"REMOVE {e.n('lease_owner')}, {e.n('lease_until')}"
        if not await self._update_if(
            {"job_id": {"S": job_id}}, e, update, condition=f"{e.n('lease_owner')} = {e.v(owner)}"
        ):
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
        """→ failed (from submitted/notified/transferring, or failed without an event; never from ``stored``).
        Final once ``event_id`` is set."""
        fields = {"error_reason": reason, "error_message": message[:2000], "event_id": event_id}
        return await self._transition(job_id, owner, JobState.failed, (*FAILABLE, JobState.failed), fields)

    async def annotate(self, job_id: str, fields: Mapping[str, Any]) -> None:
        """Set extra attributes (e.g. stateful session details) on an existing job; they land in ``extra``."""
        clash = set(fields) & (KNOWN_FIELDS | {"kind"})
        if clash:
            raise ValueError(f"reserved ledger attributes: {sorted(clash)}")
        e = Expr()
        try:
            await self._update(
                {"job_id": {"S": job_id}}, e, f"SET {e.sets(fields)}", condition=f"attribute_exists({e.n('state')})"
            )
        except ConditionFailed:
            raise JobNotInLedger(f"job {job_id} is not in the ledger") from None

    async def try_reconcile(self, job_id: str, owner: str, *, hold_s: float) -> bool:
        """Elect one reconciler per job per round: True for the replica that may act on it now."""
        e = Expr()
        return await self._elect(job_id, owner, hold_s, e, f"attribute_exists({e.n('state')})")

    async def hold_reconcile(self, job_id: str, owner: str, *, hold_s: float) -> None:
        """Keep the reconciler election ``owner`` won for ``hold_s`` from now: after it re-drove the job, no
        replica does so again before the work message has had its chance (a no-op if ``owner`` lost it)."""
        e = Expr()
        update = f"SET {e.sets({'reconcile_until': self._clock() + hold_s})}"
        await self._update_if(
            {"job_id": {"S": job_id}}, e, update, condition=f"{e.n('reconcile_owner')} = {e.v(owner)}"
        )

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
            if await self.get(job_id) is None:
                raise JobNotInLedger(f"job {job_id} is not in the ledger") from None
            raise JobBusy(f"job {job_id} is being worked on right now; replay it once that ends") from None
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
        return [LedgerItem.from_item(i) for i in await self._scan_items(filter_expr, e)]

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
