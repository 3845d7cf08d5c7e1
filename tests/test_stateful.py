"""Stateful sessions: one (partner, project) lands one job at a time; full then incremental loads are
marked in the manifest and the event; the session's last completed job is recorded in the ledger."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from pipeline.aqua.models import SubmitRequest
from pipeline.aqua.simulator import SimulatorConfig
from pipeline.errors import AquaUnavailable, StorageError
from pipeline.ledger import JobState
from pipeline.processor import Outcome, start_instant
from pipeline.testing.moto import MotoServer
from pipeline.testing.stack import running_stack


def stateful(project: str, *, queries: bool = True) -> SubmitRequest:
    body: dict[str, Any] = {
        "format": "csv",
        "version": "1.1",
        "name": "warehouse",
        "partner": "examplepartner",
        "project": project,
        "useQueryLabels": True,
    }
    if queries:
        body["queries"] = [
            {
                "name": "Account",
                "type": "zoqlexport",
                "query": "select Id, Name, UpdatedDate from Account",
                "deleted": {"column": "IsDeleted", "format": "Boolean"},
            }
        ]
    else:
        body["useLastCompletedJobQueries"] = True
    return SubmitRequest.model_validate(body)


async def test_two_jobs_of_one_session_never_land_at_once(moto_server: MotoServer) -> None:
    cfg = SimulatorConfig(rows={"Account": 4000}, step_delay_s=0.02)
    # moto does not make racing conditional writes atomic (real DynamoDB does): serialize DynamoDB calls.
    async with running_stack(moto_server.url, sim_config=cfg, atomic_dynamodb=True) as stack:
        stack.sim.faults.lose_callbacks = True
        c = stack.components
        active: set[str] = set()
        overlap: list[set[str]] = []
        original = c.transfer.store

        async def tracking_store(source: Any, spec: Any) -> Any:
            job_id = spec.metadata["aqua-job-id"]
            active.add(job_id)
            if len(active) > 1:
                overlap.append(set(active))
            try:
                await asyncio.sleep(0.2)  # widen the window in which a second job could sneak in
                return await original(source, spec)
            finally:
                active.discard(job_id)

        c.transfer.store = tracking_store  # type: ignore[method-assign]
        first = await stack.submit(stateful("proj-a"))
        second = await stack.submit(stateful("proj-a", queries=False))
        ids = [first.job.id or "", second.job.id or ""]
        for job_id in ids:
            await c.aqua.wait_for_job(job_id, poll_interval_s=0.05, timeout_s=30)
        # Both callbacks at once: two workers race for the same session.
        async with aiohttp.ClientSession() as http:

            async def call(sub: Any, job_id: str) -> int:
                url = sub.notify_url.replace("${JOBID}", job_id).replace("${STATUS}", "Completed")
                for _ in range(5):  # a 503 (AWS briefly unavailable) asks the caller to retry, as Zuora would
                    async with http.get(url) as resp:
                        if resp.status != 503:
                            return resp.status
                    await asyncio.sleep(0.5)
                return 503

            statuses = await asyncio.gather(call(first, ids[0]), call(second, ids[1]))
            assert statuses == [202, 202], statuses
        items = [await stack.wait_final(job_id, timeout_s=60) for job_id in ids]
        assert [i.state for i in items] == [JobState.published, JobState.published]
        assert overlap == []
        manifests = [await c.manifests.load(i.manifest_key or "") for i in items]
        assert [m.stateful for m in manifests] == [True, True]
        assert [m.objects[0].full for m in manifests] == [True, False]
        assert all(m.objects[0].deleted_column == "IsDeleted" for m in manifests)
        assert manifests[1].record_count < manifests[0].record_count
        await stack.wait_drained()  # a job is marked published before it lets go of the session
        session = await c.ledger.get_session("examplepartner", "proj-a")
        assert session is not None and session.holder_job_id is None, (ids, session)
        assert session.last_job_id in ids
        events = await stack.drain_events()
        assert sorted(e["data"]["job_id"] for e in events) == sorted(ids)
        assert all(e["data"]["objects"][0]["full"] is not None for e in events)


async def test_session_held_by_a_finished_job_is_taken_over(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url) as stack:
        c = stack.components
        # A job that crashed while holding the session and has since failed for good.
        await c.ledger.acquire_session("examplepartner", "proj-b", "f" * 32)
        await c.ledger.record_submission("f" * 32, submission_id=None, job_name="x", partner=None, project=None)
        assert await c.ledger.claim("f" * 32, "crashed", 60) is not None
        await c.ledger.mark_failed("f" * 32, "crashed", reason="boom", message="boom", event_id="e")
        submitted = await stack.submit(stateful("proj-b"))
        item = await stack.wait_final(submitted.job.id or "", timeout_s=30)
        assert item.state == JobState.published


async def test_a_session_that_cannot_be_closed_does_not_unpublish_the_job(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event is out and the ledger says published when closing the session fails: the job is published (not
    retried as if it were not), and the next job of the session takes the session over."""
    from pipeline.errors import LedgerError
    from pipeline.processor import Outcome

    async with running_stack(moto_server.url, run_worker=False) as stack:
        stack.sim.faults.lose_callbacks = True
        c = stack.components
        job_id = (await stack.submit(stateful("proj-c"))).job.id or ""
        await c.aqua.wait_for_job(job_id, poll_interval_s=0.02, timeout_s=20)

        async def throttled(*_: Any, **__: Any) -> None:
            raise LedgerError("dynamodb update_item failed: ProvisionedThroughputExceededException")

        monkeypatch.setattr(c.ledger, "release_session", throttled)
        result = await c.processor.process(job_id, owner="w1", lease_s=30, final_attempt=False)
        assert result.outcome is Outcome.PUBLISHED
        monkeypatch.undo()
        second = (await stack.submit(stateful("proj-c"))).job.id or ""
        await c.aqua.wait_for_job(second, poll_interval_s=0.02, timeout_s=20)
        assert (
            await c.processor.process(second, owner="w2", lease_s=30, final_attempt=False)
        ).outcome is Outcome.PUBLISHED
        assert len(await stack.drain_events()) == 2


