"""Callback load benchmark: the receiver (``python -m pipeline serve``, worker off) against a bare aiohttp
handler that only answers 200, on loopback, both driven by the same open-loop load generator.

As in production, the callbacks are for jobs we submitted: before any run, a pool of jobs (``--pool``) is
recorded in the ledger as the submitter records them (``bind_submission`` + ``record_submission``), and their
notifyUrls, with real tokens minted with the service's signing key, are written to a file that the generator
cycles through (a job called back again is an AQuA retry: the same AWS calls). So the receiver does the full
work of an accepted callback: verify token -> the ledger's fast path (one conditional UpdateItem, or under load a
share of one TransactWriteItems; DynamoDB on moto) -> durable ``SendMessageBatch`` (SQS on moto) -> 202. The
bare handler ignores what the URLs say. The generator runs in its own process, sends at a constant arrival rate
(open loop: latency is measured from each request's *scheduled* time, so a slow server cannot slow the generator
down and hide its queueing), and a closed-loop saturation run gives the sustained ceiling. CPU of the receiver
and of moto is sampled from ``/proc`` to say what bounds each figure; the receiver's CPU is also given per accepted
callback (its user+sys CPU seconds over the run / the callbacks it answered 2xx), which does not depend on how fast
AWS answers.

With ``--aws stub`` the AWS side is :mod:`bench.awsstub` instead of moto: a keep-alive stand-in for those calls
(every UpdateItem finds a submitted job, every message is stored), optionally after a fixed latency per call
(``--aws-latency-ms DYNAMODB,SQS``), so the receiver can be measured at rates moto cannot serve. Nothing is
seeded then (the stub answers any job id); the figures say what the receiver costs, not what AWS allows.

Under load the receiver counts overlapping callbacks in one DynamoDB TransactWriteItems
(``LEDGER__CALLBACK_BATCH_ITEMS``, see :mod:`pipeline.callback_batch`). moto implements a transaction by deep-copying
the whole table once per item in it, so against the seeded pool of 2,000 jobs (4,000 items) every transaction
costs moto seconds: run the moto matrix with ``--ledger-batch-items 1`` (one UpdateItem per callback), and the stub
matrix with the default.

    python -m bench.callbacks --rates 100,500,1000 --duration 15 --ledger-batch-items 1
    python -m bench.callbacks --aws stub --aws-latency-ms 4,8 --rates 200,500 --duration 15
    python -m bench.callbacks --quick [--aws stub]

Two services of ours: ``ours``, as shipped (``LEDGER__TOKEN_CALLBACKS_AT=worker``: verify the token, enqueue,
202; the worker makes the ledger check), and ``ours_receiver``, the same service with the ledger check in the
receiver (``LEDGER__TOKEN_CALLBACKS_AT=receiver``: the ledger's fast path, then the enqueue, then 202).

``--tree DIR`` adds ``ours_tree`` and ``ours_receiver_tree``: the same two services run from another source tree
(an older commit, say), interleaved with this tree's in the same run, so a change is measured side by side with
what it replaces rather than against figures from another hour of a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import orjson

from bench.common import cell, command_line, machine, median, moto, percentile, table, wait_http, write_results
from pipeline.testing.moto import MotoServer, free_port

CALLBACK_PATH = "/callbacks/aqua"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user+sys CPU seconds consumed so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


# -- the bare ceiling --------------------------------------------------------------------------------------


def run_bare(port: int) -> int:
    """A handler that answers 200 at once (the ceiling for this machine, this HTTP stack, this generator)."""
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"accepted": True})

    app = web.Application()
    app.router.add_route("*", CALLBACK_PATH, ok)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
    return 0


# -- the load generator (its own process) ------------------------------------------------------------------


def _read_urls(base: str, path: str) -> list[str]:
    """The pool's callback URLs (written relative to the receiver by :func:`write_urls`) on ``base``; a
    comma-separated ``base`` (replicas) takes turns, as a load balancer's round robin would."""
    bases = [b.rstrip("/") for b in base.split(",")]
    lines = [line for line in Path(path).read_text().splitlines() if line]
    return [bases[i % len(bases)] + line for i, line in enumerate(lines)]


