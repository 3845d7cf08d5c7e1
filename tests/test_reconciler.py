"""The reconciler against a real ledger and work queue (moto): one job's trouble never costs the others their
round, nothing but cancellation ends its loop (it is the safety net for lost callbacks), and a submission whose
submitter died is sent again only under its own Idempotency-Key, and only while AQuA still knows that key."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from pydantic import SecretStr

from pipeline.aqua.client import AquaClient
from pipeline.aqua.models import Job, SubmitRequest
from pipeline.aqua.simulator import SIMULATOR_KEY, SimulatorConfig, create_simulator_app
from pipeline.aws import AwsClients
from pipeline.errors import AquaUnavailable, AquaValidationError, LedgerError
from pipeline.ledger import JobLedger, JobState, PendingSubmission
from pipeline.metrics import Metrics
from pipeline.reconciler import Reconciler
from pipeline.settings import AquaSettings, HttpSettings, LedgerSettings, ReconcilerSettings
from pipeline.submission import Resumed, Submitter
from pipeline.tokens import TokenSigner
from pipeline.workqueue import WorkQueue

BROKEN, DOWN, DONE = ("a" * 32, "b" * 32, "c" * 32)


class Clock:
    """The ledger's clock, set back so the jobs look submitted two minutes ago (the reconciler reads real time)."""

    def __init__(self) -> None:
        self.now = time.time() - 120

    def __call__(self) -> float:
        return self.now


class Aqua:
    """AQuA as the reconciler sees it: one job whose body no model accepts, one that AQuA cannot serve now (5xx
    after the client's retries), one finished."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def get_job(self, job_id: str, *, track_id: str | None = None) -> Job:
        self.asked.append(job_id)
        if job_id == BROKEN:
            return Job.model_validate({"id": job_id, "status": {"not": "a status"}})  # pydantic refuses it
        if job_id == DOWN:
            raise AquaUnavailable("AQuA answered 503 three times")
        return Job.model_validate({"id": job_id, "status": "completed", "batches": []})


@pytest.fixture
async def parts(aws: AwsClients, unique: str) -> Any:
    clock = Clock()
    ledger = JobLedger(aws.dynamodb, LedgerSettings(table_name=f"rec-{unique}"), clock=clock)
    await ledger.ensure_table()
    url = (await aws.sqs.create_queue(QueueName=f"rec-{unique}"))["QueueUrl"]
    yield clock, ledger, WorkQueue(aws.sqs, url)
    await aws.dynamodb.delete_table(TableName=ledger.table_name)
    await aws.sqs.delete_queue(QueueUrl=url)


async def test_one_jobs_error_does_not_cost_the_others_their_round(parts: Any) -> None:
    clock, ledger, queue = parts
    for job_id in (BROKEN, DOWN, DONE):
        await ledger.record_submission(
            job_id, submission_id=f"s-{job_id[0]}", job_name="n", partner=None, project=None, request={}
        )
    clock.now = time.time()
    metrics = Metrics()
    aqua = Aqua()
    settings = ReconcilerSettings(interval_s=60, callback_grace_s=30, stuck_after_s=600)
    rec = Reconciler(ledger=ledger, aqua=aqua, queue=queue, settings=settings, metrics=metrics)  # type: ignore[arg-type]

    assert await rec.run_once() == 1
    assert sorted(aqua.asked) == [BROKEN, DOWN, DONE]  # every job was looked at, whatever came first
    got = await queue.receive(10, wait_time_s=0, visibility_s=30)
    assert [w.message.job_id for w in got if w.message] == [DONE]
    assert metrics.reconcile_errors._value.get() == 2
    assert metrics.reconciled.labels("lost_callback")._value.get() == 1


class FailingLedger:
    """A ledger whose scan fails with something that is not a PipelineError (say, a shape botocore never sent)."""

    def __init__(self) -> None:
        self.scans = 0

    async def find_pending_submissions(self, older_than_s: float) -> list[Any]:
        raise ValueError("unexpected item shape")

    async def find_unfinished(self, older_than_s: float) -> list[Any]:
        self.scans += 1
        raise ValueError("unexpected item shape")


async def test_an_unexpected_error_does_not_end_the_loop() -> None:
    ledger = FailingLedger()
    settings = ReconcilerSettings(interval_s=0.01, callback_grace_s=0, stuck_after_s=1)
    rec = Reconciler(ledger=ledger, aqua=Aqua(), queue=None, settings=settings, metrics=Metrics())  # type: ignore[arg-type]
    task = asyncio.create_task(rec.run_forever())
    for _ in range(200):
        await asyncio.sleep(0.01)
        if ledger.scans >= 3:
            break
    assert ledger.scans >= 3 and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class Submits:
    """AQuA's submit endpoint, answering every POST with ``answer`` (a job, or an error to raise)."""

    def __init__(self, answer: Job | Exception) -> None:
        self.answer = answer
        self.keys: list[str | None] = []
        self.notify_urls: list[str | None] = []

    async def submit(self, request: Any, *, idempotency_key: str | None = None, entity_ids: str | None = None) -> Job:
        self.keys.append(idempotency_key)
        self.notify_urls.append(request.notify_url)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def pending(since: float) -> PendingSubmission:
    body = {"format": "csv", "version": "1.1", "name": "n", "queries": [{"name": "A", "query": "select Id from A"}]}
    return PendingSubmission(submission_id="s" * 32, idempotency_key="aqp-key", request=body, pending_since=since)


