"""Upstream faults from the AQuA simulator (429 storms, 5xx bursts, trickling bodies, cut connections, a lying
Content-Length, tokens that expire early), end to end over loopback HTTP with moto as a real process.

Every scenario ends either in success (the stored bytes are the simulator's bytes, one completed event) or, after
the bounded retries, in one failure event with the reason, the work message in the DLQ, and no object, no
multipart upload left behind. Checked on the data: S3, the manifest, the subscriber queue, the ledger, the DLQ.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from pipeline.aqua.models import SubmitRequest
from pipeline.aqua.simulator import SimulatorConfig, file_digest
from pipeline.ledger import JobState, LedgerItem
from pipeline.processor import Outcome
from pipeline.settings import Settings
from pipeline.testing.moto import MotoServer
from pipeline.testing.stack import Stack, running_stack

ROWS = {"Account": 1500, "Invoice": 800}


def two_queries(name: str = "faults", fmt: str = "csv") -> SubmitRequest:
    """A two-batch job (small files, so every scenario stays fast)."""
    return SubmitRequest.model_validate(
        {
            "format": fmt,
            "version": "1.1",
            "name": name,
            "useQueryLabels": True,
            "queries": [
                {"name": "Account", "type": "zoqlexport", "query": "select Id, Name, Balance from Account"},
                {"name": "Invoice", "type": "zoqlexport", "query": "select * from Invoice"},
            ],
        }
    )


def fast_retries(
    *, max_receives: int = 2, aqua_attempts: int = 4, retry_window_s: float = 0
) -> Callable[[Settings], Settings]:
    """Few receives, short visibility, quick upstream backoff, no retry window: a failing job reaches the DLQ in
    seconds."""

    def tweak(s: Settings) -> Settings:
        queue = {"max_receives": max_receives, "visibility_timeout_s": 5, "wait_time_s": 1}
        return s.model_copy(
            update={
                "queue": s.queue.model_copy(update={**queue, "retry_window_s": retry_window_s}),
                "aqua": s.aqua.model_copy(
                    update={"max_attempts": aqua_attempts, "backoff_base_s": 0.02, "backoff_cap_s": 0.1}
                ),
            }
        )

    return tweak


def sim_config() -> SimulatorConfig:
    return SimulatorConfig(rows=dict(ROWS), step_delay_s=0.01)


async def land(stack: Stack, req: SubmitRequest, *, timeout_s: float = 40) -> tuple[str, LedgerItem]:
    submitted = await stack.submit(req)
    job_id = submitted.job.id or ""
    return job_id, await stack.wait_final(job_id, timeout_s=timeout_s)


async def bucket_keys(stack: Stack) -> list[str]:
    listed = await stack.clients.s3.list_objects_v2(Bucket=stack.settings.s3.bucket)
    return [o["Key"] for o in listed.get("Contents", [])]


async def open_uploads(stack: Stack) -> list[Any]:
    uploads = await stack.clients.s3.list_multipart_uploads(Bucket=stack.settings.s3.bucket)
    return list(uploads.get("Uploads", []))


async def dlq_job_ids(stack: Stack, *, timeout_s: float = 15) -> list[str]:
    """Job ids of the work messages in the DLQ; polls until one shows up or the deadline passes.

    SQS moves a message to the DLQ on the receive after its last allowed one, so the worker must keep polling.
    """
    deadline = time.monotonic() + timeout_s
    found: list[str] = []
    while time.monotonic() < deadline and not found:
        resp = await stack.clients.sqs.receive_message(
            QueueUrl=stack.resources.dlq_url, MaxNumberOfMessages=10, WaitTimeSeconds=1, VisibilityTimeout=30
        )
        found = [orjson.loads(m["Body"])["job_id"] for m in resp.get("Messages", [])]
    return found


async def assert_landed_intact(stack: Stack, job_id: str, item: LedgerItem) -> dict[str, int]:
    """Published once; every object is exactly the simulator's file; one completed event; nothing stray."""
    assert item.state == JobState.published, item
    assert item.manifest_key
    manifest = await stack.components.manifests.load(item.manifest_key)
    assert {o.batch_name for o in manifest.objects} == set(ROWS)
    for obj in manifest.objects:
        size, sha, records = await file_digest(stack.sim, obj.file_id)
        data = await stack.object_bytes(obj.key)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha), obj.key
        assert (obj.size, obj.sha256, obj.record_count) == (size, sha, records)
    assert manifest.record_count == sum(ROWS.values())
    events = await stack.drain_events()
    assert [(e["type"], e["data"]["job_id"]) for e in events] == [("com.zuora.aqua.export.completed", job_id)]
    assert sorted(await bucket_keys(stack)) == sorted([o.key for o in manifest.objects] + [item.manifest_key])
    assert await open_uploads(stack) == []
    return {"objects": len(manifest.objects), "events": len(events)}