async def _open_loop(urls: list[str], rate: float, max_inflight: int) -> dict[str, Any]:
    import aiohttp

    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    dropped = 0
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_inflight), timeout=aiohttp.ClientTimeout(total=30)
    ) as session:

        async def one(url: str, scheduled: float) -> None:
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    statuses[str(resp.status)] += 1
                    if resp.status < 300:
                        latencies.append(loop.time() - scheduled)
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses[type(exc).__name__] += 1

        start = loop.time() + 0.1
        for i, url in enumerate(urls):
            scheduled = start + i / rate
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= max_inflight:
                dropped += 1
                continue
            task = asyncio.create_task(one(url, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)
        elapsed = loop.time() - start
    return _stats("open", rate, latencies, statuses, dropped, elapsed, len(urls))


async def _closed_loop(urls: Iterator[str], concurrency: int, duration: float) -> dict[str, Any]:
    import aiohttp

    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        start = loop.time()
        deadline = start + duration

        async def worker() -> None:
            for url in urls:
                if loop.time() >= deadline:
                    return
                sent = loop.time()
                try:
                    async with session.get(url) as resp:
                        await resp.read()
                        statuses[str(resp.status)] += 1
                        if resp.status < 300:
                            latencies.append(loop.time() - sent)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    statuses[type(exc).__name__] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = loop.time() - start
    return _stats("closed", None, latencies, statuses, 0, elapsed, sum(statuses.values()))


def _stats(
    mode: str,
    rate: float | None,
    lat: list[float],
    statuses: Counter[str],
    dropped: int,
    elapsed: float,
    offered: int,
) -> dict[str, Any]:
    return {
        "mode": mode,
        "offered_rate": rate,
        "offered": offered,
        "ok": len(lat),
        "dropped": dropped,
        "statuses": dict(statuses),
        "elapsed_s": elapsed,
        "sustained_per_s": len(lat) / elapsed if elapsed else 0.0,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "max_ms": max(lat) * 1000 if lat else float("nan"),
    }


def run_loadgen(a: argparse.Namespace) -> int:
    """Entry point of the generator process: prints one JSON line. Cycles through the pool's URLs."""
    pool = _read_urls(a.url, a.urls_file)
    if a.rate:
        urls = list(islice(cycle(pool), int(a.rate * a.duration)))
        result = asyncio.run(_open_loop(urls, a.rate, a.max_inflight))
    else:
        result = asyncio.run(_closed_loop(cycle(pool), a.concurrency, a.duration))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


# -- orchestration -----------------------------------------------------------------------------------------


async def _provision(moto_url: str, log_dir: Path) -> Any:
    from pipeline.aqua.simulator import SimulatorConfig
    from pipeline.aws import open_clients
    from pipeline.provision import ensure_resources, settings_with_resources
    from pipeline.testing.stack import local_settings

    port = free_port()
    settings = local_settings(moto_url, "http://127.0.0.1:9", SimulatorConfig(), port, uuid.uuid4().hex[:10])
    settings = settings.model_copy(
        update={
            "log_format": "json",
            "http": settings.http.model_copy(update={"shutdown_grace_s": 1.0}),
            "queue": settings.queue.model_copy(update={"worker_enabled": False}),
            "reconciler": settings.reconciler.model_copy(update={"enabled": False}),
        }
    )
    async with AsyncExitStack() as stack:
        clients = await open_clients(stack, settings.aws)
        resources = await ensure_resources(clients, settings)
    return settings_with_resources(settings, resources)


def stub_settings(stub_url: str) -> Any:
    """The receiver's settings against :mod:`bench.awsstub` (no resources to create: the stub takes any name)."""
    from pipeline.aqua.simulator import SimulatorConfig
    from pipeline.testing.stack import local_settings

    suffix = uuid.uuid4().hex[:10]
    settings = local_settings(stub_url, "http://127.0.0.1:9", SimulatorConfig(), free_port(), suffix)
    return settings.model_copy(
        update={
            "log_format": "json",
            "http": settings.http.model_copy(update={"shutdown_grace_s": 1.0}),
            "queue": settings.queue.model_copy(
                update={"worker_enabled": False, "work_queue_url": f"{stub_url}/000000000000/aqua-work-{suffix}"}
            ),
            "reconciler": settings.reconciler.model_copy(update={"enabled": False}),
            "events": settings.events.model_copy(
                update={"topic_arn": f"arn:aws:sns:{settings.aws.region}:000000000000:aqua-events-{suffix}"}
            ),
        }
    )


@contextmanager
def aws_stub(ddb_latency_ms: float, sqs_latency_ms: float) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A :mod:`bench.awsstub` process for the duration of the block: ``(url, process)``."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.awsstub", "--port", str(port)]
    cmd += ["--ddb-latency-ms", str(ddb_latency_ms), "--sqs-latency-ms", str(sqs_latency_ms)]
    proc = subprocess.Popen(cmd)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/__calls", proc)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(10)


