"""One typed, frozen settings object, read from the environment once (by the CLI) and passed down.

Every variable starts with ``AQUA_PIPELINE_``; nested groups use ``__``, e.g.
``AQUA_PIPELINE_AQUA__BASE_URL`` or ``AQUA_PIPELINE_S3__BUCKET``. ``docs/configuration.md`` lists them all.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import string
from typing import Literal, Self, get_origin
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from pipeline.tokens import build_notify_url

ENV_PREFIX = "AQUA_PIPELINE_"
KEY_FIELDS = frozenset({"prefix", "partner", "project", "job_name", "date", "job_id", "batch_name", "segment", "ext"})
"""The fields an object key template may use."""
MANIFEST_FIELDS = frozenset({"prefix", "partner", "project", "job_name", "date", "job_id"})
"""The fields a manifest key template may use (``date``: the job's start date, as for objects)."""
MIB = 1024 * 1024
DEV_SIGNING_KEY = "dev-signing-key-change-me"
"""The default notifyUrl token key: for the demo, the simulator and tests on loopback. Anyone can read it here, so
a service reachable from elsewhere refuses it (see :class:`Settings`)."""
MIN_SIGNING_KEY = 16


NO_EXTENSIONS_VARIABLE = "AQUA_PIPELINE_NO_EXTENSIONS"
"""Set (to anything) to run the CSV verifier's pure-Python engine instead of its C extension."""
OTHER_VARIABLES = frozenset({NO_EXTENSIONS_VARIABLE})
"""``AQUA_PIPELINE_*`` variables read outside :class:`Settings`."""

RESERVED_PATHS = ("/healthz", "/readyz", "/metrics")
"""Routes of the service's own, besides the admin API under ``/admin/``: no callback path may take them."""


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AquaSettings(_Group):
    """How to reach Zuora (or the simulator)."""

    base_url: str = "http://127.0.0.1:8090"
    client_id: str = "sim-client"
    client_secret: SecretStr = SecretStr("sim-secret")
    entity_ids: str | None = None
    org_ids: str | None = None
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=6, ge=1, le=20)
    max_retry_time_s: float = Field(default=300.0, gt=0)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_cap_s: float = Field(default=30.0, gt=0)
    token_refresh_margin_s: float = Field(default=60.0, ge=0)
    chunk_size: int = Field(default=256 * 1024, ge=4096)

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return v.rstrip("/")


class AwsSettings(_Group):
    """Where AWS is. ``endpoint_url`` points every client at an emulator (moto) when set."""

    region: str = "us-east-1"
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    max_pool_connections: int = Field(default=32, ge=1)
    s3_payload_signing: bool = False
    """SigV4-hash every S3 request body. Off: each part and object already carries a CRC32/SHA-256 checksum
    in a signed header (what botocore does by itself over https); over plain http (emulators) the hash would
    cost ~0.7 CPU-seconds per GiB."""


class S3Settings(_Group):
    """The results bucket and how objects are written to it."""

    bucket: str = "aqua-results"
    prefix: str = "aqua"
    key_template: str = "{prefix}/{partner}/{project}/{job_name}/{date}/{job_id}/{batch_name}{segment}.{ext}"
    manifest_template: str = "{prefix}/_manifests/{job_id}.json"
    part_size: int = Field(default=8 * MIB, ge=5 * MIB, le=5 * 1024 * MIB)
    parts_in_flight: int = Field(default=4, ge=1, le=64)
    checksum_algorithm: Literal["CRC32", "SHA256"] = "CRC32"
    store_csv_gzip: bool = False
    verify_record_count: bool = True
    verify_csv_shape: bool = True
    sse: Literal["none", "AES256", "aws:kms"] = "none"
    kms_key_id: str | None = None

    @field_validator("key_template")
    @classmethod
    def _key_fields(cls, value: str) -> str:
        used = _template_fields(value, KEY_FIELDS)
        if not {"job_id", "batch_name", "segment"} <= used:  # else one file would overwrite another
            raise ValueError(
                "must contain {job_id}, {batch_name} and {segment}, which tell jobs and a job's files apart"
            )
        return value

    @field_validator("manifest_template")
    @classmethod
    def _manifest_fields(cls, value: str) -> str:
        if "job_id" not in _template_fields(value, MANIFEST_FIELDS):  # else jobs would share one manifest
            raise ValueError("must contain {job_id}: each job has its own manifest")
        return value


def _template_fields(template: str, allowed: frozenset[str]) -> set[str]:
    """The fields ``template`` uses; ``ValueError`` for a malformed template or a field not in ``allowed``."""
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"not a key template: {exc}") from None
    unknown = used - allowed
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; the fields are {' '.join(sorted(allowed))}")
    return used


