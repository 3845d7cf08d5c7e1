"""pydantic models of the AQuA API's bodies (REFERENCE.md §3-§5), shared by the client and the simulator.

Inbound models ignore unknown fields (Zuora adds them) and accept the type variants seen in the wild:
``version`` as number or string, ``recordCount`` as number or string, booleans as ``"true"`` strings.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

AQUA_ID_RE = re.compile(r"^[0-9a-f]{32}$")
"""Job, batch and file ids are 32 lower-case hex characters (REFERENCE.md §13)."""

MAX_QUERIES = 50
MAX_NAME = 32
MAX_NOTIFY_URL = 4999
MAX_EXPORT_ZOQL = 20000


def is_aqua_id(value: str) -> bool:
    """True when ``value`` has AQuA's id shape; check before putting an id into any URL."""
    return bool(AQUA_ID_RE.match(value))


def _loose_bool(v: Any) -> Any:
    if isinstance(v, str):
        low = v.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no", ""):
            return False
    return v


def _loose_int(v: Any) -> Any:
    if isinstance(v, str) and v.strip():
        try:
            return int(float(v.replace(",", "")))  # "1,234" as some answers format counts
        except ValueError:
            return v
    if isinstance(v, float):
        return int(v)
    return v


def _version_str(v: Any) -> Any:
    if isinstance(v, int | float) and not isinstance(v, bool):  # true is not version 1.0
        return f"{float(v):.1f}"
    return v


LooseBool = Annotated[bool, BeforeValidator(_loose_bool)]
LooseInt = Annotated[int, BeforeValidator(_loose_int)]
VersionStr = Annotated[str, BeforeValidator(_version_str)]


class JobStatus(StrEnum):
    """Job status words (REFERENCE.md §4.3). ``pending`` is tolerated at job level."""

    SUBMITTED = "submitted"
    PENDING = "pending"
    EXECUTING = "executing"
    COMPLETED = "completed"
    ERROR = "error"
    ABORTED = "aborted"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.ERROR, JobStatus.ABORTED, JobStatus.CANCELLED)


UNDOCUMENTED_FINAL = frozenset({"failed", "deleted_notallowed"})
"""Job status words seen outside the reference's list that can only mean the job has ended."""


