"""Simulator jobs: statuses, cancel, limits, idempotency, stateful sessions, segments."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from pipeline.aqua.simulator import SimulatorConfig
from tests.test_simulator import ACCOUNT_QUERY, Sim, make_sim

__all__ = ["make_sim"]

SimFactory = Callable[..., Awaitable[Sim]]
STATEFUL = {"version": "1.1", "partner": "p1", "project": "proj", "useQueryLabels": True, "dateTimeUtc": True}
DELETED_QUERY = {**ACCOUNT_QUERY, "deleted": {"column": "IsDeleted", "format": "Boolean"}}


def table(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode(), newline="")))


async def test_two_batches_complete_in_order(make_sim: SimFactory) -> None:
    s = await make_sim()
    q2 = {"name": "Invoice", "query": "select Id, Amount from Invoice", "type": "zoql"}
    job = await s.finished((await s.submit({"queries": [ACCOUNT_QUERY, q2]}))["id"])
    assert job["status"] == "completed" and job["localizedStatus"] == "completed"
    assert [b["status"] for b in job["batches"]] == ["completed", "completed"]
    assert [b["recordCount"] for b in job["batches"]] == [1000, 2000]
    assert job["batches"][1]["batchType"] == "zoql"
    assert job["sourceData"] == "LIVE" and len(job["startTime"]) == 19


async def test_abort_faults(make_sim: SimFactory) -> None:
    s = await make_sim()
    s.sim.faults.abort_query = "Invoice"
    q2 = {"name": "Invoice", "query": "select Id from Invoice"}
    job = await s.finished((await s.submit({"queries": [ACCOUNT_QUERY, q2]}))["id"])
    assert job["status"] == "aborted"
    first, second = job["batches"]
    assert first["status"] == "completed" and "fileId" in first
    assert second["status"] == "aborted" and second["message"] == "The query exceeded maximum processing time."
    assert "fileId" not in second
    s.sim.faults.abort_query = None
    s.sim.faults.abort_batches = True
    job = await s.finished((await s.submit({"queries": [ACCOUNT_QUERY]}))["id"])
    assert job["status"] == "aborted"


async def test_cancel_running_job_and_cancel_finished_job(make_sim: SimFactory) -> None:
    s = await make_sim(SimulatorConfig(step_delay_s=30))
    job = await s.submit({"queries": [ACCOUNT_QUERY]})
    async with s.http.delete(s.url(f"/v1/batch-query/jobs/{job['id']}"), headers=s.auth) as resp:
        body = await resp.json()
    assert resp.status == 200 and body["status"] == "cancelled"
    assert body["batches"][0]["status"] == "cancelled"
    assert (await s.job(job["id"]))["status"] == "cancelled"
    async with s.http.delete(s.url(f"/v1/batch-query/jobs/{job['id']}"), headers=s.auth) as resp:
        assert resp.status == 400
        err = await resp.json()
    assert err["errorCode"] == "90003" and err["status"] == "error"
    async with s.http.delete(s.url("/v1/batch-query/jobs/" + "0" * 32), headers=s.auth) as resp:
        assert resp.status == 404


async def test_submit_error_shape(make_sim: SimFactory) -> None:
    s = await make_sim()
    bad = {"name": "nightly", "version": "1.0", "format": "csv",
           "queries": [{"name": "Account", "query": "selec Id frm Account", "type": "zoqlexport"}]}  # fmt: skip
    body = await s.submit(bad)
    assert body["errorCode"] == "90005" and body["status"] == "error"
    assert body["message"] == "There is a syntax error in one of the queries in the AQuA input"
    assert "id" not in body and body["format"] == "CSV" and body["batches"][0]["query"] == "selec Id frm Account"
    assert s.sim.jobs == {}


async def test_concurrency_limit(make_sim: SimFactory) -> None:
    s = await make_sim(SimulatorConfig(step_delay_s=30, max_concurrent_jobs=2))
    for _ in range(2):
        assert (await s.submit({"queries": [ACCOUNT_QUERY]}))["status"] == "submitted"
    refused = await s.submit({"queries": [ACCOUNT_QUERY]})
    assert refused["errorCode"] == "90028" and "id" not in refused
    s.sim.config.job_limit_response = "http_429"
    async with s.http.post(s.url("/v1/batch-query/"), json={"queries": [ACCOUNT_QUERY]}, headers=s.auth) as resp:
        assert resp.status == 429 and "Retry-After" in resp.headers
    stateful = {"version": "1.1", "partner": "p", "project": "q", "queries": [ACCOUNT_QUERY]}
    assert (await s.submit(stateful))["status"] == "submitted"  # stateful jobs have a limit of their own
    first = next(iter(s.sim.jobs.values()))
    s.sim.cancel(first)
    s.sim.config.job_limit_response = "error_body"
    assert (await s.submit({"queries": [ACCOUNT_QUERY]}))["status"] == "submitted"


async def test_idempotency_key(make_sim: SimFactory) -> None:
    s = await make_sim()
    a = await s.submit({"queries": [ACCOUNT_QUERY]}, **{"Idempotency-Key": "k1"})
    b = await s.submit({"queries": [ACCOUNT_QUERY]}, **{"Idempotency-Key": "k1"})
    c = await s.submit({"queries": [ACCOUNT_QUERY]}, **{"Idempotency-Key": "k2"})
    assert a == b and a["id"] != c["id"]
    assert len(s.sim.jobs) == 2
    s.sim.clock.advance(24 * 3600 + 1)
    await s.login()
    d = await s.submit({"queries": [ACCOUNT_QUERY]}, **{"Idempotency-Key": "k1"})
    assert d["id"] != a["id"]


async def slow_submit(s: Sim, key: str, release: asyncio.Event) -> tuple[int, dict[str, Any]]:
    """A submit under ``key`` whose body arrives only once ``release`` is set: the request stays in progress."""
    body = orjson.dumps({"queries": [ACCOUNT_QUERY]})

    async def chunks() -> Any:
        yield body[:10]
        await release.wait()
        yield body[10:]

    headers = {**s.auth, "Idempotency-Key": key, "Content-Type": "application/json"}
    async with s.http.post(s.url("/v1/batch-query/"), data=chunks(), headers=headers) as resp:
        return resp.status, await resp.json()


async def test_idempotency_key_in_progress_other_route_and_replay_style(make_sim: SimFactory) -> None:
    """DEV-IDEM (REFERENCE.md §2.2): 409 while the first request under a key runs (one job, not two); 422 for the
    key on another URL; and, as DEV-ERRH has it, a replay answered 409 with the stored body when so configured."""
    s = await make_sim()
    release = asyncio.Event()
    first = asyncio.create_task(slow_submit(s, "k-slow", release))
    for _ in range(500):  # until the simulator has the request in hand
        if "k-slow" in s.sim.idempotency_in_progress:
            break
        await asyncio.sleep(0.01)
    async with s.http.post(
        s.url("/v1/batch-query/"), json={"queries": [ACCOUNT_QUERY]}, headers={**s.auth, "Idempotency-Key": "k-slow"}
    ) as resp:
        assert resp.status == 409
        assert (await resp.json())["reasons"][0]["message"].endswith("still in progress")
    release.set()
    status, job = await first
    assert status == 200 and len(s.sim.jobs) == 1
    assert (await s.submit({"queries": [ACCOUNT_QUERY]}, **{"Idempotency-Key": "k-slow"}))["id"] == job["id"]
    async with s.http.post(
        s.url("/apps/api/batch-query/"),
        json={"queries": [ACCOUNT_QUERY]},
        headers={**s.auth, "Idempotency-Key": "k-slow"},
    ) as resp:
        assert resp.status == 422
    s.sim.config.idempotency_replay = "http_409"
    async with s.http.post(
        s.url("/v1/batch-query"), json={"queries": [ACCOUNT_QUERY]}, headers={**s.auth, "Idempotency-Key": "k-slow"}
    ) as resp:
        assert resp.status == 409 and (await resp.json())["id"] == job["id"]
    assert len(s.sim.jobs) == 1


async def test_stateful_full_then_incremental_with_deleted(make_sim: SimFactory) -> None:
    s = await make_sim(SimulatorConfig(step_delay_s=0, rows={"Account": 2000}))
    first = await s.finished((await s.submit({**STATEFUL, "queries": [DELETED_QUERY]}))["id"])
    b1 = first["batches"][0]
    assert b1["full"] is True and b1["recordCount"] == 2000
    assert b1["deleted"] == {"column": "IsDeleted", "format": "Boolean"}
    _, full = await s.download(b1["fileId"])
    rows = table(full)
    assert rows[0][:2] == ["Account.IsDeleted", "Account.Id"]
    assert {r[0] for r in rows[1:]} == {"false"}
    second = await s.finished((await s.submit({**STATEFUL, "queries": [DELETED_QUERY]}))["id"])
    b2 = second["batches"][0]
    assert b2["full"] is False and b2["recordCount"] == 100
    _, inc = await s.download(b2["fileId"])
    inc_rows = table(inc)[1:]
    assert len(inc_rows) == 100
    assert sum(r[0] == "true" for r in inc_rows) == 20
    full_ids = {r[1] for r in rows[1:]}
    assert {r[1] for r in inc_rows} <= full_ids
    stamp = second["startTime"].replace(" ", "T")
    assert all(r[4] == stamp + "+0000" for r in inc_rows)  # UpdatedDate = this job's start
    # last completed job endpoint
    async with s.http.get(s.url("/v1/batch-query/jobs/partner/p1/project/proj"), headers=s.auth) as resp:
        assert (await resp.json())["id"] == second["id"]
    async with s.http.get(s.url("/v1/batch-query/jobs/partner/p1/project/other"), headers=s.auth) as resp:
        assert resp.status == 404
    # reuse of the previous queries when omitted
    third = await s.finished((await s.submit(STATEFUL))["id"])
    assert third["useLastCompletedJobQueries"] is True and third["batches"][0]["full"] is False
    # a changed query is a full load again
    changed = {**DELETED_QUERY, "query": "select Id, Name from Account"}
    fourth = await s.finished((await s.submit({**STATEFUL, "queries": [changed]}))["id"])
    assert fourth["batches"][0]["full"] is True and fourth["batches"][0]["recordCount"] == 2000


async def test_stateful_without_history_and_no_queries_is_90016(make_sim: SimFactory) -> None:
    s = await make_sim()
    assert (await s.submit({**STATEFUL, "project": "fresh"}))["errorCode"] == "90016"


async def test_partner_without_project_runs_stateless(make_sim: SimFactory) -> None:
    """REFERENCE.md §3.4: version 1.1/1.2 with partner or project null is a stateless job, not a refusal."""
    s = await make_sim()
    for _ in range(2):
        job = await s.submit({"version": "1.1", "partner": "lonely", "queries": [ACCOUNT_QUERY]})
        assert job["status"] == "submitted" and "errorCode" not in job
        done = await s.finished(job["id"])
        assert done["batches"][0]["full"] is True  # a full load each time: no session keeps its state
    assert not s.sim.sessions


async def test_same_session_runs_in_arrival_order(make_sim: SimFactory) -> None:
    s = await make_sim(SimulatorConfig(step_delay_s=0.01))
    a = await s.submit({**STATEFUL, "project": "serial", "queries": [ACCOUNT_QUERY]})
    b = await s.submit({**STATEFUL, "project": "serial", "queries": [ACCOUNT_QUERY]})
    other = await s.submit({**STATEFUL, "project": "other", "queries": [ACCOUNT_QUERY]})
    seen: list[tuple[str, str]] = []
    while not s.sim.jobs[b["id"]].finished:
        seen.append((s.sim.jobs[a["id"]].status, s.sim.jobs[b["id"]].status))
        await asyncio.sleep(0.005)
    assert all(sa in ("completed",) for sa, sb in seen if sb != "submitted")
    assert ("executing", "submitted") in seen or ("submitted", "submitted") in seen
    ja, jb = s.sim.jobs[a["id"]], s.sim.jobs[b["id"]]
    assert ja.finished_at is not None and jb.start_time is not None and jb.start_time >= ja.finished_at
    await s.sim.wait_job(other["id"])
    assert (await s.job(a["id"]))["batches"][0]["full"] is True
    assert (await s.job(b["id"]))["batches"][0]["full"] is False


async def test_segments_for_stateful_full_loads(make_sim: SimFactory) -> None:
    s = await make_sim(SimulatorConfig(step_delay_s=0, rows={"Account": 2500}, segment_records=1000))
    job = await s.finished((await s.submit({**STATEFUL, "project": "seg", "queries": [ACCOUNT_QUERY]}))["id"])
    batch = job["batches"][0]
    assert "fileId" not in batch and len(batch["segments"]) == 3 and batch["recordCount"] == 2500
    ids: list[str] = []
    for seg in batch["segments"]:
        _, data = await s.download(seg)
        rows = table(data)
        assert rows[0][0] == "Account.Id"
        ids += [r[0] for r in rows[1:]]
    assert len(ids) == len(set(ids)) == 2500
    stateless = await s.finished((await s.submit({"queries": [ACCOUNT_QUERY]}))["id"])
    assert "segments" not in stateless["batches"][0]


def _keys(body: dict[str, Any]) -> set[str]:
    return set(body)


async def test_cancel_keeps_finished_batches(make_sim: SimFactory) -> None:
    s = await make_sim(SimulatorConfig(step_delay_s=0.02))
    q2 = {"name": "Invoice", "query": "select Id from Invoice"}
    job = await s.submit({"queries": [ACCOUNT_QUERY, q2]})
    state = s.sim.jobs[job["id"]]
    while state.batches[0].status != "completed":  # noqa: ASYNC110 - polling in-process state, bounded by timeout
        await asyncio.sleep(0.005)
    s.sim.cancel(state)
    body = await s.job(job["id"])
    assert [b["status"] for b in body["batches"]] == ["completed", "cancelled"]
    assert "fileId" in body["batches"][0]