def _stub_calls(url: str) -> Counter[str]:
    """How many calls of each operation the stub has answered so far."""
    with urllib.request.urlopen(url + "/__calls", timeout=10) as resp:
        return Counter(orjson.loads(resp.read()))


WARMUP = 20
"""Callbacks sent once before the measured runs, so the first run's CPU per callback is not its warm-up's."""
SEED_BATCH = 25  # BatchWriteItem's limit
SEED_CONCURRENCY = 4


async def _seed(settings: Any, n: int) -> list[tuple[str, str]]:
    """Record ``n`` submitted jobs in the ledger as the submitter records them; returns them as
    ``(job_id, submission_id)`` pairs.

    The first goes through the submitter's own calls (``bind_submission``, then ``record_submission`` with a
    submit body, which the item carries as the submitter's items do); the rest are copies of the two items those
    calls wrote, with their own ids, written with BatchWriteItem (two UpdateItems per job would take most of a
    minute for the default pool on moto)."""
    from bench.awsstub import REQUEST as SUBMIT_BODY  # the stub's item carries the same submit body
    from pipeline.aws import open_clients
    from pipeline.ledger import JobLedger
    from pipeline.tokens import new_submission_id

    pool = [(uuid.uuid4().hex, new_submission_id()) for _ in range(n)]
    if not pool:
        return pool
    async with AsyncExitStack() as stack:
        clients = await open_clients(stack, settings.aws)
        ddb, table = clients.dynamodb, settings.ledger.table_name
        ledger = JobLedger(ddb, settings.ledger)
        job0, sub0 = pool[0]
        await ledger.bind_submission(sub0, job0)
        await ledger.record_submission(
            job0, submission_id=sub0, job_name="bench", partner=None, project=None, request=SUBMIT_BODY
        )
        job_item = (await ddb.get_item(TableName=table, Key={"job_id": {"S": job0}}, ConsistentRead=True))["Item"]
        sub_item = (await ddb.get_item(TableName=table, Key={"job_id": {"S": f"sub#{sub0}"}}))["Item"]
        puts: list[dict[str, Any]] = []
        for job_id, submission_id in pool[1:]:
            puts.append({**job_item, "job_id": {"S": job_id}, "submission_id": {"S": submission_id}})
            puts.append({**sub_item, "job_id": {"S": f"sub#{submission_id}"}, "bound_job": {"S": job_id}})
        batches = iter([puts[i : i + SEED_BATCH] for i in range(0, len(puts), SEED_BATCH)])

        async def worker() -> None:
            for batch in batches:
                requests: list[dict[str, Any]] = [{"PutRequest": {"Item": item}} for item in batch]
                while requests:
                    resp = await ddb.batch_write_item(RequestItems={table: requests})
                    requests = resp.get("UnprocessedItems", {}).get(table, [])

        await asyncio.gather(*(worker() for _ in range(SEED_CONCURRENCY)))
    return pool


