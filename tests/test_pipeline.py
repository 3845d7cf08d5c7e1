"""End to end, over real HTTP: the AQuA simulator calls the service's callback route, the worker streams
files into S3 on a moto server process, the manifest is committed, and a subscriber queue gets the event."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import aiohttp
import boto3
import orjson
import pytest

from pipeline.app import METRICS_KEY
from pipeline.aqua.models import SubmitRequest
from pipeline.aqua.simulator import SimulatorConfig, file_digest
from pipeline.errors import AquaAuthError, LedgerError
from pipeline.events import event_id
from pipeline.ledger import JobState
from pipeline.models import EVENT_TYPE_COMPLETED, WorkMessage
from pipeline.processor import Outcome
from pipeline.settings import Settings
from pipeline.testing.moto import MotoServer
from pipeline.testing.stack import Stack, running_stack


def request(
    name: str = "e2e", fmt: str = "csv", queries: list[dict[str, Any]] | None = None, **extra: Any
) -> SubmitRequest:
    body: dict[str, Any] = {
        "format": fmt,
        "version": "1.1",
        "name": name,
        "useQueryLabels": True,
        "queries": queries
        or [
            {"name": "Account", "type": "zoqlexport", "query": "select Id, Name, Balance, UpdatedDate from Account"},
            {"name": "Invoice", "type": "zoqlexport", "query": "select * from Invoice"},
        ],
    }
    body.update(extra)
    return SubmitRequest.model_validate(body)


def small_parts(s: Settings) -> Settings:
    return s.model_copy(update={"s3": s.s3.model_copy(update={"part_size": 5 * 1024 * 1024, "parts_in_flight": 2})})


async def land(stack: Stack, req: SubmitRequest, timeout_s: float = 60) -> tuple[str, Any]:
    submitted = await stack.submit(req)
    job_id = submitted.job.id or ""
    item = await stack.wait_final(job_id, timeout_s=timeout_s)
    return job_id, item


async def assert_objects_match_simulator(stack: Stack, manifest: Any) -> None:
    for obj in manifest.objects:
        size, sha, records = await file_digest(stack.sim, obj.file_id)
        data = await stack.object_bytes(obj.key)
        assert len(data) == obj.size
        assert hashlib.sha256(data).hexdigest() == obj.sha256
        if obj.content_encoding is None and obj.key.endswith(".csv"):
            assert obj.sha256 == sha, f"{obj.key} differs from the simulator's file"
            assert obj.size == size
            assert obj.record_count == records


async def finished_job(stack: Stack) -> str:
    """A job AQuA has finished and whose callback it lost: the test drives the processor itself."""
    stack.sim.faults.lose_callbacks = True
    job_id = (await stack.submit(request())).job.id or ""
    await stack.components.aqua.wait_for_job(job_id, poll_interval_s=0.05, timeout_s=30)
    return job_id


async def test_end_to_end_single_job(moto_server: MotoServer) -> None:
    cfg = SimulatorConfig(rows={"Account": 3000, "Invoice": 5000}, step_delay_s=0.02)
    async with running_stack(moto_server.url, sim_config=cfg) as stack:
        job_id, item = await land(stack, request())
        assert item.state == JobState.published, item
        manifest = await stack.components.manifests.load(item.manifest_key)
        assert [o.batch_name for o in manifest.objects] == ["Account", "Invoice"]
        assert manifest.record_count == 8000
        await assert_objects_match_simulator(stack, manifest)
        events = await stack.drain_events()
        assert len(events) == 1
        ev = events[0]
        assert ev["type"] == "com.zuora.aqua.export.completed"
        assert ev["data"]["job_id"] == job_id
        assert ev["data"]["manifest_key"] == item.manifest_key


async def test_plain_boto3_consumer_reads_the_event(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url) as stack:
        job_id, item = await land(stack, request())
        assert item.state == JobState.published

        def consume() -> list[dict[str, Any]]:
            sqs = boto3.client(
                "sqs",
                endpoint_url=moto_server.url,
                region_name="us-east-1",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )
            resp = sqs.receive_message(QueueUrl=stack.resources.subscriber_queue_url, WaitTimeSeconds=2)
            return [orjson.loads(orjson.loads(m["Body"])["Message"]) for m in resp.get("Messages", [])]

        events = await asyncio.to_thread(consume)
        assert [e["data"]["job_id"] for e in events] == [job_id]
        assert events[0]["specversion"] == "1.0"


@pytest.mark.parametrize("fmt", ["gzip", "zip"])
async def test_compressed_formats_are_stored_as_delivered(moto_server: MotoServer, fmt: str) -> None:
    async with running_stack(moto_server.url) as stack:
        _, item = await land(stack, request(fmt=fmt))
        assert item.state == JobState.published
        manifest = await stack.components.manifests.load(item.manifest_key)
        total = 0
        for obj in manifest.objects:
            size, sha, records = await file_digest(stack.sim, obj.file_id)
            assert (obj.size, obj.sha256) == (size, sha)
            assert obj.key.endswith(".csv.gz" if fmt == "gzip" else ".zip")
            # a gzip file's CSV is counted as it streams; a ZIP archive is stored unopened, so not counted
            assert obj.record_count == (records if fmt == "gzip" else None)
            total += records
        assert manifest.record_count == total > 0  # ZIP: AQuA's recordCount stands in for the uncounted files


async def test_transport_gzip_stored_as_csv_gz(moto_server: MotoServer) -> None:
    def gz(s: Settings) -> Settings:
        return s.model_copy(update={"s3": s.s3.model_copy(update={"store_csv_gzip": True})})

    async with running_stack(moto_server.url, tweak=gz) as stack:
        _, item = await land(stack, request())
        manifest = await stack.components.manifests.load(item.manifest_key)
        import gzip

        for obj in manifest.objects:
            assert obj.key.endswith(".csv.gz")
            _, sha, records = await file_digest(stack.sim, obj.file_id)
            decoded = gzip.decompress(await stack.object_bytes(obj.key))
            assert hashlib.sha256(decoded).hexdigest() == sha
            assert obj.record_count == records


@pytest.mark.parametrize("fmt", ["csv", "zip"])
async def test_segments_of_a_stateful_full_load(moto_server: MotoServer, fmt: str) -> None:
    """Segments land as numbered objects; their counts must add up to the batch's (CSV). ZIP segments are not
    counted, and must not fail that check for it: the manifest carries AQuA's recordCount."""
    cfg = SimulatorConfig(rows={"Account": 2500}, segment_records=1000, step_delay_s=0.02)
    async with running_stack(moto_server.url, sim_config=cfg) as stack:
        req = request(
            name="seg",
            fmt=fmt,
            partner="examplepartner",
            project=f"p-{id(stack)}",
            queries=[{"name": "Account", "type": "zoqlexport", "query": "select Id, Name from Account"}],
        )
        _, item = await land(stack, req)
        assert item.state == JobState.published
        manifest = await stack.components.manifests.load(item.manifest_key)
        assert [o.segment for o in manifest.objects] == [1, 2, 3]
        ext = "csv" if fmt == "csv" else "zip"
        assert [o.key.rsplit("/", 1)[1] for o in manifest.objects] == [f"Account-0000{i}.{ext}" for i in (1, 2, 3)]
        assert manifest.record_count == 2500
        assert all(o.full for o in manifest.objects)
        if fmt == "csv":
            assert sum(o.record_count or 0 for o in manifest.objects) == 2500
            await assert_objects_match_simulator(stack, manifest)
        else:
            assert [o.record_count for o in manifest.objects] == [None, None, None]
            for obj in manifest.objects:
                size, sha, _ = await file_digest(stack.sim, obj.file_id)
                assert (obj.size, obj.sha256) == (size, sha)


