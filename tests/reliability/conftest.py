"""Shared pieces for the multi-process reliability scenarios: service replicas as real subprocesses, a
round-robin callback balancer, a watcher that checks every object ever visible under a final key, and the
final audit that checks the outcome on the data itself (S3 bytes vs the simulator, manifests, ledger,
events, DLQ, dangling multipart uploads)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pipeline.aqua.models import SubmitRequest
from pipeline.aqua.simulator import file_digest
from pipeline.ledger import JobState, LedgerItem
from pipeline.models import Manifest
from pipeline.settings import Settings
from pipeline.testing.moto import free_port
from pipeline.testing.procs import ServiceProcess
from pipeline.testing.stack import Stack, serve_app

MIB = 1024 * 1024


def request(name: str = "rel", queries: list[dict[str, Any]] | None = None, fmt: str = "csv") -> SubmitRequest:
    """A stateless AQuA export request."""
    return SubmitRequest.model_validate(
        {
            "format": fmt,
            "version": "1.1",
            "name": name,
            "useQueryLabels": True,
            "queries": queries
            or [{"name": "Account", "type": "zoqlexport", "query": "select Id, Name, Balance from Account"}],
        }
    )


def replica_settings(
    base: Settings,
    port: int,
    *,
    aws_endpoint: str | None = None,
    visibility_s: int = 30,
    concurrency: int = 4,
    max_receives: int = 5,
    part_size: int | None = None,
    reconciler: dict[str, Any] | None = None,
) -> Settings:
    """``base`` (the stack's settings, resources filled in) adapted for one service subprocess."""
    s3 = base.s3 if part_size is None else base.s3.model_copy(update={"part_size": part_size, "parts_in_flight": 2})
    aws = base.aws if aws_endpoint is None else base.aws.model_copy(update={"endpoint_url": aws_endpoint})
    return base.model_copy(
        update={
            "aws": aws,
            "s3": s3,
            "http": base.http.model_copy(update={"port": port, "shutdown_grace_s": 2}),
            "queue": base.queue.model_copy(
                update={
                    "visibility_timeout_s": visibility_s,
                    "concurrency": concurrency,
                    "max_receives": max_receives,
                    "wait_time_s": 1,
                }
            ),
            "reconciler": base.reconciler.model_copy(update=reconciler or {"enabled": False}),
        }
    )


@dataclass
class Fleet:
    """Service replicas as subprocesses; every one is killed at teardown."""

    log_dir: Path
    procs: list[ServiceProcess] = field(default_factory=list)
    starts: int = 0

    async def start(self, settings: Settings) -> ServiceProcess:
        """Start one more replica and wait until it is healthy."""
        self.starts += 1
        proc = ServiceProcess(settings, self.log_dir / f"svc-{settings.http.port}-{self.starts}.log")
        self.procs.append(proc)  # before it runs: teardown kills it even if the test stops mid-start
        await asyncio.to_thread(proc.start)
        return proc

    async def restart(self, proc: ServiceProcess) -> ServiceProcess:
        """Replace a dead replica with a fresh process on the same port."""
        self.procs.remove(proc)
        return await self.start(proc.settings)

    @property
    def live(self) -> list[ServiceProcess]:
        return [p for p in self.procs if p.running]

    def kill_all(self) -> None:
        for p in self.procs:
            p.kill()

    def logs(self) -> str:
        """Every replica's log, for failure messages."""
        return "\n".join(f"== {p}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.kill_all()


async def in_flight(proc: ServiceProcess) -> float:
    """The replica's ``aqua_jobs_in_flight`` gauge (jobs it is working on right now); 0 while it starts."""
    try:
        async with aiohttp.ClientSession() as http, http.get(proc.url + "/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientConnectionError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("aqua_jobs_in_flight"):
            return float(line.split()[-1])
    return 0.0


@asynccontextmanager
async def round_robin(backends: list[str], port: int | None = None) -> AsyncIterator[str]:
    """A tiny HTTP balancer: each request goes to the next backend in turn (retrying the next one on a
    connection error, like a load balancer's health-checked pool). Yields its base URL."""
    cycle = itertools.cycle(range(len(backends)))

    async with AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)))

        async def forward(request: web.Request) -> web.Response:
            body = await request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
            last: Exception | None = None
            for _ in backends:
                target = backends[next(cycle)]
                try:
                    async with session.request(
                        request.method, target + request.path_qs, headers=headers, data=body
                    ) as resp:
                        return web.Response(status=resp.status, body=await resp.read(), content_type=resp.content_type)
                except aiohttp.ClientConnectionError as exc:
                    last = exc
            return web.Response(status=502, text=f"no backend answered: {last}")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        yield await serve_app(stack, app, port or free_port())


