"""``create_simulator_app``: the one factory that wires the simulator's state, routes and background work."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from pipeline.aqua.simulator.api import add_routes, add_zuora_headers, zuora_middleware
from pipeline.aqua.simulator.callbacks import CallbackSender
from pipeline.aqua.simulator.clock import Clock
from pipeline.aqua.simulator.config import SimulatorConfig
from pipeline.aqua.simulator.control import add_control_routes
from pipeline.aqua.simulator.keys import SIMULATOR_KEY, WINDOW_KEY, RequestWindow
from pipeline.aqua.simulator.state import Simulator


def create_simulator_app(config: SimulatorConfig | None = None, *, clock: Clock | None = None) -> web.Application:
    """The simulator as an aiohttp app; ``app[SIMULATOR_KEY]`` is its :class:`Simulator`."""
    sim = Simulator(config or SimulatorConfig(), clock)
    app = web.Application(middlewares=[zuora_middleware])
    app[SIMULATOR_KEY] = sim
    app[WINDOW_KEY] = RequestWindow(start=sim.clock.now())
    add_routes(app)
    add_control_routes(app)
    app.on_response_prepare.append(add_zuora_headers)
    app.cleanup_ctx.append(_engine)
    app.cleanup_ctx.append(_callbacks)
    return app


async def _engine(app: web.Application) -> AsyncIterator[None]:
    """Owns the job tasks: cancelled and awaited on cleanup."""
    yield
    await app[SIMULATOR_KEY].close()


async def _callbacks(app: web.Application) -> AsyncIterator[None]:
    """Owns the callback HTTP session and the delivery tasks."""
    sim = app[SIMULATOR_KEY]
    timeout = aiohttp.ClientTimeout(total=sim.config.callback_timeout_s, connect=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sender = CallbackSender(sim, session)
        sim.on_job_finished = sender.job_finished
        try:
            yield
        finally:
            sim.on_job_finished = None
            await sender.close()
