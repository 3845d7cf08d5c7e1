"""Natural batching of the callback fast path: the ledger's conditional count of a token callback
(:meth:`~pipeline.ledger.JobLedger.record_token_callback`), grouped into TransactWriteItems under load.

An idle receiver counts each callback at once with its own UpdateItem, exactly as without batching. While
``max_calls`` ledger calls of the fast path are in flight, newer callbacks wait and go together in the next call:
one TransactWriteItems of up to ``max_items`` callbacks of distinct jobs. One AWS SDK call costs the receiver
~1.1 ms of CPU here, a transaction of 10 about 2 ms (``python -m bench.callbacks --aws stub``), so under load the
ledger's share of each callback falls several-fold, and the batches grow with the load.

A transaction is all or nothing. When DynamoDB cancels one, the callbacks whose own condition failed take the
general path (None, as from ``record_token_callback``); the others were not written and are counted again, first
in the next batch, then, if cancelled once more, each with its own UpdateItem. So every callback ends counted
exactly once or refused, whatever the mix. Callbacks with a ``Zuora-Notification-Id`` (UI callouts) always take
the single call: their de-duplication needs the item as it was before, which a transaction does not return.

With ``linger_s`` (the service sets ``ledger.callback_linger_ms``), callbacks that arrive in a burst (less than
``linger_s`` apart) wait up to that long for others to share their call even when no call is in flight; a
callback after a quiet spell is counted at once (figures: ``docs/benchmarks.md``).

Cost against real DynamoDB: a transactional write consumes twice the write capacity of a plain one, for items
of a few hundred bytes; it only happens when callbacks overlap. IAM authorizes each ``Update`` of a transaction as
``dynamodb:UpdateItem``, which the task role in ``infra/`` already grants.
"""

from __future__ import annotations

import asyncio
import logging

from pipeline.batching import NaturalBatcher, Waiting
from pipeline.errors import LedgerError
from pipeline.ledger import RETRY, CallbackRecord, JobLedger, TokenCallback

log = logging.getLogger(__name__)

MAX_TRANSACTION_ITEMS = 100  # DynamoDB's limit for one TransactWriteItems

_Waiting = Waiting[TokenCallback, CallbackRecord | None]


class TokenCallbackBatcher:
    """Counts token callbacks for the receiver; see the module docstring. ``max_items`` 1 turns batching off."""

    def __init__(self, ledger: JobLedger, *, max_items: int = 25, max_calls: int = 1, linger_s: float = 0.0) -> None:
        if not 1 <= max_items <= MAX_TRANSACTION_ITEMS:
            raise ValueError(f"max_items must be 1..{MAX_TRANSACTION_ITEMS}")
        self._ledger = ledger
        self._max_items = max_items
        self._batcher: NaturalBatcher[TokenCallback, CallbackRecord | None] = NaturalBatcher(
            self._settle,
            self._take,
            error=lambda exc: LedgerError(f"callback not recorded: {exc!r}"),
            max_calls=max_calls,
            full=max_items,
            linger_s=linger_s,
            name="ledger-callback-batch",
        )
        self.transactions = 0  # TransactWriteItems calls made, for tests
        self.batched = 0  # callbacks those calls counted
        self.max_calls = max_calls
        """Ledger calls in flight at most."""

    async def record(
        self, job_id: str, *, submission_id: str, status: str | None, notification_id: str | None
    ) -> CallbackRecord | None:
        """Count one token callback on the fast path; what :meth:`JobLedger.record_token_callback` answers."""
        call = TokenCallback(job_id, submission_id, status, notification_id)
        if notification_id is not None or self._max_items == 1:
            return await self._single(call)
        return await self._batcher.submit(call)

    async def _single(self, call: TokenCallback) -> CallbackRecord | None:
        return await self._ledger.record_token_callback(
            call.job_id, submission_id=call.submission_id, status=call.status, notification_id=call.notification_id
        )

    def _take(self, waiting: list[_Waiting]) -> tuple[list[_Waiting], list[_Waiting]]:
        """Up to ``max_items`` waiting callbacks of distinct jobs, oldest first (a job's later callbacks wait)."""
        batch: list[_Waiting] = []
        rest: list[_Waiting] = []
        jobs: set[str] = set()
        for w in waiting:
            if len(batch) < self._max_items and w.item.job_id not in jobs:
                jobs.add(w.item.job_id)
                batch.append(w)
            else:
                rest.append(w)
        return batch, rest

    async def _settle(self, batch: list[_Waiting]) -> None:
        if len(batch) == 1:
            await self._settle_single(batch[0])
        else:
            await self._settle_batch(batch)

    async def _settle_single(self, w: _Waiting) -> None:
        try:
            w.settle(await self._single(w.item))
        except Exception as exc:
            w.fail(exc)

    async def _settle_batch(self, batch: list[_Waiting]) -> None:
        self.transactions += 1
        try:
            results = await self._ledger.record_token_callbacks([w.item for w in batch])
        except Exception as exc:
            for w in batch:
                w.fail(exc)
            return
        again: list[_Waiting] = []
        for w, result in zip(batch, results, strict=True):
            if result is RETRY:
                again.append(w)
            else:
                self.batched += result is not None
                w.settle(result)
        if not again:
            return
        log.debug("ledger transaction of %d callbacks cancelled; %d to count again", len(batch), len(again))
        twice = [w for w in again if w.attempts]  # cancelled in an earlier transaction too: each on its own now
        self._batcher.requeue([w for w in again if not w.attempts])  # first in the next batch
        await asyncio.gather(*(self._settle_single(w) for w in twice))
