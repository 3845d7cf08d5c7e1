"""The job ledger against DynamoDB on the real moto server process."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import pytest

from pipeline.admin import error_of
from pipeline.aws import AwsClients, open_clients
from pipeline.dynamo import CONFLICT_ATTEMPTS, Expr
from pipeline.errors import JobBusy, JobNotInLedger, LedgerError
from pipeline.ledger import JobLedger, JobState, LeaseLost, LedgerItem
from pipeline.settings import LedgerSettings
from pipeline.testing.faultproxy import FAULTPROXY_KEY, create_faultproxy_app
from pipeline.testing.moto import free_port
from pipeline.testing.stack import serve_app

T0 = 4_000_000_000.0  # far future: TTL never removes test items
JOB = "2c92c0f8697096be016971cca2091244"


class Clock:
    """A hand-driven clock: leases expire when the test says so."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def ledger(atomic_aws: AwsClients, unique: str, clock: Clock) -> Any:
    # Serialized DynamoDB: several tests here race conditional writes (claims), which moto may let both win.
    ddb = atomic_aws.dynamodb
    led = JobLedger(ddb, LedgerSettings(table_name=f"jobs-{unique}", retention_days=7), clock=clock)
    await led.ensure_table()
    yield led
    await ddb.delete_table(TableName=led.table_name)


async def submitted(ledger: JobLedger, job_id: str = JOB) -> None:
    await ledger.record_submission(
        job_id, submission_id="sub-1", job_name="nightly", partner=None, project=None, request={"format": "csv"}
    )


