"""The admin HTTP API under ``/admin/``: bearer-token protected, separate from the public callback route.
It exposes the operator's actions (submit, status, list, replay, cancel) and serves its OpenAPI document."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from pipeline import ops
from pipeline.aqua.models import is_aqua_id
from pipeline.callbacks import error_response, expect_handler, json_response, read_body
from pipeline.errors import AquaNotFound, AquaValidationError, JobBusy, JobNotInLedger, PipelineError
from pipeline.jobdefs import JobDefinitionError, parse_job_definitions
from pipeline.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _job_id(request: web.Request) -> str:
    job_id = request.match_info["job_id"].lower()
    if not is_aqua_id(job_id):
        raise web.HTTPBadRequest(reason="job id must be 32 hex characters")
    return job_id


_ERRORS = (AquaNotFound, AquaValidationError, JobDefinitionError, ValidationError, ValueError, PipelineError)
"""What an admin route answers with an error body of its own (see :func:`error_of`)."""


def error_of(exc: BaseException) -> tuple[int, str, str]:
    """Status, code and message of the admin API's answer to one of :data:`_ERRORS`."""
    if isinstance(exc, AquaNotFound | JobNotInLedger):
        return 404, "not_found", str(exc)
    if isinstance(exc, JobBusy):
        return 409, "job_busy", str(exc)
    if isinstance(exc, AquaValidationError):
        return 422, f"aqua_{exc.error_code or 'error'}", str(exc)
    if isinstance(exc, JobDefinitionError | ValidationError | ValueError):
        return 422, "invalid_request", str(exc)
    if isinstance(exc, PipelineError):
        return 503 if exc.retryable else 400, exc.reason, str(exc)
    raise TypeError(f"not an admin API error: {exc!r}")


