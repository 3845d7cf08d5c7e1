"""``aqua-pipeline demo``: the whole pipeline end to end on embedded defaults, on this machine.

It starts the AQuA simulator and a moto server process, creates the bucket, queues, topic and table,
starts the service, submits a sample job through the service's own submit path (signed notifyUrl),
shows progress while AQuA runs and the files stream into S3, then prints where the objects and the
manifest landed and the completion event a subscriber queue received.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import orjson

from pipeline.aqua.models import SubmitRequest
from pipeline.aqua.simulator import SimulatorConfig
from pipeline.progress import watch_job
from pipeline.testing.moto import start_moto
from pipeline.testing.stack import Stack, running_stack


def _say(msg: str) -> None:
    print(msg, flush=True)


def sample_request(name: str = "demo-nightly") -> SubmitRequest:
    """The sample job: a stateless export of accounts and invoices, CSV, API names as headers."""
    return SubmitRequest.model_validate(
        {
            "format": "csv",
            "version": "1.1",
            "name": name,
            "encrypted": "none",
            "useQueryLabels": True,
            "dateTimeUtc": True,
            "queries": [
                {
                    "name": "Account",
                    "type": "zoqlexport",
                    "query": "select Id, Name, AccountNumber, Balance, Currency, Status, UpdatedDate from Account",
                },
                {"name": "Invoice", "type": "zoqlexport", "query": "select * from Invoice"},
            ],
        }
    )


async def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    records: int = getattr(args, "records", 20000)
    main = asyncio.current_task()
    if main is not None:  # SIGTERM (a `timeout`, a container stop) ends the demo as Ctrl-C does: cleaned up
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    _say("1/5 starting the moto server (emulated S3, SQS, SNS, DynamoDB) ...")
    moto = await asyncio.to_thread(start_moto)
    try:
        _say(f"     moto server at {moto.url}")
        _say("2/5 starting the AQuA simulator, creating the bucket, queues, topic and ledger table,")
        _say("    and starting the service (callback receiver + worker + reconciler) ...")
        sim_cfg = SimulatorConfig(rows={"Account": records, "Invoice": records * 2}, step_delay_s=0.3)
        async with running_stack(moto.url, sim_config=sim_cfg, run_reconciler=True) as stack:
            r = stack.resources
            _say(f"     AQuA simulator at {stack.sim_url}")
            _say(f"     service at {stack.service_url} (callbacks at {stack.settings.http.callback_path})")
            _say(f"     bucket s3://{r.bucket}, work queue {r.work_queue_url}")
            _say(f"     events topic {r.topic_arn} -> subscriber queue {r.subscriber_queue_url}")
            _say("3/5 submitting the sample job to AQuA with a signed notifyUrl ...")
            submitted = await stack.submit(sample_request())
            job_id = submitted.job.id or ""
            _say(f"     job {job_id}")
            _say(f"     notifyUrl {submitted.notify_url[:100]}...")
            _say("4/5 AQuA runs the job, calls back; the worker streams the files into S3 ...")
            if not await watch_job(stack.components, job_id, timeout_s=300, poll_s=0.25):
                _say("the job did not land; see the messages above")
                return 1
            _say("5/5 done. What landed:")
            await _report(stack, job_id)
            if getattr(args, "keep_running", False):
                _say("Everything is still running; Ctrl-C to stop.")
                await asyncio.Event().wait()
    finally:
        await asyncio.shield(asyncio.to_thread(moto.stop))
    return 0


async def _report(stack: Stack, job_id: str) -> None:
    c = stack.components
    item = await c.ledger.get(job_id)
    assert item is not None and item.manifest_key
    manifest = await c.manifests.load(item.manifest_key)
    for obj in manifest.objects:
        _say(f"     s3://{obj.bucket}/{obj.key}")
        _say(f"         {obj.size:,} bytes, {obj.record_count or 0:,} records, sha256 {obj.sha256}")
    _say(f"     manifest: s3://{stack.settings.s3.bucket}/{item.manifest_key}")
    for event in await stack.drain_events(wait_s=2):
        _say(f"     event received by the subscriber queue: {event['type']} (id {event['id']})")
        data = event["data"]
        summary = {k: data[k] for k in ("job_id", "status", "record_count", "total_bytes", "manifest_key")}
        _say("         " + orjson.dumps(summary).decode())