async def test_empty_result_lands_with_zero_records(moto_server: MotoServer) -> None:
    cfg = SimulatorConfig(rows={"Account": 0}, step_delay_s=0.02)
    async with running_stack(moto_server.url, sim_config=cfg) as stack:
        req = request(queries=[{"name": "Account", "type": "zoqlexport", "query": "select Id from Account"}])
        _, item = await land(stack, req)
        assert item.state == JobState.published
        manifest = await stack.components.manifests.load(item.manifest_key)
        assert manifest.record_count == 0
        events = await stack.drain_events()
        assert [e["type"] for e in events] == ["com.zuora.aqua.export.completed"]


async def test_cancelled_job_ends_in_a_failure_event(moto_server: MotoServer) -> None:
    cfg = SimulatorConfig(step_delay_s=0.5)
    async with running_stack(moto_server.url, sim_config=cfg) as stack:
        submitted = await stack.submit(request())
        job_id = submitted.job.id or ""
        await stack.components.aqua.cancel_job(job_id)
        item = await stack.wait_final(job_id)
        assert item.state == JobState.failed
        assert item.error_reason == "job_cancelled"
        events = await stack.drain_events()
        assert [(e["type"], e["data"]["reason"]) for e in events] == [("com.zuora.aqua.export.failed", "job_cancelled")]
        listed = await stack.clients.s3.list_objects_v2(Bucket=stack.settings.s3.bucket)
        assert listed.get("KeyCount", 0) == 0