async def assert_failed_cleanly(stack: Stack, job_id: str, item: LedgerItem, reason: str) -> None:
    """One failure event with the reason, the message in the DLQ, no object and no open upload."""
    assert item.state == JobState.failed, item
    assert item.error_reason == reason, item
    events = await stack.drain_events()
    assert [(e["type"], e["data"]["job_id"], e["data"]["reason"]) for e in events] == [
        ("com.zuora.aqua.export.failed", job_id, reason)
    ]
    assert events[0]["data"]["message"]
    assert await bucket_keys(stack) == []
    assert await open_uploads(stack) == []
    assert await dlq_job_ids(stack) == [job_id]
    assert await stack.components.queue.depth() == 0


# -- transient faults: the job lands intact ----------------------------------------------------------


async def test_429_storm_with_retry_after_lands_intact(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, sim_config=sim_config(), tweak=fast_retries(aqua_attempts=6)) as stack:
        stack.sim.faults.rate_limit_next = 4
        stack.sim.faults.retry_after_s = 1
        stack.sim.faults.rate_limit_scope = "files"
        started = time.monotonic()
        job_id, item = await land(stack, two_queries())
        await assert_landed_intact(stack, job_id, item)
        assert stack.sim.faults.rate_limit_next == 0  # every 429 was served
        # Retry-After: 1 was honoured (our own backoff is capped at 0.1 s): at least 4 s were spent waiting.
        assert time.monotonic() - started >= 4


async def test_a_retry_after_beyond_the_clients_budget_is_passed_on_to_the_queue(moto_server: MotoServer) -> None:
    """AQuA asks for 600 s, longer than the client waits in-process (``max_retry_time_s``): the attempt ends as a
    retry that carries the 600 s, so the worker keeps the message away that long instead of its own 5-40 s
    backoff, and the job is not failed after a few quick receives inside the window the server asked for."""
    async with running_stack(moto_server.url, sim_config=sim_config(), run_worker=False) as stack:
        stack.sim.faults.lose_callbacks = True
        job_id = (await stack.submit(two_queries())).job.id or ""
        await stack.components.aqua.wait_for_job(job_id, poll_interval_s=0.02, timeout_s=20)
        stack.sim.faults.rate_limit_next, stack.sim.faults.retry_after_s = 100, 600
        result = await stack.components.processor.process(job_id, owner="test", lease_s=30, final_attempt=False)
        assert (result.outcome, result.retry_after_s) == (Outcome.RETRY, 600)
        item = await stack.components.ledger.get(job_id)
        assert item is not None and not item.done and item.lease_owner is None


async def test_5xx_burst_lands_intact(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, sim_config=sim_config(), tweak=fast_retries()) as stack:
        stack.sim.faults.server_error_next = 3
        stack.sim.faults.server_error_status = 502
        job_id, item = await land(stack, two_queries())
        await assert_landed_intact(stack, job_id, item)
        assert stack.sim.faults.server_error_next == 0


async def test_trickling_body_lands_intact(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, sim_config=sim_config(), tweak=fast_retries()) as stack:
        stack.sim.faults.trickle_bytes_per_s = 400_000
        job_id, item = await land(stack, two_queries())
        await assert_landed_intact(stack, job_id, item)


async def test_connection_cut_mid_file_once_is_retried_and_lands_intact(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, sim_config=sim_config(), tweak=fast_retries(max_receives=3)) as stack:
        stack.sim.faults.cut_file_after_bytes = 1000
        stack.sim.faults.cut_file_next = 1
        job_id, item = await land(stack, two_queries())
        await assert_landed_intact(stack, job_id, item)
        assert item.attempts >= 2  # the cut attempt was abandoned, a later one landed the job


async def test_tokens_expiring_early_are_refreshed(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, sim_config=sim_config(), tweak=fast_retries()) as stack:
        stack.sim.faults.expire_tokens_early = True
        job_id, item = await land(stack, two_queries())
        await assert_landed_intact(stack, job_id, item)


# -- persistent faults: a failure event, the message in the DLQ, no partial object ------------------


