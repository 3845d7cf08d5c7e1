"""What operators see: Prometheus metrics and JSON log lines after a real job, and the health/readiness
probes (draining, and an unreachable AWS endpoint)."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from pipeline.app import RECORDER_KEY, STATE_KEY, PathOnlyAccessLogger, create_app
from pipeline.aqua.models import SubmitRequest
from pipeline.aqua.simulator import SimulatorConfig
from pipeline.ledger import JobState
from pipeline.logs import ContextFilter, JsonFormatter, logging_config
from pipeline.settings import Settings
from pipeline.testing.moto import MotoServer, free_port
from pipeline.testing.stack import running_stack, serve_app

TRACK_ID = "ops-track-7f3a9c"


def request() -> SubmitRequest:
    return SubmitRequest.model_validate(
        {
            "format": "csv",
            "version": "1.1",
            "name": "observed",
            "useQueryLabels": True,
            "queries": [
                {"name": "Account", "type": "zoqlexport", "query": "select Id, Name from Account"},
                {"name": "Invoice", "type": "zoqlexport", "query": "select Id, Amount from Invoice"},
            ],
        }
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition, keyed by (name, sorted labels)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@contextmanager
def json_log_lines() -> Iterator[io.StringIO]:
    """Capture the service's records at INFO and above as its JSON lines (the simulator, which plays Zuora
    in the same process, is not the service: its lines are left out)."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(lambda r: not r.name.startswith("pipeline.aqua.simulator"))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield buf
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def with_admin(s: Settings) -> Settings:
    return s.model_copy(
        update={"security": s.security.model_copy(update={"admin_token": SecretStr("admin-secret-token-xyz")})}
    )


async def test_metrics_and_logs_after_a_real_job(moto_server: MotoServer) -> None:
    cfg = SimulatorConfig(rows={"Account": 1200, "Invoice": 800}, step_delay_s=0.02)
    async with running_stack(moto_server.url, sim_config=cfg, tweak=with_admin) as stack:
        stack.sim.faults.lose_callbacks = True
        with json_log_lines() as logs:
            submitted = await stack.submit(request())
            job_id = submitted.job.id or ""
            await stack.components.aqua.wait_for_job(job_id, poll_interval_s=0.05, timeout_s=30)
            # The worker's downloads meet one 429 and one 503 before they succeed.
            stack.sim.faults.retry_after_s = 0
            stack.sim.faults.rate_limit_scope = "files"
            stack.sim.faults.rate_limit_next = 1
            stack.sim.faults.server_error_scope = "files"
            stack.sim.faults.server_error_next = 1
            url = submitted.notify_url.replace("${JOBID}", job_id).replace("${STATUS}", "completed")
            async with aiohttp.ClientSession() as http:
                async with http.get(url, headers={"Zuora-Track-Id": TRACK_ID}) as resp:
                    assert resp.status == 202
                base = stack.service_url + stack.settings.http.callback_path
                async with http.get(base + "?jobId=nothex&status=completed") as resp:
                    assert resp.status in (400, 401)
                item = await stack.wait_final(job_id)
                assert item.state == JobState.published
                async with http.get(stack.service_url + "/metrics") as resp:
                    assert resp.status == 200
                    assert resp.content_type == "text/plain"
                    text = await resp.text()
        m = samples(text)
        manifest = await stack.components.manifests.load(item.manifest_key or "")

        assert m[("aqua_callbacks_total", (("outcome", "accepted"),))] == 1
        assert sum(v for (n, lbl), v in m.items() if n == "aqua_callbacks_total") == 2  # + the rejected one
        assert m[("aqua_work_queue_lag_seconds_count", ())] >= 1
        assert m[("aqua_jobs_total", (("state", "published"),))] == 1
        assert m[("aqua_transfer_bytes_total", ())] == manifest.total_bytes > 0
        assert m[("aqua_transfer_records_total", ())] == manifest.record_count == 2000
        assert m[("aqua_transfer_duration_seconds_count", ())] == 2
        assert m[("aqua_transfer_duration_seconds_sum", ())] > 0
        assert m[("aqua_upstream_retries_total", (("cause", "rate_limited"),))] == 1
        assert m[("aqua_upstream_retries_total", (("cause", "server_error"),))] == 1
        assert m[("aqua_events_published_total", (("type", "com.zuora.aqua.export.completed"),))] == 1
        assert m[("aqua_callback_ack_seconds_count", ())] == 2
        assert ("aqua_jobs_in_flight", ()) in m

        raw = logs.getvalue()
        lines = [orjson.loads(line) for line in raw.splitlines()]
        assert lines and all({"time", "level", "logger", "message"} <= set(e) for e in lines)
        stored = [e for e in lines if e["logger"] == "pipeline.transfer" and e["message"].startswith("stored s3://")]
        batch_ids = {b.batch_id for b in (await stack.components.aqua.get_job(job_id)).batches}
        assert len(stored) == 2
        for e in stored:
            assert e["job_id"] == job_id
            assert e["track_id"] == TRACK_ID
            assert e["batch_id"] in batch_ids
        assert {e["batch_id"] for e in stored} == batch_ids
        retries = [e for e in lines if e["logger"] == "pipeline.aqua.client" and "; retry " in e["message"]]
        assert len(retries) == 2 and all(e["job_id"] == job_id for e in retries)

        token = stack.components.aqua.auth._token
        secrets = [
            stack.settings.aqua.client_secret.get_secret_value(),
            *(k.get_secret_value() for k in stack.settings.security.signing_keys),
            "admin-secret-token-xyz",
            url.split("token=")[1].split("&")[0],
            token.value if token else "no-token",
        ]
        for secret in secrets:
            assert len(secret) >= 8
            assert secret not in raw, "a secret reached the logs"


