"""What the job ledger stores and answers: job states, items, callback records (:mod:`pipeline.ledger`)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

import orjson

from pipeline.dynamo import decode
from pipeline.errors import LedgerError


class JobState(StrEnum):
    """Where a job is in the pipeline."""

    submitted = "submitted"
    notified = "notified"
    transferring = "transferring"
    stored = "stored"
    published = "published"
    failed = "failed"


UNFINISHED = (JobState.submitted, JobState.notified, JobState.transferring, JobState.stored)
FAILABLE = (JobState.submitted, JobState.notified, JobState.transferring)
"""The states a job may still fail from (besides ``failed`` without its event): not ``stored``, whose manifest is
committed and whose completion event may be out already."""


class LeaseLost(LedgerError):
    """A conditional write lost: someone else holds the lease, or the transition is not legal (any more)."""

    retryable = False

    def __init__(self, message: str, *, current: LedgerItem | None = None) -> None:
        super().__init__(message)
        self.current = current


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
            extra={k: v for k, v in raw.items() if k not in KNOWN_FIELDS},
        )


KNOWN_FIELDS = frozenset(f.name for f in fields(LedgerItem)) - {"extra"}
"""The attributes :class:`LedgerItem` reads into fields of its own; any other attribute lands in ``extra``."""


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


def callback_record(
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