class BatchStatus(StrEnum):
    """Batch status words (REFERENCE.md §4.4)."""

    SUBMITTED = "submitted"
    PENDING = "pending"
    EXECUTING = "executing"
    COMPLETED = "completed"
    ABORTED = "aborted"
    CANCELLED = "cancelled"
    DELETED_NOTALLOWED = "deleted_notallowed"


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _Answer(_In):
    """What AQuA answers: numbers where text is expected taken as text, and a ``null`` taken as an absent field
    (its default), so a job AQuA completed is never refused over a type variant. (What we send, and what users
    write in job definitions, stays strict.)"""

    model_config = ConfigDict(coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class Deleted(_In):
    """The ``deleted`` object of a query: which column flags deleted rows, and how."""

    column: str
    format: Literal["Boolean", "Numeric"] = "Boolean"
    force_export: LooseBool | None = Field(default=None, alias="forceExport")


class Query(_In):
    """One item of ``queries[]`` in a submit request."""

    name: str
    query: str
    type: Literal["zoql", "zoqlexport"] = "zoqlexport"
    api_version: str | None = Field(default=None, alias="apiVersion")
    convert_to_currencies: str | None = Field(default=None, alias="convertToCurrencies")
    deleted: Deleted | None = None


class SubmitRequest(_In):
    """The body of ``POST /v1/batch-query/`` (REFERENCE.md §3.1)."""

    format: Literal["csv", "zip", "gzip"] = "csv"  # what AQuA takes; the simulator's TSV is reached by raw bodies
    version: VersionStr = "1.0"
    name: str | None = None
    encrypted: Literal["none", "pgp"] | None = None
    use_query_labels: LooseBool | None = Field(default=None, alias="useQueryLabels")
    date_time_utc: LooseBool | None = Field(default=None, alias="dateTimeUtc")
    partner: str | None = None
    project: str | None = None
    notify_url: str | None = Field(default=None, alias="notifyUrl")
    null_replacement: str | None = Field(default=None, alias="nullReplacement")
    incremental_time: str | None = Field(default=None, alias="incrementalTime")
    offset: int | None = None
    source_data: str | None = Field(default=None, alias="sourceData")
    use_last_completed_job_queries: LooseBool | None = Field(default=None, alias="useLastCompletedJobQueries")
    queries: list[Query] | None = None

    @field_validator("format", mode="before")
    @classmethod
    def _lower_format(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @property
    def stateful(self) -> bool:
        """Stateful when version >= 1.1 and both partner and project are set (REFERENCE.md §3.4)."""
        return self.version in ("1.1", "1.2") and bool(self.partner) and bool(self.project)

    def to_body(self) -> dict[str, Any]:
        """The JSON body AQuA expects: aliases, no unset fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Batch(_Answer):
    """One batch of a job (REFERENCE.md §4.2)."""

    batch_id: str | None = Field(default=None, alias="batchId")
    name: str = ""
    query: str = ""
    batch_type: str | None = Field(default=None, alias="batchType")
    api_version: str | None = Field(default=None, alias="apiVersion")
    status: str = "pending"
    localized_status: str | None = Field(default=None, alias="localizedStatus")
    record_count: LooseInt = Field(default=0, alias="recordCount")
    full: LooseBool | None = None
    message: str | None = None
    file_id: str | None = Field(default=None, alias="fileId")
    segments: list[str] | None = None
    deleted: Deleted | list[Deleted] | None = None

    @property
    def file_ids(self) -> list[str]:
        """Segments first, then the single ``fileId`` (as real clients do)."""
        if self.segments:
            return list(self.segments)
        return [self.file_id] if self.file_id else []


class Job(_Answer):
    """A job as ``GET /v1/batch-query/jobs/{id}`` returns it (REFERENCE.md §4.1)."""

    id: str | None = None
    name: str | None = None
    status: str = "submitted"
    localized_status: str | None = Field(default=None, alias="localizedStatus")
    version: VersionStr | None = None
    format: str | None = None
    encrypted: str | None = None
    partner: str | None = None
    project: str | None = None
    source_data: str | None = Field(default=None, alias="sourceData")
    start_time: str | None = Field(default=None, alias="startTime")
    offset: LooseInt | None = None
    use_last_completed_job_queries: LooseBool | None = Field(default=None, alias="useLastCompletedJobQueries")
    incremental_time: str | int | None = Field(default=None, alias="incrementalTime")
    notify_url: str | None = Field(default=None, alias="notifyUrl")
    error_code: str | int | None = Field(default=None, validation_alias=AliasChoices("errorCode", "error_code"))
    message: str | None = None
    batches: list[Batch] = Field(default_factory=list)

    @property
    def job_status(self) -> JobStatus | None:
        """The status as an enum, or None for a word AQuA has not documented."""
        try:
            return JobStatus(self.status.lower())
        except ValueError:
            return None

    @property
    def finished(self) -> bool:
        """Whether AQuA is done with the job. A status word it has not documented (``failed``, which tap-zuora
        checks for; ``deleted_notallowed``, in SDK3's one list for jobs and batches) counts as final once no
        batch is still queued or running: such a job would otherwise be polled until its message gave up, and
        no event ever said what became of it. It is not ``completed``, so it is failed."""
        st = self.job_status
        if st is not None:
            return st.finished
        if self.status.lower() in UNDOCUMENTED_FINAL:
            return True
        running = {BatchStatus.SUBMITTED, BatchStatus.PENDING, BatchStatus.EXECUTING}
        return bool(self.batches) and all((b.status or "").lower() not in running for b in self.batches)
