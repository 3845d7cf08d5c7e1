"""Jobs, batches and stateful sessions as the simulator keeps them, and their JSON shapes (REFERENCE.md §3.5, §4)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.aqua.validation import ParsedQuery

DEFAULT_API_VERSION = "145.0"
ACTIVE = ("submitted", "executing")
FINISHED = ("completed", "aborted", "cancelled", "error")


def format_start_time(ts: float) -> str:
    """``startTime`` as the docs print it: ``YYYY-MM-DD HH:mm:ss`` (UTC in the simulator)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


@dataclass
class BatchState:
    """One query of a job."""

    batch_id: str
    name: str
    query: str
    batch_type: str
    api_version: str
    parsed: ParsedQuery
    deleted: dict[str, Any] | None = None
    status: str = "pending"
    record_count: int = 0
    full: bool = True
    message: str = ""
    file_id: str | None = None
    segments: list[str] | None = None

    def deleted_echo(self) -> dict[str, Any] | None:
        if not self.deleted:
            return None
        return {"column": self.deleted["column"], "format": self.deleted.get("format", "Boolean")}

    def to_json(self, *, submit: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "batchId": self.batch_id,
            "name": self.name,
            "batchType": self.batch_type,
            "apiVersion": self.api_version,
            "query": self.query,
            "status": self.status,
            "localizedStatus": self.status,
            "recordCount": self.record_count,
            "full": self.full,
        }
        if not submit:
            out["message"] = self.message
            if self.segments is not None:
                out["segments"] = list(self.segments)
            elif self.file_id is not None:
                out["fileId"] = self.file_id
        deleted = self.deleted_echo()
        if deleted:
            out["deleted"] = deleted
        return out


@dataclass
class JobState:
    """One AQuA job and its batches."""

    id: str
    name: str | None
    version: str
    format: str
    encrypted: str
    partner: str | None
    project: str | None
    notify_url: str | None
    null_replacement: str
    use_query_labels: bool
    date_time_utc: bool
    incremental_time: str | None
    offset: int
    use_last_completed_job_queries: bool
    submitted_at: float
    batches: list[BatchState]
    status: str = "submitted"
    start_time: float | None = None
    finished_at: float | None = None
    message: str | None = None
    error_code: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    wait_for: asyncio.Event | None = None

    @property
    def stateful(self) -> bool:
        return self.version in ("1.1", "1.2") and bool(self.partner) and bool(self.project)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_json(self, *, submit: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name, "status": self.status}
        if not submit:
            out["localizedStatus"] = self.status
        out.update(version=self.version, format=self.format.upper(), encrypted=self.encrypted)
        if self.partner:
            out["partner"] = self.partner
        if self.project:
            out["project"] = self.project
        if not submit:
            out["sourceData"] = "LIVE"
            if self.start_time is not None:
                out["startTime"] = format_start_time(self.start_time)
        out["offset"] = self.offset
        out["useLastCompletedJobQueries"] = self.use_last_completed_job_queries
        if self.incremental_time:
            out["incrementalTime"] = self.incremental_time
        if self.notify_url:
            out["notifyUrl"] = self.notify_url
        if self.message and not submit:
            out["message"] = self.message
        if self.error_code and not submit:
            out["errorCode"] = self.error_code
        out["batches"] = [b.to_json(submit=submit) for b in self.batches]
        return out


@dataclass
class Session:
    """A stateful session (partner + project): jobs run one at a time, in arrival order (REFERENCE.md §9)."""

    partner: str
    project: str
    tail: asyncio.Event | None = None
    generation: int = 0
    last_completed: JobState | None = None
    last_request_at: float = 0.0
    queries: dict[str, tuple[str, tuple[str, str] | None]] = field(default_factory=dict)
    query_bodies: list[dict[str, Any]] = field(default_factory=list)
