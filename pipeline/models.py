"""Models that cross module boundaries: the work message, the manifest, the completion event; and the
one orjson helper used for every JSON body we write (HTTP, S3, SQS, SNS, EventBridge).

Outbound models forbid unknown fields and are frozen: their JSON shape is a contract pinned by tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field


def dumps(obj: Any) -> str:
    """Serialise to a JSON string with orjson (pydantic models are dumped in JSON mode first)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json", by_alias=True)
    return orjson.dumps(obj).decode()


def dumpb(obj: Any) -> bytes:
    """Like :func:`dumps` but returns bytes."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json", by_alias=True)
    return orjson.dumps(obj)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WorkMessage(_Out):
    """One unit of work on the SQS work queue: "look at this job"."""

    job_id: str
    reason: Literal["callback", "reconcile", "replay", "redrive"] = "callback"
    callback_status: str | None = None
    notification_id: str | None = None
    track_id: str | None = None
    submission_id: str | None = None
    """Set when the receiver deferred counting this token callback to the worker (the token's submission)."""
    received_at: datetime = Field(default_factory=utcnow)


class ManifestObject(_Out):
    """One object the pipeline stored."""

    bucket: str
    key: str
    size: int
    sha256: str
    record_count: int | None
    batch_id: str | None
    batch_name: str
    query: str
    file_id: str
    segment: int | None = None
    full: bool | None = None
    deleted_column: str | None = None
    content_type: str
    content_encoding: str | None = None


class Manifest(_Out):
    """What landed for one job; written last, create-only: the commit marker for downstream readers."""

    manifest_version: Literal["1"] = "1"
    job_id: str
    job_name: str | None
    status: str
    partner: str | None = None
    project: str | None = None
    format: str | None = None
    stateful: bool = False
    start_time: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    record_count: int
    total_bytes: int
    objects: list[ManifestObject]


class CompletionData(_Out):
    """The ``data`` of a completion or failure event."""

    job_id: str
    job_name: str | None = None
    status: Literal["completed", "failed"]
    aqua_status: str | None = None
    reason: str | None = None
    message: str | None = None
    partner: str | None = None
    project: str | None = None
    start_time: str | None = None
    """AQuA's start time of the job (completion events): the order of a stateful session's loads, which the
    order events arrive in need not be (a job whose callback was lost lands later)."""
    manifest_bucket: str | None = None
    manifest_key: str | None = None
    record_count: int = 0
    total_bytes: int = 0
    objects: list[ManifestObject] = Field(default_factory=list)


class CloudEvent(_Out):
    """A CloudEvents 1.0 envelope in structured JSON mode."""

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str
    type: str
    subject: str
    time: datetime
    datacontenttype: Literal["application/json"] = "application/json"
    dataref: str | None = None
    data: CompletionData


EVENT_TYPE_COMPLETED = "com.zuora.aqua.export.completed"
EVENT_TYPE_FAILED = "com.zuora.aqua.export.failed"


@dataclass(frozen=True)
class FileSource:
    """An open result-file download, handed from the AQuA client to the transfer engine.

    ``chunks`` yields the body exactly as sent on the wire (still gzip-encoded when
    ``content_encoding == "gzip"``); ``content_length`` is the declared length of those wire bytes,
    when the server declared one. Whoever opened the download closes it.
    """

    file_id: str
    chunks: AsyncIterator[bytes]
    content_length: int | None
    content_type: str
    content_encoding: str | None
