"""The local AQuA simulator: a faithful stand-in for Zuora's AQuA API over real HTTP (docs/simulator.md)."""

from pipeline.aqua.simulator.app import create_simulator_app
from pipeline.aqua.simulator.clock import Clock
from pipeline.aqua.simulator.config import Faults, SimulatorConfig, UiCalloutConfig
from pipeline.aqua.simulator.keys import SIMULATOR_KEY
from pipeline.aqua.simulator.state import Simulator, aiter_file, file_digest

__all__ = [
    "SIMULATOR_KEY",
    "Clock",
    "Faults",
    "Simulator",
    "SimulatorConfig",
    "UiCalloutConfig",
    "aiter_file",
    "create_simulator_app",
    "file_digest",
]
