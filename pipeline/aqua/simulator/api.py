"""The AQuA API routes (REFERENCE.md §1.2-§1.3, §2-§8): OAuth, submit, job, cancel, last job, files.

The middleware adds ``Zuora-Request-Id``/``Zuora-Track-Id``/rate-limit headers to every answer, applies the
request faults (429, 5xx) and the bearer-token check.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
from aiohttp import web

from pipeline.aqua.models import is_aqua_id
from pipeline.aqua.simulator.data import FileSpec, gzip_stream
from pipeline.aqua.simulator.keys import SIMULATOR_KEY, WINDOW_KEY
from pipeline.aqua.simulator.state import Simulator, SubmitError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
WWW_AUTHENTICATE = "Basic realm=Zuora API, ZSession realm=Zuora API, Bearer realm=Zuora API"
FILE_PREFIXES = ("/v1/files/", "/v1/file/", "/apps/api/file/", "/apps/api/batch-query/file/")
OVER_LIMIT_BODY = "<security:max-object-size>2047MB</security:max-object-size>"
_BAD_TRACK = set(":;\"'")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def v1_error(status: int, code: int | str, message: str) -> web.Response:
    """The general v1 error shape (REFERENCE.md §11.2)."""
    body = {
        "success": False,
        "processId": secrets.token_hex(8).upper(),
        "reasons": [{"code": code, "message": message}],
    }
    return _json(body, status)


def _scope(path: str) -> str:
    return "files" if path.startswith(FILE_PREFIXES) else "api"


@web.middleware
async def zuora_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request faults, rate limit and bearer auth for the AQuA routes (``/_sim/*`` passes straight through)."""
    sim = request.app[SIMULATOR_KEY]
    track = request.headers.get("Zuora-Track-Id")
    if track is not None and not _valid_track(track):
        return v1_error(400, 50000020, "Invalid Zuora-Track-Id header")
    if request.path.startswith("/_sim/"):
        return await handler(request)
    if request.path == "/oauth/token":  # AUTH has limits of its own, and no concurrency limit (REFERENCE.md §2.1)
        return await _aqua_answer(request, handler, sim)
    window = request.app[WINDOW_KEY]
    now = sim.clock.now()
    if now - window.start >= 60:
        window.start, window.count = now, 0
    window.count += 1
    window.inflight += 1
    try:
        return await _aqua_answer(request, handler, sim)
    finally:
        window.inflight -= 1


_HTTP_CODES = {404: 50000040, 405: 50000045}


async def _aqua_answer(request: web.Request, handler: Handler, sim: Simulator) -> web.StreamResponse:
    """The answer to an AQuA route: aiohttp's own errors (an unknown route, a method a route does not take) in
    Zuora's v1 error shape, and a large JSON answer compressed."""
    try:
        resp = await _guarded(request, handler, sim)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = v1_error(exc.status, _HTTP_CODES.get(exc.status, 50000020), exc.reason)
    _compress_json(request, resp)
    return resp


def _compress_json(request: web.Request, resp: web.StreamResponse) -> None:
    """A JSON answer over 1,000 bytes is gzipped for a client that accepts it (DEV-COMP, REFERENCE.md §2.2)."""
    if (
        isinstance(resp, web.Response)
        and resp.content_type == "application/json"
        and isinstance(resp.body, bytes)
        and len(resp.body) > 1000
        and "gzip" in request.headers.get("Accept-Encoding", "").lower()
    ):
        resp.enable_compression(web.ContentCoding.gzip)


def _valid_track(track: str) -> bool:
    return len(track) <= 64 and track.isascii() and not _BAD_TRACK & set(track)


async def add_zuora_headers(request: web.Request, resp: web.StreamResponse) -> None:
    """``on_response_prepare``: Zuora's headers on every answer, streamed ones included (REFERENCE.md §2.3)."""
    resp.headers["Zuora-Request-Id"] = secrets.token_hex(16)
    track = request.headers.get("Zuora-Track-Id")
    if track is not None and _valid_track(track):
        resp.headers["Zuora-Track-Id"] = track
    if request.path.startswith("/_sim/"):
        return
    sim = request.app[SIMULATOR_KEY]
    window = request.app[WINDOW_KEY]
    limit = sim.config.rate_limit_per_minute or 50000
    resp.headers["RateLimit-Limit"] = f"{limit}, {limit};w=60"
    resp.headers["RateLimit-Remaining"] = str(max(0, limit - window.count))
    resp.headers["RateLimit-Reset"] = str(max(1, int(60 - (sim.clock.now() - window.start))))
    if resp.status != 401:
        resp.headers["Concurrency-Limit-Type"] = "Default"
        limit = sim.config.concurrent_request_limit
        resp.headers["Concurrency-Limit-Limit"] = str(limit)
        resp.headers["Concurrency-Limit-Remaining"] = str(max(0, limit - window.inflight))


