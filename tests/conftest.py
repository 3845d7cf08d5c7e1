"""Shared fixtures: an isolated environment, a real moto server process, AWS clients built as in
production, and the AQuA simulator served over real HTTP on a free port."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any

import pytest

from pipeline.aws import AwsClients, open_clients
from pipeline.settings import AwsSettings
from pipeline.testing.faultproxy import create_faultproxy_app
from pipeline.testing.moto import MotoServer, free_port, start_moto
from pipeline.testing.stack import serve_app


@pytest.fixture(autouse=True)
def isolate_aws_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No developer AWS config, no AQUA_PIPELINE_* leaks into tests."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "AQUA_PIPELINE_"))}
    for k in saved:
        del os.environ[k]
    empty = tmp_path_factory.mktemp("aws")
    os.environ["AWS_CONFIG_FILE"] = str(empty / "config")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(empty / "credentials")
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith(("AWS_", "AQUA_PIPELINE_"))]:
            del os.environ[k]
        os.environ.update(saved)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One moto server process for the session; tests use unique resource names."""
    server = start_moto()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_settings(moto_server: MotoServer) -> AwsSettings:
    return AwsSettings(
        endpoint_url=moto_server.url,
        access_key_id="testing",
        secret_access_key="testing",  # type: ignore[arg-type]
        max_attempts=2,
        connect_timeout_s=2,
        read_timeout_s=20,
    )


@pytest.fixture
async def aws(aws_settings: AwsSettings) -> AsyncIterator[AwsClients]:
    """aiobotocore clients against the moto server, exactly as production builds them."""
    async with AsyncExitStack() as stack:
        yield await open_clients(stack, aws_settings)


@pytest.fixture
async def atomic_aws(aws_settings: AwsSettings) -> AsyncIterator[AwsClients]:
    """Like ``aws``, with DynamoDB calls forwarded one at a time through the fault proxy: moto can let two
    racing conditional writes both win, real DynamoDB never does. For tests that race them on purpose."""
    async with AsyncExitStack() as stack:
        proxy = create_faultproxy_app(aws_settings.endpoint_url or "", serialize={"dynamodb"})
        url = await serve_app(stack, proxy, free_port())
        yield await open_clients(stack, aws_settings.model_copy(update={"endpoint_url": url}))


@pytest.fixture
def unique() -> str:
    """A short unique suffix for resource names."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def bucket(aws: AwsClients, unique: str) -> AsyncIterator[str]:
    """A fresh bucket, emptied and deleted afterwards."""
    name = f"test-{unique}"
    await aws.s3.create_bucket(Bucket=name)
    yield name
    try:
        resp: Any = await aws.s3.list_objects_v2(Bucket=name)
        for obj in resp.get("Contents", []):
            await aws.s3.delete_object(Bucket=name, Key=obj["Key"])
        await aws.s3.delete_bucket(Bucket=name)
    except Exception:
        pass