@pytest.mark.parametrize(
    ("age_s", "answer", "outcome", "still_pending"),
    [
        (60, Job.model_validate({"id": DONE, "status": "submitted"}), Resumed.recorded, False),
        (
            60,
            AquaValidationError("AQuA error 90001: bad query", error_code="90001", status=200),
            Resumed.refused,
            False,
        ),
        (60, AquaValidationError("in progress", status=409), AquaValidationError, True),
        (  # AQuA made no job, and keeps this answer for the key 24 h: a new key for the next round
            60,
            AquaValidationError("AQuA error 90022: internal error", error_code="90022", status=200, retryable=True),
            Resumed.deferred,
            True,
        ),
        (  # a v1 error of a retryable category: the same
            60,
            AquaValidationError("AQuA error 50000099: try later", error_code="50000099", status=400, retryable=True),
            Resumed.deferred,
            True,
        ),
        (60, AquaUnavailable("AQuA answered 503 three times"), AquaUnavailable, True),
        (24 * 3600, Job.model_validate({"id": DONE, "status": "submitted"}), Resumed.expired, False),
    ],
)
async def test_resuming_a_submission_sends_it_again_only_under_its_own_key(
    parts: Any, age_s: float, answer: Job | Exception, outcome: Any, still_pending: bool
) -> None:
    clock, ledger, _ = parts
    now = time.time()
    clock.now = now
    p = pending(now - age_s)
    assert await ledger.record_pending_submission(p)
    aqua = Submits(answer)
    signer = TokenSigner([SecretStr("k" * 32)], 3600)
    submitter = Submitter(aqua=aqua, ledger=ledger, signer=signer, http=HttpSettings())  # type: ignore[arg-type]
    if isinstance(outcome, Resumed):
        assert await submitter.resume(p, now) is outcome
    else:
        with pytest.raises(outcome):
            await submitter.resume(p, now)
    assert aqua.keys == ([] if outcome is Resumed.expired else ["aqp-key"])  # past AQuA's 24 h: not sent at all
    for url in aqua.notify_urls:  # a token signed afresh for this very submission (none is stored)
        token = parse_qs(urlsplit(url or "").query)["token"][0]
        assert signer.verify(token).submission_id == p.submission_id
    if outcome is Resumed.deferred:
        clock.now += 5  # re-keying restarts the submission's clock
    left = await ledger.find_pending_submissions(1)
    assert bool(left) is still_pending
    if outcome is Resumed.deferred:
        assert left[0].idempotency_key != "aqp-key"
    recorded = await ledger.get(DONE)
    assert (recorded is not None) is (outcome is Resumed.recorded)
    if recorded is not None:
        assert (recorded.state, recorded.submission_id, recorded.job_name) == (JobState.submitted, p.submission_id, "n")
        assert not await ledger.record_pending_submission(p)  # bound now: a retried submit writes nothing


