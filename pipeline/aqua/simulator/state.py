"""The simulator's state (tokens, jobs, sessions, files) and its job engine.

Each job runs as an asyncio task owned by the :class:`Simulator` (cancelled on app cleanup). Stateful jobs of
one partner/project wait for the previous one's ``done`` event, so they run in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.aqua.simulator.clock import Clock
from pipeline.aqua.simulator.config import Faults, SimulatorConfig
from pipeline.aqua.simulator.data import FileSpec, Incremental, digest_sync, iter_file, text_size
from pipeline.aqua.simulator.jobs import ACTIVE, DEFAULT_API_VERSION, BatchState, JobState, Session
from pipeline.aqua.validation import (
    SIMULATOR_FORMATS,
    as_bool,
    is_stateful,
    normalise_version,
    parse_zoql,
    validate_submit,
)

log = logging.getLogger(__name__)


def new_id() -> str:
    """A fresh 32-hex AQuA id."""
    return secrets.token_hex(16)


class SubmitError(Exception):
    """A submit the simulator refuses with ``errorCode`` (HTTP 200, REFERENCE.md §3.6)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Token:
    expires_at: float
    uses: int = 0


class Simulator:
    """Everything the simulator knows; ``app[SIMULATOR_KEY]``. Tests may read and change it in-process."""

    def __init__(self, config: SimulatorConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or Clock()
        self.tokens: dict[str, Token] = {}
        self.jobs: dict[str, JobState] = {}
        self.sessions: dict[tuple[str, str], Session] = {}
        self.files: dict[str, FileSpec] = {}
        self.idempotency: dict[str, tuple[float, str, dict[str, Any]]] = {}
        self.idempotency_in_progress: set[str] = set()
        self.callback_log: list[dict[str, Any]] = []
        self.on_job_finished: Callable[[JobState], None] | None = None
        self._sizes: dict[str, int] = {}
        self._digests: dict[str, tuple[int, str, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.callback_tasks: set[asyncio.Task[None]] = set()

    @property
    def faults(self) -> Faults:
        return self.config.faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        self.config.faults = value

    # tokens -------------------------------------------------------------------------------------------
    def issue_token(self) -> tuple[str, int]:
        """A new bearer token and its ``expires_in``."""
        token = secrets.token_hex(16)
        self.tokens[token] = Token(self.clock.now() + self.config.token_ttl_s)
        return token, self.config.token_ttl_s - 1

    def check_token(self, token: str) -> bool:
        """True when the token is known and unexpired; counts the use (``expire_tokens_early`` fault)."""
        info = self.tokens.get(token)
        if info is None or info.expires_at <= self.clock.now():
            return False
        info.uses += 1
        if self.faults.expire_tokens_early and info.uses > 1:
            return False
        return True

    # submit -------------------------------------------------------------------------------------------
    def active_jobs(self, *, stateful: bool) -> int:
        """Stateful or stateless jobs in ``submitted``/``executing``: each kind has its own limit (REFERENCE.md §10)."""
        return sum(1 for j in self.jobs.values() if j.status in ACTIVE and j.stateful is stateful)

    def submit(self, body: dict[str, Any]) -> JobState:
        """Validate and start a job; raises :class:`SubmitError`."""
        errors = validate_submit(body, formats=SIMULATOR_FORMATS)
        if errors:
            raise SubmitError(*errors[0])
        stateful = is_stateful(body)
        if self.active_jobs(stateful=stateful) >= self.config.max_concurrent_jobs:
            raise SubmitError("90028", "The number of concurrent jobs exceeds the limit")
        session: Session | None = None
        queries = body.get("queries") or []
        reuse = False
        if stateful:
            key = (str(body["partner"]), str(body["project"]))
            session = self.sessions.get(key)
            if not queries:
                if session is None or not session.query_bodies:
                    raise SubmitError("90016", "There are no queries in the AQuA input")
                queries, reuse = session.query_bodies, True
            if session is None:
                session = self.sessions[key] = Session(*key)
        batches = [self._batch(q) for q in queries]
        version = normalise_version(body.get("version", "1.0")) or "1.0"
        job = JobState(
            id=new_id(),
            name=body.get("name"),
            version=version,
            format=str(body.get("format", "csv")).lower(),
            encrypted=str(body.get("encrypted") or "none").lower(),
            partner=body.get("partner") if stateful else body.get("partner") or None,
            project=body.get("project") if stateful else body.get("project") or None,
            notify_url=body.get("notifyUrl"),
            null_replacement=str(body.get("nullReplacement") or ""),
            use_query_labels=as_bool(body.get("useQueryLabels", False)),
            date_time_utc=as_bool(body.get("dateTimeUtc", False)),
            incremental_time=body.get("incrementalTime"),
            offset=int(body.get("offset") or 0),
            use_last_completed_job_queries=reuse,
            submitted_at=self.clock.now(),
            batches=batches,
        )
        if session is not None:
            job.wait_for = session.tail
            session.tail = job.done
            if not reuse:
                session.query_bodies = [dict(q) for q in queries]
        self.jobs[job.id] = job
        self._spawn(self._run(job, session))
        log.info("simulator: job %s submitted (%d queries, stateful=%s)", job.id, len(batches), stateful)
        return job

    def _batch(self, q: dict[str, Any]) -> BatchState:
        return BatchState(
            batch_id=new_id(),
            name=str(q["name"]),
            query=str(q["query"]),
            batch_type=str(q.get("type", "zoqlexport")).lower(),
            api_version=str(q.get("apiVersion") or DEFAULT_API_VERSION),
            parsed=parse_zoql(str(q["query"])),
            deleted=dict(q["deleted"]) if q.get("deleted") else None,
        )

    # engine -------------------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("simulator: task failed", exc_info=task.exception())

    async def close(self) -> None:
        """Cancel every job task and wait for them."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _step(self) -> None:
        await asyncio.sleep(self.config.step_delay_s)

    async def _run(self, job: JobState, session: Session | None) -> None:
        if job.wait_for is not None:
            await job.wait_for.wait()
        if job.finished:
            return
        await self._step()
        if job.finished:
            return
        job.status = "executing"
        job.start_time = self.clock.now()
        for batch in job.batches:
            batch.status = "executing"
            await self._step()
            if job.finished:
                return
            faults = self.faults
            if faults.error_jobs:
                job.error_code = "90029"
                job.message = "The job exceeded the maximum time in Processing and was set to Error."
                self.finish(job, "error")
                return
            if faults.abort_batches or (faults.abort_query is not None and faults.abort_query == batch.name):
                batch.status = "aborted"
                batch.message = faults.abort_message
                self.finish(job, "aborted")
                return
            odd = faults.batch_status_on_completed_job.get(batch.name or "")
            if odd is not None:
                batch.status = odd
                continue
            self._complete_batch(job, batch, session)
            batch.record_count += faults.record_count_offset
        await self._step()
        if not job.finished:
            self.finish(job, "completed")

    def _complete_batch(self, job: JobState, batch: BatchState, session: Session | None) -> None:
        cfg = self.config
        obj = batch.parsed.obj
        rows = cfg.rows_for(obj)
        deleted = batch.deleted
        signature = (batch.query, (deleted["column"], deleted.get("format", "Boolean")) if deleted else None)
        incremental: Incremental | None = None
        if session is not None:
            previous = session.queries.get(batch.name)
            stale = session.last_request_at and self.clock.now() - session.last_request_at > 180 * 86400
            if job.incremental_time or (previous == signature and not stale):
                changed = max(1, round(rows * cfg.incremental_change_ratio)) if rows else 0
                dels = round(rows * cfg.incremental_delete_ratio) if deleted else 0
                dels = min(changed, max(1, dels)) if deleted and changed else 0
                incremental = Incremental(rows, session.generation + 1, changed, dels, job.start_time or 0.0)
        base = {
            "obj": obj,
            "columns": batch.parsed.columns,
            "fmt": job.format,
            "labels": job.use_query_labels,
            "null": job.null_replacement,
            "utc": job.date_time_utc,
            "deleted_column": deleted["column"] if deleted else None,
            "deleted_format": deleted.get("format", "Boolean") if deleted else "Boolean",
            "entry_name": f"{batch.name}.{'tsv' if job.format == 'tsv' else 'csv'}",
            "created_at": self.clock.now(),
        }
        batch.full = incremental is None
        if incremental is not None:
            spec = FileSpec(new_id(), incremental=incremental, **base)  # type: ignore[arg-type]
            self.files[spec.file_id] = spec
            batch.file_id, batch.record_count = spec.file_id, spec.records
        elif session is not None and cfg.segmentation_enabled and rows > cfg.segment_records:
            batch.segments = []
            for start in range(0, rows, cfg.segment_records):
                end = min(rows, start + cfg.segment_records)
                spec = FileSpec(new_id(), start=start, end=end, **base)  # type: ignore[arg-type]
                self.files[spec.file_id] = spec
                batch.segments.append(spec.file_id)
            batch.record_count = rows
        else:
            spec = FileSpec(new_id(), start=0, end=rows, **base)  # type: ignore[arg-type]
            self.files[spec.file_id] = spec
            batch.file_id, batch.record_count = spec.file_id, rows
        batch.status = "completed"

    def finish(self, job: JobState, status: str) -> None:
        """Put ``job`` in a final state, update its session, fire its callback."""
        if job.finished:
            return
        job.status = status
        job.finished_at = self.clock.now()
        if status == "cancelled":
            for b in job.batches:
                if b.status != "completed":
                    b.status = "cancelled"
        key = (job.partner or "", job.project or "")
        session = self.sessions.get(key) if job.stateful else None
        if session is not None:
            session.last_request_at = self.clock.now()
            if status == "completed":
                session.generation += 1
                session.last_completed = job
                for b in job.batches:
                    d = b.deleted
                    session.queries[b.name] = (b.query, (d["column"], d.get("format", "Boolean")) if d else None)
        job.done.set()
        log.info("simulator: job %s %s", job.id, status)
        if self.on_job_finished is not None:
            self.on_job_finished(job)

    def cancel(self, job: JobState) -> bool:
        """Cancel a job that has not finished; False when it already has."""
        if job.finished:
            return False
        self.finish(job, "cancelled")
        return True

    async def wait_job(self, job_id: str) -> JobState:
        """Wait until the job has finished (for in-process tests and tools)."""
        job = self.jobs[job_id]
        await job.done.wait()
        return job

    async def settle_callbacks(self) -> None:
        """Wait until every scheduled callback delivery has finished (retries included)."""
        while self.callback_tasks:
            await asyncio.gather(*list(self.callback_tasks), return_exceptions=True)

    def last_completed(self, partner: str, project: str) -> JobState | None:
        session = self.sessions.get((partner, project))
        return session.last_completed if session else None

    # idempotency ---------------------------------------------------------------------------------------
    def remembered(self, key: str) -> tuple[str, dict[str, Any]] | None:
        """The request (method and path) and stored submit response of an ``Idempotency-Key`` seen in the last
        24 h."""
        hit = self.idempotency.get(key)
        if hit is None or hit[0] <= self.clock.now():
            self.idempotency.pop(key, None)
            return None
        return hit[1], hit[2]

    def remember(self, key: str, route: str, body: dict[str, Any]) -> None:
        self.idempotency[key] = (self.clock.now() + 24 * 3600, route, body)

    # files --------------------------------------------------------------------------------------------
    def file(self, file_id: str) -> FileSpec | None:
        """The file's spec while it is retained, else None."""
        spec = self.files.get(file_id)
        if spec is None or self.clock.now() - spec.created_at > self.config.file_retention_s:
            return None
        return spec

    def file_chunks(self, spec: FileSpec) -> Iterator[bytes]:
        """The stored bytes of a file (CSV/TSV, .gz or .zip), as a sync chunk iterator."""
        return iter_file(self.config.seed, spec, self.config.compress_level)

    async def file_size(self, spec: FileSpec) -> int:
        """The stored size; free for CSV/TSV, one compression pass (in a thread, cached) for gzip/zip."""
        size = self._sizes.get(spec.file_id)
        if size is None:
            if spec.fmt in ("csv", "tsv"):
                size = await asyncio.to_thread(text_size, self.config.seed, spec)
            else:
                size = (await self.digest(spec))[0]
            self._sizes[spec.file_id] = size
        return size

    async def digest(self, spec: FileSpec) -> tuple[int, str, int]:
        """``(size, sha256, records)`` of the stored bytes (streamed in a thread, cached)."""
        hit = self._digests.get(spec.file_id)
        if hit is None:
            hit = await asyncio.to_thread(digest_sync, self.config.seed, spec, self.config.compress_level)
            self._digests[spec.file_id] = hit
            self._sizes[spec.file_id] = hit[0]
        return hit


async def file_digest(sim: Simulator, file_id: str) -> tuple[int, str, int]:
    """``(size, sha256 hex, records)`` of a simulator file as stored, without holding it in memory."""
    spec = sim.files.get(file_id)
    if spec is None:
        raise KeyError(file_id)
    return await sim.digest(spec)


async def aiter_file(sim: Simulator, file_id: str) -> AsyncIterator[bytes]:
    """A simulator file's stored bytes as an async chunk iterator (each chunk generated in a thread)."""
    spec = sim.files.get(file_id)
    if spec is None:
        raise KeyError(file_id)
    chunks = sim.file_chunks(spec)
    while True:
        chunk = await asyncio.to_thread(next, chunks, None)
        if chunk is None:
            return
        yield chunk
