"""AquaClient against the AQuA simulator over real HTTP: auth, jobs, downloads, retries and every injected fault."""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import io
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pipeline.aqua.client import AquaClient, _error_from_body, check_track_id
from pipeline.aqua.models import Deleted, Job, Query, SubmitRequest
from pipeline.aqua.simulator import SIMULATOR_KEY, Simulator, SimulatorConfig, create_simulator_app, file_digest
from pipeline.errors import (
    AquaAuthError,
    AquaFileTooLarge,
    AquaNotFound,
    AquaRateLimited,
    AquaUnavailable,
    AquaValidationError,
    UpstreamError,
)
from pipeline.settings import AquaSettings

ROWS = {"Account": 120, "Invoice": 80, "Subscription": 60}


class FakeTime:
    """A monotonic clock that only moves when the client sleeps; records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class Recorder:
    """Every request the client's session starts: (method, path, headers); and every response it got."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.responses: list[aiohttp.ClientResponse] = []

    def trace(self) -> aiohttp.TraceConfig:
        tc = aiohttp.TraceConfig()

        async def on_start(_s: Any, _c: Any, params: aiohttp.TraceRequestStartParams) -> None:
            self.requests.append((params.method, params.url.path, dict(params.headers)))

        async def on_end(_s: Any, _c: Any, params: aiohttp.TraceRequestEndParams) -> None:
            self.responses.append(params.response)

        tc.on_request_start.append(on_start)
        tc.on_request_end.append(on_end)
        return tc

    def count(self, method: str, prefix: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and p.startswith(prefix))


@pytest.fixture
def sim_app() -> web.Application:
    return create_simulator_app(SimulatorConfig(rows=dict(ROWS), default_rows=50, step_delay_s=0.0))


@pytest.fixture
async def server(aiohttp_server: Any, sim_app: web.Application) -> TestServer:
    srv: TestServer = await aiohttp_server(sim_app)
    return srv


@pytest.fixture
def sim(sim_app: web.Application) -> Simulator:
    return sim_app[SIMULATOR_KEY]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
async def session(recorder: Recorder) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trace_configs=[recorder.trace()]) as s:
        yield s


MakeClient = Callable[..., AquaClient]


@pytest.fixture
def make_client(server: TestServer, session: aiohttp.ClientSession, fake_time: FakeTime) -> MakeClient:
    def make(**overrides: Any) -> AquaClient:
        kw: dict[str, Any] = {
            "base_url": str(server.make_url("")),
            "client_id": "sim-client",
            "client_secret": "sim-secret",
            "backoff_base_s": 0.01,
            "backoff_cap_s": 0.05,
        }
        kw.update(overrides)
        return AquaClient(session, AquaSettings(**kw), clock=fake_time.clock, sleep=fake_time.sleep)

    return make


@pytest.fixture
def client(make_client: MakeClient) -> AquaClient:
    return make_client()


def request(*objects: str, **kw: Any) -> SubmitRequest:
    queries = [Query(name=o, query=f"select Id, UpdatedDate from {o}") for o in objects]
    return SubmitRequest(queries=queries, **kw)


async def completed(client: AquaClient, req: SubmitRequest) -> Job:
    job = await client.submit(req)
    assert job.id
    return await client.wait_for_job(job.id, poll_interval_s=0.01)


async def read_all(client: AquaClient, file_id: str, **kw: Any) -> tuple[bytes, Any]:
    async with client.open_file(file_id, **kw) as src:
        raw = b"".join([chunk async for chunk in src.chunks])
    return raw, src


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- auth ---------------------------------------------------------------------------------------------------


async def test_one_token_for_many_calls_including_concurrent(client: AquaClient, recorder: Recorder) -> None:
    job = await client.submit(request("Account"))
    assert job.id
    await asyncio.gather(*(client.get_job(job.id) for _ in range(10)))
    await client.get_job(job.id)
    assert client.auth.fetches == 1
    assert recorder.count("POST", "/oauth/token") == 1
    token_headers = next(h for m, p, h in recorder.requests if p == "/oauth/token")
    assert "Authorization" not in token_headers
    api_headers = [h for m, p, h in recorder.requests if p != "/oauth/token"]
    assert all(h["Authorization"].startswith("Bearer ") for h in api_headers)


