"""Issue 4 acceptance: callback security through the real service route, over loopback HTTP.

Per-submission tokens (valid, forged, expired, cross-job, malformed, missing), oversized and malformed callbacks,
HTTP Basic callouts (challenge-first and preemptive, de-duplicated by ``Zuora-Notification-Id``), the source
allowlist with and without trusted proxies, signing-key rotation, the ``aqua_callbacks_total`` metric, and no
secret in the service's logs. "Nothing enqueued" is checked on the work queue and in the ledger.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from pydantic import SecretStr

from pipeline.aqua.models import SubmitRequest
from pipeline.aqua.simulator import SimulatorConfig
from pipeline.aqua.simulator.config import UiCalloutConfig
from pipeline.ledger import JobState
from pipeline.models import WorkMessage
from pipeline.settings import Settings
from pipeline.submission import Submitted, Submitter
from pipeline.testing.moto import MotoServer
from pipeline.testing.stack import Stack, running_stack
from pipeline.tokens import TokenSigner
from pipeline.workqueue import QueueError

OLD_KEY = "old-signing-key-7f3a9c1e5b"
NEW_KEY = "new-signing-key-2d8e4a6c0f"
BASIC_USER = "zuora-callout"
BASIC_PASSWORD = "b4sic-pa55-9q8w7e"
ADMIN_TOKEN = "adm1n-t0ken-x9y8z7"
SECRETS = (OLD_KEY, NEW_KEY, BASIC_PASSWORD, ADMIN_TOKEN)
_SIMULATOR_LOGGERS = ("pipeline.aqua.simulator",)


def one_query(name: str = "sec") -> SubmitRequest:
    return SubmitRequest.model_validate(
        {
            "format": "csv",
            "version": "1.1",
            "name": name,
            "queries": [{"name": "Account", "type": "zoqlexport", "query": "select Id, Name from Account"}],
        }
    )


def security(**changes: Any) -> Callable[[Settings], Settings]:
    """A tweak that sets security fields (keys default to [NEW, OLD]) and a short work visibility."""

    def tweak(s: Settings) -> Settings:
        sec: dict[str, Any] = {
            "signing_keys": [SecretStr(NEW_KEY), SecretStr(OLD_KEY)],
            "admin_token": SecretStr(ADMIN_TOKEN),
            **changes,
        }
        return s.model_copy(update={"security": s.security.model_copy(update=sec)})

    return tweak


def checked_at(at: Literal["receiver", "worker"], **changes: Any) -> Callable[[Settings], Settings]:
    """:func:`security`, with token callbacks checked against the ledger where ``at`` says
    (``LEDGER__TOKEN_CALLBACKS_AT``)."""

    def tweak(s: Settings) -> Settings:
        s = security(**changes)(s)
        return s.model_copy(update={"ledger": s.ledger.model_copy(update={"token_callbacks_at": at})})

    return tweak


def ledger_first(**changes: Any) -> Callable[[Settings], Settings]:
    """Token callbacks checked by the receiver, before it answers; the default, ``worker``, is covered by
    test_callback_deferred.py."""
    return checked_at("receiver", **changes)


def sim(step_delay_s: float = 0.01) -> SimulatorConfig:
    """A small simulator. Callout tests use a slower job: a UI callout carries no token, so a callout that
    arrives before the submission is in the ledger is answered 404 (and retried by Zuora)."""
    return SimulatorConfig(rows={"Account": 200}, step_delay_s=step_delay_s)


def token_of(submitted: Submitted) -> str:
    return parse_qs(urlsplit(submitted.notify_url).query)["token"][0]


def callback_url(stack: Stack, job_id: str, token: str | None, status: str = "Completed") -> str:
    url = f"{stack.service_url}{stack.settings.http.callback_path}?jobId={job_id}&status={status}"
    return url + (f"&token={token}" if token is not None else "")


async def call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    """Status and JSON body (every answer of the service is JSON)."""
    async with http.request(method, url, **kw) as resp:
        assert resp.content_type == "application/json", (resp.status, resp.content_type)
        body: dict[str, Any] = await resp.json()
        return resp.status, body


async def callback_counts(http: aiohttp.ClientSession, stack: Stack) -> dict[str, float]:
    """``aqua_callbacks_total`` by outcome, read from the live ``/metrics`` route."""
    async with http.get(stack.service_url + "/metrics") as resp:
        text = await resp.text()
    pattern = r'^aqua_callbacks_total\{outcome="([^"]+)"\} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


def assert_no_secrets(records: Iterable[logging.LogRecord], secrets: Iterable[str]) -> int:
    """No service log line (message, args, traceback) carries a secret; returns how many lines were checked."""
    checked = 0
    for record in records:
        if record.name.startswith(_SIMULATOR_LOGGERS):
            continue  # the simulator plays Zuora: it logs the URL it calls, which is not the service's log
        text = record.getMessage() + (record.exc_text or "") + str(getattr(record, "__dict__", ""))
        for secret in secrets:
            assert secret not in text, f"secret leaked by {record.name}: {record.getMessage()[:200]}"
        checked += 1
    return checked


async def submit_quietly(stack: Stack, name: str, signer: TokenSigner | None = None) -> Submitted:
    """Submit (optionally signing the notifyUrl with another signer) and wait until AQuA finished the job."""
    c = stack.components
    submitter = Submitter(aqua=c.aqua, ledger=c.ledger, signer=signer or c.signer, http=stack.settings.http)
    submitted = await submitter.submit(one_query(name))
    await c.aqua.wait_for_job(submitted.job.id or "", poll_interval_s=0.02, timeout_s=20)
    return submitted


async def two_quiet_jobs(stack: Stack) -> tuple[Submitted, Submitted]:
    """Jobs ``a`` and ``b``, submitted and finished by AQuA with their callbacks lost: the test makes them."""
    stack.sim.faults.lose_callbacks = True
    return await submit_quietly(stack, "a"), await submit_quietly(stack, "b")


async def test_tokens_accept_the_genuine_and_refuse_the_rest(
    moto_server: MotoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_stack(moto_server.url, sim_config=sim(), tweak=ledger_first(), run_worker=False) as stack:
        a, b = await two_quiet_jobs(stack)
        job_a, job_b = a.job.id or "", b.job.id or ""
        tok_a, tok_b = token_of(a), token_of(b)
        head, _, mac = tok_a.rpartition(".")
        forged = f"{head}.{mac[:-1]}{'B' if mac[-1] != 'B' else 'C'}"
        past = TokenSigner([SecretStr(NEW_KEY)], 60, clock=lambda: time.time() - 3600)
        expired = past.issue(a.submission_id).token
        base = stack.service_url + stack.settings.http.callback_path
        refused: list[tuple[str, str, dict[str, Any], int, str | None]] = [
            ("GET", callback_url(stack, job_a, forged), {}, 403, "token_invalid"),
            ("GET", callback_url(stack, job_a, expired), {}, 401, "token_expired"),
            ("GET", callback_url(stack, job_b, tok_a), {}, 403, "token_job_mismatch"),  # cross-job
            ("GET", callback_url(stack, job_a, None), {}, 401, "token_required"),
            ("GET", callback_url(stack, job_a, "v1.short"), {}, 401, "token_malformed"),
            ("GET", callback_url(stack, job_a, tok_a) + "&token=junk", {}, 401, "token_malformed"),  # two tokens
            ("GET", callback_url(stack, "z" * 32, tok_a), {}, 400, "invalid_job_id"),
            ("GET", callback_url(stack, job_a, tok_a, status="exploded"), {}, 400, "invalid_status"),
            ("POST", f"{base}?token={tok_a}", {"data": b"{nope", "headers": {"Content-Type": "application/json"}}, 400,
             "malformed_body"),
            ("POST", f"{base}?token={tok_a}", {"json": [1, 2]}, 400, "malformed_body"),
            ("POST", f"{base}?token={tok_a}", {"data": b"jobId=\xe4\xe4",
                                               "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
             400, "malformed_body"),  # not UTF-8
            ("POST", f"{base}?token={tok_a}", {"data": b"x" * (80 * 1024),
                                               "headers": {"Content-Type": "application/json"}}, 413, None),
        ]  # fmt: skip
        async with aiohttp.ClientSession() as http:
            for method, url, kw, want_status, want_code in refused:
                status, body = await call(http, method, url, **kw)
                assert status == want_status, (url[-60:], status, body)
                assert body["error"] and body["message"], body
                if want_code:
                    assert body["error"] == want_code, body
            assert await stack.components.queue.depth() == 0  # nothing refused was enqueued
            for item in (await stack.components.ledger.get(job_a), await stack.components.ledger.get(job_b)):
                assert item is not None and item.state == JobState.submitted and item.callback_count == 0

            status, body = await call(http, "GET", callback_url(stack, job_a, tok_a))
            assert (status, body["accepted"], body["job_id"]) == (202, True, job_a)
            status, body = await call(http, "GET", callback_url(stack, job_b, tok_b))
            assert status == 202
            assert await stack.components.queue.depth() == 2
            counts = await callback_counts(http, stack)
        assert counts["accepted"] == 2
        for code in ("token_invalid", "token_expired", "token_job_mismatch", "token_required", "invalid_job_id"):
            assert counts[code] == 1, (code, counts)
        assert counts["token_malformed"] == 2
        assert counts["malformed_body"] == 3
        assert counts["payload_too_large"] == 1, counts
        item_b = await stack.components.ledger.get(job_b)
        assert item_b is not None and item_b.state == JobState.notified and item_b.callback_count == 1
    assert assert_no_secrets(caplog.records, (*SECRETS, tok_a, tok_b, forged, expired)) > 10


async def test_key_rotation_old_key_accepted_while_configured_second(moto_server: MotoServer) -> None:
    old_signer = TokenSigner([SecretStr(OLD_KEY)], 3600)
    async with aiohttp.ClientSession() as http:
        async with running_stack(moto_server.url, sim_config=sim(), tweak=security(), run_worker=False) as stack:
            stack.sim.faults.lose_callbacks = True
            assert stack.components.signer.kids[0] != old_signer.kids[0]  # the new key signs
            old = await submit_quietly(stack, "old", signer=old_signer)
            status, body = await call(http, "GET", callback_url(stack, old.job.id or "", token_of(old)))
            assert status == 202, body
            new = await submit_quietly(stack, "new")
            assert token_of(new).split(".")[3] == stack.components.signer.kids[0]
            status, _ = await call(http, "GET", callback_url(stack, new.job.id or "", token_of(new)))
            assert status == 202
        rotated = security(signing_keys=[SecretStr(NEW_KEY)])
        async with running_stack(moto_server.url, sim_config=sim(), tweak=rotated, run_worker=False) as stack:
            stack.sim.faults.lose_callbacks = True
            old = await submit_quietly(stack, "old", signer=old_signer)
            status, body = await call(http, "GET", callback_url(stack, old.job.id or "", token_of(old)))
            assert (status, body["error"]) == (403, "token_invalid")
            assert await stack.components.queue.depth() == 0


async def _callout_stack_run(stack: Stack, *, preemptive: bool, duplicates: int) -> tuple[str, list[dict[str, Any]]]:
    stack.sim.config.ui_callout = UiCalloutConfig(
        url=stack.service_url + stack.settings.http.callback_path,
        user=BASIC_USER,
        password=BASIC_PASSWORD,
        preemptive=preemptive,
        retry_interval_s=0,
    )
    stack.sim.faults.duplicate_callbacks = duplicates
    submitted = await stack.submit(one_query("callout"))
    job_id = submitted.job.id or ""
    item = await stack.wait_final(job_id, timeout_s=30)
    assert item.state == JobState.published, item
    await stack.sim.settle_callbacks()
    log = [e for e in stack.sim.callback_log if e["job_id"] == job_id]
    return job_id, log


async def test_basic_callout_challenge_first_lands_once_and_redelivery_is_deduplicated(
    moto_server: MotoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tweak = security(basic_user=BASIC_USER, basic_password=SecretStr(BASIC_PASSWORD))
    async with running_stack(moto_server.url, sim_config=sim(0.15), tweak=tweak) as stack:
        job_id, log = await _callout_stack_run(stack, preemptive=False, duplicates=0)
        assert [(e["kind"], e["authorized"], e["status"]) for e in log] == [
            ("ui_callout", False, 401),  # challenge
            ("ui_callout", True, 202),  # accepted and enqueued
        ]
        notification_id = log[0]["notification_id"]
        assert log[1]["notification_id"] == notification_id
        url = stack.service_url + stack.settings.http.callback_path
        fields = {"Aqua.JobId": job_id, "Aqua.JobStatus": "Completed", "Event.Category": "AQuA Data Export Completion"}
        async with aiohttp.ClientSession() as http:
            # Zuora re-delivers the same notification (same Zuora-Notification-Id): answered 200, not enqueued
            for _ in range(2):
                status, body = await call(
                    http,
                    "POST",
                    url,
                    json=fields,
                    headers={
                        "Zuora-Notification-Id": notification_id,
                        "Authorization": aiohttp.encode_basic_auth(BASIC_USER, BASIC_PASSWORD),
                    },
                )
                assert (status, body.get("duplicate")) == (200, True), body
            # wrong password: refused with a challenge, nothing enqueued
            wrong = {"Authorization": aiohttp.encode_basic_auth(BASIC_USER, "not-the-password")}
            async with http.post(url, json=fields, headers=wrong) as resp:
                assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Basic ")
                assert (await resp.json())["error"] == "auth_invalid"
            counts = await callback_counts(http, stack)
        assert (counts["accepted"], counts["duplicate"], counts["auth_required"], counts["auth_invalid"]) == (
            1,
            2,
            1,
            1,
        )
        events = await stack.drain_events()
        assert [e["data"]["job_id"] for e in events] == [job_id]
        item = await stack.components.ledger.get(job_id)
        assert item is not None and item.callback_count == 3 and item.notification_ids == {notification_id}
        assert await stack.components.queue.depth() == 0
    assert assert_no_secrets(caplog.records, SECRETS) > 10


async def test_a_callout_that_could_not_be_enqueued_is_taken_as_new_when_zuora_retries_it(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger counted the callout's notification id, then the work message could not be sent (503): Zuora's
    retry of the same notification must be enqueued, not answered 200 ``duplicate`` and dropped."""
    tweak = security(basic_user=BASIC_USER, basic_password=SecretStr(BASIC_PASSWORD))
    async with running_stack(moto_server.url, sim_config=sim(), tweak=tweak, run_worker=False) as stack:
        stack.sim.faults.lose_callbacks = True
        job_id = (await submit_quietly(stack, "retried")).job.id or ""
        queue = stack.components.queue
        real_send = queue.send

        async def sqs_down(message: WorkMessage, *, delay_s: int = 0) -> str:
            raise QueueError("injected: SQS unavailable")

        url = stack.service_url + stack.settings.http.callback_path
        fields = {"Aqua.JobId": job_id, "Aqua.JobStatus": "Completed"}
        headers = {
            "Zuora-Notification-Id": "notif-3c1d",
            "Authorization": aiohttp.encode_basic_auth(BASIC_USER, BASIC_PASSWORD),
        }
        async with aiohttp.ClientSession() as http:
            monkeypatch.setattr(queue, "send", sqs_down)
            status, body = await call(http, "POST", url, json=fields, headers=headers)
            assert (status, body["error"]) == (503, "unavailable"), body
            monkeypatch.setattr(queue, "send", real_send)
            status, body = await call(http, "POST", url, json=fields, headers=headers)  # Zuora's retry
            assert status == 202 and not body.get("duplicate"), body
            status, body = await call(http, "POST", url, json=fields, headers=headers)  # and a real duplicate
            assert (status, body.get("duplicate")) == (200, True), body
        assert await queue.depth() == 1
        item = await stack.components.ledger.get(job_id)
        assert item is not None and item.notification_ids == {"notif-3c1d"}


