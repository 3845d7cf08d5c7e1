"""CloudEvents for finished and failed jobs, and the publishers that send them (SNS, SQS, EventBridge).

The body is always the CloudEvent in structured JSON mode (``pipeline.models.dumps``). Event ids are
deterministic per (job, outcome), so a re-published event carries the same id and consumers can
de-duplicate. SNS/SQS messages also carry String message attributes ``type``, ``status``, ``partner``
and ``project`` (when set) for subscription filter policies.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from pipeline.aws import AwsClients
from pipeline.errors import PublishFailed
from pipeline.models import EVENT_TYPE_COMPLETED, EVENT_TYPE_FAILED, CloudEvent, CompletionData, Manifest, dumps, utcnow
from pipeline.settings import EventsSettings, SettingsError

log = logging.getLogger(__name__)

__all__ = [
    "EventBridgePublisher",
    "EventPublisher",
    "NullPublisher",
    "SnsPublisher",
    "SqsPublisher",
    "build_publisher",
    "check_event_target",
    "completed_event",
    "event_id",
    "failed_event",
    "message_attributes",
]

# uuid5(NAMESPACE_URL, "urn:aqua-pipeline:events"); fixed forever: changing it changes every event id
EVENT_NAMESPACE = uuid.UUID("e3a40b6f-6305-5381-be51-4de0b4d79070")
MAX_INLINE_BYTES = 200_000  # SNS/SQS/EventBridge cap a message at 256 KiB, attributes and envelope included


def event_id(job_id: str, outcome: str) -> str:
    """The event id for ``job_id`` and ``outcome`` (``completed``/``failed``): a stable uuid5."""
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{job_id}:{outcome}"))


def completed_event(
    manifest: Manifest,
    *,
    source: str,
    manifest_bucket: str,
    manifest_key: str,
    time: datetime | None = None,
    max_inline_bytes: int = MAX_INLINE_BYTES,
) -> CloudEvent:
    """The completion event for a committed manifest; ``dataref`` points at the manifest.

    The object list is inlined unless the event would exceed ``max_inline_bytes``; then ``objects`` is
    empty and consumers read the manifest.
    """
    data = CompletionData(
        job_id=manifest.job_id,
        job_name=manifest.job_name,
        status="completed",
        aqua_status=manifest.status,
        partner=manifest.partner,
        project=manifest.project,
        start_time=manifest.start_time,
        manifest_bucket=manifest_bucket,
        manifest_key=manifest_key,
        record_count=manifest.record_count,
        total_bytes=manifest.total_bytes,
        objects=manifest.objects,
    )
    event = CloudEvent(
        id=event_id(manifest.job_id, "completed"),
        source=source,
        type=EVENT_TYPE_COMPLETED,
        subject=manifest.job_id,
        time=time or utcnow(),
        dataref=f"s3://{manifest_bucket}/{manifest_key}",
        data=data,
    )
    if len(dumps(event).encode()) > max_inline_bytes:
        log.info("event for job %s too large to inline %d objects; see dataref", manifest.job_id, len(data.objects))
        event = event.model_copy(update={"data": data.model_copy(update={"objects": []})})
    return event


def failed_event(
    job_id: str,
    *,
    source: str,
    reason: str,
    message: str,
    aqua_status: str | None = None,
    job_name: str | None = None,
    partner: str | None = None,
    project: str | None = None,
    time: datetime | None = None,
) -> CloudEvent:
    """The failure event for a job (``reason`` is machine-friendly, e.g. an exception's ``reason``)."""
    return CloudEvent(
        id=event_id(job_id, "failed"),
        source=source,
        type=EVENT_TYPE_FAILED,
        subject=job_id,
        time=time or utcnow(),
        data=CompletionData(
            job_id=job_id,
            job_name=job_name,
            status="failed",
            aqua_status=aqua_status,
            reason=reason,
            message=message[:4000],
            partner=partner,
            project=project,
        ),
    )


class EventPublisher(Protocol):
    """Sends one event; returns the transport's message id. Raises :class:`PublishFailed`."""

    async def publish(self, event: CloudEvent) -> str: ...


def message_attributes(event: CloudEvent) -> dict[str, dict[str, str]]:
    """SNS/SQS String message attributes for filter policies: type, status, partner, project."""
    values = {
        "type": event.type,
        "status": event.data.status,
        "partner": event.data.partner,
        "project": event.data.project,
    }
    return {k: {"DataType": "String", "StringValue": v} for k, v in values.items() if v}


def _fifo(event: CloudEvent) -> dict[str, str]:
    return {"MessageGroupId": event.subject, "MessageDeduplicationId": event.id}


def _failed(target: str, event: CloudEvent, exc: Exception) -> PublishFailed:
    return PublishFailed(f"cannot publish event {event.id} ({event.type}) to {target}: {exc}")


class SnsPublisher:
    """Publishes to an SNS topic (FIFO topics: group = job id, dedup id = event id)."""

    def __init__(self, sns_client: Any, topic_arn: str) -> None:
        self._sns = sns_client
        self.topic_arn = topic_arn
        self._fifo = topic_arn.endswith(".fifo")

    async def publish(self, event: CloudEvent) -> str:
        """Publish ``event``; returns the SNS MessageId."""
        kw: dict[str, Any] = {"TopicArn": self.topic_arn, "Message": dumps(event)}
        kw["MessageAttributes"] = message_attributes(event)
        if self._fifo:
            kw.update(_fifo(event))
        try:
            resp = await self._sns.publish(**kw)
        except (ClientError, BotoCoreError) as exc:
            raise _failed(self.topic_arn, event, exc) from exc
        log.info("published %s for job %s to %s", event.type, event.subject, self.topic_arn)
        return str(resp["MessageId"])


class SqsPublisher:
    """Sends to an SQS queue (FIFO queues: group = job id, dedup id = event id)."""

    def __init__(self, sqs_client: Any, queue_url: str) -> None:
        self._sqs = sqs_client
        self.queue_url = queue_url
        self._fifo = queue_url.endswith(".fifo")

    async def publish(self, event: CloudEvent) -> str:
        """Send ``event``; returns the SQS MessageId."""
        kw: dict[str, Any] = {"QueueUrl": self.queue_url, "MessageBody": dumps(event)}
        kw["MessageAttributes"] = message_attributes(event)
        if self._fifo:
            kw.update(_fifo(event))
        try:
            resp = await self._sqs.send_message(**kw)
        except (ClientError, BotoCoreError) as exc:
            raise _failed(self.queue_url, event, exc) from exc
        log.info("sent %s for job %s to %s", event.type, event.subject, self.queue_url)
        return str(resp["MessageId"])


class EventBridgePublisher:
    """PutEvents on a bus: ``DetailType`` = event type, ``Detail`` = the CloudEvent JSON."""

    def __init__(self, events_client: Any, bus_name: str, source: str) -> None:
        self._events = events_client
        self.bus_name = bus_name
        self.source = source

    async def publish(self, event: CloudEvent) -> str:
        """Put ``event`` on the bus; returns the EventBridge EventId."""
        entry = {
            "Source": self.source,
            "DetailType": event.type,
            "Detail": dumps(event),
            "EventBusName": self.bus_name,
            "Time": event.time,
        }
        try:
            resp = await self._events.put_events(Entries=[entry])
        except (ClientError, BotoCoreError) as exc:
            raise _failed(self.bus_name, event, exc) from exc
        result = (resp.get("Entries") or [{}])[0]
        if resp.get("FailedEntryCount") or "EventId" not in result:
            why = f"{result.get('ErrorCode')}: {result.get('ErrorMessage')}"
            raise PublishFailed(f"cannot publish event {event.id} to bus {self.bus_name}: {why}")
        log.info("put %s for job %s on bus %s", event.type, event.subject, self.bus_name)
        return str(result["EventId"])


class NullPublisher:
    """Publishes nowhere (``target = none``); returns the event id."""

    async def publish(self, event: CloudEvent) -> str:
        """Log and drop ``event``."""
        log.info("event %s for job %s not published (target none)", event.type, event.subject)
        return event.id


def check_event_target(settings: EventsSettings) -> None:
    """Raise ``SettingsError`` if the address ``settings.target`` needs is not configured."""
    if settings.target == "sns" and not settings.topic_arn:
        raise SettingsError("AQUA_PIPELINE_EVENTS__TOPIC_ARN is required when the events target is sns")
    if settings.target == "sqs" and not settings.queue_url:
        raise SettingsError("AQUA_PIPELINE_EVENTS__QUEUE_URL is required when the events target is sqs")


def build_publisher(clients: AwsClients, settings: EventsSettings) -> EventPublisher:
    """The publisher for ``settings.target``; raises ``SettingsError`` if its address is not configured."""
    check_event_target(settings)
    if settings.target == "sns" and settings.topic_arn:
        return SnsPublisher(clients.sns, settings.topic_arn)
    if settings.target == "sqs" and settings.queue_url:
        return SqsPublisher(clients.sqs, settings.queue_url)
    if settings.target == "eventbridge":
        return EventBridgePublisher(clients.events, settings.bus_name, settings.source)
    return NullPublisher()