async def test_persistent_cut_ends_in_failure_event_and_dlq(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, sim_config=sim_config(), tweak=fast_retries(max_receives=2)) as stack:
        stack.sim.faults.cut_file_after_bytes = 1000
        job_id, item = await land(stack, two_queries())
        assert item.attempts == 2  # one retry through the queue, then the final attempt
        await assert_failed_cleanly(stack, job_id, item, "AquaUnavailable")


async def test_wrong_content_length_never_stores_or_announces_wrong_bytes(moto_server: MotoServer) -> None:
    """A declared length the body never reaches (gzip files are sent with Content-Length) is a failure."""
    async with running_stack(moto_server.url, sim_config=sim_config(), tweak=fast_retries(max_receives=1)) as stack:
        stack.sim.faults.wrong_content_length = True
        job_id, item = await land(stack, two_queries(fmt="gzip"))
        await assert_failed_cleanly(stack, job_id, item, "AquaUnavailable")
        assert "truncated download" in (item.error_message or "")


async def test_wrong_content_length_does_not_touch_transport_gzip(moto_server: MotoServer) -> None:
    """CSV comes with transport gzip (chunked, no Content-Length): the fault cannot apply, the job lands."""
    async with running_stack(moto_server.url, sim_config=sim_config(), tweak=fast_retries(max_receives=1)) as stack:
        stack.sim.faults.wrong_content_length = True
        job_id, item = await land(stack, two_queries())
        await assert_landed_intact(stack, job_id, item)


async def test_persistent_5xx_on_files_ends_in_failure_event_and_dlq(moto_server: MotoServer) -> None:
    tweak = fast_retries(max_receives=1, aqua_attempts=2)
    async with running_stack(moto_server.url, sim_config=sim_config(), tweak=tweak) as stack:
        stack.sim.faults.server_error_next = 10_000
        stack.sim.faults.server_error_scope = "files"
        job_id, item = await land(stack, two_queries())
        await assert_failed_cleanly(stack, job_id, item, "AquaUnavailable")


async def test_an_outage_longer_than_the_receives_does_not_fail_the_job(moto_server: MotoServer) -> None:
    """AQuA answers 503 for longer than the queue's receives last: within the retry window the message is sent
    again with fresh receives, and the job lands once AQuA is back, rather than failing for good."""
    tweak = fast_retries(max_receives=1, aqua_attempts=1, retry_window_s=600)
    async with running_stack(moto_server.url, sim_config=sim_config(), tweak=tweak) as stack:
        stack.sim.faults.server_error_next = 2  # two receives' worth: one attempt each
        stack.sim.faults.server_error_scope = "files"
        job_id, item = await land(stack, two_queries(), timeout_s=60)
        await assert_landed_intact(stack, job_id, item)
        assert item.attempts >= 3
        dlq = await stack.clients.sqs.get_queue_attributes(
            QueueUrl=stack.resources.dlq_url, AttributeNames=["ApproximateNumberOfMessages"]
        )
        assert dlq["Attributes"]["ApproximateNumberOfMessages"] == "0"


# -- the long version: several jobs through a mix of faults --------------------------------------------


@pytest.mark.slow
async def test_many_jobs_through_mixed_faults_each_land_once(moto_server: MotoServer) -> None:
    tweak = fast_retries(max_receives=6, aqua_attempts=6)
    async with running_stack(moto_server.url, sim_config=sim_config(), tweak=tweak) as stack:
        f = stack.sim.faults
        f.rate_limit_next, f.retry_after_s, f.rate_limit_scope = 10, 1, "files"
        f.server_error_next, f.server_error_scope = 10, "files"
        f.cut_file_after_bytes, f.cut_file_next = 2000, 3
        f.trickle_bytes_per_s = 2_000_000
        submitted = [await stack.submit(two_queries(f"mix{i}")) for i in range(6)]
        items = await asyncio.gather(*(stack.wait_final(s.job.id or "", timeout_s=120) for s in submitted))
        assert all(i.state == JobState.published for i in items), items
        events = await stack.drain_events(wait_s=2)
        assert sorted(e["data"]["job_id"] for e in events) == sorted(s.job.id or "" for s in submitted)
        for item in items:
            assert item.manifest_key
            manifest = await stack.components.manifests.load(item.manifest_key)
            for obj in manifest.objects:
                size, sha, _ = await file_digest(stack.sim, obj.file_id)
                data = await stack.object_bytes(obj.key)
                assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha)
        assert await open_uploads(stack) == []
