"""A node's CPU tool pool in virtual time: processor sharing over its cores.

A tool call first waits ``wait_s`` (I/O, network: no CPU), then needs ``cpu_s``
of CPU. CPU phases share the cores equally: with ``n`` of them on ``c`` cores each
runs at rate ``min(1, c / n)``, so CPU time stretches once more CPU-bound tools
run than there are cores. The pool reports what admission control reads: tools
in flight, the EMA of each call's delay beyond its uncontended time, CPU use.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ToolCall:
    call_id: int
    session_id: str
    cpu_s: float
    wait_s: float
    start_s: float
    remaining_cpu_s: float = 0.0

    @property
    def ideal_s(self) -> float:
        return self.cpu_s + self.wait_s


class ToolPool:
    """Processor-sharing CPU pool. The owner schedules an event at
    :meth:`next_event_s` and calls :meth:`advance` then; both are O(tools running)."""

    def __init__(self, node_id: int, num_cores: int, wait_ema_alpha: float = 0.2) -> None:
        self.node_id = node_id
        self.num_cores = num_cores
        self._alpha = wait_ema_alpha
        self._waiting: list[tuple[float, ToolCall]] = []  # (cpu phase starts at, call)
        self._cpu: list[ToolCall] = []
        self._last_s = 0.0
        self.wait_ema_s = 0.0
        self.busy_core_s = 0.0
        self.num_completed = 0
        self.total_delay_s = 0.0

    @property
    def num_in_flight(self) -> int:
        return len(self._waiting) + len(self._cpu)

    def _rate(self) -> float:
        n = len(self._cpu)
        return 1.0 if n <= self.num_cores else self.num_cores / n

    def _progress(self, now_s: float) -> None:
        elapsed = now_s - self._last_s
        if elapsed > 0 and self._cpu:
            rate = self._rate()
            for call in self._cpu:
                call.remaining_cpu_s -= elapsed * rate
            self.busy_core_s += elapsed * min(len(self._cpu), self.num_cores)
        self._last_s = now_s

    def start(self, call: ToolCall, now_s: float) -> None:
        self._progress(now_s)
        call.remaining_cpu_s = call.cpu_s
        self._waiting.append((now_s + call.wait_s, call))

    def next_event_s(self) -> float | None:
        """The next time a call changes phase or finishes (None: idle)."""
        times = [t for t, _ in self._waiting]
        if self._cpu:
            rate = self._rate()
            times.append(self._last_s + min(c.remaining_cpu_s for c in self._cpu) / rate)
        return min(times) if times else None

    def advance(self, now_s: float) -> list[ToolCall]:
        """Move to ``now_s``; returns the calls that finished."""
        self._progress(now_s)
        eps = 1e-9
        finished: list[ToolCall] = []
        still_waiting = []
        for ready_s, call in self._waiting:
            if ready_s <= now_s + eps:
                (self._cpu if call.remaining_cpu_s > eps else finished).append(call)
            else:
                still_waiting.append((ready_s, call))
        self._waiting = still_waiting
        running: list[ToolCall] = []
        for call in self._cpu:
            (finished if call.remaining_cpu_s <= eps else running).append(call)
        self._cpu = running
        for call in finished:
            self._observe(call, now_s)
        return finished

    def _observe(self, call: ToolCall, now_s: float) -> None:
        delay_s = max(0.0, (now_s - call.start_s) - call.ideal_s)
        self.wait_ema_s = self._alpha * delay_s + (1 - self._alpha) * self.wait_ema_s
        self.num_completed += 1
        self.total_delay_s += delay_s