def _too_many(retry_after: int, what: str = "request rate has") -> web.Response:
    body = {"code": "REQUEST_EXCEEDED_LIMIT", "message": f"Your {what} exceeded the limit; resubmit later."}
    return _json(body, 429, {"Retry-After": str(retry_after)})


async def _guarded(request: web.Request, handler: Handler, sim: Simulator) -> web.StreamResponse:
    faults = sim.faults
    is_token = request.path == "/oauth/token"
    scope = _scope(request.path)
    hit = ("token",) if is_token else ("all", scope)  # the token endpoint fails only when asked for by name
    if faults.rate_limit_next and faults.rate_limit_scope in hit:
        faults.rate_limit_next -= 1
        return _too_many(faults.retry_after_s)
    if faults.server_error_next and faults.server_error_scope in hit:
        faults.server_error_next -= 1
        return v1_error(faults.server_error_status, "SystemError", "internal server error")
    window = request.app[WINDOW_KEY]
    limit = sim.config.rate_limit_per_minute
    if not is_token and limit is not None and window.count > limit:
        return _too_many(max(1, int(60 - (sim.clock.now() - window.start))))
    if not is_token and window.inflight > sim.config.concurrent_request_limit:  # counted itself on the way in
        return _too_many(1, "total number of concurrent requests have")
    if not is_token and not _authorised(request, sim):
        resp = v1_error(401, 90000011, "Authentication error")
        resp.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
        return resp
    return await handler(request)


def _authorised(request: web.Request, sim: Simulator) -> bool:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return sim.check_token(auth[7:].strip())
    if auth[:6].lower() == "basic ":
        try:
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        except (ValueError, binascii.Error):
            return False
        return user == sim.config.client_id and password == sim.config.client_secret
    key_id, secret = request.headers.get("apiAccessKeyId"), request.headers.get("apiSecretAccessKey")
    return key_id == sim.config.client_id and secret == sim.config.client_secret


async def token(request: web.Request) -> web.StreamResponse:
    """``POST /oauth/token`` (client credentials, form-encoded)."""
    sim = request.app[SIMULATOR_KEY]
    form = await request.post()
    if form.get("grant_type") != "client_credentials":
        return _json(
            {"error": "unsupported_grant_type", "error_description": "grant_type must be client_credentials"}, 400
        )
    if form.get("client_id") != sim.config.client_id or form.get("client_secret") != sim.config.client_secret:
        return _json({"error": "invalid_client", "error_description": "Invalid client credentials"}, 401)
    value, expires_in = sim.issue_token()
    return _json(
        {
            "access_token": value,
            "token_type": "bearer",
            "expires_in": expires_in,
            "scope": "user.sim entity.00000000-0000-0000-0000-000000000000 tenant.12345",
            "jti": secrets.token_hex(16),
        }
    )


def _error_echo(body: dict[str, Any], code: str, message: str) -> dict[str, Any]:
    fmt = body.get("format", "csv")
    out: dict[str, Any] = {
        "errorCode": code,
        "message": message,
        "status": "error",
        "name": body.get("name"),
        "version": str(body.get("version", "1.0")),
        "format": fmt.upper() if isinstance(fmt, str) else fmt,
        "encrypted": body.get("encrypted", "none"),
        "useLastCompletedJobQueries": False,
    }
    queries = body.get("queries")
    if isinstance(queries, list):
        out["batches"] = [
            {
                "name": q.get("name"),
                "query": q.get("query"),
                "batchType": q.get("type", "zoqlexport"),
                "apiVersion": q.get("apiVersion", "145.0"),
                "status": "pending",
                "localizedStatus": "pending",
                "recordCount": 0,
                "full": True,
            }
            for q in queries
            if isinstance(q, dict)
        ]
    return out


