"""The async AQuA API client (REFERENCE.md §1-§8, §11) over an injected ``aiohttp.ClientSession``.

Every call: a bearer token from :class:`~pipeline.aqua.auth.TokenCache` (refreshed once on 401), a
``Zuora-Track-Id``, bounded retries with capped exponential backoff and jitter on 429 / 5xx / connection
errors, and errors translated into :mod:`pipeline.errors`. Ids are checked before they reach a URL, and every
URL starts with ``settings.base_url``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from pipeline.aqua.auth import TRANSIENT_4XX, TokenCache, describe_error, parse_retry_after
from pipeline.aqua.models import Job, SubmitRequest, is_aqua_id
from pipeline.backoff import backoff_delay
from pipeline.errors import (
    AquaAuthError,
    AquaFileTooLarge,
    AquaNotFound,
    AquaRateLimited,
    AquaUnavailable,
    AquaValidationError,
    UpstreamError,
)
from pipeline.models import FileSource
from pipeline.settings import AquaSettings

log = logging.getLogger(__name__)

_TRACK_ID_RE = re.compile(r"^[\x20-\x7e]{1,64}$")
_TRACK_ID_FORBIDDEN = set(":;\"'")
_MAX_ERROR_BODY = 64 * 1024
_MAX_IDEMPOTENCY_KEY = 255
JOB_LIMIT_CODE = "90028"
"""AQuA's refusal of a job over the tenant's concurrent job limit (REFERENCE.md §10): no job is made."""
_RETRYABLE_AQUA_CODES = {"90006", "90008", "90010", "90022", JOB_LIMIT_CODE}
"""AQuA error codes worth trying again later: an internal, temporary failure (REFERENCE.md §11.1), or the
concurrent job limit, which lifts as the tenant's running jobs finish."""
_RETRYABLE_V1_CATEGORIES = {"50", "61", "70", "99"}
"""v1 error categories worth retrying (REFERENCE.md §11.2)."""
_NOT_FOUND_AQUA_CODES = {"90001", "90002"}
TOO_LARGE_HINT = (
    "AQuA refuses result files over 2,047 MB; split the query into UpdatedDate windows "
    "(e.g. one job per month or day) so each file stays under the limit"
)


def check_id(value: str, what: str) -> str:
    """Return ``value`` when it has AQuA's id shape (32 lower-case hex); raise ``ValueError`` otherwise."""
    if not isinstance(value, str) or not is_aqua_id(value):
        raise ValueError(f"not an AQuA {what}: {value!r}")
    return value


def check_track_id(value: str) -> str:
    """Return ``value`` when it is a valid ``Zuora-Track-Id`` (<=64 printable ASCII, no ``:;"'``)."""
    if not _TRACK_ID_RE.match(value) or _TRACK_ID_FORBIDDEN & set(value):
        raise ValueError(f"invalid Zuora-Track-Id: {value!r}")
    return value


def new_track_id(op: str) -> str:
    """A fresh track id for one operation, e.g. ``aqua-get_job-3f2a...``."""
    return f"aqua-{op}-{uuid.uuid4().hex}"


def _body_text(body: bytes) -> str:
    return body[:500].decode(errors="replace").strip()


def _error_from_body(data: Any, *, status: int, request_id: str | None) -> AquaValidationError | AquaNotFound | None:
    """Our error for a body that says it failed (AQuA ``errorCode``/``status:error`` or v1 ``success:false``)."""
    if not isinstance(data, dict):
        return None
    code: str | None = None
    message: str | None = None
    if data.get("errorCode") is not None or str(data.get("status", "")).lower() == "error":
        code = None if data.get("errorCode") is None else str(data["errorCode"])
        message = str(data.get("message") or "AQuA rejected the request")
        if code in _NOT_FOUND_AQUA_CODES:
            return AquaNotFound(f"AQuA error {code}: {message}", status=status, request_id=request_id)
        retryable = code in _RETRYABLE_AQUA_CODES
        if code == JOB_LIMIT_CODE:
            message += " (the tenant's concurrent job limit: its jobs in Submitted or Executing count; try again later)"
    elif data.get("success") is False:
        reasons = data.get("reasons") or [{}]
        first = reasons[0] if isinstance(reasons, list) and reasons and isinstance(reasons[0], dict) else {}
        code = None if first.get("code") is None else str(first["code"])
        message = str(first.get("message") or "request failed")
        retryable = bool(code and code[-2:] in _RETRYABLE_V1_CATEGORIES)
    else:
        return None
    return AquaValidationError(
        f"AQuA error {code}: {message}", error_code=code, status=status, request_id=request_id, retryable=retryable
    )