def add_admin_routes(app: web.Application, settings: Settings) -> None:
    """Mount the admin API on ``app``."""
    from pipeline.app import COMPONENTS_KEY

    token = settings.security.admin_token

    def guarded(handler: Handler) -> Handler:
        async def wrapper(request: web.Request) -> web.StreamResponse:
            if token is None:
                return error_response(403, "admin_disabled", "set AQUA_PIPELINE_SECURITY__ADMIN_TOKEN to enable")
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {token.get_secret_value()}"
            # surrogateescape: aiohttp decodes header bytes that are not UTF-8 as lone surrogates
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode()):
                return error_response(
                    401, "unauthorized", "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
                )
            try:
                return await handler(request)
            except _ERRORS as exc:
                return error_response(*error_of(exc))

        return wrapper

    async def submit(request: web.Request) -> web.Response:
        body = await read_body(request, settings.http.body_timeout_s)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return error_response(400, "malformed_body", "body is not valid JSON")
        definitions = parse_job_definitions(data, source="request body")
        c = request.app[COMPONENTS_KEY]
        out: list[dict[str, Any]] = []
        try:
            async for s in ops.submit_each(c, definitions):
                out.append({"job_id": s.job.id, "name": s.job.name, "status": s.job.status})
        except ops.PartlySubmitted as partly:
            # some jobs exist already: say which, so that a retry sends only the rest
            status, code, message = error_of(partly.cause)
            answer = {"error": code, "message": message, "jobs": out, "not_submitted": partly.not_submitted}
            return json_response(status, answer)
        return json_response(201, {"jobs": out})

    async def list_jobs(request: web.Request) -> web.Response:
        try:
            limit = max(1, min(int(request.query.get("limit", "50")), 500))
        except ValueError:
            return error_response(400, "invalid_limit", "limit must be an integer")
        items = await ops.recent(request.app[COMPONENTS_KEY], limit)
        return json_response(200, {"jobs": [ops.ledger_dict(i) for i in items]})

    async def get_job(request: web.Request) -> web.Response:
        view = await ops.status(request.app[COMPONENTS_KEY], _job_id(request))
        return json_response(200, view.as_dict())

    async def replay(request: web.Request) -> web.Response:
        item = await ops.replay(request.app[COMPONENTS_KEY], _job_id(request))
        return json_response(202, {"job_id": item.job_id, "state": str(item.state)})

    async def cancel(request: web.Request) -> web.Response:
        job = await ops.cancel(request.app[COMPONENTS_KEY], _job_id(request))
        return json_response(200, {"job_id": job.id, "status": job.status})

    async def openapi(request: web.Request) -> web.Response:
        return json_response(200, openapi_document(settings))

    app.router.add_post("/admin/jobs", guarded(submit), expect_handler=expect_handler)
    app.router.add_get("/admin/jobs", guarded(list_jobs), expect_handler=expect_handler)
    app.router.add_get("/admin/jobs/{job_id}", guarded(get_job), expect_handler=expect_handler)
    app.router.add_post("/admin/jobs/{job_id}/replay", guarded(replay), expect_handler=expect_handler)
    app.router.add_delete("/admin/jobs/{job_id}", guarded(cancel), expect_handler=expect_handler)
    app.router.add_get("/admin/openapi.json", openapi, expect_handler=expect_handler)


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The admin API's OpenAPI 3.0 document (also describes the public callback route)."""
    err = {"$ref": "#/components/schemas/Error"}
    job_id = {
        "name": "job_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{32}$"},
    }

    def responses(ok: str, *codes: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            ok: {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
        }
        for code in codes:
            out[str(code)] = {"description": "error", "content": {"application/json": {"schema": err}}}
        return out

    return {
        "openapi": "3.0.3",
        "info": {"title": "aqua-pipeline admin API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {
                        "error": {"type": "string"},
                        "message": {"type": "string"},
                        "jobs": {
                            "type": "array",
                            "description": "POST /admin/jobs: the jobs submitted before the one that failed",
                            "items": {"type": "object"},
                        },
                        "not_submitted": {
                            "type": "array",
                            "description": "POST /admin/jobs: the names of that job and of those after it",
                            "items": {"type": "string"},
                        },
                    },
                },
                "JobDefinition": {
                    "type": "object",
                    "description": "An AQuA submit body (without notifyUrl) plus optional entityIds/idempotencyKey",
                    "required": ["queries"],
                    "properties": {
                        "name": {"type": "string", "maxLength": 32},
                        "version": {"type": "string", "enum": ["1.0", "1.1", "1.2"]},
                        "format": {"type": "string", "enum": ["csv", "zip", "gzip"]},
                        "partner": {"type": "string"},
                        "project": {"type": "string"},
                        "queries": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 50,
                            "items": {
                                "type": "object",
                                "required": ["name", "query"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "query": {"type": "string"},
                                    "type": {"type": "string", "enum": ["zoql", "zoqlexport"]},
                                },
                            },
                        },
                    },
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/admin/jobs": {
                "get": {
                    "summary": "Recent jobs",
                    "parameters": [
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}}
                    ],
                    "responses": responses("200", 400, 401),
                },
                "post": {
                    "summary": "Submit AQuA jobs",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobDefinition"}}},
                    },
                    "responses": responses("201", 400, 401, 422, 503),
                },
            },
            "/admin/jobs/{job_id}": {
                "get": {"summary": "Job status", "parameters": [job_id], "responses": responses("200", 400, 401, 404)},
                "delete": {
                    "summary": "Cancel a job",
                    "parameters": [job_id],
                    "responses": responses("200", 400, 401, 404, 422),
                },
            },
            "/admin/openapi.json": {
                "get": {"summary": "This document", "security": [], "responses": responses("200")},
            },
            "/admin/jobs/{job_id}/replay": {
                "post": {
                    "summary": "Replay transfer + event",
                    "parameters": [job_id],
                    "responses": responses("202", 400, 401, 404, 409, 503),
                }
            },
        },
    }
