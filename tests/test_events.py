"""Completion/failure events: the pinned JSON shape, and each publisher against the real moto server,
read back by a plain (sync) boto3 consumer."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest

from pipeline.aws import AwsClients
from pipeline.errors import PublishFailed
from pipeline.events import (
    EventBridgePublisher,
    NullPublisher,
    SnsPublisher,
    SqsPublisher,
    build_publisher,
    completed_event,
    event_id,
    failed_event,
)
from pipeline.models import EVENT_TYPE_COMPLETED, CloudEvent, Manifest, ManifestObject
from pipeline.settings import EventsSettings, SettingsError
from pipeline.testing.moto import MotoServer

JOB = "2c92c0f8697096be016971cca2091244"
WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
SOURCE = "urn:aqua-pipeline:test"


def make_manifest(n_objects: int = 1) -> Manifest:
    objs = [
        ManifestObject(
            bucket="results",
            key=f"aqua/acme/wh/nightly/2025-01-02/{JOB}/Account-{i:05d}.csv",
            size=42,
            sha256="ab" * 32,
            record_count=3,
            batch_id="b1",
            batch_name="Account",
            query="select Id from Account",
            file_id="f1",
            segment=i,
            full=True,
            content_type="text/csv",
        )
        for i in range(1, n_objects + 1)
    ]
    return Manifest(
        job_id=JOB,
        job_name="nightly",
        status="completed",
        partner="acme",
        project="wh",
        format="csv",
        stateful=True,
        start_time="2025-01-02 03:00:00",
        created_at=WHEN,
        record_count=3 * n_objects,
        total_bytes=42 * n_objects,
        objects=objs,
    )


def completed() -> CloudEvent:
    return completed_event(
        make_manifest(), source=SOURCE, manifest_bucket="results", manifest_key=f"aqua/_manifests/{JOB}.json", time=WHEN
    )


def test_event_ids_are_deterministic_and_distinct() -> None:
    assert event_id(JOB, "completed") == event_id(JOB, "completed") == "ea5c873f-e69a-539c-a3a4-2652f64f554c"
    assert event_id(JOB, "failed") != event_id(JOB, "completed")
    assert event_id("other", "completed") != event_id(JOB, "completed")


def test_completed_event_json_shape_is_pinned() -> None:
    assert json.loads(completed().model_dump_json()) == {
        "specversion": "1.0",
        "id": event_id(JOB, "completed"),
        "source": SOURCE,
        "type": "com.zuora.aqua.export.completed",
        "subject": JOB,
        "time": "2025-01-02T03:04:05Z",
        "datacontenttype": "application/json",
        "dataref": f"s3://results/aqua/_manifests/{JOB}.json",
        "data": {
            "job_id": JOB,
            "job_name": "nightly",
            "status": "completed",
            "aqua_status": "completed",
            "reason": None,
            "message": None,
            "partner": "acme",
            "project": "wh",
            "start_time": "2025-01-02 03:00:00",
            "manifest_bucket": "results",
            "manifest_key": f"aqua/_manifests/{JOB}.json",
            "record_count": 3,
            "total_bytes": 42,
            "objects": [
                {
                    "bucket": "results",
                    "key": f"aqua/acme/wh/nightly/2025-01-02/{JOB}/Account-00001.csv",
                    "size": 42,
                    "sha256": "ab" * 32,
                    "record_count": 3,
                    "batch_id": "b1",
                    "batch_name": "Account",
                    "query": "select Id from Account",
                    "file_id": "f1",
                    "segment": 1,
                    "full": True,
                    "deleted_column": None,
                    "content_type": "text/csv",
                    "content_encoding": None,
                }
            ],
        },
    }


def test_failed_event_json_shape_is_pinned() -> None:
    ev = failed_event(
        JOB, source=SOURCE, reason="AquaNotFound", message="file gone", aqua_status="completed", time=WHEN
    )
    assert json.loads(ev.model_dump_json()) == {
        "specversion": "1.0",
        "id": event_id(JOB, "failed"),
        "source": SOURCE,
        "type": "com.zuora.aqua.export.failed",
        "subject": JOB,
        "time": "2025-01-02T03:04:05Z",
        "datacontenttype": "application/json",
        "dataref": None,
        "data": {
            "job_id": JOB,
            "job_name": None,
            "status": "failed",
            "aqua_status": "completed",
            "reason": "AquaNotFound",
            "message": "file gone",
            "partner": None,
            "project": None,
            "start_time": None,
            "manifest_bucket": None,
            "manifest_key": None,
            "record_count": 0,
            "total_bytes": 0,
            "objects": [],
        },
    }


def test_large_object_lists_are_left_to_the_manifest() -> None:
    ev = completed_event(make_manifest(5), source=SOURCE, manifest_bucket="b", manifest_key="k", max_inline_bytes=2000)
    assert ev.data.objects == [] and ev.data.record_count == 15 and ev.dataref == "s3://b/k"
    ev = completed_event(make_manifest(5), source=SOURCE, manifest_bucket="b", manifest_key="k")
    assert len(ev.data.objects) == 5


# -- a plain boto3 consumer, run off the event loop -----------------------------------------------------


def _boto(moto: MotoServer, service: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=moto.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _receive(moto: MotoServer, queue_url: str) -> list[dict[str, Any]]:
    sqs = _boto(moto, "sqs")
    resp = sqs.receive_message(
        QueueUrl=queue_url,
        MaxNumberOfMessages=10,
        WaitTimeSeconds=1,
        AttributeNames=["All"],
        MessageAttributeNames=["All"],
    )
    return list(resp.get("Messages", []))


async def receive(moto: MotoServer, queue_url: str) -> list[dict[str, Any]]:
    return await asyncio.to_thread(_receive, moto, queue_url)


async def make_queue(aws: AwsClients, name: str, *, fifo: bool = False) -> tuple[str, str]:
    attrs = {"FifoQueue": "true"} if fifo else {}
    url = (await aws.sqs.create_queue(QueueName=name, Attributes=attrs))["QueueUrl"]
    arn = (await aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"]))["Attributes"]["QueueArn"]
    return url, arn


@pytest.mark.parametrize("raw", [False, True])
async def test_sns_to_sqs_read_by_plain_boto3(aws: AwsClients, moto_server: MotoServer, unique: str, raw: bool) -> None:
    topic = (await aws.sns.create_topic(Name=f"events-{unique}"))["TopicArn"]
    url, arn = await make_queue(aws, f"sub-{unique}")
    await aws.sns.subscribe(
        TopicArn=topic, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": str(raw).lower()}
    )
    event = completed()
    message_id = await SnsPublisher(aws.sns, topic).publish(event)
    (msg,) = await receive(moto_server, url)
    body = json.loads(msg["Body"])
    if raw:
        cloud_event = body  # the body is our CloudEvent JSON itself
    else:
        # the body is the SNS envelope; our CloudEvent JSON is the string in "Message"
        assert body["Type"] == "Notification" and body["TopicArn"] == topic and body["MessageId"] == message_id
        assert body["MessageAttributes"]["type"] == {"Type": "String", "Value": EVENT_TYPE_COMPLETED}
        assert body["MessageAttributes"]["partner"] == {"Type": "String", "Value": "acme"}
        assert set(body["MessageAttributes"]) == {"type", "status", "partner", "project"}
        cloud_event = json.loads(body["Message"])
    assert CloudEvent.model_validate(cloud_event) == event


async def test_sns_fifo_topic_gets_group_and_dedup_ids(aws: AwsClients, moto_server: MotoServer, unique: str) -> None:
    topic = (
        await aws.sns.create_topic(
            Name=f"events-{unique}.fifo", Attributes={"FifoTopic": "true", "ContentBasedDeduplication": "false"}
        )
    )["TopicArn"]
    url, arn = await make_queue(aws, f"sub-{unique}.fifo", fifo=True)
    await aws.sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": "true"})
    await SnsPublisher(aws.sns, topic).publish(completed())
    (msg,) = await receive(moto_server, url)
    assert msg["Attributes"]["MessageGroupId"] == JOB
    assert msg["Attributes"]["MessageDeduplicationId"] == event_id(JOB, "completed")


@pytest.mark.parametrize("fifo", [False, True])
async def test_sqs_publisher(aws: AwsClients, moto_server: MotoServer, unique: str, fifo: bool) -> None:
    url, _ = await make_queue(aws, f"ev-{unique}" + (".fifo" if fifo else ""), fifo=fifo)
    event = failed_event(JOB, source=SOURCE, reason="AquaNotFound", message="gone", partner="acme", time=WHEN)
    message_id = await SqsPublisher(aws.sqs, url).publish(event)
    (msg,) = await receive(moto_server, url)
    assert msg["MessageId"] == message_id
    assert CloudEvent.model_validate_json(msg["Body"]) == event
    attrs = {k: v["StringValue"] for k, v in msg["MessageAttributes"].items()}
    assert attrs == {"type": "com.zuora.aqua.export.failed", "status": "failed", "partner": "acme"}
    if fifo:
        assert msg["Attributes"]["MessageGroupId"] == JOB
        assert msg["Attributes"]["MessageDeduplicationId"] == event.id


async def test_eventbridge_rule_delivers_to_sqs(aws: AwsClients, moto_server: MotoServer, unique: str) -> None:
    bus = f"bus-{unique}"
    await aws.events.create_event_bus(Name=bus)
    url, arn = await make_queue(aws, f"eb-{unique}")
    pattern = {"source": [SOURCE], "detail-type": [EVENT_TYPE_COMPLETED]}
    await aws.events.put_rule(Name=f"r-{unique}", EventBusName=bus, EventPattern=json.dumps(pattern))
    await aws.events.put_targets(Rule=f"r-{unique}", EventBusName=bus, Targets=[{"Id": "q", "Arn": arn}])
    event = completed()
    eb_id = await EventBridgePublisher(aws.events, bus, SOURCE).publish(event)
    (msg,) = await receive(moto_server, url)
    envelope = json.loads(msg["Body"])  # moto delivers the EventBridge envelope; "detail" is our CloudEvent
    assert (envelope["id"], envelope["source"], envelope["detail-type"]) == (eb_id, SOURCE, EVENT_TYPE_COMPLETED)
    assert CloudEvent.model_validate(envelope["detail"]) == event


async def test_eventbridge_failed_entry_is_publish_failed(aws: AwsClients) -> None:
    # an empty Source makes EventBridge (and moto) reject the entry with FailedEntryCount=1, not an HTTP error
    with pytest.raises(PublishFailed, match="InvalidArgument") as info:
        await EventBridgePublisher(aws.events, "default", "").publish(completed())
    assert info.value.retryable is True


async def test_transport_errors_are_publish_failed(aws: AwsClients, unique: str) -> None:
    event = completed()
    missing_topic = f"arn:aws:sns:us-east-1:123456789012:missing-{unique}"
    with pytest.raises(PublishFailed) as info:
        await SnsPublisher(aws.sns, missing_topic).publish(event)
    assert info.value.retryable is True and info.value.__cause__ is not None
    with pytest.raises(PublishFailed):
        await SqsPublisher(aws.sqs, f"http://127.0.0.1:1/123456789012/missing-{unique}").publish(event)
    with pytest.raises(PublishFailed):
        await EventBridgePublisher(aws.events, f"missing-{unique}", SOURCE).publish(event)


async def test_null_publisher() -> None:
    event = completed()
    assert await NullPublisher().publish(event) == event.id


async def test_build_publisher(aws: AwsClients) -> None:
    sns = build_publisher(aws, EventsSettings(target="sns", topic_arn="arn:aws:sns:us-east-1:1:t"))
    assert isinstance(sns, SnsPublisher) and sns.topic_arn.endswith(":t")
    sqs = build_publisher(aws, EventsSettings(target="sqs", queue_url="http://q/1/x"))
    assert isinstance(sqs, SqsPublisher)
    eb = build_publisher(aws, EventsSettings(target="eventbridge", bus_name="b", source="s"))
    assert isinstance(eb, EventBridgePublisher) and (eb.bus_name, eb.source) == ("b", "s")
    assert isinstance(build_publisher(aws, EventsSettings(target="none")), NullPublisher)
    with pytest.raises(SettingsError, match="TOPIC_ARN"):
        build_publisher(aws, EventsSettings(target="sns"))
    with pytest.raises(SettingsError, match="QUEUE_URL"):
        build_publisher(aws, EventsSettings(target="sqs"))
