"""CSV verifier benchmark: ``CsvVerifier`` against Python's ``csv`` module on the same AQuA file, in one process.

The simulator produces an Account export (quoted fields, some with embedded newlines); every variant reads it
from memory in the same chunks. The baseline counts records and checks every row's field count with
``csv.reader`` (what a hand-written check would do); ``ours`` is the transfer's verifier with its default engine
(the C extension), ``ours_python`` the same verifier on its pure-Python engine (the fallback when the extension
is not built). CPU seconds per GiB, best of ``--repeat``, and the ratio to ours.

    python -m bench.verifier --size 64MiB --repeat 5
    python -m bench.verifier --quick
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from collections.abc import Callable

from bench.common import command_line, fmt_size, machine, parse_size, simulator_proc, table, write_results
from bench.transfer import _open, _token, make_file, rows_for
from pipeline.csvcheck import CsvVerifier, Engine
from pipeline.testing.moto import free_port

GIB = 1024**3


def fetch(size: int) -> tuple[bytes, int]:
    """An Account file of about ``size`` bytes from a simulator process; returns (bytes, records)."""
    with simulator_proc(free_port()) as (sim, _):
        token = _token(sim)
        rows = rows_for(sim, token, size)
        file_id, _ = make_file(sim, token, rows)
        with _open(sim, token, file_id) as resp:
            return resp.read(), rows


def _verify(chunks: list[bytes], engine: Engine) -> int:
    v = CsvVerifier(delimiter=b",", check_shape=True, engine=engine)
    for chunk in chunks:
        v.feed(chunk)
    report = v.finish()
    report.raise_for_errors()
    return report.records


def ours(chunks: list[bytes]) -> int:
    """Records counted (and shape checked) by the transfer's verifier, C engine."""
    return _verify(chunks, "c")


def ours_python(chunks: list[bytes]) -> int:
    """The same on the pure-Python engine."""
    return _verify(chunks, "python")


def csv_module(chunks: list[bytes]) -> int:
    """Records counted, and every row's field count checked, with ``csv.reader``."""
    reader = csv.reader(io.TextIOWrapper(io.BytesIO(b"".join(chunks)), encoding="utf-8", newline=""))
    width = len(next(reader))
    records = 0
    for row in reader:
        if row and len(row) != width:
            raise ValueError(f"row {records + 2} has {len(row)} fields")
        records += 1 if row else 0
    return records


def best_cpu(fn: Callable[[list[bytes]], int], chunks: list[bytes], repeat: int, expected: int) -> float:
    """Least CPU seconds of ``repeat`` runs; checks the record count each time."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        got = fn(chunks)
        best = min(best, time.process_time() - start)
        if got != expected:
            raise RuntimeError(f"{fn.__name__} counted {got} records, expected {expected}")
    return best


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.verifier``."""
    p = argparse.ArgumentParser(prog="python -m bench.verifier", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="64MiB")
    p.add_argument("--chunk", default="64KiB", help="chunk size fed to each side")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="do not write bench/results/*.json")
    p.add_argument("--quick", action="store_true", help="CI smoke: 1MiB, 1 repetition")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.repeat = "1MiB", 1
    data, records = fetch(parse_size(a.size))
    step = parse_size(a.chunk)
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    gib = len(data) / GIB
    variants = (("csv_module", csv_module), ("ours_python", ours_python), ("ours", ours))
    cpu = {name: best_cpu(fn, chunks, a.repeat, records) / gib for name, fn in variants}
    rows = [{"variant": name, "cpu_s_per_gib": c, "x_ours": c / cpu["ours"]} for name, c in cpu.items()]
    print(f"# {fmt_size(len(data))}, {records} records, {fmt_size(step)} chunks, best of {a.repeat}")
    print(table(["variant", "CPU s/GiB", "x ours"], [[r["variant"], r["cpu_s_per_gib"], r["x_ours"]] for r in rows]))
    if not a.no_write:
        result = {"bench": "verifier", "command": command_line("bench.verifier"), "machine": machine(), "rows": rows}
        print(f"results: {write_results('verifier', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
