"""Graceful shutdown of a real ``python -m pipeline serve`` process: SIGTERM in the middle of a slow
multipart transfer either lets the transfer finish (long grace) or hands the job back to another replica
(short grace), and readiness fails as soon as the drain starts."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import ops
from pipeline.app import WORKER_KEY, Components, build_components, create_app
from pipeline.aqua.models import SubmitRequest
from pipeline.aqua.simulator import SimulatorConfig, file_digest
from pipeline.ledger import JobState, LedgerItem
from pipeline.metrics import Metrics
from pipeline.settings import Settings
from pipeline.testing.moto import MotoServer, free_port
from pipeline.testing.procs import ServiceProcess
from pipeline.testing.stack import Stack, running_stack, serve_app

MIB = 1024 * 1024
ROWS = 60_000  # ~5.5 MiB of CSV: two 5 MiB parts
TRICKLE = 1_500_000  # bytes/s on the wire (gzip): the download takes several seconds


def request() -> SubmitRequest:
    return SubmitRequest.model_validate(
        {
            "format": "csv",
            "version": "1.1",
            "name": "shutdown",
            "useQueryLabels": True,
            "queries": [{"name": "Account", "type": "zoqlexport", "query": "select * from Account"}],
        }
    )


def tuned(grace_s: float, drain_s: float) -> Callable[[Settings], Settings]:
    def tweak(s: Settings) -> Settings:
        return s.model_copy(
            update={
                "s3": s.s3.model_copy(update={"part_size": 5 * MIB, "parts_in_flight": 1}),
                "http": s.http.model_copy(update={"shutdown_grace_s": grace_s, "drain_delay_s": drain_s}),
                "reconciler": s.reconciler.model_copy(update={"enabled": False}),
                "queue": s.queue.model_copy(update={"visibility_timeout_s": 60}),
            }
        )

    return tweak


@dataclass
class Rig:
    stack: Stack
    c: Components
    tmp: Path

    def service(self, name: str) -> ServiceProcess:
        return ServiceProcess(self.stack.settings, self.tmp / f"{name}.log")

    def with_port(self, port: int) -> Settings:
        s = self.stack.settings
        return s.model_copy(update={"http": s.http.model_copy(update={"port": port})})

    async def uploads(self) -> list[dict[str, object]]:
        resp = await self.c.aws.s3.list_multipart_uploads(Bucket=self.stack.settings.s3.bucket)
        return list(resp.get("Uploads", []))

    async def wait_mid_transfer(self, job_id: str, timeout_s: float = 30) -> None:
        """Until the job is transferring and its multipart upload is open."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            item = await self.c.ledger.get(job_id)
            if item is not None and item.state == JobState.transferring and await self.uploads():
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("the transfer never started")

    async def wait_final(self, job_id: str, timeout_s: float = 60) -> LedgerItem:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            item = await self.c.ledger.get(job_id)
            if item is not None and item.state in (JobState.published, JobState.failed):
                return item
            await asyncio.sleep(0.1)
        raise TimeoutError(f"job {job_id} not final")

    async def assert_landed_once(self, item: LedgerItem) -> None:
        assert item.state == JobState.published, item
        assert item.manifest_key
        listed = await self.c.aws.s3.list_objects_v2(Bucket=self.stack.settings.s3.bucket)
        keys = [o["Key"] for o in listed.get("Contents", [])]
        manifests = [k for k in keys if "/_manifests/" in k]
        assert manifests == [item.manifest_key]
        manifest = await self.c.manifests.load(item.manifest_key)
        assert len(manifest.objects) == 1 and len(keys) == 2
        obj = manifest.objects[0]
        size, sha, records = await file_digest(self.stack.sim, obj.file_id)
        assert (obj.size, obj.sha256, obj.record_count) == (size, sha, records)
        assert size > 5 * MIB  # it really was a multipart transfer
        head = await self.c.aws.s3.head_object(Bucket=self.stack.settings.s3.bucket, Key=obj.key)
        assert head["ContentLength"] == size
        assert await self.uploads() == []
        events = await self.stack.drain_events(wait_s=0)
        assert [(e["type"], e["data"]["job_id"]) for e in events] == [("com.zuora.aqua.export.completed", item.job_id)]


@asynccontextmanager
async def rig(moto_server: MotoServer, tmp: Path, *, grace_s: float, drain_s: float) -> AsyncIterator[Rig]:
    cfg = SimulatorConfig(rows={"Account": ROWS}, step_delay_s=0.02)
    async with running_stack(moto_server.url, sim_config=cfg, start_service=False, tweak=tuned(grace_s, drain_s)) as st:
        async with AsyncExitStack() as es:
            c = await build_components(st.settings, es, Metrics())
            yield Rig(st, c, tmp)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
