"""Natural batching: each caller waits for its own item, but while ``max_calls`` calls are in flight, newer items
wait and go together in the next call. An idle batcher sends each item at once; a busy one makes fewer calls,
and its batches grow with the load. The SQS work queue and the ledger's callback fast path both use it.

Two refinements, both off by default, trade a little latency for fewer calls under load (each call costs the
caller about as much CPU whatever its size):

* ``linger_s``: while items arrive less than ``linger_s`` apart (a burst), a call waits until its oldest item has
  waited ``linger_s``, or until a full batch (``full`` items) is ready, so that the items arriving meanwhile share
  it. An item that arrives after a quiet spell still goes at once: a lone item never lingers.
* ``eager_calls`` below ``max_calls``: only the first ``eager_calls`` calls in flight may go out at once with a
  partial batch; the others go with a full batch, or once their oldest item has waited ``linger_s``. Under load
  that fills batches instead of splitting the waiting items over many small calls, while a full batch never
  waits for a free call.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class Waiting(Generic[T, R]):
    """One item and the future its caller awaits; ``attempts``: calls it was in that did not settle it."""

    item: T
    future: asyncio.Future[R] = field(repr=False)
    attempts: int = 0
    since: float = 0.0  # loop time it was submitted

    def settle(self, result: R) -> None:
        if not self.future.done():
            self.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


Send = Callable[[list[Waiting[T, R]]], Awaitable[None]]
"""Makes one call for a batch; settles each entry (:meth:`Waiting.settle`/:meth:`Waiting.fail`) or hands it back
with :meth:`NaturalBatcher.requeue`."""


class NaturalBatcher(Generic[T, R]):
    """Collects items into calls of ``send``; ``take`` picks the next batch from the waiting items (oldest first)
    and returns (batch, rest). ``error`` makes the exception for items left waiting when a call is cancelled
    (at shutdown), so nobody waits forever. ``linger_s``, ``full`` and ``eager_calls`` (default ``max_calls``):
    see the module docstring."""

    def __init__(
        self,
        send: Send[T, R],
        take: Callable[[list[Waiting[T, R]]], tuple[list[Waiting[T, R]], list[Waiting[T, R]]]],
        *,
        error: Callable[[BaseException], Exception],
        max_calls: int = 1,
        eager_calls: int | None = None,
        full: int = 0,
        linger_s: float = 0.0,
        name: str = "batch",
    ) -> None:
        self._send = send
        self._take = take
        self._error = error
        self._max_calls = max_calls
        self._eager_calls = max_calls if eager_calls is None else max(1, min(eager_calls, max_calls))
        self._full = full or 1 << 62
        self._linger_s = linger_s
        self._last_submit = float("-inf")
        self._bursting = False
        self._name = name
        self._waiting: list[Waiting[T, R]] = []
        self._drains: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, item: T) -> R:
        """Wait for ``item``'s own result (or exception), however it was batched."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._bursting, self._last_submit = now - self._last_submit < self._linger_s, now
        entry: Waiting[T, R] = Waiting(item, loop.create_future(), since=now)
        self._waiting.append(entry)
        self._kick()
        return await entry.future

    def _may_call(self, others: int) -> bool:
        """May a call go out now for the waiting items, with ``others`` calls in flight besides it?"""
        if not self._waiting or others >= self._max_calls:
            return False
        if len(self._waiting) >= self._full or (others < self._eager_calls and not self._bursting):
            return True
        return asyncio.get_running_loop().time() - self._waiting[0].since >= self._linger_s

    def _kick(self) -> None:
        """Start a call if one may go out now; else, if one may later, wake up when the oldest item has waited
        ``linger_s``."""
        # A call serves many callers, so it runs in a context of its own, not in that of whichever caller
        # happened to start it: its log lines must not carry one caller's job and track ids.
        if self._may_call(len(self._drains)):
            task = asyncio.create_task(self._drain(), name=self._name, context=contextvars.Context())
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        elif self._waiting and len(self._drains) < self._max_calls and self._timer is None:
            loop = asyncio.get_running_loop()
            when = self._waiting[0].since + self._linger_s
            self._timer = loop.call_at(when, self._wake, context=contextvars.Context())

    def _wake(self) -> None:
        self._timer = None
        self._kick()

    def requeue(self, entries: list[Waiting[T, R]]) -> None:
        """Put unsettled entries back, first in line for the next call."""
        for entry in entries:
            entry.attempts += 1
        self._waiting[:0] = entries

    async def _drain(self) -> None:
        started = True  # its first call was allowed when :meth:`_kick` started it: it takes what waits by now
        try:
            while self._waiting and (started or self._may_call(len(self._drains) - 1)):
                started = False
                batch, self._waiting = self._take(self._waiting)
                try:
                    await self._send(batch)
                except Exception as exc:  # a sender that should have settled its batch raised: a bug
                    log.exception("%s: a call raised; its %d items fail, the others go on", self._name, len(batch))
                    err = self._error(exc)
                    for entry in batch:
                        entry.fail(err)
                    self._waiting = [w for w in self._waiting if not w.future.done()]
                except BaseException as exc:  # cancelled (shutdown): whatever waits must not wait for ever
                    err = self._error(exc)
                    for entry in batch + self._waiting:
                        entry.fail(err)
                    self._waiting.clear()
                    raise
        finally:
            # Leave the in-flight count now, not in the task's done-callback: that runs a loop turn later, and an
            # item submitted in between would see no free call and wait for the next submit to start one.
            task = asyncio.current_task()
            if task is not None:
                self._drains.discard(task)
            if self._waiting:  # what this call left (not allowed to take it, or arrived as it ended)
                self._kick()


def first(n: int) -> Callable[[list[Waiting[T, R]]], tuple[list[Waiting[T, R]], list[Waiting[T, R]]]]:
    """A ``take`` that picks the ``n`` oldest."""

    def take(waiting: list[Waiting[T, R]]) -> tuple[list[Waiting[T, R]], list[Waiting[T, R]]]:
        return waiting[:n], waiting[n:]

    return take
