"""The operator's CLI, driven in-process through ``pipeline.cli.main`` against a running local stack
(configured only through ``AQUA_PIPELINE_*`` variables, as in production)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.ledger import JobState
from pipeline.settings import Settings
from pipeline.testing.moto import MotoServer, free_port
from pipeline.testing.procs import settings_env
from pipeline.testing.stack import Stack, running_stack

ACCOUNTS = Path(__file__).resolve().parents[1] / "examples" / "jobs" / "accounts.yaml"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """``main`` configures the root logger for the process; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)


def use(settings: Settings, **extra: str) -> None:
    """Point the CLI at ``settings`` through the environment (the conftest cleans it up)."""
    os.environ.update(settings_env(settings))
    os.environ["AQUA_PIPELINE_LOG_LEVEL"] = "WARNING"
    os.environ.update(extra)


async def cli(*argv: str) -> int:
    """``aqua-pipeline ARGV`` in a thread (it runs its own event loop)."""
    return await asyncio.to_thread(main, list(argv))


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


async def test_submit_wait_status_jobs_replay(moto_server: MotoServer, capsys: pytest.CaptureFixture[str]) -> None:
    async with running_stack(moto_server.url) as stack:
        use(stack.settings)
        assert await cli("submit", str(ACCOUNTS), "--wait", "--timeout", "60") == 0
        out, err = capsys.readouterr()
        job_id = re.search(r"submitted ([0-9a-f]{32}) \(nightly-accounts\)", err)
        assert job_id, err
        job = job_id.group(1)
        assert "pipeline published" in err  # the progress line reached the end state
        item = await stack.components.ledger.get(job)
        assert item is not None and item.state == JobState.published

        assert await cli("status", job) == 0
        out, _ = capsys.readouterr()
        import orjson

        view = orjson.loads(out)
        assert view["ledger"]["state"] == "published"
        assert view["ledger"]["total_bytes"] == item.total_bytes
        assert view["aqua"]["status"] == "completed"

        assert await cli("jobs") == 0
        out, _ = capsys.readouterr()
        header, *rows = out.splitlines()
        assert header.split()[:4] == ["JOB", "ID", "STATE", "BYTES"]
        assert "DURATION" in header and "ERROR" in header
        (row,) = [r for r in rows if r.startswith(job)]
        assert row.split()[1] == "published"
        assert f"{item.total_bytes:,}" in row

        manifest = await stack.components.manifests.load(item.manifest_key or "")
        before = {o.key: await stack.object_bytes(o.key) for o in manifest.objects}
        first_events = await stack.drain_events(wait_s=0)
        assert len(first_events) == 1

        assert await cli("replay", job) == 0
        out, _ = capsys.readouterr()
        assert out.strip() == f"replay of {job} enqueued"
        again = await wait_republished(stack, job)
        assert again.manifest_key == item.manifest_key
        assert {o.key: await stack.object_bytes(o.key) for o in manifest.objects} == before
        second_events = await stack.drain_events()
        assert [e["id"] for e in second_events] == [first_events[0]["id"]]  # consumers de-duplicate by id


async def wait_republished(stack: Stack, job_id: str, timeout_s: float = 30) -> object:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        item = await stack.components.ledger.get(job_id)
        if item is not None and item.state == JobState.published and item.attempts >= 2:
            return item
        await asyncio.sleep(0.1)
    raise TimeoutError("replay did not land")