async def test_a_completed_job_with_a_batch_that_did_not_complete_fails_and_lands_nothing(
    moto_server: MotoServer,
) -> None:
    """AQuA says ``completed`` but the Invoice batch is ``deleted_notallowed`` (no file): publishing the Account
    file alone as a completed job would lose Invoice without a word, so the job fails, naming the batch."""
    async with running_stack(moto_server.url) as stack:
        stack.sim.faults.batch_status_on_completed_job = {"Invoice": "deleted_notallowed"}
        _, item = await land(stack, request())
        assert item.state == JobState.failed
        assert item.error_reason == "batch_not_completed"
        events = await stack.drain_events()
        assert [(e["type"], e["data"]["reason"]) for e in events] == [
            ("com.zuora.aqua.export.failed", "batch_not_completed")
        ]
        assert events[0]["data"]["aqua_status"] == "completed"
        assert "batch Invoice is deleted_notallowed" in events[0]["data"]["message"]
        listed = await stack.clients.s3.list_objects_v2(Bucket=stack.settings.s3.bucket)
        assert listed.get("KeyCount", 0) == 0


async def test_batch_names_that_sanitise_alike_land_as_distinct_objects(moto_server: MotoServer) -> None:
    """ "Account Export", "Account/Export" and "Account_Export" make one key segment: each file keeps its own object
    (the colliding names get a hash of the real name), none overwrites another."""
    names = ["Account Export", "Account/Export", "Account_Export", "Invoice"]
    queries = [{"name": n, "type": "zoqlexport", "query": "select Id, Name from Account"} for n in names]
    async with running_stack(moto_server.url) as stack:
        _, item = await land(stack, request(queries=queries))
        assert item.state == JobState.published, item
        manifest = await stack.components.manifests.load(item.manifest_key)
        keys = {o.batch_name: o.key for o in manifest.objects}
        assert sorted(keys) == sorted(names) and len(set(keys.values())) == 4
        assert keys["Invoice"].endswith("/Invoice.csv")  # a name that collides with nothing keeps its plain key
        await assert_objects_match_simulator(stack, manifest)
        listed = await stack.clients.s3.list_objects_v2(Bucket=stack.settings.s3.bucket)
        assert listed["KeyCount"] == 5  # four objects and the manifest


async def test_aborted_job_carries_the_batch_message(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url) as stack:
        stack.sim.faults.abort_batches = True
        _, item = await land(stack, request())
        assert item.state == JobState.failed
        assert item.error_reason == "job_aborted"
        events = await stack.drain_events()
        assert events[0]["data"]["aqua_status"] == "aborted"
        assert events[0]["data"]["message"]


async def test_a_job_aqua_set_to_error_fails_with_its_message(moto_server: MotoServer) -> None:
    """AQuA sets a job that stayed too long in Processing to ``error`` (90029): its callback says ``error``, the
    job read back says so too, with ``errorCode`` and a message, and the failure event carries them."""
    async with running_stack(moto_server.url) as stack:
        stack.sim.faults.error_jobs = True
        job_id, item = await land(stack, request())
        assert (item.state, item.error_reason) == (JobState.failed, "job_error")
        job = await stack.components.aqua.get_job(job_id)
        assert (job.status, job.error_code) == ("error", "90029")
        [event] = await stack.drain_events()
        assert event["data"]["aqua_status"] == "error" and "Processing" in event["data"]["message"]
        listed = await stack.clients.s3.list_objects_v2(Bucket=stack.settings.s3.bucket)
        assert listed.get("KeyCount", 0) == 0


