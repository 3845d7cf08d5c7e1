"""The CloudFormation template and the code agree: deploy the template's data plane into the moto server,
configure the service only from the stack outputs (as the ECS task definition does), and land one job
end to end into the template's bucket, with its event in the template's example subscriber queue."""

from __future__ import annotations

import asyncio
import hashlib
import os
from contextlib import AsyncExitStack

import orjson
from aiobotocore.session import get_session

from pipeline.app import COMPONENTS_KEY, create_app
from pipeline.aqua.models import SubmitRequest
from pipeline.aqua.simulator import SIMULATOR_KEY, SimulatorConfig, create_simulator_app, file_digest
from pipeline.aws import client_kwargs
from pipeline.ledger import JobState
from pipeline.settings import AwsSettings, load_settings
from pipeline.submission import Submitter
from pipeline.testing.cfn import deploy_data_plane, settings_env
from pipeline.testing.moto import MotoServer, free_port
from pipeline.testing.stack import serve_app


async def allow_plain_http(aws_settings: AwsSettings, bucket: str) -> None:
    """The one emulator concession: moto is served over plain HTTP, so the template's
    ``DenyInsecureTransport`` statement (``aws:SecureTransport = false`` -> deny) would refuse every call.
    Drop exactly that statement and keep the rest of the template's bucket policy."""
    async with AsyncExitStack() as es:
        s3 = await es.enter_async_context(get_session().create_client("s3", **client_kwargs(aws_settings)))
        policy = orjson.loads((await s3.get_bucket_policy(Bucket=bucket))["Policy"])
        kept = [st for st in policy["Statement"] if st.get("Sid") != "DenyInsecureTransport"]
        assert len(kept) == len(policy["Statement"]) - 1, "the template no longer denies insecure transport"
        if kept:
            await s3.put_bucket_policy(Bucket=bucket, Policy=orjson.dumps({**policy, "Statement": kept}).decode())
        else:
            await s3.delete_bucket_policy(Bucket=bucket)


async def test_one_job_through_the_templates_resources(
    moto_server: MotoServer, aws_settings: AwsSettings, unique: str
) -> None:
    outputs = await deploy_data_plane(aws_settings, f"e2e-{unique}")
    await allow_plain_http(aws_settings, outputs["BucketName"])
    cfg = SimulatorConfig(rows={"Account": 1500, "Invoice": 700}, step_delay_s=0.02)
    async with AsyncExitStack() as stack:
        sim_app = create_simulator_app(cfg)
        sim_url = await serve_app(stack, sim_app, free_port())
        port = free_port()
        os.environ.update(settings_env(outputs))
        os.environ.update(
            {
                "AQUA_PIPELINE_AWS__ENDPOINT_URL": moto_server.url,
                "AQUA_PIPELINE_AWS__ACCESS_KEY_ID": "testing",
                "AQUA_PIPELINE_AWS__SECRET_ACCESS_KEY": "testing",
                "AQUA_PIPELINE_AQUA__BASE_URL": sim_url,
                "AQUA_PIPELINE_AQUA__CLIENT_ID": cfg.client_id,
                "AQUA_PIPELINE_AQUA__CLIENT_SECRET": cfg.client_secret,
                "AQUA_PIPELINE_HTTP__HOST": "127.0.0.1",
                "AQUA_PIPELINE_HTTP__PORT": str(port),
                "AQUA_PIPELINE_HTTP__PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
                "AQUA_PIPELINE_QUEUE__WAIT_TIME_S": "1",
                "AQUA_PIPELINE_RECONCILER__ENABLED": "false",
            }
        )
        settings = load_settings()
        assert settings.s3.bucket == outputs["BucketName"]
        assert settings.queue.work_queue_url == outputs["WorkQueueUrl"]
        assert settings.events.topic_arn == outputs["EventsTopicArn"]
        assert settings.ledger.table_name == outputs["LedgerTableName"]

        app = create_app(settings)
        await serve_app(stack, app, port)
        c = app[COMPONENTS_KEY]
        req = SubmitRequest.model_validate(
            {
                "format": "csv",
                "version": "1.1",
                "name": "template-e2e",
                "queries": [
                    {"name": "Account", "type": "zoqlexport", "query": "select Id, Name from Account"},
                    {"name": "Invoice", "type": "zoqlexport", "query": "select Id, Amount from Invoice"},
                ],
            }
        )
        submitted = await Submitter(aqua=c.aqua, ledger=c.ledger, signer=c.signer, http=settings.http).submit(req)
        job_id = submitted.job.id or ""
        assert submitted.notify_url.startswith(outputs.get("CallbackBaseUrl", settings.http.public_base_url))

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (item := await c.ledger.get(job_id)) is None or item.state not in (JobState.published, JobState.failed):
            assert loop.time() < deadline, "job did not land"
            await asyncio.sleep(0.1)
        assert item.state == JobState.published, item

        manifest = await c.manifests.load(item.manifest_key or "")
        assert [o.batch_name for o in manifest.objects] == ["Account", "Invoice"]
        sim = sim_app[SIMULATOR_KEY]
        for obj in manifest.objects:
            assert obj.bucket == outputs["BucketName"]
            assert obj.key.startswith(outputs.get("ResultsPrefix", settings.s3.prefix) + "/")
            size, sha, records = await file_digest(sim, obj.file_id)
            body = await c.aws.s3.get_object(Bucket=obj.bucket, Key=obj.key)
            async with body["Body"] as stream:
                data = await stream.read()
            assert (len(data), hashlib.sha256(data).hexdigest(), obj.record_count) == (size, sha, records)

        # Exactly one event, in the template's example subscriber (raw delivery: the body is the CloudEvent).
        events = []
        while True:
            resp = await c.aws.sqs.receive_message(
                QueueUrl=outputs["ExampleSubscriberQueueUrl"], MaxNumberOfMessages=10, WaitTimeSeconds=1
            )
            if not resp.get("Messages"):
                break
            for m in resp["Messages"]:
                events.append(orjson.loads(m["Body"]))
                await c.aws.sqs.delete_message(
                    QueueUrl=outputs["ExampleSubscriberQueueUrl"], ReceiptHandle=m["ReceiptHandle"]
                )
        assert [(e["type"], e["data"]["job_id"]) for e in events] == [("com.zuora.aqua.export.completed", job_id)]
        assert events[0]["data"]["manifest_key"] == item.manifest_key
        assert await c.queue.depth() == 0
