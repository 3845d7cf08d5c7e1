"""The public callback route: authenticate, validate, record in the ledger, enqueue one work message,
answer fast. It never fetches files and never trusts the status it is told: the worker re-reads the job.

Accepted shapes (REFERENCE.md §7):

* our notifyUrl: ``GET|POST /callbacks/aqua?jobId=<id>&status=<status>&token=<token>``;
* a callout configured in Zuora's UI: merge fields ``Aqua.JobId``, ``Aqua.JobStatus``, ``Aqua.PartnerName``
  as query parameters, a form body or a JSON body, with ``Zuora-Notification-Id`` as the de-duplication key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import orjson
from aiohttp import web
from aiohttp.web_urldispatcher import _default_expect_handler

from pipeline.aqua.client import check_track_id
from pipeline.aqua.models import is_aqua_id
from pipeline.callback_auth import AuthResult, CallbackAuthenticator
from pipeline.callback_record import CallbackRecorder
from pipeline.errors import CallbackRejected, PipelineError
from pipeline.ledger import JobState
from pipeline.logs import bound
from pipeline.metrics import Metrics
from pipeline.models import WorkMessage, dumps
from pipeline.workqueue import WorkQueue

log = logging.getLogger(__name__)

KNOWN_STATUSES = frozenset(
    {"completed", "error", "aborted", "cancelled", "canceled", "submitted", "pending", "executing", "failed"}
)
_JOB_KEYS = ("jobid", "job_id", "aqua.jobid", "aquajobid", "id")
_STATUS_KEYS = ("status", "jobstatus", "aqua.jobstatus", "aquajobstatus")
_PARTNER_KEYS = ("aqua.partnername", "partner", "partnername")
MAX_QUERY_STRING = 8192
MAX_FIELD = 512


@dataclass(frozen=True)
class CallbackParams:
    """What a callback told us, whichever shape it came in."""

    job_id: str
    status: str | None
    partner: str | None
    notification_id: str | None
    track_id: str | None


def _pick(fields: Mapping[str, str], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if key in fields:
            return fields[key]
    return None


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The request body (bounded by the app's ``client_max_size``: 413 beyond it), which must arrive within
    ``timeout_s``: a client that sends its headers and then stalls would otherwise hold the handler, and the
    connection, for as long as it likes. ``web.HTTPRequestTimeout`` (408) when it does not; later
    ``request.read()`` or ``request.post()`` calls reuse the body read here."""
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(reason=f"request body not received within {timeout_s:g} s") from None


async def read_fields(request: web.Request, *, body_timeout_s: float) -> dict[str, str]:
    """Query parameters merged with a form or JSON body, keys lower-cased."""
    if len(request.query_string) > MAX_QUERY_STRING:
        raise CallbackRejected("query string too long", status=414, code="uri_too_long")
    fields: dict[str, str] = {}
    for k, v in request.query.items():
        fields.setdefault(k.lower(), v)
    if request.method == "POST" and request.can_read_body:
        try:
            body = await read_body(request, body_timeout_s)
        except web.HTTPRequestEntityTooLarge:
            raise CallbackRejected("callback body is too large", status=413, code="payload_too_large") from None
        except web.HTTPRequestTimeout as exc:
            raise CallbackRejected(exc.reason, status=408, code="body_timeout") from None
        ctype = request.content_type
        if body and ctype == "application/json":
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise CallbackRejected("body is not valid JSON", code="malformed_body") from None
            if not isinstance(data, dict):
                raise CallbackRejected("JSON body must be an object", code="malformed_body")
            for k, v in data.items():
                if isinstance(v, str | int | float | bool):
                    fields.setdefault(str(k).lower(), str(v))
        elif body and ctype == "application/x-www-form-urlencoded":
            try:
                form = await request.post()
            except UnicodeDecodeError:  # aiohttp decodes the form with the declared (default UTF-8) charset
                raise CallbackRejected("form body is not valid in its charset", code="malformed_body") from None
            for fk, fv in form.items():
                if isinstance(fv, str):
                    fields.setdefault(fk.lower(), fv)
    for k, v in fields.items():
        if len(v) > MAX_FIELD:
            raise CallbackRejected(f"parameter {k!r} is too long", code="field_too_long")
    return fields


def parse_params(fields: Mapping[str, str], headers: Mapping[str, str]) -> CallbackParams:
    """Validate the job id shape and the status word; raise :class:`CallbackRejected` (400) otherwise."""
    job_id = (_pick(fields, _JOB_KEYS) or "").strip()
    if not job_id:
        raise CallbackRejected("missing job id (jobId)", code="missing_job_id")
    if not is_aqua_id(job_id.lower()):
        raise CallbackRejected("job id is not a 32-character hex AQuA id", code="invalid_job_id")
    status = _pick(fields, _STATUS_KEYS)
    if status is not None:
        status = status.strip().lower()
        if status not in KNOWN_STATUSES:
            raise CallbackRejected("unknown job status", code="invalid_status")
    notification_id = headers.get("Zuora-Notification-Id")
    if notification_id is not None and (len(notification_id) > 128 or not notification_id.isprintable()):
        raise CallbackRejected("invalid Zuora-Notification-Id", code="invalid_notification_id")
    track_id = headers.get("Zuora-Track-Id") or headers.get("Zuora-Request-Id")
    if track_id is not None:
        try:
            track_id = check_track_id(track_id)
        except ValueError:
            track_id = None  # not usable as our own Zuora-Track-Id; correlation falls back to ours
    partner = _pick(fields, _PARTNER_KEYS)
    return CallbackParams(job_id.lower(), status, partner, notification_id, track_id)