@pytest.mark.parametrize(
    ("fault", "value", "reason"),
    [
        ("cut_file_after_bytes", 1000, "AquaUnavailable"),  # the download is cut short
        ("record_count_offset", 1, "IntegrityError"),  # the file is whole but AQuA's count does not match it
        ("files_over_limit", True, "AquaFileTooLarge"),  # AQuA's 403 on a file over 2,047 MB
    ],
)
async def test_a_file_that_fails_its_checks_publishes_failure_and_leaves_no_object(
    moto_server: MotoServer, fault: str, value: int, reason: str
) -> None:
    def one_try(s: Settings) -> Settings:
        return s.model_copy(
            update={
                "queue": s.queue.model_copy(update={"max_receives": 1, "retry_window_s": 0}),
                "aqua": s.aqua.model_copy(update={"max_attempts": 1}),
            }
        )

    async with running_stack(moto_server.url, tweak=one_try) as stack:
        setattr(stack.sim.faults, fault, value)
        _, item = await land(
            stack, request(queries=[{"name": "Account", "type": "zoqlexport", "query": "select Id, Name from Account"}])
        )
        assert (item.state, item.error_reason) == (JobState.failed, reason), item.error_message
        listed = await stack.clients.s3.list_objects_v2(Bucket=stack.settings.s3.bucket)
        assert listed.get("KeyCount", 0) == 0
        uploads = await stack.clients.s3.list_multipart_uploads(Bucket=stack.settings.s3.bucket)
        assert not uploads.get("Uploads")
        events = await stack.drain_events()
        assert [e["type"] for e in events] == ["com.zuora.aqua.export.failed"]
        assert events[0]["data"]["job_name"] == "e2e"  # from the ledger: subscribers filtering on it see failures


async def test_a_job_aqua_does_not_know_fails_with_unknown_job(moto_server: MotoServer) -> None:
    """In our ledger, unknown to AQuA (a 404 on re-reading it: another tenant's id, or purged): one failure event,
    nothing stored, the message settled (not retried for ever)."""
    async with running_stack(moto_server.url) as stack:
        ghost = "0123456789abcdef0123456789abcdef"
        c = stack.components
        await c.ledger.record_submission(
            ghost, submission_id="s-ghost", job_name="ghost", partner=None, project=None, request={}
        )
        await c.queue.send(WorkMessage(job_id=ghost, callback_status="completed"))
        item = await stack.wait_final(ghost, timeout_s=30)
        assert (item.state, item.error_reason) == (JobState.failed, "unknown_job"), item.error_message
        await stack.wait_drained(timeout_s=30)
        events = await stack.drain_events()
        assert [(e["type"], e["data"]["job_id"], e["data"]["job_name"]) for e in events] == [
            ("com.zuora.aqua.export.failed", ghost, "ghost")
        ]
        listed = await stack.clients.s3.list_objects_v2(Bucket=stack.settings.s3.bucket)
        assert listed.get("KeyCount", 0) == 0


async def test_jobs_land_while_the_tenant_is_over_its_concurrent_request_limit(moto_server: MotoServer) -> None:
    """Another client of the tenant holds its one concurrent request (REFERENCE.md §10.2): the worker's job reads
    and downloads get 429 + Retry-After, are tried again, and every job lands once the request is let go."""
    cfg = SimulatorConfig(rows={"Account": 300, "Invoice": 200}, step_delay_s=0.01, concurrent_request_limit=1)
    async with running_stack(moto_server.url, sim_config=cfg) as stack:
        stack.sim.faults.lose_callbacks = True
        subs = [await stack.submit(request(f"limited-{i}")) for i in range(3)]
        ids = [s.job.id or "" for s in subs]
        jobs = [await stack.components.aqua.wait_for_job(i, poll_interval_s=0.05, timeout_s=30) for i in ids]
        file_url = f"{stack.sim_url}/v1/files/{jobs[0].batches[0].file_ids[0]}"
        creds = {"apiAccessKeyId": cfg.client_id, "apiSecretAccessKey": cfg.client_secret}
        async with aiohttp.ClientSession() as http:
            stack.sim.faults.trickle_bytes_per_s = 100  # read when a download starts: this one only
            async with http.get(file_url, headers=creds) as held:
                assert held.status == 200
                stack.sim.faults.trickle_bytes_per_s = None
                for sub, job_id in zip(subs, ids, strict=True):
                    url = sub.notify_url.replace("${JOBID}", job_id).replace("${STATUS}", "completed")
                    async with http.get(url) as resp:
                        assert resp.status == 202
                await asyncio.sleep(1.5)
                held_back = [await stack.components.ledger.get(i) for i in ids]
                assert all(i is not None and not i.done for i in held_back)
        items = [await stack.wait_final(i, timeout_s=60) for i in ids]
        assert [i.state for i in items] == [JobState.published] * 3
        assert stack.app is not None
        metrics = stack.app[METRICS_KEY]
        assert metrics.upstream_retries.labels("rate_limited")._value.get() >= 1
        assert sorted(e["data"]["job_id"] for e in await stack.drain_events()) == sorted(ids)


