"""The end-to-end demo (work in progress)."""

from __future__ import annotations

import argparse


async def run_demo(args: argparse.Namespace) -> int:
    """Run the demo."""
    raise SystemExit("aqua-pipeline: the demo is not built yet")