async def test_cancel_a_running_job(moto_server: MotoServer, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.aqua.simulator import SimulatorConfig

    async with running_stack(moto_server.url, sim_config=SimulatorConfig(step_delay_s=1.0)) as stack:
        use(stack.settings)
        assert await cli("submit", str(ACCOUNTS)) == 0
        out, _ = capsys.readouterr()
        job = out.strip()
        assert re.fullmatch(r"[0-9a-f]{32}", job), out
        assert await cli("cancel", job) == 0
        out, _ = capsys.readouterr()
        assert out.strip() == f"{job}: cancelled"
        item = await stack.wait_final(job)
        assert (item.state, item.error_reason) == (JobState.failed, "job_cancelled")


async def test_errors_are_one_clear_line(moto_server: MotoServer, capsys: pytest.CaptureFixture[str]) -> None:
    async with running_stack(moto_server.url, start_service=False) as stack:
        use(stack.settings)
        assert await cli("check-config") == 0
        out, _ = capsys.readouterr()
        assert '"bucket": "' + stack.settings.s3.bucket + '"' in out
        assert "sim-secret" not in out and "dev-signing-key" not in out

        os.environ["AQUA_PIPELINE_QUEUE__CONCURRENCY"] = "lots"
        assert await cli("check-config") == 2
        _, err = capsys.readouterr()
        (line,) = errors(err)
        assert line.startswith("aqua-pipeline: invalid configuration: AQUA_PIPELINE_QUEUE__CONCURRENCY: ")
        del os.environ["AQUA_PIPELINE_QUEUE__CONCURRENCY"]

        assert await cli("status", "not-a-job") == 1
        _, err = capsys.readouterr()
        assert errors(err) == ["aqua-pipeline: 'not-a-job' is not an AQuA job id (32 hex characters)"]

        dead = f"http://127.0.0.1:{free_port()}"
        os.environ["AQUA_PIPELINE_AQUA__BASE_URL"] = dead
        os.environ["AQUA_PIPELINE_AQUA__MAX_ATTEMPTS"] = "1"
        for argv in (["status", "a" * 32], ["submit", str(ACCOUNTS)], ["cancel", "a" * 32]):
            assert await cli(*argv) == 1
            _, err = capsys.readouterr()
            (line,) = errors(err)
            assert line.startswith(f"aqua-pipeline: AQuA at {dead} is unavailable: "), line


async def test_submit_rejects_a_bad_definition_file(
    moto_server: MotoServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nnotifyUrl: http://example.com/cb\nqueries:\n  - {name: A, query: select Id from Account}\n"
    )
    async with running_stack(moto_server.url, start_service=False) as stack:
        use(stack.settings)
        assert await cli("submit", str(bad)) == 1
        _, err = capsys.readouterr()
        first, *problems = errors(err)  # a headline, then one line per problem
        assert first == f"aqua-pipeline: invalid job definitions in {bad}:"
        assert len(problems) == 1 and "notifyUrl is not allowed" in problems[0]


async def test_start_up_problems_are_one_clear_line(
    moto_server: MotoServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `serve` cannot start with, it says in one line and a non-zero exit, not a traceback."""
    import socket

    async with running_stack(moto_server.url, start_service=False) as stack:
        use(stack.settings)
        del os.environ["AQUA_PIPELINE_EVENTS__TOPIC_ARN"]  # the default target, sns, needs it
        for argv in (["check-config"], ["serve"]):
            assert await cli(*argv) == 2
            _, err = capsys.readouterr()
            assert errors(err) == [
                "aqua-pipeline: AQUA_PIPELINE_EVENTS__TOPIC_ARN is required when the events target is sns"
            ]
        assert await cli("jobs") == 0  # the operator commands publish nothing: they do not need it
        capsys.readouterr()
        use(stack.settings)

        with socket.socket() as taken:  # the port is already in use
            taken.bind((stack.settings.http.host, 0))
            taken.listen()
            os.environ["AQUA_PIPELINE_HTTP__PORT"] = str(taken.getsockname()[1])
            assert await cli("serve") == 1
            _, err = capsys.readouterr()
            (line,) = errors(err)
            assert line.startswith("aqua-pipeline: ") and "address already in use" in line, line
            assert f"cannot listen on {stack.settings.http.host}:{taken.getsockname()[1]}" in line
            assert "AQUA_PIPELINE_HTTP__PORT" in line
        use(stack.settings)
        os.environ["AQUA_PIPELINE_HTTP__HOST"] = "no-such-host.invalid"  # a name that does not resolve
        assert await cli("serve") == 1
        _, err = capsys.readouterr()
        (line,) = errors(err)
        assert "cannot listen on no-such-host.invalid:" in line and "AQUA_PIPELINE_HTTP__HOST" in line, line
        use(stack.settings)

        dead = f"http://127.0.0.1:{free_port()}"  # AWS unreachable: the work queue's address cannot be looked up
        os.environ.pop("AQUA_PIPELINE_QUEUE__WORK_QUEUE_URL", None)
        os.environ["AQUA_PIPELINE_AWS__ENDPOINT_URL"] = dead
        os.environ["AQUA_PIPELINE_AWS__MAX_ATTEMPTS"] = "1"
        assert await cli("serve") == 1
        _, err = capsys.readouterr()
        (line,) = errors(err)
        assert line.startswith(f"aqua-pipeline: AWS at {dead}: "), line


async def test_submit_says_which_jobs_were_not_submitted(
    moto_server: MotoServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """AQuA refuses the second of three jobs (its concurrent-job limit): the first's id is on stdout, and the
    error names the refused job and the one after it, so a re-run can leave the first out."""
    from pipeline.aqua.simulator import SimulatorConfig

    query = [{"name": "Account", "type": "zoqlexport", "query": "select Id from Account"}]
    jobs = [{"name": n, "version": "1.0", "format": "csv", "queries": query} for n in ("one", "two", "three")]
    path = tmp_path / "three.json"
    path.write_text(json.dumps({"jobs": jobs}))
    async with running_stack(
        moto_server.url, sim_config=SimulatorConfig(step_delay_s=5.0, max_concurrent_jobs=1)
    ) as stack:
        use(stack.settings)
        assert await cli("submit", str(path)) == 1
        out, err = capsys.readouterr()
        assert re.fullmatch(r"[0-9a-f]{32}", out.strip()), out
        assert "job two was not submitted" in err and "not submitted after it: three" in err, err
        assert list(stack.sim.jobs) == [out.strip()]
