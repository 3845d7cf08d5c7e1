"""Every ``AppKey`` of the simulator app, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from pipeline.aqua.simulator.state import Simulator


@dataclass
class RequestWindow:
    """Requests in the current simulated minute, and requests in flight."""

    start: float = 0.0
    count: int = 0
    inflight: int = 0


SIMULATOR_KEY = web.AppKey("simulator", Simulator)
WINDOW_KEY = web.AppKey("simulator_window", RequestWindow)
