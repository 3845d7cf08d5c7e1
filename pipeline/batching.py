"""Natural batching: each caller waits for its own item, but while ``max_calls`` calls are in flight, newer items
wait and go together in the next call. An idle batcher sends each item at once; a busy one makes fewer calls,
and its batches grow with the load. The SQS work queue and the ledger's callback fast path both use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class Waiting(Generic[T, R]):
    """One item and the future its caller awaits; ``attempts``: calls it was in that did not settle it."""

    item: T
    future: asyncio.Future[R] = field(repr=False)
    attempts: int = 0

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
    (at shutdown), so nobody waits forever."""

    def __init__(
        self,
        send: Send[T, R],
        take: Callable[[list[Waiting[T, R]]], tuple[list[Waiting[T, R]], list[Waiting[T, R]]]],
        *,
        error: Callable[[BaseException], Exception],
        max_calls: int = 1,
        name: str = "batch",
    ) -> None:
        self._send = send
        self._take = take
        self._error = error
        self._max_calls = max_calls
        self._name = name
        self._waiting: list[Waiting[T, R]] = []
        self._drains: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        """Wait for ``item``'s own result (or exception), however it was batched."""
        entry: Waiting[T, R] = Waiting(item, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        if len(self._drains) < self._max_calls:
            task = asyncio.create_task(self._drain(), name=self._name)
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        return await entry.future

    def requeue(self, entries: list[Waiting[T, R]]) -> None:
        """Put unsettled entries back, first in line for the next call."""
        for entry in entries:
            entry.attempts += 1
        self._waiting[:0] = entries

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._take(self._waiting)
                try:
                    await self._send(batch)
                except BaseException as exc:
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


def first(n: int) -> Callable[[list[Waiting[T, R]]], tuple[list[Waiting[T, R]], list[Waiting[T, R]]]]:
    """A ``take`` that picks the ``n`` oldest."""

    def take(waiting: list[Waiting[T, R]]) -> tuple[list[Waiting[T, R]], list[Waiting[T, R]]]:
        return waiting[:n], waiting[n:]

    return take
