"""AWS faults: the replicas reach moto only through :mod:`pipeline.testing.faultproxy`, which fails chosen
operations. S3 answers 503 SlowDown / 500 InternalError on part uploads (sometimes more often than botocore
retries, so the job's own retry path, message redelivery, runs too) and drops a connection; SNS and then SQS
are unavailable for a few seconds, and DynamoDB too. Work resumes when they return and nothing is lost: every job
lands exactly once, a callback that arrived while SQS was down (answered 503) is picked up by the reconciler, and
one that arrived while DynamoDB was down is accepted (the receiver's answer needs SQS alone) and worked once the
ledger is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.aqua.simulator import SimulatorConfig
from pipeline.aws import open_clients
from pipeline.settings import AwsSettings, Settings
from pipeline.testing.faultproxy import FAULTPROXY_KEY, FaultProxy, create_faultproxy_app
from pipeline.testing.moto import MotoServer, free_port
from pipeline.testing.stack import Stack, running_stack, serve_app
from tests.reliability.conftest import MIB, Fleet, audit, replica_settings, request, wait_all_final

MEDIUM = [{"name": "Invoice", "type": "zoqlexport", "query": "select * from Invoice"}]  # ~12 MB: 3 parts


@dataclass
class FaultStack:
    stack: Stack
    proxy: FaultProxy
    proxy_url: str


@asynccontextmanager
async def fault_stack(
    moto_url: str, fleet: Fleet, *, replicas: int = 2, **replica_kw: Any
) -> AsyncIterator[FaultStack]:
    """Simulator + resources (the test talks to moto directly) + replicas that talk to moto via the proxy."""
    cfg = SimulatorConfig(rows={"Invoice": 60_000, "Account": 300}, step_delay_s=0.02)
    ports = [free_port() for _ in range(replicas)]

    def to_first_replica(s: Settings) -> Settings:
        return s.model_copy(
            update={"http": s.http.model_copy(update={"public_base_url": f"http://127.0.0.1:{ports[0]}"})}
        )

    async with (
        running_stack(moto_url, sim_config=cfg, tweak=to_first_replica, run_worker=False) as stack,
        AsyncExitStack() as exits,
    ):
        app = create_faultproxy_app(moto_url)
        proxy_url = await serve_app(exits, app, free_port())
        for port in ports:
            await fleet.start(replica_settings(stack.settings, port, aws_endpoint=proxy_url, **replica_kw))
        yield FaultStack(stack, app[FAULTPROXY_KEY], proxy_url)


async def submit(stack: Stack, n: int, queries: list[dict[str, Any]] | None = None, name: str = "f") -> list[str]:
    subs = await asyncio.gather(*(stack.submit(request(name=f"{name}{i}", queries=queries)) for i in range(n)))
    return [s.job.id or "" for s in subs]


async def test_faultproxy_names_operations_and_injects_errors(moto_server: MotoServer) -> None:
    async with AsyncExitStack() as exits, aiohttp.ClientSession() as http:
        app = create_faultproxy_app(moto_server.url)
        url = await serve_app(exits, app, free_port())
        proxy = app[FAULTPROXY_KEY]
        # botocore's max_attempts counts retries: 1 = two tries in all, so each fault fires twice
        aws = AwsSettings(
            endpoint_url=url,
            access_key_id="testing",
            secret_access_key="testing",  # type: ignore[arg-type]
            max_attempts=1,
        )
        clients = await open_clients(exits, aws)
        bucket = f"fp-{free_port()}"
        await clients.s3.create_bucket(Bucket=bucket)
        async with http.post(url + "/_proxy/faults", json={"service": "s3", "operation": "PutObject", "count": 2}):
            pass
        with pytest.raises(ClientError, match="ServiceUnavailable"):
            await clients.s3.put_object(Bucket=bucket, Key="k", Body=b"x")
        await clients.s3.put_object(Bucket=bucket, Key="k", Body=b"x")
        head = await clients.s3.head_object(Bucket=bucket, Key="k")
        assert head["ContentLength"] == 1
        q = await clients.sqs.create_queue(QueueName=f"fp-{free_port()}")
        proxy.add("sqs", "SendMessage", status=500, code="InternalError", count=2)
        with pytest.raises(ClientError, match="InternalError"):
            await clients.sqs.send_message(QueueUrl=q["QueueUrl"], MessageBody="m")
        await clients.sqs.send_message(QueueUrl=q["QueueUrl"], MessageBody="m")
        topic = await clients.sns.create_topic(Name=f"fp-{free_port()}")
        proxy.add("sns", action="drop", count=2)
        with pytest.raises(BotoCoreError):  # the connection closed without an answer
            await clients.sns.publish(TopicArn=topic["TopicArn"], Message="m")
        await clients.sns.publish(TopicArn=topic["TopicArn"], Message="m")
        async with http.get(url + "/_proxy/stats") as resp:
            stats = await resp.json()
        assert stats["faulted"] == {"s3:PutObject": 2, "sqs:SendMessage": 2, "sns:Publish": 2}
        assert stats["seen"]["s3:HeadObject"] == 1 and stats["seen"]["sqs:CreateQueue"] == 1
        await clients.s3.delete_object(Bucket=bucket, Key="k")
        await clients.s3.delete_bucket(Bucket=bucket)


async def test_s3_part_faults_beyond_botocore_retries(moto_server: MotoServer, fleet: Fleet) -> None:
    async with fault_stack(moto_server.url, fleet, visibility_s=10, part_size=5 * MIB) as fs:
        stack, proxy = fs.stack, fs.proxy
        # 1) one job; both in-flight parts fail four times in a row: botocore gives up (max_attempts=3 retries), the
        #    transfer aborts, and the message comes back for a second attempt that succeeds.
        proxy.add("s3", "UploadPart", status=503, code="SlowDown", count=8)
        first = await submit(stack, 1, MEDIUM, name="slow")
        await wait_all_final(stack, first, timeout_s=40, fleet=fleet)
        item = await stack.components.ledger.get(first[0])
        assert item is not None and item.attempts >= 2, item
        # 2) three jobs at once; faults botocore absorbs (500s, a 503 on Complete, a dropped connection).
        proxy.add("s3", "UploadPart", status=500, code="InternalError", count=2)
        proxy.add("s3", "CompleteMultipartUpload", status=503, code="SlowDown", count=1)
        proxy.add("s3", "CreateMultipartUpload", action="drop", count=1)
        proxy.add("s3", "PutObject", status=500, code="InternalError", count=1)
        more = await submit(stack, 3, MEDIUM, name="busy")
        await wait_all_final(stack, more, timeout_s=40, fleet=fleet)
        assert all(r.spent for r in proxy.rules), [(r.operation, r.fired) for r in proxy.rules]
        result = await audit(stack, first + more)
        assert result.lost == 0, result.row()
        print(f"s3 faults: injected={sum(proxy.faulted.values())} {result.row()}")


async def test_sns_outage_then_publishes(moto_server: MotoServer, fleet: Fleet) -> None:
    async with fault_stack(moto_server.url, fleet, visibility_s=10) as fs:
        stack, proxy = fs.stack, fs.proxy
        proxy.add("sns", for_s=6)
        job_ids = await submit(stack, 3, name="sns")
        await wait_all_final(stack, job_ids, timeout_s=45, fleet=fleet)
        assert proxy.faulted[("sns", "Publish")] >= 3
        result = await audit(stack, job_ids)
        assert result.lost == 0, result.row()
        print(f"sns outage: injected={sum(proxy.faulted.values())} {result.row()}")


async def test_sqs_outage_callbacks_answered_503_then_reconciled(moto_server: MotoServer, fleet: Fleet) -> None:
    reconciler = {"enabled": True, "interval_s": 1.0, "callback_grace_s": 3.0}
    async with fault_stack(moto_server.url, fleet, replicas=1, visibility_s=10, reconciler=reconciler) as fs:
        stack, proxy = fs.stack, fs.proxy
        proxy.add("sqs", for_s=12)
        started = time.monotonic()
        job_ids = await submit(stack, 3, name="sqs")
        await asyncio.gather(*(stack.sim.wait_job(j) for j in job_ids))
        await stack.sim.settle_callbacks()
        assert time.monotonic() - started < 12, "the callbacks should have come during the outage"
        answered = [c["status"] for c in stack.sim.callback_log if c.get("job_id") in job_ids]
        assert answered and set(answered) == {503}, answered
        await wait_all_final(stack, job_ids, timeout_s=45, fleet=fleet)
        assert proxy.faulted[("sqs", "SendMessageBatch")] >= 3
        result = await audit(stack, job_ids)
        assert result.lost == 0, result.row()
        print(f"sqs outage: injected={sum(proxy.faulted.values())} {result.row()}")


async def test_dynamodb_outage_token_callbacks_accepted_then_land(moto_server: MotoServer, fleet: Fleet) -> None:
    """The default ``LEDGER__TOKEN_CALLBACKS_AT=worker``: the receiver's answer to a token callback makes no
    DynamoDB call, so an outage of the ledger does not refuse callbacks; the worker's ledger check fails, the
    message comes back later, and the job lands then. No reconciler: the callbacks alone must carry the jobs."""
    async with fault_stack(moto_server.url, fleet, replicas=1, visibility_s=10) as fs:
        stack, proxy = fs.stack, fs.proxy
        proxy.add("dynamodb", for_s=8)
        started = time.monotonic()
        job_ids = await submit(stack, 3, name="ddb")  # the test's submitter reaches moto directly
        await asyncio.gather(*(stack.sim.wait_job(j) for j in job_ids))
        await stack.sim.settle_callbacks()
        assert time.monotonic() - started < 8, "the callbacks should have come during the outage"
        answered = [c["status"] for c in stack.sim.callback_log if c.get("job_id") in job_ids]
        assert answered and set(answered) == {202}, answered
        for job_id in job_ids:  # nothing of them reached the ledger yet
            item = await stack.components.ledger.get(job_id)
            assert item is not None and item.callback_count == 0, item
        await wait_all_final(stack, job_ids, timeout_s=60, fleet=fleet)
        assert proxy.faulted[("dynamodb", "UpdateItem")] + proxy.faulted[("dynamodb", "TransactWriteItems")] >= 3
        result = await audit(stack, job_ids)
        assert result.lost == 0, result.row()
        print(f"dynamodb outage: injected={sum(proxy.faulted.values())} {result.row()}")
