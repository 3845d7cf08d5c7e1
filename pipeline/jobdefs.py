"""Job definition files for ``aqua-pipeline submit FILE``.

A file is YAML (``.yaml``/``.yml``) or JSON (``.json``); any other extension is sniffed (``{``/``[`` first means
JSON). It holds one job, a list of jobs, or a mapping with a ``jobs:`` list. A job is the AQuA submit body
(REFERENCE.md §3: ``name``, ``version``, ``format``, ``encrypted``, ``partner``, ``project``, ``queries`` …) plus
two keys of our own: ``entityIds`` (sent as the ``Zuora-Entity-Ids`` header; a string or a list) and
``idempotencyKey`` (the ``Idempotency-Key`` header). Keys may be written in camelCase or snake_case; unknown keys
are errors, so a typo never silently drops a setting. ``notifyUrl`` is refused: the service builds it.

Every problem in the file is collected into one :class:`JobDefinitionError`, one line per problem.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import ValidationError

from pipeline.aqua.models import SubmitRequest
from pipeline.aqua.validation import validate_submit

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 100_000
"""Cap on values in a loaded file; YAML aliases could otherwise expand a small file enormously."""
MAX_IDEMPOTENCY_KEY = 255

JOB_FIELDS = (
    "name",
    "version",
    "format",
    "encrypted",
    "partner",
    "project",
    "queries",
    "useQueryLabels",
    "dateTimeUtc",
    "nullReplacement",
    "incrementalTime",
    "offset",
    "sourceData",
    "useLastCompletedJobQueries",
)
OWN_FIELDS = ("entityIds", "idempotencyKey")
QUERY_FIELDS = ("name", "query", "type", "apiVersion", "convertToCurrencies", "deleted")
DELETED_FIELDS = ("column", "format", "forceExport")

NOTIFY_URL_REFUSAL = (
    "notifyUrl is not allowed: the service builds each job's notifyUrl itself, with a signed per-submission "
    "token, from AQUA_PIPELINE_HTTP__PUBLIC_BASE_URL and AQUA_PIPELINE_HTTP__CALLBACK_PATH; a URL of your own "
    "would not carry that token and its callback would be refused"
)

_ENTITY_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
_HEADER_VALUE_RE = re.compile(r"[\x21-\x7e]+")


class JobDefinitionError(ValueError):
    """Job definitions that cannot be submitted; ``problems`` holds one line per problem, as in the message."""

    def __init__(self, source: str | Path, problems: list[str]) -> None:
        super().__init__(f"invalid job definitions in {source}:\n" + "\n".join(f"  {p}" for p in problems))
        self.source = str(source)
        self.problems = problems


@dataclass(frozen=True)
class JobDefinition:
    """One job to submit: the AQuA body, the headers that go with it, and where it came from."""

    request: SubmitRequest
    entity_ids: str | None
    idempotency_key: str | None
    source: str


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def _normalise(obj: Any, fields: tuple[str, ...], where: str, problems: list[str]) -> dict[str, Any]:
    """Map camelCase or snake_case keys onto ``fields`` (camelCase); unknown and duplicate keys are problems."""
    known = {f: f for f in fields} | {_snake(f): f for f in fields}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        camel = known.get(key) if isinstance(key, str) else None
        if camel is None:
            problems.append(f"{where}{key}: unknown key")
        elif camel in out:
            problems.append(f"{where}{key}: given twice (as {camel} and {_snake(camel)})")
        else:
            out[camel] = value
    return out


def _plain(value: Any) -> Any:
    """YAML turns unquoted timestamps into datetimes; AQuA wants ``YYYY-MM-DD HH:mm:ss`` text (a time zone is kept,
    so validation refuses it rather than this silently dropping it)."""
    if isinstance(value, datetime):
        return value.isoformat() if value.tzinfo else value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _body(job: dict[str, Any], problems: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a job into (AQuA body in camelCase, our own keys), recording structural problems."""
    if "notifyUrl" in job or "notify_url" in job:
        problems.append(NOTIFY_URL_REFUSAL)
        job = {k: v for k, v in job.items() if k not in ("notifyUrl", "notify_url")}
    top = _normalise(job, JOB_FIELDS + OWN_FIELDS, "", problems)
    own = {k: top.pop(k) for k in OWN_FIELDS if k in top}
    queries = top.get("queries")
    if queries is not None and not isinstance(queries, list):
        problems.append("queries: must be a list")
    elif queries is not None:
        normalised = []
        for i, q in enumerate(queries):
            if not isinstance(q, dict):
                problems.append(f"queries[{i}]: must be a mapping")
                normalised.append(q)
                continue
            nq = _normalise(q, QUERY_FIELDS, f"queries[{i}].", problems)
            if isinstance(nq.get("deleted"), dict):
                nq["deleted"] = _normalise(nq["deleted"], DELETED_FIELDS, f"queries[{i}].deleted.", problems)
            normalised.append(nq)
        top["queries"] = normalised
    return top, own


