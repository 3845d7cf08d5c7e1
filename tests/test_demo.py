"""`aqua-pipeline demo`, the README's first command, as a user runs it: a process that starts its own moto server,
simulator and service, lands a job and says where; and that stops all it started on SIGTERM, as on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest


def demo(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUA_PIPELINE_")}  # embedded defaults only
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "demo", "--records", "300", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_the_demo_lands_a_job_and_says_where() -> None:
    proc = demo()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "5/5 done. What landed:" in out
    assert re.search(
        r"s3://aqua-results-\w+/aqua/.+/Account\.csv\n\s+[\d,]+ bytes, 300 records, sha256 [0-9a-f]{64}", out
    )
    assert re.search(r"manifest: s3://\S+/_manifests/[0-9a-f]{32}\.json", out), out
    assert "event received by the subscriber queue: com.zuora.aqua.export.completed" in out
    moto_port = int(re.search(r"moto server at http://127\.0\.0\.1:(\d+)", out)[1])  # type: ignore[index]
    assert refused(moto_port)  # stopped on the way out


@pytest.mark.timeout(120)
def test_sigterm_stops_the_demo_and_everything_it_started() -> None:
    proc = demo("--keep-running")
    assert proc.stdout is not None
    seen = []
    moto_port = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "".join(seen)  # the demo ended on its own
        seen.append(line)
        if m := re.search(r"moto server at http://127\.0\.0\.1:(\d+)", line):
            moto_port = int(m[1])
        if "Everything is still running" in line:
            break
    assert moto_port is not None and not refused(moto_port), "".join(seen)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(seen) + rest
    assert "Traceback" not in rest, rest
    assert refused(moto_port)  # the moto server went with it
