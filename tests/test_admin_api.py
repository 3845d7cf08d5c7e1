"""The admin API over real HTTP: schemathesis drives its own OpenAPI document (``/admin/openapi.json``) against the
live loopback service with and without the bearer token (no server errors, ever), and the operator's actions
(submit, list, status, replay, cancel) are checked on the data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from pipeline import ops
from pipeline.admin import openapi_document
from pipeline.errors import AquaValidationError
from pipeline.ledger import JobState
from pipeline.settings import Settings
from pipeline.testing.moto import MotoServer
from pipeline.testing.stack import running_stack
from tests.reliability.test_hostile import ADMIN_TOKEN, BackgroundStack, with_admin

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JOB = {
    "name": "admin",
    "format": "csv",
    "version": "1.1",
    "queries": [{"name": "Account", "type": "zoqlexport", "query": "select Id, Name from Account"}],
}


@pytest.fixture(scope="module")
def admin_service(moto_server: MotoServer) -> Iterator[BackgroundStack]:
    with BackgroundStack(moto_server.url, tweak=with_admin, run_worker=False) as bg:
        yield bg


# The document the service serves (a test below checks the live route returns exactly this). Loaded at import
# time because schemathesis' lazy ``from_fixture`` mode does not work with pytest 9 (it sets ``Function._nodeid``).
schema = schemathesis.openapi.from_dict(openapi_document(Settings()))
_bounded = settings(
    max_examples=15, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


def header(response: Any, name: str) -> str:
    """A response header, case-insensitively (schemathesis keeps a list of values per lower-cased name)."""
    for key, value in response.headers.items():
        if key.lower() == name.lower():
            return str(value[0] if isinstance(value, list) else value)
    raise AssertionError(f"no {name} header in {dict(response.headers)}")


@schema.parametrize()
@_bounded
def test_admin_api_never_answers_5xx(case: Any, admin_service: BackgroundStack) -> None:
    response = case.call(base_url=admin_service.url, headers=AUTH, timeout=20)
    case.validate_response(response, checks=[not_a_server_error])
    assert header(response, "Content-Type").startswith("application/json")


@schema.parametrize()
@_bounded
def test_admin_api_refuses_every_call_without_the_token(case: Any, admin_service: BackgroundStack) -> None:
    if case.path == "/admin/openapi.json":
        return  # public on purpose
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_TOKEN}"}):
        response = case.call(base_url=admin_service.url, headers=headers, timeout=20)
        if response.status_code == 405:  # schemathesis also tries methods the route does not have
            continue
        assert response.status_code == 401, (case.path, response.status_code, response.text[:200])
        assert response.json()["error"] == "unauthorized"
        assert header(response, "WWW-Authenticate") == "Bearer"


async def test_admin_disabled_without_a_token(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, run_worker=False) as stack, aiohttp.ClientSession() as http:
        async with http.get(stack.service_url + "/admin/jobs", headers=AUTH) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"] == "admin_disabled"
        async with http.get(stack.service_url + "/admin/openapi.json") as resp:
            assert resp.status == 200
            assert await resp.json() == schema.raw_schema  # the document the fuzz tests below are generated from


async def test_operator_actions_on_the_data(moto_server: MotoServer) -> None:
    def tweak(s: Settings) -> Settings:
        s = with_admin(s)
        return s.model_copy(update={"queue": s.queue.model_copy(update={"visibility_timeout_s": 5})})

    async with running_stack(moto_server.url, tweak=tweak) as stack, aiohttp.ClientSession(headers=AUTH) as http:
        base = stack.service_url + "/admin"
        async with http.post(base + "/jobs", json=JOB) as resp:
            assert resp.status == 201, await resp.text()
            (created,) = (await resp.json())["jobs"]
        job_id = created["job_id"]
        item = await stack.wait_final(job_id, timeout_s=30)
        assert item.state == JobState.published
        async with http.get(f"{base}/jobs/{job_id}") as resp:
            assert resp.status == 200
            text = await resp.text()
            assert str(JobState.published) in text
            shown_url = json.loads(text)["aqua"]["notifyUrl"]
        # AQuA's view carries the notifyUrl, whose live callback token is shown to nobody
        notify_url = (await stack.components.aqua.get_job(job_id)).notify_url or ""
        token = parse_qs(urlsplit(notify_url).query)["token"][0]
        assert token not in text and "token=***" in shown_url
        async with http.get(base + "/jobs", params={"limit": "5"}) as resp:
            assert job_id in [j["job_id"] for j in (await resp.json())["jobs"]]
        assert len(await stack.drain_events()) == 1
        async with http.post(f"{base}/jobs/{job_id}/replay") as resp:
            assert resp.status == 202, await resp.text()
        replayed = await stack.wait_final(job_id, timeout_s=30)
        assert replayed.state == JobState.published and replayed.manifest_key == item.manifest_key
        events = await stack.drain_events()
        assert [e["data"]["job_id"] for e in events] == [job_id]  # a replay publishes once more, on purpose
        for method, path, status in [
            ("GET", "/jobs/not-an-id", 400),
            ("GET", "/jobs?limit=abc", 400),
            ("GET", "/jobs/" + "a" * 32, 404),
            ("POST", "/jobs/" + "a" * 32 + "/replay", 404),  # not one of ours
            ("DELETE", f"/jobs/{job_id}", 422),  # a finished job cannot be cancelled
        ]:
            async with http.request(method, base + path) as resp:
                body = await resp.json()
                assert (resp.status, bool(body["error"])) == (status, True), (method, path, resp.status, body)
        async with http.post(base + "/jobs", data=b"{broken") as resp:
            assert resp.status == 400
        async with http.post(base + "/jobs", json={"queries": []}) as resp:
            assert resp.status == 422


async def test_a_batch_submit_that_fails_part_way_says_which_jobs_exist(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three definitions, AQuA refuses the second: the answer names the job already made and the two not
    submitted, so the caller's retry does not submit the first again."""
    real_submit = ops.submit
    calls = 0

    async def second_refused(c: Any, d: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise AquaValidationError("The number of concurrent jobs exceeds the limit", error_code="90028")
        return await real_submit(c, d)

    monkeypatch.setattr(ops, "submit", second_refused)
    jobs = [{**JOB, "name": name} for name in ("first", "second", "third")]
    async with running_stack(moto_server.url, tweak=with_admin, run_worker=False) as stack:
        async with aiohttp.ClientSession(headers=AUTH) as http:
            async with http.post(stack.service_url + "/admin/jobs", json=jobs) as resp:
                body = await resp.json()
                assert resp.status == 422, body
        assert body["error"] == "aqua_90028"
        assert [j["name"] for j in body["jobs"]] == ["first"] and body["jobs"][0]["job_id"]
        assert body["not_submitted"] == ["second", "third"]
        assert calls == 2
