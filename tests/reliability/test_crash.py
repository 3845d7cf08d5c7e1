"""Crash mid-transfer: replicas (real ``aqua-pipeline serve`` subprocesses) are killed with SIGKILL at random
points of multi-part transfers, over and over; the survivors (and the restarted processes) finish every job.

Checked on the data: each job lands exactly once (one object per file, the simulator's bytes), no partial
object is ever visible under a final key (the bucket is listed all along), no multipart upload is left
dangling once the jobs are done (the next attempt aborts the killed one's upload, see
``S3Transfer.abort_stale_uploads``), one completion event id per job, nothing in the DLQ.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass

import pytest

from pipeline.aqua.simulator import SimulatorConfig
from pipeline.ledger import JobState
from pipeline.settings import Settings
from pipeline.testing.moto import MotoServer, free_port
from pipeline.testing.stack import Stack, running_stack
from tests.reliability.conftest import (
    MIB,
    Fleet,
    KeyWatcher,
    audit,
    in_flight,
    replica_settings,
    request,
    round_robin,
    wait_all_final,
)

BIG_QUERY = [{"name": "Invoice", "type": "zoqlexport", "query": "select * from Invoice"}]
ROWS = 150_000  # ~29 MiB of CSV: six 5 MiB parts


@dataclass
class CrashReport:
    kills: int = 0
    jobs: int = 0


async def _transferring(stack: Stack, job_ids: list[str]) -> list[str]:
    """Unfinished jobs now in ``transferring`` with a multipart upload open."""
    uploads = await stack.clients.s3.list_multipart_uploads(Bucket=stack.settings.s3.bucket)
    open_keys = [u["Key"] for u in uploads.get("Uploads", [])]
    out = []
    for job_id in job_ids:
        item = await stack.components.ledger.get(job_id)
        if item is not None and item.state is JobState.transferring and any(job_id in k for k in open_keys):
            out.append(job_id)
    return out


async def crash_scenario(
    moto_url: str, fleet: Fleet, *, kills: int, parallel_jobs: int, replicas: int, seed: int, budget_s: float
) -> CrashReport:
    rng = random.Random(int(os.environ.get("RELIABILITY_SEED", seed)))
    ports = [free_port() for _ in range(replicas)]
    balancer_port = free_port()

    def via_balancer(s: Settings) -> Settings:
        # max_receives is high on purpose (it sets the queue's redrive policy): a job killed five times in a row
        # would otherwise go to the DLQ and wait for the reconciler's stuck_after_s (see docs/reliability.md).
        return s.model_copy(
            update={
                "http": s.http.model_copy(update={"public_base_url": f"http://127.0.0.1:{balancer_port}"}),
                "queue": s.queue.model_copy(update={"max_receives": 100}),
            }
        )

    cfg = SimulatorConfig(rows={"Invoice": ROWS}, step_delay_s=0.02)
    cfg.faults.trickle_bytes_per_s = 4 * MIB  # a transfer takes a few seconds: room for a kill
    deadline = time.monotonic() + budget_s
    report = CrashReport()
    async with (
        running_stack(moto_url, sim_config=cfg, tweak=via_balancer, run_worker=False) as stack,
        round_robin([f"http://127.0.0.1:{p}" for p in ports], balancer_port),
    ):
        for port in ports:
            # One job per replica, so a kill hits one job.
            settings = replica_settings(
                stack.settings, port, visibility_s=5, concurrency=1, max_receives=100, part_size=5 * MIB
            )
            await fleet.start(settings)
        watcher = KeyWatcher(stack).start()
        job_ids: list[str] = []
        unfinished: list[str] = []
        restarts: list[asyncio.Task[object]] = []
        try:
            while report.kills < kills:
                assert time.monotonic() < deadline, f"only {report.kills} kills in {budget_s}s\n{fleet.logs()}"
                unfinished = [
                    j
                    for j in unfinished
                    if (i := await stack.components.ledger.get(j)) is None
                    or i.state not in (JobState.published, JobState.failed)
                ]
                while len(unfinished) < parallel_jobs:
                    sub = await stack.submit(request(name=f"crash{len(job_ids)}", queries=BIG_QUERY))
                    job_ids.append(sub.job.id or "")
                    unfinished.append(sub.job.id or "")
                if not await _transferring(stack, unfinished):
                    await asyncio.sleep(0.1)
                    continue
                await asyncio.sleep(rng.uniform(0, 2.5))  # a random point of the transfer (or just after it)
                busy = [p for p in fleet.live if await in_flight(p) > 0]
                if not busy:
                    continue
                victim = rng.choice(busy)
                victim.kill()
                report.kills += 1
                restarts.append(asyncio.create_task(fleet.restart(victim)))  # the others keep working meanwhile
            await asyncio.gather(*restarts)
            await wait_all_final(stack, job_ids, timeout_s=max(30.0, deadline - time.monotonic()), fleet=fleet)
        finally:
            await watcher.stop()
        result = await audit(stack, job_ids)
        assert result.lost == 0, result.row()
        seen = watcher.check(result.expected_sizes)
        assert seen >= len(result.expected_sizes)
        report.jobs = len(job_ids)
        print(f"crash scenario: kills={report.kills} {result.row()} sightings={seen}")
        return report


async def test_kill_9_mid_transfer_three_times(moto_server: MotoServer, fleet: Fleet) -> None:
    report = await crash_scenario(moto_server.url, fleet, kills=3, parallel_jobs=1, replicas=2, seed=7, budget_s=55)
    assert report.kills == 3


@pytest.mark.slow
@pytest.mark.timeout(330)
async def test_kill_9_mid_transfer_twenty_four_times(moto_server: MotoServer, fleet: Fleet) -> None:
    report = await crash_scenario(moto_server.url, fleet, kills=24, parallel_jobs=3, replicas=3, seed=11, budget_s=290)
    assert report.kills == 24
