"""Workloads: the Parquet trace schema, seeded generators and arrival processes.

docs/design.md §7. ``read_trace`` / ``write_trace`` are the file boundary;
``WORKLOADS`` maps ``swe``, ``agentic``, ``longctx`` and ``chat`` to generators; the
arrival functions stamp sessions with arrival times. The ``mars-ray trace`` commands
live in :mod:`mars_ray.workloads.cli` (not imported here, to keep typer and rich out
of library imports).
"""

from .arrivals import assign_arrivals, burst_arrivals, poisson_arrivals
from .generators import WORKLOADS, WorkloadGenerator, generate_workload
from .schema import TRACE_SCHEMA, read_trace, write_trace

__all__ = [
    "TRACE_SCHEMA",
    "WORKLOADS",
    "WorkloadGenerator",
    "assign_arrivals",
    "burst_arrivals",
    "generate_workload",
    "poisson_arrivals",
    "read_trace",
    "write_trace",
]
