"""Engine-side scheduling of the baselines (docs/design.md §5), in the same stack as MARS."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from mars_ray.policies.base import R, SchedulableRequest, SchedulerPolicy, WaitingQueue
from mars_ray.policies.queues import FifoQueue, LeveledQueue


class FcfsScheduler(SchedulerPolicy):
    """vLLM's default: FIFO queue, no chunk quanta, preempt the newest running request."""

    def make_waiting_queue(self) -> WaitingQueue:
        return FifoQueue()


class ProgramFcfsScheduler(SchedulerPolicy):
    """Program-level FCFS (Continuum): whole sessions in order of session arrival.

    Victim: the newest session's newest turn.
    """

    custom_victim_order = True

    def make_waiting_queue(self) -> WaitingQueue:
        return LeveledQueue(1, _by_session_arrival, _never, _no_promotion)

    def order_running_prefills(self, requests: list[R]) -> list[R]:
        requests.sort(key=lambda r: r.session_arrival_s)
        return requests

    def victim_rank(self, request: SchedulableRequest, now_s: float) -> tuple[float, float]:
        return (request.session_arrival_s, request.arrival_s)


def _by_session_arrival(request: SchedulableRequest, now_s: float) -> tuple[int, float]:
    return 0, request.session_arrival_s


def _never(request: SchedulableRequest, now_s: float) -> float | None:
    return None


def _no_promotion(request: SchedulableRequest, now_s: float) -> None:
    return None


@dataclass(slots=True)
class PlasState:
    level: int = 0
    enqueued_s: float = 0.0


class PlasScheduler(SchedulerPolicy):
    """Autellix's program-level attained service (PLAS).

    A turn's level comes from its session's total attained service (tokens, across
    turns and GPUs) against ``thresholds_tokens``; a request that has waited at
    least ``starvation_ratio`` x its session's attained service time jumps to
    level 0 (anti-starvation). Victim: lowest priority (highest level), newest.
    """

    custom_victim_order = True

    def __init__(
        self,
        thresholds_tokens: tuple[int, ...] = (2048, 8192, 32768),
        starvation_ratio: float = 2.0,
        min_starvation_s: float = 1.0,
    ) -> None:
        self._thresholds = list(thresholds_tokens)
        self._ratio = starvation_ratio
        self._min_starvation_s = min_starvation_s

    def level_of(self, service_tokens: int) -> int:
        return bisect.bisect_left(self._thresholds, service_tokens)

    def make_waiting_queue(self) -> WaitingQueue:
        return LeveledQueue(len(self._thresholds) + 1, self._rank, self._promote_at, self._promote)

    def _rank(self, request: SchedulableRequest, now_s: float) -> tuple[int, float]:
        state: PlasState = request.policy_state
        state.enqueued_s = now_s
        return state.level, request.arrival_s

    def _promote_at(self, request: SchedulableRequest, now_s: float) -> float | None:
        state: PlasState = request.policy_state
        if state.level == 0:
            return None
        return now_s + max(self._min_starvation_s, self._ratio * request.session_service_s)

    def _promote(self, request: SchedulableRequest, now_s: float) -> None:
        state: PlasState = request.policy_state
        state.level = 0

    def on_added(self, request: SchedulableRequest, now_s: float) -> None:
        request.policy_state = PlasState(level=self.level_of(self._attained(request)))

    @staticmethod
    def _attained(request: SchedulableRequest) -> int:
        return request.session_service_tokens + request.num_computed_tokens

    def order_running_prefills(self, requests: list[R]) -> list[R]:
        requests.sort(key=lambda r: (r.policy_state.level, r.arrival_s))
        return requests

    def on_preempted(self, request: SchedulableRequest, now_s: float) -> None:
        request.policy_state.level = self.level_of(self._attained(request))

    def victim_rank(self, request: SchedulableRequest, now_s: float) -> tuple[int, float]:
        return (self.level_of(self._attained(request)), request.arrival_s)
