"""The SQS work queue: one message per job to look at. Sending, long-poll receiving, visibility, deletion."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from pipeline.batching import NaturalBatcher, Waiting, first
from pipeline.errors import PipelineError
from pipeline.models import WorkMessage, dumps

log = logging.getLogger(__name__)


class QueueError(PipelineError):
    """SQS failed; retryable."""

    retryable = True


@dataclass(frozen=True)
class ReceivedWork:
    """A received work message and what is needed to settle it."""

    message: WorkMessage | None  # None when the body is not a valid work message (poison)
    receipt_handle: str
    receive_count: int
    sent_at_ms: int
    raw_body: str


SQS_BATCH = 10


class WorkQueue:
    """Thin, typed wrapper over one SQS queue.

    Sends are batched naturally (:mod:`pipeline.batching`): each :meth:`send` waits for its own message to be
    stored, and messages that wait together go in one SendMessageBatch (up to 10). An idle queue sends each
    message at once. With ``send_linger_s`` (the service sets ``queue.send_linger_ms``), a busy one waits up to
    that long for a batch to fill: during a burst, and while a call is in flight (a second call goes at once only
    with a full batch), at most ``max_send_calls`` in flight. Each call costs the sender about as much CPU whatever
    its size, so under load that is several times fewer calls for the same messages. Without it, a message goes
    as soon as fewer than ``max_send_calls`` calls are in flight.
    """

    def __init__(self, sqs: Any, queue_url: str, *, max_send_calls: int = 4, send_linger_s: float = 0.0) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self._batcher: NaturalBatcher[WorkMessage, str] = NaturalBatcher(
            self._send_batch,
            first(SQS_BATCH),
            error=lambda exc: QueueError(f"work message not sent: {exc!r}"),
            max_calls=max_send_calls,
            eager_calls=1,
            full=SQS_BATCH,
            linger_s=send_linger_s,
            name="workqueue-send",
        )

    async def send(self, message: WorkMessage, *, delay_s: int = 0) -> str:
        """Enqueue ``message`` durably; returns the SQS message id once SQS has stored it."""
        if delay_s:
            return await self._send_one(message, delay_s)
        return await self._batcher.submit(message)

    async def _send_batch(self, batch: list[Waiting[WorkMessage, str]]) -> None:
        entries = [
            {
                "Id": str(i),
                "MessageBody": dumps(w.item),
                "MessageAttributes": {"job_id": {"DataType": "String", "StringValue": w.item.job_id}},
            }
            for i, w in enumerate(batch)
        ]
        try:
            resp = await self.sqs.send_message_batch(QueueUrl=self.queue_url, Entries=entries)
        except (ClientError, BotoCoreError) as exc:
            for w in batch:
                w.fail(QueueError(f"could not enqueue work for job {w.item.job_id}: {exc}"))
            return
        sent = {e["Id"]: str(e["MessageId"]) for e in resp.get("Successful", [])}
        failed = {e["Id"]: e.get("Message", e.get("Code", "failed")) for e in resp.get("Failed", [])}
        for i, w in enumerate(batch):
            if str(i) in sent:
                w.settle(sent[str(i)])
            else:
                reason = failed.get(str(i), "no answer for this entry")
                w.fail(QueueError(f"could not enqueue work for job {w.item.job_id}: {reason}"))

    async def _send_one(self, message: WorkMessage, delay_s: int) -> str:
        try:
            resp = await self.sqs.send_message(
                QueueUrl=self.queue_url,
                MessageBody=dumps(message),
                DelaySeconds=max(0, min(delay_s, 900)),
                MessageAttributes={"job_id": {"DataType": "String", "StringValue": message.job_id}},
            )
        except (ClientError, BotoCoreError) as exc:
            raise QueueError(f"could not enqueue work for job {message.job_id}: {exc}") from exc
        return str(resp["MessageId"])

    async def receive(self, max_messages: int, *, wait_time_s: int, visibility_s: int) -> list[ReceivedWork]:
        """Long-poll for up to ``max_messages`` (1..10) messages."""
        try:
            resp = await self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=max(1, min(max_messages, 10)),
                WaitTimeSeconds=wait_time_s,
                VisibilityTimeout=visibility_s,
                MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
            )
        except (ClientError, BotoCoreError) as exc:
            raise QueueError(f"could not receive work: {exc}") from exc
        out = []
        for m in resp.get("Messages", []):
            attrs = m.get("Attributes", {})
            try:
                msg: WorkMessage | None = WorkMessage.model_validate_json(m["Body"])
            except ValidationError:
                log.error("work message %s is not a valid work message; leaving it for the DLQ", m["MessageId"])
                msg = None
            out.append(
                ReceivedWork(
                    message=msg,
                    receipt_handle=m["ReceiptHandle"],
                    receive_count=int(attrs.get("ApproximateReceiveCount", "1")),
                    sent_at_ms=int(attrs.get("SentTimestamp", "0")),
                    raw_body=m["Body"],
                )
            )
        return out

    async def delete(self, receipt_handle: str) -> None:
        """Settle a message for good."""
        try:
            await self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=receipt_handle)
        except (ClientError, BotoCoreError) as exc:
            raise QueueError(f"could not delete work message: {exc}") from exc

    async def set_visibility(self, receipt_handle: str, seconds: int) -> None:
        """Hide the message for ``seconds`` more (0 = hand it back now)."""
        try:
            await self.sqs.change_message_visibility(
                QueueUrl=self.queue_url, ReceiptHandle=receipt_handle, VisibilityTimeout=max(0, min(seconds, 43200))
            )
        except (ClientError, BotoCoreError) as exc:
            raise QueueError(f"could not change message visibility: {exc}") from exc

    async def depth(self) -> int:
        """Approximate number of visible messages (also a reachability probe)."""
        try:
            resp = await self.sqs.get_queue_attributes(
                QueueUrl=self.queue_url, AttributeNames=["ApproximateNumberOfMessages"]
            )
        except (ClientError, BotoCoreError) as exc:
            raise QueueError(f"work queue unreachable: {exc}") from exc
        return int(resp["Attributes"].get("ApproximateNumberOfMessages", "0"))
