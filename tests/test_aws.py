"""The AWS client factory talks to a real moto server process over HTTP."""

from pipeline.aws import AwsClients


async def test_clients_reach_moto(aws: AwsClients, bucket: str) -> None:
    await aws.s3.put_object(Bucket=bucket, Key="k", Body=b"hello")
    obj = await aws.s3.get_object(Bucket=bucket, Key="k")
    async with obj["Body"] as body:
        assert await body.read() == b"hello"
    q = await aws.sqs.create_queue(QueueName="smoke-q")
    assert q["QueueUrl"]
