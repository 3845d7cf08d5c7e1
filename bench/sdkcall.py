"""CPU per AWS call, what bounds the callback receiver: the receiver's own calls made through aiobotocore, one
after another, against :mod:`bench.awsstub` (its own process, no added latency), side by side with a bare aiohttp
POST of the same SendMessageBatch request to the same stub (the baseline: the HTTP exchange alone, unsigned).

Variants, in interleaved rounds, each ``--calls`` calls in a row in this one process (CPU is this process's
user+sys, ``time.process_time``):

* ``bare_post``: aiohttp ``POST`` of a one-entry SendMessageBatch body (no SDK, no signing);
* ``sqs_send_1``: :meth:`pipeline.workqueue.WorkQueue.send`, one message per SendMessageBatch;
* ``sqs_send_10``: ten sends at once, which go as one SendMessageBatch of 10 (per call, not per message);
* ``ledger_update``: :meth:`pipeline.ledger.JobLedger.record_token_callback` (the fast path's UpdateItem);
* ``ledger_transact_25``: :meth:`pipeline.ledger.JobLedger.record_token_callbacks` of 25 callbacks (one
  TransactWriteItems, per call).

    python -m bench.sdkcall --calls 2000 --repeat 3
    python -m bench.sdkcall --quick
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import orjson

from bench.callbacks import aws_stub, stub_settings
from bench.common import command_line, machine, median, table, write_results
from pipeline.aws import open_clients
from pipeline.ledger import JobLedger, TokenCallback
from pipeline.models import WorkMessage, dumps
from pipeline.workqueue import WorkQueue

VARIANTS = ("bare_post", "sqs_send_1", "sqs_send_10", "ledger_update", "ledger_transact_25")


def _job() -> str:
    return uuid.uuid4().hex


async def _calls(settings: Any, stub_url: str) -> tuple[dict[str, Callable[[], Awaitable[Any]]], AsyncExitStack]:
    """One coroutine function per variant, each making one call; and the stack that closes their clients."""
    stack = AsyncExitStack()
    clients = await open_clients(stack, settings.aws)
    http = await stack.enter_async_context(aiohttp.ClientSession())
    queue_url = settings.queue.work_queue_url
    queue = WorkQueue(clients.sqs, queue_url)
    ledger = JobLedger(clients.dynamodb, settings.ledger)
    message = WorkMessage(job_id=_job(), callback_status="Completed")
    bare_body = orjson.dumps(
        {
            "QueueUrl": queue_url,
            "Entries": [
                {
                    "Id": "0",
                    "MessageBody": dumps(message),
                    "MessageAttributes": {"job_id": {"DataType": "String", "StringValue": message.job_id}},
                }
            ],
        }
    )
    bare_headers = {"X-Amz-Target": "AmazonSQS.SendMessageBatch", "Content-Type": "application/x-amz-json-1.0"}

    async def bare_post() -> None:
        async with http.post(stub_url + "/", data=bare_body, headers=bare_headers) as resp:
            await resp.read()
            resp.raise_for_status()

    async def sqs_send_1() -> None:
        await queue.send(message)

    async def sqs_send_10() -> None:
        await asyncio.gather(*(queue.send(message) for _ in range(10)))

    async def ledger_update() -> None:
        await ledger.record_token_callback(
            _job(), submission_id="bench-submission-000000", status="Completed", notification_id=None
        )

    async def ledger_transact_25() -> None:
        calls = [TokenCallback(_job(), "bench-submission-000000", "Completed", None) for _ in range(25)]
        await ledger.record_token_callbacks(calls)

    fns = {f.__name__: f for f in (bare_post, sqs_send_1, sqs_send_10, ledger_update, ledger_transact_25)}
    return fns, stack


async def measure(stub_url: str, calls: int, repeat: int, variants: tuple[str, ...]) -> list[dict[str, Any]]:
    """CPU ms per call of each variant, ``repeat`` interleaved rounds of ``calls`` calls (after a warm-up)."""
    settings = stub_settings(stub_url)
    fns, stack = await _calls(settings, stub_url)
    runs: list[dict[str, Any]] = []
    async with stack:
        for name in variants:  # warm-up: botocore loads its models and endpoint rules on first use
            for _ in range(20):
                await fns[name]()
        for rnd in range(repeat):
            for name in variants:
                fn = fns[name]
                cpu0, t0 = time.process_time(), time.perf_counter()
                for _ in range(calls):
                    await fn()
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
                runs.append({"variant": name, "round": rnd, "calls": calls, "cpu_ms_per_call": 1000 * cpu / calls})
                print(f"  {name:20s} round {rnd}: {1000 * cpu / calls:6.3f} ms CPU/call ({wall:.2f}s wall)", flush=True)
    return runs


def summarize(runs: list[dict[str, Any]], variants: tuple[str, ...]) -> list[dict[str, Any]]:
    """Median CPU per call of each variant, its range, and its ratio to ``bare_post``."""
    per = {v: [r["cpu_ms_per_call"] for r in runs if r["variant"] == v] for v in variants}
    base = median(per["bare_post"]) if per.get("bare_post") else None
    return [
        {
            "variant": v,
            "runs": len(cpu),
            "cpu_ms_per_call_median": median(cpu),
            "min": min(cpu),
            "max": max(cpu),
            "x_bare": median(cpu) / base if base else None,
        }
        for v, cpu in per.items()
    ]


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.sdkcall``."""
    p = argparse.ArgumentParser(prog="python -m bench.sdkcall", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000, help="calls in a row per variant and round")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--no-write", action="store_true", help="do not write bench/results/*.json")
    p.add_argument("--quick", action="store_true", help="CI smoke: 20 calls, 1 round")
    a = p.parse_args(argv)
    if a.quick:
        a.calls, a.repeat = 20, 1
    variants = tuple(v for v in a.variants.split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    with aws_stub(0.0, 0.0) as (stub_url, _):
        runs = asyncio.run(measure(stub_url, a.calls, a.repeat, variants))
    summary = summarize(runs, variants)
    print(f"# {a.calls} calls in a row per variant and round, medians of {a.repeat} rounds")
    headers = ["variant", "runs", "CPU ms/call (median)", "min-max", "x bare_post"]
    rows = [
        [s["variant"], s["runs"], s["cpu_ms_per_call_median"], f"{s['min']:.3f}-{s['max']:.3f}", s["x_bare"] or "-"]
        for s in summary
    ]
    print(table(headers, rows))
    if not a.no_write:
        result = {
            "bench": "sdkcall",
            "command": command_line("bench.sdkcall"),
            "machine": machine(),
            "summary": summary,
            "runs": runs,
        }
        print(f"results: {write_results('sdkcall', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