class QueueSettings(_Group):
    """The SQS work queue that carries one message per job to work on."""

    work_queue_url: str | None = None
    work_queue_name: str = "aqua-pipeline-work"
    dlq_name: str = "aqua-pipeline-work-dlq"
    max_receives: int = Field(default=5, ge=1, le=1000)
    retry_window_s: float = Field(default=3600.0, ge=0, le=48 * 3600)
    """For this long after its callback a job's retryable failures (AQuA or AWS unavailable, a cut download) are
    tried again, however many receives that takes; only after it does one more fail the job. Within AQuA's 72 h
    file retention."""
    visibility_timeout_s: int = Field(default=60, ge=5, le=43200)
    wait_time_s: int = Field(default=10, ge=0, le=20)
    concurrency: int = Field(default=4, ge=1, le=256)
    worker_enabled: bool = True
    send_linger_ms: float = Field(default=1.0, ge=0, le=100)


class EventsSettings(_Group):
    """Where completion events go."""

    target: Literal["sns", "sqs", "eventbridge", "none"] = "sns"
    topic_arn: str | None = None
    topic_name: str = "aqua-pipeline-events"
    queue_url: str | None = None
    bus_name: str = "default"
    source: str = "urn:aqua-pipeline"


class LedgerSettings(_Group):
    """The DynamoDB job ledger."""

    table_name: str = "aqua-pipeline-jobs"
    retention_days: int = Field(default=30, ge=1)
    callback_batch_items: int = Field(default=25, ge=1, le=100)
    callback_linger_ms: float = Field(default=1.0, ge=0, le=100)
    callback_max_calls: int = Field(default=2, ge=1, le=16)
    """Ledger calls the callback route may have in flight at once: with 2, one slow call (a stalled connection
    waits out the read timeout) does not hold up every other token callback of the replica."""
    token_callbacks_at: Literal["receiver", "worker"] = "worker"
    """Where a callback with a valid token of ours is checked against the ledger and counted. ``worker`` (the
    default): the receiver verifies the token, sends the work message and answers 202, so its answer depends on
    SQS alone; the worker makes the check before any work. ``receiver``: before the answer (403 for another job's
    token, 200 for a repeat), at the cost of a DynamoDB call in series with the SQS one."""


class HttpSettings(_Group):
    """The service's HTTP side."""

    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    public_base_url: str = "http://127.0.0.1:8080"
    callback_path: str = "/callbacks/aqua"
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    idle_timeout_s: float = Field(default=75.0, gt=0, le=3600)
    body_timeout_s: float = Field(default=10.0, gt=0, le=600)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    drain_delay_s: float = Field(default=5.0, ge=0)

    @field_validator("public_base_url", "callback_path")
    @classmethod
    def _notify_url_part(cls, value: str, info: ValidationInfo) -> str:
        # what every submit builds into its notifyUrl, checked at start-up instead of at the first submit
        if info.field_name == "public_base_url":
            build_notify_url(value, "/", "t")
            return value
        if not value.startswith("/") or any(c in value for c in "{}") or any(c.isspace() for c in value):
            raise ValueError("must be a path starting with /, without spaces or braces, e.g. /callbacks/aqua")
        taken = value.rstrip("/") or "/"
        if taken in RESERVED_PATHS or taken == "/admin" or taken.startswith("/admin/"):
            raise ValueError(f"{value} is one of the service's own routes ({', '.join(RESERVED_PATHS)}, /admin/...)")
        build_notify_url("http://h", value, "t")
        return value