class CallbackHandler:
    """The callback route's handler, built once per app; owns no resources, only uses injected ones.

    ``recorder`` counts each callback in the ledger before the answer; with ``defer_token_callbacks`` a callback
    with a valid token of ours is only enqueued, and the worker counts it (see :mod:`pipeline.callback_record`).
    """

    def __init__(
        self,
        *,
        authenticator: CallbackAuthenticator,
        recorder: CallbackRecorder,
        queue: WorkQueue,
        metrics: Metrics,
        defer_token_callbacks: bool = False,
        body_timeout_s: float = 10.0,
    ) -> None:
        self.authenticator = authenticator
        self.recorder = recorder
        self.queue = queue
        self.metrics = metrics
        self.defer_token_callbacks = defer_token_callbacks
        self.body_timeout_s = body_timeout_s

    async def __call__(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            return await self._handle(request)
        except CallbackRejected as exc:
            self.metrics.callbacks.labels(exc.code).inc()
            log.debug("callback rejected: %s (%s)", exc.code, exc)
            return error_response(exc.status, exc.code, str(exc), headers=exc.headers)
        except PipelineError as exc:
            self.metrics.callbacks.labels("unavailable").inc()
            log.error("callback could not be recorded: %s", exc)
            return error_response(503, "unavailable", "could not record the callback; retry later", retry_after=5)
        finally:
            self.metrics.callback_latency.observe(time.perf_counter() - started)

    async def _handle(self, request: web.Request) -> web.Response:
        fields = await read_fields(request, body_timeout_s=self.body_timeout_s)
        # the query as sent, not the merged fields: a repeated token or secret must be seen to be refused
        auth: AuthResult = self.authenticator.authenticate(
            query=request.query, headers=request.headers, remote=request.remote
        )
        params = parse_params(fields, request.headers)
        submission_id = auth.claim.submission_id if auth.claim is not None else None
        with bound(job_id=params.job_id, track_id=params.track_id):
            deferred = self.defer_token_callbacks and submission_id is not None
            if not deferred:
                record = await self.recorder.record(
                    params.job_id,
                    submission_id=submission_id,
                    status=params.status,
                    notification_id=params.notification_id,
                )
                if record.duplicate:
                    self.metrics.callbacks.labels("duplicate").inc()
                    return json_response(200, {"accepted": True, "duplicate": True, "job_id": params.job_id})
                if record.state in (JobState.published, JobState.failed):
                    self.metrics.callbacks.labels("already_done").inc()
                    body = {"accepted": True, "already": str(record.state), "job_id": params.job_id}
                    return json_response(200, body)
            message = WorkMessage(
                job_id=params.job_id,
                callback_status=params.status,
                notification_id=params.notification_id,
                track_id=params.track_id,
                submission_id=submission_id if deferred else None,
            )
            try:
                await self.queue.send(message)
            except PipelineError:
                if not deferred and params.notification_id is not None:  # counted above, so a retry would be a
                    await self.recorder.unrecord(params.job_id, params.notification_id)  # "duplicate": take it back
                raise
            self.metrics.callbacks.labels("accepted").inc()
            log.info("callback accepted (status %s, via %s)", params.status, auth.method)
            return json_response(202, {"accepted": True, "job_id": params.job_id})


def json_response(status: int, body: object, *, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON response serialised with orjson."""
    return web.Response(status=status, text=dumps(body), content_type="application/json", headers=headers)


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """Every route's ``Expect`` handling: ``100-continue`` as aiohttp does it; anything else 417 in the JSON
    error shape (aiohttp's own answer, raised before any middleware runs, is text/plain)."""
    expect = request.headers.get("Expect", "")
    if expect.lower() == "100-continue":
        await _default_expect_handler(request)
        return None
    return error_response(417, "expectation_failed", f"unsupported Expect header: {expect[:100]!r}")


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    retry_after: int | None = None,
) -> web.Response:
    """The JSON error shape every route uses: ``{"error": code, "message": ...}``. A 408 also closes the
    connection: the rest of the request that did not come in time must not be read as the next one."""
    hdrs = dict(headers or {})
    if retry_after is not None:
        hdrs["Retry-After"] = str(retry_after)
    resp = json_response(status, {"error": code, "message": message}, headers=hdrs)
    if status == 408:
        resp.force_close()
    return resp
