"""Several replicas: three ``aqua-pipeline serve`` subprocesses share one queue, table, bucket and topic.
AQuA's callbacks reach them through a round-robin balancer, every callback is delivered three times (the
simulator's ``duplicate_callbacks``), and on top of that the test sends each job's notifyUrl to all three
replicas at the same moment. Every job must land exactly once: one manifest, one object per file with the
simulator's bytes, one completion event."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from pipeline.aqua.simulator import SimulatorConfig
from pipeline.settings import Settings
from pipeline.testing.moto import MotoServer, free_port
from pipeline.testing.stack import running_stack
from tests.reliability.conftest import Fleet, audit, replica_settings, request, round_robin, wait_all_final


async def replicas_scenario(moto_url: str, fleet: Fleet, *, jobs: int, budget_s: float) -> None:
    deadline = time.monotonic() + budget_s
    ports = [free_port() for _ in range(3)]
    replicas = [f"http://127.0.0.1:{p}" for p in ports]
    balancer_port = free_port()

    def via_balancer(s: Settings) -> Settings:
        return s.model_copy(
            update={"http": s.http.model_copy(update={"public_base_url": f"http://127.0.0.1:{balancer_port}"})}
        )

    cfg = SimulatorConfig(rows={"Account": 300}, step_delay_s=0.01, max_concurrent_jobs=1000)
    cfg.faults.duplicate_callbacks = 2
    async with (
        # DynamoDB serialized (the fault proxy, for every replica): moto checks a transaction's conditions and
        # then writes, unlocked, so a worker's claim can land in between and be overwritten, which real
        # DynamoDB's transactions never allow; the receivers' batched callback counts made that window wide.
        running_stack(moto_url, sim_config=cfg, tweak=via_balancer, run_worker=False, atomic_dynamodb=True) as stack,
        round_robin(replicas, balancer_port),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
    ):
        await asyncio.gather(*(fleet.start(replica_settings(stack.settings, p, visibility_s=10)) for p in ports))

        statuses: list[int] = []
        fan_out_slots = asyncio.Semaphore(10)

        async def fan_out(notify_url: str, job_id: str) -> None:
            """Once AQuA has finished the job, the same callback hits every replica at once."""
            await stack.sim.wait_job(job_id)
            url = notify_url.replace("${JOBID}", job_id).replace("${STATUS}", "Completed")
            path = url.split("/", 3)[3]

            async def call(base: str) -> int:
                async with http.get(f"{base}/{path}") as resp:
                    return resp.status

            async with fan_out_slots:  # bounded, like a real tenant's callback rate; moto is one process
                statuses.extend(await asyncio.gather(*(call(r) for r in replicas)))

        submitted = await asyncio.gather(*(stack.submit(request(name=f"rep{i}")) for i in range(jobs)))
        job_ids = [s.job.id or "" for s in submitted]
        await asyncio.wait_for(
            asyncio.gather(*(fan_out(s.notify_url, j) for s, j in zip(submitted, job_ids, strict=True))),
            timeout=max(1.0, deadline - time.monotonic()),
        )
        assert statuses and all(s in (200, 202) for s in statuses), sorted(set(statuses))
        await wait_all_final(stack, job_ids, timeout_s=max(5.0, deadline - time.monotonic()), fleet=fleet)
        await stack.sim.settle_callbacks()
        log = stack.sim.callback_log
        assert len(log) >= 3 * jobs, "the simulator should have delivered every callback three times"
        result = await audit(stack, job_ids, event_quiet_s=3.0)
        assert result.lost == 0, result.row()
        assert result.objects == jobs
        assert result.duplicates == 0, result.row()
        print(f"replicas scenario: callbacks={len(log) + len(statuses)} {result.row()}")


async def test_three_replicas_thirty_jobs_duplicate_callbacks(moto_server: MotoServer, fleet: Fleet) -> None:
    await replicas_scenario(moto_server.url, fleet, jobs=30, budget_s=55)


@pytest.mark.slow
@pytest.mark.timeout(330)
async def test_three_replicas_two_hundred_jobs_duplicate_callbacks(moto_server: MotoServer, fleet: Fleet) -> None:
    await replicas_scenario(moto_server.url, fleet, jobs=200, budget_s=290)
