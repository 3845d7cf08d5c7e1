"""Lands one job: re-read it from AQuA, stream every result file into S3, commit the manifest, publish
the event, and move the ledger along. Safe to run again at any point: each step is idempotent and the
ledger's conditional transitions make sure only one replica works on a job at a time."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from pipeline.aqua.client import AquaClient
from pipeline.aqua.models import Batch, BatchStatus, Job, JobStatus
from pipeline.errors import AquaAuthError, AquaNotFound, IntegrityError, KeyCollision, PipelineError
from pipeline.events import EventPublisher, completed_event, failed_event
from pipeline.ledger import JobLedger, JobState, LeaseLost, LedgerItem
from pipeline.logs import bound, track_id_var
from pipeline.manifest import ManifestStore, object_key, sanitize
from pipeline.metrics import Metrics
from pipeline.models import CloudEvent, Manifest, ManifestObject
from pipeline.sessions import SessionRecord
from pipeline.settings import EventsSettings, S3Settings
from pipeline.transfer import S3Transfer, TransferSpec

log = logging.getLogger(__name__)

_KINDS = {"CSV": "csv", "TSV": "tsv", "GZIP": "gzip", "ZIP": "zip"}


class Outcome(StrEnum):
    """What happened to one work message."""

    PUBLISHED = "published"  # completed event published (now or earlier)
    FAILED = "failed"  # failure event published; the job will not be retried
    FAILED_FINAL = "failed_final"  # retryable error on the last allowed attempt: failure event, message to DLQ
    DUPLICATE = "duplicate"  # nothing to do: already finished
    BUSY = "busy"  # another replica holds the job's lease
    NOT_READY = "not_ready"  # AQuA says the job is still running
    RETRY = "retry"  # retryable error; try again later


@dataclass(frozen=True)
class ProcessResult:
    outcome: Outcome
    reason: str | None = None
    retry_after_s: float | None = None


def batch_records(batch: Batch, stored: list[ManifestObject]) -> int:
    """The records a batch landed: those counted in its files, or AQuA's ``recordCount`` when a file was not
    counted (a ZIP archive is stored unopened; so is every file with record and shape verification off)."""
    if any(o.record_count is None for o in stored):
        return batch.record_count or 0
    return sum(o.record_count or 0 for o in stored)


def file_extension(kind: str, store_gzip: bool) -> str:
    """Object key extension for a delivered file kind."""
    if kind in ("csv", "tsv"):
        return f"{kind}.gz" if store_gzip else kind
    return {"gzip": "csv.gz", "zip": "zip"}[kind]


def is_stateful(job: Job) -> bool:
    """Stateful mode: version 1.1/1.2 with both partner and project (REFERENCE.md §3.4)."""
    return bool(job.partner and job.project and job.version in ("1.1", "1.2"))


def key_names(batches: Sequence[Batch]) -> list[str]:
    """The name each batch's objects are keyed by: its own, unless two names sanitise to one path segment
    ("Account Export" and "Account/Export" both become ``Account_Export``); those get a hash of the name too."""
    names = [b.name or b.batch_id or "batch" for b in batches]
    segments = Counter(sanitize(n) for n in set(names))
    return [f"{n}_{hashlib.sha256(n.encode()).hexdigest()[:8]}" if segments[sanitize(n)] > 1 else n for n in names]


def job_date(job: Job) -> str:
    """A date for object keys that is the same on every retry: the job's start date, as AQuA reports it."""
    if job.start_time and len(job.start_time) >= 10:
        return job.start_time[:10]
    return "undated"


def start_instant(value: str | None) -> datetime | None:
    """AQuA's ``startTime`` as a datetime (``2014-09-03 08:20:07``, or ISO with an offset such as
    ``2021-01-18T17:13:48+0000``, REFERENCE.md §4), or None if absent or in neither form."""
    if not value:
        return None
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S"):
        try:
            return datetime.strptime(value.strip(), fmt)
        except ValueError:
            continue
    return None


