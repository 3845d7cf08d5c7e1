"""A small reverse proxy in front of a moto server that injects faults per AWS operation.

Point the service's ``aws.endpoint_url`` at the proxy and keep the test's own clients on moto directly. Each
request is named ``(service, operation)``: the service from the SigV4 credential scope, the operation from
``X-Amz-Target`` (JSON protocols: SQS, DynamoDB, EventBridge), the ``Action`` form field (query protocols:
SNS) or the method and query string (S3 REST, e.g. ``UploadPart``, ``CompleteMultipartUpload``).

A :class:`FaultRule` answers matching requests with an AWS-shaped error (``503 SlowDown``, ``500
InternalError``, ...) or drops the connection, for its next ``count`` matches and/or until a deadline.
Rules are added from the test in-process (:meth:`FaultProxy.add`) or over HTTP
(``POST /_proxy/faults`` with a rule as JSON, ``DELETE /_proxy/faults``, ``GET /_proxy/stats``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import orjson
from aiohttp import web

log = logging.getLogger(__name__)

_CRED_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/[^/]+/([^/]+)/aws4_request")
_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect", "content-length"}
)
_QUERY_PROTOCOL_SERVICES = frozenset({"sns", "sqs"})


@dataclass
class FaultRule:
    """Fault the matching requests: the next ``count`` of them (None = any number) while ``until`` (a
    ``time.monotonic()`` deadline, None = no deadline) has not passed. ``operation`` None matches every
    operation of ``service``. ``action`` ``"error"`` answers ``status``/``code``; ``"drop"`` closes the
    connection without an answer."""

    service: str
    operation: str | None = None
    status: int = 503
    code: str = "ServiceUnavailable"
    action: Literal["error", "drop"] = "error"
    count: int | None = None
    until: float | None = None
    fired: int = 0

    def matches(self, service: str, operation: str, now: float) -> bool:
        if self.service != service or (self.operation is not None and self.operation != operation):
            return False
        if self.until is not None and now >= self.until:
            return False
        return self.count is None or self.fired < self.count

    @property
    def spent(self) -> bool:
        return self.count is not None and self.fired >= self.count


@dataclass
class FaultProxy:
    """The proxy's state: where moto is, the active rules, and counters of what passed and what was faulted."""

    upstream: str
    rules: list[FaultRule] = field(default_factory=list)
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    faulted: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(
        self,
        service: str,
        operation: str | None = None,
        *,
        status: int = 503,
        code: str = "ServiceUnavailable",
        action: Literal["error", "drop"] = "error",
        count: int | None = None,
        for_s: float | None = None,
    ) -> FaultRule:
        """Add a rule: fault the next ``count`` matching requests and/or all of them for ``for_s`` seconds."""
        if count is None and for_s is None:
            raise ValueError("a rule needs a count or a duration")
        until = time.monotonic() + for_s if for_s is not None else None
        rule = FaultRule(service, operation, status, code, action, count, until)
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule."""
        self.rules.clear()

    def pick(self, service: str, operation: str) -> FaultRule | None:
        """The first live rule for this request (and count it as fired), or None to pass it through."""
        now = time.monotonic()
        self.seen[(service, operation)] += 1
        for rule in self.rules:
            if rule.matches(service, operation, now):
                rule.fired += 1
                self.faulted[(service, operation)] += 1
                return rule
        return None


FAULTPROXY_KEY = web.AppKey("faultproxy", FaultProxy)
_SESSION_KEY = web.AppKey("faultproxy_session", aiohttp.ClientSession)


def s3_operation(method: str, path: str, query: dict[str, str], headers: dict[str, str]) -> str:
    """The S3 REST operation name for a path-style request (the subset the pipeline and tests use)."""
    parts = [p for p in path.split("/") if p]
    if len(parts) <= 1:  # bucket level (or service level)
        if method == "GET":
            if "uploads" in query:
                return "ListMultipartUploads"
            if "lifecycle" in query:
                return "GetBucketLifecycleConfiguration"
            return "ListObjectsV2" if query.get("list-type") == "2" else ("ListObjects" if parts else "ListBuckets")
        return {"PUT": "CreateBucket", "HEAD": "HeadBucket", "DELETE": "DeleteBucket"}.get(method, method)
    if method == "PUT":
        if "partNumber" in query:
            return "UploadPartCopy" if "x-amz-copy-source" in headers else "UploadPart"
        return "CopyObject" if "x-amz-copy-source" in headers else "PutObject"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        return "PostObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    if method == "GET":
        return "ListParts" if "uploadId" in query else "GetObject"
    return "HeadObject" if method == "HEAD" else method


def _error_body(service: str, status: int, code: str) -> tuple[bytes, str, dict[str, str]]:
    message = f"injected fault ({status} {code})"
    if service in ("dynamodb", "events", "sqs"):
        body = orjson.dumps({"__type": f"com.amazonaws.{service}#{code}", "message": message})
        return body, "application/x-amz-json-1.0", {"x-amzn-query-error": f"{code};Receiver"}
    if service == "s3":
        xml = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
        return xml.encode(), "application/xml", {}
    xml = (
        f"<ErrorResponse><Error><Type>Receiver</Type><Code>{code}</Code><Message>{message}</Message></Error>"
        "<RequestId>faultproxy</RequestId></ErrorResponse>"
    )
    return xml.encode(), "text/xml", {}


async def _identify(request: web.Request, body: bytes) -> tuple[str, str]:
    match = _CRED_SCOPE.search(request.headers.get("Authorization", ""))
    service = match.group(1) if match else "unknown"
    target = request.headers.get("X-Amz-Target")
    if target:
        return service, target.rsplit(".", 1)[-1]
    if service == "s3":
        headers = {k.lower(): v for k, v in request.headers.items()}
        return service, s3_operation(request.method, request.path, dict(request.query), headers)
    if service in _QUERY_PROTOCOL_SERVICES and body:
        for pair in body.split(b"&"):
            if pair.startswith(b"Action="):
                return service, pair[7:].decode()
    return service, request.method


def create_faultproxy_app(upstream: str, *, serialize: Collection[str] = ()) -> web.Application:
    """An aiohttp app that forwards everything to ``upstream`` (moto) unless a rule faults it.

    ``serialize`` names services (e.g. ``"dynamodb"``) whose requests are forwarded one at a time. moto serves
    each request on its own thread and does not make a conditional write atomic with respect to a concurrent
    one; serializing gives back the guarantee real DynamoDB makes, for tests that race conditional writes.
    """
    app = web.Application(client_max_size=64 * 1024 * 1024)
    proxy = FaultProxy(upstream.rstrip("/"))
    app[FAULTPROXY_KEY] = proxy
    locks = {name: asyncio.Lock() for name in serialize}

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=120, connect=5)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            app[_SESSION_KEY] = session
            yield

    async def add_rule(request: web.Request) -> web.Response:
        spec = await request.json()
        rule = proxy.add(
            spec["service"],
            spec.get("operation"),
            status=int(spec.get("status", 503)),
            code=spec.get("code", "ServiceUnavailable"),
            action=spec.get("action", "error"),
            count=spec.get("count"),
            for_s=spec.get("for_s"),
        )
        return web.json_response({"service": rule.service, "operation": rule.operation}, status=201)

    async def clear_rules(request: web.Request) -> web.Response:
        proxy.clear()
        return web.json_response({"cleared": True})

    async def stats(request: web.Request) -> web.Response:
        def flat(c: Counter[tuple[str, str]]) -> dict[str, int]:
            return {f"{s}:{o}": n for (s, o), n in sorted(c.items())}

        return web.json_response({"seen": flat(proxy.seen), "faulted": flat(proxy.faulted)})

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        service, operation = await _identify(request, body)
        rule = proxy.pick(service, operation)
        if rule is not None:
            log.info("fault %s on %s:%s", rule.action, service, operation)
            if rule.action == "drop":
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError  # the connection is gone; nothing to answer
            payload, ctype, extra = _error_body(service, rule.status, rule.code)
            return web.Response(status=rule.status, body=payload, content_type=ctype.split(";")[0], headers=extra)
        lock = locks.get(service)
        if lock is None:
            return await _relay(request, body)
        async with lock:
            return await _relay(request, body)

    async def _relay(request: web.Request, body: bytes) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        session = app[_SESSION_KEY]
        async with session.request(
            request.method, proxy.upstream + request.path_qs, headers=headers, data=body, allow_redirects=False
        ) as upstream_resp:
            data = await upstream_resp.read()
            out_headers = {k: v for k, v in upstream_resp.headers.items() if k.lower() not in _HOP}
            resp = web.Response(status=upstream_resp.status, headers=out_headers)
            if request.method == "HEAD":
                resp.headers["Content-Length"] = upstream_resp.headers.get("Content-Length", "0")
            else:
                resp.body = data
            return resp

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/_proxy/faults", add_rule)
    app.router.add_delete("/_proxy/faults", clear_rules)
    app.router.add_get("/_proxy/stats", stats)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app
