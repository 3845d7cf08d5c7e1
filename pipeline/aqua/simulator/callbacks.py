"""Completion notifications (REFERENCE.md §7): the per-job ``notifyUrl`` call and the emulated UI callout.

Delivery runs in background tasks owned by :class:`CallbackSender` (never blocking the job engine); every
HTTP attempt is appended to ``Simulator.callback_log`` (served at ``GET /_sim/callbacks``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from typing import Any

import aiohttp

from pipeline.aqua.simulator.config import UiCalloutConfig
from pipeline.aqua.simulator.jobs import JobState
from pipeline.aqua.simulator.state import Simulator

log = logging.getLogger(__name__)

EVENT_CATEGORY = "AQuA Data Export Completion"
_PLACEHOLDER = re.compile(r"(?:\$|%24)(?:\{|%7B)(JOBID|STATUS)(?:\}|%7D)", re.IGNORECASE)


def substitute(url: str, job_id: str, status: str) -> str:
    """Fill ``${JOBID}`` and ``${STATUS}`` (also percent-encoded, as URL builders leave them)."""
    return _PLACEHOLDER.sub(lambda m: job_id if m[1].upper() == "JOBID" else status, url)


class CallbackSender:
    """Sends the notifications of finished jobs over an injected ``ClientSession``."""

    def __init__(self, sim: Simulator, session: aiohttp.ClientSession) -> None:
        self.sim = sim
        self.session = session
        self._tasks = sim.callback_tasks

    def job_finished(self, job: JobState) -> None:
        """Schedule the notification of ``job`` (the hook the engine calls)."""
        cfg = self.sim.config
        if job.status not in cfg.callback_statuses:
            return
        if cfg.ui_callout is None and not job.notify_url:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(job))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("simulator: callback task failed", exc_info=task.exception())

    async def close(self) -> None:
        """Cancel pending deliveries and wait for them."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def status_word(self, status: str) -> str:
        return status.capitalize() if self.sim.config.callback_status_style == "capitalized" else status

    async def _deliver(self, job: JobState) -> None:
        faults = self.sim.faults
        if faults.callback_delay_s:
            await asyncio.sleep(faults.callback_delay_s)
        if faults.lose_callbacks:
            self._record(kind="lost", url=job.notify_url or "", method="", status=None, job=job)
            return
        notification_id = secrets.token_hex(16)  # one notification, however often it is re-delivered
        for _ in range(1 + faults.duplicate_callbacks):
            callout = self.sim.config.ui_callout
            if callout is not None:
                await self._ui_callout(job, callout, notification_id)
            elif job.notify_url:
                await self._notify_url(job)

    async def _notify_url(self, job: JobState) -> None:
        assert job.notify_url is not None
        url = substitute(job.notify_url, job.id, self.status_word(job.status))
        method = self.sim.config.callback_method
        headers = {"Zuora-Request-Id": secrets.token_hex(16)}
        status: int | None = None
        error: str | None = None
        try:
            async with self.session.request(method, url, headers=headers, timeout=self._timeout()) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = repr(exc)
        self._record(kind="notifyUrl", url=url, method=method, status=status, job=job, error=error)

    def _timeout(self, total: float | None = None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total or self.sim.config.callback_timeout_s)

    async def _ui_callout(self, job: JobState, callout: UiCalloutConfig, notification_id: str) -> None:
        fields = {
            "Aqua.JobId": job.id,
            "Aqua.JobStatus": self.status_word(job.status),
            "Aqua.PartnerName": job.partner or "",
            "Event.Category": EVENT_CATEGORY,
            "Event.Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.sim.clock.now())),
        }
        auth = bool(callout.user)
        for attempt in range(1, callout.max_attempts + 1):
            send_auth = auth and callout.preemptive
            status, challenged = await self._callout_once(callout, fields, notification_id, send_auth, job, attempt)
            if challenged and auth and not send_auth:
                status, _ = await self._callout_once(callout, fields, notification_id, True, job, attempt)
            if status is not None and 200 <= status < 300:
                return
            if attempt < callout.max_attempts:
                await asyncio.sleep(callout.retry_interval_s)
        log.warning("simulator: callout for job %s failed after %d attempts", job.id, callout.max_attempts)

    async def _callout_once(
        self,
        callout: UiCalloutConfig,
        fields: dict[str, str],
        notification_id: str,
        with_auth: bool,
        job: JobState,
        attempt: int,
    ) -> tuple[int | None, bool]:
        headers = {"Zuora-Request-Id": secrets.token_hex(16), "Zuora-Notification-Id": notification_id}
        kwargs: dict[str, Any] = {"headers": headers, "timeout": self._timeout(callout.timeout_s)}
        if with_auth and callout.user:
            headers["Authorization"] = aiohttp.encode_basic_auth(callout.user, callout.password or "")
        if callout.method == "GET":
            kwargs["params"] = fields
        elif callout.body_format == "form":
            kwargs["data"] = fields
        else:
            kwargs["json"] = fields
        status: int | None = None
        error: str | None = None
        challenged = False
        try:
            async with self.session.request(callout.method, callout.url, **kwargs) as resp:
                await resp.read()
                status = resp.status
                challenged = status == 401 and "WWW-Authenticate" in resp.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = repr(exc)
        self._record(
            kind="ui_callout",
            url=callout.url,
            method=callout.method,
            status=status,
            job=job,
            error=error,
            notification_id=notification_id,
            request_id=headers["Zuora-Request-Id"],
            attempt=attempt,
            authorized=with_auth,
        )
        return status, challenged

    def _record(self, *, kind: str, url: str, method: str, status: int | None, job: JobState, **extra: Any) -> None:
        entry = {
            "kind": kind,
            "url": url,
            "method": method,
            "status": status,
            "job_id": job.id,
            "job_status": job.status,
            "time": self.sim.clock.now(),
            **extra,
        }
        self.sim.callback_log.append(entry)
        log.info("simulator: callback %s %s -> %s", method, url.split("?", 1)[0], status)
