"""The ``/_sim`` control routes: drive faults, config and the clock, and inspect jobs, files and callbacks."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from pipeline.aqua.simulator.config import Faults, SimulatorConfig
from pipeline.aqua.simulator.keys import SIMULATOR_KEY


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text="malformed JSON") from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON object")
    return body


async def get_faults(request: web.Request) -> web.StreamResponse:
    """``GET /_sim/faults``."""
    return _json(request.app[SIMULATOR_KEY].faults.model_dump(mode="json"))


async def put_faults(request: web.Request) -> web.StreamResponse:
    """``PUT /_sim/faults`` replaces every fault; ``PATCH`` changes only the given ones."""
    sim = request.app[SIMULATOR_KEY]
    body = await _body(request)
    base = {} if request.method == "PUT" else sim.faults.model_dump()
    try:
        sim.faults = Faults.model_validate({**base, **body})
    except ValidationError as exc:
        return _json({"error": exc.errors(include_url=False, include_context=False)}, 400)
    return _json(sim.faults.model_dump(mode="json"))


async def patch_config(request: web.Request) -> web.StreamResponse:
    """``PATCH /_sim/config``: change config fields (e.g. ``rows``, ``step_delay_s``); faults stay as they are."""
    sim = request.app[SIMULATOR_KEY]
    body = await _body(request)
    body.pop("faults", None)
    merged = {**sim.config.model_dump(exclude={"faults"}), **body}
    if "rows" in body and isinstance(body["rows"], dict):
        merged["rows"] = {**sim.config.rows, **body["rows"]}
    try:
        new = SimulatorConfig.model_validate({**merged, "faults": sim.faults.model_dump()})
    except ValidationError as exc:
        return _json({"error": exc.errors(include_url=False, include_context=False)}, 400)
    for name in SimulatorConfig.model_fields:
        if name != "faults":
            setattr(sim.config, name, getattr(new, name))
    return _json(sim.config.model_dump(mode="json", exclude={"faults"}))


async def file_digest_route(request: web.Request) -> web.StreamResponse:
    """``GET /_sim/files/{file_id}/digest`` -> ``{"size", "sha256", "records"}`` of the stored bytes."""
    sim = request.app[SIMULATOR_KEY]
    spec = sim.files.get(request.match_info["file_id"])
    if spec is None:
        return _json({"error": "unknown file"}, 404)
    size, sha, records = await sim.digest(spec)
    return _json({"size": size, "sha256": sha, "records": records})


async def advance_clock(request: web.Request) -> web.StreamResponse:
    """``POST /_sim/clock`` ``{"advance_s": N}``."""
    sim = request.app[SIMULATOR_KEY]
    body = await _body(request)
    try:
        now = sim.clock.advance(float(body.get("advance_s", 0)))
    except (TypeError, ValueError) as exc:
        return _json({"error": str(exc)}, 400)
    return _json({"now": now})


async def list_jobs(request: web.Request) -> web.StreamResponse:
    """``GET /_sim/jobs``: every job, newest last."""
    return _json([j.to_json() for j in request.app[SIMULATOR_KEY].jobs.values()])


async def list_callbacks(request: web.Request) -> web.StreamResponse:
    """``GET /_sim/callbacks``: every callback attempt made."""
    return _json(request.app[SIMULATOR_KEY].callback_log)


def add_control_routes(app: web.Application) -> None:
    """Attach the ``/_sim`` routes."""
    r = app.router
    r.add_get("/_sim/faults", get_faults)
    r.add_put("/_sim/faults", put_faults)
    r.add_patch("/_sim/faults", put_faults)
    r.add_patch("/_sim/config", patch_config)
    r.add_get("/_sim/files/{file_id}/digest", file_digest_route)
    r.add_post("/_sim/clock", advance_clock)
    r.add_get("/_sim/jobs", list_jobs)
    r.add_get("/_sim/callbacks", list_callbacks)
