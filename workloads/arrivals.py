"""Session arrival processes (docs/design.md §7): Poisson at a session rate, or bursts.

Generators leave ``arrival_s = 0``; these functions draw arrival times and
:func:`assign_arrivals` stamps them onto sessions. Times are seconds from the start
of the run, non-decreasing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from mars_ray.errors import ConfigError
from mars_ray.session import SessionSpec

FloatArray = npt.NDArray[np.float64]


def _check_num_sessions(num_sessions: int) -> None:
    if num_sessions < 0:
        raise ConfigError(f"number of sessions must be >= 0, got {num_sessions}")


def poisson_arrivals(num_sessions: int, rate_per_s: float, rng: np.random.Generator) -> FloatArray:
    """Arrival times of a Poisson process of ``rate_per_s`` sessions per second.

    Inter-arrival gaps are exponential with mean ``1 / rate_per_s``; as in ``vllm
    bench serve``, the first session arrives at t = 0 rather than after one gap.
    """
    _check_num_sessions(num_sessions)
    if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
        raise ConfigError(f"rate must be > 0 sessions/s, got {rate_per_s:g}")
    if num_sessions == 0:
        return np.zeros(0)
    gaps_s = rng.exponential(1.0 / rate_per_s, num_sessions - 1)
    return np.concatenate(([0.0], np.cumsum(gaps_s)))


def burst_arrivals(
    num_sessions: int, burst_size: int | None = None, interval_s: float = 0.0
) -> FloatArray:
    """Arrivals in bursts of ``burst_size`` sessions, one burst every ``interval_s``.

    With ``burst_size=None`` (the default) every session arrives at t = 0.
    """
    _check_num_sessions(num_sessions)
    if burst_size is not None and burst_size < 1:
        raise ConfigError(f"burst size must be >= 1 session, got {burst_size}")
    if not (interval_s >= 0 and math.isfinite(interval_s)):
        raise ConfigError(f"burst interval must be >= 0 s, got {interval_s:g}")
    if burst_size is None:
        return np.zeros(num_sessions)
    burst_index = np.arange(num_sessions) // burst_size
    return burst_index.astype(np.float64) * float(interval_s)


def assign_arrivals(
    sessions: Sequence[SessionSpec], times_s: Sequence[float] | FloatArray
) -> list[SessionSpec]:
    """Session ``i`` arrives at ``times_s[i]``; the order of ``sessions`` is kept."""
    times = np.asarray(times_s, dtype=np.float64)
    if len(times) != len(sessions):
        raise ConfigError(f"got {len(times)} arrival times for {len(sessions)} sessions")
    bad = ~np.isfinite(times) | (times < 0)
    if bad.any():
        index = int(np.argmax(bad))
        raise ConfigError(f"arrival times must be finite and >= 0 s, got {times[index]} at {index}")
    return [session.with_arrival(t) for session, t in zip(sessions, times.tolist(), strict=True)]


def gamma_arrivals(
    num_sessions: int, rate_per_s: float, rng: np.random.Generator, burstiness: float = 1.0
) -> FloatArray:
    """Bursty arrivals: a gamma renewal process with mean rate ``rate_per_s``.

    ``vllm bench serve --burstiness``'s convention: the gaps are
    Gamma(shape=``burstiness``, scale=``1 / (rate_per_s x burstiness)``), so their mean
    is ``1 / rate_per_s`` and their coefficient of variation ``1 / sqrt(burstiness)``.
    ``burstiness = 1`` is a Poisson process; below 1 arrivals clump (0.25: CV 2, bursts
    separated by long lulls at the same mean rate); above 1 they are more regular. As
    in :func:`poisson_arrivals`, the first session arrives at t = 0.
    """
    _check_num_sessions(num_sessions)
    if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
        raise ConfigError(f"rate must be > 0 sessions/s, got {rate_per_s:g}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ConfigError(f"burstiness must be finite and > 0, got {burstiness:g}")
    if num_sessions == 0:
        return np.zeros(0)
    scale_s = 1.0 / (rate_per_s * burstiness)
    gaps_s = rng.gamma(burstiness, scale_s, num_sessions - 1)
    return np.concatenate(([0.0], np.cumsum(gaps_s)))