async def submit(request: web.Request) -> web.StreamResponse:
    """``POST /v1/batch-query/``: validation errors are HTTP 200 with ``errorCode`` (REFERENCE.md §3.6)."""
    sim = request.app[SIMULATOR_KEY]
    key = request.headers.get("Idempotency-Key")
    if key is None:
        answer = await _submit(request, sim)
        return answer if isinstance(answer, web.Response) else _json(answer)
    if len(key) > 255:
        return v1_error(400, 50000020, "Idempotency-Key must be at most 255 characters")
    # DEV-IDEM (REFERENCE.md §2.2): a replay gets the stored answer (or, per DEV-ERRH, that answer as a 409); the
    # key on another URL or method 422; while the first request under it runs, 409.
    route = f"{request.method} {request.path.rstrip('/')}"
    stored = sim.remembered(key)
    if stored is not None:
        if stored[0] != route:
            return v1_error(422, 50000030, "Idempotency-Key was used with a different request (URL or method)")
        return _json(stored[1], 409 if sim.config.idempotency_replay == "http_409" else 200)
    if key in sim.idempotency_in_progress:
        return v1_error(409, 50000030, "A request with this Idempotency-Key is still in progress")
    sim.idempotency_in_progress.add(key)
    try:
        answer = await _submit(request, sim)
        if isinstance(answer, web.Response):
            return answer
        sim.remember(key, route, answer)
        return _json(answer)
    finally:
        sim.idempotency_in_progress.discard(key)


