"""The Simulator: runs strategies over a simulated fleet and accounts bytes."""

from coevo.sim.experiment import run
from coevo.sim.simulator import SimulationResult, simulate, wire_bytes

__all__ = ["SimulationResult", "run", "simulate", "wire_bytes"]