async def test_health_and_readiness(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, run_worker=False) as stack, aiohttp.ClientSession() as http:
        async with http.get(stack.service_url + "/healthz") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})
        assert stack.app is not None  # the callback route's ledger batcher has its setting's call slots
        assert stack.app[RECORDER_KEY].fast_path.max_calls == stack.settings.ledger.callback_max_calls == 2
        # An Expect header other than 100-continue gets the JSON error shape too (aiohttp's own 417 is text/plain)
        for path in ("/healthz", "/admin/jobs", stack.settings.http.callback_path):
            async with http.get(stack.service_url + path, headers={"Expect": "0"}) as resp:
                assert (resp.status, (await resp.json())["error"]) == (417, "expectation_failed"), path
        async with http.post(stack.service_url + "/admin/jobs", data=b"{}", expect100=True) as resp:
            assert resp.status == 403 and (await resp.json())["error"] == "admin_disabled"  # 100-continue works
        async with http.get(stack.service_url + "/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200, body
            assert body == {"status": "ready", "checks": {"queue": "ok", "ledger": "ok", "s3": "ok"}}
        assert stack.app is not None
        stack.app[STATE_KEY]["draining"] = True
        async with http.get(stack.service_url + "/readyz") as resp:
            assert (resp.status, await resp.json()) == (503, {"status": "draining"})
        async with http.get(stack.service_url + "/healthz") as resp:
            assert resp.status == 200  # alive while draining: the orchestrator must not kill it early
        stack.app[STATE_KEY]["draining"] = False

        # The same service pointed at an AWS endpoint that does not answer is alive but not ready.
        dead = stack.settings.model_copy(
            update={
                "aws": stack.settings.aws.model_copy(
                    update={
                        "endpoint_url": f"http://127.0.0.1:{free_port()}",
                        "max_attempts": 1,
                        "connect_timeout_s": 1,
                    }
                )
            }
        )
        async with AsyncExitStack() as es:
            url = await serve_app(es, create_app(dead, run_worker=False, run_reconciler=False), free_port())
            async with http.get(url + "/healthz") as resp:
                assert resp.status == 200
            async with http.get(url + "/readyz") as resp:
                body: dict[str, Any] = await resp.json()
                assert resp.status == 503
                assert body["status"] == "not_ready"
                assert set(body["checks"]) == {"queue", "ledger", "s3"}
                assert all(v.startswith("error: ") for v in body["checks"].values()), body


def test_configured_json_lines_keep_their_fields_without_caller_lookup() -> None:
    """configure_logging turns off the per-record caller, thread and process lookups; the lines lose nothing."""
    code = """
import logging
from pipeline.logs import bound, configure_logging
configure_logging("INFO", "json")
seen = []
logging.getLogger().handlers[0].addFilter(lambda r: seen.append(r) or True)
log = logging.getLogger("pipeline.callbacks")
with bound(job_id="a" * 32, track_id="t-1"):
    log.info("callback accepted (status %s, via %s)", "completed", "token", extra={"records": 3})
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("failed")
assert seen and all(r.lineno == 0 and r.thread is None and r.process is None for r in seen), seen
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, second = (orjson.loads(line) for line in proc.stderr.splitlines())
    assert first["message"] == "callback accepted (status completed, via token)"
    assert (first["level"], first["logger"], first["job_id"], first["track_id"]) == (
        "INFO",
        "pipeline.callbacks",
        "a" * 32,
        "t-1",
    )
    assert first["records"] == 3 and first["time"].endswith("+00:00")
    assert second["message"] == "failed" and "ZeroDivisionError" in second["exc"]


def test_the_access_log_is_on_at_debug_only_and_keeps_query_strings_out(caplog: Any) -> None:
    assert logging_config("DEBUG")["loggers"]["aiohttp.access"] == {"level": "INFO"}
    assert logging_config("INFO")["loggers"]["aiohttp.access"] == {"level": "WARNING"}
    request = make_mocked_request("GET", "/callbacks/aqua?token=SECRET-TOKEN&jobId=x")
    logger = logging.getLogger("aiohttp.access.path-only-test")
    with caplog.at_level(logging.INFO, logger=logger.name):
        PathOnlyAccessLogger(logger, "").log(request, web.Response(status=202), 0.001)
    assert "GET /callbacks/aqua 202" in caplog.text and "SECRET" not in caplog.text and "jobId" not in caplog.text