async def test_a_submission_over_the_job_limit_is_sent_again_under_a_new_key(parts: Any, aiohttp_server: Any) -> None:
    """Over the concurrent job limit AQuA answers 90028 and makes no job; it would answer the same key with the
    same stored refusal for 24 hours. So the pending submission is re-keyed (its window restarting), stays
    pending, and lands under the new key once the limit lifts (the simulator keeps answers per key, as AQuA)."""
    clock, ledger, _ = parts
    sim_app = create_simulator_app(SimulatorConfig(step_delay_s=30, max_concurrent_jobs=1))
    server = await aiohttp_server(sim_app)
    sim = sim_app[SIMULATOR_KEY]
    settings = AquaSettings(base_url=str(server.make_url("")), client_id="sim-client", client_secret="sim-secret")
    async with aiohttp.ClientSession() as http:
        aqua = AquaClient(http, settings)
        body = {**pending(0).request, "queries": [{"name": "A", "query": "select Id from Account"}]}
        running = await aqua.submit(SubmitRequest.model_validate(body))  # takes the tenant's one slot
        signer = TokenSigner([SecretStr("k" * 32)], 3600)
        submitter = Submitter(aqua=aqua, ledger=ledger, signer=signer, http=HttpSettings())
        clock.now = time.time()
        first = dataclasses.replace(pending(clock.now - 60), request=body)
        assert await ledger.record_pending_submission(first)

        assert await submitter.resume(first, clock.now) is Resumed.deferred
        clock.now += 5
        [again] = await ledger.find_pending_submissions(1)
        assert again.idempotency_key != first.idempotency_key and again.pending_since == pytest.approx(clock.now - 5)
        assert again.idempotency_key.startswith(f"aqp-{first.submission_id[:24]}-")
        assert not await ledger.rekey_submission(first, "aqp-other")  # only from the key it was refused under

        assert running.id is not None
        sim.cancel(sim.jobs[running.id])  # the limit lifts
        with pytest.raises(AquaValidationError) as refused:  # the old key still gets its stored refusal ...
            await aqua.submit(SubmitRequest.model_validate(first.request), idempotency_key=first.idempotency_key)
        assert refused.value.error_code == "90028" and refused.value.retryable
        assert await submitter.resume(again, clock.now) is Resumed.recorded  # ... the new one makes the job
    assert await ledger.find_pending_submissions(0) == []
    [made] = [j for j in sim.jobs if j != running.id]
    job = await ledger.get(made)
    assert job is not None and (job.state, job.submission_id) == (JobState.submitted, first.submission_id)


async def test_two_reconcilers_do_not_both_send_a_pending_submission(parts: Any) -> None:
    clock, ledger, _ = parts
    p = pending(clock.now)
    await ledger.record_pending_submission(p)
    won = [await ledger.try_resume_submission(p.submission_id, owner, hold_s=60) for owner in ("r1", "r2")]
    assert won == [True, False]


