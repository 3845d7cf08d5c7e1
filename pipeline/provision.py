"""Idempotent creation of everything the service needs in an AWS account (or on moto): the results bucket,
the work queue with its dead-letter queue, the events target and the ledger table.

Used by the demo, tests and benchmarks; production uses the CloudFormation templates in ``infra/``.
Botocore errors are not translated here: provisioning runs before the service, and its caller reports them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
from botocore.exceptions import ClientError

from pipeline.aws import AwsClients
from pipeline.ledger import JobLedger
from pipeline.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["ProvisioningError", "Resources", "ensure_resources", "settings_with_resources"]

DLQ_RETENTION_S = 14 * 24 * 3600
_NO_QUEUE = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")


@dataclass(frozen=True)
class Resources:
    """What :func:`ensure_resources` made sure exists."""

    bucket: str
    work_queue_url: str
    dlq_url: str
    topic_arn: str | None
    subscriber_queue_url: str | None
    table_name: str


class ProvisioningError(Exception):
    """A resource cannot be made ready as the service needs it (the message says which, and what to change)."""


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


async def _ensure_bucket(s3: Any, name: str, region: str) -> None:
    kw: dict[str, Any] = {"Bucket": name}
    if region != "us-east-1":
        kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        await s3.create_bucket(**kw)
        log.info("created bucket %s", name)
    except ClientError as exc:
        if _code(exc) == "BucketAlreadyExists":  # S3's answer when the name is another account's bucket
            raise ProvisioningError(
                f"bucket {name} already exists and belongs to another AWS account: results must not land there; "
                "set S3__BUCKET to a bucket name of your own"
            ) from exc
        if _code(exc) != "BucketAlreadyOwnedByYou":
            raise


async def _ensure_queue(sqs: Any, name: str, attributes: dict[str, str]) -> tuple[str, str]:
    """Create the queue, or bring an existing one's attributes up to date; returns (url, arn)."""
    try:
        url = (await sqs.get_queue_url(QueueName=name))["QueueUrl"]
        if attributes:
            await sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
    except ClientError as exc:
        if _code(exc) not in _NO_QUEUE:
            raise
        create = dict(attributes)
        if name.endswith(".fifo"):
            create["FifoQueue"] = "true"
        url = (await sqs.create_queue(QueueName=name, Attributes=create))["QueueUrl"]
        log.info("created queue %s", name)
    attrs = await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    return url, attrs["Attributes"]["QueueArn"]


async def _ensure_topic(sns: Any, name: str) -> str:
    attrs = {"FifoTopic": "true"} if name.endswith(".fifo") else {}
    arn: str = (await sns.create_topic(Name=name, Attributes=attrs))["TopicArn"]
    return arn


async def _ensure_subscriber(clients: AwsClients, topic_arn: str, queue_name: str) -> str:
    """An example consumer queue subscribed to the topic (raw delivery off: bodies are SNS envelopes)."""
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": "*",
                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
            }
        ],
    }
    url, arn = await _ensure_queue(clients.sqs, queue_name, {"Policy": orjson.dumps(policy).decode()})
    paginator = clients.sns.get_paginator("list_subscriptions_by_topic")
    async for page in paginator.paginate(TopicArn=topic_arn):
        if any(s.get("Endpoint") == arn and s.get("Protocol") == "sqs" for s in page.get("Subscriptions", [])):
            return url
    await clients.sns.subscribe(
        TopicArn=topic_arn, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": "false"}
    )
    log.info("subscribed queue %s to %s", queue_name, topic_arn)
    return url


async def _ensure_bus(events: Any, name: str) -> None:
    if name == "default":
        return
    try:
        await events.create_event_bus(Name=name)
    except ClientError as exc:
        if _code(exc) != "ResourceAlreadyExistsException":
            raise


async def ensure_resources(
    clients: AwsClients, settings: Settings, *, subscriber_queue_name: str | None = None
) -> Resources:
    """Create (or update) the bucket, work queue + DLQ, events target and ledger table; safe to call again.

    With ``subscriber_queue_name`` and an SNS target, also an example consumer queue subscribed to the topic.
    """
    await _ensure_bucket(clients.s3, settings.s3.bucket, settings.aws.region)
    q = settings.queue
    dlq_url, dlq_arn = await _ensure_queue(clients.sqs, q.dlq_name, {"MessageRetentionPeriod": str(DLQ_RETENTION_S)})
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(q.max_receives)}
    work_url, _ = await _ensure_queue(
        clients.sqs,
        q.work_queue_name,
        {
            "VisibilityTimeout": str(q.visibility_timeout_s),
            "ReceiveMessageWaitTimeSeconds": str(q.wait_time_s),
            "RedrivePolicy": orjson.dumps(redrive).decode(),
        },
    )
    topic_arn: str | None = None
    subscriber_url: str | None = None
    if settings.events.target == "sns":
        topic_arn = await _ensure_topic(clients.sns, settings.events.topic_name)
        if subscriber_queue_name:
            subscriber_url = await _ensure_subscriber(clients, topic_arn, subscriber_queue_name)
    elif settings.events.target == "eventbridge":
        await _ensure_bus(clients.events, settings.events.bus_name)
    await JobLedger(clients.dynamodb, settings.ledger).ensure_table()
    res = Resources(
        bucket=settings.s3.bucket,
        work_queue_url=work_url,
        dlq_url=dlq_url,
        topic_arn=topic_arn,
        subscriber_queue_url=subscriber_url,
        table_name=settings.ledger.table_name,
    )
    log.info("resources ready: %s", res)
    return res


def settings_with_resources(settings: Settings, res: Resources) -> Settings:
    """A copy of ``settings`` pointing at ``res`` (work queue url, topic arn, bucket, table)."""
    events = settings.events
    if res.topic_arn:
        events = events.model_copy(update={"topic_arn": res.topic_arn})
    return settings.model_copy(
        update={
            "s3": settings.s3.model_copy(update={"bucket": res.bucket}),
            "queue": settings.queue.model_copy(update={"work_queue_url": res.work_queue_url}),
            "events": events,
            "ledger": settings.ledger.model_copy(update={"table_name": res.table_name}),
        }
    )
