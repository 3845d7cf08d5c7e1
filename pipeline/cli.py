"""The ``aqua-pipeline`` command. Thin: parse arguments, build settings, configure logging, then call one
function per command. Errors come out as one clear line and a non-zero exit code."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence

from pipeline.errors import PipelineError
from pipeline.logs import configure_logging
from pipeline.settings import Settings, SettingsError, load_settings


def _cmd_simulator(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.aqua.simulator.cli import run_simulator

    return run_simulator(args)


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.demo import run_demo

    rc: int = asyncio.run(run_demo(args))
    return rc


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.app import serve

    serve(settings)
    return 0


def _cmd_check_config(args: argparse.Namespace, settings: Settings) -> int:
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
    p.add_argument("--records", type=int, default=20000, help="rows in the sample Account export")
    p.add_argument("--keep-running", action="store_true", help="leave everything up until Ctrl-C")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("simulator", help="run the local AQuA API simulator")
    from pipeline.aqua.simulator.cli import add_simulator_arguments

    add_simulator_arguments(p)
    p.set_defaults(func=_cmd_simulator)

    p = sub.add_parser("check-config", help="validate the environment and print the effective settings")
    p.set_defaults(func=_cmd_check_config)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m pipeline``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"aqua-pipeline: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, getattr(args, "log_format", None) or settings.log_format)
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    try:
        return func(args, settings)
    except KeyboardInterrupt:
        return 130
    except PipelineError as exc:
        print(f"aqua-pipeline: {exc}", file=sys.stderr)
        return 1
