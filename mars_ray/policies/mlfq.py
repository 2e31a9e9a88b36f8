"""MARS's engine-side scheduling: a multi-level feedback queue whose priority order
is also the preemption (eviction) order, with chunk shrinking (docs/design.md §4).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from mars_ray.config import MlfqConfig
from mars_ray.policies.base import R, SchedulableRequest, SchedulerPolicy, WaitingQueue
from mars_ray.policies.queues import LeveledQueue


@dataclass(slots=True)
class MlfqState:
    """Per-request MLFQ state, kept in ``request.policy_state``."""

    feedback_level: int = 0  # raised by demotion, lowered by aging and preemption
    level: int = 0  # effective: max(feedback, remaining-prefill bucket); 0 when decoding
    resuming: bool = False  # preempted, and its recompute has not caught up yet


#: first turns rank after every continuation of their level (a tie-break offset
#: larger than any session arrival time)
_FIRST_TURNS_AFTER_S = 1e12


class MlfqScheduler(SchedulerPolicy):
    """MLFQ over turns.

    * A request's level is ``max(feedback level, bucket of its remaining prefill)``;
      decoding requests are level 0. "Remaining prefill" is the turn's own: the
      tokens beyond its session's earlier context, which was computed once already.
      Re-prefilling context the system itself evicted is not held against the
      session (it would be penalised twice: evicted, then ranked low for it).
    * Level ``l`` caps the request's prefill chunk at ``quanta_tokens[l]`` per step;
      using the full quantum with prefill left demotes it one level.
    * Aging: one level up per ``aging_s`` waiting unserved.
    * Within a level, continuations (turn > 0) go before first turns, and older
      sessions before younger ones: admitted sessions finish in order instead of
      all progressing at once (a round robin over turns keeps every session's KV
      live and finishes none early).
    * A preempted request returns to level 0 at the front of the queue and stays
      there until its recompute catches up (``resuming``).
    * Victim: the lowest-priority running request, ``max`` by (level, fresh
      prefill, session arrival, turn arrival): priority order is the eviction
      order, decodes and resuming requests go after fresh prefills of their level,
      and within that the youngest session's turn goes first, so the oldest always
      progresses. The original "most KV blocks first" tie-break was dropped after
      measurement (docs/design.md §11): with KV full it preempts the same long
      contexts again and again as they re-prefill (livelock; on ``swe`` at
      saturation it recomputed 5x the tokens FCFS did).
    * The engine starts a waiting request only if the KV the running prefills still
      need stays free too (``reserves_prefill_kv``): a started prefill is never
      preempted half-way by a lower-priority newcomer that took its blocks.

    ``unified_eviction=False`` (an ablation) keeps the MLFQ order but preempts the
    newest request, as vLLM does; ``reserve_prefill_kv=False`` (an ablation) leaves
    only vLLM's own gate (the newcomer's prompt fits).
    """

    def __init__(
        self,
        config: MlfqConfig,
        *,
        shrink_chunks: bool = True,
        unified_eviction: bool = True,
        reserve_prefill_kv: bool = True,
    ) -> None:
        self._config = config
        self._buckets = list(config.prefill_bucket_tokens)
        self._last_level = config.num_levels - 1
        self.shrink_chunks = shrink_chunks
        self.reserves_prefill_kv = reserve_prefill_kv
        self._unified_eviction = unified_eviction
        self.custom_victim_order = unified_eviction

    # -- levels ---------------------------------------------------------------
    def bucket_level(self, remaining_prefill_tokens: int) -> int:
        """Level implied by the prefill still to do (<=2048 -> 0, <=8192 -> 1, ...)."""
        return bisect.bisect_left(self._buckets, remaining_prefill_tokens)

    def _effective_level(self, request: SchedulableRequest, state: MlfqState) -> int:
        if request.num_tokens - request.num_computed_tokens <= 1 or state.resuming:
            return 0
        return max(state.feedback_level, self.bucket_level(self._prefill_left(request, 0)))

    @staticmethod
    def _prefill_left(request: SchedulableRequest, num_scheduled: int) -> int:
        """The prefill a level's bucket is read from: the turn's own tokens left once
        ``num_scheduled`` more are computed (context the session computed in earlier
        turns does not count)."""
        done = max(request.num_computed_tokens + num_scheduled, request.session_context_tokens)
        return max(0, request.num_tokens - done)

    # -- queue ----------------------------------------------------------------
    def make_waiting_queue(self) -> WaitingQueue:
        return LeveledQueue(self._config.num_levels, self._rank, self._promote_at, self._promote)

    def _rank(self, request: SchedulableRequest, now_s: float) -> tuple[int, float]:
        state: MlfqState = request.policy_state
        first_turn = 0.0 if request.turn_index > 0 else _FIRST_TURNS_AFTER_S
        return state.level, first_turn + request.session_arrival_s

    def _promote_at(self, request: SchedulableRequest, now_s: float) -> float | None:
        state: MlfqState = request.policy_state
        return now_s + self._config.aging_s if state.level > 0 else None

    def _promote(self, request: SchedulableRequest, now_s: float) -> None:
        state: MlfqState = request.policy_state
        state.level -= 1
        state.feedback_level = min(state.feedback_level, state.level)

    # -- engine hooks ---------------------------------------------------------
    def on_added(self, request: SchedulableRequest, now_s: float) -> None:
        state = MlfqState()
        state.level = self._effective_level(request, state)
        request.policy_state = state

    def chunk_quantum_tokens(self, request: SchedulableRequest) -> int | None:
        state: MlfqState = request.policy_state
        return self._config.quanta_tokens[state.level]

    def order_running_prefills(self, requests: list[R]) -> list[R]:
        if len(requests) > 1:
            requests.sort(key=lambda r: (r.policy_state.level, r.session_arrival_s, r.arrival_s))
        return requests

    def on_scheduled(self, request: SchedulableRequest, num_tokens: int, now_s: float) -> None:
        state: MlfqState = request.policy_state
        remaining_after = request.num_tokens - request.num_computed_tokens - num_tokens
        if state.resuming:
            state.resuming = remaining_after > 0
            return
        if remaining_after > 0 and num_tokens >= self._config.quanta_tokens[state.level]:
            state.feedback_level = min(self._last_level, state.level + 1)
        if remaining_after > 0:
            own_left = self._prefill_left(request, num_tokens)
            state.level = max(state.feedback_level, self.bucket_level(own_left))
        else:
            state.level = 0

    def victim_rank(
        self, request: SchedulableRequest, now_s: float
    ) -> tuple[int, bool, float, float] | tuple[float]:
        if not self._unified_eviction:
            return (request.arrival_s,)
        state: MlfqState = request.policy_state
        fresh_prefill = request.is_prefilling and not state.resuming
        return (state.level, fresh_prefill, request.session_arrival_s, request.arrival_s)

    def on_preempted(self, request: SchedulableRequest, now_s: float) -> None:
        state: MlfqState = request.policy_state
        state.feedback_level = 0
        state.level = 0
        state.resuming = True
