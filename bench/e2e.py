"""End-to-end latency: from the simulator's callback to the completion event on an SQS subscriber queue,
through the whole local deployment (``pipeline.testing.stack.running_stack``: simulator, service with its
worker, moto). One small job several times, then a burst of concurrent small jobs; each with the worker's
long-poll ``wait_time_s`` at 1 s (as in ``running_stack``) and at the production default (10 s), and with
``--token-callbacks-at worker,receiver`` each where token callbacks are checked against the ledger (the default:
as shipped), interleaved.

    python -m bench.e2e --repeat 5 --burst 100
    python -m bench.e2e --repeat 5 --burst 100 --wait-times 1 --token-callbacks-at worker,receiver
    python -m bench.e2e --quick
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from typing import Any

import orjson

from bench.common import command_line, machine, median, moto, percentile, table, write_results
from pipeline.aqua.models import SubmitRequest
from pipeline.aqua.simulator import SimulatorConfig
from pipeline.settings import LedgerSettings, QueueSettings, Settings
from pipeline.testing.stack import Stack, running_stack

SMALL = SubmitRequest.model_validate(
    {
        "format": "csv",
        "version": "1.1",
        "name": "bench-e2e",
        "useQueryLabels": True,
        "queries": [{"name": "Account", "type": "zoqlexport", "query": "select Id, Name, Balance from Account"}],
    }
)


async def _events(stack: Stack, want: set[str], timeout_s: float) -> dict[str, float]:
    """Receive completion events until every job in ``want`` has one; returns job id -> receipt time."""
    url = stack.resources.subscriber_queue_url
    assert url
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while want - seen.keys():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(want - seen.keys())} events missing after {timeout_s}s")
        resp = await stack.clients.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        now = time.time()
        for m in resp.get("Messages", []):
            body = orjson.loads(m["Body"])
            event = orjson.loads(body["Message"]) if "Message" in body and "Type" in body else body
            job_id = event.get("data", {}).get("job_id")
            if job_id in want and job_id not in seen:
                seen[job_id] = now
            await stack.clients.sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    return seen


def _callback_times(stack: Stack) -> dict[str, float]:
    """First answered callback per job (the simulator logs each attempt when the receiver has answered)."""
    out: dict[str, float] = {}
    for entry in stack.sim.callback_log:
        if entry.get("status") and entry["job_id"] not in out:
            out[entry["job_id"]] = float(entry["time"])
    return out


async def _round(stack: Stack, jobs: int, timeout_s: float) -> dict[str, Any]:
    started = time.time()
    submitted = await asyncio.gather(*(stack.submit(SMALL) for _ in range(jobs)))
    ids = {s.job.id or "" for s in submitted}
    events = await _events(stack, ids, timeout_s)
    finished = max(events.values())
    callbacks = _callback_times(stack)
    latencies = [events[j] - callbacks[j] for j in ids if j in callbacks]
    return {
        "jobs": jobs,
        "latencies_s": latencies,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "max_s": max(latencies),
        "jobs_per_s": jobs / (finished - min(callbacks[j] for j in ids)),
        "submit_to_last_event_s": finished - started,
    }


def _tweak(wait_s: int, at: str) -> Any:
    def tweak(s: Settings) -> Settings:
        q: QueueSettings = s.queue.model_copy(update={"wait_time_s": wait_s})
        return s.model_copy(update={"queue": q, "ledger": s.ledger.model_copy(update={"token_callbacks_at": at})})

    return tweak


async def _scenario(moto_url: str, wait_s: int, at: str, repeat: int, burst: int) -> list[dict[str, Any]]:
    # AQuA caps a tenant at 50 concurrent jobs (error 90028); the burst needs more, so the simulator allows it.
    sim = SimulatorConfig(step_delay_s=0.02, rows={"Account": 100}, max_concurrent_jobs=max(50, burst + 10))
    out: list[dict[str, Any]] = []
    async with running_stack(moto_url, sim_config=sim, tweak=_tweak(wait_s, at)) as stack:
        await _round(stack, 1, 60)  # warm up: connections, tokens, first-call costs
        for rep in range(repeat):
            r = await _round(stack, 1, 60)
            out.append({"scenario": "one job", "wait_time_s": wait_s, "token_callbacks_at": at, "rep": rep, **r})
            print(f"  wait {wait_s:2d}s {at:8s} one job      p50 {r['p50_s'] * 1000:7.0f} ms", flush=True)
        if burst:
            r = await _round(stack, burst, 300)
            out.append(
                {"scenario": f"{burst} concurrent jobs", "wait_time_s": wait_s, "token_callbacks_at": at, "rep": 0, **r}
            )
            print(
                f"  wait {wait_s:2d}s {at:8s} {burst} jobs  p50 {r['p50_s']:6.2f}s p99 {r['p99_s']:6.2f}s "
                f"{r['jobs_per_s']:6.2f} jobs/s",
                flush=True,
            )
    return out


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (scenario, wait_time_s, token_callbacks_at): latency percentiles over every job of every repetition,
    and throughput."""
    out = []
    for key in dict.fromkeys((r["scenario"], r["wait_time_s"], r["token_callbacks_at"]) for r in runs):
        rs = [r for r in runs if (r["scenario"], r["wait_time_s"], r["token_callbacks_at"]) == key]
        lat = [x for r in rs for x in r["latencies_s"]]
        out.append(
            {
                "scenario": key[0],
                "wait_time_s": key[1],
                "token_callbacks_at": key[2],
                "samples": len(lat),
                "p50_ms": percentile(lat, 50) * 1000,
                "p99_ms": percentile(lat, 99) * 1000,
                "max_ms": max(lat) * 1000,
                "jobs_per_s": median([r["jobs_per_s"] for r in rs]),
            }
        )
    return out