@pytest.mark.parametrize("failing", ["record_submission", "bind_submission"])
async def test_a_submit_that_dies_recording_its_job_is_finished_by_the_reconciler(
    parts: Any, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """Recording the job AQuA made takes two writes (the job item, the submission's binding to it). Whichever of
    them fails (DynamoDB errs, the submitter dies), the submission stays pending until the job is in the ledger: the
    reconciler sends it again under its own key, AQuA answers with the same job, and the record is completed."""
    clock, ledger, queue = parts
    now = time.time()
    clock.now = now - 60
    aqua = Submits(Job.model_validate({"id": DONE, "status": "submitted"}))
    signer = TokenSigner([SecretStr("k" * 32)], 3600)
    submitter = Submitter(aqua=aqua, ledger=ledger, signer=signer, http=HttpSettings())  # type: ignore[arg-type]

    async def throttled(*_: Any, **__: Any) -> Any:
        raise LedgerError("dynamodb update_item failed: ProvisionedThroughputExceededException")

    monkeypatch.setattr(ledger, failing, throttled)
    with pytest.raises(LedgerError):
        await submitter.submit(SubmitRequest.model_validate(pending(now).request), idempotency_key="caller-key")
    monkeypatch.undo()
    clock.now = now
    assert len(await ledger.find_pending_submissions(30)) == 1  # not bound: still the reconciler's to finish

    settings = ReconcilerSettings(interval_s=60, callback_grace_s=600, stuck_after_s=600, submit_grace_s=30)
    rec = Reconciler(ledger=ledger, aqua=Aqua(), queue=queue, settings=settings, metrics=Metrics(), submitter=submitter)  # type: ignore[arg-type]
    await rec.run_once()
    assert len(aqua.keys) == 2 and len(set(aqua.keys)) == 1  # sent again under its own Idempotency-Key
    item = await ledger.get(DONE)
    assert item is not None and (item.state, item.job_name) == (JobState.submitted, "n")
    assert await ledger.find_pending_submissions(0) == []
    assert item.submission_id is not None
    bound = PendingSubmission(submission_id=item.submission_id, idempotency_key="caller-key", request={})
    assert not await ledger.record_pending_submission(bound)  # bound to the job now: nothing written


@pytest.mark.parametrize("state", ["notified", "stuck"])
async def test_a_re_driven_job_that_keeps_waiting_is_not_sent_again_every_round(parts: Any, state: str) -> None:
    """A job that waits on purpose (a busy stateful session) keeps its state and age: once re-driven, it gets no
    further work message (nor AQuA read) until its grace has passed again, not one every election window."""
    clock, ledger, queue = parts
    await ledger.record_submission(DONE, submission_id="s-c", job_name="n", partner=None, project=None, request={})
    await ledger.record_callback(DONE, status="Completed", notification_id=None)  # notified, no lease
    if state == "stuck":
        await ledger.claim(DONE, "w1", lease_s=1)
        await ledger.mark_transferring(DONE, "w1")  # its worker died: leased until a second from now
    clock.now = time.time()
    aqua = Aqua()
    settings = ReconcilerSettings(interval_s=1, callback_grace_s=30, stuck_after_s=60)
    rec = Reconciler(ledger=ledger, aqua=aqua, queue=queue, settings=settings, metrics=Metrics())  # type: ignore[arg-type]
    clock.now += 120  # the job is past its grace (stuck: past stuck_after_s too), for the reconciler's clock
    rounds = []
    for _ in range(3):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(time, "time", lambda: clock.now)
            rounds.append(await rec.run_once())
        clock.now += 5  # past the election window (2 x interval), well within the grace
    assert rounds == [1, 0, 0]
    got = await queue.receive(10, wait_time_s=0, visibility_s=30)
    assert [w.message.job_id for w in got if w.message] == [DONE]


async def test_a_retried_submit_keeps_the_time_its_key_was_first_used(parts: Any) -> None:
    """AQuA's 24-hour Idempotency-Key window starts at the key's first use: a caller's retry with the same key
    does not make the reconciler think the key is younger than it is (and send it past the window)."""
    _, ledger, _ = parts
    first = time.time() - 20 * 3600
    assert await ledger.record_pending_submission(pending(first))
    assert await ledger.record_pending_submission(pending(time.time()))  # the caller retries, 20 h later
    (found,) = await ledger.find_pending_submissions(1)
    assert found.pending_since == pytest.approx(first)
