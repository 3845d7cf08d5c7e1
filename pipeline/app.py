"""create_app(settings): the one factory that wires the service (work in progress)."""

from __future__ import annotations

from pipeline.settings import Settings


def serve(settings: Settings) -> None:
    """Run the service until SIGTERM."""
    raise SystemExit("aqua-pipeline: serve is not built yet")
