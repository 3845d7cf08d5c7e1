"""Progress display for long-running CLI work: one updating line on a terminal, plain lines otherwise."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TYPE_CHECKING, TextIO

from pipeline.ledger import JobState

if TYPE_CHECKING:
    from pipeline.app import Components

_BAR = 24


def bar(done: int, total: int) -> str:
    """A text progress bar like ``[#########-----------] 3/8``."""
    total = max(total, 1)
    filled = int(_BAR * min(done, total) / total)
    return f"[{'#' * filled}{'-' * (_BAR - filled)}] {done}/{total}"


class LineProgress:
    """Rewrites one line on a TTY; prints only changed lines elsewhere (CI logs stay readable)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = ""

    def update(self, line: str) -> None:
        if line == self.last:
            return
        self.last = line
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


async def watch_job(c: Components, job_id: str, *, timeout_s: float, poll_s: float = 0.5) -> bool:
    """Follow a job through AQuA and the pipeline until it is published or failed; True when published."""
    progress = LineProgress()
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout_s:
            job = await c.aqua.get_job(job_id)
            item = await c.ledger.get(job_id)
            done = sum(1 for b in job.batches if b.status == "completed")
            state = str(item.state) if item else "-"
            stored = f" {item.total_bytes:,} bytes" if item and item.total_bytes else ""
            progress.update(
                f"{job_id[:12]}… AQuA {job.status:<9} {bar(done, len(job.batches))} pipeline {state}{stored}"
                f" ({time.monotonic() - started:.0f}s)"
            )
            if item is not None and item.state in (JobState.published, JobState.failed):
                progress.close()
                if item.state == JobState.failed:
                    print(f"{job_id}: failed: {item.error_reason}: {item.error_message}", file=sys.stderr)
                return item.state == JobState.published
            await asyncio.sleep(poll_s)
    finally:
        progress.close()
    print(f"{job_id}: still not finished after {timeout_s:.0f}s", file=sys.stderr)
    return False
