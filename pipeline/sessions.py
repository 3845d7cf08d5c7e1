"""Stateful AQuA sessions in the ledger table: one item per (partner, project) (``session#{partner}#{project}``)
that says which job holds the session, which job completed it last, and the jobs this service submitted to it
that have not landed yet (``pending``: job id -> submit time), so they land in the order AQuA ran them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from pipeline.dynamo import DynamoTable, Expr, decode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionRecord:
    """A stateful (partner, project) session: who holds it, and the last completed job."""

    partner: str
    project: str
    holder_job_id: str | None
    acquired_at: float | None
    last_job_id: str | None
    last_transaction_start: str | None
    last_completed_at: float | None
    pending: dict[str, float] = field(default_factory=dict)
    """Jobs submitted to the session by this service and not landed yet: job id -> submit time."""


def _job_slot(e: Expr, job_id: str) -> str:
    """A placeholder for ``job_id`` as a key of the ``pending`` map: a fixed one, since a placeholder may hold only
    letters, digits and ``_``, and a job id is AQuA's to choose."""
    e.names["#jid"] = job_id
    return "#jid"


class SessionLedger(DynamoTable):
    """The session half of the ledger (:class:`pipeline.ledger.JobLedger` inherits it)."""

    @staticmethod
    def _session_key(partner: str, project: str) -> dict[str, Any]:
        return {"job_id": {"S": f"session#{quote(partner, safe='')}#{quote(project, safe='')}"}}

    async def acquire_session(self, partner: str, project: str, job_id: str) -> bool:
        """Hold the (partner, project) session for ``job_id``; False if another job holds it."""
        e = Expr()
        values = {"kind": "session", "partner": partner, "project": project, "holder_job_id": job_id}
        update = f"SET {e.sets({**values, 'acquired_at': self._clock()})}"
        cond = f"attribute_not_exists({e.n('holder_job_id')}) OR {e.n('holder_job_id')} = {e.v(job_id)}"
        return await self._update_if(self._session_key(partner, project), e, update, condition=cond)

    async def add_session_job(self, partner: str, project: str, job_id: str, submitted_at: float) -> None:
        """Put ``job_id`` in the session's line (idempotent: a second call keeps the first submit time)."""
        key = self._session_key(partner, project)
        e = Expr()  # a map's key can be set only once the map exists, and not in the update that makes it
        fields = {"kind": "session", "partner": partner, "project": project, "pending": {}}
        await self._update_if(key, e, f"SET {e.sets(fields)}", condition=f"attribute_not_exists({e.n('pending')})")
        e = Expr()
        slot = f"{e.n('pending')}.{_job_slot(e, job_id)}"
        await self._update(key, e, f"SET {slot} = if_not_exists({slot}, {e.v(submitted_at)})")

    async def remove_session_job(self, partner: str, project: str, job_id: str) -> None:
        """Take ``job_id`` out of the session's line (it landed, or failed for good)."""
        e = Expr()
        update = f"REMOVE {e.n('pending')}.{_job_slot(e, job_id)}"
        await self._update_if(
            self._session_key(partner, project), e, update, condition=f"attribute_exists({e.n('pending')})"
        )

    async def release_session(self, partner: str, project: str, job_id: str) -> bool:
        """Let go of the session; False if ``job_id`` did not hold it."""
        e = Expr()
        update = f"REMOVE {e.n('holder_job_id')}, {e.n('acquired_at')}"
        return await self._update_if(
            self._session_key(partner, project), e, update, condition=f"{e.n('holder_job_id')} = {e.v(job_id)}"
        )

    async def record_session_completion(
        self, partner: str, project: str, job_id: str, transaction_start: str | None
    ) -> None:
        """Remember the session's last completed job and its transaction start (does not release it). A job that
        started before the one recorded (its callback was lost, and the reconciler landed it later) does not move
        the record back: it keeps the newest transaction start."""
        e = Expr()
        values = {
            "kind": "session",
            "partner": partner,
            "project": project,
            "last_job_id": job_id,
            "last_transaction_start": transaction_start,
            "last_completed_at": self._clock(),
        }
        cond = None
        if transaction_start is not None:  # AQuA's "YYYY-MM-DD HH:MM:SS" sorts as text
            last = e.n("last_transaction_start")
            cond = f"attribute_not_exists({last}) OR {last} <= {e.v(transaction_start)}"
        if not await self._update_if(self._session_key(partner, project), e, f"SET {e.sets(values)}", condition=cond):
            log.warning(
                "session %s/%s: job %s started before the session's last recorded job; the record keeps that one",
                partner,
                project,
                job_id,
            )

    async def get_session(self, partner: str, project: str) -> SessionRecord | None:
        """The session record, or None if never used."""
        resp = await self._call("get_item", Key=self._session_key(partner, project), ConsistentRead=True)
        if not resp.get("Item"):
            return None
        raw = {k: decode(v) for k, v in resp["Item"].items()}
        return SessionRecord(
            partner=partner,
            project=project,
            holder_job_id=raw.get("holder_job_id"),
            acquired_at=raw.get("acquired_at"),
            last_job_id=raw.get("last_job_id"),
            last_transaction_start=raw.get("last_transaction_start"),
            last_completed_at=raw.get("last_completed_at"),
            pending={str(k): float(v) for k, v in (raw.get("pending") or {}).items()},
        )