async def test_token_refreshed_before_expiry(
    client: AquaClient, sim: Simulator, fake_time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    job = await client.submit(request("Account"))
    assert job.id
    fake_time.now += 3500  # expires_in 3599, margin 60: still fresh
    sim.clock.advance(3500)
    await client.get_job(job.id)
    assert client.auth.fetches == 1
    fake_time.now += 45  # now inside the margin: refreshed before AQuA would refuse it
    sim.clock.advance(45)
    with caplog.at_level(logging.WARNING):
        await client.get_job(job.id)
    assert client.auth.fetches == 2
    assert not caplog.records  # no 401 was needed


async def test_token_refreshed_once_after_early_expiry_401(
    client: AquaClient, sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    job = await client.submit(request("Account"))
    assert job.id
    sim.faults.expire_tokens_early = True  # every token is refused after its first use
    with caplog.at_level(logging.WARNING, logger="pipeline.aqua.client"):
        for _ in range(3):
            assert (await client.get_job(job.id)).id == job.id
    assert client.auth.fetches == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and all("401" in w and "request_id=" in w for w in warnings)


async def test_concurrent_401s_share_one_refresh(client: AquaClient, sim: Simulator) -> None:
    job = await client.submit(request("Account"))
    assert job.id
    sim.clock.advance(4000)  # AQuA expired the token; the client does not know yet
    jobs = await asyncio.gather(*(client.get_job(job.id) for _ in range(8)))
    assert {j.id for j in jobs} == {job.id}
    assert client.auth.fetches == 2


async def test_401_after_refresh_is_auth_error(
    client: AquaClient, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = await client.submit(request("Account"))
    assert job.id
    monkeypatch.setattr(sim, "check_token", lambda token: False)
    with pytest.raises(AquaAuthError) as info:
        await client.get_job(job.id)
    assert info.value.status == 401 and info.value.request_id
    assert not info.value.retryable
    assert client.auth.fetches == 2  # refreshed exactly once


async def test_a_failed_token_fetch_is_shared_not_repeated_by_every_waiter(
    client: AquaClient, sim: Simulator, recorder: Recorder, fake_time: FakeTime
) -> None:
    """Ten callers need a token and the endpoint answers 429: one POST, ten errors; then none until Retry-After."""
    sim.faults.rate_limit_scope = "token"
    sim.faults.rate_limit_next = 5
    sim.faults.retry_after_s = 30
    got = await asyncio.gather(*(client.auth.get() for _ in range(10)), return_exceptions=True)
    assert all(isinstance(e, AquaRateLimited) for e in got), got
    assert recorder.count("POST", "/oauth/token") == 1
    fake_time.now += 10
    with pytest.raises(AquaRateLimited) as info:
        await client.auth.get()
    assert info.value.retry_after == pytest.approx(20)
    assert recorder.count("POST", "/oauth/token") == 1  # still waiting out the Retry-After: not asked
    fake_time.now += 20
    sim.faults.rate_limit_next = 0
    tokens = await asyncio.gather(*(client.auth.get() for _ in range(10)))
    assert len(set(tokens)) == 1 and recorder.count("POST", "/oauth/token") == 2


async def test_a_5xx_token_fetch_is_shared_and_the_client_retries_it(
    client: AquaClient, sim: Simulator, recorder: Recorder
) -> None:
    sim.faults.server_error_scope = "token"
    sim.faults.server_error_next = 1
    got = await asyncio.gather(*(client.auth.get() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(e, AquaUnavailable) for e in got), got
    assert recorder.count("POST", "/oauth/token") == 1
    job = await client.submit(request("Account"))  # the retry loop fetches a token again
    assert job.id and client.auth.fetches == 1


async def test_token_endpoint_refusal_is_auth_error(
    make_client: MakeClient, recorder: Recorder, fake_time: FakeTime
) -> None:
    client = make_client(client_secret="wrong")
    with pytest.raises(AquaAuthError, match="401"):
        await client.get_job("0" * 32)
    assert recorder.count("POST", "/oauth/token") == 1  # permanent: no retries
    assert recorder.count("GET", "/") == 0
    assert fake_time.sleeps == []


# -- headers and ids ----------------------------------------------------------------------------------------


async def test_headers_track_entity_org(
    make_client: MakeClient, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(entity_ids="e-1", org_ids="org-1,org-2")
    job = await client.submit(request("Account"), track_id="nightly-accounts-1", idempotency_key="k-1")
    assert job.id
    with caplog.at_level(logging.DEBUG, logger="pipeline.aqua.client"):
        await client.get_job(job.id)
        await client.get_job(job.id)
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 2 and all(f"GET /v1/batch-query/jobs/{job.id} -> 200 (request_id=" in m for m in debug)
    assert all("request_id=None" not in m for m in debug)
    api = [(m, h) for m, p, h in recorder.requests if p != "/oauth/token"]
    submit_headers = api[0][1]
    assert submit_headers["Zuora-Track-Id"] == "nightly-accounts-1"
    assert submit_headers["Idempotency-Key"] == "k-1"
    generated = [h["Zuora-Track-Id"] for _, h in api[1:]]
    assert len(set(generated)) == 2
    assert all(check_track_id(t) and len(t) <= 64 for t in generated)
    assert all(h["Zuora-Entity-Ids"] == "e-1" and h["Zuora-Org-Ids"] == "org-1,org-2" for _, h in api)


async def test_submit_entity_override_and_generated_idempotency_key(client: AquaClient, recorder: Recorder) -> None:
    await client.submit(request("Account"), entity_ids="e-2")
    await client.submit(request("Account"))
    submits = [h for m, p, h in recorder.requests if m == "POST" and p == "/v1/batch-query/"]
    assert submits[0]["Zuora-Entity-Ids"] == "e-2"
    assert "Zuora-Entity-Ids" not in submits[1]
    keys = {h["Idempotency-Key"] for h in submits}
    assert len(keys) == 2 and all(keys)


async def test_idempotency_key_replays_same_job(client: AquaClient, sim: Simulator) -> None:
    first = await client.submit(request("Account"), idempotency_key="same-key")
    second = await client.submit(request("Account"), idempotency_key="same-key")
    assert first.id == second.id
    assert len(sim.jobs) == 1


@pytest.mark.parametrize("bad", ["", "../../oauth/token", "A" * 32, "0" * 31, "0" * 33, "g" * 32, "0" * 31 + "/"])
async def test_bad_ids_rejected_before_any_request(client: AquaClient, recorder: Recorder, bad: str) -> None:
    with pytest.raises(ValueError):
        await client.get_job(bad)
    with pytest.raises(ValueError):
        await client.cancel_job(bad)
    with pytest.raises(ValueError):
        await client.wait_for_job(bad)
    with pytest.raises(ValueError):
        async with client.open_file(bad):
            pass
    assert recorder.requests == []


@pytest.mark.parametrize("bad", ["a:b", "semi;colon", 'quo"te', "apo'strophe", "x" * 65, "", "tab\there", "é"])
async def test_bad_track_id_rejected_before_any_request(client: AquaClient, recorder: Recorder, bad: str) -> None:
    with pytest.raises(ValueError):
        await client.get_job("0" * 32, track_id=bad)
    assert recorder.requests == []


# -- jobs ---------------------------------------------------------------------------------------------------


async def test_submit_get_cancel(client: AquaClient, sim: Simulator) -> None:
    sim.config.step_delay_s = 3600  # the job stays where we put it
    job = await client.submit(request("Account", "Invoice", name="two-batches"))
    assert job.id and job.status == "submitted" and len(job.batches) == 2
    got = await client.get_job(job.id)
    assert got.id == job.id and got.name == "two-batches" and got.status == "submitted"
    cancelled = await client.cancel_job(job.id)
    assert cancelled.status == "cancelled"
    assert {b.status for b in cancelled.batches} == {"cancelled"}
    with pytest.raises(AquaValidationError) as info:
        await client.cancel_job(job.id)  # already finished
    assert info.value.error_code == "90003" and info.value.status == 400


async def test_unknown_job_is_not_found(client: AquaClient) -> None:
    with pytest.raises(AquaNotFound) as info:
        await client.get_job("0123456789abcdef0123456789abcdef")
    assert info.value.status == 404 and info.value.request_id
    with pytest.raises(AquaNotFound):
        await client.cancel_job("0123456789abcdef0123456789abcdef")


async def test_every_job_status(client: AquaClient, sim: Simulator) -> None:
    seen: list[str] = []
    done = await client.wait_for_job(
        (await client.submit(request("Account"))).id or "",
        poll_interval_s=0.01,
        on_update=lambda j: seen.append(j.status),
    )
    assert done.status == "completed" and done.finished and seen[-1] == "completed"
    assert done.batches[0].record_count == ROWS["Account"] and done.batches[0].file_id

    sim.faults.abort_batches = True
    aborted = await completed(client, request("Invoice"))
    assert aborted.status == "aborted" and aborted.batches[0].message
    sim.faults.abort_batches = False

    sim.config.step_delay_s = 3600
    job = await client.submit(request("Account"))
    assert job.id and (await client.get_job(job.id)).status == "submitted"
    sim.jobs[job.id].status = "executing"  # the engine is parked on a long step; move it by hand
    assert (await client.get_job(job.id)).status == "executing"
    sim.finish(sim.jobs[job.id], "error")
    errored = await client.get_job(job.id)  # a job in ``error`` is still a job, not a refused request
    assert errored.status == "error" and errored.finished

    job = await client.submit(request("Account"))
    assert job.id
    assert (await client.cancel_job(job.id)).status == "cancelled"
    assert (await client.get_job(job.id)).status == "cancelled"


async def test_wait_for_job_times_out(client: AquaClient, sim: Simulator, fake_time: FakeTime) -> None:
    sim.config.step_delay_s = 3600
    job = await client.submit(request("Account"))
    assert job.id
    seen: list[str] = []
    with pytest.raises(UpstreamError, match="still submitted") as info:
        await client.wait_for_job(job.id, poll_interval_s=1, timeout_s=5, on_update=lambda j: seen.append(j.status))
    assert info.value.retryable
    assert seen == ["submitted"]
    assert fake_time.sleeps == [1, 1, 1, 1, 1]


async def test_submit_validation_error(client: AquaClient) -> None:
    bad = SubmitRequest(queries=[Query(name="Account", query="selec Id frm Account")])
    with pytest.raises(AquaValidationError) as info:
        await client.submit(bad)
    assert info.value.error_code == "90005"
    assert "syntax" in str(info.value).lower()
    assert not info.value.retryable and info.value.request_id


async def test_last_completed_job_and_stateful_increments(client: AquaClient) -> None:
    assert await client.last_completed_job("partner-x", "project/with slash") is None
    stateful = {"version": "1.1", "partner": "partner-x", "project": "proj-1"}
    deleted = Deleted(column="IsDeleted")
    req = SubmitRequest(
        queries=[Query(name="Account", query="select Id, Name, UpdatedDate from Account", deleted=deleted)], **stateful
    )
    first = await completed(client, req)
    second = await completed(client, req)
    assert first.batches[0].full is True and first.batches[0].record_count == ROWS["Account"]
    assert second.batches[0].full is False and 0 < second.batches[0].record_count < ROWS["Account"]
    last = await client.last_completed_job("partner-x", "proj-1")
    assert last is not None and last.id == second.id
    raw, _ = await read_all(client, second.batches[0].file_id or "", accept_gzip=False)
    assert b"IsDeleted" in raw.splitlines()[0]


async def test_segments(client: AquaClient, sim: Simulator) -> None:
    sim.config.segment_records = 50
    req = request("Account", version="1.1", partner="partner-x", project="segmented")
    job = await completed(client, req)
    batch = job.batches[0]
    assert batch.segments and len(batch.segments) == 3 and batch.file_ids == batch.segments
    records = 0
    for file_id in batch.segments:
        raw, src = await read_all(client, file_id)
        size, digest, count = await file_digest(sim, file_id)
        body = gzip.decompress(raw) if src.content_encoding == "gzip" else raw
        assert sha(body) == digest and len(body) == size
        records += count
    assert records == batch.record_count == ROWS["Account"]


# -- downloads ----------------------------------------------------------------------------------------------


async def test_download_csv_with_transport_gzip(client: AquaClient, sim: Simulator, recorder: Recorder) -> None:
    job = await completed(client, request("Account"))
    file_id = job.batches[0].file_id or ""
    raw, src = await read_all(client, file_id)
    _, digest, _ = await file_digest(sim, file_id)
    assert src.file_id == file_id and src.content_encoding == "gzip"
    assert src.content_type.startswith("text/csv")
    assert raw[:2] == b"\x1f\x8b"  # wire bytes, not decoded by aiohttp
    assert sha(gzip.decompress(raw)) == digest
    headers = next(h for m, p, h in recorder.requests if p == f"/v1/files/{file_id}")
    assert headers["Accept-Encoding"] == "gzip"


async def test_download_csv_identity(client: AquaClient, sim: Simulator) -> None:
    job = await completed(client, request("Account"))
    file_id = job.batches[0].file_id or ""
    raw, src = await read_all(client, file_id, accept_gzip=False)
    size, digest, records = await file_digest(sim, file_id)
    assert src.content_encoding is None and src.content_length == size == len(raw)
    assert sha(raw) == digest
    assert len(list(csv.reader(io.StringIO(raw.decode())))) == records + 1  # header + records


@pytest.mark.parametrize(
    ("fmt", "ctype", "magic"), [("gzip", "application/x-gzip", b"\x1f\x8b"), ("zip", "application/zip", b"PK")]
)
async def test_download_gzip_and_zip_formats(
    client: AquaClient, sim: Simulator, fmt: str, ctype: str, magic: bytes
) -> None:
    job = await completed(client, request("Invoice", format=fmt))
    file_id = job.batches[0].file_id or ""
    raw, src = await read_all(client, file_id)
    size, digest, _ = await file_digest(sim, file_id)
    assert src.content_type.startswith(ctype) and src.content_encoding is None
    assert raw.startswith(magic) and len(raw) == size and sha(raw) == digest


async def test_small_chunks_stream(make_client: MakeClient, sim: Simulator) -> None:
    client = make_client(chunk_size=4096)
    job = await completed(client, request("Account"))
    async with client.open_file(job.batches[0].file_id or "", accept_gzip=False) as src:
        sizes = [len(c) async for c in src.chunks]
    assert len(sizes) > 1 and max(sizes) <= 4096


async def test_responses_closed_on_every_path(
    server: TestServer, sim: Simulator, fake_time: FakeTime, recorder: Recorder
) -> None:
    sim.config.rows = {"Payment": 60_000}  # a few MB: more than the socket buffers hold, so a body stays unread
    url = str(server.make_url(""))
    settings = AquaSettings(base_url=url, chunk_size=4096, max_attempts=1, connect_timeout_s=2)  # fail fast on a leak
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[recorder.trace()]) as session:
        client = AquaClient(session, settings, clock=fake_time.clock, sleep=fake_time.sleep)
        job = await completed(client, request("Payment"))
        file_id = job.batches[0].file_id or ""
        with pytest.raises(RuntimeError):
            async with client.open_file(file_id, accept_gzip=False) as src:
                async for _ in src.chunks:
                    raise RuntimeError("consumer failed")
        async with client.open_file(file_id, accept_gzip=False) as src:
            async for _ in src.chunks:
                break
        async with client.open_file(file_id) as src:
            pass  # never iterated
        # The recorder holds every response, so none can be released by garbage collection: each was closed
        # by the client, and with a one-connection pool this call would hang if one had leaked.
        assert (await asyncio.wait_for(client.get_job(job.id or ""), 5)).id == job.id
        assert len(recorder.responses) > 5 and all(r.closed for r in recorder.responses)
        with pytest.raises(StopAsyncIteration):
            await src.chunks.__anext__()


# -- faults -------------------------------------------------------------------------------------------------


async def test_429_storm_honours_retry_after(
    client: AquaClient, sim: Simulator, fake_time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    job = await client.submit(request("Account"))
    assert job.id
    sim.faults.rate_limit_next = 3
    sim.faults.retry_after_s = 2
    with caplog.at_level(logging.WARNING, logger="pipeline.aqua.client"):
        assert (await client.get_job(job.id)).id == job.id
    assert len(fake_time.sleeps) == 3 and all(d >= 2 for d in fake_time.sleeps)
    assert len(caplog.records) == 3
    assert all("rate limited" in r.getMessage() and "request_id=" in r.getMessage() for r in caplog.records)
    assert all("request_id=None" not in r.getMessage() for r in caplog.records)


async def test_429_beyond_attempts_is_rate_limited(make_client: MakeClient, sim: Simulator, recorder: Recorder) -> None:
    client = make_client(max_attempts=3)
    sim.faults.rate_limit_next = 10
    sim.faults.retry_after_s = 2
    with pytest.raises(AquaRateLimited) as info:
        await client.get_job("0" * 32)
    assert info.value.retry_after == 2 and info.value.status == 429 and info.value.retryable
    assert recorder.count("GET", "/v1/batch-query/jobs/") == 3


async def test_retry_after_beyond_budget_fails_fast(
    make_client: MakeClient, sim: Simulator, fake_time: FakeTime
) -> None:
    client = make_client(max_retry_time_s=60)
    sim.faults.rate_limit_next = 1
    sim.faults.retry_after_s = 600
    with pytest.raises(AquaRateLimited) as info:
        await client.get_job("0" * 32)
    assert info.value.retry_after == 600
    assert fake_time.sleeps == []


async def test_5xx_burst_retried_then_succeeds(client: AquaClient, sim: Simulator, fake_time: FakeTime) -> None:
    sim.faults.server_error_next = 2
    job = await client.submit(request("Account"), idempotency_key="retry-safe")
    assert job.id and len(sim.jobs) == 1
    assert len(fake_time.sleeps) == 2 and all(0 <= d <= 0.05 for d in fake_time.sleeps)


async def test_5xx_beyond_max_attempts(make_client: MakeClient, sim: Simulator, recorder: Recorder) -> None:
    client = make_client(max_attempts=3)
    sim.faults.server_error_next = 10
    sim.faults.server_error_status = 502
    with pytest.raises(AquaUnavailable) as info:
        await client.get_job("0" * 32)
    assert info.value.status == 502 and info.value.request_id and info.value.retryable
    assert recorder.count("GET", "/v1/batch-query/jobs/") == 3
    assert sim.faults.server_error_next == 7


async def test_retry_time_budget_bounds_retries(make_client: MakeClient, sim: Simulator, fake_time: FakeTime) -> None:
    client = make_client(max_attempts=20, max_retry_time_s=1.0, backoff_base_s=0.5, backoff_cap_s=0.5)
    sim.faults.server_error_next = 100
    with pytest.raises(AquaUnavailable):
        await client.get_job("0" * 32)
    assert sum(fake_time.sleeps) <= 1.0
    assert len(fake_time.sleeps) < 19


async def test_connection_refused_is_unavailable(session: aiohttp.ClientSession, fake_time: FakeTime) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = AquaSettings(base_url=f"http://127.0.0.1:{port}", max_attempts=3, connect_timeout_s=2)
    client = AquaClient(session, settings, clock=fake_time.clock, sleep=fake_time.sleep)
    with pytest.raises(AquaUnavailable) as info:
        await client.get_job("0" * 32)
    assert isinstance(info.value.__cause__, aiohttp.ClientError)
    assert len(fake_time.sleeps) == 2  # the token endpoint's connection errors are retried too


async def test_file_5xx_on_open_retried(client: AquaClient, sim: Simulator, fake_time: FakeTime) -> None:
    job = await completed(client, request("Account"))
    file_id = job.batches[0].file_id or ""
    sim.faults.fail_file_next = 2
    before = len(fake_time.sleeps)
    raw, _ = await read_all(client, file_id, accept_gzip=False)
    assert sha(raw) == (await file_digest(sim, file_id))[1]
    assert len(fake_time.sleeps) - before == 2


@pytest.mark.parametrize("accept_gzip", [False, True])
async def test_cut_mid_file_is_truncated(client: AquaClient, sim: Simulator, accept_gzip: bool) -> None:
    job = await completed(client, request("Account"))
    file_id = job.batches[0].file_id or ""
    sim.faults.cut_file_after_bytes = 1500
    sim.faults.cut_file_next = 1
    with pytest.raises(AquaUnavailable, match="truncated download") as info:
        await read_all(client, file_id, accept_gzip=accept_gzip)
    assert info.value.retryable and info.value.request_id
    assert isinstance(info.value.__cause__, aiohttp.ClientError)
    raw, _ = await read_all(client, file_id, accept_gzip=False)  # the fault was one-shot
    assert sha(raw) == (await file_digest(sim, file_id))[1]


async def test_wrong_content_length_is_truncated(client: AquaClient, sim: Simulator) -> None:
    job = await completed(client, request("Account"))
    sim.faults.wrong_content_length = True
    with pytest.raises(AquaUnavailable, match="truncated download"):
        await read_all(client, job.batches[0].file_id or "", accept_gzip=False)


async def test_file_over_limit(client: AquaClient, sim: Simulator, fake_time: FakeTime) -> None:
    job = await completed(client, request("Account"))
    sim.faults.files_over_limit = True
    with pytest.raises(AquaFileTooLarge, match="UpdatedDate") as info:
        async with client.open_file(job.batches[0].file_id or ""):
            pass  # pragma: no cover
    assert info.value.status == 403 and not info.value.retryable
    assert fake_time.sleeps == []


async def test_file_after_retention_is_not_found(client: AquaClient, sim: Simulator) -> None:
    job = await completed(client, request("Account"))
    sim.clock.advance(73 * 3600)  # past retention; the cached token has expired at AQuA too
    with pytest.raises(AquaNotFound) as info:
        await read_all(client, job.batches[0].file_id or "")
    assert info.value.status == 404 and not info.value.retryable
    assert client.auth.fetches == 2


# -- error bodies -------------------------------------------------------------------------------------------


def test_error_bodies_are_classified() -> None:
    v1 = {"success": False, "processId": "ABC", "reasons": [{"code": 53100020, "message": "bad value"}]}
    err = _error_from_body(v1, status=200, request_id="r")
    assert isinstance(err, AquaValidationError) and err.error_code == "53100020" and not err.retryable
    temporary = {"success": False, "reasons": [{"code": 50000061, "message": "try later"}]}
    err = _error_from_body(temporary, status=200, request_id="r")
    assert isinstance(err, AquaValidationError) and err.retryable
    internal = {"errorCode": "90022", "message": "internal error", "status": "error"}
    err = _error_from_body(internal, status=200, request_id=None)
    assert isinstance(err, AquaValidationError) and err.retryable
    assert isinstance(
        _error_from_body({"errorCode": "90002", "message": "x"}, status=200, request_id=None), AquaNotFound
    )
    assert _error_from_body({"id": "a" * 32, "status": "completed"}, status=200, request_id=None) is None
    assert _error_from_body([1, 2], status=200, request_id=None) is None


async def test_a_malformed_response_does_not_leak_the_bearer_token(
    session: aiohttp.ClientSession, fake_time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's error for a malformed response carries the request, bearer token included, in its repr: neither
    the retry warnings nor the error that ends the call may show it."""
    bearer = "SECRET-BEARER-7f3a"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = (await reader.read(65536)).split(b"\r\n", 1)[0]
        if b"/oauth/token" in request_line:
            body = b'{"access_token": "%s", "expires_in": 3600}' % bearer.encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
            writer.write(body)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n")  # aiohttp: ClientResponseError
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = AquaSettings(
        base_url=f"http://127.0.0.1:{port}", client_id="c", client_secret="s", max_attempts=3, backoff_base_s=0.01
    )
    client = AquaClient(session, settings, clock=fake_time.clock, sleep=fake_time.sleep)
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(AquaUnavailable) as err:
            await client.get_job("0" * 32)
    finally:
        server.close()
        await server.wait_closed()
    assert "status=400" in str(err.value), err.value  # still says what happened
    assert bearer not in str(err.value)
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2
    assert not [r.getMessage() for r in caplog.records if bearer in r.getMessage()]


def test_retry_after_values_that_are_not_a_finite_delay_are_ignored_or_capped() -> None:
    """``1e400`` parses as infinity and ``nan`` as NaN: either would crash the worker's settlement (int()) and
    shut the token endpoint until a restart."""
    from pipeline.aqua.auth import MAX_RETRY_AFTER_S, parse_retry_after

    assert [parse_retry_after(v) for v in ("1e400", "inf", "nan", "-5", "2.5", "", None, "Wed, 21 Oct 2015")] == [
        None,
        None,
        None,
        0.0,
        2.5,
        None,
        None,
        None,
    ]
    assert parse_retry_after("86400") == MAX_RETRY_AFTER_S == 3600.0


async def test_a_replay_answered_409_with_the_job_is_that_job(client: AquaClient, sim: Simulator) -> None:
    """DEV-ERRH: a replayed Idempotency-Key gets the original result as a 409. It is the job the key made, not a
    refusal: a resumed submission must record it, not give up on it."""
    sim.config.idempotency_replay = "http_409"
    first = await client.submit(request("Account"), idempotency_key="k-replay")
    again = await client.submit(request("Account"), idempotency_key="k-replay")
    assert again.id == first.id and len(sim.jobs) == 1


async def test_a_submit_whose_key_is_still_in_progress_is_tried_again(
    server: TestServer, session: aiohttp.ClientSession, sim: Simulator
) -> None:
    """DEV-IDEM: 409 while the first request under the key runs (our own earlier attempt, e.g. one that timed out
    on our side). A retry a moment later gets that request's job."""
    settings = AquaSettings(  # retries spread over seconds: the budget outlasts the test's hold (full jitter)
        base_url=str(server.make_url("")),
        client_id="sim-client",
        client_secret="sim-secret",
        backoff_base_s=0.2,
        backoff_cap_s=0.5,
        max_attempts=12,
    )
    client = AquaClient(session, settings)
    token = await client.auth.get(track_id="t")
    release = asyncio.Event()
    body = SubmitRequest(queries=[Query(name="Account", query="select Id from Account")]).to_body()
    raw = orjson.dumps(body)

    async def chunks() -> Any:
        yield raw[:10]
        await release.wait()
        yield raw[10:]

    async def held() -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "k-busy", "Content-Type": "application/json"}
        async with session.post(str(server.make_url("/v1/batch-query/")), data=chunks(), headers=headers) as resp:
            assert resp.status == 200
            result: dict[str, Any] = await resp.json()
            return result

    first = asyncio.create_task(held())
    for _ in range(500):
        if "k-busy" in sim.idempotency_in_progress:
            break
        await asyncio.sleep(0.01)
    retried = asyncio.create_task(client.submit(SubmitRequest.model_validate(body), idempotency_key="k-busy"))
    await asyncio.sleep(0.2)  # the client has met the 409 and is waiting to try again
    assert not retried.done()
    release.set()
    job = await retried
    assert job.id == (await first)["id"] and len(sim.jobs) == 1


async def test_not_now_answers_are_retried_not_taken_for_refusals(aiohttp_server: Any) -> None:
    """A proxy's or a maintenance window's answers say nothing of our credentials or the request: a token
    endpoint answering a 200 HTML page, then 408, and the API answering 408 and 425, are all tried again."""
    token_answers = [
        web.Response(text="<html>down for maintenance</html>", content_type="text/html"),
        web.Response(status=408, text="Request Timeout"),
    ]
    job_answers = [web.Response(status=408, text="Request Timeout"), web.Response(status=425, text="Too Early")]
    job_id = "a" * 32

    async def token(_: web.Request) -> web.Response:
        return token_answers.pop(0) if token_answers else web.json_response({"access_token": "t", "expires_in": 3599})

    async def job(_: web.Request) -> web.Response:
        return job_answers.pop(0) if job_answers else web.json_response({"id": job_id, "status": "completed"})

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    app.router.add_get(f"/v1/batch-query/jobs/{job_id}", job)
    server = await aiohttp_server(app)
    fake = FakeTime()
    settings = AquaSettings(base_url=str(server.make_url("")), client_id="c", client_secret="s", max_attempts=6)
    retries: list[str] = []
    async with aiohttp.ClientSession() as http:
        client = AquaClient(http, settings, clock=fake.clock, sleep=fake.sleep, on_retry=retries.append)
        got = await client.get_job(job_id)
    assert got.id == job_id and token_answers == [] and job_answers == []
    assert len(retries) == 4


@pytest.mark.parametrize(
    ("status", "batches", "finished"),
    [
        ("completed", ["completed"], True),
        ("executing", ["completed", "executing"], False),
        ("failed", ["executing"], True),  # tap-zuora's word: the job has ended whatever its batches say
        ("deleted_notallowed", [], True),
        ("queued", ["pending"], False),  # an unknown word with a batch still queued: not yet
        ("queued", ["completed", "aborted"], True),  # ... with every batch ended: it has ended too
        ("queued", [], False),
    ],
)
def test_an_undocumented_job_status_is_final_once_no_batch_runs(
    status: str, batches: list[str], finished: bool
) -> None:
    job = Job.model_validate(
        {"id": "a" * 32, "status": status, "batches": [{"name": f"b{i}", "status": b} for i, b in enumerate(batches)]}
    )
    assert job.finished is finished


def test_job_answers_with_nulls_numbers_and_formatted_counts_are_read() -> None:
    """Type variants seen in AQuA's answers across its sources (REFERENCE.md §15) must not make a completed job
    unreadable: it would be retried and then failed though AQuA finished it."""
    job = Job.model_validate(
        {
            "id": "a" * 32,
            "status": "completed",
            "partner": 12345,
            "startTime": 1700000000,
            "name": None,
            "batches": [
                {"name": None, "status": "completed", "query": None, "recordCount": "1,234", "fileId": "f" * 32},
                {"name": "b", "status": None, "recordCount": None},
            ],
        }
    )
    assert (job.partner, job.start_time, job.name) == ("12345", "1700000000", None)
    assert [(b.name, b.status, b.query, b.record_count) for b in job.batches] == [
        ("", "completed", "", 1234),
        ("b", "pending", "", 0),
    ]
    assert Job.model_validate({"id": "a" * 32, "status": "completed", "batches": None}).batches == []