async def test_long_grace_lets_the_transfer_finish_in_the_same_process(moto_server: MotoServer, tmp_path: Path) -> None:
    async with rig(moto_server, tmp_path, grace_s=60, drain_s=1.0) as r:
        r.stack.sim.faults.trickle_bytes_per_s = TRICKLE
        svc = r.service("a").start()
        try:
            assert await asyncio.to_thread(_status, svc.url + "/readyz") == 200
            job_id = (await ops.submitter(r.c).submit(request())).job.id or ""
            await r.wait_mid_transfer(job_id)
            assert svc.proc is not None
            svc.proc.send_signal(15)
            # Readiness fails at once, while the listener still serves (the drain delay).
            statuses = [await asyncio.to_thread(_status, svc.url + "/readyz") for _ in range(3)]
            assert statuses == [503, 503, 503]
            assert await asyncio.to_thread(_status, svc.url + "/healthz") == 200
            rc = await asyncio.to_thread(svc.proc.wait, 60)
            assert rc == 0
            # It finished before the process exited: nothing left for anyone else to do.
            item = await r.c.ledger.get(job_id)
            assert item is not None
            await r.assert_landed_once(item)
            assert item.attempts == 1
            assert await r.c.queue.depth() == 0
        finally:
            svc.kill()


@pytest.mark.slow
async def test_short_grace_hands_the_job_back_to_another_replica(moto_server: MotoServer, tmp_path: Path) -> None:
    grace = 1.0
    async with rig(moto_server, tmp_path, grace_s=grace, drain_s=0) as r:
        r.stack.sim.faults.trickle_bytes_per_s = TRICKLE // 3
        first = r.service("first").start()
        second = ServiceProcess(r.with_port(free_port()), tmp_path / "second.log")
        try:
            job_id = (await ops.submitter(r.c).submit(request())).job.id or ""
            await r.wait_mid_transfer(job_id)
            assert first.proc is not None
            started = time.monotonic()
            first.proc.send_signal(15)
            rc = await asyncio.to_thread(first.proc.wait, 30)
            took = time.monotonic() - started
            assert rc == 0
            assert took < grace + 5, f"took {took:.1f}s to stop"
            log = (tmp_path / "first.log").read_text()
            assert "handing back 1 unfinished job" in log, log[-3000:]
            # Handed back: no open multipart upload, the lease released, the message visible again.
            assert await r.uploads() == []
            item = await r.c.ledger.get(job_id)
            assert item is not None and item.state == JobState.transferring
            assert item.lease_owner is None
            assert await r.c.queue.depth() == 1
            # Another replica picks it up and lands it exactly once.
            r.stack.sim.faults.trickle_bytes_per_s = None
            second.start()
            final = await r.wait_final(job_id)
            await r.assert_landed_once(final)
            assert final.attempts == 2
            assert second.terminate(timeout_s=30) == 0
        finally:
            first.kill()
            second.kill()


async def test_sigterm_when_idle_exits_promptly(moto_server: MotoServer, tmp_path: Path) -> None:
    async with rig(moto_server, tmp_path, grace_s=30, drain_s=0) as r:
        svc = r.service("idle").start()
        try:
            started = time.monotonic()
            rc = await asyncio.to_thread(svc.terminate, timeout_s=30)
            assert rc == 0
            assert time.monotonic() - started < 5  # no in-flight work: the grace period is not waited out
            assert "stopped" in (tmp_path / "idle.log").read_text()
        finally:
            svc.kill()


# -- fast, in-process versions of the same two scenarios (CI runs these; the subprocess ones are slow) ---------


@asynccontextmanager
async def in_process(moto_server: MotoServer, tmp: Path) -> AsyncIterator[Rig]:
    cfg = SimulatorConfig(rows={"Account": ROWS}, step_delay_s=0.02)
    tweak = tuned(30, 0)
    async with running_stack(moto_server.url, sim_config=cfg, tweak=tweak) as st:
        yield Rig(st, st.components, tmp)


async def test_worker_stop_lets_an_in_flight_transfer_finish(moto_server: MotoServer, tmp_path: Path) -> None:
    async with in_process(moto_server, tmp_path) as r:
        r.stack.sim.faults.trickle_bytes_per_s = TRICKLE * 2
        job_id = (await r.stack.submit(request())).job.id or ""
        await r.wait_mid_transfer(job_id)
        assert r.stack.app is not None
        worker = r.stack.app[WORKER_KEY]
        await worker.stop(30)
        assert worker.stopping and worker.in_flight == 0
        item = await r.c.ledger.get(job_id)
        assert item is not None
        await r.assert_landed_once(item)
        await worker.stop(30)  # idempotent: the app's cleanup calls it again


async def test_worker_stop_hands_back_what_cannot_finish(moto_server: MotoServer, tmp_path: Path) -> None:
    async with in_process(moto_server, tmp_path) as r:
        r.stack.sim.faults.trickle_bytes_per_s = TRICKLE // 3
        job_id = (await r.stack.submit(request())).job.id or ""
        await r.wait_mid_transfer(job_id)
        assert r.stack.app is not None
        await r.stack.app[WORKER_KEY].stop(0.2)
        assert await r.uploads() == []
        item = await r.c.ledger.get(job_id)
        assert item is not None and item.state == JobState.transferring and item.lease_owner is None
        assert await r.c.queue.depth() == 1
        # A second replica (same settings, its own clients) completes it exactly once.
        r.stack.sim.faults.trickle_bytes_per_s = None
        async with AsyncExitStack() as es:
            await serve_app(es, create_app(r.stack.settings, run_reconciler=False), free_port())
            final = await r.wait_final(job_id)
        await r.assert_landed_once(final)
        assert final.attempts == 2