async def test_basic_callout_preemptive_lands(moto_server: MotoServer) -> None:
    tweak = security(basic_user=BASIC_USER, basic_password=SecretStr(BASIC_PASSWORD))
    async with running_stack(moto_server.url, sim_config=sim(0.15), tweak=tweak) as stack:
        job_id, log = await _callout_stack_run(stack, preemptive=True, duplicates=0)
        assert [(e["authorized"], e["status"]) for e in log] == [(True, 202)]
        events = await stack.drain_events()
        assert [e["data"]["job_id"] for e in events] == [job_id]


@pytest.mark.parametrize(
    ("trusted", "forwarded_for", "want"),
    [
        ([], None, 403),  # the direct peer (127.0.0.1) is outside the allowlist
        ([], "10.1.2.3", 403),  # X-Forwarded-For from an untrusted peer is ignored
        (["127.0.0.1/32"], "10.1.2.3", 202),  # ... and honoured from the trusted proxy
        (["127.0.0.1/32"], "10.9.9.9, 192.0.2.7", 403),  # a spoofed leftmost entry is not the client
        (["127.0.0.1/32"], None, 403),  # the proxy itself is not an allowed source
        (["127.0.0.1/32"], "not-an-ip", 403),
    ],
)
async def test_allowlist_and_trusted_proxies(
    moto_server: MotoServer, trusted: list[str], forwarded_for: str | None, want: int
) -> None:
    tweak = security(allow_cidrs=["10.0.0.0/8"], trusted_proxies=trusted)
    async with running_stack(moto_server.url, sim_config=sim(), tweak=tweak, run_worker=False) as stack:
        stack.sim.faults.lose_callbacks = True
        submitted = await submit_quietly(stack, "cidr")
        job_id = submitted.job.id or ""
        headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
        async with aiohttp.ClientSession() as http:
            status, body = await call(http, "GET", callback_url(stack, job_id, token_of(submitted)), headers=headers)
            assert status == want, body
            counts = await callback_counts(http, stack)
        if want == 403:
            assert body["error"] == "source_not_allowed"
            assert counts == {"source_not_allowed": 1}
        assert await stack.components.queue.depth() == (1 if want == 202 else 0)