async def test_ensure_table_is_idempotent_and_enables_ttl(ledger: JobLedger, aws: AwsClients) -> None:
    await ledger.ensure_table()
    desc = await aws.dynamodb.describe_table(TableName=ledger.table_name)
    assert desc["Table"]["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert desc["Table"]["KeySchema"] == [{"AttributeName": "job_id", "KeyType": "HASH"}]
    ttl = await aws.dynamodb.describe_time_to_live(TableName=ledger.table_name)
    assert ttl["TimeToLiveDescription"] == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expires_at"}


async def test_ensure_table_refuses_a_table_that_expires_items_on_another_attribute(
    aws: AwsClients, unique: str
) -> None:
    """DynamoDB allows one TTL attribute per table: a table expiring on another one would keep the ledger's items
    for ever, so start-up says so instead of running with it."""
    led = JobLedger(aws.dynamodb, LedgerSettings(table_name=f"ttl-{unique}"))
    await aws.dynamodb.create_table(
        TableName=led.table_name,
        AttributeDefinitions=[{"AttributeName": "job_id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    spec = {"Enabled": True, "AttributeName": "purge_at"}
    await aws.dynamodb.update_time_to_live(TableName=led.table_name, TimeToLiveSpecification=spec)
    try:
        with pytest.raises(LedgerError, match=r"expires items on 'purge_at', not on 'expires_at'.*LEDGER__TABLE_NAME"):
            await led.ensure_table()
        ttl = await aws.dynamodb.describe_time_to_live(TableName=led.table_name)
        assert ttl["TimeToLiveDescription"]["AttributeName"] == "purge_at"  # left as it was
    finally:
        await aws.dynamodb.delete_table(TableName=led.table_name)


async def test_record_submission_creates_once(ledger: JobLedger) -> None:
    assert await ledger.record_submission(
        JOB, submission_id="sub-1", job_name="nightly", partner="p", project="q", request={"format": "csv"}
    )
    assert not await ledger.record_submission(
        JOB, submission_id="sub-2", job_name="other", partner=None, project=None, request=None
    )
    item = await ledger.get(JOB)
    assert item is not None
    assert (item.state, item.submission_id, item.job_name, item.partner, item.project) == (
        JobState.submitted,
        "sub-1",
        "nightly",
        "p",
        "q",
    )
    assert item.request == {"format": "csv"}
    assert item.submitted_at == T0
    assert item.expires_at == int(T0 + 7 * 86400)
    assert item.extra == {}


async def test_callback_moves_submitted_to_notified_and_dedupes(ledger: JobLedger, clock: Clock) -> None:
    await submitted(ledger)
    clock.now += 5
    first = await ledger.record_callback(JOB, status="Completed", notification_id="n-1")
    assert (first.duplicate, first.state, first.created, first.callback_count) == (False, JobState.notified, False, 1)
    again = await ledger.record_callback(JOB, status="Completed", notification_id="n-1")
    assert (again.duplicate, again.callback_count) == (True, 2)
    other = await ledger.record_callback(JOB, status="Completed", notification_id="n-2")
    assert not other.duplicate
    item = await ledger.get(JOB)
    assert item is not None
    assert item.state is JobState.notified
    assert item.notified_at == T0 + 5
    assert item.notification_ids == {"n-1", "n-2"}
    assert item.callback_count == 3
    assert item.last_callback_status == "Completed"
    assert item.submission_id == "sub-1"


async def test_callback_for_unknown_job_creates_it(ledger: JobLedger) -> None:
    rec = await ledger.record_callback(JOB, status=None, notification_id=None)
    assert (rec.created, rec.state, rec.duplicate) == (True, JobState.notified, False)
    item = await ledger.get(JOB)
    assert item is not None and item.state is JobState.notified and item.attempts == 0
    # a late record_submission fills in details without moving the state back
    assert not await ledger.record_submission(JOB, submission_id="s", job_name="n", partner=None, project=None)
    item = await ledger.get(JOB)
    assert item is not None and item.state is JobState.notified and item.job_name == "n"


async def test_token_callback_fast_path_counts_the_submitters_own_job(ledger: JobLedger, clock: Clock) -> None:
    await submitted(ledger)
    clock.now += 5
    first = await ledger.record_token_callback(JOB, submission_id="sub-1", status="completed", notification_id="n-1")
    assert first is not None
    assert (first.duplicate, first.state, first.created, first.callback_count) == (False, JobState.notified, False, 1)
    again = await ledger.record_token_callback(JOB, submission_id="sub-1", status="completed", notification_id="n-1")
    assert again is not None and (again.duplicate, again.state, again.callback_count) == (True, JobState.notified, 2)
    item = await ledger.get(JOB)
    assert item is not None
    assert (item.state, item.notified_at, item.callback_count, item.notification_ids) == (
        JobState.notified,
        T0 + 5,
        2,
        {"n-1"},
    )
    assert (item.last_callback_status, item.attempts, item.submission_id) == ("completed", 0, "sub-1")


async def test_token_callback_fast_path_declines_without_writing(ledger: JobLedger, clock: Clock) -> None:
    # not recorded yet (the callback outran the submitter): no item is created
    assert await ledger.record_token_callback(JOB, submission_id="sub-1", status=None, notification_id="n") is None
    assert await ledger.get(JOB) is None
    await submitted(ledger)
    clock.now += 5
    # recorded under another submission
    assert await ledger.record_token_callback(JOB, submission_id="sub-2", status=None, notification_id="n") is None
    # created by a callback (no submission id on the item)
    await ledger.record_callback("other", status=None, notification_id=None)
    assert await ledger.record_token_callback("other", submission_id="sub-1", status=None, notification_id=None) is None
    # further along than notified
    assert await ledger.claim(JOB, "w1", 30)
    await ledger.mark_transferring(JOB, "w1")
    clock.now += 5
    assert await ledger.record_token_callback(JOB, submission_id="sub-1", status=None, notification_id="n") is None
    item = await ledger.get(JOB)
    assert item is not None
    assert (item.state, item.callback_count, item.notification_ids, item.updated_at) == (
        JobState.transferring,
        0,
        frozenset(),
        T0 + 5,
    )


async def test_a_replay_says_whether_the_job_is_unknown_or_busy(ledger: JobLedger, clock: Clock) -> None:
    """The admin API answers these 404 and 409: they must not look alike."""
    with pytest.raises(JobNotInLedger):
        await ledger.reset_for_replay(JOB)
    await ledger.record_callback(JOB, status="Completed", notification_id=None)
    assert await ledger.claim(JOB, "w1", 30)
    with pytest.raises(JobBusy) as busy:
        await ledger.reset_for_replay(JOB)
    assert busy.value.retryable and error_of(busy.value)[:2] == (409, "job_busy")
    clock.now += 31  # the lease lapsed: the replay goes ahead
    assert (await ledger.reset_for_replay(JOB)).state == JobState.notified
    assert error_of(JobNotInLedger("x"))[:2] == (404, "not_found")


async def test_callback_after_work_started_leaves_state_alone(ledger: JobLedger) -> None:
    await submitted(ledger)
    assert await ledger.claim(JOB, "w1", 30)
    await ledger.mark_transferring(JOB, "w1")
    rec = await ledger.record_callback(JOB, status="Completed", notification_id="n-9")
    assert (rec.state, rec.duplicate, rec.created, rec.callback_count) == (JobState.transferring, False, False, 1)
    rec = await ledger.record_callback(JOB, status="Completed", notification_id="n-9")
    assert rec.duplicate
    item = await ledger.get(JOB)
    assert item is not None and item.state is JobState.transferring and item.lease_owner == "w1"


async def test_full_happy_path(ledger: JobLedger) -> None:
    await submitted(ledger)
    await ledger.record_callback(JOB, status="Completed", notification_id="n")
    item = await ledger.claim(JOB, "w1", 30)
    assert item is not None
    assert (item.lease_owner, item.lease_until, item.attempts, item.state) == ("w1", T0 + 30, 1, JobState.notified)
    assert (await ledger.mark_transferring(JOB, "w1")).state is JobState.transferring
    stored = await ledger.mark_stored(JOB, "w1", manifest_key="m/k.json", record_count=10, total_bytes=99)
    assert (stored.state, stored.manifest_key, stored.record_count, stored.total_bytes) == (
        JobState.stored,
        "m/k.json",
        10,
        99,
    )
    done = await ledger.mark_published(JOB, "w1", event_id="ev-1")
    assert done.state is JobState.published and done.event_id == "ev-1" and done.done
    assert done.lease_owner is None and done.lease_until is None
    assert await ledger.claim(JOB, "w2", 30) is None
    assert await ledger.claim(JOB, "w1", 30) is None


async def test_claim_is_exclusive_until_the_lease_expires(ledger: JobLedger, clock: Clock) -> None:
    await submitted(ledger)
    assert await ledger.claim(JOB, "w1", 30)
    assert await ledger.claim(JOB, "w2", 30) is None
    again = await ledger.claim(JOB, "w1", 30)  # the owner may re-claim
    assert again is not None and again.attempts == 2
    clock.now += 31
    taken = await ledger.claim(JOB, "w2", 30)
    assert taken is not None and taken.lease_owner == "w2" and taken.attempts == 3
    with pytest.raises(LeaseLost) as info:
        await ledger.mark_transferring(JOB, "w1")
    assert info.value.retryable is False
    assert isinstance(info.value, LedgerError)
    assert info.value.current is not None and info.value.current.lease_owner == "w2"
    assert "w2" in str(info.value)


async def test_concurrent_claims_have_one_winner(ledger: JobLedger) -> None:
    await submitted(ledger)
    results = await asyncio.gather(*(ledger.claim(JOB, f"w{i}", 30) for i in range(8)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    item = await ledger.get(JOB)
    assert item is not None and item.lease_owner == winners[0].lease_owner and item.attempts == 1


async def test_claim_unknown_job_is_none(ledger: JobLedger) -> None:
    assert await ledger.claim("nope", "w1", 30) is None
    with pytest.raises(LeaseLost, match="unknown job"):
        await ledger.mark_transferring("nope", "w1")


async def test_illegal_transitions_raise(ledger: JobLedger) -> None:
    await submitted(ledger)
    with pytest.raises(LeaseLost):  # never claimed
        await ledger.mark_transferring(JOB, "w1")
    await ledger.claim(JOB, "w1", 30)
    with pytest.raises(LeaseLost, match="illegal transition submitted -> published"):
        await ledger.mark_published(JOB, "w1", event_id="e")
    await ledger.mark_stored(JOB, "w1", manifest_key="k", record_count=0, total_bytes=0)
    with pytest.raises(LeaseLost, match="illegal transition"):
        await ledger.mark_transferring(JOB, "w1")


async def test_crash_after_stored_resumes_at_stored(ledger: JobLedger, clock: Clock) -> None:
    await submitted(ledger)
    await ledger.claim(JOB, "w1", 30)
    await ledger.mark_transferring(JOB, "w1")
    await ledger.mark_stored(JOB, "w1", manifest_key="k.json", record_count=3, total_bytes=30)
    # w1 dies; the message is redelivered after the lease ran out
    assert await ledger.claim(JOB, "w2", 30) is None
    clock.now += 60
    item = await ledger.claim(JOB, "w2", 30)
    assert item is not None and item.state is JobState.stored and item.manifest_key == "k.json"
    assert (await ledger.mark_published(JOB, "w2", event_id="ev")).done
    with pytest.raises(LeaseLost):
        await ledger.mark_published(JOB, "w1", event_id="ev")


async def test_extend_and_release(ledger: JobLedger, clock: Clock) -> None:
    await submitted(ledger)
    await ledger.claim(JOB, "w1", 30)
    clock.now += 20
    assert await ledger.extend_lease(JOB, "w1", 30)
    assert not await ledger.extend_lease(JOB, "w2", 30)
    clock.now += 20  # 40 s after the claim, still inside the extended lease
    assert await ledger.claim(JOB, "w2", 30) is None
    await ledger.release(JOB, "w2")  # not ours: ignored
    assert (await ledger.get(JOB)).lease_owner == "w1"  # type: ignore[union-attr]
    await ledger.release(JOB, "w1")
    item = await ledger.get(JOB)
    assert item is not None and item.lease_owner is None and item.lease_until is None
    assert await ledger.claim(JOB, "w2", 30) is not None


async def test_failed_is_final_only_once_its_event_is_recorded(ledger: JobLedger, clock: Clock) -> None:
    await submitted(ledger)
    await ledger.claim(JOB, "w1", 30)
    failed = await ledger.mark_failed(JOB, "w1", reason="AquaNotFound", message="gone")
    assert failed.state is JobState.failed and not failed.done and failed.lease_owner is None
    # the failure event was not published: another worker may pick it up and finish it
    item = await ledger.claim(JOB, "w2", 30)
    assert item is not None and item.error_reason == "AquaNotFound"
    done = await ledger.mark_failed(JOB, "w2", reason="AquaNotFound", message="gone", event_id="ev-f")
    assert done.done and done.event_id == "ev-f"
    assert await ledger.claim(JOB, "w3", 30) is None


async def test_a_stored_job_can_no_longer_fail(ledger: JobLedger) -> None:
    """Its manifest is committed and its completion event may be out: it only ever moves on to published."""
    await submitted(ledger)
    await ledger.claim(JOB, "w1", 30)
    assert await ledger.hold_for_event(JOB, "w1", 30, failure=True)  # transferring: may still fail
    assert not await ledger.hold_for_event(JOB, "w1", 30, failure=False)  # nothing stored to publish yet
    await ledger.mark_stored(JOB, "w1", manifest_key="k.json", record_count=3, total_bytes=30)
    assert not await ledger.hold_for_event(JOB, "w1", 30, failure=True)
    assert await ledger.hold_for_event(JOB, "w1", 30, failure=False)
    assert not await ledger.hold_for_event(JOB, "w2", 30, failure=False)  # not w2's lease
    with pytest.raises(LeaseLost, match="illegal transition stored -> failed"):
        await ledger.mark_failed(JOB, "w1", reason="LedgerError", message="throttled", event_id="ev-f")
    item = await ledger.get(JOB)
    assert item is not None and (item.state, item.lease_owner, item.event_id) == (JobState.stored, "w1", None)
    assert (await ledger.mark_published(JOB, "w1", event_id="ev")).done


async def test_a_heartbeat_fails_only_for_a_lease_taken_over(ledger: JobLedger, clock: Clock) -> None:
    """A job that finished meanwhile dropped its lease with its final transition: the heartbeat counts it as held
    (nothing is left to stop); one another worker claimed is lost."""
    await submitted(ledger)
    await ledger.claim(JOB, "w1", 30)
    await ledger.mark_stored(JOB, "w1", manifest_key="k", record_count=0, total_bytes=0)
    await ledger.mark_published(JOB, "w1", event_id="ev")
    assert await ledger.extend_lease(JOB, "w1", 30)
    await submitted(ledger, "other")
    await ledger.claim("other", "w1", 30)
    clock.now += 31
    assert await ledger.claim("other", "w2", 30)
    assert not await ledger.extend_lease("other", "w1", 30)
    assert await ledger.extend_lease("other", "w2", 30)


async def test_find_unfinished_and_list_recent(ledger: JobLedger, clock: Clock) -> None:
    jobs = [f"job{i}" for i in range(5)]
    for j in jobs:
        await submitted(ledger, j)
        clock.now += 10
    # job0: leased and live; job1: published; job2: leased but expired; job3/job4: idle
    await ledger.claim("job0", "w", 1000)
    await ledger.claim("job1", "w", 1)
    await ledger.mark_stored("job1", "w", manifest_key="k", record_count=0, total_bytes=0)
    await ledger.mark_published("job1", "w", event_id="e")
    await ledger.claim("job2", "w", 5)
    await ledger.acquire_session("p", "q", "job3")  # session items are not jobs
    clock.now += 100
    found = await ledger.find_unfinished(older_than_s=60)
    assert [i.job_id for i in found] == ["job2", "job3", "job4"]
    assert await ledger.find_unfinished(older_than_s=10_000) == []
    recent = await ledger.list_recent(limit=3)
    assert [i.job_id for i in recent] == ["job1", "job4", "job3"]
    assert len(await ledger.list_recent()) == 5


async def test_annotate_goes_to_extra(ledger: JobLedger) -> None:
    await submitted(ledger)
    await ledger.annotate(JOB, {"session_partner": "p", "incremental": True, "window": {"from": "a", "n": 2}})
    item = await ledger.get(JOB)
    assert item is not None
    assert item.extra == {"session_partner": "p", "incremental": True, "window": {"from": "a", "n": 2}}
    with pytest.raises(ValueError, match="reserved"):
        await ledger.annotate(JOB, {"state": "published"})
    with pytest.raises(LedgerError, match="not in the ledger"):
        await ledger.annotate("nope", {"x": 1})


async def test_sessions(ledger: JobLedger, clock: Clock) -> None:
    assert await ledger.get_session("p#1", "proj") is None
    assert await ledger.acquire_session("p#1", "proj", "jobA")
    assert await ledger.acquire_session("p#1", "proj", "jobA")  # re-entrant
    assert not await ledger.acquire_session("p#1", "proj", "jobB")
    assert await ledger.acquire_session("p", "1#proj", "jobB")  # '#' cannot alias another session
    clock.now += 1
    await ledger.record_session_completion("p#1", "proj", "jobA", "2025-01-01 00:00:00")
    assert not await ledger.release_session("p#1", "proj", "jobB")
    assert await ledger.release_session("p#1", "proj", "jobA")
    s = await ledger.get_session("p#1", "proj")
    assert s is not None
    assert (s.holder_job_id, s.last_job_id, s.last_transaction_start, s.last_completed_at) == (
        None,
        "jobA",
        "2025-01-01 00:00:00",
        T0 + 1,
    )
    assert await ledger.acquire_session("p#1", "proj", "jobB")
    assert await ledger.get("session#p%231#proj") is None


async def test_dynamodb_errors_become_ledger_errors(aws: AwsClients, unique: str) -> None:
    missing = JobLedger(aws.dynamodb, LedgerSettings(table_name=f"missing-{unique}"))
    with pytest.raises(LedgerError) as info:
        await missing.get(JOB)
    assert info.value.retryable is True
    assert not isinstance(info.value, LeaseLost)
    with pytest.raises(LedgerError):
        await missing.claim(JOB, "w", 30)


def test_item_from_raw_keeps_unknown_attributes() -> None:
    item = LedgerItem.from_item(
        {
            "job_id": {"S": "j"},
            "state": {"S": "stored"},
            "lease_owner": {"S": "w"},
            "record_count": {"N": "12"},
            "lease_until": {"N": "1.500000"},
            "notification_ids": {"SS": ["a"]},
            "flag": {"BOOL": True},
            "nothing": {"NULL": True},
            "nums": {"NS": ["1", "2.5"]},
            "lst": {"L": [{"S": "x"}]},
        }
    )
    assert item.record_count == 12 and item.lease_until == 1.5 and item.notification_ids == {"a"}
    assert item.extra == {"flag": True, "nothing": None, "nums": {1, 2.5}, "lst": ["x"]}
    assert item.lease_live(1.0) and not item.lease_live(2.0)


def test_expression_values_share_one_placeholder_per_value() -> None:
    e = Expr()
    now = 1_790_000_000.25
    first, again, other, text = e.v(now), e.v(now), e.v(now + 1), e.v("notified")
    assert first == again != other != text
    assert e.v({"b", "a"}) == e.v({"a", "b"})  # sets are encoded sorted: equal sets, one placeholder
    assert e.kwargs()["ExpressionAttributeValues"] == {
        first: {"N": "1790000000.250000"},
        other: {"N": "1790000001.250000"},
        text: {"S": "notified"},
        e.v({"a", "b"}): {"SS": ["a", "b"]},
    }


async def test_a_session_record_never_moves_back_to_an_older_job(ledger: JobLedger) -> None:
    """J1's callback was lost and the reconciler landed it after J2: the session keeps J2 as its last job."""
    await ledger.record_session_completion("p", "q", "job2", "2025-03-02 02:00:04")
    await ledger.record_session_completion("p", "q", "job1", "2025-03-01 02:00:04")
    session = await ledger.get_session("p", "q")
    assert session is not None
    assert (session.last_job_id, session.last_transaction_start) == ("job2", "2025-03-02 02:00:04")
    await ledger.record_session_completion("p", "q", "job3", "2025-03-03 02:00:04")
    session = await ledger.get_session("p", "q")
    assert session is not None and session.last_job_id == "job3"


async def test_a_write_that_meets_a_transaction_in_flight_is_tried_again(aws_settings: Any, unique: str) -> None:
    """DynamoDB refuses a plain write to an item a transaction is writing (``TransactionConflictException``, 400;
    the callback route batches counts in transactions) and botocore does not retry that code: the ledger does,
    a few times, before it gives up with a LedgerError."""
    async with AsyncExitStack() as stack:
        proxy_app = create_faultproxy_app(aws_settings.endpoint_url or "")
        url = await serve_app(stack, proxy_app, free_port())
        clients = await open_clients(stack, aws_settings.model_copy(update={"endpoint_url": url}))
        led = JobLedger(clients.dynamodb, LedgerSettings(table_name=f"conflict-{unique}"))
        await led.ensure_table()
        proxy = proxy_app[FAULTPROXY_KEY]
        conflict = {"status": 400, "code": "TransactionConflictException"}
        proxy.add("dynamodb", "UpdateItem", count=CONFLICT_ATTEMPTS - 1, **conflict)
        assert await led.record_submission(
            JOB, submission_id="s", job_name="n", partner=None, project=None, request=None
        )
        assert proxy.faulted[("dynamodb", "UpdateItem")] == CONFLICT_ATTEMPTS - 1
        proxy.add("dynamodb", "UpdateItem", count=CONFLICT_ATTEMPTS, **conflict)
        with pytest.raises(LedgerError, match="TransactionConflictException"):
            await led.claim(JOB, "w1", 30)
        await clients.dynamodb.delete_table(TableName=led.table_name)


async def test_a_sessions_line_takes_any_job_id_and_keeps_the_first_submit_time(ledger: JobLedger) -> None:
    """Job ids become keys of the session's ``pending`` map: ids with characters an expression placeholder
    cannot hold (``-``, ``.``) work too, and a second add keeps the first submit time."""
    odd, plain = "job-1.a", "a" * 32
    await ledger.add_session_job("p", "q", odd, 20.0)
    await ledger.add_session_job("p", "q", plain, 10.0)
    await ledger.add_session_job("p", "q", odd, 30.0)
    session = await ledger.get_session("p", "q")
    assert session is not None and session.pending == {odd: 20.0, plain: 10.0}
    await ledger.remove_session_job("p", "q", odd)
    await ledger.remove_session_job("p", "q", odd)  # gone already: no error
    session = await ledger.get_session("p", "q")
    assert session is not None and session.pending == {plain: 10.0}
    await ledger.remove_session_job("p", "other", plain)  # a session never used: no error, nothing made
    assert await ledger.get_session("p", "other") is None
