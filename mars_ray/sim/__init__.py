"""Discrete-event cluster simulator: the same policy objects, in virtual time."""

from mars_ray.sim.simulator import ClusterSim, simulate

__all__ = ["ClusterSim", "simulate"]