class JobProcessor:
    """Runs aqua -> transfer -> manifest -> events -> ledger for one job."""

    def __init__(
        self,
        *,
        aqua: AquaClient,
        transfer: S3Transfer,
        manifests: ManifestStore,
        publisher: EventPublisher,
        ledger: JobLedger,
        s3_settings: S3Settings,
        events_settings: EventsSettings,
        metrics: Metrics,
    ) -> None:
        self.aqua = aqua
        self.transfer = transfer
        self.manifests = manifests
        self.publisher = publisher
        self.ledger = ledger
        self.s3 = s3_settings
        self.events = events_settings
        self.metrics = metrics

    async def process(self, job_id: str, *, owner: str, lease_s: float, final_attempt: bool) -> ProcessResult:
        """Take the job as far as it can go; never raises for a job-level problem."""
        with bound(job_id=job_id):
            item = await self.ledger.get(job_id)
            if item is not None and item.done:
                log.info("job already %s; nothing to do", item.state)
                return ProcessResult(Outcome.DUPLICATE)
            claimed = await self.ledger.claim(job_id, owner, lease_s)
            if claimed is None:
                log.info("job is leased by another worker")
                return ProcessResult(Outcome.BUSY, retry_after_s=lease_s)
            try:
                try:
                    return await self._run(claimed, owner, lease_s)
                except LeaseLost:
                    raise
                except PipelineError as exc:
                    # Refused credentials are the service's trouble, not the job's: it waits (within the retry
                    # window) for an operator to fix them, rather than failing every job meanwhile.
                    refused = isinstance(exc, AquaAuthError)
                    if (exc.retryable or refused) and not final_attempt:
                        if refused:
                            log.error("AQuA refused the service's credentials; the job will be tried again: %s", exc)
                        else:
                            log.warning("retryable failure: %s", exc)
                        await self.ledger.release(job_id, owner)
                        # a server's Retry-After (AquaRateLimited) outlives this attempt: the message waits for it
                        wait = getattr(exc, "retry_after", None)
                        return ProcessResult(Outcome.RETRY, reason=exc.reason, retry_after_s=wait)
                    log.error("job failed: %s", exc)
                    await self._fail(
                        job_id, owner, reason=exc.reason, message=str(exc), job=None, lease_s=lease_s, item=claimed
                    )
                    outcome = Outcome.FAILED_FINAL if exc.retryable else Outcome.FAILED
                    return ProcessResult(outcome, reason=exc.reason)
                except Exception as exc:
                    # A bug, or an answer no model expects (say, a job body pydantic refuses): retried like a
                    # transient failure, and failed loudly on the last attempt, so the job (and a stateful session
                    # it holds) is not left half-done for the reconciler to re-drive into the same error forever.
                    log.exception("job %s: unexpected error", job_id)
                    if not final_attempt:
                        await self.ledger.release(job_id, owner)
                        return ProcessResult(Outcome.RETRY, reason="internal_error")
                    message = f"unexpected error: {type(exc).__name__}: {str(exc)[:300]}"
                    await self._fail(
                        job_id, owner, reason="internal_error", message=message, job=None, lease_s=lease_s, item=claimed
                    )
                    return ProcessResult(Outcome.FAILED_FINAL, reason="internal_error")
            except LeaseLost as exc:
                # Another worker owns the job now (our lease expired): it finishes the job; we publish nothing.
                log.warning("lost the job's lease; leaving it to its new owner: %s", exc)
                return ProcessResult(Outcome.BUSY, retry_after_s=lease_s)

    async def _run(self, item: LedgerItem, owner: str, lease_s: float) -> ProcessResult:
        job_id = item.job_id
        if item.state == JobState.stored and item.manifest_key:
            log.info("resuming after a crash: manifest already stored, publishing")
            return await self._complete(job_id, item.manifest_key, None, owner, lease_s, stored=True)
        try:
            job = await self.aqua.get_job(job_id, track_id=track_id_var.get())
        except AquaNotFound as exc:
            await self._fail(
                job_id, owner, reason="unknown_job", message=str(exc), job=None, lease_s=lease_s, item=item
            )
            return ProcessResult(Outcome.FAILED, reason="unknown_job")
        status = job.job_status
        if not job.finished:
            log.info("AQuA reports job still %s; will look again", job.status)
            await self.ledger.release(job_id, owner)
            return ProcessResult(Outcome.NOT_READY, retry_after_s=30)
        if status != JobStatus.COMPLETED:
            message = "; ".join(f"{b.name}: {b.message}" for b in job.batches if b.message) or (job.message or "")
            await self._fail(job_id, owner, reason=f"job_{job.status}", message=message, job=job, lease_s=lease_s)
            return ProcessResult(Outcome.FAILED, reason=f"job_{job.status}")
        unfinished = [b for b in job.batches if (b.status or "").lower() != BatchStatus.COMPLETED]
        if unfinished:
            # AQuA says completed, yet a batch did not complete: landing the rest as a success would drop it unseen.
            message = "AQuA reports the job completed, but " + "; ".join(
                f"batch {b.name} is {b.status}" + (f" ({b.message})" if b.message else "") for b in unfinished
            )
            log.error("%s", message)
            await self._fail(job_id, owner, reason="batch_not_completed", message=message, job=job, lease_s=lease_s)
            return ProcessResult(Outcome.FAILED, reason="batch_not_completed")
        if not await self._hold_session(job):
            log.info("stateful session %s/%s is busy with another job; will retry", job.partner, job.project)
            await self.ledger.release(job_id, owner)
            return ProcessResult(Outcome.BUSY)
        await self.ledger.mark_transferring(job_id, owner)
        objects: list[ManifestObject] = []
        records = 0
        keys: set[str] = set()
        for batch, name in zip(job.batches, key_names(job.batches), strict=True):
            stored = await self._store_batch(job, batch, name, keys)
            objects.extend(stored)
            records += batch_records(batch, stored)
        manifest = Manifest(
            job_id=job_id,
            job_name=job.name,
            status="completed",
            partner=job.partner,
            project=job.project,
            format=job.format,
            stateful=is_stateful(job),
            start_time=job.start_time,
            record_count=records,
            total_bytes=sum(o.size for o in objects),
            objects=objects,
        )
        key, created = await self.manifests.commit(manifest)
        if not created:
            log.info("manifest %s already committed by an earlier attempt; using it", key)
        return await self._complete(job_id, key, manifest if created else None, owner, lease_s, stored=False)

    async def _store_batch(self, job: Job, batch: Batch, key_name: str, keys: set[str]) -> list[ManifestObject]:
        """Stream each of ``batch``'s files into S3; ``keys`` holds the job's keys so far (none is used twice)."""
        kind = _KINDS.get((job.format or "CSV").upper(), "csv")
        file_ids = batch.file_ids
        if not file_ids:
            if batch.record_count:
                raise PipelineError(f"batch {batch.name} completed with {batch.record_count} records but no file id")
            return []
        store_gzip = self.s3.store_csv_gzip and kind in ("csv", "tsv")
        segmented = bool(batch.segments)
        out = []
        deleted_column = None
        if batch.deleted is not None and not isinstance(batch.deleted, list):
            deleted_column = batch.deleted.column
        for index, file_id in enumerate(file_ids, start=1):
            with bound(batch_id=batch.batch_id):
                key = object_key(
                    self.s3.key_template,
                    prefix=self.s3.prefix,
                    partner=job.partner,
                    project=job.project,
                    job_name=job.name or "job",
                    date=job_date(job),
                    job_id=job.id or "",
                    batch_name=key_name,
                    segment=index if segmented else None,
                    ext=file_extension(kind, store_gzip),
                )
                if key in keys:
                    # e.g. two batches with one name: the second would overwrite the first's object unseen
                    raise KeyCollision(f"batch {batch.name}: object key {key} is already used by this job")
                keys.add(key)
                expected = None if segmented else batch.record_count
                spec = TransferSpec(
                    bucket=self.s3.bucket,
                    key=key,
                    kind=kind,  # type: ignore[arg-type]
                    expected_records=expected,
                    metadata={
                        "aqua-job-id": job.id or "",
                        "aqua-batch-id": batch.batch_id or "",
                        "aqua-file-id": file_id,
                        "aqua-record-count": str(batch.record_count),
                    },
                    store_gzip=store_gzip,
                )
                started = time.monotonic()
                async with self.aqua.open_file(
                    file_id, accept_gzip=kind in ("csv", "tsv"), track_id=track_id_var.get()
                ) as source:
                    stored = await self.transfer.store(source, spec)
                self.metrics.transfer_seconds.observe(time.monotonic() - started)
                self.metrics.bytes.inc(stored.size)
                if stored.record_count:
                    self.metrics.records.inc(stored.record_count)
                log.info("stored %s (%d bytes, %s records)", key, stored.size, stored.record_count)
                out.append(
                    ManifestObject(
                        bucket=stored.bucket,
                        key=stored.key,
                        size=stored.size,
                        sha256=stored.sha256,
                        record_count=stored.record_count,
                        batch_id=batch.batch_id,
                        batch_name=batch.name,
                        query=batch.query,
                        file_id=file_id,
                        segment=index if segmented else None,
                        full=batch.full,
                        deleted_column=deleted_column,
                        content_type=stored.content_type,
                        content_encoding=stored.content_encoding,
                    )
                )
        counted = all(o.record_count is not None for o in out)
        if not counted:
            log.info("batch %s: records not counted (%s file), AQuA reports %s", batch.name, kind, batch.record_count)
        elif segmented and self.s3.verify_record_count:
            total = sum(o.record_count or 0 for o in out)
            if total != batch.record_count:
                raise IntegrityError(
                    f"batch {batch.name}: segments hold {total} records, AQuA reported {batch.record_count}"
                )
        return out

    async def _hold_session(self, job: Job) -> bool:
        """Stateful jobs of one (partner, project) are landed one at a time, in the order AQuA ran them.

        The job that holds the session lands whatever the line says (an earlier job may join the line late: a
        submit resumed after its submitter died); a session left held by a job that has since finished (or
        vanished) is taken over.
        """
        if not is_stateful(job) or not job.id:
            return True
        partner, project = job.partner or "", job.project or ""
        session = await self.ledger.get_session(partner, project)
        if session is not None and session.holder_job_id == job.id:
            return await self.ledger.acquire_session(partner, project, job.id)
        if session is not None and not await self._first_in_line(session, job):
            return False
        if await self.ledger.acquire_session(partner, project, job.id):
            return True
        session = await self.ledger.get_session(partner, project)
        holder = session.holder_job_id if session else None
        if holder and holder != job.id:
            item = await self.ledger.get(holder)
            if item is None or item.done:
                log.warning("taking over session %s/%s from finished job %s", partner, project, holder)
                await self.ledger.release_session(partner, project, holder)
                return await self.ledger.acquire_session(partner, project, job.id)
        return False

    async def _first_in_line(self, session: SessionRecord, job: Job) -> bool:
        """False while a job submitted to the session before ``job`` has not landed and AQuA ran it first: it
        lands first, whatever delayed it here (a retry, a slower worker, a late callback). A job this service did
        not submit has no place in the line. An earlier job the ledger has as done, or no longer has, is taken
        out of the line (it ended without saying so, e.g. a crash just after it landed)."""
        line = session.pending
        job_id = job.id or ""
        if job_id not in line:
            return True
        mine = (line[job_id], job_id)
        for _, earlier in sorted((line[other], other) for other in line if (line[other], other) < mine):
            item = await self.ledger.get(earlier)
            if item is None or item.done:
                await self.ledger.remove_session_job(session.partner, session.project, earlier)
                continue
            if await self._ran_before(earlier, job):
                log.info(
                    "session %s/%s: waiting for job %s, run before this one", session.partner, session.project, earlier
                )
                return False
        return True

    async def _ran_before(self, earlier_id: str, job: Job) -> bool:
        """Whether AQuA ran ``earlier_id`` before the finished ``job``. AQuA runs a session's jobs one at a time,
        in the order it got them (REFERENCE.md §9): one it has not finished, or started later, came after ``job``,
        whatever the submit times on our side say (two replicas submitting at once, a submit slowed by retries).
        When AQuA cannot tell (no start times to compare), the submit order stands."""
        try:
            other = await self.aqua.get_job(earlier_id, track_id=track_id_var.get())
        except AquaNotFound:
            return False  # it will fail as an unknown job; nothing to wait for
        if not other.finished:
            return False
        mine, theirs = start_instant(job.start_time), start_instant(other.start_time)
        if mine is None or theirs is None:
            return True
        try:
            return theirs <= mine
        except TypeError:  # one with an offset, one without: not comparable
            return True

    async def _end_session(self, job_id: str, partner: str | None, project: str | None, start: str | None) -> None:
        if partner and project:
            if start is not None:
                await self.ledger.record_session_completion(partner, project, job_id, start)
            await self.ledger.remove_session_job(partner, project, job_id)
            await self.ledger.release_session(partner, project, job_id)

    async def _complete(
        self, job_id: str, key: str, manifest: Manifest | None, owner: str, lease_s: float, *, stored: bool
    ) -> ProcessResult:
        """Mark the job ``stored`` (unless ``stored``) and publish it; ``manifest`` None: load it from ``key``.

        Its manifest is committed, the commit marker readers wait for, and its completion event may be out
        already, so it can no longer fail: any error but a lost lease leaves the job as it is and the message
        retried (after the last attempt, the reconciler re-drives it), publishing again under the same event id."""
        try:
            if manifest is None:
                manifest = await self.manifests.load(key)
            if not stored:
                await self.ledger.mark_stored(
                    job_id,
                    owner,
                    manifest_key=key,
                    record_count=manifest.record_count,
                    total_bytes=manifest.total_bytes,
                )
            return await self._publish(manifest, key, owner, lease_s)
        except LeaseLost:
            raise
        except PipelineError as exc:
            log.warning("stored job not published (%s); will retry", exc)
            reason = exc.reason
        except Exception:
            log.exception("stored job not published: unexpected error; will retry")
            reason = "internal_error"
        with contextlib.suppress(PipelineError):  # else the lease runs out
            await self.ledger.release(job_id, owner)
        return ProcessResult(Outcome.RETRY, reason=reason)

    async def _publish(self, manifest: Manifest, key: str, owner: str, lease_s: float) -> ProcessResult:
        event = completed_event(manifest, source=self.events.source, manifest_bucket=self.s3.bucket, manifest_key=key)
        if not await self.ledger.hold_for_event(manifest.job_id, owner, lease_s, failure=False):
            raise LeaseLost(f"job {manifest.job_id}: lease lost before publishing")
        await self._announce(event, lambda: self.ledger.mark_published(manifest.job_id, owner, event_id=event.id))
        if manifest.stateful:
            try:
                await self._end_session(manifest.job_id, manifest.partner, manifest.project, manifest.start_time)
            except PipelineError as exc:  # the job is published all the same; the next job takes the session over
                log.warning("published, but the stateful session could not be closed: %s", exc)
        self.metrics.jobs.labels("published").inc()
        log.info("job published: %d objects, %d records", len(manifest.objects), manifest.record_count)
        return ProcessResult(Outcome.PUBLISHED)

    async def _fail(
        self,
        job_id: str,
        owner: str,
        *,
        reason: str,
        message: str,
        job: Job | None,
        lease_s: float,
        item: LedgerItem | None = None,
    ) -> None:
        """Publish the job's failure event and mark it failed. Without AQuA's ``job`` (a failure raised part way),
        its name, partner and project come from the ledger ``item``, so subscribers that filter on them see it."""
        event = failed_event(
            job_id,
            source=self.events.source,
            reason=reason,
            message=message,
            aqua_status=job.status if job else None,
            job_name=job.name if job else item.job_name if item else None,
            partner=job.partner if job else item.partner if item else None,
            project=job.project if job else item.project if item else None,
        )
        if not await self.ledger.hold_for_event(job_id, owner, lease_s, failure=True):
            # lost the lease, or the job is stored (its completion event may be out): no failure event
            raise LeaseLost(f"job {job_id}: lease lost, or job stored, before publishing its failure")
        await self._announce(
            event,
            lambda: self.ledger.mark_failed(job_id, owner, reason=reason, message=message[:1000], event_id=event.id),
        )
        if job is not None and is_stateful(job):
            await self._end_session(job_id, job.partner, job.project, None)
        self.metrics.jobs.labels("failed").inc()

    async def _announce(self, event: CloudEvent, record: Callable[[], Awaitable[object]]) -> None:
        """Send ``event``, then ``record`` it in the ledger, as one step a cancellation (the heartbeat stopping the
        job's work, a shutdown) does not cut in two: an event sent that the ledger does not know of is sent again,
        a duplicate, by the next worker. If the caller is cancelled meanwhile, the step still finishes, and the
        cancellation waits for it."""
        step = asyncio.ensure_future(self._send_and_record(event, record))
        try:
            await asyncio.shield(step)
        except asyncio.CancelledError:
            # Finish first (the worker hands the message and the lease back once this returns: released before
            # the record, the lease would make the record fail), then let the cancellation through.
            try:
                await step
            except Exception as exc:
                log.warning("event step failed after its job's work was stopped: %s", exc)
            raise

    async def _send_and_record(self, event: CloudEvent, record: Callable[[], Awaitable[object]]) -> None:
        await self._send(event)
        await record()

    async def _send(self, event: CloudEvent) -> None:
        await self.publisher.publish(event)
        self.metrics.events.labels(event.type).inc()
