"""ensure_resources against the real moto server process: everything exists, twice is fine."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiobotocore.session import get_session
from pydantic import SecretStr

from pipeline.aws import AwsClients, client_kwargs
from pipeline.events import SnsPublisher, failed_event
from pipeline.ledger import JobLedger
from pipeline.models import CloudEvent
from pipeline.provision import ProvisioningError, Resources, ensure_resources, settings_with_resources
from pipeline.settings import AwsSettings, EventsSettings, LedgerSettings, QueueSettings, S3Settings, Settings


def make_settings(unique: str, **over: Any) -> Settings:
    fields: dict[str, Any] = {
        "s3": S3Settings(bucket=f"res-{unique}"),
        "queue": QueueSettings(
            work_queue_name=f"work-{unique}", dlq_name=f"dlq-{unique}", max_receives=3, visibility_timeout_s=45
        ),
        "events": EventsSettings(topic_name=f"events-{unique}"),
        "ledger": LedgerSettings(table_name=f"jobs-{unique}"),
    }
    fields.update(over)
    return Settings(**fields)


async def queue_attrs(aws: AwsClients, url: str) -> dict[str, str]:
    resp = await aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
    return dict(resp["Attributes"])


async def test_ensure_resources_creates_everything_idempotently(aws: AwsClients, unique: str) -> None:
    settings = make_settings(unique)
    res = await ensure_resources(aws, settings, subscriber_queue_name=f"sub-{unique}")
    again = await ensure_resources(aws, settings, subscriber_queue_name=f"sub-{unique}")
    assert again == res
    assert res.bucket == f"res-{unique}" and res.table_name == f"jobs-{unique}"
    assert res.topic_arn is not None and res.topic_arn.endswith(f":events-{unique}")
    assert res.subscriber_queue_url is not None

    await aws.s3.head_bucket(Bucket=res.bucket)
    work = await queue_attrs(aws, res.work_queue_url)
    dlq = await queue_attrs(aws, res.dlq_url)
    assert work["VisibilityTimeout"] == "45"
    assert json.loads(work["RedrivePolicy"]) == {"deadLetterTargetArn": dlq["QueueArn"], "maxReceiveCount": 3}
    assert dlq["MessageRetentionPeriod"] == str(14 * 24 * 3600)

    subs = (await aws.sns.list_subscriptions_by_topic(TopicArn=res.topic_arn))["Subscriptions"]
    assert len(subs) == 1  # the second call did not subscribe twice
    sub_attrs = (await aws.sns.get_subscription_attributes(SubscriptionArn=subs[0]["SubscriptionArn"]))["Attributes"]
    assert sub_attrs["RawMessageDelivery"] == "false"

    table = await aws.dynamodb.describe_table(TableName=res.table_name)
    assert table["Table"]["TableStatus"] == "ACTIVE"

    # the subscriber really receives what the service publishes (as an SNS envelope)
    event = failed_event("job1", source="urn:t", reason="R", message="m")
    await SnsPublisher(aws.sns, res.topic_arn).publish(event)
    msgs = (await aws.sqs.receive_message(QueueUrl=res.subscriber_queue_url, WaitTimeSeconds=1))["Messages"]
    assert CloudEvent.model_validate_json(json.loads(msgs[0]["Body"])["Message"]) == event


async def test_a_bucket_of_another_account_is_refused(aws: AwsClients, aws_settings: AwsSettings, unique: str) -> None:
    """Bucket names are global: when the configured name is another account's bucket, S3 answers
    BucketAlreadyExists, and provisioning stops there instead of pointing the service at it."""
    role = f"arn:aws:iam::111111111111:role/other-{unique}"
    async with get_session().create_client("sts", **client_kwargs(aws_settings)) as sts:
        creds = (await sts.assume_role(RoleArn=role, RoleSessionName="other"))["Credentials"]
    other = aws_settings.model_copy(
        update={"access_key_id": creds["AccessKeyId"], "secret_access_key": SecretStr(creds["SecretAccessKey"])}
    )
    kw = client_kwargs(other)
    async with get_session().create_client("s3", aws_session_token=creds["SessionToken"], **kw) as s3:
        await s3.create_bucket(Bucket=f"res-{unique}")
    with pytest.raises(ProvisioningError, match=f"bucket res-{unique} already exists and belongs to another AWS"):
        await ensure_resources(aws, make_settings(unique))
    again = make_settings(f"{unique}-mine")
    assert (await ensure_resources(aws, again)).bucket == f"res-{unique}-mine"  # our own, created, then kept
    assert (await ensure_resources(aws, again)).bucket == f"res-{unique}-mine"


async def test_changed_settings_update_existing_queues(aws: AwsClients, unique: str) -> None:
    await ensure_resources(aws, make_settings(unique))
    changed = make_settings(
        unique,
        queue=QueueSettings(
            work_queue_name=f"work-{unique}", dlq_name=f"dlq-{unique}", max_receives=7, visibility_timeout_s=120
        ),
    )
    res = await ensure_resources(aws, changed)
    work = await queue_attrs(aws, res.work_queue_url)
    assert work["VisibilityTimeout"] == "120"
    assert json.loads(work["RedrivePolicy"])["maxReceiveCount"] == 7


async def test_non_sns_targets(aws: AwsClients, unique: str) -> None:
    eb = make_settings(unique, events=EventsSettings(target="eventbridge", bus_name=f"bus-{unique}"))
    res = await asyncio.gather(ensure_resources(aws, eb), ensure_resources(aws, eb))
    assert res[0].topic_arn is None and res[0].subscriber_queue_url is None
    bus = await aws.events.describe_event_bus(Name=f"bus-{unique}")
    assert bus["Name"] == f"bus-{unique}"


async def test_settings_with_resources(aws: AwsClients, unique: str) -> None:
    settings = make_settings(unique)
    res = Resources(
        bucket="b1",
        work_queue_url="http://q/1/work",
        dlq_url="http://q/1/dlq",
        topic_arn="arn:aws:sns:us-east-1:1:t",
        subscriber_queue_url=None,
        table_name="tbl",
    )
    out = settings_with_resources(settings, res)
    assert out.queue.work_queue_url == "http://q/1/work" and out.queue.max_receives == 3
    assert out.events.topic_arn == "arn:aws:sns:us-east-1:1:t" and out.events.topic_name == f"events-{unique}"
    assert (out.s3.bucket, out.ledger.table_name) == ("b1", "tbl")
    assert settings.queue.work_queue_url is None  # the original is untouched
    real = settings_with_resources(settings, await ensure_resources(aws, settings))
    assert real.queue.work_queue_url and real.events.topic_arn
    assert await JobLedger(aws.dynamodb, real.ledger).get("nothing") is None
