"""``aqua-pipeline simulator`` arguments and runner."""

from __future__ import annotations

import argparse


def add_simulator_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)


def run_simulator(args: argparse.Namespace) -> int:
    """Run the simulator until interrupted."""
    raise SystemExit("aqua-pipeline: the simulator is not built yet")
