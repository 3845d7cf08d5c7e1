"""The token callback's fast path through the real service route, over loopback HTTP, on the moto server, with
the ledger check in the receiver (``LEDGER__TOKEN_CALLBACKS_AT=receiver``; the worker runs the same path for the
default, ``worker``: test_callback_deferred.py).

A callback whose token belongs to the job our submitter recorded costs one DynamoDB call (a conditional
UpdateItem); every other token callback falls back to the general path (bind the token's submission first come,
then count), whose answers are unchanged. DynamoDB calls are counted on the service's own client with a
botocore ``before-call`` hook, so a fallback that ran would show up as extra calls.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp

from pipeline.ledger import JobState
from pipeline.testing.moto import MotoServer
from pipeline.testing.stack import Stack, running_stack
from pipeline.tokens import new_submission_id
from tests.test_callback_security import (
    call,
    callback_counts,
    callback_url,
    ledger_first,
    sim,
    submit_quietly,
    token_of,
    two_quiet_jobs,
)


@contextmanager
def dynamodb_calls(stack: Stack) -> Iterator[list[str]]:
    """The names of the DynamoDB operations the service's client makes inside the block."""
    ops: list[str] = []
    events = stack.components.aws.dynamodb.meta.events
    unique_id = f"count-{uuid.uuid4().hex}"

    def count(model: Any, **_: Any) -> None:
        ops.append(model.name)

    events.register("before-call.dynamodb", count, unique_id=unique_id)
    try:
        yield ops
    finally:
        events.unregister("before-call.dynamodb", unique_id=unique_id)


async def test_submitted_jobs_callback_is_one_update_and_duplicates_are_still_caught(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, sim_config=sim(), tweak=ledger_first(), run_worker=False) as stack:
        stack.sim.faults.lose_callbacks = True
        a = await submit_quietly(stack, "fast")
        job_a, tok_a = a.job.id or "", token_of(a)
        url = callback_url(stack, job_a, tok_a)
        async with aiohttp.ClientSession() as http:
            with dynamodb_calls(stack) as ops:
                status, body = await call(http, "GET", url)
            assert (status, body) == (202, {"accepted": True, "job_id": job_a})
            assert ops == ["UpdateItem"]  # no bind_submission, no second UpdateItem
            nid = {"Zuora-Notification-Id": "notif-1"}
            with dynamodb_calls(stack) as ops:
                status, _ = await call(http, "GET", url, headers=nid)
            assert status == 202 and ops == ["UpdateItem"]
            with dynamodb_calls(stack) as ops:
                status, body = await call(http, "GET", url, headers=nid)  # Zuora re-delivers the same notification
            assert (status, body["duplicate"]) == (200, True)
            assert ops == ["UpdateItem"]
            counts = await callback_counts(http, stack)
        assert (counts["accepted"], counts["duplicate"]) == (2, 1)
        assert await stack.components.queue.depth() == 2  # the duplicate was not enqueued
        item = await stack.components.ledger.get(job_a)
        assert item is not None
        assert (item.state, item.callback_count, item.notification_ids, item.submission_id) == (
            JobState.notified,
            3,
            {"notif-1"},
            a.submission_id,
        )


async def test_other_token_callbacks_take_the_general_path(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, sim_config=sim(), tweak=ledger_first(), run_worker=False) as stack:
        c = stack.components
        a, b = await two_quiet_jobs(stack)
        job_a, job_b = a.job.id or "", b.job.id or ""
        async with aiohttp.ClientSession() as http:
            # a token whose submission is recorded on another job: refused, nothing counted or enqueued
            with dynamodb_calls(stack) as ops:
                status, body = await call(http, "GET", callback_url(stack, job_b, token_of(a)))
            assert (status, body["error"]) == (403, "token_job_mismatch")
            assert ops == ["UpdateItem", "UpdateItem"]  # fast path declined, bind refused
            item_b = await c.ledger.get(job_b)
            assert item_b is not None and item_b.state is JobState.submitted and item_b.callback_count == 0

            # a job already published, called back with its own token: 200 already-done, not enqueued
            assert await c.ledger.claim(job_b, "w1", 30)
            await c.ledger.mark_stored(job_b, "w1", manifest_key="k.json", record_count=0, total_bytes=0)
            await c.ledger.mark_published(job_b, "w1", event_id="ev-1")
            with dynamodb_calls(stack) as ops:
                status, body = await call(http, "GET", callback_url(stack, job_b, token_of(b)))
            assert (status, body) == (200, {"accepted": True, "already": "published", "job_id": job_b})
            assert len(ops) == 4  # fast path declined, bind, record_callback's two UpdateItems

            # the callback outran the submitter's ledger write: accepted, and the token is now bound to it
            sid, racing = new_submission_id(), uuid.uuid4().hex
            token = c.signer.issue(sid).token
            with dynamodb_calls(stack) as ops:
                status, body = await call(http, "GET", callback_url(stack, racing, token))
            assert (status, body) == (202, {"accepted": True, "job_id": racing})
            assert ops == ["UpdateItem"] * 3  # fast path declined, bind, record_callback
            status, body = await call(http, "GET", callback_url(stack, uuid.uuid4().hex, token))
            assert (status, body["error"]) == (403, "token_job_mismatch")
            # the submitter's write lands late; the job's next callback takes the fast path
            await c.ledger.record_submission(racing, submission_id=sid, job_name="late", partner=None, project=None)
            await c.ledger.bind_submission(sid, racing)
            with dynamodb_calls(stack) as ops:
                status, _ = await call(http, "GET", callback_url(stack, racing, token))
            assert status == 202 and ops == ["UpdateItem"]
            counts = await callback_counts(http, stack)
        assert (counts["token_job_mismatch"], counts["already_done"], counts["accepted"]) == (2, 1, 2)
        assert await c.queue.depth() == 2
        item = await c.ledger.get(racing)
        assert item is not None
        assert (item.state, item.callback_count, item.submission_id) == (JobState.notified, 2, sid)
        item_a = await c.ledger.get(job_a)
        assert item_a is not None and item_a.callback_count == 0


async def test_concurrent_token_callbacks_share_ledger_transactions(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, sim_config=sim(), tweak=ledger_first(), run_worker=False) as stack:
        c = stack.components
        jobs: list[tuple[str, str]] = []
        for _ in range(30):  # recorded as the submitter records them
            job_id, sid = uuid.uuid4().hex, new_submission_id()
            await c.ledger.record_submission(job_id, submission_id=sid, job_name="n", partner=None, project=None)
            await c.ledger.bind_submission(sid, job_id)
            jobs.append((job_id, c.signer.issue(sid).token))
        async with aiohttp.ClientSession() as http:
            with dynamodb_calls(stack) as ops:
                answers = await asyncio.gather(*(call(http, "GET", callback_url(stack, j, t)) for j, t in jobs))
        assert answers == [(202, {"accepted": True, "job_id": j}) for j, _ in jobs]
        assert "TransactWriteItems" in ops and len(ops) < len(jobs)  # callbacks that overlapped went together
        assert set(ops) <= {"UpdateItem", "TransactWriteItems"}  # no general-path fallback
        assert await c.queue.depth() == len(jobs)
        for job_id, _ in jobs:
            item = await c.ledger.get(job_id)
            assert item is not None and (item.state, item.callback_count) == (JobState.notified, 1)
