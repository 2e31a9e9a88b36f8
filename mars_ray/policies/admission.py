"""Admission control: the AIMD window of MARS, and the unlimited one of the baselines."""

from __future__ import annotations

import math
from collections.abc import Sequence

from mars_ray.config import AdmissionConfig
from mars_ray.policies.base import (
    AdmissionDecision,
    AdmissionPolicy,
    AdmissionSnapshot,
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

    Every tick: ``W *= 0.7`` while the CPU or the KV is overloaded; ``W += 1`` when
    both are healthy; otherwise hold. With ``hysteresis`` (the authors' controller)
    "overloaded" is a flag set at the high marks (KV usage >= 0.90, tools per core
    >= 2.0 or tool delay >= 5 s) and cleared only at the low marks (KV <= 0.85,
    tools per core <= 1.0 and delay <= 2 s); without it, the high marks themselves.
    Then the caps: ``W <= ceil(1.5 * tool workers)``, a KV cap falling linearly
    from ``W_max`` to ``W_min`` as KV usage goes 0.85 -> 0.90, and
    ``W_min <= W <= W_max``. The bounds are per GPU and scale with ``num_gpus``.

    Signals measured longer than ``stale_signal_after_s`` ago are stale: the window
    is then at most ``stale_window_per_gpu`` and no long session starts.

    Order: FCFS without pressure, shortest expected work first under KV pressure,
    longest first while the CPU is overloaded (long prefills keep the CPU free).
    :meth:`select` then takes sessions in that order, skipping (leaving queued):

    * a long session (first prompt above ``long_prefill_tokens``) while
      ``long_max_in_flight_per_gpu`` long ones are still in their first turn
      (``tail_long_max_in_flight_per_gpu`` when only long sessions are queued:
      tail mode);
    * with ``kv_fit``, a session whose first prompt does not fit the KV budget:
      the KV left below ``kv_decrease_above`` (``tail_kv_budget_frac`` in tail
      mode), less the first prompts of admitted sessions still in their first turn
      (the engines' figures do not hold them yet).
    """

    def __init__(self, config: AdmissionConfig, num_gpus: float = 1) -> None:
        # ``num_gpus`` may be fractional: GPUs weighted by capacity (a mixed cluster)
        self._config = config
        self._num_gpus = num_gpus
        self._w_min = max(1, round(config.window_min_per_gpu * num_gpus))
        self._w_max = max(self._w_min, round(config.window_max_per_gpu * num_gpus))
        self._window = float(config.window_init_per_gpu * num_gpus)
        self._pressure = Pressure.NONE
        self._cpu_overloaded = False
        self._kv_overloaded = False
        self._stale = False
        self._signals: ClusterSignals | None = None
        #: admitted sessions still in their first turn: (first prompt tokens, long)
        self._first_turns: dict[str, tuple[int, bool]] = {}

    def window(self) -> int | None:
        if self._stale:
            stale_window = max(1, round(self._config.stale_window_per_gpu * self._num_gpus))
            return min(int(self._window), stale_window)
        return int(self._window)

    @property
    def pressure(self) -> Pressure:
        return self._pressure

    @property
    def overloaded(self) -> tuple[bool, bool]:
        """The (CPU, KV) overload flags after the last tick."""
        return self._cpu_overloaded, self._kv_overloaded

    def on_tick(self, signals: ClusterSignals, now_s: float) -> AdmissionDecision:
        cfg = self._config
        self._signals = signals
        ratio, wait_s, kv = signals.tool_load_ratio, signals.tool_wait_ema_s, signals.kv_usage
        cpu_high = ratio >= cfg.cpu_overload_ratio or wait_s >= cfg.tool_wait_overload_s
        cpu_healthy = ratio <= cfg.cpu_healthy_ratio and wait_s <= cfg.tool_wait_healthy_s
        kv_high, kv_low = kv >= cfg.kv_decrease_above, kv <= cfg.kv_increase_below
        if cfg.hysteresis:
            self._cpu_overloaded = cpu_high or (self._cpu_overloaded and not cpu_healthy)
            self._kv_overloaded = kv_high or (self._kv_overloaded and not kv_low)
        else:
            self._cpu_overloaded, self._kv_overloaded = cpu_high, kv_high
        self._stale = (
            signals.observed_s is not None and now_s - signals.observed_s > cfg.stale_signal_after_s
        )
        if self._stale:
            reason = "stale signals"
        elif self._cpu_overloaded or self._kv_overloaded:
            self._window *= cfg.multiplicative_decrease
            reason = "decrease: cpu overloaded" if self._cpu_overloaded else "decrease: kv high"
        elif cpu_healthy and kv_low:
            self._window += cfg.additive_increase
            reason = "increase"
        else:
            reason = "hold"
        self._window = max(float(self._w_min), min(self._window, self._cap(signals)))
        if self._cpu_overloaded:
            self._pressure = Pressure.CPU
        elif kv > cfg.kv_increase_below or self._kv_overloaded:
            self._pressure = Pressure.KV
        else:
            self._pressure = Pressure.NONE
        return AdmissionDecision(self.window(), self._pressure, reason)

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

    def may_exceed_window(self) -> bool:
        """Work conservation may start one more session on an idle GPU only while
        neither overload flag is up and the signals are fresh: starting one then would
        not thrash the KV or the tool pool."""
        return not (self._stale or self._cpu_overloaded or self._kv_overloaded)

    def order(self, waiting: Sequence[SessionTicket]) -> list[SessionTicket]:
        if self._pressure is Pressure.CPU:
            return sorted(waiting, key=lambda t: (-t.expected_work_tokens, t.arrival_s))
        if self._pressure is Pressure.KV:
            return sorted(waiting, key=lambda t: (t.expected_work_tokens, t.arrival_s))
        return sorted(waiting, key=lambda t: t.arrival_s)

    def is_long(self, ticket: SessionTicket) -> bool:
        limit = self._config.long_prefill_tokens
        return limit > 0 and ticket.expected_work_tokens > limit

    def select(self, waiting: Sequence[SessionTicket], free_slots: int) -> list[SessionTicket]:
        if free_slots <= 0 or not waiting:
            return []
        cfg = self._config
        tail = all(self.is_long(t) for t in waiting) and not self._stale
        per_gpu = cfg.tail_long_max_in_flight_per_gpu if tail else cfg.long_max_in_flight_per_gpu
        long_free = 0 if self._stale else round(per_gpu * self._num_gpus)
        long_free -= sum(1 for _, long in self._first_turns.values() if long)
        budget_tokens = self._kv_budget_tokens(tail)
        selected: list[SessionTicket] = []
        for ticket in self.order(waiting):
            if len(selected) >= free_slots:
                break
            long = self.is_long(ticket)
            if long and long_free <= 0:
                continue
            if budget_tokens is not None:
                if ticket.expected_work_tokens > budget_tokens:
                    continue  # a smaller session behind it may still fit
                budget_tokens -= ticket.expected_work_tokens
            long_free -= long
            self._first_turns[ticket.session_id] = (ticket.expected_work_tokens, long)
            selected.append(ticket)
        return selected

    def _kv_budget_tokens(self, tail: bool) -> float | None:
        """KV tokens the next admissions may take; None when not packing by KV."""
        signals, cfg = self._signals, self._config
        if not cfg.kv_fit or signals is None or signals.kv_capacity_tokens <= 0:
            return None
        target = cfg.tail_kv_budget_frac if tail else cfg.kv_decrease_above
        pending = sum(tokens for tokens, _ in self._first_turns.values())
        return (target - signals.kv_usage) * signals.kv_capacity_tokens - pending

    def on_first_turn_done(self, session_id: str) -> None:
        self._first_turns.pop(session_id, None)

    def on_session_done(self, session_id: str) -> None:
        self._first_turns.pop(session_id, None)

    def snapshot(self) -> AdmissionSnapshot:
        return AdmissionSnapshot(
            window=self._window,
            pressure=self._pressure,
            cpu_overloaded=self._cpu_overloaded,
            kv_overloaded=self._kv_overloaded,
            stale=self._stale,
            signals=self._signals,
            first_turns=tuple((sid, t, long) for sid, (t, long) in self._first_turns.items()),
        )

    def restore(self, snapshot: AdmissionSnapshot | None) -> None:
        if snapshot is None:
            raise ValueError("an AIMD window needs its snapshot to restore")
        self._window = snapshot.window
        self._pressure = snapshot.pressure
        self._cpu_overloaded = snapshot.cpu_overloaded
        self._kv_overloaded = snapshot.kv_overloaded
        self._stale = snapshot.stale
        self._signals = snapshot.signals
        self._first_turns = {sid: (t, long) for sid, t, long in snapshot.first_turns}