def write_urls(settings: Any, pool: list[tuple[str, str]], path: Path) -> None:
    """Write the pool's callback URLs to ``path``, one a line: each job's notifyUrl (a real token for its
    submission, signed with the service's key) with status Completed, relative to the receiver's base URL."""
    from pipeline.tokens import TokenSigner, build_notify_url

    signer = TokenSigner(settings.security.signing_keys, settings.security.token_ttl_s)
    base = "http://receiver"
    lines = []
    for job_id, submission_id in pool:
        notify = build_notify_url(base, CALLBACK_PATH, signer.issue(submission_id).token)
        lines.append(notify.removeprefix(base).replace("${JOBID}", job_id).replace("${STATUS}", "Completed"))
    path.write_text("\n".join(lines) + "\n")


def _load(url: str, urls_file: Path, *, rate: float | None, duration: float, concurrency: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.callbacks", "--loadgen", "--url", url, "--duration", str(duration)]
    cmd += ["--rate", str(rate or 0), "--concurrency", str(concurrency), "--urls-file", str(urls_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration * 10 + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = orjson.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("p50_ms", "p99_ms", "max_ms"):  # JSON has no NaN: orjson wrote null when nothing was answered
        if result.get(key) is None:
            result[key] = float("nan")
    return result


async def _purge(settings: Any) -> None:
    """Empty the work queue (the worker is off, so it only grows) and let moto settle."""
    from pipeline.aws import open_clients

    async with AsyncExitStack() as stack:
        clients = await open_clients(stack, settings.aws)
        deadline = time.monotonic() + 70
        while True:  # SQS allows one purge per queue every 60 s
            try:
                await clients.sqs.purge_queue(QueueUrl=settings.queue.work_queue_url)
                break
            except clients.sqs.exceptions.PurgeQueueInProgress:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(5)
    await asyncio.sleep(2)


async def _emulator_ceiling(
    settings: Any, pool: list[tuple[str, str]], *, duration: float, concurrency: int
) -> dict[str, Any]:
    """The emulator's own ceiling: the AWS calls one accepted callback makes with the ledger check in the
    receiver (``ours_receiver``: the ledger's fast path on a seeded job, batched as the receiver batches it, then
    enqueue the work message), issued directly with no HTTP receiver in front."""
    from pipeline.aws import open_clients
    from pipeline.callback_batch import TokenCallbackBatcher
    from pipeline.ledger import JobLedger
    from pipeline.models import WorkMessage
    from pipeline.workqueue import WorkQueue

    latencies: list[float] = []
    async with AsyncExitStack() as stack:
        clients = await open_clients(stack, settings.aws)
        ledger = JobLedger(clients.dynamodb, settings.ledger)
        fast_path = TokenCallbackBatcher(ledger, max_items=settings.ledger.callback_batch_items)
        queue = WorkQueue(clients.sqs, settings.queue.work_queue_url)
        jobs = cycle(pool)
        deadline = time.monotonic() + duration

        async def worker() -> None:
            while time.monotonic() < deadline:
                job_id, submission_id = next(jobs)
                t = time.perf_counter()
                record = await fast_path.record(
                    job_id, submission_id=submission_id, status="completed", notification_id=None
                )
                if record is None:
                    raise RuntimeError(f"seeded job {job_id} is not on the callback fast path")
                await queue.send(WorkMessage(job_id=job_id))
                latencies.append(time.perf_counter() - t)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - started
    latencies.sort()
    return {
        "target": "emulator",
        "mode": "closed",
        "offered_rate": None,
        "sustained_per_s": len(latencies) / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else 0.0,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
        "statuses": {"200": len(latencies)},
        "dropped": 0,
    }


OURS = ("ours", "ours_receiver", "ours_tree", "ours_receiver_tree")
TARGETS = ("bare", *OURS)


def _known_env(env: dict[str, str], cwd: Path | None) -> frozenset[str]:
    """The settings variables the ``pipeline`` package found with this environment knows (another tree's may
    predate some of ours: those are left out, so it runs on its own defaults). The code runs against that tree,
    so it uses only what every tree has (``Settings``, ``ENV_PREFIX``), no helper of ours."""
    code = (
        "from pipeline.settings import ENV_PREFIX as P, Settings as S\n"
        "for n, f in S.model_fields.items():\n"
        "    subs = getattr(f.annotation, 'model_fields', None)\n"
        "    print(*([f'{P}{n.upper()}__{s.upper()}' for s in subs] if subs else [f'{P}{n.upper()}']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, check=True
    )
    return frozenset(out.stdout.split())


def _pipeline_source(env: dict[str, str], cwd: Path | None, tree: Path | None) -> str:
    """Where ``python -m pipeline`` finds the package with this environment and working directory; with a
    ``tree``, refuse to go on unless it is that tree's (an editable install would otherwise win unnoticed)."""
    code = "import pipeline; print(pipeline.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, check=True
    )
    source = str(Path(out.stdout.strip()).parent)
    if tree is not None and Path(source) != tree / "pipeline":
        raise RuntimeError(f"--tree {tree}: python -m pipeline there imports {source}")
    return source


def _ms_pair(text: str, option: str, names: str) -> tuple[float, float]:
    """``"4,8"`` -> (4.0, 8.0) milliseconds; one number applies to both."""
    parts = [float(x) for x in text.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 0:
        raise ValueError(f"{option} takes {names} milliseconds, got {text!r}")
    return parts[0], parts[1]


def _aws_latency_ms(text: str) -> tuple[float, float]:
    """``--aws-latency-ms``: (DynamoDB, SQS) milliseconds."""
    return _ms_pair(text, "--aws-latency-ms", "DYNAMODB,SQS")


def _per_callback_ms(cpu_s: float, ok: int) -> float:
    return 1000 * cpu_s / ok if ok else float("nan")


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Bare and ours at each offered rate (interleaved), then a closed-loop saturation run of each."""
    from pipeline.testing.procs import ServiceProcess
    from pipeline.tokens import new_submission_id

    rates = [float(r) for r in a.rates.split(",")]
    latency_ms = _aws_latency_ms(a.aws_latency_ms)
    stubbed = a.aws == "stub"
    runs: list[dict[str, Any]] = []
    with ExitStack() as exits:
        tmp = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="bench-callbacks-")))
        urls_file = tmp / "callback-urls.txt"
        if stubbed:
            aws_url, aws_proc = exits.enter_context(aws_stub(*latency_ms))
            settings = stub_settings(aws_url)
            pool = [(uuid.uuid4().hex, new_submission_id()) for _ in range(a.pool)]
        else:
            server: MotoServer = exits.enter_context(moto())
            assert server.proc is not None
            aws_url, aws_proc = server.url, server.proc
            settings = asyncio.run(_provision(server.url, tmp))
            t0 = time.monotonic()
            pool = asyncio.run(_seed(settings, a.pool))
            print(f"  seeded {len(pool)} submitted jobs in {time.monotonic() - t0:.1f}s", flush=True)
        if a.linger_ms is not None:
            ledger_ms, send_ms = _ms_pair(a.linger_ms, "--linger-ms", "LEDGER,SEND")
            ledger = settings.ledger.model_copy(update={"callback_linger_ms": ledger_ms})
            queue = settings.queue.model_copy(update={"send_linger_ms": send_ms})
            settings = settings.model_copy(update={"ledger": ledger, "queue": queue})
        if a.ledger_batch_items is not None:
            ledger = settings.ledger.model_copy(update={"callback_batch_items": a.ledger_batch_items})
            settings = settings.model_copy(update={"ledger": ledger})
        write_urls(settings, pool, urls_file)
        purge = not stubbed and not a.quick  # moto slows as the unconsumed queue grows: start each run clean
        names = [n for n in a.targets.split(",") if n]
        targets: dict[str, tuple[str, list[int]]] = {}  # name -> (base URLs, comma-separated; pids)
        sources: dict[str, str] = {}  # target -> the pipeline package its service runs
        for name in OURS:
            if name not in names:
                continue
            at = "receiver" if "receiver" in name else settings.ledger.token_callbacks_at
            ledger = settings.ledger.model_copy(update={"token_callbacks_at": at})
            tree = Path(a.tree).resolve() if name.endswith("_tree") else None
            env, cwd = ({"PYTHONPATH": str(tree)}, tree) if tree else ({}, None)
            sources[name] = _pipeline_source(env, cwd, tree)
            known = _known_env(env, cwd) if tree else None
            replicas = []
            for i in range(a.replicas):
                svc_settings = settings.model_copy(
                    update={"ledger": ledger, "http": settings.http.model_copy(update={"port": free_port()})}
                )
                service = ServiceProcess(svc_settings, tmp / f"{name}-{i}.log").start(
                    extra_env=env, cwd=cwd, known_env=known
                )
                exits.callback(service.terminate)
                for path in urls_file.read_text().splitlines()[:WARMUP]:  # first calls load botocore's models
                    urllib.request.urlopen(service.url + path, timeout=30).close()
                replicas.append(service)
            targets[name] = (",".join(r.url for r in replicas), [r.proc.pid for r in replicas if r.proc])
        bare_urls, bare_pids = [], []
        for _ in range(a.replicas):
            bare_port = free_port()
            bare = subprocess.Popen([sys.executable, "-m", "bench.callbacks", "--bare", "--port", str(bare_port)])
            exits.callback(bare.wait, 10)
            exits.callback(bare.send_signal, signal.SIGINT)
            wait_http(f"http://127.0.0.1:{bare_port}{CALLBACK_PATH}", bare)
            bare_urls.append(f"http://127.0.0.1:{bare_port}")
            bare_pids.append(bare.pid)
        targets["bare"] = (",".join(bare_urls), bare_pids)
        plan: list[tuple[float | None, str]] = []  # each repetition: every rate, then saturation; targets in turn
        for _ in range(a.repeat):
            for offered in [*rates, None]:
                plan += [(offered, n) for n in names]
        for rate, name in plan:
            url, pids = targets[name]
            if name != "bare" and purge:
                asyncio.run(_purge(settings))
            calls0 = _stub_calls(aws_url) if stubbed else Counter()
            cpu0, aws0, t0 = sum(map(cpu_seconds, pids)), cpu_seconds(aws_proc.pid), time.monotonic()
            r = _load(url, urls_file, rate=rate, duration=a.duration, concurrency=a.concurrency)
            wall = time.monotonic() - t0
            cpu = sum(map(cpu_seconds, pids)) - cpu0
            r["target"] = name
            r["server_cpu_pct"] = 100 * cpu / wall
            r["server_cpu_ms_per_ok"] = _per_callback_ms(cpu, r["ok"])
            r["aws_cpu_pct"] = 100 * (cpu_seconds(aws_proc.pid) - aws0) / wall
            if stubbed and name != "bare":
                calls = _stub_calls(aws_url) - calls0
                r["aws_calls_per_ok"] = {op: n / r["ok"] for op, n in sorted(calls.items())} if r["ok"] else {}
            runs.append(r)
            print(
                f"  {name:18s} {r['mode']:6s} rate {rate or '-':>6} -> {r['sustained_per_s']:7.1f}/s "
                f"p50 {r['p50_ms']:7.2f}ms p99 {r['p99_ms']:8.2f}ms  server cpu {r['server_cpu_pct']:5.1f}% "
                f"= {r['server_cpu_ms_per_ok']:5.2f}ms/ok  {a.aws} cpu {r['aws_cpu_pct']:5.1f}%  {r['statuses']}"
                + (f"  AWS calls/ok {_fmt_calls(r['aws_calls_per_ok'])}" if "aws_calls_per_ok" in r else ""),
                flush=True,
            )
        if purge:
            asyncio.run(_purge(settings))
        aws0, t0 = cpu_seconds(aws_proc.pid), time.monotonic()
        ceiling = asyncio.run(_emulator_ceiling(settings, pool, duration=a.duration, concurrency=a.concurrency))
        ceiling["server_cpu_pct"] = 0.0
        ceiling["server_cpu_ms_per_ok"] = float("nan")
        ceiling["aws_cpu_pct"] = 100 * (cpu_seconds(aws_proc.pid) - aws0) / (time.monotonic() - t0)
        runs.append(ceiling)
        print(
            f"  emulator ceiling (ours_receiver's AWS calls, no receiver) -> {ceiling['sustained_per_s']:7.1f}/s "
            f"p50 {ceiling['p50_ms']:7.2f}ms p99 {ceiling['p99_ms']:8.2f}ms",
            flush=True,
        )
    return {
        "bench": "callbacks",
        "command": command_line("bench.callbacks"),
        "machine": machine(),
        "aws": a.aws,
        "aws_latency_ms": list(latency_ms) if stubbed else None,
        "ledger_callback_batch_items": settings.ledger.callback_batch_items,
        "linger_ms": {"ledger": settings.ledger.callback_linger_ms, "send": settings.queue.send_linger_ms},
        "replicas": a.replicas,
        "sources": sources,
        "summary": summarize(runs),
        "runs": runs,
    }


def _fmt_calls(calls: dict[str, float]) -> str:
    return ", ".join(f"{op} {n:.2f}" for op, n in calls.items())


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (target, offered rate); closed-loop rows carry the ratio of ours to bare."""
    out: list[dict[str, Any]] = []
    keys = sorted({(r["offered_rate"] or 0.0, r["target"]) for r in runs})
    for rate, target in keys:
        rs = [r for r in runs if (r["offered_rate"] or 0.0) == rate and r["target"] == target]
        out.append(
            {
                "target": target,
                "offered": "saturation (closed loop)" if not rate else f"{rate:g}/s",
                "runs": len(rs),
                "sustained_per_s": median([r["sustained_per_s"] for r in rs]),
                "sustained_range": (min(r["sustained_per_s"] for r in rs), max(r["sustained_per_s"] for r in rs)),
                "p50_ms": median([r["p50_ms"] for r in rs]),
                "p99_ms": median([r["p99_ms"] for r in rs]),
                "p99_range": (min(r["p99_ms"] for r in rs), max(r["p99_ms"] for r in rs)),
                "errors": sum(sum(v for s, v in r["statuses"].items() if not s.startswith("2")) for r in rs),
                "dropped": sum(r["dropped"] for r in rs),
                "server_cpu_pct": median([r["server_cpu_pct"] for r in rs]),
                "server_cpu_ms_per_ok": median([r["server_cpu_ms_per_ok"] for r in rs]),
                "aws_cpu_pct": median([r["aws_cpu_pct"] for r in rs]),
            }
        )
        calls = [r["aws_calls_per_ok"] for r in rs if r.get("aws_calls_per_ok")]
        if calls:
            out[-1]["aws_calls_per_ok"] = {op: median([c.get(op, 0.0) for c in calls]) for op in sorted(calls[0])}
    sat = {s["target"]: s["sustained_per_s"] for s in out if s["offered"].startswith("saturation")}
    if sat.get("bare"):
        for s in out:
            if s["offered"].startswith("saturation") and s["target"].startswith("ours"):
                s["ratio_to_bare"] = s["sustained_per_s"] / sat["bare"]
                if sat.get("emulator") and s["target"] == "ours_receiver":  # the emulator makes its calls
                    s["ratio_to_emulator"] = s["sustained_per_s"] / sat["emulator"]
    return out


def _span(lo_hi: tuple[float, float]) -> str:
    lo, hi = lo_hi
    return "-" if lo == hi else f"{cell(lo)}-{cell(hi)}"


def render(summary: list[dict[str, Any]], aws: str = "moto") -> str:
    """The summary as a Markdown table. "server CPU ms/ok": the server's user+sys CPU per 2xx answer."""
    headers = ["target", "offered", "runs", "sustained/s", "min-max", "p50 ms", "p99 ms", "min-max", "errors"]
    headers += ["server CPU %", "server CPU ms/ok"]
    headers += [f"{aws} CPU %"]
    with_calls = any("aws_calls_per_ok" in s for s in summary)
    if with_calls:
        headers += ["AWS calls/ok"]
    rows = []
    for s in summary:
        row = [
            s["target"],
            s["offered"],
            s["runs"],
            s["sustained_per_s"],
            _span(s["sustained_range"]),
            s["p50_ms"],
            s["p99_ms"],
            _span(s["p99_range"]),
            s["errors"] + s["dropped"],
            s["server_cpu_pct"],
            "-" if s["server_cpu_ms_per_ok"] != s["server_cpu_ms_per_ok"] else s["server_cpu_ms_per_ok"],  # NaN
            s["aws_cpu_pct"],
        ]
        if with_calls:
            row.append(_fmt_calls(s.get("aws_calls_per_ok", {})) or "-")
        rows.append(row)
    text = table(headers, rows)
    for s in summary:
        if "ratio_to_bare" in s:
            text += f"\n\nsaturation: {s['target']} / bare = {s['ratio_to_bare']:.1%}"
            if "ratio_to_emulator" in s:
                text += f"; / emulator ceiling (its AWS calls with no receiver) = {s['ratio_to_emulator']:.1%}"
    return text


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.callbacks``."""
    p = argparse.ArgumentParser(prog="python -m bench.callbacks", description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="100,500,1000", help="offered rates, requests/s, comma-separated")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    p.add_argument(
        "--repeat", type=int, default=1, help="repetitions of the whole plan (every rate, then saturation); medians"
    )
    p.add_argument("--concurrency", type=int, default=32, help="connections of the closed-loop saturation run")
    p.add_argument("--pool", type=int, default=2000, help="submitted jobs seeded in the ledger and called back")
    p.add_argument("--quick", action="store_true", help="CI smoke: 10/s for 1 s, a pool of 50 jobs")
    p.add_argument(
        "--aws",
        choices=("moto", "stub"),
        default="moto",
        help="moto (default), or bench.awsstub: the receiver alone, at rates moto cannot serve",
    )
    p.add_argument(
        "--aws-latency-ms",
        default="0",
        help="with --aws stub: the stub's latency per call, DYNAMODB,SQS milliseconds (one number: both)",
    )
    p.add_argument(
        "--ledger-batch-items",
        type=int,
        metavar="N",
        help="the service's LEDGER__CALLBACK_BATCH_ITEMS (default: its own default); 1: no transactions. On moto, "
        "use 1: moto copies the whole table for every item of a TransactWriteItems",
    )
    p.add_argument(
        "--linger-ms",
        metavar="LEDGER,SEND",
        help="the service's LEDGER__CALLBACK_LINGER_MS and QUEUE__SEND_LINGER_MS (one number: both; default: its own "
        "defaults); the *_tree targets get them only if their settings know them",
    )
    p.add_argument(
        "--targets",
        help="comma-separated: bare (the ceiling), ours (LEDGER__TOKEN_CALLBACKS_AT as configured, default "
        "worker), ours_receiver (the same service with LEDGER__TOKEN_CALLBACKS_AT=receiver); with --tree, also "
        "ours_tree and ours_receiver_tree (default: all of them)",
    )
    p.add_argument(
        "--tree",
        metavar="DIR",
        help="the ours_tree targets: the service run from another source tree, side by side with this one (e.g. an "
        "older commit: git archive REF pipeline | tar -x -C DIR, plus the built pipeline/_csvscan*.so)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="processes per target (the bare handler too), called in turn as a load balancer would; server CPU "
        "figures are their sum",
    )
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--urls-file", help=argparse.SUPPRESS)
    p.add_argument("--max-inflight", type=int, default=512, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.bare:
        return run_bare(a.port)
    if a.loadgen:
        return run_loadgen(a)
    if a.quick:
        a.rates, a.duration, a.repeat, a.concurrency, a.pool = "10", 1.0, 1, 4, 50
    if a.targets is None:
        a.targets = ",".join(t for t in TARGETS if a.tree or not t.endswith("_tree"))
    names = [n for n in a.targets.split(",") if n]
    if not names or set(names) - set(TARGETS):
        p.error(f"--targets takes a comma-separated list of {', '.join(TARGETS)}, got {a.targets!r}")
    if any(n.endswith("_tree") for n in names) and not a.tree:
        p.error("the ours_tree targets need --tree DIR")
    if a.tree and not (Path(a.tree) / "pipeline" / "app.py").is_file():
        p.error(f"--tree {a.tree}: no pipeline/app.py there")
    if a.replicas < 1:
        p.error("--replicas must be at least 1")
    try:
        _aws_latency_ms(a.aws_latency_ms)
    except ValueError as exc:
        p.error(str(exc))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(a)
    print(render(result["summary"], a.aws))
    if not a.no_write:
        print(f"results: {write_results('callbacks', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