async def two_finished_jobs(stack: Any, project: str) -> tuple[str, str]:
    """A (a full load) and B (an increment on it), submitted in that order to one session, both finished in AQuA
    (callbacks lost: the test drives the processor itself)."""
    stack.sim.faults.lose_callbacks = True
    a = (await stack.submit(stateful(project))).job.id or ""
    b = (await stack.submit(stateful(project, queries=False))).job.id or ""
    for job_id in (a, b):
        await stack.components.aqua.wait_for_job(job_id, poll_interval_s=0.02, timeout_s=30)
    return a, b


async def test_the_jobs_of_a_session_land_in_the_order_aqua_ran_them(moto_server: MotoServer) -> None:
    """A (the full load) and B (an increment on it) both finished in AQuA. A's first attempt meets a transient
    AQuA error; B must not land meanwhile (a consumer applying the events in order would put A's older full load
    over B's changes): it waits, A lands, then B."""
    async with running_stack(moto_server.url, run_worker=False) as stack:
        c = stack.components
        a, b = await two_finished_jobs(stack, "in-order")
        session = await c.ledger.get_session("examplepartner", "in-order")
        assert session is not None and list(session.pending) == [a, b]

        real = c.aqua.get_job
        fails = [AquaUnavailable("AQuA answered 502")]

        async def flaky(job_id: str, **kw: Any) -> Any:
            if job_id == a and fails:
                raise fails.pop()
            return await real(job_id, **kw)

        c.aqua.get_job = flaky  # type: ignore[method-assign]
        outcomes = [(await c.processor.process(j, owner=w, lease_s=30, final_attempt=False)).outcome
                    for j, w in ((a, "w1"), (b, "w2"), (a, "w3"), (b, "w4"))]  # fmt: skip
        assert outcomes == [Outcome.RETRY, Outcome.BUSY, Outcome.PUBLISHED, Outcome.PUBLISHED]
        events = await stack.drain_events()
        assert [e["data"]["job_id"] for e in events] == [a, b]
        session = await c.ledger.get_session("examplepartner", "in-order")
        assert session is not None and session.pending == {} and session.last_job_id == b


