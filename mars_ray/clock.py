"""Injected time. Policy code never reads the wall clock; it is handed a Clock."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Source of the current time in seconds (monotonic, arbitrary origin)."""

    def now_s(self) -> float: ...


class VirtualClock:
    """Simulated time, advanced only by the event loop that owns it."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now_s = start_s

    def now_s(self) -> float:
        return self._now_s

    def advance_to(self, t_s: float) -> None:
        # Invariant: virtual time never goes backwards.
        if t_s < self._now_s:
            raise ValueError(f"virtual clock cannot go back from {self._now_s} to {t_s}")
        self._now_s = t_s


class WallClock:
    """Wall-clock time, optionally sped up: ``time_scale`` simulated seconds per real second."""

    def __init__(self, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self._time_scale = time_scale
        self._origin_s = time.monotonic()

    def now_s(self) -> float:
        return (time.monotonic() - self._origin_s) * self._time_scale
