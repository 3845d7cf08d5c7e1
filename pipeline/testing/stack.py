"""A whole local deployment in one context manager: the AQuA simulator, AWS resources on a moto server,
and the service itself, each on its own loopback port. Used by the end-to-end tests, the demo and the
benchmarks, so they all exercise the same wiring as production."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from pipeline.app import COMPONENTS_KEY, Components, create_app, make_runner
from pipeline.aqua.models import SubmitRequest
from pipeline.aqua.simulator import SIMULATOR_KEY, Simulator, SimulatorConfig, create_simulator_app
from pipeline.aws import AwsClients, open_clients
from pipeline.ledger import JobState, LedgerItem
from pipeline.provision import Resources, ensure_resources, settings_with_resources
from pipeline.settings import (
    AquaSettings,
    AwsSettings,
    EventsSettings,
    HttpSettings,
    LedgerSettings,
    QueueSettings,
    S3Settings,
    Settings,
)
from pipeline.submission import Submitted, Submitter
from pipeline.testing.faultproxy import create_faultproxy_app
from pipeline.testing.moto import free_port


async def serve_app(stack: AsyncExitStack, app: web.Application, port: int, *, http: HttpSettings | None = None) -> str:
    """Serve ``app`` on 127.0.0.1:``port`` until ``stack`` closes; returns its base URL. ``http``: the service's
    connection deadlines (idle and body timeouts), as ``serve`` applies them."""
    http = http or HttpSettings()
    runner = make_runner(
        app, shutdown_timeout=5, idle_timeout_s=http.idle_timeout_s, body_timeout_s=http.body_timeout_s
    )
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}"


def local_settings(moto_url: str, sim_url: str, sim: SimulatorConfig, port: int, suffix: str) -> Settings:
    """Settings for a local stack with resource names unique to ``suffix``."""
    return Settings(
        log_format="text",
        aqua=AquaSettings(
            base_url=sim_url,
            client_id=sim.client_id,
            client_secret=sim.client_secret,
            backoff_base_s=0.05,
            backoff_cap_s=0.5,
            max_retry_time_s=30,
        ),
        aws=AwsSettings(
            endpoint_url=moto_url,
            access_key_id="testing",
            secret_access_key="testing",
            max_attempts=3,
        ),
        s3=S3Settings(bucket=f"aqua-results-{suffix}"),
        queue=QueueSettings(
            work_queue_name=f"aqua-work-{suffix}",
            dlq_name=f"aqua-work-dlq-{suffix}",
            wait_time_s=1,
            visibility_timeout_s=30,
        ),
        events=EventsSettings(topic_name=f"aqua-events-{suffix}"),
        ledger=LedgerSettings(table_name=f"aqua-jobs-{suffix}"),
        http=HttpSettings(host="127.0.0.1", port=port, public_base_url=f"http://127.0.0.1:{port}"),
    )


@dataclass
class Stack:
    """A running local deployment."""

    settings: Settings
    sim: Simulator
    sim_url: str
    service_url: str
    app: web.Application | None
    clients: AwsClients
    resources: Resources

    @property
    def components(self) -> Components:
        assert self.app is not None
        return self.app[COMPONENTS_KEY]

    async def submit(self, request: SubmitRequest, **kw: Any) -> Submitted:
        """Submit through the service's own path (signed notifyUrl, ledger record)."""
        c = self.components
        return await Submitter(aqua=c.aqua, ledger=c.ledger, signer=c.signer, http=self.settings.http).submit(
            request, **kw
        )

    async def wait_final(self, job_id: str, *, timeout_s: float = 60) -> LedgerItem:
        """Wait until the ledger says published or failed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            item = await self.components.ledger.get(job_id)
            if item is not None and item.state in (JobState.published, JobState.failed):
                return item
            await asyncio.sleep(0.1)
        raise TimeoutError(f"job {job_id} did not finish within {timeout_s}s")

    async def wait_drained(self, *, timeout_s: float = 60) -> None:
        """Wait until the work queue holds no message, visible, in flight or delayed: every work message, the
        duplicates a worker set aside for later too, has been handled (read twice in a row, 0.2 s apart)."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        names.append("ApproximateNumberOfMessagesDelayed")
        deadline = time.monotonic() + timeout_s
        empty = 0
        while time.monotonic() < deadline:
            resp = await self.clients.sqs.get_queue_attributes(
                QueueUrl=self.components.queue.queue_url, AttributeNames=names
            )
            counts = [int(resp["Attributes"].get(n, "0")) for n in names]
            empty = empty + 1 if not any(counts) else 0
            if empty == 2:
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"work queue not drained within {timeout_s}s: {dict(zip(names, counts, strict=True))}")

    async def drain_events(self, *, wait_s: float = 1.0) -> list[dict[str, Any]]:
        """Every event now in the subscriber queue (SNS envelopes unwrapped), deleting them."""
        url = self.resources.subscriber_queue_url
        assert url
        events: list[dict[str, Any]] = []
        while True:
            resp = await self.clients.sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=int(wait_s)
            )
            msgs = resp.get("Messages", [])
            if not msgs:
                return events
            for m in msgs:
                body = orjson.loads(m["Body"])
                events.append(orjson.loads(body["Message"]) if "Message" in body and "Type" in body else body)
                await self.clients.sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])

    async def object_bytes(self, key: str) -> bytes:
        """A stored object's bytes (tests only; small objects)."""
        obj = await self.clients.s3.get_object(Bucket=self.settings.s3.bucket, Key=key)
        async with obj["Body"] as body:
            data: bytes = await body.read()
            return data


@asynccontextmanager
async def running_stack(
    moto_url: str,
    *,
    sim_config: SimulatorConfig | None = None,
    tweak: Callable[[Settings], Settings] | None = None,
    start_service: bool = True,
    run_worker: bool = True,
    run_reconciler: bool = False,
    atomic_dynamodb: bool = False,
) -> AsyncIterator[Stack]:
    """Start simulator + resources (+ service) and tear everything down afterwards.

    ``atomic_dynamodb``: reach AWS through the fault proxy with DynamoDB calls serialized, for tests that race
    conditional writes (moto can let two of them both win; real DynamoDB never does).
    """
    suffix = uuid.uuid4().hex[:10]
    sim_cfg = sim_config or SimulatorConfig(step_delay_s=0.02)
    async with AsyncExitStack() as stack:
        if atomic_dynamodb:
            proxy = create_faultproxy_app(moto_url, serialize={"dynamodb"})
            moto_url = await serve_app(stack, proxy, free_port())
        sim_app = create_simulator_app(sim_cfg)
        sim_url = await serve_app(stack, sim_app, free_port())
        port = free_port()
        settings = local_settings(moto_url, sim_url, sim_cfg, port, suffix)
        if tweak is not None:
            settings = tweak(settings)
        clients = await open_clients(stack, settings.aws)
        resources = await ensure_resources(clients, settings, subscriber_queue_name=f"aqua-sub-{suffix}")
        settings = settings_with_resources(settings, resources)
        app = None
        service_url = settings.http.public_base_url
        if start_service:
            app = create_app(settings, run_worker=run_worker, run_reconciler=run_reconciler)
            service_url = await serve_app(stack, app, port, http=settings.http)
        yield Stack(settings, sim_app[SIMULATOR_KEY], sim_url, service_url, app, clients, resources)
