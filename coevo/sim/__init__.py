"""The Simulator: runs strategies over a simulated fleet and accounts bytes."""

from coevo.sim.clock import Fleet
from coevo.sim.experiment import run
from coevo.sim.ray_backend import RayExecutor
from coevo.sim.simulator import SimulationResult, simulate
from coevo.sim.wire import wire_bytes

__all__ = ["Fleet", "RayExecutor", "SimulationResult", "run", "simulate", "wire_bytes"]