async def test_ten_concurrent_identical_callbacks_land_once(moto_server: MotoServer) -> None:
    def short_visibility(s: Settings) -> Settings:  # the duplicates that lose the claim come back this soon
        return s.model_copy(update={"queue": s.queue.model_copy(update={"visibility_timeout_s": 3})})

    # Workers race to claim the job: serialize DynamoDB so moto's claims are as exclusive as DynamoDB's.
    async with running_stack(moto_server.url, atomic_dynamodb=True, tweak=short_visibility) as stack:
        stack.sim.faults.lose_callbacks = True
        submitted = await stack.submit(request())
        job_id = submitted.job.id or ""
        await stack.components.aqua.wait_for_job(job_id, poll_interval_s=0.05, timeout_s=30)
        url = submitted.notify_url.replace("${JOBID}", job_id).replace("${STATUS}", "completed")
        async with aiohttp.ClientSession() as http:

            async def call() -> int:
                async with http.get(url) as resp:
                    return resp.status

            statuses = await asyncio.gather(*(call() for _ in range(10)))
        assert all(s in (200, 202) for s in statuses), statuses
        item = await stack.wait_final(job_id)
        assert item.state == JobState.published
        await stack.wait_drained(timeout_s=30)  # every duplicate message handled, not just hidden for later
        events = await stack.drain_events()
        assert len(events) == 1
        listed = await stack.clients.s3.list_objects_v2(Bucket=stack.settings.s3.bucket)
        keys = [o["Key"] for o in listed.get("Contents", [])]
        assert len(keys) == 3  # two data objects + one manifest


async def test_crash_between_stored_and_published_publishes_once(moto_server: MotoServer) -> None:
    def short_visibility(s: Settings) -> Settings:
        return s.model_copy(update={"queue": s.queue.model_copy(update={"visibility_timeout_s": 5})})

    async with running_stack(moto_server.url, tweak=short_visibility) as stack:
        publisher = stack.components.processor.publisher
        original: Callable[..., Any] = publisher.publish
        calls = {"n": 0}

        async def crashing_publish(event: Any) -> str:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated crash after stored")
            result: str = await original(event)
            return result

        publisher.publish = crashing_publish  # type: ignore[method-assign]
        job_id, item = await land(stack, request(), timeout_s=60)
        assert item.state == JobState.published
        assert calls["n"] == 2
        events = await stack.drain_events()
        assert len(events) == 1 and events[0]["data"]["job_id"] == job_id


