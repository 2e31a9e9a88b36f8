"""``MarsScheduler``: MARS inside vLLM 0.29 without a fork (docs/design.md §4 and §10.2).

Plug it in with ``scheduler_cls="mars_ray.vllm.scheduler.MarsScheduler"`` (engine
argument, ``--scheduler-cls``); choose the policy with
``additional_config={"mars": {"policy": "mars"}}`` (any name of
``mars_ray.policies.registry``; default ``mars``). vLLM's ``schedule()`` loop runs
unchanged; MARS acts through five narrow overrides:

1. **Waiting order** - ``self.waiting`` / ``self.skipped_waiting`` are replaced by a
   :class:`~mars_ray.vllm.adapter.PolicyRequestQueue` over the policy's waiting
   queue (MLFQ levels, continuations first, aging), refreshed before each pass.
2. **Victim order** - vLLM's FCFS branch preempts ``self.running.pop()``, the last
   running request. When the policy has a ``custom_victim_order``, the running
   list is sorted before each pass by the policy's ``victim_rank`` so that its
   last element is the policy's victim (MARS: ``max`` by level, fresh prefill,
   arrival); as vLLM schedules running requests front to back, higher priorities
   get budget first. Other policies keep vLLM's order (newest admitted last).
3. **Chunk quanta and shrinking** - ``_reserve_prefill_lookahead`` is the last
   place vLLM trims a chunk before ``allocate_slots``. There the policy's
   ``chunk_quantum_tokens`` (MLFQ: the level's quantum) caps a prefill chunk while
   other requests compete, and a running prefill whose chunk does not fit in the
   free blocks is halved (down to one block) before vLLM would preempt anyone.
   Quanta are shares, not limits: budget the step would leave unused once every
   live request had its quantum goes back to capped prefills in scheduling order
   (work conservation, as the simulator's engine does), estimated when the first
   cap of a pass binds (waiting requests count their whole prompt, since their
   prefix hits are not known yet, so the estimate errs towards capping; only as
   many as ``max_num_seqs`` leaves room for count).
4. **Feedback** - after ``schedule()`` the policy's ``on_scheduled`` sees each
   request's tokens (demotion), the view rewound to its pre-step token count;
   ``_preempt_request`` first tells the policy (the victim re-enters level 0 at
   the front).
5. **Retention** - when a turn ends, ``_free_request_blocks`` asks the retention
   policy (the turn's hints say whether it is the session's last); sessions the
   policy does not expect back soon (MARS: also those on their last turn) have
   their freed blocks moved to the evict-first end of vLLM's free-block queue.
   ``PIN`` (MARS's ``BenefitRetention`` for sessions worth keeping, Continuum's
   ``TtlPinRetention``, InferCept's preserve) holds the turn's cached blocks as the
   simulator does: they keep the reference the finished request had, so they stay
   out of the free queue (unevictable: newcomers wait, running requests are
   preempted instead) and registered in the prefix cache. The pin ends - its
   blocks freed to the LRU (protected) end of the free queue, still cached - at the
   first pass after its TTL on the policy clock, at the end of the pass that
   schedules the session's next turn (whose prefix hit has referenced the blocks by
   then, so they stay with it), when another turn of the session finishes (an
   abort included), or on ``reset_prefix_cache``.
   Blocks without a hash (the partial last block) are freed at once; a last turn,
   a deferred free or several KV cache groups pin nothing (``KEEP_LRU``). An idle
   engine runs no passes, so a pin can outlive its TTL until the next request
   arrives (its blocks are released before that request is scheduled).
   ``OFFLOAD`` is ``EVICT_FIRST`` here (``mars_ray.vllm.offload`` stores the blocks
   in the CPU tier through vLLM's OffloadingConnector).

Private vLLM 0.29 APIs relied on (guarded by ``tests/vllm/test_private_api.py``):

* ``Scheduler.waiting``, ``Scheduler.skipped_waiting`` (``RequestQueue``),
  ``Scheduler.running`` (list; FCFS preemption pops its last element),
  ``Scheduler.requests``, ``Scheduler.policy``, ``Scheduler.defer_block_free``,
  ``Scheduler.processed_step_seq``, ``Request.last_sched_seq`` (deferred frees),
  ``Scheduler.num_lookahead_tokens``, ``Scheduler.max_num_scheduled_tokens`` (the
  step's token budget), ``Scheduler.max_num_running_reqs``; ``Request``
  ``num_tokens_with_spec`` / ``num_output_placeholders`` (what ``schedule()`` would
  give a running request, for the leftover estimate);
* ``Scheduler._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)``;
* ``Scheduler._preempt_request(request, timestamp, drop_stale_output=False)``;
* ``Scheduler._free_request(request, delay_free_blocks=False)``,
  ``Scheduler._free_request_blocks(request)``;
* ``KVCacheManager.block_pool``, ``KVCacheManager.pop_blocks_for_free``,
  ``BlockPool.free_block_queue`` (``remove``, ``prepend_n``), ``BlockPool.free_blocks``
  (releases a pin: one reference per block, cached blocks to the LRU end),
  ``KVCacheBlock`` ``ref_cnt`` / ``block_hash`` / ``is_null``; a block with
  ``ref_cnt >= 1`` is never evicted and keeps its hash (pins rely on it);
* ``Scheduler.reset_prefix_cache(reset_running_requests, reset_connector)``;
  ``SchedulerOutput.scheduled_new_reqs``, ``CachedRequestData.resumed_req_ids``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.request import Request, RequestStatus

from mars_ray.clock import Clock, WallClock
from mars_ray.config import validated
from mars_ray.engine.costmodel import CostModel
from mars_ray.engine.pins import PinTable, turn_end_context
from mars_ray.errors import ConfigError
from mars_ray.policies.base import (
    RetentionAction,
    RetentionDecision,
    SchedulerPolicy,
    TurnEndContext,
)
from mars_ray.policies.registry import PolicyConfig, get_policy
from mars_ray.vllm import validation
from mars_ray.vllm.adapter import PolicyRequestQueue, RequestView, hints_of

logger = logging.getLogger(__name__)

#: key of the scheduler's settings in ``VllmConfig.additional_config``
SETTINGS_KEY = "mars"


@dataclass(frozen=True, slots=True)
class MarsFeatures:
    """Which MARS overrides are active (each also needs the policy to ask for it)."""

    policy_queue: bool = True  # waiting queue ordered by the policy
    victim_order: bool = True  # preempt in the policy's victim_rank order
    chunk_quanta: bool = True  # cap prefill chunks by the policy's quantum under contention
    shrink_chunks: bool = True  # halve chunks before preempting (if the policy shrinks)
    retention: bool = True  # retention decisions: evict-first order, pins
    work_conserving: bool = True  # budget the quanta leave unused goes to capped prefills
    prefill_reservation: bool = True  # a newcomer leaves free what running prefills need

    @classmethod
    def off(cls) -> MarsFeatures:
        """Every override off: the scheduler decides exactly as vLLM's does."""
        return cls(**{f.name: False for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class MarsSchedulerSettings:
    """``additional_config["mars"]``: policy name and tunables, cost-model profile,
    features, clock.

    ``policy_config`` is the whole :class:`PolicyConfig` (MLFQ, retention, admission,
    migration), as a mapping: validated like a deployment's policy-config file, with
    errors naming the key. ``time_scale`` is the policy clock's simulated seconds per
    wall second (its timers, such as MLFQ aging, run that much faster): set it to
    ``1 / sleep_scale`` of a :class:`~mars_ray.vllm.executor.SimulatedExecutor` running
    faster than real time, so that policy time and step time agree. 1 on real GPUs.
    """

    policy: str = "mars"
    gpu: str = "h100-80gb"
    model: str = "llama-3.1-8b"
    features: MarsFeatures = field(default_factory=MarsFeatures)
    time_scale: float = 1.0
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)

    def __post_init__(self) -> None:
        if not (self.time_scale > 0 and math.isfinite(self.time_scale)):
            raise ConfigError(
                f"{SETTINGS_KEY}.time_scale must be finite and > 0, got {self.time_scale}"
            )

    @classmethod
    def from_mapping(cls, given: Mapping[str, Any]) -> MarsSchedulerSettings:
        accepted = ("policy", "gpu", "model", "features", "time_scale", "policy_config")
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            raise ConfigError(
                f"unknown {SETTINGS_KEY} keys {unknown}; accepted: {', '.join(accepted)}"
            )
        features = given.get("features", {})
        if isinstance(features, MarsFeatures):
            features_obj = features
        else:
            names = {f.name for f in fields(MarsFeatures)}
            bad = sorted(set(features) - names)
            if bad:
                raise ConfigError(
                    f"unknown {SETTINGS_KEY}.features {bad}; accepted: {sorted(names)}"
                )
            features_obj = MarsFeatures(**{k: bool(v) for k, v in features.items()})
        return cls(
            policy=str(given.get("policy", "mars")),
            gpu=str(given.get("gpu", "h100-80gb")),
            model=str(given.get("model", "llama-3.1-8b")),
            features=features_obj,
            time_scale=float(given.get("time_scale", 1.0)),
            policy_config=_policy_config(given.get("policy_config")),
        )


def _policy_config(given: object) -> PolicyConfig:
    """``policy_config`` as given (a PolicyConfig, a mapping or nothing), validated."""
    if given is None:
        return PolicyConfig()
    if isinstance(given, PolicyConfig):
        return given
    if not isinstance(given, Mapping):
        raise ConfigError(f"{SETTINGS_KEY}.policy_config must be a mapping, got {given!r}")
    return validated(PolicyConfig, **given)


class MarsScheduler(AsyncScheduler):
    """vLLM's async scheduler with the MARS policy core choosing order and eviction."""

    def __init__(self, *args: Any, clock: Clock | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        extra = self.vllm_config.additional_config
        given = extra.get(SETTINGS_KEY, {}) if isinstance(extra, dict) else {}
        self.settings = MarsSchedulerSettings.from_mapping(given)
        self._clock: Clock = clock or WallClock(self.settings.time_scale)
        spec = get_policy(self.settings.policy)
        policy_config = self.settings.policy_config  # the deployment's tunables, all of them
        self.policy_core: SchedulerPolicy = spec.make_scheduler(policy_config)
        self.retention_policy = spec.make_retention(policy_config)
        self._tool_prior_s = policy_config.retention.tool_time_prior_s
        self._cost = CostModel.from_names(self.settings.gpu, self.settings.model)
        self._views: dict[str, RequestView] = {}
        self._session_service_tokens: dict[str, int] = {}
        # per session until its last turn: first arrival here, context computed so far
        self._session_arrival_s: dict[str, float] = {}
        self._session_context_tokens: dict[str, int] = {}
        self._init_features()
        if not validation.is_registered(self.vllm_config.model_config.logits_processors):
            logger.info(
                "MarsScheduler: session hints are not validated at the API; add "
                "logits_processors=[%r] to answer malformed hints with HTTP 400",
                validation.VALIDATOR_FQCN,
            )
        self.num_shrunk_chunks = 0
        self.retention_actions: Counter[RetentionAction] = Counter()
        # PIN: per session, the cached blocks of its last finished turn, held with one
        # reference each; expiries on the policy clock (stale entries skipped)
        self._pins: PinTable[KVCacheBlock] = PinTable(self._free_pinned)
        self.num_expired_pins = 0  # released by their TTL
        self.num_resumed_pins = 0  # released once the session's next turn was scheduled

    def _init_features(self) -> None:
        features, policy = self.settings.features, self.policy_core
        # newest-first victims are vLLM's own order: sorting would only cost time
        self._victim_order = features.victim_order and policy.custom_victim_order
        self._chunk_quanta = features.chunk_quanta
        self._work_conserving = features.work_conserving
        self._spare_tokens: int | None = None  # this pass's unreserved budget, once estimated
        single_group = len(self.kv_cache_config.kv_cache_groups) == 1
        self._shrink_chunks = features.shrink_chunks and policy.shrink_chunks and single_group
        self._retention = features.retention
        # a pin holds the first (only) group's blocks, as the shrinking code assumes
        self._pins_supported = single_group
        self._reserve_prefills = (
            features.prefill_reservation and policy.reserves_prefill_kv and single_group
        )
        if features.policy_queue:
            if self.policy != SchedulingPolicy.FCFS:
                raise ConfigError(
                    "MarsScheduler orders the queue itself; "
                    "leave vLLM's scheduling policy at 'fcfs'"
                )
            self.waiting = self._make_queue()
            self.skipped_waiting = self._make_queue()

    def _make_queue(self) -> PolicyRequestQueue:
        return PolicyRequestQueue(self.policy_core.make_waiting_queue(), self._views, self._now_s)

    def _now_s(self) -> float:
        return self._clock.now_s()

    # -- arrivals --------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id not in self.requests:  # not a streaming-input update
            self._admit_view(request)
        super().add_request(request)

    def _admit_view(self, request: Request) -> None:
        hints, hinted = hints_of(request)
        served = self._session_service_tokens.get(hints.session_id, 0)
        if hints.service_tokens is not None:  # a global scheduler counted every GPU's share
            served = self._session_service_tokens[hints.session_id] = hints.service_tokens
        session = hints.session_id
        arrival_s = self._session_arrival_s.setdefault(session, request.arrival_time)
        view = RequestView(
            request,
            hints,
            hinted,
            self.block_size,
            served,
            session_arrival_s=arrival_s,
            session_context_tokens=self._session_context_tokens.get(session, 0),
        )
        self._views[request.request_id] = view
        self.policy_core.on_added(view, self._now_s())

    # -- one scheduling pass ---------------------------------------------------
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        self._prepare_pass()
        output = super().schedule(throttle_prefills)
        self._feed_back(output)
        if self._pins:
            self._release_resumed_pins(output)
        return output

    def _prepare_pass(self) -> None:
        """Expired pins back to the free queue; aging in the waiting queues; the
        policy's victim last in ``running``, where vLLM's preemption pops it."""
        if self._pins:
            self.num_expired_pins += self._pins.expire(self._now_s())
        for queue in (self.waiting, self.skipped_waiting):
            if isinstance(queue, PolicyRequestQueue):
                queue.refresh()
        self._spare_tokens = None
        if self._victim_order and len(self.running) > 1:
            views, rank, now_s = self._views, self.policy_core.victim_rank, self._now_s()
            # every running request came through add_request, so it has a view
            self.running.sort(key=lambda request: rank(views[request.request_id], now_s))

    def _feed_back(self, output: SchedulerOutput) -> None:
        """The policy's ``on_scheduled`` for every scheduled request (runs each step)."""
        now_s, views, on_scheduled = self._now_s(), self._views, self.policy_core.on_scheduled
        served = self._session_service_tokens
        for req_id, num_tokens in output.num_scheduled_tokens.items():
            view = views.get(req_id)
            if view is None:
                continue
            request = view.request
            # steady decodes carry no feedback (SchedulerPolicy): one token for a request
            # that has sampled before (counts here are post-step: vLLM advanced them)
            if not (
                request.num_output_tokens > 0
                and request.num_tokens - request.num_computed_tokens + num_tokens <= 1
            ):
                view.num_rewound_tokens = num_tokens  # the policy sees the pre-step count
                try:
                    on_scheduled(view, num_tokens, now_s)
                finally:
                    view.num_rewound_tokens = 0
            session = view.hints.session_id
            served[session] = served.get(session, 0) + num_tokens

    def _reserve_prefill_lookahead(
        self, request: Request, num_computed_tokens: int, num_new_tokens: int
    ) -> int:
        """vLLM's last trim of a chunk before ``allocate_slots``: a newcomer's start
        gate (0: it cannot start, the head of the queue waits), quanta, shrinking."""
        num_new_tokens = super()._reserve_prefill_lookahead(
            request, num_computed_tokens, num_new_tokens
        )
        if (
            self._reserve_prefills
            and request.status != RequestStatus.RUNNING
            and not self._fits_beside_running_prefills(request, num_computed_tokens)
        ):
            return 0
        if num_new_tokens <= 1:
            return num_new_tokens
        view = self._views.get(request.request_id)
        if view is not None and self._chunk_quanta:
            quantum = self.policy_core.chunk_quantum_tokens(view)
            if quantum is not None and num_new_tokens > quantum and self._has_contention():
                num_new_tokens = quantum + self._take_spare_tokens(num_new_tokens - quantum)
        if self._shrink_chunks and request.status == RequestStatus.RUNNING:
            num_new_tokens = self._shrink_to_fit(request, num_computed_tokens, num_new_tokens)
        return num_new_tokens

    def _fits_beside_running_prefills(self, request: Request, num_computed_tokens: int) -> bool:
        """Free blocks cover the newcomer's whole prompt and what the running prefills
        still need to finish (vLLM's own gate checks the prompt alone)."""
        manager = self.kv_cache_manager
        block_size = self.block_size
        need = -(-request.num_tokens // block_size) - num_computed_tokens // block_size
        for running in self.running:
            left = running.num_tokens - running.num_computed_tokens
            if left > 1:  # still prefilling
                held = len(manager.get_block_ids(running.request_id)[0])
                need += max(0, -(-running.num_tokens // block_size) - held)
        return need <= manager.block_pool.get_num_free_blocks()

    def _take_spare_tokens(self, wanted: int) -> int:
        """Up to ``wanted`` tokens of the budget this pass's quanta leave unused."""
        if not self._work_conserving:
            return 0
        if self._spare_tokens is None:  # first cap of the pass: estimate once
            self._spare_tokens = self._unreserved_budget()
        extra = min(wanted, self._spare_tokens)
        self._spare_tokens -= extra
        return extra

    def _unreserved_budget(self) -> int:
        """The step's token budget minus what the requests that can run this step would
        take under their quanta (pre-step counts: vLLM advances them after the pass).

        Those are the running requests and as many waiting ones as ``max_num_seqs``
        leaves room for; when more wait than that, each free slot is counted at the
        queue head's quantum (levels only lower it further down the queue).
        """
        budget = self.max_num_scheduled_tokens
        for request in self.running:
            budget -= self._reserved_tokens(request)
            if budget <= 0:
                return 0
        num_slots = self.max_num_running_reqs - len(self.running)
        queues = [q for q in (self.waiting, self.skipped_waiting) if q]
        num_waiting = sum(len(q) for q in queues)
        if num_waiting <= num_slots:
            budget -= sum(self._reserved_tokens(r) for q in queues for r in q)
        elif num_slots > 0:
            budget -= num_slots * self._head_quantum(queues[0].peek_request())
        return max(0, budget)

    def _reserved_tokens(self, request: Request) -> int:
        """Tokens ``request`` would be scheduled this step under its quantum."""
        remaining = (
            request.num_tokens_with_spec
            + request.num_output_placeholders
            - request.num_computed_tokens
        )
        view = self._views.get(request.request_id)
        if remaining > 1 and view is not None:
            quantum = self.policy_core.chunk_quantum_tokens(view)
            if quantum is not None:
                return min(remaining, quantum)
        return max(0, remaining)

    def _head_quantum(self, head: Request) -> int:
        view = self._views.get(head.request_id)
        quantum = None if view is None else self.policy_core.chunk_quantum_tokens(view)
        return self.max_num_scheduled_tokens if quantum is None else quantum

    def _has_contention(self) -> bool:
        """Quanta only bind while others compete: a request alone is never slowed."""
        return len(self.running) + len(self.waiting) + len(self.skipped_waiting) > 1

    def _shrink_to_fit(self, request: Request, num_computed_tokens: int, num_tokens: int) -> int:
        """Halve a running prefill's chunk (down to one block) until its KV fits.

        Returns the first size that fits, or the one-block size when none does
        (vLLM then preempts, as few victims as that smallest chunk needs).
        """
        manager = self.kv_cache_manager
        num_held = len(manager.get_block_ids(request.request_id)[0])
        num_free = manager.block_pool.get_num_free_blocks()
        extra = self.num_lookahead_tokens

        def fits(n: int) -> bool:
            return -(-(num_computed_tokens + n + extra) // self.block_size) - num_held <= num_free

        if fits(num_tokens):
            return num_tokens
        original = num_tokens
        while num_tokens > self.block_size:
            num_tokens = max(self.block_size, num_tokens // 2)
            if fits(num_tokens):
                break
        if num_tokens < original:
            self.num_shrunk_chunks += 1
        return num_tokens

    def _preempt_request(
        self, request: Request, timestamp: float, drop_stale_output: bool = False
    ) -> None:
        view = self._views.get(request.request_id)
        if view is not None:  # before vLLM re-queues it, so it ranks at its new level
            self.policy_core.on_preempted(view, self._now_s())
        super()._preempt_request(request, timestamp, drop_stale_output=drop_stale_output)

    # -- turn end: retention ---------------------------------------------------
    def _free_request(
        self, request: Request, delay_free_blocks: bool = False
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        view = self._views.get(request.request_id)
        if view is not None and self._pins:
            # Another turn of the session ends (scheduled, or aborted while waiting):
            # an earlier turn's pin is of no more use (this turn may pin anew, below).
            self._pins.unpin(view.session_id)
        result = super()._free_request(request, delay_free_blocks=delay_free_blocks)
        view = self._views.pop(request.request_id, None)
        if view is None:
            return result
        session = view.session_id
        if view.hints.last_turn:
            self._session_service_tokens.pop(session, None)
            self._session_arrival_s.pop(session, None)
            self._session_context_tokens.pop(session, None)
        elif request.is_finished():
            self._session_context_tokens[session] = request.num_computed_tokens
        return result

    def _free_request_blocks(self, request: Request) -> None:
        if request.is_finished() and self._frees_now(request):
            decision = self.retention_decision(request)
            action = decision.action
            self.retention_actions[action] += 1
            if action is RetentionAction.EVICT_FIRST:
                self._free_evict_first(request)
                return
            if action is RetentionAction.PIN:
                self._pin_request_blocks(request, decision.ttl_s)
                return
        super()._free_request_blocks(request)

    def _frees_now(self, request: Request) -> bool:
        """vLLM frees a request's blocks at once unless a step still in flight may write
        them (async scheduling with a consumer KV connector: ``defer_block_free``);
        deferred blocks return to the pool later in vLLM's order, beyond retention."""
        return not self.defer_block_free or request.last_sched_seq <= self.processed_step_seq

    def retention_action(self, request: Request) -> RetentionAction:
        """Where a finished turn's blocks go: ``KEEP_LRU``, ``EVICT_FIRST`` or ``PIN``."""
        return self.retention_decision(request).action

    def retention_decision(self, request: Request) -> RetentionDecision:
        """The retention policy's decision for a finished turn, as this adapter
        carries it out: ``OFFLOAD`` becomes ``EVICT_FIRST``; ``PIN`` stays ``PIN``
        (with its TTL) unless nothing would come back for the blocks - a last turn,
        a TTL that is not positive, several KV cache groups - then ``KEEP_LRU``."""
        view = self._views.get(request.request_id)
        if view is None or not self._retention or not view.hinted:
            # a plain request: vLLM's LRU prefix cache
            return RetentionDecision(RetentionAction.KEEP_LRU, reason="vllm lru")
        # A last turn goes to the policy too (is_last_turn): MARS evicts it first,
        # vLLM's own LRU (fcfs) keeps it in the LRU order, as in the simulator.
        decision = self.retention_policy.on_turn_end(self._turn_end_context(view))
        if decision.action is RetentionAction.OFFLOAD:
            return RetentionDecision(RetentionAction.EVICT_FIRST, reason=decision.reason)
        if decision.action is RetentionAction.PIN and not (
            decision.ttl_s > 0 and self._pins_supported and not view.hints.last_turn
        ):
            return RetentionDecision(RetentionAction.KEEP_LRU, reason=decision.reason)
        return decision

    def _turn_end_context(self, view: RequestView) -> TurnEndContext:
        pool = self.kv_cache_manager.block_pool
        num_total = pool.num_gpu_blocks - 1  # the null block is never handed out
        return turn_end_context(
            self._cost,
            session_id=view.session_id,
            num_blocks=view.num_blocks,
            context_tokens=view.request.num_tokens,
            predicted_tool_s=view.hints.expected_tool_s or self._tool_prior_s,
            num_total_blocks=num_total,
            num_used_blocks=num_total - pool.get_num_free_blocks(),
            # re-prefill in chunks of this engine's own budget, as the simulator prices it
            chunk_budget_tokens=self.scheduler_config.max_num_batched_tokens,
            can_offload=False,
            is_last_turn=view.hints.last_turn,
        )

    def _free_evict_first(self, request: Request) -> None:
        """Free the request's blocks to the head of the free queue (reused first)."""
        pool = self.kv_cache_manager.block_pool
        tail_first = self.kv_cache_manager.pop_blocks_for_free(request)[::-1]
        pool.free_blocks(tail_first)
        # free_blocks appended the cached ones to the LRU end; move them to the head.
        freed = [b for b in tail_first if _now_free_and_cached(b)]
        for block in freed:
            pool.free_block_queue.remove(block)
        pool.free_block_queue.prepend_n(freed)

    # -- turn end: pins ----------------------------------------------------------
    def _pin_request_blocks(self, request: Request, ttl_s: float) -> None:
        """Hold the finished turn's cached blocks for ``ttl_s`` on the policy clock.

        The request's reference on each cached block passes to the pin, so the blocks
        stay out of the free queue (unevictable) and in the prefix cache by hash; the
        rest (the partial last block, null blocks) is freed as vLLM frees it.
        """
        session = self._views[request.request_id].session_id  # hinted: it has a view
        blocks = self.kv_cache_manager.pop_blocks_for_free(request)
        held = [b for b in blocks if not b.is_null and b.block_hash is not None]
        rest = [b for b in blocks if b.is_null or b.block_hash is None]
        self.kv_cache_manager.block_pool.free_blocks(reversed(rest))
        self._pins.unpin(session)
        if held:
            self._pins.pin(session, held, self._now_s() + ttl_s)

    def _free_pinned(self, blocks: list[KVCacheBlock]) -> None:
        """A released pin's blocks join the LRU end of the free queue (those a running
        request references meanwhile stay with it); tail first, as vLLM frees: within
        the pin, the tail is evicted first."""
        self.kv_cache_manager.block_pool.free_blocks(reversed(blocks))

    def _release_resumed_pins(self, output: SchedulerOutput) -> None:
        """A session whose next turn was (re)admitted in this pass no longer needs its
        pin: vLLM's prefix hit has referenced the pinned blocks already, so releasing
        them leaves them with that request, out of the free queue."""
        req_ids = [new.req_id for new in output.scheduled_new_reqs]
        req_ids.extend(output.scheduled_cached_reqs.resumed_req_ids)
        for req_id in req_ids:
            view = self._views.get(req_id)
            if view is not None and self._pins.unpin(view.session_id):
                self.num_resumed_pins += 1
                if not self._pins:
                    return

    def next_pin_expiry_s(self) -> float | None:
        """When the earliest pin expires (policy clock), or None without pins."""
        return self._pins.next_expiry_s()

    def reset_prefix_cache(
        self, reset_running_requests: bool = False, reset_connector: bool = False
    ) -> bool:
        """Pins hold cached KV only: they are released first, or vLLM's reset would
        fail on the blocks they hold."""
        self._pins.release_all()
        return super().reset_prefix_cache(
            reset_running_requests=reset_running_requests, reset_connector=reset_connector
        )

    # -- introspection (tests, stats) -----------------------------------------
    @property
    def applies_victim_rank(self) -> bool:
        """Whether ``running`` is sorted by the policy's ``victim_rank`` each pass."""
        return self._victim_order

    def view_of(self, request_id: str) -> RequestView:
        """The policy's view of a live request."""
        return self._views[request_id]

    @property
    def num_live_views(self) -> int:
        """Requests the policy tracks (every unfinished request; 0 when idle)."""
        return len(self._views)

    @property
    def num_session_entries(self) -> int:
        """Sessions with recorded service (dropped at their last turn)."""
        return len(self._session_service_tokens)

    @property
    def num_pinned_blocks(self) -> int:
        """Blocks pinned now (held for sessions in a tool call, not in the free queue)."""
        return self._pins.num_blocks

    @property
    def pinned_sessions(self) -> frozenset[str]:
        """Sessions whose KV is pinned now."""
        return self._pins.sessions()


def _now_free_and_cached(block: KVCacheBlock) -> bool:
    return block.ref_cnt == 0 and not block.is_null and block.block_hash is not None
