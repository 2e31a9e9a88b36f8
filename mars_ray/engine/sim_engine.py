"""SimEngine: one simulated GPU running vLLM-style continuous batching.

The engine is time-agnostic: a runtime calls :meth:`SimEngine.plan_step` at time
``now_s`` and gets a :class:`StepPlan` with its end time, then calls
:meth:`SimEngine.complete_step` at that time. The simulator drives it in virtual
time; a Ray actor can drive it in (scaled) wall-clock time.

Scheduling is delegated to a :class:`SchedulerPolicy` (queue order, quanta,
victims, chunk shrinking); this module owns only the mechanism: the token budget,
KV blocks, prefix caching, preemption by recompute, and step timing from the cost
model. When a batch is decode-only and nothing can join it, several identical
decode steps are planned at once (their times follow in closed form) so that the
simulator stays fast; :meth:`SimEngine.interrupt` cuts such a run short at the next
step boundary when a request arrives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

from mars_ray.config import EngineConfig
from mars_ray.engine.costmodel import CostModel, num_kv_blocks
from mars_ray.engine.kv_cache import BlockPool, CpuTier
from mars_ray.engine.pins import PinTable, turn_end_context
from mars_ray.engine.request import EngineRequest
from mars_ray.errors import InfeasibleError
from mars_ray.policies.base import (
    EngineLoad,
    RetentionAction,
    RetentionDecision,
    RetentionPolicy,
    SchedulerPolicy,
    TurnEndContext,
)

MAX_DECODE_RUN_STEPS = 256  # cap on steps planned at once (bounds interrupt cost)

# What an engine's load is computed from: ids, free blocks, running, waiting,
# retained blocks, capacity weight.
_LoadKey = tuple[int, int, int, int, int, int, float]


@dataclass(slots=True)
class StepPlan:
    """What one engine runs next: ``num_steps`` identical-shape steps (1 unless decode-only)."""

    scheduled: list[tuple[EngineRequest, int]]  # (request, tokens per step)
    start_s: float
    first_step_s: float  # duration of the first step
    step_increment_s: float  # each further step is this much longer (growing KV reads)
    num_steps: int
    extra_s: float = 0.0  # CPU-tier reloads stalling the step

    def elapsed_s(self, num_steps: int) -> float:
        """Duration of the first ``num_steps`` steps."""
        return (
            num_steps * self.first_step_s
            + self.step_increment_s * num_steps * (num_steps - 1) / 2
            + self.extra_s
        )

    @property
    def end_s(self) -> float:
        return self.start_s + self.elapsed_s(self.num_steps)


@dataclass(slots=True)
class EngineStats:
    """Cumulative counters of one engine."""

    num_steps: int = 0
    busy_s: float = 0.0
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0
    num_offloaded_blocks: int = 0
    num_reloaded_blocks: int = 0


class SimEngine:
    """One GPU: waiting queue, running batch, KV block pool, cost model."""

    def __init__(
        self,
        engine_id: int,
        cost: CostModel,
        config: EngineConfig,
        policy: SchedulerPolicy,
        *,
        node_id: int = 0,
        capacity_weight: float = 1.0,
    ) -> None:
        self.engine_id = engine_id
        self.node_id = node_id
        self.capacity_weight = capacity_weight
        self.cost = cost
        self.config = config
        self.policy = policy
        self.pool = BlockPool(num_kv_blocks(cost, config), config.enable_prefix_caching)
        block_bytes = cost.kv_bytes_per_token * config.block_size
        self.cpu_tier = (
            CpuTier(int(config.cpu_offload_gb * 1e9 // block_bytes))
            if config.cpu_offload_gb > 0
            else None
        )
        self.waiting = policy.make_waiting_queue()
        self.running: list[EngineRequest] = []
        self.plan: StepPlan | None = None
        self.stats = EngineStats()
        self._pins: PinTable[int] = PinTable(self.pool.free)
        self._bs = config.block_size
        self._pending_reload_s = 0.0  # CPU-tier loads to add to the next step
        # Blocks of sessions in a tool call whose KV was kept for their return: the
        # part of the working set that KV usage alone does not show.
        self._retained_blocks: dict[str, int] = {}
        self._num_retained_blocks = 0
        self._load_cache: tuple[_LoadKey, EngineLoad] | None = None

    # -- capacity ---------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        """The longest context one request may reach on this engine."""
        return self.pool.num_blocks * self._bs

    def check_fits(self, session_id: str, context_tokens: int) -> None:
        """Raise InfeasibleError if a context can never fit in this GPU's KV cache."""
        if context_tokens > self.max_tokens:
            raise InfeasibleError(
                f"session {session_id} needs {context_tokens} tokens of KV cache but one "
                f"GPU holds {self.max_tokens} ({self.cost.profile.name}); use a larger GPU "
                f"or a shorter context"
            )

    @property
    def kv_demand(self) -> float:
        """KV working set / capacity: blocks held (running, pinned) plus blocks of
        sessions in a tool call that were kept for their return. Can exceed 1, which
        is exactly when returning sessions will find their KV evicted (thrashing)."""
        return (self.pool.num_used_blocks + self._num_retained_blocks) / self.pool.num_blocks

    def load(self) -> EngineLoad:
        # Placement reads every engine's load per decision, far more often than an
        # engine changes; the load is a function of this key, so reuse it until then.
        key: _LoadKey = (
            self.engine_id,
            self.node_id,
            self.pool.num_free_blocks,
            len(self.running),
            len(self.waiting),
            self._num_retained_blocks,
            self.capacity_weight,
        )
        cached = self._load_cache
        if cached is None or cached[0] != key:
            load = EngineLoad(
                self.engine_id,
                self.node_id,
                self.pool.usage,
                len(self.running),
                len(self.waiting),
                self.capacity_weight,
                self.kv_demand,
            )
            cached = self._load_cache = (key, load)
        return cached[1]

    @property
    def is_busy(self) -> bool:
        return self.plan is not None

    @property
    def has_work(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    # -- requests ---------------------------------------------------------------
    def add_request(self, request: EngineRequest, now_s: float) -> None:
        """Queue a turn. The caller then plans a step if the engine is idle, or calls
        :meth:`interrupt` if it is in a multi-step decode run."""
        self.check_fits(request.session_id, request.num_prompt_tokens + request.max_output_tokens)
        self.policy.on_added(request, now_s)
        self.waiting.add(request, now_s)

    def abort(self, request: EngineRequest) -> bool:
        """Drop a turn nobody waits for any more (its client went away); its blocks go
        to the evict-first end of the free queue. Returns False if it was not here.
        Call between steps only (not while a plan that includes it is in flight)."""
        if request.is_running:
            request.is_running = False
            self.running = [r for r in self.running if r is not request]
        elif request in self.waiting:
            self.waiting.remove(request)
        else:
            return False
        blocks, request.block_ids = request.block_ids, []
        self.pool.free(blocks, evict_first=True)
        return True

    def interrupt(self, now_s: float) -> bool:
        """Cut a multi-step decode run at the first step boundary at or after ``now_s``.
        Returns True when the plan's end time changed."""
        plan = self.plan
        if plan is None or plan.num_steps == 1:
            return False
        done = self._steps_done_by(plan, now_s - plan.start_s)
        if done >= plan.num_steps:
            return False
        plan.num_steps = done
        return True

    @staticmethod
    def _steps_done_by(plan: StepPlan, elapsed_s: float) -> int:
        """Smallest j >= 1 whose first j steps end at or after ``elapsed_s``."""
        a, b = plan.step_increment_s / 2, plan.first_step_s - plan.step_increment_s / 2
        target = elapsed_s - plan.extra_s
        if a > 0:
            j = math.ceil((-b + math.sqrt(max(0.0, b * b + 4 * a * target))) / (2 * a))
        else:
            j = math.ceil(target / plan.first_step_s) if plan.first_step_s > 0 else 1
        j = max(1, j)
        while j > 1 and plan.elapsed_s(j - 1) >= elapsed_s:  # float guard
            j -= 1
        while plan.elapsed_s(j) < elapsed_s and j < plan.num_steps:
            j += 1
        return j

    # -- planning ---------------------------------------------------------------
    def plan_step(self, now_s: float) -> StepPlan | None:
        """Choose the next step's batch and its duration; None when there is nothing
        to run (see :meth:`next_wakeup_s`)."""
        assert self.plan is None, "plan_step while a step is in flight"
        self._pins.expire(now_s)
        self.waiting.refresh(now_s)
        sched: dict[EngineRequest, int] = {}
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(sched, budget, now_s)
        waiting_blocked, budget = self._schedule_waiting(sched, budget, now_s)
        if budget > 0:
            self._hand_out_leftover(sched, budget)
        if not sched:
            return None
        on_scheduled = self.policy.on_scheduled
        for request, num_tokens in sched.items():
            # steady decodes carry no feedback (SchedulerPolicy); the first token does
            if (
                request.num_output_tokens == 0
                or request.num_tokens - request.num_computed_tokens > 1
            ):
                on_scheduled(request, num_tokens, now_s)
        self.plan = self._make_plan(sched, now_s, waiting_blocked)
        return self.plan

    def _schedule_running(self, sched: dict[EngineRequest, int], budget: int, now_s: float) -> int:
        decodes, prefills = [], []
        for request in self.running:
            if request.num_tokens - request.num_computed_tokens == 1:
                decodes.append(request)
            else:
                prefills.append(request)
        bs = self._bs
        for request in decodes:
            if not request.is_running or budget <= 0:
                continue
            # fast path: the token fits in the last block already held
            if request.num_computed_tokens < len(request.block_ids) * bs or self._ensure_blocks(
                request, 1, sched, now_s, may_preempt=True
            ):
                sched[request] = 1
                budget -= 1
        for request in self.policy.order_running_prefills(prefills):
            if not request.is_running or budget <= 0:
                continue
            num_tokens = self._fit_chunk(request, self._chunk(request, budget), sched, now_s, True)
            if num_tokens > 0:
                sched[request] = num_tokens
                budget -= num_tokens
        return budget

    def _schedule_waiting(
        self, sched: dict[EngineRequest, int], budget: int, now_s: float
    ) -> tuple[bool, int]:
        """Start waiting requests in queue order; True if the head was blocked on KV."""
        waiting = self.waiting
        while budget > 0 and len(waiting) > 0 and len(self.running) < self.config.max_num_seqs:
            request = cast(EngineRequest, waiting.peek())
            if not request.started and not self._take_prefix(request, now_s):
                return True, budget
            if self.config.reserve_full_prompt and not self._whole_prompt_fits(request):
                self._return_prefix(request)
                return True, budget
            num_tokens = self._fit_chunk(request, self._chunk(request, budget), sched, now_s, False)
            if num_tokens == 0:
                self._return_prefix(request)
                return True, budget
            waiting.pop()
            request.is_running = True
            self.running.append(request)
            sched[request] = num_tokens
            budget -= num_tokens
        return False, budget

    def _whole_prompt_fits(self, request: EngineRequest) -> bool:
        """vLLM's admission gate for waiting and preempted requests: free KV covers the
        whole prompt, not just its first chunk. A policy that ``reserves_prefill_kv``
        also keeps free what the running prefills still need to finish, so a newcomer
        never takes the blocks a started prefill is about to fill."""
        need = self._blocks_for(request.num_tokens) - len(request.block_ids)
        if self.policy.reserves_prefill_kv:
            for running in self.running:
                if running.num_tokens - running.num_computed_tokens > 1:
                    need += max(0, self._blocks_for(running.num_tokens) - running.num_blocks)
        return self.pool.can_allocate(need)

    def _hand_out_leftover(self, sched: dict[EngineRequest, int], budget: int) -> None:
        """Work conservation: budget the quanta left unused goes to capped prefills."""
        for request, num_tokens in list(sched.items()):
            if budget <= 0:
                return
            left = request.num_tokens - request.num_computed_tokens - num_tokens
            if left <= 0:
                continue
            extra = min(left, budget)
            need = self._blocks_for(request.num_computed_tokens + num_tokens + extra)
            new_blocks = self.pool.allocate(max(0, need - len(request.block_ids)))
            if new_blocks is None:
                continue
            request.block_ids.extend(new_blocks)
            sched[request] = num_tokens + extra
            budget -= extra

    def _chunk(self, request: EngineRequest, budget: int) -> int:
        num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
        quantum = self.policy.chunk_quantum_tokens(request)
        return num_tokens if quantum is None else min(num_tokens, quantum)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self._bs)

    def _ensure_blocks(
        self,
        request: EngineRequest,
        num_tokens: int,
        sched: dict[EngineRequest, int],
        now_s: float,
        may_preempt: bool,
    ) -> bool:
        """Allocate KV for ``num_tokens`` more tokens, preempting victims if allowed.
        False if ``request`` itself was preempted or may not preempt."""
        need = self._blocks_for(request.num_computed_tokens + num_tokens) - len(request.block_ids)
        while need > 0:
            blocks = self.pool.allocate(need)
            if blocks is not None:
                request.block_ids.extend(blocks)
                return True
            if not may_preempt or not self.running:
                return False
            victim = self.policy.choose_victim(self.running, now_s)
            self._preempt(victim, sched, now_s)
            if victim is request:
                return False
        return True

    def _fit_chunk(
        self,
        request: EngineRequest,
        num_tokens: int,
        sched: dict[EngineRequest, int],
        now_s: float,
        may_preempt: bool,
    ) -> int:
        """The chunk actually scheduled: shrunk (halved down to one block) when KV is
        short and the policy shrinks, else preempting (running) or 0 (waiting)."""
        if self.policy.shrink_chunks:
            min_tokens = min(num_tokens, self._bs)
            while num_tokens > min_tokens:
                need = self._blocks_for(request.num_computed_tokens + num_tokens)
                if self.pool.can_allocate(need - len(request.block_ids)):
                    break
                num_tokens = max(min_tokens, num_tokens // 2)
        if self._ensure_blocks(request, num_tokens, sched, now_s, may_preempt):
            return num_tokens
        return 0

    def _take_prefix(self, request: EngineRequest, now_s: float) -> bool:
        """Prefix-cache lookup when a request (re)enters the batch; False if even the
        cached prefix cannot be held right now."""
        max_hit = (request.num_tokens - 1) // self._bs  # at least one token is computed
        sid = request.session_id
        gpu_hit = self.pool.num_cached_prefix_blocks(sid, max_hit)
        pinned = sid in self._pins
        cpu_hit = 0
        if self.cpu_tier is not None:
            cpu_hit = max(0, min(self.cpu_tier.num_prefix_blocks(sid), max_hit) - gpu_hit)
        held_free = 0 if pinned else gpu_hit  # cached blocks still in the free queue
        if not self.pool.can_allocate(held_free + cpu_hit + 1):
            return False
        request.block_ids = self.pool.take_cached(sid, gpu_hit)
        if cpu_hit:
            self._reload(request, gpu_hit, cpu_hit)
        if pinned:
            self._pins.unpin(sid)
        self._num_retained_blocks -= self._retained_blocks.pop(sid, 0)
        hit_tokens = (gpu_hit + cpu_hit) * self._bs
        request.num_computed_tokens = hit_tokens
        if request.num_preemptions == 0:
            request.cached_tokens = hit_tokens
        request.started = True
        return True

    def _return_prefix(self, request: EngineRequest) -> None:
        """Undo :meth:`_take_prefix` for a request that could not start after all."""
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = 0
        request.started = False

    def _reload(self, request: EngineRequest, first_block: int, num_blocks: int) -> None:
        blocks = self.pool.allocate(num_blocks)
        assert blocks is not None
        self.pool.cache_blocks(request.session_id, first_block, blocks)
        request.block_ids.extend(blocks)
        self.stats.num_reloaded_blocks += num_blocks
        self._pending_reload_s += self.cost.swap_time_s(num_blocks * self._bs)

    def _preempt(
        self, victim: EngineRequest, sched: dict[EngineRequest, int], now_s: float
    ) -> None:
        """Recompute preemption: free the victim's KV (cached blocks stay reusable)."""
        sched.pop(victim, None)
        self.running.remove(victim)
        victim.is_running = False
        self.pool.free(victim.block_ids)
        victim.block_ids = []
        victim.num_computed_tokens = 0
        victim.started = False
        victim.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.policy.on_preempted(victim, now_s)
        self.waiting.prepend(victim, now_s)

    def _make_plan(
        self, sched: dict[EngineRequest, int], now_s: float, waiting_blocked: bool
    ) -> StepPlan:
        cost = self.cost
        num_tokens = kv_read = 0
        attn_units = 0.0
        for request, n in sched.items():
            num_tokens += n
            kv_read += request.num_computed_tokens
            if n > 1:
                attn_units += cost.prefill_attn_units(n, request.num_computed_tokens)
        num_seqs = len(sched)
        first_s = cost.step_time_s(num_seqs, num_tokens, kv_read, attn_units)
        plan = StepPlan(list(sched.items()), now_s, first_s, 0.0, 1, self._pending_reload_s)
        self._pending_reload_s = 0.0
        if (
            num_tokens == num_seqs
            # a 1-token prefill chunk is not a decode step: it samples nothing
            and all(r.num_tokens - r.num_computed_tokens == 1 for r in sched)
            and plan.extra_s == 0.0
            and (waiting_blocked or len(self.waiting) == 0)
        ):
            self._extend_decode_run(plan)
        return plan

    def _extend_decode_run(self, plan: StepPlan) -> None:
        """Plan k identical decode steps when nothing can change the batch before the
        first request finishes; blocks for all k steps are allocated now."""
        steps = min(MAX_DECODE_RUN_STEPS, min(r.remaining_output_tokens for r, _ in plan.scheduled))
        steps = self._steps_within_pin_expiry(plan, steps)
        while steps > 1 and self._decode_blocks_needed(plan, steps) > self.pool.num_free_blocks:
            steps //= 2
        if steps <= 1:
            return
        for request, _ in plan.scheduled:
            need = self._blocks_for(request.num_computed_tokens + steps) - len(request.block_ids)
            if need > 0:
                blocks = self.pool.allocate(need)
                assert blocks is not None
                request.block_ids.extend(blocks)
        plan.step_increment_s = len(plan.scheduled) * self.cost.kv_read_s_per_token
        plan.num_steps = steps

    def _decode_blocks_needed(self, plan: StepPlan, steps: int) -> int:
        total = 0
        for request, _ in plan.scheduled:
            total += max(
                0, self._blocks_for(request.num_computed_tokens + steps) - len(request.block_ids)
            )
        return total

    def _steps_within_pin_expiry(self, plan: StepPlan, steps: int) -> int:
        earliest_s = self._pins.earliest_entry_s()
        if earliest_s is None:
            return steps
        horizon_s = earliest_s - plan.start_s
        while steps > 1 and plan.first_step_s * steps > horizon_s:
            steps //= 2
        return steps

    # -- completion ---------------------------------------------------------------
    def complete_step(self, now_s: float) -> list[EngineRequest]:
        """Apply the planned step(s) at their end time; returns the finished turns,
        removed from the batch but still holding their KV until :meth:`release`."""
        plan = self.plan
        assert plan is not None, "complete_step without a plan"
        self.plan = None
        steps = plan.num_steps
        duration_s = plan.elapsed_s(steps)
        self.stats.num_steps += steps
        self.stats.busy_s += duration_s
        finished = []
        for request, n in plan.scheduled:
            if not request.is_running:
                continue
            if steps == 1:
                self._advance(request, n, now_s)
            else:
                self._advance_decodes(request, steps)
            request.service_s += duration_s
            if request.is_finished:
                finished.append(request)
        if finished:
            for request in finished:
                request.is_running = False
            self.running = [r for r in self.running if r.is_running]
        return finished

    def _advance(self, request: EngineRequest, num_tokens: int, now_s: float) -> None:
        start = request.num_computed_tokens
        end = start + num_tokens
        self._account(request, start, end)
        request.num_computed_tokens = end
        if end == request.num_tokens:  # KV covers every token: sample one
            request.num_output_tokens += 1
            request.num_tokens += 1
            if request.first_token_s is None:
                request.first_token_s = now_s

    def _advance_decodes(self, request: EngineRequest, steps: int) -> None:
        start = request.num_computed_tokens
        self._account(request, start, start + steps)
        request.num_computed_tokens += steps
        request.num_output_tokens += steps
        request.num_tokens += steps

    def _account(self, request: EngineRequest, start: int, end: int) -> None:
        """Service, recompute accounting and prefix-cache hashes for tokens [start, end)."""
        request.service_tokens += end - start
        if start < request.high_water_tokens:
            recomputed = min(end, request.high_water_tokens) - start
            request.recomputed_tokens += recomputed
            self.stats.num_recomputed_tokens += recomputed
        if end > request.high_water_tokens:
            request.high_water_tokens = end
        bs = self._bs
        first_full, last_full = start // bs, end // bs
        if last_full > first_full:
            blocks = request.block_ids[first_full:last_full]
            self.pool.cache_blocks(request.session_id, first_full, blocks)

    # -- turn end and retention -------------------------------------------------
    def turn_end_context(self, request: EngineRequest, predicted_tool_s: float) -> TurnEndContext:
        """What a retention policy weighs for a finished turn's KV."""
        can_offload = self.cpu_tier is not None and self.cpu_tier.can_store(request.num_blocks)
        return turn_end_context(
            self.cost,
            session_id=request.session_id,
            num_blocks=request.num_blocks,
            context_tokens=request.num_computed_tokens,
            predicted_tool_s=predicted_tool_s,
            num_total_blocks=self.pool.num_blocks,
            num_used_blocks=self.pool.num_used_blocks,
            chunk_budget_tokens=self.config.max_num_batched_tokens,
            can_offload=can_offload,
            is_last_turn=request.is_last_turn,
        )

    def end_turn(
        self,
        request: EngineRequest,
        retention: RetentionPolicy,
        predicted_tool_s: float,
        now_s: float,
    ) -> RetentionDecision:
        """A finished turn's KV goes where ``retention`` decides (every runtime's path)."""
        decision = retention.on_turn_end(self.turn_end_context(request, predicted_tool_s))
        self.release(request, decision, now_s)
        return decision

    def release(self, request: EngineRequest, decision: RetentionDecision, now_s: float) -> None:
        """Free (or pin, or offload) a finished turn's KV as the retention policy decided."""
        blocks, request.block_ids = request.block_ids, []
        action = decision.action
        if action is RetentionAction.PIN and decision.ttl_s > 0:
            self._pins.pin(request.session_id, blocks, now_s + decision.ttl_s)
            return
        if action is RetentionAction.OFFLOAD and self.cpu_tier is not None:
            full = request.num_computed_tokens // self._bs
            self.cpu_tier.store(request.session_id, full)
            self.stats.num_offloaded_blocks += full
        evict_first = action in (RetentionAction.EVICT_FIRST, RetentionAction.OFFLOAD)
        self.pool.free(blocks, evict_first=evict_first)
        if not evict_first and not request.is_last_turn:
            self._num_retained_blocks += len(blocks) - self._retained_blocks.get(
                request.session_id, 0
            )
            self._retained_blocks[request.session_id] = len(blocks)

    def forget(self, session_id: str) -> None:
        """The session will not come back here (it ended, or its next turn was placed on
        another engine): stop counting KV kept for it in the working set and drop its
        pin. Its cached blocks stay in the free queue for whoever evicts them."""
        self._num_retained_blocks -= self._retained_blocks.pop(session_id, 0)
        self._pins.unpin(session_id)

    # -- KV migration (the Ray runtime moves a session's KV between engines) --------
    def cached_prefix_blocks(self, session_id: str) -> int:
        """How many leading blocks of the session's context this engine holds cached."""
        return self.pool.num_cached_prefix_blocks(session_id, self.pool.num_blocks)

    def adopt_kv(self, session_id: str, num_blocks: int) -> int:
        """Take in ``num_blocks`` leading blocks of a session's KV sent by another
        engine: they become cached blocks of the session here (its next turn hits
        them), counted as retained like KV kept across a tool call. Room is made by
        evicting cached blocks of others, never referenced ones; returns how many
        blocks were adopted (fewer when the free pool is smaller). Call between steps."""
        pool = self.pool
        num_blocks = min(num_blocks, pool.num_free_blocks)
        if num_blocks <= 0 or self.cached_prefix_blocks(session_id) >= num_blocks:
            return 0
        blocks = pool.allocate(num_blocks)
        assert blocks is not None  # at most the free blocks were asked for
        pool.cache_blocks(session_id, 0, blocks)
        pool.free(blocks)  # cached and free, in LRU order, like a retained turn's blocks
        self._num_retained_blocks += num_blocks - self._retained_blocks.get(session_id, 0)
        self._retained_blocks[session_id] = num_blocks
        return num_blocks

    def next_wakeup_s(self) -> float | None:
        """When an idle engine with waiting work should try again (a pin expires)."""
        return self._pins.next_expiry_s()

    # -- checks -------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Every block accounted for; no negative counts; running/waiting disjoint."""
        holders = [r.block_ids for r in self.running] + list(self._pins.held())
        self.pool.check_invariants(holders)
        waiting = [cast(EngineRequest, r) for r in self.waiting]
        assert all(not r.block_ids for r in waiting), "a waiting request holds KV"
        waiting_ids = {r.request_id for r in waiting}
        assert not waiting_ids & {r.request_id for r in self.running}, "request in both queues"
        for request in self.running:
            assert request.is_running
            assert request.num_computed_tokens <= len(request.block_ids) * self._bs
            assert 0 <= request.num_computed_tokens <= request.num_tokens
