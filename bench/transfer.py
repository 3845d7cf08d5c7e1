"""Transfer benchmark: one AQuA result file -> one S3 object, ours against two common baselines.

Variants, each run in a fresh child process so its CPU time and peak RSS are its own:

* ``ours``: ``AquaClient.open_file`` -> ``S3Transfer.store`` with default S3 settings (8 MiB parts, 4 in flight,
  record count and CSV shape verified, CRC32 part checksums, whole-object SHA-256).
* ``download_upload`` (baseline A, the tap-zuora idiom): stream the file to disk with ``urllib``, then boto3's
  managed ``upload_file`` (default ``TransferConfig``).
* ``whole_body`` (baseline B): read the whole file into memory, then one boto3 ``put_object``.
* ``ours_gzip`` (with ``--transport-gzip``): ours, with the simulator gzipping the transport.
* ``ours_noverify`` and ``ours_signed`` (only when named in ``--variants``): ours with record-count and CSV-shape
  verification off, and ours with S3 payload signing on; they say what each costs.
* ``ours_tree`` (with ``--tree DIR``): ours as another source tree has it (an older commit, say), to measure a
  change side by side with what it replaced.

The simulator and the S3 server run as their own processes; the variants are interleaved per repetition (A, B,
ours, A, B, ours, ...) so background noise is shared fairly, and the table reports medians. The S3 server is moto
unless ``--s3`` names others: ``--s3 moto,rclone`` runs the whole matrix against moto and against ``rclone serve s3``
(rclone >= 1.65 from ``--rclone``, ``$RCLONE`` or PATH; much less CPU per byte than moto), interleaved per
repetition, on the same simulator file; "x ours" is always to ours on the same server.

    python -m bench.transfer --sizes 256MiB,1GiB,4GiB --repeat 3
    python -m bench.transfer --sizes 256MiB --s3 moto,rclone    # rclone on PATH, or --rclone PATH
    python -m bench.transfer --sizes 1GiB --variants ours,ours_tree --tree /tmp/aqua-old
    python -m bench.transfer --quick
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    RCLONE_S3_FLAGS,
    S3_SERVERS,
    RcloneServer,
    RcloneUnavailable,
    command_line,
    cpu_s_of,
    find_rclone,
    fmt_size,
    machine,
    median,
    parse_size,
    rss_mib_of,
    s3_server,
    simulator_proc,
    table,
    write_results,
)
from pipeline.testing.moto import free_port

GIB = 1024**3
MIB = 1024**2
BASELINES = ("download_upload", "whole_body")
CLIENT_ID, CLIENT_SECRET = "sim-client", "sim-secret"
CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
QUERY = {"name": "Account", "type": "zoqlexport", "query": "select * from Account"}


# -- child side: one measured transfer --------------------------------------------------------------------


def _token(sim: str) -> str:
    body = urllib.parse.urlencode(
        {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    ).encode()
    with urllib.request.urlopen(urllib.request.Request(sim + "/oauth/token", data=body), timeout=30) as resp:
        return str(orjson.loads(resp.read())["access_token"])


def _open(sim: str, token: str, file_id: str) -> Any:
    req = urllib.request.Request(
        f"{sim}/v1/files/{file_id}", headers={"Authorization": f"Bearer {token}", "Accept-Encoding": "identity"}
    )
    return urllib.request.urlopen(req, timeout=120)


def _boto3_s3(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, **CREDS)


def _download_upload(a: argparse.Namespace) -> int:
    token, s3 = _token(a.sim), _boto3_s3(a.s3_url)
    s3.head_bucket(Bucket=a.bucket)  # every variant warms its S3 client up (lazy model/endpoint loading)
    start = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    with tempfile.NamedTemporaryFile(prefix="bench-aqua-", suffix=".csv") as f:
        with _open(a.sim, token, a.file_id) as resp:
            shutil.copyfileobj(resp, f, MIB)
        f.flush()
        s3.upload_file(f.name, a.bucket, a.key)
        size = os.path.getsize(f.name)
    _report(start, size)
    return 0


def _whole_body(a: argparse.Namespace) -> int:
    token, s3 = _token(a.sim), _boto3_s3(a.s3_url)
    s3.head_bucket(Bucket=a.bucket)
    start = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    with _open(a.sim, token, a.file_id) as resp:
        data = resp.read()
    s3.put_object(Bucket=a.bucket, Key=a.key, Body=data)
    _report(start, len(data))
    return 0


OURS = ("ours", "ours_gzip", "ours_noverify", "ours_signed", "ours_tree")


async def _ours(a: argparse.Namespace, *, gzip: bool) -> int:
    import aiohttp
    from aiobotocore.session import get_session
    from pydantic import SecretStr

    from pipeline.aqua.client import AquaClient
    from pipeline.aws import client_kwargs
    from pipeline.settings import AquaSettings, AwsSettings, S3Settings
    from pipeline.transfer import S3Transfer, TransferSpec

    aws = AwsSettings(
        endpoint_url=a.s3_url,
        access_key_id="testing",
        secret_access_key="testing",
        s3_payload_signing=a.child == "ours_signed",
    )
    verify = a.child != "ours_noverify"
    s3_settings = S3Settings(bucket=a.bucket, verify_record_count=verify, verify_csv_shape=verify)
    aqua = AquaSettings(base_url=a.sim, client_id=CLIENT_ID, client_secret=SecretStr(CLIENT_SECRET))
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession(auto_decompress=False))
        s3 = await stack.enter_async_context(get_session().create_client("s3", **client_kwargs(aws)))
        client = AquaClient(http, aqua)
        await client.auth.get()  # the token is not part of the transfer
        await s3.head_bucket(Bucket=a.bucket)
        spec = TransferSpec(bucket=a.bucket, key=a.key, kind="csv", expected_records=a.records, metadata={})
        start = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        async with client.open_file(a.file_id, accept_gzip=gzip) as source:
            stored = await S3Transfer(s3, s3_settings).store(source, spec)
        _report(start, stored.size, parts=stored.parts, records=stored.record_count)
    return 0


def _report(start: tuple[float, resource.struct_rusage], size: int, **extra: Any) -> None:
    wall = time.perf_counter() - start[0]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru.ru_utime - start[1].ru_utime) + (ru.ru_stime - start[1].ru_stime)
    out = {"wall_s": wall, "cpu_s": cpu, "max_rss_mib": ru.ru_maxrss / 1024, "bytes": size, **extra}
    sys.stdout.write(orjson.dumps(out).decode() + "\n")


def run_child(a: argparse.Namespace) -> int:
    """Entry point of a measured child process (``--child VARIANT``)."""
    if a.child == "download_upload":
        return _download_upload(a)
    if a.child == "whole_body":
        return _whole_body(a)
    return asyncio.run(_ours(a, gzip=a.child == "ours_gzip"))


# -- parent side: orchestration ----------------------------------------------------------------------------


def _api(sim: str, token: str, method: str, path: str, body: Any = None) -> Any:
    data = orjson.dumps(body) if body is not None else None
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    req = urllib.request.Request(sim + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=60) as resp:
        return orjson.loads(resp.read())


def make_file(sim: str, token: str, rows: int) -> tuple[str, int]:
    """Have the simulator produce an Account export of ``rows`` rows; returns (file id, size in bytes)."""
    _api(sim, token, "PATCH", "/_sim/config", {"rows": {"Account": rows}, "max_file_bytes": 64 * GIB})
    body = {"format": "csv", "version": "1.1", "name": "bench", "useQueryLabels": True, "queries": [QUERY]}
    job = _api(sim, token, "POST", "/v1/batch-query/", body)
    while job["status"] not in ("completed", "aborted", "cancelled", "error"):
        time.sleep(0.02)
        job = _api(sim, token, "GET", f"/v1/batch-query/jobs/{job['id']}")
    file_id = job["batches"][0]["fileId"]
    with _open(sim, token, file_id) as resp:
        return file_id, int(resp.headers["Content-Length"])


def rows_for(sim: str, token: str, size: int) -> int:
    """Rows that make the Account file about ``size`` bytes (from a probe file's bytes per row)."""
    probe = 20_000
    _, probe_size = make_file(sim, token, probe)
    return max(1, round(size * probe / probe_size))


def _child(
    variant: str, sim: str, s3_url: str, bucket: str, file_id: str, records: int, tree: str | None = None
) -> dict[str, Any]:
    """One measured transfer in a fresh process; ``ours_tree`` is ``ours`` run from the source tree ``tree``."""
    key = f"bench/{variant}/{file_id}.csv"
    env, cwd = None, None
    if variant == "ours_tree":
        if not tree:
            raise ValueError("the ours_tree variant needs --tree DIR")
        env, cwd = {**os.environ, "PYTHONPATH": tree}, tree
    child = "ours" if variant == "ours_tree" else variant
    cmd = [sys.executable, "-m", "bench.transfer", "--child", child, "--sim", sim, "--s3-url", s3_url]
    cmd += ["--bucket", bucket, "--key", key, "--file-id", file_id, "--records", str(records)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = orjson.loads(proc.stdout.strip().splitlines()[-1])
    result["key"] = key
    return result


def server_names(spec: str) -> list[str]:
    """``--s3 moto,rclone`` -> ``["moto", "rclone"]`` (known names only, each once, in the given order)."""
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    unknown = [n for n in names if n not in S3_SERVERS]
    if unknown or not names:
        raise ValueError(f"--s3: unknown S3 server(s) {', '.join(unknown) or '(none)'}; known: {', '.join(S3_SERVERS)}")
    return names


def _describe(name: str, server: Any) -> dict[str, Any]:
    if isinstance(server, RcloneServer):
        version = ".".join(map(str, server.version))
        return {"name": name, "exe": server.exe, "version": version, "flags": list(RCLONE_S3_FLAGS)}
    return {"name": name}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every size x repetition x S3 server x variant; returns the JSON-ready results."""
    import boto3

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    variants = [*BASELINES, "ours"] + (["ours_gzip"] if args.transport_gzip else [])
    variants += ["ours_tree"] if args.tree else []
    if args.variants:
        variants = [v for v in [*BASELINES, *OURS] if v in args.variants.split(",")]
    names = server_names(args.s3)
    runs: list[dict[str, Any]] = []
    bucket = "bench-transfer"
    with ExitStack() as stack:
        servers = {n: stack.enter_context(s3_server(n, rclone=args.rclone, need=max(sizes))) for n in names}
        sim, sim_pid = stack.enter_context(simulator_proc(free_port(), "--step-delay", "0.01"))
        pids = {n: server.proc.pid if server.proc else 0 for n, server in servers.items()}
        clients = {n: boto3.client("s3", endpoint_url=server.url, **CREDS) for n, server in servers.items()}
        for s3 in clients.values():
            s3.create_bucket(Bucket=bucket)
        token = _token(sim)
        per_row = {size: rows_for(sim, token, size) for size in sizes}
        for size in sizes:
            file_id, actual = make_file(sim, token, per_row[size])
            print(f"# {fmt_size(size)}: {per_row[size]} rows, {actual} bytes", flush=True)
            for rep in range(args.repeat):
                for name in names:
                    s3, s3_pid = clients[name], pids[name]
                    for variant in variants:
                        helpers = cpu_s_of(sim_pid), cpu_s_of(s3_pid)
                        r = _child(variant, sim, servers[name].url, bucket, file_id, per_row[size], args.tree)
                        r["sim_cpu_s"] = cpu_s_of(sim_pid) - helpers[0]
                        r["s3_cpu_s"] = cpu_s_of(s3_pid) - helpers[1]
                        head = s3.head_object(Bucket=bucket, Key=r["key"])
                        if head["ContentLength"] != actual:
                            raise RuntimeError(
                                f"{variant} stored {head['ContentLength']} bytes in {name}, expected {actual}"
                            )
                        s3.delete_object(Bucket=bucket, Key=r["key"])
                        r.update(server=name, variant=variant, size=size, actual_bytes=actual, rep=rep)
                        r["s3_rss_mib"] = rss_mib_of(s3_pid)
                        runs.append(r)
                        where = f"{name:6s} " if len(names) > 1 else ""
                        print(
                            f"  rep {rep} {where}{variant:16s} {r['wall_s']:7.2f}s  cpu {r['cpu_s']:6.2f}s  "
                            f"rss {r['max_rss_mib']:7.1f}MiB  sim cpu {r['sim_cpu_s']:6.2f}s  "
                            f"{name} cpu {r['s3_cpu_s']:6.2f}s",
                            flush=True,
                        )
        described = [_describe(n, servers[n]) for n in names]
    return {
        "bench": "transfer",
        "command": command_line("bench.transfer"),
        "machine": machine(),
        "variants": variants,
        "s3_servers": described,
        "summary": summarize(runs, sizes, variants, names),
        "runs": runs,
    }


def summarize(
    runs: list[dict[str, Any]], sizes: list[int], variants: list[str], servers: list[str]
) -> list[dict[str, Any]]:
    """Medians per (size, S3 server, variant), with the wall-time ratio to ours on the same server (>1: ours is
    faster)."""
    out: list[dict[str, Any]] = []
    for size in sizes:
        for server in servers:
            here = [r for r in runs if r["size"] == size and r["server"] == server]
            mine = median([r["wall_s"] for r in here if r["variant"] == "ours"])
            for variant in variants:
                rs = [r for r in here if r["variant"] == variant]
                if not rs:
                    continue
                gib = rs[0]["actual_bytes"] / GIB
                wall = median([r["wall_s"] for r in rs])
                out.append(
                    {
                        "size": fmt_size(size),
                        "server": server,
                        "bytes": rs[0]["actual_bytes"],
                        "variant": variant,
                        "runs": len(rs),
                        "wall_s_median": wall,
                        "wall_s_min": min(r["wall_s"] for r in rs),
                        "wall_s_max": max(r["wall_s"] for r in rs),
                        "ratio_to_ours": wall / mine if mine else float("nan"),
                        "mib_per_s": rs[0]["actual_bytes"] / MIB / wall if wall else float("nan"),
                        "cpu_s_per_gib_median": median([r["cpu_s"] / gib for r in rs]),
                        "sim_cpu_s_per_gib_median": median([r.get("sim_cpu_s", 0.0) / gib for r in rs]),
                        "s3_cpu_s_per_gib_median": median([r["s3_cpu_s"] / gib for r in rs]),
                        "peak_rss_mib_median": median([r["max_rss_mib"] for r in rs]),
                        "peak_rss_mib_max": max(r["max_rss_mib"] for r in rs),
                    }
                )
    return out


def render(summary: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table."""
    headers = ["size", "S3 server", "variant", "runs", "wall s (median)", "min-max", "x ours", "MiB/s", "CPU s/GiB"]
    headers += ["peak RSS MiB", "AQuA sim CPU s/GiB", "S3 server CPU s/GiB"]
    rows = [
        [
            s["size"],
            s["server"],
            s["variant"],
            s["runs"],
            s["wall_s_median"],
            f"{s['wall_s_min']:.2f}-{s['wall_s_max']:.2f}",
            s["ratio_to_ours"],
            s["mib_per_s"],
            s["cpu_s_per_gib_median"],
            s["peak_rss_mib_median"],
            s["sim_cpu_s_per_gib_median"],
            s["s3_cpu_s_per_gib_median"],
        ]
        for s in summary
    ]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.transfer``."""
    p = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256MiB,1GiB", help="comma-separated sizes, e.g. 256MiB,1GiB,4GiB")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="CI smoke: 8MiB, 1 repetition")
    p.add_argument("--transport-gzip", action="store_true", help="add ours with gzip transport encoding")
    p.add_argument("--no-write", action="store_true", help="do not write bench/results/*.json")
    p.add_argument("--variants", help=f"only these, comma-separated ({','.join([*BASELINES, *OURS])})")
    p.add_argument(
        "--s3", default="moto", help=f"S3 servers to run everything against, comma-separated ({','.join(S3_SERVERS)})"
    )
    p.add_argument("--rclone", metavar="PATH", help="rclone (>= 1.65) for --s3 rclone (default: $RCLONE, then PATH)")
    p.add_argument(
        "--tree",
        metavar="DIR",
        help="add ours_tree: ours run from another source tree (e.g. an older commit: git archive REF pipeline bench "
        "| tar -x -C DIR, plus its built pipeline/_csvscan*.so), interleaved with the rest",
    )
    p.add_argument("--child", choices=[*BASELINES, *OURS], help=argparse.SUPPRESS)
    for name in ("--sim", "--s3-url", "--bucket", "--key", "--file-id"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--records", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return run_child(args)
    if args.quick:
        args.sizes, args.repeat = "8MiB", 1
    if args.variants and "ours_tree" in args.variants.split(",") and not args.tree:
        p.error("the ours_tree variant needs --tree DIR")
    if args.tree and not (Path(args.tree) / "pipeline" / "transfer.py").is_file():
        p.error(f"--tree {args.tree}: no pipeline/transfer.py there")
    try:
        if "rclone" in server_names(args.s3):
            find_rclone(args.rclone)  # fail before any process starts
    except (ValueError, RcloneUnavailable) as exc:
        p.error(str(exc))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(args)
    print(render(result["summary"]))
    if not args.no_write:
        print(f"results: {write_results('transfer', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
