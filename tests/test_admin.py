"""The admin API's behaviour over real HTTP: bearer-token protection, submit/list/status/replay/cancel,
validation errors, and an OpenAPI document that matches the routes the app really has."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
from pydantic import SecretStr

from pipeline.aqua.simulator import SimulatorConfig
from pipeline.ledger import JobState
from pipeline.settings import Settings
from pipeline.testing.moto import MotoServer
from pipeline.testing.stack import running_stack

TOKEN = "admin-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEFINITION: dict[str, Any] = {
    "name": "admin-submitted",
    "format": "csv",
    "version": "1.1",
    "queries": [{"name": "Account", "type": "zoqlexport", "query": "select Id, Name from Account"}],
}


def with_admin(s: Settings) -> Settings:
    return s.model_copy(update={"security": s.security.model_copy(update={"admin_token": SecretStr(TOKEN)})})


async def test_bearer_token_is_required(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, tweak=with_admin, run_worker=False) as stack:
        base = stack.service_url + "/admin"
        async with aiohttp.ClientSession() as http:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": TOKEN},
                {"Authorization": "Basic x"},
            ):
                for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/" + "a" * 32)):
                    async with http.request(method, base + path, headers=headers, json=DEFINITION) as resp:
                        assert resp.status == 401, (headers, method, path)
                        assert resp.headers["WWW-Authenticate"] == "Bearer"
                        assert (await resp.json())["error"] == "unauthorized"
            async with http.get(base + "/jobs", headers=AUTH) as resp:
                assert resp.status == 200
        assert await stack.components.queue.depth() == 0


async def test_admin_disabled_without_a_token(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, run_worker=False) as stack, aiohttp.ClientSession() as http:
        async with http.get(stack.service_url + "/admin/jobs", headers=AUTH) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"] == "admin_disabled"


async def test_submit_list_status_replay(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, tweak=with_admin) as stack, aiohttp.ClientSession() as http:
        base = stack.service_url + "/admin"
        async with http.post(base + "/jobs", json=DEFINITION, headers=AUTH) as resp:
            body = await resp.json()
            assert resp.status == 201, body
        (job,) = body["jobs"]
        job_id = job["job_id"]
        assert re.fullmatch(r"[0-9a-f]{32}", job_id) and job["name"] == "admin-submitted"
        item = await stack.wait_final(job_id)
        assert item.state == JobState.published

        async with http.get(base + "/jobs", headers=AUTH) as resp:
            listed = (await resp.json())["jobs"]
        assert [(j["job_id"], j["state"]) for j in listed] == [(job_id, "published")]
        assert listed[0]["total_bytes"] == item.total_bytes
        async with http.get(base + "/jobs?limit=abc", headers=AUTH) as resp:
            assert resp.status == 400

        async with http.get(base + f"/jobs/{job_id.upper()}", headers=AUTH) as resp:
            view = await resp.json()
        assert view["ledger"]["state"] == "published" and view["aqua"]["status"] == "completed"
        async with http.get(base + "/jobs/not-an-id", headers=AUTH) as resp:
            assert resp.status == 400
        async with http.get(base + "/jobs/" + "c" * 32, headers=AUTH) as resp:
            assert resp.status == 404

        first = await stack.drain_events(wait_s=0)
        async with http.post(base + f"/jobs/{job_id}/replay", headers=AUTH) as resp:
            assert resp.status == 202
            assert await resp.json() == {"job_id": job_id, "state": "notified"}
        for _ in range(300):
            again = await stack.components.ledger.get(job_id)
            if again is not None and again.state == JobState.published and again.attempts >= 2:
                break
            await _sleep()
        else:
            raise AssertionError("replay did not land")
        assert again.manifest_key == item.manifest_key
        second = await stack.drain_events()
        assert [e["id"] for e in second] == [e["id"] for e in first]


async def _sleep() -> None:
    import asyncio

    await asyncio.sleep(0.1)


async def test_cancel_and_invalid_definitions(moto_server: MotoServer) -> None:
    cfg = SimulatorConfig(step_delay_s=1.0)
    async with running_stack(moto_server.url, sim_config=cfg, tweak=with_admin) as stack:
        base = stack.service_url + "/admin"
        async with aiohttp.ClientSession() as http:
            for bad in (
                {**DEFINITION, "notifyUrl": "https://example.com/cb"},
                {**DEFINITION, "name": "n" * 33},
                {**DEFINITION, "queries": []},
                {**DEFINITION, "format": "xml"},
            ):
                async with http.post(base + "/jobs", json=bad, headers=AUTH) as resp:
                    body = await resp.json()
                    assert resp.status == 422, (bad, body)
                    assert body["error"] == "invalid_request" and body["message"]
            async with http.post(base + "/jobs", data=b"{nope", headers=AUTH) as resp:
                assert resp.status == 400
            assert await stack.components.ledger.list_recent(10) == []

            async with http.post(base + "/jobs", json=DEFINITION, headers=AUTH) as resp:
                job_id = (await resp.json())["jobs"][0]["job_id"]
            async with http.delete(base + f"/jobs/{job_id}", headers=AUTH) as resp:
                assert resp.status == 200
                assert await resp.json() == {"job_id": job_id, "status": "cancelled"}
        item = await stack.wait_final(job_id)
        assert (item.state, item.error_reason) == (JobState.failed, "job_cancelled")


def _template(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


async def test_openapi_lists_every_admin_route(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, tweak=with_admin, run_worker=False) as stack:
        async with aiohttp.ClientSession() as http:
            async with http.get(stack.service_url + "/admin/openapi.json") as resp:  # public: no token needed
                assert resp.status == 200
                doc = await resp.json()
        assert doc["openapi"].startswith("3.")
        assert doc["info"]["title"] and doc["info"]["version"]
        assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
        documented = set()
        for path, ops in doc["paths"].items():
            assert path.startswith("/")
            for method, op in ops.items():
                documented.add((method.upper(), _template(path)))
                assert op["responses"], (method, path)
                for p in op.get("parameters", []):
                    assert p["in"] in ("path", "query", "header") and "schema" in p
                    if p["in"] == "path":
                        assert "{" + p["name"] + "}" in path
                for r in op["responses"].values():
                    for media in r.get("content", {}).values():
                        _resolve_refs(doc, media["schema"])
        assert stack.app is not None
        routed = {
            (r.method, _template(r.resource.canonical))
            for r in stack.app.router.routes()
            if r.resource is not None and r.resource.canonical.startswith("/admin/") and r.method != "HEAD"
        }
        assert routed == documented


def _resolve_refs(doc: dict[str, Any], node: Any) -> None:
    """Every ``$ref`` in ``node`` points at something in ``doc``."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref is not None:
            target: Any = doc
            for part in ref.removeprefix("#/").split("/"):
                target = target[part]
        for v in node.values():
            _resolve_refs(doc, v)
    elif isinstance(node, list):
        for v in node:
            _resolve_refs(doc, v)