async def _submit(request: web.Request, sim: Simulator) -> dict[str, Any] | web.Response:
    """The submit's answer (a job, or a refusal echoing the request, both HTTP 200 and kept under the
    Idempotency-Key), or an error response that is not kept."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return v1_error(400, 50000090, "Malformed JSON")
    if not isinstance(body, dict):
        return v1_error(400, 50000090, "Malformed JSON")
    try:
        job = sim.submit(body)
        answer = job.to_json(submit=True)
    except SubmitError as exc:
        if exc.code == "90028" and sim.config.job_limit_response == "http_429":
            return _too_many(sim.faults.retry_after_s)
        answer = _error_echo(body, exc.code, exc.message)
    return answer


def _job_or_error(request: web.Request) -> tuple[Any, web.Response | None]:
    sim = request.app[SIMULATOR_KEY]
    job_id = request.match_info["job_id"]
    if not is_aqua_id(job_id):
        return None, v1_error(400, 50000020, f"90002: invalid job id {job_id[:64]!r}")
    job = sim.jobs.get(job_id)
    if job is None:
        return None, v1_error(404, 50000040, f"90002: invalid job id {job_id}")
    return job, None


async def get_job(request: web.Request) -> web.StreamResponse:
    """``GET /v1/batch-query/jobs/{id}``."""
    job, error = _job_or_error(request)
    return error or _json(job.to_json())


async def cancel_job(request: web.Request) -> web.StreamResponse:
    """``DELETE /v1/batch-query/jobs/{id}``: only while not finished, else 400 + errorCode 90003."""
    job, error = _job_or_error(request)
    if error:
        return error
    if not request.app[SIMULATOR_KEY].cancel(job):
        body = {"errorCode": "90003", "message": "Invalid Job Id for job cancellation", "status": "error", "id": job.id}
        return _json(body, 400)
    return _json(job.to_json())


async def last_job(request: web.Request) -> web.StreamResponse:
    """``GET /v1/batch-query/jobs/partner/{partner}/project/{project}``."""
    sim = request.app[SIMULATOR_KEY]
    job = sim.last_completed(request.match_info["partner"], request.match_info["project"])
    if job is None:
        return v1_error(404, 50000040, "No completed job for this partner and project")
    return _json(job.to_json())


def _file_or_error(request: web.Request) -> tuple[FileSpec | None, web.Response | None]:
    sim = request.app[SIMULATOR_KEY]
    file_id = request.match_info["file_id"]
    if not is_aqua_id(file_id):
        return None, v1_error(400, 50000020, "Invalid file id")
    spec = sim.file(file_id)
    if spec is None:
        return None, v1_error(404, 50000040, "File not found")
    return spec, None


async def file_status(request: web.Request) -> web.StreamResponse:
    """``GET /v1/files/{id}/status``."""
    _, error = _file_or_error(request)
    return error or _json({"success": True, "accessible": True, "status": "AVAILABLE"})


async def download(request: web.Request) -> web.StreamResponse:
    """``GET /v1/files/{id}`` and its legacy paths: the file streamed, with the file faults applied."""
    sim = request.app[SIMULATOR_KEY]
    spec, error = _file_or_error(request)
    if error:
        return error
    assert spec is not None
    faults = sim.faults
    if faults.fail_file_next:
        faults.fail_file_next -= 1
        return v1_error(500, "SystemError", "internal server error")
    over = faults.files_over_limit
    size = await sim.file_size(spec)
    if over is True or (isinstance(over, list) and spec.file_id in over) or size > sim.config.max_file_bytes:
        return web.Response(status=403, text=OVER_LIMIT_BODY, content_type="text/plain")
    transport_gzip = (
        spec.fmt in ("csv", "tsv") and "gzip" in request.headers.get("Accept-Encoding", "").lower() and size > 1000
    )
    resp = web.StreamResponse(status=200)
    resp.content_type = spec.content_type.split(";")[0]
    resp.headers["Content-Type"] = spec.content_type
    ext = {"gzip": "csv.gz", "zip": "zip", "tsv": "tsv"}.get(spec.fmt, "csv")
    resp.headers["Content-Disposition"] = f'attachment; filename="{spec.file_id}.{ext}"'
    cut = faults.cut_file_after_bytes
    if cut is not None and faults.cut_file_next is not None:
        faults.cut_file_next -= 1
        if faults.cut_file_next <= 0:
            faults.cut_file_after_bytes, faults.cut_file_next = None, None
    if transport_gzip:
        resp.headers["Content-Encoding"] = "gzip"
        resp.enable_chunked_encoding()
    else:
        resp.content_length = size + (1024 if faults.wrong_content_length else 0)
        if faults.wrong_content_length:
            resp.force_close()
    await resp.prepare(request)
    chunks: Iterator[bytes] = sim.file_chunks(spec)
    if transport_gzip:
        chunks = gzip_stream(chunks, sim.config.compress_level)
    try:
        await _send_chunks(request, resp, chunks, sim, cut=cut, threaded=transport_gzip or spec.fmt in ("gzip", "zip"))
    except ConnectionResetError:  # the client went away mid-download, as clients do
        log.info("download of file %s ended by the client", spec.file_id)
    return resp


async def _send_chunks(
    request: web.Request,
    resp: web.StreamResponse,
    chunks: Iterator[bytes],
    sim: Simulator,
    *,
    cut: int | None,
    threaded: bool,
) -> None:
    """Write a file's body, with the trickle, cut and wrong-length faults; ``threaded``: make chunks in a thread
    (compression releases the GIL: keep it off the loop)."""
    faults = sim.faults
    sent = 0
    trickle = faults.trickle_bytes_per_s
    while True:
        chunk = await asyncio.to_thread(next, chunks, None) if threaded else next(chunks, None)
        if chunk is None:
            break
        if cut is not None and sent + len(chunk) >= cut:
            await resp.write(chunk[: cut - sent])
            _drop(request)
            return
        if trickle:
            step = max(1, trickle // 10)
            for i in range(0, len(chunk), step):
                await resp.write(chunk[i : i + step])
                await asyncio.sleep(0.1)
        else:
            await resp.write(chunk)
        sent += len(chunk)
    if faults.wrong_content_length:
        await resp.write_eof()
        _drop(request)
        return
    await resp.write_eof()


def _drop(request: web.Request) -> None:
    """Close the connection mid-body (after flushing what was written)."""
    if request.transport is not None:
        request.transport.close()


def add_routes(app: web.Application) -> None:
    """Attach every AQuA route to ``app``."""
    r = app.router
    r.add_post("/oauth/token", token)
    for base in ("/v1/batch-query", "/apps/api/batch-query"):
        r.add_post(base + "/", submit)
        r.add_post(base, submit)
        r.add_get(base + "/jobs/{job_id}", get_job)
        r.add_delete(base + "/jobs/{job_id}", cancel_job)
        r.add_get(base + "/jobs/partner/{partner}/project/{project}", last_job)
    r.add_get("/v1/files/{file_id}/status", file_status)
    for prefix in FILE_PREFIXES:
        r.add_get(prefix + "{file_id}", download)