@dataclass
class KeyWatcher:
    """Lists the bucket over and over while a scenario runs, recording the size of every object seen under a
    final (data) key; :meth:`check` then demands each sighting was the complete object."""

    stack: Stack
    interval_s: float = 0.2
    sightings: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    rounds: int = 0
    _task: asyncio.Task[None] | None = None

    async def _list_once(self) -> None:
        s3 = self.stack.clients.s3
        bucket = self.stack.settings.s3.bucket
        token: dict[str, str] = {}
        while True:
            resp = await s3.list_objects_v2(Bucket=bucket, **token)
            for obj in resp.get("Contents", []):
                if "/_manifests/" not in obj["Key"]:
                    self.sightings[obj["Key"]].add(int(obj["Size"]))
            if not resp.get("IsTruncated"):
                break
            token = {"ContinuationToken": resp["NextContinuationToken"]}
        self.rounds += 1

    async def _run(self) -> None:
        while True:
            await self._list_once()
            await asyncio.sleep(self.interval_s)

    def start(self) -> KeyWatcher:
        self._task = asyncio.create_task(self._run(), name="key-watcher")
        return self

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        await self._list_once()  # a job may have landed since the last round: every final object is sighted once

    def check(self, expected_sizes: dict[str, int]) -> int:
        """Every key ever seen is a key of some manifest, always at its full size; returns sightings checked."""
        assert self.rounds > 0
        for key, sizes in self.sightings.items():
            assert key in expected_sizes, f"object {key} is in no manifest"
            assert sizes == {expected_sizes[key]}, f"{key} was visible with sizes {sizes}, final {expected_sizes[key]}"
        return sum(len(s) for s in self.sightings.values())


async def wait_all_final(stack: Stack, job_ids: list[str], *, timeout_s: float, fleet: Fleet | None = None) -> None:
    """Wait until every job is published or failed in the ledger."""
    deadline = time.monotonic() + timeout_s
    pending = set(job_ids)
    while pending:
        if time.monotonic() > deadline:
            detail = fleet.logs() if fleet is not None else ""
            raise TimeoutError(f"{len(pending)} job(s) not final after {timeout_s}s: {sorted(pending)[:5]}\n{detail}")
        items = await asyncio.gather(*(stack.components.ledger.get(j) for j in pending))
        for item in items:
            if item is not None and item.state in (JobState.published, JobState.failed):
                pending.discard(item.job_id)
        if pending:
            await asyncio.sleep(0.3)


async def sha256_of(stack: Stack, key: str) -> tuple[int, str]:
    """Size and SHA-256 of a stored object, streamed."""
    obj = await stack.clients.s3.get_object(Bucket=stack.settings.s3.bucket, Key=key)
    sha = hashlib.sha256()
    size = 0
    async with obj["Body"] as body:
        while chunk := await body.read(MIB):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


