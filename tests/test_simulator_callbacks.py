"""Simulator completion notifications: notifyUrl GET/POST, UI callout with Basic auth and retries, faults."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer

from pipeline.aqua.simulator import SimulatorConfig, UiCalloutConfig
from tests.test_simulator import ACCOUNT_QUERY, Sim, make_sim

__all__ = ["make_sim"]

SimFactory = Callable[..., Awaitable[Sim]]
ServerFactory = Callable[..., Awaitable[TestServer]]


@dataclass
class Seen:
    method: str
    path_qs: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A tiny callback receiver; ``answers`` are the statuses to return, in order (then 200)."""

    answers: list[int] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.method, request.path_qs, dict(request.query), dict(request.headers),
                              await request.read()))  # fmt: skip
        async with self.arrived:
            self.arrived.notify_all()
        status = self.answers.pop(0) if self.answers else 200
        headers = {"WWW-Authenticate": 'Basic realm="hooks"'} if status == 401 else None
        return web.Response(status=status, headers=headers)

    async def wait_for(self, n: int) -> list[Seen]:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.seen) >= n), 10)
        return self.seen

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))


async def receiver(aiohttp_server: ServerFactory, answers: list[int] | None = None) -> Receiver:
    rec = Receiver(answers=list(answers or []))
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    rec.server = await aiohttp_server(app)
    return rec


async def test_notify_url_get_with_placeholders(make_sim: SimFactory, aiohttp_server: ServerFactory) -> None:
    rec = await receiver(aiohttp_server)
    s = await make_sim()
    job = await s.submit({"queries": [ACCOUNT_QUERY], "notifyUrl": rec.url("/hook?jobId=${JOBID}&status=${STATUS}")})
    (seen,) = await rec.wait_for(1)
    assert seen.method == "GET" and seen.query == {"jobId": job["id"], "status": "Completed"}
    assert len(seen.headers["Zuora-Request-Id"]) == 32
    await asyncio.sleep(0)
    log = s.sim.callback_log
    assert log[0]["status"] == 200 and log[0]["method"] == "GET" and log[0]["job_id"] == job["id"]


async def test_notify_url_post_lowercase_and_aborted(make_sim: SimFactory, aiohttp_server: ServerFactory) -> None:
    rec = await receiver(aiohttp_server)
    s = await make_sim(SimulatorConfig(step_delay_s=0, callback_method="POST", callback_status_style="lower"))
    s.sim.faults.abort_batches = True
    job = await s.submit({"queries": [ACCOUNT_QUERY], "notifyUrl": rec.url("/hook/${JOBID}/${STATUS}")})
    (seen,) = await rec.wait_for(1)
    assert seen.method == "POST" and seen.path_qs == f"/hook/{job['id']}/aborted"


async def test_cancelled_job_notifies(make_sim: SimFactory, aiohttp_server: ServerFactory) -> None:
    rec = await receiver(aiohttp_server)
    s = await make_sim(SimulatorConfig(step_delay_s=30))
    job = await s.submit({"queries": [ACCOUNT_QUERY], "notifyUrl": rec.url("/h?s=${STATUS}")})
    async with s.http.delete(s.url(f"/v1/batch-query/jobs/{job['id']}"), headers=s.auth) as resp:
        assert resp.status == 200
    (seen,) = await rec.wait_for(1)
    assert seen.query == {"s": "Cancelled"}


async def test_duplicate_delayed_and_lost_callbacks(make_sim: SimFactory, aiohttp_server: ServerFactory) -> None:
    rec = await receiver(aiohttp_server)
    s = await make_sim()
    s.sim.faults.duplicate_callbacks = 2
    s.sim.faults.callback_delay_s = 0.01
    await s.submit({"queries": [ACCOUNT_QUERY], "notifyUrl": rec.url("/h?j=${JOBID}")})
    seen = await rec.wait_for(3)
    assert len({x.path_qs for x in seen}) == 1
    s.sim.faults.duplicate_callbacks = 0
    s.sim.faults.lose_callbacks = True
    lost = await s.submit({"queries": [ACCOUNT_QUERY], "notifyUrl": rec.url("/h?j=${JOBID}")})
    await s.sim.wait_job(lost["id"])
    await s.sim.settle_callbacks()
    assert [e["kind"] for e in s.sim.callback_log if e["job_id"] == lost["id"]] == ["lost"]
    assert len(rec.seen) == 3
    async with s.http.get(s.url("/_sim/callbacks")) as resp:
        assert len(await resp.json()) == 4


async def test_ui_callout_challenge_first_basic_auth_and_retries(
    make_sim: SimFactory, aiohttp_server: ServerFactory
) -> None:
    rec = await receiver(aiohttp_server, answers=[401, 500, 401, 200])
    callout = UiCalloutConfig(url=rec.url("/callout"), method="POST", user="u", password="p", retry_interval_s=0)
    s = await make_sim(SimulatorConfig(step_delay_s=0, ui_callout=callout))
    job = await s.submit({"partner": "acme", "version": "1.1", "project": "x", "queries": [ACCOUNT_QUERY],
                          "notifyUrl": rec.url("/ignored?${JOBID}")})  # fmt: skip
    seen = await rec.wait_for(4)
    assert all(x.path_qs == "/callout" for x in seen)
    assert ["Authorization" in x.headers for x in seen] == [False, True, False, True]
    assert seen[1].headers["Authorization"] == "Basic dTpw"
    assert len({x.headers["Zuora-Notification-Id"] for x in seen}) == 1
    assert len({x.headers["Zuora-Request-Id"] for x in seen}) == 4
    import orjson

    fields = orjson.loads(seen[3].body)
    assert fields["Aqua.JobId"] == job["id"] and fields["Aqua.JobStatus"] == "Completed"
    assert fields["Aqua.PartnerName"] == "acme" and fields["Event.Category"] and fields["Event.Timestamp"]


async def test_ui_callout_get_preemptive_gives_up_after_max_attempts(
    make_sim: SimFactory, aiohttp_server: ServerFactory
) -> None:
    rec = await receiver(aiohttp_server, answers=[503, 503, 503, 503])
    callout = UiCalloutConfig(url=rec.url("/c"), method="GET", user="u", password="p", preemptive=True,
                              max_attempts=3, retry_interval_s=0)  # fmt: skip
    s = await make_sim(SimulatorConfig(step_delay_s=0, ui_callout=callout))
    job = await s.submit({"queries": [ACCOUNT_QUERY]})
    seen = await rec.wait_for(3)
    await s.sim.wait_job(job["id"])
    await s.sim.settle_callbacks()
    assert len(rec.seen) == 3 and all("Authorization" in x.headers for x in seen)
    assert seen[0].query["Aqua.JobId"] == job["id"] and seen[0].query["Aqua.PartnerName"] == ""
    assert [e["attempt"] for e in s.sim.callback_log] == [1, 2, 3]
