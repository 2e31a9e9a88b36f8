"""Admission control: the AIMD window of MARS, and the unlimited one of the baselines."""

from __future__ import annotations

import math
from collections.abc import Sequence

from mars_ray.config import AdmissionConfig
from mars_ray.policies.base import (
    AdmissionDecision,
    AdmissionPolicy,
    ClusterSignals,
    Pressure,
    SessionTicket,
)


class UnlimitedAdmission(AdmissionPolicy):
    """Every session starts on arrival, in arrival order."""

    def window(self) -> int | None:
        return None

    def on_tick(self, signals: ClusterSignals, now_s: float) -> AdmissionDecision:
        return AdmissionDecision(None, Pressure.NONE, "unlimited")

    def order(self, waiting: Sequence[SessionTicket]) -> list[SessionTicket]:
        return sorted(waiting, key=lambda t: t.arrival_s)


class AimdAdmission(AdmissionPolicy):
    """Additive-increase / multiplicative-decrease window over KV and CPU signals.

    Every tick: ``W += 1`` when the CPU is healthy and KV usage is low; ``W *= 0.7``
    when the CPU is overloaded or KV usage is high; otherwise hold. Then the caps:
    ``W <= ceil(1.5 * tool workers)``, a KV cap falling linearly from ``W_max`` to
    ``W_min`` as KV usage goes 0.85 -> 0.90, and ``W_min <= W <= W_max``. The
    bounds are per GPU and scale with ``num_gpus`` (the GPUs this window covers).

    Order: FCFS without pressure, shortest expected work first under KV pressure,
    longest first while the CPU is overloaded (long prefills keep the CPU free).
    """

    def __init__(self, config: AdmissionConfig, num_gpus: int = 1) -> None:
        self._config = config
        self._w_min = config.window_min_per_gpu * num_gpus
        self._w_max = config.window_max_per_gpu * num_gpus
        self._window = float(config.window_init_per_gpu * num_gpus)
        self._pressure = Pressure.NONE

    def window(self) -> int | None:
        return int(self._window)

    @property
    def pressure(self) -> Pressure:
        return self._pressure

    def on_tick(self, signals: ClusterSignals, now_s: float) -> AdmissionDecision:
        cfg = self._config
        ratio, wait_s, kv = signals.tool_load_ratio, signals.tool_wait_ema_s, signals.kv_usage
        cpu_overloaded = ratio >= cfg.cpu_overload_ratio or wait_s >= cfg.tool_wait_overload_s
        cpu_healthy = ratio <= cfg.cpu_healthy_ratio and wait_s <= cfg.tool_wait_healthy_s
        if cpu_overloaded or kv >= cfg.kv_decrease_above:
            self._window *= cfg.multiplicative_decrease
            reason = "decrease: cpu overloaded" if cpu_overloaded else "decrease: kv high"
        elif cpu_healthy and kv <= cfg.kv_increase_below:
            self._window += cfg.additive_increase
            reason = "increase"
        else:
            reason = "hold"
        self._window = max(float(self._w_min), min(self._window, self._cap(signals)))
        if cpu_overloaded:
            self._pressure = Pressure.CPU
        elif kv > cfg.kv_increase_below:
            self._pressure = Pressure.KV
        else:
            self._pressure = Pressure.NONE
        return AdmissionDecision(int(self._window), self._pressure, reason)

    def _cap(self, signals: ClusterSignals) -> float:
        cfg = self._config
        tool_cap = math.ceil(cfg.tool_worker_cap_factor * signals.num_tool_workers)
        span = cfg.kv_decrease_above - cfg.kv_increase_below
        if signals.kv_usage <= cfg.kv_increase_below or span <= 0:
            kv_cap = float(self._w_max)
        else:
            frac = min(1.0, (signals.kv_usage - cfg.kv_increase_below) / span)
            kv_cap = self._w_max - frac * (self._w_max - self._w_min)
        return min(float(self._w_max), float(tool_cap), kv_cap)

    def order(self, waiting: Sequence[SessionTicket]) -> list[SessionTicket]:
        if self._pressure is Pressure.CPU:
            return sorted(waiting, key=lambda t: (-t.expected_work_tokens, t.arrival_s))
        if self._pressure is Pressure.KV:
            return sorted(waiting, key=lambda t: (t.expected_work_tokens, t.arrival_s))
        return sorted(waiting, key=lambda t: t.arrival_s)