async def collect_events(stack: Stack, *, quiet_s: float = 2.0, max_s: float = 60.0) -> list[dict[str, Any]]:
    """Drain the subscriber queue until it has been empty for ``quiet_s``."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + max_s
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        got = await stack.drain_events(wait_s=1)
        events.extend(got)
        if got:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            break
    return events


@dataclass
class Audit:
    """What the final check found; ``lost`` must be 0."""

    jobs: int = 0
    objects: int = 0
    events: int = 0
    duplicates: int = 0
    lost: int = 0
    manifests: dict[str, Manifest] = field(default_factory=dict)
    expected_sizes: dict[str, int] = field(default_factory=dict)
    items: dict[str, LedgerItem] = field(default_factory=dict)

    def row(self) -> str:
        return (
            f"jobs={self.jobs} objects={self.objects} events={self.events} "
            f"duplicates={self.duplicates} lost={self.lost}"
        )


async def audit(
    stack: Stack,
    job_ids: list[str],
    *,
    event_quiet_s: float = 2.0,
    check_bytes: Callable[[str], bool] = lambda key: True,
) -> Audit:
    """Check the data: each job published, one manifest, exactly one object per file with the simulator's
    bytes (SHA-256), no stray objects, no dangling multipart upload, an empty DLQ, one event (id) per job."""
    a = Audit(jobs=len(job_ids))
    s3 = stack.clients.s3
    bucket = stack.settings.s3.bucket
    ledger = stack.components.ledger
    manifests = stack.components.manifests
    for job_id in job_ids:
        item = await ledger.get(job_id)
        assert item is not None, job_id
        a.items[job_id] = item
        if item.state is not JobState.published or not item.manifest_key:
            a.lost += 1
            continue
        a.manifests[job_id] = await manifests.load(item.manifest_key)

    sem = asyncio.Semaphore(8)

    async def verify(manifest: Manifest) -> int:
        bad = 0
        for obj in manifest.objects:
            size, sha, records = await file_digest(stack.sim, obj.file_id or "")
            a.expected_sizes[obj.key] = obj.size
            ok = (obj.size, obj.sha256, obj.record_count) == (size, sha, records)
            if ok and check_bytes(obj.key):
                async with sem:
                    ok = await sha256_of(stack, obj.key) == (size, sha)
            bad += not ok
        return bad

    a.lost += sum(await asyncio.gather(*(verify(m) for m in a.manifests.values())))
    a.objects = sum(len(m.objects) for m in a.manifests.values())

    keys: list[str] = []
    token: dict[str, str] = {}
    while True:
        resp = await s3.list_objects_v2(Bucket=bucket, **token)
        keys.extend(o["Key"] for o in resp.get("Contents", []))
        if not resp.get("IsTruncated"):
            break
        token = {"ContinuationToken": resp["NextContinuationToken"]}
    data_keys = {k for k in keys if "/_manifests/" not in k}
    manifest_keys = {k for k in keys if "/_manifests/" in k}
    assert data_keys == set(a.expected_sizes), f"stray or missing objects: {data_keys ^ set(a.expected_sizes)}"
    assert manifest_keys == {i.manifest_key for i in a.items.values() if i.manifest_key}

    uploads = await s3.list_multipart_uploads(Bucket=bucket)
    assert not uploads.get("Uploads"), f"dangling multipart uploads: {[u['Key'] for u in uploads['Uploads']]}"

    dlq = await stack.clients.sqs.get_queue_attributes(
        QueueUrl=stack.resources.dlq_url, AttributeNames=["ApproximateNumberOfMessages"]
    )
    assert dlq["Attributes"]["ApproximateNumberOfMessages"] == "0", "messages in the DLQ"

    await stack.wait_drained(timeout_s=60)  # a duplicate set aside for later must not publish after the audit
    events = await collect_events(stack, quiet_s=event_quiet_s)
    a.events = len(events)
    per_job: dict[str, set[str]] = defaultdict(set)
    types: Counter[str] = Counter()
    for ev in events:
        per_job[ev["data"]["job_id"]].add(ev["id"])
        types[ev["type"]] += 1
    assert set(per_job) == set(job_ids), f"events for {set(per_job) ^ set(job_ids)} missing or unexpected"
    assert all(len(ids) == 1 for ids in per_job.values()), "two different events for one job"
    assert types == {"com.zuora.aqua.export.completed": len(events)}, types
    a.duplicates = len(events) - len(per_job)
    return a
