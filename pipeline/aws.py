"""Builds aiobotocore clients from :class:`~pipeline.settings.AwsSettings`, with explicit timeouts and
retries. The caller owns them: enter each on an ``AsyncExitStack`` (the app's cleanup context does)."""

from __future__ import annotations

import platform
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiobotocore
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from pipeline import __version__
from pipeline.settings import AwsSettings

USER_AGENT = f"aqua-pipeline/{__version__} aiobotocore/{aiobotocore.__version__} Python/{platform.python_version()}"
"""The User-Agent of every AWS request: fixed, so botocore does not rebuild its own (OS, architecture, feature
and config metadata, each component sanitized) for every request. That rebuild was ~8% of a loaded receiver's
CPU (py-spy, ``bench.callbacks --aws stub`` at 500/s), ~0.1 ms per call. botocore appends ``botocore/<version>``."""

UNVALIDATED_SERVICES = frozenset({"dynamodb", "sqs"})
"""Clients whose requests botocore does not validate against the service model before sending (see
:func:`client_config`)."""


def client_config(aws: AwsSettings, *, validate_params: bool = True) -> AioConfig:
    """Timeouts and retry policy for every AWS client, set in one place.

    ``validate_params=False`` skips botocore's client-side check of each request's parameters against the
    service model (~0.04 of ~0.95 ms CPU per UpdateItem here). :func:`open_clients` turns it off for DynamoDB and
    SQS, the two calls of every accepted callback: every parameter we send them is built by our own typed code
    (``pipeline.dynamo``'s codec and expression builder, ``pipeline.workqueue``'s clamped counts), and the
    services validate each request themselves; a request they refuse still raises ``ClientError``.
    """
    return AioConfig(
        connect_timeout=aws.connect_timeout_s,
        read_timeout=aws.read_timeout_s,
        retries={"max_attempts": aws.max_attempts, "mode": "standard"},
        max_pool_connections=aws.max_pool_connections,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"payload_signing_enabled": aws.s3_payload_signing},
        parameter_validation=validate_params,
        user_agent=USER_AGENT,
    )


def client_kwargs(aws: AwsSettings, *, validate_params: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``session.create_client`` (region, endpoint, credentials, config)."""
    kw: dict[str, Any] = {"region_name": aws.region, "config": client_config(aws, validate_params=validate_params)}
    if aws.endpoint_url:
        kw["endpoint_url"] = aws.endpoint_url
    if aws.access_key_id and aws.secret_access_key:
        kw["aws_access_key_id"] = aws.access_key_id
        kw["aws_secret_access_key"] = aws.secret_access_key.get_secret_value()
    return kw


@dataclass(frozen=True)
class AwsClients:
    """The AWS clients the service uses, all opened on one exit stack."""

    s3: Any
    sqs: Any
    sns: Any
    dynamodb: Any
    events: Any


async def open_clients(stack: AsyncExitStack, aws: AwsSettings) -> AwsClients:
    """Create every client on ``stack``; they close when the stack does."""
    session = get_session()

    async def make(service: str) -> Any:
        kw = client_kwargs(aws, validate_params=service not in UNVALIDATED_SERVICES)
        return await stack.enter_async_context(session.create_client(service, **kw))

    return AwsClients(
        s3=await make("s3"),
        sqs=await make("sqs"),
        sns=await make("sns"),
        dynamodb=await make("dynamodb"),
        events=await make("events"),
    )