async def test_malformed_callbacks_enqueue_nothing(moto_server: MotoServer) -> None:
    def no_token(s: Settings) -> Settings:
        return s.model_copy(update={"security": s.security.model_copy(update={"require_token": False})})

    async with running_stack(moto_server.url, tweak=no_token, run_worker=False) as stack:
        base = stack.service_url + stack.settings.http.callback_path
        async with aiohttp.ClientSession() as http:
            for query in ("", "?jobId=nothex", "?jobId=" + "a" * 32 + "&status=weird", "?jobId=../../etc"):
                async with http.get(base + query) as resp:
                    assert resp.status == 400, query
                    body = await resp.json()
                    assert body["error"]
            async with http.post(base, data=b"{not json", headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 400
            async with http.post(base, data=b"x" * (200 * 1024), headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 413
            # well-formed but unknown to us
            async with http.get(base + "?jobId=" + "b" * 32 + "&status=completed") as resp:
                assert resp.status == 404
        depth = await stack.components.queue.depth()
        assert depth == 0


async def test_an_unexpected_error_is_retried_then_fails_the_job_and_frees_its_session(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a PipelineError (a bug, or a body no model expects): retried while attempts remain, and on the last
    one the job fails loudly, so its stateful session is released and the session's next job can land."""
    async with running_stack(moto_server.url, run_worker=False) as stack:
        stack.sim.faults.lose_callbacks = True
        c = stack.components
        session = {"partner": "examplepartner", "project": f"p-{id(stack)}"}
        first, second = [(await stack.submit(request(name=n, **session))).job.id or "" for n in ("one", "two")]
        for job_id in (first, second):
            await c.aqua.wait_for_job(job_id, poll_interval_s=0.02, timeout_s=20)

        async def broken(*_: Any, **__: Any) -> Any:
            raise RuntimeError("a bug in the manifest step")

        monkeypatch.setattr(c.manifests, "commit", broken)
        result = await c.processor.process(first, owner="w1", lease_s=30, final_attempt=False)
        assert (result.outcome.value, result.reason) == ("retry", "internal_error")
        item = await c.ledger.get(first)
        assert item is not None and not item.done and item.lease_owner is None
        result = await c.processor.process(first, owner="w2", lease_s=30, final_attempt=True)
        assert (result.outcome.value, result.reason) == ("failed_final", "internal_error")
        item = await c.ledger.get(first)
        assert item is not None and item.state == JobState.failed and item.error_reason == "internal_error"
        events = await stack.drain_events()
        assert [(e["type"], e["data"]["reason"]) for e in events] == [
            ("com.zuora.aqua.export.failed", "internal_error")
        ]
        assert "RuntimeError: a bug in the manifest step" in events[0]["data"]["message"]

        monkeypatch.undo()
        result = await c.processor.process(second, owner="w3", lease_s=30, final_attempt=False)
        assert result.outcome.value == "published"  # the session the failed job held was taken over


async def finished_quietly(stack: Stack) -> str:
    """A job submitted and finished by AQuA, its callback lost: the test runs the processor itself."""
    stack.sim.faults.lose_callbacks = True
    job_id = (await stack.submit(request())).job.id or ""
    await stack.components.aqua.wait_for_job(job_id, poll_interval_s=0.02, timeout_s=20)
    return job_id


async def throttled(*_: Any, **__: Any) -> Any:
    """A ledger write DynamoDB throttled past botocore's retries."""
    raise LedgerError("dynamodb update_item failed: ProvisionedThroughputExceededException")


async def test_a_job_whose_manifest_is_committed_is_retried_never_failed(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest readers wait for is in S3, then the ``stored`` transition fails on the last attempt: the job
    is retried (it lands from the same manifest), never failed under a manifest that says it landed."""
    async with running_stack(moto_server.url, run_worker=False) as stack:
        c = stack.components
        job_id = await finished_quietly(stack)
        monkeypatch.setattr(c.ledger, "mark_stored", throttled)
        first = await c.processor.process(job_id, owner="w1", lease_s=30, final_attempt=True)
        assert (first.outcome, first.reason) == (Outcome.RETRY, "LedgerError")
        item = await c.ledger.get(job_id)
        assert item is not None and (item.state, item.lease_owner) == (JobState.transferring, None)
        assert await stack.drain_events() == []
        monkeypatch.undo()
        done = await c.processor.process(job_id, owner="w2", lease_s=30, final_attempt=True)
        assert done.outcome is Outcome.PUBLISHED
        events = await stack.drain_events()
        assert [e["type"] for e in events] == [EVENT_TYPE_COMPLETED]


@pytest.mark.parametrize("failing", ["mark_published", "manifest_load"])
async def test_a_stored_job_is_retried_never_failed(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """Once its manifest is committed (``stored``) the completion event may be out, so an error on the last attempt
    (DynamoDB throttling the final transition after the event went out; the manifest failing to load on a resume)
    leaves the job stored and retried, never failed: a retry publishes it again under the same event id, and no
    failure event follows the completion."""
    async with running_stack(moto_server.url, run_worker=False) as stack:
        c = stack.components
        job_id = await finished_quietly(stack)

        async def unreadable(*_: Any, **__: Any) -> Any:
            raise RuntimeError("a manifest no model accepts")

        monkeypatch.setattr(c.ledger, "mark_published", throttled)
        first = await c.processor.process(job_id, owner="w1", lease_s=30, final_attempt=failing == "mark_published")
        assert (first.outcome, first.reason) == (Outcome.RETRY, "LedgerError")
        if failing == "manifest_load":  # a resume from stored, on the last attempt, after the event went out
            monkeypatch.undo()
            monkeypatch.setattr(c.manifests, "load", unreadable)
            again = await c.processor.process(job_id, owner="w2", lease_s=30, final_attempt=True)
            assert (again.outcome, again.reason) == (Outcome.RETRY, "internal_error")
        item = await c.ledger.get(job_id)
        assert item is not None and (item.state, item.lease_owner) == (JobState.stored, None)

        monkeypatch.undo()
        done = await c.processor.process(job_id, owner="w3", lease_s=30, final_attempt=True)
        assert done.outcome is Outcome.PUBLISHED
        item = await c.ledger.get(job_id)
        assert item is not None and item.state is JobState.published
        events = await stack.drain_events()
        assert [(e["type"], e["id"]) for e in events] == [(EVENT_TYPE_COMPLETED, event_id(job_id, "completed"))] * 2


async def test_refused_credentials_hold_the_job_rather_than_fail_it(moto_server: MotoServer) -> None:
    """AQuA refusing the service's credentials (a rotated secret not yet deployed) is no fault of the job's: it
    is tried again, without a failure event, until its last attempt (after the retry window)."""
    async with running_stack(moto_server.url, run_worker=False) as stack:
        c = stack.components
        job_id = await finished_job(stack)

        async def refused(*_: Any, **__: Any) -> Any:
            raise AquaAuthError("get_job: HTTP 401: credentials refused", status=401)

        real, c.aqua.get_job = c.aqua.get_job, refused  # type: ignore[method-assign]
        result = await c.processor.process(job_id, owner="w1", lease_s=30, final_attempt=False)
        assert result.outcome is Outcome.RETRY
        item = await c.ledger.get(job_id)
        assert item is not None and not item.done and item.lease_owner is None
        assert await stack.drain_events(wait_s=0) == []
        result = await c.processor.process(job_id, owner="w2", lease_s=30, final_attempt=True)
        assert result.outcome is Outcome.FAILED
        c.aqua.get_job = real  # type: ignore[method-assign]
        [event] = await stack.drain_events()
        assert event["data"]["reason"] == "AquaAuthError"


async def test_a_job_in_an_undocumented_final_status_is_failed_not_polled_for_ever(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, run_worker=False) as stack:
        c = stack.components
        job_id = await finished_job(stack)
        real = c.aqua.get_job

        async def failed(job_id: str, **kw: Any) -> Any:
            job = await real(job_id, **kw)
            return job.model_copy(update={"status": "failed", "message": "query failed"})

        c.aqua.get_job = failed  # type: ignore[method-assign]
        result = await c.processor.process(job_id, owner="w1", lease_s=30, final_attempt=False)
        assert (result.outcome, result.reason) == (Outcome.FAILED, "job_failed")
        [event] = await stack.drain_events()
        assert event["type"] == "com.zuora.aqua.export.failed" and event["data"]["aqua_status"] == "failed"


async def test_a_job_stopped_while_its_event_goes_out_still_records_it(moto_server: MotoServer) -> None:
    """The worker stops a job's work when its heartbeat cannot extend the lease (or at shutdown). Stopped between
    sending the completion event and recording it, the job would be published again, a duplicate, by the next
    worker: the send and the record finish together, and the next worker finds the job published."""
    async with running_stack(moto_server.url, run_worker=False) as stack:
        c = stack.components
        job_id = await finished_job(stack)
        real = c.publisher.publish
        sending = asyncio.Event()

        async def slow_publish(event: Any) -> None:
            sending.set()
            await asyncio.sleep(0.3)
            await real(event)

        c.publisher.publish = slow_publish  # type: ignore[method-assign]
        work = asyncio.create_task(c.processor.process(job_id, owner="w1", lease_s=30, final_attempt=False))
        await sending.wait()
        work.cancel()
        with pytest.raises(asyncio.CancelledError):
            await work
        for _ in range(50):
            item = await c.ledger.get(job_id)
            if item is not None and item.state is JobState.published:
                break
            await asyncio.sleep(0.1)
        assert item is not None and item.state is JobState.published
        c.publisher.publish = real  # type: ignore[method-assign]
        again = await c.processor.process(job_id, owner="w2", lease_s=30, final_attempt=False)
        assert again.outcome is Outcome.DUPLICATE
        assert len(await stack.drain_events()) == 1
