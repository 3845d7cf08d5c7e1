"""What every bench command shares: helper processes (moto, the AQuA simulator), statistics, the machine
description, the result table and the JSON file under ``bench/results/``."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from pipeline.testing.moto import MotoServer, start_moto

RESULTS = Path(__file__).parent / "results"
UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "B": 1}


def parse_size(text: str) -> int:
    """``"256MiB"`` -> bytes (KiB/MiB/GiB or plain bytes)."""
    text = text.strip()
    for unit, mult in UNITS.items():
        if text.endswith(unit) and unit != "B":
            return int(float(text[: -len(unit)]) * mult)
    return int(text.removesuffix("B"))


def fmt_size(n: int) -> str:
    """Bytes as the largest whole binary unit that reads well."""
    for unit in ("GiB", "MiB", "KiB"):
        if n >= UNITS[unit]:
            return f"{n / UNITS[unit]:.4g}{unit}"
    return f"{n}B"


def median(values: Sequence[float]) -> float:
    """Median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100), NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def machine() -> dict[str, Any]:
    """Where the figures come from: cores, memory, Python, load, date."""
    mem = ""
    try:
        mem = subprocess.run(["free", "-h"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg": os.getloadavg(),
        "free": mem,
    }


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that is running, as it could be typed again."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "-m", module, *args])


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``bench/results/<name>-<timestamp>.json``; returns the path."""
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (so it pastes into docs/benchmarks.md as is)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers at all (any HTTP status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@contextmanager
def moto() -> Iterator[MotoServer]:
    """A moto server process for the duration of the block."""
    server = start_moto()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def simulator_process(port: int, *args: str) -> Iterator[str]:
    """``python -m pipeline simulator`` as its own process; yields its base URL."""
    with simulator_proc(port, *args) as (url, _):
        yield url


@contextmanager
def simulator_proc(port: int, *args: str) -> Iterator[tuple[str, int]]:
    """Like :func:`simulator_process`, yielding (base URL, pid) for per-process accounting."""
    cmd = [sys.executable, "-m", "pipeline", "simulator", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/_sim/faults", proc)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_s_of(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (0 when unknown)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def rss_mib_of(pid: int) -> float:
    """Current resident set size of process ``pid`` in MiB (0 when unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
