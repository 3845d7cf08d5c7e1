"""The simulator's configuration and its runtime-mutable fault switches."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_ROWS: dict[str, int] = {
    "Account": 1000,
    "Contact": 1500,
    "Invoice": 2000,
    "InvoiceItem": 5000,
    "Payment": 1800,
    "Product": 50,
    "RatePlanCharge": 3000,
    "Subscription": 1500,
}

FaultScope = Literal["all", "api", "files", "token"]
"""Which requests a fault hits: ``all`` (API and files), ``api``, ``files``, or only ``token`` (the OAuth endpoint)."""


class UiCalloutConfig(BaseModel):
    """The tenant-wide AQuA callout configured in the Zuora UI (REFERENCE.md §7.2); overrides every notifyUrl."""

    model_config = ConfigDict(extra="forbid")

    url: str
    method: Literal["GET", "POST"] = "POST"
    body_format: Literal["json", "form"] = "json"
    user: str | None = None
    password: str | None = None
    preemptive: bool = False
    max_attempts: int = Field(default=3, ge=1, le=5)
    retry_interval_s: float = Field(default=1800.0, ge=0)
    timeout_s: float = Field(default=10.0, gt=0)


class Faults(BaseModel):
    """Failure switches. Counters named ``*_next`` count down as they fire. Mutable at runtime
    (``PATCH /_sim/faults`` or ``simulator.faults.x = ...``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # API / file request faults
    rate_limit_next: int = Field(default=0, ge=0)
    rate_limit_scope: FaultScope = "all"
    retry_after_s: int = Field(default=1, ge=0)
    server_error_next: int = Field(default=0, ge=0)
    server_error_status: Literal[500, 502, 503, 504] = 503
    server_error_scope: FaultScope = "all"
    # token faults
    expire_tokens_early: bool = False
    # file body faults
    trickle_bytes_per_s: int | None = Field(default=None, gt=0)
    cut_file_after_bytes: int | None = Field(default=None, ge=0)
    cut_file_next: int | None = Field(default=None, ge=0)
    wrong_content_length: bool = False
    files_over_limit: bool | list[str] = False
    fail_file_next: int = Field(default=0, ge=0)
    # job faults
    abort_batches: bool = False
    abort_query: str | None = None
    abort_message: str = "The query exceeded maximum processing time."
    error_jobs: bool = False
    """Every job that runs ends ``error``, with ``errorCode`` 90029 and a message (set to Error after too long
    in Processing, REFERENCE.md §4.3, §11.1); its batches stop where they were."""
    record_count_offset: int = 0
    """Added to each completed batch's ``recordCount``: a count that does not match the file it describes."""
    batch_status_on_completed_job: dict[str, str] = Field(default_factory=dict)
    """Query name -> the status its batch ends with (no file) while the job still ends ``completed``: an AQuA
    answer the documented state machine does not produce (e.g. SDK3's ``deleted_notallowed``)."""
    # callback faults
    duplicate_callbacks: int = Field(default=0, ge=0)
    callback_delay_s: float = Field(default=0.0, ge=0)
    lose_callbacks: bool = False


class SimulatorConfig(BaseModel):
    """Everything that shapes the simulator; every field has a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = 42
    client_id: str = "sim-client"
    client_secret: str = "sim-secret"
    token_ttl_s: int = Field(default=3600, gt=0)
    rows: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_ROWS))
    default_rows: int = Field(default=500, ge=0)
    step_delay_s: float = Field(default=0.05, ge=0)
    segment_records: int = Field(default=500_000, gt=0)
    segmentation_enabled: bool = True
    incremental_change_ratio: float = Field(default=0.05, ge=0, le=1)
    incremental_delete_ratio: float = Field(default=0.01, ge=0, le=1)
    file_retention_s: float = Field(default=72 * 3600, gt=0)
    max_file_bytes: int = Field(default=2047 * 1024 * 1024, gt=0)
    max_concurrent_jobs: int = Field(default=50, ge=1)
    """Jobs in ``submitted``/``executing`` per kind: stateful and stateless jobs each have this limit."""
    job_limit_response: Literal["error_body", "http_429"] = "error_body"
    idempotency_replay: Literal["stored", "http_409"] = "stored"
    """How a replayed ``Idempotency-Key`` is answered: the stored response (DEV-IDEM), or it with status 409
    (DEV-ERRH); REFERENCE.md §2.2, §15."""
    rate_limit_per_minute: int | None = Field(default=None, ge=1)
    concurrent_request_limit: int = Field(default=40, ge=1)
    """Requests in flight at once (the tenant's, token fetches aside) beyond which a request gets 429."""
    callback_method: Literal["GET", "POST"] = "GET"
    callback_status_style: Literal["lower", "capitalized"] = "capitalized"
    callback_timeout_s: float = Field(default=10.0, gt=0)
    callback_statuses: list[str] = Field(default_factory=lambda: ["completed", "aborted", "cancelled", "error"])
    ui_callout: UiCalloutConfig | None = None
    compress_level: int = Field(default=1, ge=0, le=9)
    faults: Faults = Field(default_factory=Faults)

    def rows_for(self, obj: str) -> int:
        """Rows a full load of ``obj`` returns."""
        return self.rows.get(obj, self.default_rows)