def _retry_cause(error: UpstreamError) -> str:
    """The metrics label of a retried failure."""
    if isinstance(error, AquaRateLimited):
        return "rate_limited"
    if error.status is not None and error.status >= 500:
        return "server_error"
    if error.status == 409:
        return "in_progress"
    return "connection"


class _Attempt(Exception):
    """One attempt failed in a way a retry may fix."""

    def __init__(self, error: UpstreamError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


class _Replayed(Exception):
    """A 409 to a submit whose body is the job its Idempotency-Key made: how DEV-ERRH says AQuA answers a replay
    (REFERENCE.md §2.2, §15); DEV-IDEM says a replay gets the stored 200 instead. Either way it is the job."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(f"replayed job {data.get('id')}")
        self.data = data


class AquaClient:
    """Async client for the AQuA endpoints; the session is injected and never closed here."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: AquaSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        """``on_retry`` is told the cause of every retry: ``rate_limited``, ``server_error``, ``connection``
        or ``auth_refresh`` (a metrics hook; it must not raise)."""
        self._session = session
        self._on_retry = on_retry
        self._settings = settings
        self._clock = clock
        self._sleep = sleep
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
        )
        self.auth = TokenCache(
            session,
            base_url=settings.base_url,
            client_id=settings.client_id,
            client_secret=settings.client_secret.get_secret_value(),
            refresh_margin_s=settings.token_refresh_margin_s,
            timeout=self._timeout,
            clock=clock,
        )

    # -- operations -------------------------------------------------------------------------------------

    async def submit(
        self,
        request: SubmitRequest,
        *,
        idempotency_key: str | None = None,
        entity_ids: str | None = None,
        track_id: str | None = None,
    ) -> Job:
        """Submit a job (``POST /v1/batch-query/``); a 200 body with ``errorCode`` raises AquaValidationError.

        Without ``idempotency_key`` one is generated, so a retried POST cannot create a second job.
        """
        key = idempotency_key or uuid.uuid4().hex
        if len(key) > _MAX_IDEMPOTENCY_KEY:
            raise ValueError("Idempotency-Key longer than 255 characters")
        headers = {"Idempotency-Key": key}
        if entity_ids:
            headers["Zuora-Entity-Ids"] = entity_ids
        try:
            data = await self._json(
                "POST", "/v1/batch-query/", op="submit", body=request.to_body(), headers=headers, track_id=track_id
            )
        except _Replayed as replay:
            log.info("AQuA answered the Idempotency-Key's replay with 409 and the job it made, %s", replay.data["id"])
            data = replay.data
        job = Job.model_validate(data)
        if not job.id:
            raise AquaValidationError("AQuA accepted the submit but returned no job id", status=200)
        return job

    async def get_job(self, job_id: str, *, track_id: str | None = None) -> Job:
        """The job and its batches (``GET /v1/batch-query/jobs/{id}``)."""
        path = f"/v1/batch-query/jobs/{check_id(job_id, 'job id')}"
        return Job.model_validate(await self._json("GET", path, op="get_job", track_id=track_id))

    async def cancel_job(self, job_id: str, *, track_id: str | None = None) -> Job:
        """Cancel a job that has not finished (``DELETE /v1/batch-query/jobs/{id}``)."""
        path = f"/v1/batch-query/jobs/{check_id(job_id, 'job id')}"
        return Job.model_validate(await self._json("DELETE", path, op="cancel_job", track_id=track_id))

    async def last_completed_job(self, partner: str, project: str, *, track_id: str | None = None) -> Job | None:
        """The last completed job of a stateful session, or None when it has none."""
        if not partner or not project:
            raise ValueError("partner and project are required")
        path = f"/v1/batch-query/jobs/partner/{quote(partner, safe='')}/project/{quote(project, safe='')}"
        try:
            data = await self._json("GET", path, op="last_completed_job", track_id=track_id)
        except AquaNotFound:
            return None
        job = Job.model_validate(data)
        return job if job.id else None

    async def wait_for_job(
        self,
        job_id: str,
        *,
        poll_interval_s: float = 10.0,
        timeout_s: float = 12 * 3600.0,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll until the job finishes; ``on_update`` sees the job whenever its status changes.

        Raises a retryable :class:`UpstreamError` when it is still running after ``timeout_s``.
        """
        check_id(job_id, "job id")
        deadline = self._clock() + timeout_s
        last_status: str | None = None
        while True:
            job = await self.get_job(job_id)
            if job.status != last_status:
                last_status = job.status
                if on_update is not None:
                    on_update(job)
            if job.finished:
                return job
            if self._clock() + poll_interval_s > deadline:
                raise UpstreamError(f"job {job_id} still {job.status} after {timeout_s:.0f}s", retryable=True)
            await self._sleep(poll_interval_s)

    @asynccontextmanager
    async def open_file(
        self, file_id: str, *, accept_gzip: bool = True, track_id: str | None = None
    ) -> AsyncIterator[FileSource]:
        """Open a result file (``GET /v1/files/{id}``) and stream its raw wire bytes; closed on exit.

        Retries cover opening the download, not the body. A body cut short raises a retryable
        :class:`AquaUnavailable` ("truncated download") from the ``chunks`` iterator.
        """
        path = f"/v1/files/{check_id(file_id, 'file id')}"
        headers = {"Accept-Encoding": "gzip" if accept_gzip else "identity"}
        resp = await self._send("GET", path, op="download", headers=headers, track_id=track_id, download=True)
        chunks = self._iter_body(resp, file_id)
        try:
            yield FileSource(
                file_id=file_id,
                chunks=chunks,
                content_length=resp.content_length,
                content_type=resp.headers.get("Content-Type", "application/octet-stream"),
                content_encoding=resp.headers.get("Content-Encoding") or None,
            )
        finally:
            await chunks.aclose()
            if resp.content.at_eof():
                resp.release()
            else:
                resp.close()

    # -- transport --------------------------------------------------------------------------------------

    async def _iter_body(self, resp: aiohttp.ClientResponse, file_id: str) -> AsyncGenerator[bytes, None]:
        expected = resp.content_length
        request_id = resp.headers.get("Zuora-Request-Id")
        if expected is None and "chunked" not in resp.headers.get("Transfer-Encoding", "").lower():
            log.warning(
                "file %s comes without Content-Length or chunking: a cut connection would look like its end, and only"
                " the file's own checks (gzip, record count) can tell (request_id=%s)",
                file_id,
                request_id,
            )
        received = 0
        try:
            async for chunk in resp.content.iter_chunked(self._settings.chunk_size):
                received += len(chunk)
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AquaUnavailable(
                f"truncated download of file {file_id}: {received} of {expected or '?'} bytes, "
                f"then {describe_error(exc)}",
                status=resp.status,
                request_id=request_id,
            ) from exc
        if expected is not None and received != expected:
            raise AquaUnavailable(
                f"truncated download of file {file_id}: {received} of {expected} bytes",
                status=resp.status,
                request_id=request_id,
            )
        log.debug("aqua file %s: %d bytes received (request_id=%s)", file_id, received, request_id)

    async def _json(
        self,
        method: str,
        path: str,
        *,
        op: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        track_id: str | None = None,
    ) -> dict[str, Any]:
        """One JSON call: send, read, and turn an error body into our error."""
        headers = {"Accept": "application/json", **(headers or {})}
        resp = await self._send(method, path, op=op, body=body, headers=headers, track_id=track_id)
        request_id = resp.headers.get("Zuora-Request-Id")
        try:
            raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AquaUnavailable(f"{op}: response cut short: {describe_error(exc)}", request_id=request_id) from exc
        finally:
            resp.release()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise AquaUnavailable(
                f"{op}: response is not JSON: {_body_text(raw)!r}", status=resp.status, request_id=request_id
            ) from exc
        if not isinstance(data, dict):
            raise AquaUnavailable(f"{op}: response is not a JSON object", status=resp.status, request_id=request_id)
        # A job that ended in ``error`` is still a job; only a body without an id is a refusal.
        if op == "submit" or not data.get("id"):
            error = _error_from_body(data, status=resp.status, request_id=request_id)
            if error is not None:
                raise error
        return data

    def _headers(self, token: str, track_id: str, extra: dict[str, str] | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {token}", "Zuora-Track-Id": track_id}
        if self._settings.entity_ids:
            headers["Zuora-Entity-Ids"] = self._settings.entity_ids
        if self._settings.org_ids:
            headers["Zuora-Org-Ids"] = self._settings.org_ids
        if extra:
            headers.update(extra)
        return headers

    async def _send(
        self,
        method: str,
        path: str,
        *,
        op: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        track_id: str | None = None,
        download: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send with auth, retries and error translation; return an open 2xx response the caller must close."""
        track = new_track_id(op) if track_id is None else check_track_id(track_id)
        url = self._settings.base_url + path
        data = orjson.dumps(body) if body is not None else None
        if data is not None:
            headers = {**(headers or {}), "Content-Type": "application/json"}
        s = self._settings
        deadline = self._clock() + s.max_retry_time_s
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            try:
                token = await self.auth.get(track_id=track)
                return await self._attempt(method, url, op, token, self._headers(token, track, headers), data, download)
            except _Unauthorized as exc:
                if refreshed:
                    raise exc.error from None
                refreshed = True
                attempt -= 1
                log.warning("aqua %s: 401, refreshing the token once (request_id=%s)", op, exc.error.request_id)
                self.auth.invalidate(exc.token)
                self._retrying("auth_refresh")
                continue
            except _Attempt as exc:
                failure = exc
            except (AquaUnavailable, AquaRateLimited) as exc:  # from the token endpoint
                failure = _Attempt(exc, getattr(exc, "retry_after", None))
            # Our own backoff is capped; a server's Retry-After is honoured in full (within max_retry_time_s).
            delay = backoff_delay(attempt, base=s.backoff_base_s, cap=s.backoff_cap_s)
            if failure.retry_after is not None:
                delay = max(delay, failure.retry_after)
            if attempt >= s.max_attempts or self._clock() + delay > deadline:
                if failure.__cause__ is not None:
                    raise failure.error from failure.__cause__
                raise failure.error
            log.warning(
                "aqua %s %s: %s; retry %d/%d in %.2fs (request_id=%s, track_id=%s)",
                method,
                path,
                failure.error,
                attempt,
                s.max_attempts - 1,
                delay,
                failure.error.request_id,
                track,
            )
            self._retrying(_retry_cause(failure.error))
            await self._sleep(delay)

    def _retrying(self, cause: str) -> None:
        if self._on_retry is not None:
            self._on_retry(cause)

    async def _attempt(
        self,
        method: str,
        url: str,
        op: str,
        token: str,
        headers: dict[str, str],
        data: bytes | None,
        download: bool,
    ) -> aiohttp.ClientResponse:
        """One HTTP exchange; 2xx returns the open response, anything else raises."""
        try:
            resp = await self._session.request(
                method, url, data=data, headers=headers, timeout=self._timeout, auto_decompress=not download
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Attempt(AquaUnavailable(f"{op}: connection failed: {describe_error(exc)}")) from exc
        request_id = resp.headers.get("Zuora-Request-Id")
        log.debug(
            "aqua %s %s -> %d (request_id=%s, track_id=%s)",
            method,
            resp.url.path,
            resp.status,
            request_id,
            headers["Zuora-Track-Id"],
        )
        if resp.status < 300:
            return resp
        try:
            raw = await resp.content.read(_MAX_ERROR_BODY)
        except (aiohttp.ClientError, TimeoutError):
            raw = b""
        finally:
            resp.close()
        raise self._status_error(op, resp, raw, token, download)

    def _status_error(self, op: str, resp: aiohttp.ClientResponse, raw: bytes, token: str, download: bool) -> Exception:
        status = resp.status
        request_id = resp.headers.get("Zuora-Request-Id")
        text = _body_text(raw)
        where = f"{op}: HTTP {status}"
        if status == 401:
            return _Unauthorized(
                AquaAuthError(f"{where}: credentials refused", status=status, request_id=request_id), token
            )
        if status == 429:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            error = AquaRateLimited(
                f"{where}: rate limited", retry_after=retry_after, status=status, request_id=request_id
            )
            return _Attempt(error, retry_after)
        if status >= 500 or status in TRANSIENT_4XX:
            return _Attempt(AquaUnavailable(f"{where}: {text}", status=status, request_id=request_id))
        if status == 403 and download and "max-object-size" in text:
            return AquaFileTooLarge(f"{where}: {TOO_LARGE_HINT}", status=status, request_id=request_id)
        if status == 403:
            return AquaAuthError(f"{where}: forbidden: {text}", status=status, request_id=request_id)
        if status == 404:
            return AquaNotFound(f"{where}: not found (or past retention): {text}", status=status, request_id=request_id)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        parsed = _error_from_body(data, status=status, request_id=request_id)
        if status == 409 and op == "submit":
            if parsed is None and isinstance(data, dict) and is_aqua_id(str(data.get("id") or "")):
                return _Replayed(data)
            # The first request under this key is still in progress (DEV-IDEM): its answer comes on a retry.
            in_progress = f"{where}: a request with this Idempotency-Key is still in progress: {text}"
            return _Attempt(AquaValidationError(in_progress, status=status, request_id=request_id, retryable=True))
        return parsed or AquaValidationError(f"{where}: {text}", status=status, request_id=request_id)


class _Unauthorized(Exception):
    """A 401: refresh the token once, then retry."""

    def __init__(self, error: AquaAuthError, token: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.token = token
