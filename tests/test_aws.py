"""The AWS client factory talks to a real moto server process over HTTP."""

import asyncio
import hashlib
import uuid
from typing import Any

import botocore
import pytest
from aiobotocore.session import get_session
from botocore.exceptions import ClientError, ParamValidationError

from pipeline.aws import USER_AGENT, AwsClients, client_kwargs
from pipeline.settings import AwsSettings


async def test_clients_reach_moto(aws: AwsClients, bucket: str) -> None:
    await aws.s3.put_object(Bucket=bucket, Key="k", Body=b"hello")
    obj = await aws.s3.get_object(Bucket=bucket, Key="k")
    async with obj["Body"] as body:
        assert await body.read() == b"hello"
    q = await aws.sqs.create_queue(QueueName="smoke-q")
    assert q["QueueUrl"]


async def test_every_request_carries_our_fixed_user_agent(aws: AwsClients) -> None:
    sent: list[str] = []

    def capture(request: Any, **_: Any) -> None:
        ua = request.headers["User-Agent"]
        sent.append(ua.decode() if isinstance(ua, bytes) else ua)

    for client in (aws.sqs, aws.dynamodb):
        client.meta.events.register("before-send", capture, unique_id="ua-capture")
    try:
        await aws.sqs.list_queues()
        await aws.dynamodb.list_tables()
    finally:
        for client in (aws.sqs, aws.dynamodb):
            client.meta.events.unregister("before-send", unique_id="ua-capture")
    assert sent == [f"{USER_AGENT} botocore/{botocore.__version__}"] * 2  # botocore's own extra, no rebuild
    assert USER_AGENT.startswith("aqua-pipeline/")


async def test_callback_path_clients_leave_parameter_checks_to_the_service(aws: AwsClients) -> None:
    """DynamoDB and SQS, the two calls of every accepted callback, skip botocore's client-side parameter
    validation (our own code builds every parameter they get): a request missing a required parameter goes out,
    and the service's refusal comes back as a ClientError, which our wrappers translate as before. The other
    clients still refuse such a request before sending it."""
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ClientError):
        await aws.dynamodb.update_item(TableName=missing)  # no Key
    with pytest.raises(ClientError):
        await aws.sqs.send_message_batch(QueueUrl=f"{aws.sqs.meta.endpoint_url}/123456789012/{missing}")  # no Entries
    with pytest.raises(ParamValidationError):
        await aws.s3.put_object(Key="k")  # no Bucket
    with pytest.raises(ParamValidationError):
        await aws.sns.publish(TopicArn=f"arn:aws:sns:us-east-1:123456789012:{missing}")  # no Message


@pytest.mark.parametrize("signing", [False, True])
async def test_s3_payload_signing_follows_the_setting(aws_settings: AwsSettings, bucket: str, signing: bool) -> None:
    """Off (the default), S3 bodies are not SigV4-hashed (the part checksum travels in a signed header);
    on, they are, even over plain http."""
    seen: list[bytes] = []

    def capture(request: Any, **_: Any) -> None:
        seen.append(request.headers["x-amz-content-sha256"])

    settings = aws_settings.model_copy(update={"s3_payload_signing": signing})
    async with get_session().create_client("s3", **client_kwargs(settings)) as s3:
        s3.meta.events.register("before-send.s3.PutObject", capture)
        body = b"a,b\n1,2\n"
        await s3.put_object(Bucket=bucket, Key="signed", Body=body, ChecksumAlgorithm="CRC32")
    assert seen == [hashlib.sha256(body).hexdigest().encode() if signing else b"UNSIGNED-PAYLOAD"]


async def test_serialized_proxy_makes_racing_conditional_writes_exclusive(atomic_aws: AwsClients) -> None:
    """Through the fault proxy with DynamoDB serialized (the ``atomic_aws`` fixture), exactly one of two racing
    take-if-free updates wins (moto alone, serving each request on a thread, sometimes lets both through)."""
    ddb = atomic_aws.dynamodb
    table = f"race-{uuid.uuid4().hex[:8]}"
    await ddb.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )

    async def take(key: str, n: int) -> bool:
        try:
            await ddb.update_item(
                TableName=table,
                Key={"k": {"S": key}},
                UpdateExpression="SET holder = :n",
                ConditionExpression="attribute_not_exists(holder) OR holder = :n",
                ExpressionAttributeValues={":n": {"N": str(n)}},
            )
        except ddb.exceptions.ConditionalCheckFailedException:
            return False
        return True

    for round_ in range(200):  # two contenders for a fresh item, as two workers racing for a session
        assert sum(await asyncio.gather(take(f"s{round_}", 1), take(f"s{round_}", 2))) == 1