def _entity_ids(value: Any, problems: list[str]) -> str | None:
    if value is None:
        return None
    items = value if isinstance(value, list) else str(value).split(",") if isinstance(value, str) else None
    if not items or not all(isinstance(v, str) and _ENTITY_ID_RE.fullmatch(v.strip()) for v in items):
        problems.append("entityIds: must be an entity id or a list (or comma-separated string) of them")
        return None
    return ",".join(v.strip() for v in items)


def _idempotency_key(value: Any, problems: list[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_IDEMPOTENCY_KEY or not _HEADER_VALUE_RE.fullmatch(value):
        problems.append(f"idempotencyKey: must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters, no spaces")
        return None
    return value


def _pydantic_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """(last field name, line) per model error, the location written like ``queries[0].deleted.format``."""
    out = []
    for err in exc.errors():
        parts = [p for p in err["loc"] if not str(p).startswith("function-")]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
        field = next((str(p) for p in reversed(parts) if isinstance(p, str)), "")
        out.append((field, f"{loc}: {err['msg']}" if loc else str(err["msg"])))
    return out


def _parse(path: Path, text: str) -> Any:
    suffix = path.suffix.lower()
    as_json = suffix == ".json" or (suffix not in (".yaml", ".yml") and text.lstrip()[:1] in ("{", "["))
    if as_json:
        return orjson.loads(text)
    return yaml.safe_load(text)


def _load(path: Path, raw: bytes) -> Any:
    try:
        return _parse(path, raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise JobDefinitionError(path, ["the file is not UTF-8 text"]) from None
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise JobDefinitionError(path, [f"cannot parse the file: {exc}"]) from None
    except RecursionError:
        raise JobDefinitionError(path, ["cannot parse the file: nested too deeply"]) from None


def _plain_data(source: str, data: Any) -> Any:
    """``data`` as plain JSON-shaped values (datetimes turned into text), within a size limit."""
    try:
        if _count_nodes(data, MAX_NODES) < 0:
            raise JobDefinitionError(source, [f"more than {MAX_NODES} values (YAML aliases?)"])
        data = _plain(data)
        orjson.dumps(data)
    except RecursionError:
        raise JobDefinitionError(source, ["nested too deeply"]) from None
    except TypeError:
        problem = "only strings, numbers, booleans, null, lists and mappings with string keys are allowed"
        raise JobDefinitionError(source, [problem]) from None
    return data


def _count_nodes(obj: Any, budget: int) -> int:
    """Values left in ``budget`` after walking ``obj`` (stops early once it goes negative)."""
    budget -= 1
    if budget < 0:
        return budget
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    for child in children:
        budget = _count_nodes(child, budget)
        if budget < 0:
            break
    return budget


def _jobs(source: str, data: Any) -> list[Any]:
    jobs: Any = data
    if isinstance(data, dict) and "jobs" in data:
        extra = sorted(str(k) for k in data if k != "jobs")
        if extra:
            raise JobDefinitionError(source, [f"unexpected top-level keys next to jobs: {', '.join(extra)}"])
        jobs = data["jobs"]
        if not isinstance(jobs, list):
            raise JobDefinitionError(source, ["jobs: must be a list"])
    elif isinstance(data, dict):
        jobs = [data]
    elif not isinstance(data, list):
        raise JobDefinitionError(source, ["expected a job, a list of jobs, or a mapping with jobs:"])
    if not jobs:
        raise JobDefinitionError(source, ["no jobs defined"])
    return list(jobs)


def _validate(body: dict[str, Any], check_fields: bool) -> tuple[SubmitRequest | None, list[str]]:
    """Model validation, then AQuA's own rules (with AQuA error codes) on the body as it would be sent.

    When the model refuses the body, AQuA's rules run on the raw body and a model error is only listed when no
    AQuA message already names the same field.
    """
    try:
        request = SubmitRequest.model_validate(body)
    except ValidationError as exc:
        aqua = validate_submit(body, check_fields=check_fields)
        words = set(re.findall(r"\w+", " ".join(m for _, m in aqua)))
        model = [line for field, line in _pydantic_problems(exc) if field not in words]
        return None, [f"{m} (AQuA error {c})" for c, m in aqua] + model
    aqua = validate_submit(request.to_body(), check_fields=check_fields)
    return request, [f"{m} (AQuA error {c})" for c, m in aqua] + _session_problems(request)


def _session_problems(request: SubmitRequest) -> list[str]:
    """This pipeline's own rule: ``partner`` and ``project`` come together. AQuA takes one without the other and
    runs the job stateless, a full load every time, which is never what setting one of them asked for."""
    if request.version in ("1.1", "1.2") and bool(request.partner) != bool(request.project):
        given, missing = ("partner", "project") if request.partner else ("project", "partner")
        return [
            f"{given} is set without {missing}: AQuA would run the job stateless (a full load every time); set "
            f"both for a stateful session, or neither"
        ]
    return []


def load_job_definitions(path: Path, *, check_fields: bool = False) -> list[JobDefinition]:
    """Read a YAML or JSON job file and return :func:`parse_job_definitions` of it.

    Blocking file I/O: call it outside the event loop (or via ``asyncio.to_thread``).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise JobDefinitionError(path, [f"cannot read the file: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise JobDefinitionError(path, [f"the file is larger than {MAX_FILE_BYTES} bytes"])
    return parse_job_definitions(_load(path, raw), source=str(path), check_fields=check_fields)


def parse_job_definitions(data: Any, *, source: str, check_fields: bool = False) -> list[JobDefinition]:
    """Normalise and validate already-parsed job definitions (one job, a list, or ``{"jobs": [...]}``).

    Raises :class:`JobDefinitionError` naming ``source`` and listing every problem, one per line, each prefixed
    with the job's index and name. ``check_fields=True`` also checks objects and fields against the simulator's
    catalog (for the demo; a real tenant has other objects).
    """
    jobs = _jobs(source, _plain_data(source, data))
    problems: list[str] = []
    definitions: list[JobDefinition] = []
    seen_keys: dict[str, int] = {}
    for index, job in enumerate(jobs):
        label = f"job {index}"
        if not isinstance(job, dict):
            problems.append(f"{label}: must be a mapping")
            continue
        name = job.get("name")
        if isinstance(name, str) and name:
            shown = name if len(name) <= 40 and name.isprintable() else repr(name[:40]) + "..."
            label = f"job {index} ({shown})"
        job_problems: list[str] = []
        body, own = _body(job, job_problems)
        entity_ids = _entity_ids(own.get("entityIds"), job_problems)
        idempotency_key = _idempotency_key(own.get("idempotencyKey"), job_problems)
        if idempotency_key is not None:
            if idempotency_key in seen_keys:
                job_problems.append(f"idempotencyKey: also used by job {seen_keys[idempotency_key]}")
            seen_keys.setdefault(idempotency_key, index)
        request, checks = _validate(body, check_fields)
        job_problems.extend(checks)
        problems.extend(f"{label}: {p}" for p in job_problems)
        if request is not None and not job_problems:
            definitions.append(JobDefinition(request, entity_ids, idempotency_key, f"{source}#{index}"))
    if problems:
        raise JobDefinitionError(source, problems)
    log.debug("loaded %d job definitions from %s", len(definitions), source)
    return definitions