class SecuritySettings(_Group):
    """Callback authentication and the admin API."""

    signing_keys: list[SecretStr] = Field(default_factory=lambda: [SecretStr(DEV_SIGNING_KEY)], min_length=1)
    token_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    require_token: bool = True
    basic_user: str | None = None
    basic_password: SecretStr | None = None
    shared_secret: SecretStr | None = None
    allow_cidrs: list[str] = Field(default_factory=list)
    trusted_proxies: list[str] = Field(default_factory=list)
    admin_token: SecretStr | None = None

    @field_validator("basic_user", "basic_password", "shared_secret", "admin_token")
    @classmethod
    def _not_empty(cls, value: str | SecretStr | None) -> str | SecretStr | None:
        # an empty password would let anyone in with an empty password (a secret template that rendered empty)
        if value is not None and not (value.get_secret_value() if isinstance(value, SecretStr) else value):
            raise ValueError("must not be empty (unset it instead)")
        return value

    @field_validator("signing_keys")
    @classmethod
    def _long_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(len(k.get_secret_value()) < MIN_SIGNING_KEY for k in value):
            raise ValueError(f"every key must be at least {MIN_SIGNING_KEY} characters (a long random string)")
        return value

    def uses_dev_key(self) -> bool:
        """True when the built-in development key (public, in this source) signs or verifies tokens."""
        return any(k.get_secret_value() == DEV_SIGNING_KEY for k in self.signing_keys)

    @field_validator("allow_cidrs", "trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                raise ValueError(f"not an IP network: {cidr!r}") from None
        return value

    @model_validator(mode="after")
    def _basic_pair(self) -> Self:
        if (self.basic_user is None) != (self.basic_password is None):
            raise ValueError("basic_user and basic_password must be set together")
        return self


class ReconcilerSettings(_Group):
    """Finds jobs whose callback never came."""

    enabled: bool = True
    interval_s: float = Field(default=60.0, gt=0)
    callback_grace_s: float = Field(default=900.0, ge=0)
    stuck_after_s: float = Field(default=3600.0, gt=0)
    submit_grace_s: float = Field(default=300.0, gt=0)
    """A submit not seen to end this long after it started is taken as its submitter's death, and finished."""


class Settings(BaseSettings):
    """Everything the service needs, from ``AQUA_PIPELINE_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", frozen=True, extra="ignore")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    aqua: AquaSettings = AquaSettings()
    aws: AwsSettings = AwsSettings()
    s3: S3Settings = S3Settings()
    queue: QueueSettings = QueueSettings()
    events: EventsSettings = EventsSettings()
    ledger: LedgerSettings = LedgerSettings()
    http: HttpSettings = HttpSettings()
    security: SecuritySettings = SecuritySettings()
    reconciler: ReconcilerSettings = ReconcilerSettings()

    @model_validator(mode="after")
    def _no_public_dev_key(self) -> Self:
        host = urlsplit(self.http.public_base_url).hostname or ""
        if self.security.uses_dev_key() and not _is_loopback(host):
            raise ValueError(
                f"{ENV_PREFIX}SECURITY__SIGNING_KEYS: the built-in development key, which anyone can read, would "
                f"sign and verify the callback tokens of a service reached at {host} "
                f"({ENV_PREFIX}HTTP__PUBLIC_BASE_URL); set your own keys, e.g. "
                f"""{ENV_PREFIX}SECURITY__SIGNING_KEYS='["<a long random key>"]'"""
            )
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SettingsError(Exception):
    """The environment does not describe a valid configuration; the message names the variables."""


def load_settings(**overrides: object) -> Settings:
    """Read and validate settings; raise :class:`SettingsError` naming each bad variable (and each
    ``AQUA_PIPELINE_*`` variable that is no setting at all, such as a misspelt one)."""
    unknown = _unknown_variables()
    if unknown:
        raise SettingsError("invalid configuration: " + "; ".join(unknown))
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:  # a rule across groups: its message names the variables itself
                problems.append(msg)
                continue
            var = ENV_PREFIX + "__".join(str(p) for p in err["loc"]).upper()
            problems.append(f"{var}: {msg}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
    except SourceError as exc:
        # pydantic-settings could not decode a list variable (it takes JSON) and names only the group
        bad = _non_json_list_variables()
        if not bad:
            raise SettingsError(f"invalid configuration: {exc}") from None
        raise SettingsError(
            "invalid configuration: "
            + "; ".join(f'{var}: a list takes JSON, e.g. {var}=\'["first", "second"]\'' for var in bad)
        ) from None


def known_variables() -> frozenset[str]:
    """Every ``AQUA_PIPELINE_*`` name this package reads: each setting, each group (as JSON), and
    :data:`OTHER_VARIABLES`."""
    names = set(OTHER_VARIABLES)
    for group, gfield in Settings.model_fields.items():
        names.add(f"{ENV_PREFIX}{group}".upper())
        model = gfield.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names.update(f"{ENV_PREFIX}{group}__{name}".upper() for name in model.model_fields)
    return frozenset(names)


def _unknown_variables() -> list[str]:
    """One problem per ``AQUA_PIPELINE_*`` variable that names nothing this package reads, with a guess."""
    known = known_variables()
    problems = []
    for var in sorted(os.environ):
        upper = var.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        guess = difflib.get_close_matches(upper, known, n=1, cutoff=0.75)
        problems.append(f"{var}: not a setting" + (f" (did you mean {guess[0]}?)" if guess else ""))
    return problems


def _non_json_list_variables() -> list[str]:
    """The ``AQUA_PIPELINE_*`` variables of list-typed settings whose value is not JSON."""
    env = {k.upper(): v for k, v in os.environ.items()}
    bad = []
    for group, gfield in Settings.model_fields.items():
        model = gfield.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        for name, field in model.model_fields.items():
            var = f"{ENV_PREFIX}{group}__{name}".upper()
            if get_origin(field.annotation) is not list or var not in env:
                continue
            try:
                json.loads(env[var])
            except ValueError:
                bad.append(var)
    return bad