def render(summary: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table."""
    headers = ["scenario", "worker wait_time_s", "token callbacks at", "samples", "p50 ms", "p99 ms", "max ms"]
    headers += ["jobs/s"]
    keys = ["scenario", "wait_time_s", "token_callbacks_at", "samples", "p50_ms", "p99_ms", "max_ms", "jobs_per_s"]
    return table(headers, [[s[k] for k in keys] for s in summary])


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.e2e``."""
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="one-job rounds per wait time")
    p.add_argument("--burst", type=int, default=100, help="concurrent jobs in the burst round (0: none)")
    p.add_argument("--wait-times", default="1,10", help="worker long-poll wait_time_s values to compare")
    p.add_argument(
        "--token-callbacks-at",
        default=LedgerSettings.model_fields["token_callbacks_at"].default,
        help="comma-separated LEDGER__TOKEN_CALLBACKS_AT values to compare, each run in turn (default: as shipped)",
    )
    p.add_argument("--quick", action="store_true", help="CI smoke: 2 one-job rounds, a burst of 3, wait 1 s")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    modes = [m for m in a.token_callbacks_at.split(",") if m]
    if not modes or set(modes) - {"worker", "receiver"}:
        p.error(f"--token-callbacks-at takes worker and/or receiver, got {a.token_callbacks_at!r}")
    if a.quick:
        a.repeat, a.burst, a.wait_times = 2, 3, "1"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs: list[dict[str, Any]] = []
    with moto() as server:
        for wait_s in (int(w) for w in a.wait_times.split(",")):
            for at in modes:
                runs += asyncio.run(_scenario(server.url, wait_s, at, a.repeat, a.burst))
    result: dict[str, Any] = {
        "bench": "e2e",
        "command": command_line("bench.e2e"),
        "machine": machine(),
        "summary": summarize(runs),
        "runs": runs,
    }
    print(render(result["summary"]))
    if not a.no_write:
        print(f"results: {write_results('e2e', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
