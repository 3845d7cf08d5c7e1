"""The ``aqua-pipeline`` command. Thin: parse arguments, build settings, configure logging, then call one
function per command. Errors come out as one clear line and a non-zero exit code."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.errors import AquaUnavailable, PipelineError
from pipeline.logs import configure_logging
from pipeline.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from pipeline.app import Components


def _cmd_simulator(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.aqua.simulator.cli import run_simulator

    return run_simulator(args)


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.demo import run_demo

    try:
        rc: int = asyncio.run(run_demo(args))
    except asyncio.CancelledError:  # SIGTERM: everything it started is stopped
        return 128 + 15
    return rc


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.app import serve

    serve(settings)
    return 0


async def _with_components(settings: Settings, fn: Callable[[Components], Awaitable[int]]) -> int:
    from contextlib import AsyncExitStack

    from pipeline.app import build_components
    from pipeline.metrics import Metrics

    # The operator commands publish no event (the service's worker does): they need no events address.
    quiet = settings.model_copy(update={"events": settings.events.model_copy(update={"target": "none"})})
    async with AsyncExitStack() as stack:
        c = await build_components(quiet, stack, Metrics())
        return await fn(c)


def _print_json(obj: object) -> None:
    print(orjson.dumps(obj, option=orjson.OPT_INDENT_2, default=str).decode())


def _cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline import ops
    from pipeline.jobdefs import load_job_definitions
    from pipeline.progress import watch_job

    definitions = load_job_definitions(Path(args.file))

    async def run(c: Components) -> int:
        # every job is submitted first (AQuA runs them side by side), each id on stdout as it comes; then, with
        # --wait, each is followed in turn within one deadline for them all
        job_ids: list[str] = []
        rc = 0
        try:
            async for s in ops.submit_each(c, definitions):
                print(f"submitted {s.job.id} ({s.job.name})", file=sys.stderr)
                print(s.job.id, flush=True)
                job_ids.append(s.job.id or "")
        except ops.PartlySubmitted as partly:
            refused, *rest = partly.not_submitted
            after = ", ".join(rest) or "none"
            print(
                f"aqua-pipeline: job {refused} was not submitted: {partly.cause}\n"
                f"  submitted before it: {len(job_ids)} (ids above); not submitted after it: {after}",
                file=sys.stderr,
            )
            rc = 1
        if args.wait:
            deadline = time.monotonic() + args.timeout
            for job_id in job_ids:
                ok = await watch_job(c, job_id, timeout_s=max(0.0, deadline - time.monotonic()))
                rc = rc or (0 if ok else 1)
        return rc

    return asyncio.run(_with_components(settings, run))


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline import ops

    async def run(c: Components) -> int:
        _print_json((await ops.status(c, _valid_job_id(args.job_id))).as_dict())
        return 0

    return asyncio.run(_with_components(settings, run))


def _cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline import ops

    async def run(c: Components) -> int:
        items = await ops.recent(c, args.limit)
        print(f"{'JOB ID':<32}  {'STATE':<12} {'BYTES':>14} {'RECORDS':>10} {'DURATION':>9}  ERROR")
        for i in items:
            duration = f"{i.updated_at - i.submitted_at:.0f}s" if i.submitted_at and i.updated_at else "-"
            print(
                f"{i.job_id:<32}  {i.state!s:<12} {i.total_bytes or 0:>14,} {i.record_count or 0:>10,}"
                f" {duration:>9}  {i.error_reason or ''}"
            )
        return 0

    return asyncio.run(_with_components(settings, run))


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline import ops

    async def run(c: Components) -> int:
        item = await ops.replay(c, _valid_job_id(args.job_id))
        print(f"replay of {item.job_id} enqueued")
        return 0

    return asyncio.run(_with_components(settings, run))


def _cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline import ops

    async def run(c: Components) -> int:
        job = await ops.cancel(c, _valid_job_id(args.job_id))
        print(f"{job.id}: {job.status}")
        return 0

    return asyncio.run(_with_components(settings, run))


def _valid_job_id(value: str) -> str:
    from pipeline.aqua.models import is_aqua_id

    if not is_aqua_id(value.lower()):
        raise UsageError(f"{value!r} is not an AQuA job id (32 hex characters)")
    return value.lower()


class UsageError(Exception):
    """A command-line mistake; printed as one line."""


def _cmd_check_config(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.events import check_event_target

    check_event_target(settings.events)  # what `serve` would refuse at start-up, refused here too
    print(settings.model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="aqua-pipeline",
        description="Zuora AQuA exports into S3: callback receiver, streaming transfer, completion events.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the callback receiver, worker and reconciler")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="run the whole pipeline end to end on embedded defaults")
    p.add_argument("--records", type=_positive(int), default=20000, help="rows in the sample Account export")
    p.add_argument("--keep-running", action="store_true", help="leave everything up until Ctrl-C")
    p.add_argument("--verbose", action="store_true", help="show the service's own log lines too")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("simulator", help="run the local AQuA API simulator")
    from pipeline.aqua.simulator.cli import add_simulator_arguments

    add_simulator_arguments(p)
    p.set_defaults(func=_cmd_simulator)

    p = sub.add_parser("submit", help="submit AQuA jobs from a YAML or JSON job definition file")
    p.add_argument("file", help="job definition file (.yaml, .yml or .json)")
    p.add_argument("--wait", action="store_true", help="show progress until each job has landed")
    p.add_argument(
        "--timeout", type=_positive(float), default=6 * 3600, help="seconds to wait with --wait, for all the jobs"
    )
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("status", help="show a job's ledger state and AQuA status")
    p.add_argument("job_id")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("jobs", help="list recent jobs with state, bytes, duration and error")
    p.add_argument("--limit", type=_positive(int), default=50, help="how many jobs, newest first (default 50)")
    p.set_defaults(func=_cmd_jobs)

    p = sub.add_parser("replay", help="re-run a job's transfer and event (idempotent)")
    p.add_argument("job_id")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("cancel", help="cancel a running job in AQuA")
    p.add_argument("job_id")
    p.set_defaults(func=_cmd_cancel)

    p = sub.add_parser("check-config", help="validate the environment and print the effective settings")
    p.set_defaults(func=_cmd_check_config)

    return parser


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` above 0 (argparse names the option when it is not)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m pipeline``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"aqua-pipeline: {exc}", file=sys.stderr)
        return 2
    if args.command == "demo" and not args.verbose:
        configure_logging("WARNING", "text")
    else:
        configure_logging(settings.log_level, settings.log_format)
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    try:
        return func(args, settings)
    except KeyboardInterrupt:
        return 130
    except AquaUnavailable as exc:
        print(f"aqua-pipeline: AQuA at {settings.aqua.base_url} is unavailable: {exc}", file=sys.stderr)
        return 1
    except SettingsError as exc:  # one that needs more than the environment to see (say, an events address)
        print(f"aqua-pipeline: {exc}", file=sys.stderr)
        return 2
    except (PipelineError, UsageError, ValueError, OSError) as exc:
        print(f"aqua-pipeline: {exc}", file=sys.stderr)
        return 1
    except (BotoCoreError, ClientError) as exc:  # an AWS call outside the pipeline's own error mapping
        print(f"aqua-pipeline: AWS at {settings.aws.endpoint_url or 'the default endpoints'}: {exc}", file=sys.stderr)
        return 1
