"""The simulator's clock: wall time plus an offset that tests move forward (retention, token expiry)."""

from __future__ import annotations

import time


class Clock:
    """Injectable time source. ``now()`` is epoch seconds; ``advance()`` moves it forward."""

    def __init__(self, start: float | None = None) -> None:
        self._offset = 0.0 if start is None else start - time.time()

    def now(self) -> float:
        """Current simulated epoch seconds."""
        return time.time() + self._offset

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds``; returns the new time."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self._offset += seconds
        return self.now()
