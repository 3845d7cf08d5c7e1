"""The AQuA simulator over real HTTP: auth, submit, jobs, files (core behaviour)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import hashlib
import io
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pipeline.aqua.simulator import SIMULATOR_KEY, Simulator, SimulatorConfig, create_simulator_app, file_digest

ServerFactory = Callable[..., Awaitable[TestServer]]

ACCOUNT_QUERY = {"name": "Account", "type": "zoqlexport", "query": "select Id, Name, Balance, UpdatedDate from Account"}


async def json_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """A JSON answer's object; the session does not decompress (file tests want wire bytes), and JSON answers
    over 1,000 bytes come gzipped (DEV-COMP)."""
    raw = await resp.read()
    result: dict[str, Any] = orjson.loads(
        gzip.decompress(raw) if resp.headers.get("Content-Encoding") == "gzip" else raw
    )
    return result


class Sim:
    """A running simulator and an authenticated client session."""

    def __init__(self, server: TestServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.token = ""

    @property
    def sim(self) -> Simulator:
        app: web.Application = self.server.app  # type: ignore[assignment]
        return app[SIMULATOR_KEY]

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def login(self) -> str:
        async with self.http.post(
            self.url("/oauth/token"),
            data={"client_id": "sim-client", "client_secret": "sim-secret", "grant_type": "client_credentials"},
        ) as resp:
            assert resp.status == 200
            self.token = (await resp.json())["access_token"]
        return self.token

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def submit(self, body: dict[str, Any], **headers: str) -> dict[str, Any]:
        async with self.http.post(self.url("/v1/batch-query/"), json=body, headers={**self.auth, **headers}) as resp:
            assert resp.status == 200, await resp.text()
            return await json_of(resp)

    async def job(self, job_id: str) -> dict[str, Any]:
        async with self.http.get(self.url(f"/v1/batch-query/jobs/{job_id}"), headers=self.auth) as resp:
            assert resp.status == 200
            return await json_of(resp)

    async def finished(self, job_id: str) -> dict[str, Any]:
        await self.sim.wait_job(job_id)
        return await self.job(job_id)

    async def download(self, file_id: str, **headers: str) -> tuple[aiohttp.ClientResponse, bytes]:
        hdrs = {"Accept-Encoding": "identity", **self.auth, **headers}
        async with self.http.get(self.url(f"/v1/files/{file_id}"), headers=hdrs) as resp:
            return resp, await resp.read()


@pytest.fixture
async def make_sim(aiohttp_server: ServerFactory) -> AsyncIterator[Callable[..., Awaitable[Sim]]]:
    sessions: list[aiohttp.ClientSession] = []

    async def factory(config: SimulatorConfig | None = None, *, login: bool = True) -> Sim:
        cfg = config or SimulatorConfig(step_delay_s=0)
        server = await aiohttp_server(create_simulator_app(cfg))
        http = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=20))
        sessions.append(http)
        s = Sim(server, http)
        if login:
            await s.login()
        return s

    yield factory
    for http in sessions:
        await http.close()


def rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode(), newline="")))


async def test_token_submit_poll_download_csv(make_sim: Callable[..., Awaitable[Sim]]) -> None:
    s = await make_sim(SimulatorConfig(step_delay_s=0, rows={"Account": 2500}))
    submitted = await s.submit({"format": "csv", "version": "1.1", "name": "t", "useQueryLabels": True,
                                "queries": [ACCOUNT_QUERY]})  # fmt: skip
    assert submitted["status"] == "submitted"
    assert submitted["batches"][0]["status"] == "pending"
    job = await s.finished(submitted["id"])
    assert job["status"] == "completed"
    batch = job["batches"][0]
    assert batch["recordCount"] == 2500 and batch["full"] is True
    resp, body = await s.download(batch["fileId"])
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/csv;charset=UTF-8"
    assert int(resp.headers["Content-Length"]) == len(body)
    table = rows(body)
    assert table[0] == ["Account.Id", "Account.Name", "Account.Balance", "Account.UpdatedDate"]
    assert len(table) == 2501
    assert len({r[0] for r in table[1:]}) == 2500
    size, sha, records = await file_digest(s.sim, batch["fileId"])
    assert (size, sha, records) == (len(body), hashlib.sha256(body).hexdigest(), 2500)
    _, again = await s.download(batch["fileId"])
    assert again == body


def sim_cfg(**kw: Any) -> SimulatorConfig:
    return SimulatorConfig(step_delay_s=0, **kw)


async def test_token_response_shape_and_bad_credentials(make_sim: Callable[..., Awaitable[Sim]]) -> None:
    s = await make_sim(login=False)
    url = s.url("/oauth/token")
    form = {"client_id": "sim-client", "client_secret": "sim-secret", "grant_type": "client_credentials"}
    async with s.http.post(url, data=form) as resp:
        body = await resp.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope", "jti"}
    assert body["token_type"] == "bearer" and body["expires_in"] == 3599
    async with s.http.post(url, data={**form, "client_secret": "nope"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_client"
    async with s.http.post(url, data={**form, "grant_type": "password"}) as resp:
        assert resp.status == 400


@pytest.mark.parametrize("header", [None, "Bearer not-a-token", "Basic c2ltLWNsaWVudDp3cm9uZw=="])
async def test_missing_or_invalid_token_is_401(make_sim: Callable[..., Awaitable[Sim]], header: str | None) -> None:
    s = await make_sim()
    headers = {"Authorization": header} if header else {}
    async with s.http.get(s.url("/v1/batch-query/jobs/" + "a" * 32), headers=headers) as resp:
        assert resp.status == 401
        assert (
            resp.headers["WWW-Authenticate"]
            == "Basic realm=Zuora API, ZSession realm=Zuora API, Bearer realm=Zuora API"
        )
        body = await resp.json()
    assert body["success"] is False and body["reasons"][0]["code"] == 90000011


async def test_token_expires_on_simulated_clock(make_sim: Callable[..., Awaitable[Sim]]) -> None:
    s = await make_sim()
    assert (await s.submit({"queries": [ACCOUNT_QUERY]}))["status"] == "submitted"
    async with s.http.post(s.url("/_sim/clock"), json={"advance_s": 3600}) as resp:
        assert resp.status == 200
    async with s.http.get(s.url("/v1/batch-query/jobs/" + "a" * 32), headers=s.auth) as resp:
        assert resp.status == 401
    await s.login()
    async with s.http.get(s.url("/v1/batch-query/jobs/" + "a" * 32), headers=s.auth) as resp:
        assert resp.status == 404


async def test_legacy_auth_basic_and_access_key_headers(make_sim: Callable[..., Awaitable[Sim]]) -> None:
    s = await make_sim(login=False)
    basic = {"Authorization": aiohttp.encode_basic_auth("sim-client", "sim-secret")}
    async with s.http.post(s.url("/apps/api/batch-query/"), json={"queries": [ACCOUNT_QUERY]}, headers=basic) as resp:
        assert (await resp.json())["status"] == "submitted"
    keys = {"apiAccessKeyId": "sim-client", "apiSecretAccessKey": "sim-secret"}
    async with s.http.post(s.url("/v1/batch-query"), json={"queries": [ACCOUNT_QUERY]}, headers=keys) as resp:
        assert (await resp.json())["status"] == "submitted"


async def test_expire_tokens_early_fault(make_sim: Callable[..., Awaitable[Sim]]) -> None:
    s = await make_sim()
    s.sim.faults.expire_tokens_early = True
    job = await s.submit({"queries": [ACCOUNT_QUERY]})
    async with s.http.get(s.url(f"/v1/batch-query/jobs/{job['id']}"), headers=s.auth) as resp:
        assert resp.status == 401
    await s.login()
    assert (await s.job(job["id"]))["id"] == job["id"]


async def test_common_headers(make_sim: Callable[..., Awaitable[Sim]]) -> None:
    s = await make_sim(sim_cfg(rate_limit_per_minute=100))
    headers = {**s.auth, "Zuora-Track-Id": "my-track-1"}
    async with s.http.get(s.url("/v1/batch-query/jobs/" + "b" * 32), headers=headers) as resp:
        assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["Zuora-Request-Id"])
        assert resp.headers["Zuora-Track-Id"] == "my-track-1"
        assert resp.headers["RateLimit-Limit"].startswith("100")
        assert int(resp.headers["RateLimit-Remaining"]) < 100
        assert int(resp.headers["RateLimit-Reset"]) >= 1
        assert resp.headers["Concurrency-Limit-Limit"] == "40"
        assert "Concurrency-Limit-Remaining" in resp.headers
    for bad in ("x" * 65, "a:b", "it's"):
        async with s.http.get(
            s.url("/v1/batch-query/jobs/" + "b" * 32), headers={**s.auth, "Zuora-Track-Id": bad}
        ) as r:
            assert r.status == 400
            assert "Zuora-Request-Id" in r.headers


async def test_rate_limit_per_minute(make_sim: Callable[..., Awaitable[Sim]]) -> None:
    s = await make_sim(sim_cfg(rate_limit_per_minute=3))
    statuses = []
    for _ in range(5):
        async with s.http.get(s.url("/v1/batch-query/jobs/" + "c" * 32), headers=s.auth) as resp:
            statuses.append(resp.status)
            if resp.status == 429:
                assert int(resp.headers["Retry-After"]) >= 1
                assert (await resp.json())["code"] == "REQUEST_EXCEEDED_LIMIT"
                assert resp.headers["RateLimit-Remaining"] == "0"
    assert statuses == [404, 404, 404, 429, 429]
    await s.login()  # token fetches have limits of their own: not this budget, not refused by it
    s.sim.clock.advance(61)
    async with s.http.get(s.url("/v1/batch-query/jobs/" + "c" * 32), headers=s.auth) as resp:
        assert resp.status == 404


async def test_concurrent_request_limit(make_sim: Callable[..., Awaitable[Sim]]) -> None:
    """Over the tenant's concurrent requests a request gets 429 + Retry-After (REFERENCE.md §10.2); a token fetch
    is not counted, and the limit lifts as the requests in flight end."""
    s = await make_sim(sim_cfg(concurrent_request_limit=2, rows={"Account": 50}))
    job = await s.finished((await s.submit({"queries": [ACCOUNT_QUERY]}))["id"])
    file_url = s.url(f"/v1/files/{job['batches'][0]['fileId']}")
    s.sim.faults.trickle_bytes_per_s = 200  # the downloads stay in flight while the test holds them open
    async with contextlib.AsyncExitStack() as held:
        for _ in range(2):
            resp = await held.enter_async_context(s.http.get(file_url, headers=s.auth))
            assert resp.status == 200
        async with s.http.get(s.url(f"/v1/batch-query/jobs/{job['id']}"), headers=s.auth) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            assert resp.headers["Concurrency-Limit-Remaining"] == "0"
            body = await resp.json()
            assert body["code"] == "REQUEST_EXCEEDED_LIMIT" and "concurrent requests" in body["message"]
        await s.login()  # the token endpoint is not subject to the limit
    for _ in range(50):  # the server sees the closed downloads at its next write, within a tenth of a second
        async with s.http.get(s.url(f"/v1/batch-query/jobs/{job['id']}"), headers=s.auth) as resp:
            if resp.status != 429:
                break
        await asyncio.sleep(0.05)
    assert resp.status == 200


async def test_unknown_routes_and_methods_answer_in_the_v1_error_shape(make_sim: Callable[..., Awaitable[Sim]]) -> None:
    s = await make_sim()
    async with s.http.put(s.url("/v1/batch-query/jobs/" + "d" * 32), headers=s.auth) as resp:
        assert resp.status == 405 and resp.content_type == "application/json"
        body = await resp.json()
        assert body["success"] is False and body["reasons"][0]["code"] == 50000045
    async with s.http.get(s.url("/v1/nope"), headers=s.auth) as resp:
        assert resp.status == 404 and (await resp.json())["reasons"][0]["code"] == 50000040


async def test_submit_paths_and_job_endpoints(make_sim: Callable[..., Awaitable[Sim]]) -> None:
    s = await make_sim()
    for path in ("/v1/batch-query/", "/v1/batch-query", "/apps/api/batch-query/"):
        async with s.http.post(s.url(path), json={"queries": [ACCOUNT_QUERY]}, headers=s.auth) as resp:
            job = await resp.json()
            assert job["status"] == "submitted" and re.fullmatch(r"[0-9a-f]{32}", job["id"])
    done = await s.finished(job["id"])
    async with s.http.get(s.url(f"/apps/api/batch-query/jobs/{job['id']}"), headers=s.auth) as resp:
        assert (await resp.json())["status"] == done["status"] == "completed"
    async with s.http.get(s.url("/v1/batch-query/jobs/" + "d" * 32), headers=s.auth) as resp:
        assert resp.status == 404
        body = await resp.json()
        assert body["success"] is False and re.fullmatch(r"[0-9A-F]{16}", body["processId"])
        assert body["reasons"][0]["code"] == 50000040
    async with s.http.get(s.url("/v1/batch-query/jobs/not-an-id"), headers=s.auth) as resp:
        assert resp.status == 400
        assert (await resp.json())["reasons"][0]["code"] == 50000020
    file_id = done["batches"][0]["fileId"]
    for prefix in ("/v1/files/", "/v1/file/", "/apps/api/file/", "/apps/api/batch-query/file/"):
        async with s.http.get(s.url(prefix + file_id), headers={**s.auth, "Accept-Encoding": "identity"}) as resp:
            assert resp.status == 200 and (await resp.read()).startswith(b"Account: ID,")
    async with s.http.get(s.url(f"/v1/files/{file_id}/status"), headers=s.auth) as resp:
        assert await resp.json() == {"success": True, "accessible": True, "status": "AVAILABLE"}
    async with s.http.get(s.url("/v1/files/" + "e" * 32), headers=s.auth) as resp:
        assert resp.status == 404 and (await resp.json())["success"] is False
    async with s.http.get(s.url("/v1/files/nope"), headers=s.auth) as resp:
        assert resp.status == 400


async def test_control_endpoints(make_sim: Callable[..., Awaitable[Sim]]) -> None:
    s = await make_sim()
    async with s.http.get(s.url("/_sim/faults")) as resp:
        assert (await resp.json())["rate_limit_next"] == 0
    async with s.http.patch(s.url("/_sim/faults"), json={"rate_limit_next": 2, "retry_after_s": 7}) as resp:
        assert (await resp.json())["rate_limit_next"] == 2
    assert s.sim.faults.rate_limit_next == 2 and s.sim.faults.retry_after_s == 7
    async with s.http.put(s.url("/_sim/faults"), json={"server_error_next": 1}) as resp:
        body = await resp.json()
    assert body["rate_limit_next"] == 0 and body["server_error_next"] == 1
    async with s.http.patch(s.url("/_sim/faults"), json={"nope": 1}) as resp:
        assert resp.status == 400
    async with s.http.put(s.url("/_sim/faults"), json={}) as resp:
        assert resp.status == 200
    async with s.http.patch(s.url("/_sim/config"), json={"rows": {"Account": 7}, "step_delay_s": 0}) as resp:
        cfg = await resp.json()
    assert cfg["rows"]["Account"] == 7 and cfg["rows"]["Invoice"] == 2000
    job = await s.finished((await s.submit({"queries": [ACCOUNT_QUERY]}))["id"])
    assert job["batches"][0]["recordCount"] == 7
    file_id = job["batches"][0]["fileId"]
    async with s.http.get(s.url(f"/_sim/files/{file_id}/digest")) as resp:
        digest = await resp.json()
    _, body = await s.download(file_id)
    assert digest == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest(), "records": 7}
    async with s.http.get(s.url("/_sim/files/" + "f" * 32 + "/digest")) as resp:
        assert resp.status == 404
    async with s.http.get(s.url("/_sim/jobs")) as resp:
        assert [j["id"] for j in await resp.json()] == [job["id"]]
    before = s.sim.clock.now()
    async with s.http.post(s.url("/_sim/clock"), json={"advance_s": 100}) as resp:
        assert (await resp.json())["now"] >= before + 100
    async with s.http.post(s.url("/_sim/clock"), json={"advance_s": -1}) as resp:
        assert resp.status == 400
    async with s.http.get(s.url("/_sim/callbacks")) as resp:
        assert await resp.json() == []


async def test_json_answers_over_1000_bytes_are_gzipped_when_accepted(make_sim: Callable[..., Awaitable[Sim]]) -> None:
    """DEV-COMP: a JSON answer over 1,000 bytes comes gzipped to a client that accepts gzip; a small one, or one to
    a client that does not, comes as is."""
    s = await make_sim()
    queries = [{**ACCOUNT_QUERY, "name": f"Account{i}"} for i in range(8)]
    job = await s.submit({"queries": queries})
    for accept, gzipped in (("gzip, deflate", True), ("identity", False)):
        async with s.http.get(
            s.url(f"/v1/batch-query/jobs/{job['id']}"), headers={**s.auth, "Accept-Encoding": accept}
        ) as resp:
            raw = await resp.read()  # the session does not decompress: the wire bytes
            assert (resp.headers.get("Content-Encoding") == "gzip") is gzipped
            body = gzip.decompress(raw) if gzipped else raw
            assert len(body) > 1000 and orjson.loads(body)["id"] == job["id"]
    async with s.http.get(
        s.url("/v1/batch-query/jobs/" + "e" * 32), headers={**s.auth, "Accept-Encoding": "gzip"}
    ) as r:
        assert r.status == 404 and "Content-Encoding" not in r.headers  # a small answer