async def test_an_earlier_job_that_ended_unseen_does_not_block_the_session(moto_server: MotoServer) -> None:
    """The line keeps a job that ended without taking itself out (a crash just after it landed, an expired
    ledger item): the next job finds it done, or gone, and takes it out instead of waiting for ever."""
    async with running_stack(moto_server.url, run_worker=False) as stack:
        c = stack.components
        stack.sim.faults.lose_callbacks = True
        b = (await stack.submit(stateful("stale-line"))).job.id or ""
        await c.aqua.wait_for_job(b, poll_interval_s=0.02, timeout_s=30)
        await c.ledger.add_session_job("examplepartner", "stale-line", "f" * 32, 1.0)  # earlier, not in the ledger
        result = await c.processor.process(b, owner="w1", lease_s=30, final_attempt=False)
        assert result.outcome is Outcome.PUBLISHED
        session = await c.ledger.get_session("examplepartner", "stale-line")
        assert session is not None and session.pending == {}


async def test_the_session_holder_lands_even_if_an_earlier_job_joins_the_line_late(moto_server: MotoServer) -> None:
    """A ran first in AQuA, but joined the line only after B took the session (A's submit was finished late, by
    the reconciler, after its submitter died); B then met a retryable S3 error. B, holding the session, must not
    wait for A, which waits for the session: each would wait for the other until the DLQ."""
    async with running_stack(moto_server.url, run_worker=False) as stack:
        c = stack.components
        a, b = await two_finished_jobs(stack, "late-line")
        session = await c.ledger.get_session("examplepartner", "late-line")
        assert session is not None
        submitted_a = session.pending[a]
        await c.ledger.remove_session_job("examplepartner", "late-line", a)  # not recorded yet

        real = c.transfer.store
        fails = [StorageError("S3 answered 503")]

        async def flaky(source: Any, spec: Any) -> Any:
            if fails:
                raise fails.pop()
            return await real(source, spec)

        c.transfer.store = flaky  # type: ignore[method-assign]
        assert (await c.processor.process(b, owner="w1", lease_s=30, final_attempt=False)).outcome is Outcome.RETRY
        session = await c.ledger.get_session("examplepartner", "late-line")
        assert session is not None and session.holder_job_id == b
        await c.ledger.add_session_job("examplepartner", "late-line", a, submitted_a)  # the late record
        outcomes = [(await c.processor.process(j, owner=w, lease_s=30, final_attempt=False)).outcome
                    for j, w in ((a, "w2"), (b, "w3"), (a, "w4"))]  # fmt: skip
        assert outcomes == [Outcome.BUSY, Outcome.PUBLISHED, Outcome.PUBLISHED]
        session = await c.ledger.get_session("examplepartner", "late-line")
        assert session is not None and session.pending == {} and session.holder_job_id is None


async def test_an_earlier_submit_that_aqua_runs_later_does_not_hold_up_the_line(moto_server: MotoServer) -> None:
    """Submit times are ours (two replicas' clocks, a submit slowed by retries); the run order is AQuA's. C has an
    earlier submit time than B in the line, but AQuA got it later and runs it after B: B lands without waiting."""
    async with running_stack(moto_server.url, run_worker=False) as stack:
        stack.sim.faults.lose_callbacks = True
        c = stack.components
        b = (await stack.submit(stateful("skew"))).job.id or ""
        await c.aqua.wait_for_job(b, poll_interval_s=0.02, timeout_s=30)
        stack.sim.config.step_delay_s = 5  # C stays queued or running in AQuA for the rest of the test
        later = (await stack.submit(stateful("skew", queries=False))).job.id or ""
        session = await c.ledger.get_session("examplepartner", "skew")
        assert session is not None
        await c.ledger.remove_session_job("examplepartner", "skew", later)
        await c.ledger.add_session_job("examplepartner", "skew", later, session.pending[b] - 5)
        assert (await c.processor.process(b, owner="w1", lease_s=30, final_attempt=False)).outcome is Outcome.PUBLISHED
        session = await c.ledger.get_session("examplepartner", "skew")
        assert session is not None and list(session.pending) == [later]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2014-09-03 08:20:07", datetime(2014, 9, 3, 8, 20, 7)),
        ("2021-01-18T17:13:48+0000", datetime(2021, 1, 18, 17, 13, 48, tzinfo=UTC)),
        ("2021-01-18T17:13:48", datetime(2021, 1, 18, 17, 13, 48)),
        (None, None),
        ("", None),
        ("yesterday", None),
    ],
)
def test_start_instant_reads_both_forms_of_aquas_start_time(value: str | None, expected: datetime | None) -> None:
    assert start_instant(value) == expected
