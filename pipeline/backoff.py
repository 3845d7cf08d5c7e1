"""Capped exponential backoff with full jitter, shared by every retry loop."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, *, base: float, cap: float, retry_after: float | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based).

    Full jitter over ``min(cap, base * 2**(attempt-1))``; a server's ``Retry-After`` is a floor.
    """
    ceiling = min(cap, base * (2 ** max(attempt - 1, 0)))
    delay = random.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay
