"""Lost, late and duplicate callbacks, jobs stuck mid-way, and a submitter that dies mid-submit, with the reconciler
on: every job completes exactly once (one manifest, one completed event, the simulator's bytes), whatever the
callbacks do.

Checked on the data: S3 (objects and manifests), the subscriber queue, the ledger, the simulator's callback log.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from pipeline.app import METRICS_KEY
from pipeline.aqua.models import SubmitRequest
from pipeline.aqua.simulator import SimulatorConfig, file_digest
from pipeline.errors import AquaValidationError
from pipeline.ledger import JobLedger, JobState, LedgerItem
from pipeline.settings import Settings
from pipeline.submission import Resumed, Submitter
from pipeline.testing.moto import MotoServer
from pipeline.testing.stack import Stack, running_stack


def job(name: str) -> SubmitRequest:
    return SubmitRequest.model_validate(
        {
            "format": "csv",
            "version": "1.1",
            "name": name,
            "queries": [
                {"name": "Account", "type": "zoqlexport", "query": "select Id, Name from Account"},
                {"name": "Payment", "type": "zoqlexport", "query": "select * from Payment"},
            ],
        }
    )


def reconciling(
    *, grace_s: float = 1.0, stuck_s: float = 3.0, submit_s: float = 1.0, token_callbacks_at: str | None = None
) -> Callable[[Settings], Settings]:
    """A reconciler that runs every 0.5 s; a short work visibility so redelivered messages come back fast;
    token callbacks checked where ``token_callbacks_at`` says (default: the settings' default)."""

    def tweak(s: Settings) -> Settings:
        ledger = s.ledger.model_copy(update={"token_callbacks_at": token_callbacks_at or s.ledger.token_callbacks_at})
        return s.model_copy(
            update={
                "ledger": ledger,
                "reconciler": s.reconciler.model_copy(
                    update={
                        "interval_s": 0.5,
                        "callback_grace_s": grace_s,
                        "stuck_after_s": stuck_s,
                        "submit_grace_s": submit_s,
                    }
                ),
                "queue": s.queue.model_copy(update={"visibility_timeout_s": 5, "wait_time_s": 1}),
            }
        )

    return tweak


def sim_config() -> SimulatorConfig:
    return SimulatorConfig(rows={"Account": 600, "Payment": 400}, step_delay_s=0.01)


def reconciled(stack: Stack, why: str, *, metric: str = "aqua_reconciled_jobs_total", label: str = "why") -> float:
    """``aqua_reconciled_jobs_total{why=...}`` (or another labelled counter) from the service's metrics."""
    assert stack.app is not None
    text = stack.app[METRICS_KEY].render().decode()
    m = re.search(rf'^{metric}\{{{label}="{why}"\}} (\S+)$', text, re.MULTILINE)
    return float(m[1]) if m else 0.0


async def all_keys(stack: Stack) -> list[str]:
    listed = await stack.clients.s3.list_objects_v2(Bucket=stack.settings.s3.bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


async def assert_each_landed_once(stack: Stack, items: list[LedgerItem]) -> list[str]:
    """Every job published with its own manifest and exactly the simulator's bytes; one event per job; no other
    object in the bucket. Returns the bucket's keys."""
    expected_keys: list[str] = []
    for item in items:
        assert item.state == JobState.published, item
        assert item.manifest_key
        manifest = await stack.components.manifests.load(item.manifest_key)
        assert manifest.job_id == item.job_id
        for obj in manifest.objects:
            size, sha, records = await file_digest(stack.sim, obj.file_id)
            data = await stack.object_bytes(obj.key)
            assert (len(data), hashlib.sha256(data).hexdigest(), obj.record_count) == (size, sha, records)
        expected_keys += [o.key for o in manifest.objects] + [item.manifest_key]
    events = await stack.drain_events()
    assert sorted((e["type"], e["data"]["job_id"]) for e in events) == sorted(
        ("com.zuora.aqua.export.completed", i.job_id) for i in items
    )
    keys = await all_keys(stack)
    assert keys == sorted(expected_keys)
    return keys


LATE_ANSWERS = {"receiver": (200, {"already": "published"}), "worker": (202, {})}
"""What a callback for a job already published is answered, by where token callbacks are checked: the receiver
looks in the ledger first; with ``worker`` the receiver only enqueues it and the worker drops it."""


@pytest.mark.parametrize("at", sorted(LATE_ANSWERS))
async def test_lost_callbacks_are_reconciled_and_each_job_lands_once(moto_server: MotoServer, at: str) -> None:
    async with running_stack(
        moto_server.url, sim_config=sim_config(), tweak=reconciling(token_callbacks_at=at), run_reconciler=True
    ) as stack:
        stack.sim.faults.lose_callbacks = True
        submitted = [await stack.submit(job(f"lost{i}")) for i in range(3)]
        items = await asyncio.gather(*(stack.wait_final(s.job.id or "", timeout_s=25) for s in submitted))
        await stack.sim.settle_callbacks()
        lost = {e["job_id"] for e in stack.sim.callback_log if e["kind"] == "lost"}
        assert lost == {s.job.id for s in submitted}  # not one callback reached the service
        assert all(i.callback_count == 0 for i in items)
        keys = await assert_each_landed_once(stack, list(items))
        assert reconciled(stack, "lost_callback") == 3
        # The callback finally turns up after completion (a very late delivery): acknowledged, nothing new.
        want_status, want_body = LATE_ANSWERS[at]
        async with aiohttp.ClientSession() as http:
            url = submitted[0].notify_url.replace("${JOBID}", submitted[0].job.id or "")
            async with http.get(url.replace("${STATUS}", "Completed")) as resp:
                assert resp.status == want_status
                assert (await resp.json()).items() >= want_body.items()
        await asyncio.sleep(1.5)  # two reconciler rounds and a worker poll: nothing may happen now
        assert await stack.drain_events() == []
        assert await all_keys(stack) == keys
        assert await stack.components.queue.depth() == 0
        after = await stack.components.ledger.get(submitted[0].job.id or "")
        assert after is not None and (after.state, after.event_id) == (JobState.published, items[0].event_id)


@pytest.mark.parametrize("at", sorted(LATE_ANSWERS))
async def test_late_callback_after_reconciled_completion_changes_nothing(moto_server: MotoServer, at: str) -> None:
    async with running_stack(
        moto_server.url, sim_config=sim_config(), tweak=reconciling(token_callbacks_at=at), run_reconciler=True
    ) as stack:
        stack.sim.faults.callback_delay_s = 4.0  # far past callback_grace_s = 1 s
        submitted = await stack.submit(job("late"))
        job_id = submitted.job.id or ""
        item = await stack.wait_final(job_id, timeout_s=25)
        assert item.callback_count == 0  # the reconciler landed it before the callback came
        keys = await assert_each_landed_once(stack, [item])
        await stack.sim.settle_callbacks()
        delivered = [e for e in stack.sim.callback_log if e["job_id"] == job_id]
        assert [(e["kind"], e["status"]) for e in delivered] == [("notifyUrl", LATE_ANSWERS[at][0])]
        await asyncio.sleep(1.5)  # with "worker", the worker takes the message, counts the callback, drops it
        after = await stack.components.ledger.get(job_id)
        assert after is not None
        assert (after.state, after.event_id, after.callback_count) == (JobState.published, item.event_id, 1)
        assert await stack.components.queue.depth() == 0
        assert await stack.drain_events() == []
        assert await all_keys(stack) == keys


async def test_duplicate_callbacks_land_once(moto_server: MotoServer) -> None:
    async with running_stack(
        moto_server.url, sim_config=sim_config(), tweak=reconciling(), run_reconciler=True
    ) as stack:
        stack.sim.faults.duplicate_callbacks = 3
        submitted = await stack.submit(job("dup"))
        job_id = submitted.job.id or ""
        item = await stack.wait_final(job_id, timeout_s=25)
        await stack.sim.settle_callbacks()
        delivered = [e["status"] for e in stack.sim.callback_log if e["job_id"] == job_id]
        assert len(delivered) == 4 and all(s in (200, 202) for s in delivered), delivered
        await stack.wait_drained(timeout_s=30)  # every duplicate work message handled, not just hidden for later
        item = await stack.wait_final(job_id)
        await assert_each_landed_once(stack, [item])


async def test_job_abandoned_mid_transfer_is_redriven(moto_server: MotoServer) -> None:
    """A worker took the lease, moved the job to ``transferring`` and died: the reconciler re-drives it once the
    job has been stuck for ``stuck_after_s`` and the lease has run out."""
    tweak = reconciling(grace_s=600, stuck_s=1.0)  # only the stuck path may act
    async with running_stack(moto_server.url, sim_config=sim_config(), tweak=tweak, run_reconciler=True) as stack:
        stack.sim.faults.lose_callbacks = True
        submitted = await stack.submit(job("stuck"))
        job_id = submitted.job.id or ""
        await stack.components.aqua.wait_for_job(job_id, poll_interval_s=0.02, timeout_s=20)
        ledger = stack.components.ledger
        assert await ledger.claim(job_id, "dead-worker", lease_s=1.0) is not None
        await ledger.mark_transferring(job_id, "dead-worker")
        item = await stack.wait_final(job_id, timeout_s=25)
        assert item.lease_owner is None
        assert item.attempts >= 2  # the dead worker's claim and the one that finished
        assert reconciled(stack, "stuck") >= 1
        assert reconciled(stack, "lost_callback") == 0
        await assert_each_landed_once(stack, [item])


@pytest.mark.slow
async def test_many_jobs_with_lost_late_and_duplicate_callbacks(moto_server: MotoServer) -> None:
    async with running_stack(
        moto_server.url, sim_config=sim_config(), tweak=reconciling(), run_reconciler=True
    ) as stack:
        submitted = []
        for i, (lose, delay, dup) in enumerate([(True, 0, 0), (False, 3, 0), (False, 0, 2)] * 4):
            f = stack.sim.faults
            f.lose_callbacks, f.callback_delay_s, f.duplicate_callbacks = lose, delay, dup
            submitted.append(await stack.submit(job(f"mix{i}")))
            await stack.components.aqua.wait_for_job(submitted[-1].job.id or "", poll_interval_s=0.02, timeout_s=20)
        items = await asyncio.gather(*(stack.wait_final(s.job.id or "", timeout_s=60) for s in submitted))
        await stack.sim.settle_callbacks()
        await asyncio.sleep(2)
        items = await asyncio.gather(*(stack.wait_final(s.job.id or "") for s in submitted))
        await assert_each_landed_once(stack, list(items))


class SubmitterDied(BaseException):
    """The submitting process dies (killed, out of memory): no ``except Exception`` of ours runs."""


class DiesOnRecording:
    """The service's ledger, except that the process dies when the submitter goes to record the job AQuA made."""

    def __init__(self, ledger: JobLedger) -> None:
        self._ledger = ledger

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    async def record_submission(self, job_id: str, **_: Any) -> None:
        raise SubmitterDied(job_id)


async def test_a_submitter_that_dies_once_aqua_has_the_job_loses_nothing(moto_server: MotoServer) -> None:
    """Its callback lost too: only the submission written down before the submit can land this job. The reconciler
    sends it again with the same Idempotency-Key, AQuA answers with the job it made (no second job), and the job
    lands once."""
    async with running_stack(
        moto_server.url, sim_config=sim_config(), tweak=reconciling(), run_reconciler=True
    ) as stack:
        stack.sim.faults.lose_callbacks = True
        c = stack.components
        dying = Submitter(aqua=c.aqua, ledger=DiesOnRecording(c.ledger), signer=c.signer, http=stack.settings.http)  # type: ignore[arg-type]
        with pytest.raises(SubmitterDied) as died:
            await dying.submit(job("orphan"))
        job_id = str(died.value)
        assert job_id in stack.sim.jobs and await c.ledger.get(job_id) is None  # AQuA has it, the ledger does not
        item = await stack.wait_final(job_id, timeout_s=25)
        assert list(stack.sim.jobs) == [job_id]  # sent again under the same key: the same job, not a second one
        assert item.job_name == "orphan" and item.callback_count == 0
        await assert_each_landed_once(stack, [item])
        assert reconciled(stack, "recorded", metric="aqua_resumed_submissions_total", label="outcome") == 1
        assert reconciled(stack, "lost_callback") == 1
        assert await c.ledger.find_pending_submissions(0.001) == []


async def test_a_submit_the_caller_saw_fail_is_not_sent_again(moto_server: MotoServer) -> None:
    """AQuA refused it (a query it cannot parse): the caller has the error and owns the retry; the reconciler
    must not send it behind the caller's back."""
    async with running_stack(
        moto_server.url, sim_config=sim_config(), tweak=reconciling(submit_s=0.1), run_reconciler=True
    ) as stack:
        bad = job("refused").model_copy(update={"format": "xlsx"})
        with pytest.raises(AquaValidationError):
            await stack.submit(bad)
        assert await stack.components.ledger.find_pending_submissions(0.001) == []
        await asyncio.sleep(1.5)  # three reconciler rounds
        for outcome in Resumed:  # not sent again: no resume of any outcome (a resend would be refused again)
            assert reconciled(stack, outcome.value, metric="aqua_resumed_submissions_total", label="outcome") == 0
