"""``aqua-pipeline simulator`` arguments and runner."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from pipeline.aqua.simulator.app import create_simulator_app
from pipeline.aqua.simulator.config import Faults, SimulatorConfig, UiCalloutConfig


def _pair(value: str) -> tuple[str, str]:
    name, sep, raw = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name.strip(), raw.strip()


def add_simulator_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--client-id", default="sim-client")
    parser.add_argument("--client-secret", default="sim-secret")
    parser.add_argument("--rows", type=_pair, action="append", default=[], metavar="OBJECT=N",
                        help="rows a full load of OBJECT returns (repeatable)")  # fmt: skip
    parser.add_argument("--default-rows", type=int, default=None)
    parser.add_argument("--step-delay", type=float, default=None, help="seconds per job/batch state change")
    parser.add_argument("--segment-records", type=int, default=None)
    parser.add_argument("--callback-method", choices=["GET", "POST"], default=None)
    parser.add_argument("--callback-status-style", choices=["lower", "capitalized"], default=None)
    parser.add_argument("--fault", type=_pair, action="append", default=[], metavar="NAME=VALUE",
                        help="set a fault at start, e.g. rate_limit_next=3 (repeatable)")  # fmt: skip
    parser.add_argument("--ui-callout-url", default=None, help="emulate a tenant-wide AQuA callout to this URL")
    parser.add_argument("--ui-callout-method", choices=["GET", "POST"], default="POST")
    parser.add_argument("--ui-callout-user", default=None)
    parser.add_argument("--ui-callout-password", default=None)
    parser.add_argument("--ui-callout-preemptive", action="store_true")
    parser.add_argument("--ui-callout-retry-interval", type=float, default=1800.0)


def _value(raw: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


def build_config(args: argparse.Namespace) -> SimulatorConfig:
    """The :class:`SimulatorConfig` the parsed arguments describe; raises ``ValueError`` on bad values."""
    cfg: dict[str, Any] = {"seed": args.seed, "client_id": args.client_id, "client_secret": args.client_secret}
    if args.rows:
        cfg["rows"] = {**SimulatorConfig().rows, **{obj: int(n) for obj, n in args.rows}}
    optional = {
        "default_rows": args.default_rows,
        "step_delay_s": args.step_delay,
        "segment_records": args.segment_records,
        "callback_method": args.callback_method,
        "callback_status_style": args.callback_status_style,
    }
    cfg.update({k: v for k, v in optional.items() if v is not None})
    if args.ui_callout_url:
        cfg["ui_callout"] = UiCalloutConfig(
            url=args.ui_callout_url,
            method=args.ui_callout_method,
            user=args.ui_callout_user,
            password=args.ui_callout_password,
            preemptive=args.ui_callout_preemptive,
            retry_interval_s=args.ui_callout_retry_interval,
        )
    try:
        cfg["faults"] = Faults.model_validate({name: _value(raw) for name, raw in args.fault})
        return SimulatorConfig.model_validate(cfg)
    except ValidationError as exc:
        raise ValueError("; ".join(_problem(err) for err in exc.errors())) from None


_OPTIONS = {
    "seed": "--seed",
    "rows": "--rows",
    "default_rows": "--default-rows",
    "step_delay_s": "--step-delay",
    "segment_records": "--segment-records",
    "ui_callout": "--ui-callout-*",
}


def _problem(err: Any) -> str:
    """One pydantic error as ``--option: message`` (``--fault NAME: message`` for a fault)."""
    loc = [str(p) for p in err["loc"]]
    if not loc:
        where = "options"
    elif loc[0] in _OPTIONS:
        where = _OPTIONS[loc[0]]
    else:  # a fault: Faults validates alone, so its location is the fault's own name
        where = f"--fault {'.'.join(loc)}"
    return f"{where}: {err['msg']}"


def run_simulator(args: argparse.Namespace) -> int:
    """Run the simulator until SIGINT/SIGTERM; prints the base URL and the credentials first."""
    try:
        config = build_config(args)
    except (ValueError, ValidationError) as exc:
        print(f"aqua-pipeline simulator: {exc}", file=sys.stderr)
        return 2
    base = f"http://{args.host}:{args.port}"
    print(f"AQuA simulator on {base}  client_id={config.client_id}  client_secret={config.client_secret}", flush=True)
    web.run_app(create_simulator_app(config), host=args.host, port=args.port, print=None, shutdown_timeout=5)
    return 0
