"""The simulated GPU: the paged KV block pool and SimEngine's continuous batching
(chunked prefill, prefix caching, preemption, chunk shrinking, retention, decode runs).

Engines are driven by hand, step by step, with the real H100 / Llama-3.1-8B cost
model; block conservation is checked after every step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest

from mars_ray.config import EngineConfig, MlfqConfig
from mars_ray.engine.costmodel import CostModel, load_profile
from mars_ray.engine.ideal import isolated_turn_s
from mars_ray.engine.kv_cache import BlockPool, CpuTier
from mars_ray.engine.request import EngineRequest
from mars_ray.engine.sim_engine import SimEngine, StepPlan
from mars_ray.errors import InfeasibleError
from mars_ray.policies.base import RetentionAction, RetentionDecision, SchedulerPolicy
from mars_ray.policies.baselines import FcfsScheduler, PlasScheduler, ProgramFcfsScheduler
from mars_ray.policies.mlfq import MlfqScheduler

# --------------------------------------------------------------------------- factories

KEEP = RetentionDecision(RetentionAction.KEEP_LRU)
EVICT = RetentionDecision(RetentionAction.EVICT_FIRST)
OFFLOAD = RetentionDecision(RetentionAction.OFFLOAD)


def pin(ttl_s: float) -> RetentionDecision:
    return RetentionDecision(RetentionAction.PIN, ttl_s=ttl_s)


@functools.cache
def cost_model() -> CostModel:
    return CostModel(load_profile("h100-80gb", "llama-3.1-8b"))


SCHEDULERS: dict[str, Callable[[], SchedulerPolicy]] = {
    "fcfs": FcfsScheduler,
    "program-fcfs": ProgramFcfsScheduler,
    "plas": PlasScheduler,
    "mlfq": lambda: MlfqScheduler(MlfqConfig()),
    "mlfq-no-shrink": lambda: MlfqScheduler(MlfqConfig(), shrink_chunks=False),
    "mlfq-newest-victim": lambda: MlfqScheduler(MlfqConfig(), unified_eviction=False),
}


def make_engine(
    policy: SchedulerPolicy | None = None,
    *,
    num_blocks: int = 2048,
    budget: int = 8192,
    **config: object,
) -> SimEngine:
    engine_config = EngineConfig(
        num_gpu_blocks_override=num_blocks,
        max_num_batched_tokens=budget,
        **config,
    )
    return SimEngine(0, cost_model(), engine_config, policy or FcfsScheduler())


def make_request(
    session_id: str,
    prompt: int,
    output: int,
    *,
    turn: int = 0,
    arrival_s: float = 0.0,
    prior: int = 0,
    last: bool = False,
) -> EngineRequest:
    return EngineRequest(
        session_id, turn, arrival_s, prompt, output, prior_computed_tokens=prior, is_last_turn=last
    )


def scheduled(plan: StepPlan) -> dict[str, int]:
    return {request.request_id: n for request, n in plan.scheduled}


def step(
    engine: SimEngine, now_s: float, decision: RetentionDecision = KEEP
) -> tuple[StepPlan, list[EngineRequest]]:
    """Plan, run and complete one planned step (or decode run); release finished turns."""
    plan = engine.plan_step(now_s)
    assert plan is not None, "nothing to run"
    end_s = plan.end_s
    finished = engine.complete_step(end_s)
    for request in finished:
        engine.release(request, decision, end_s)
    engine.check_invariants()
    return plan, finished


OnFinish = Callable[[EngineRequest, float], None]


def drain(
    engine: SimEngine,
    now_s: float,
    decision: RetentionDecision = KEEP,
    on_finish: OnFinish | None = None,
    max_steps: int = 100_000,
) -> tuple[float, dict[str, float]]:
    """Run until nothing is left; returns the end time and each turn's finish time."""
    finish_s: dict[str, float] = {}
    for _ in range(max_steps):
        if not engine.has_work:
            return now_s, finish_s
        plan = engine.plan_step(now_s)
        if plan is None:
            wake_s = engine.next_wakeup_s()
            assert wake_s is not None, "stuck: work left but nothing can run"
            now_s = wake_s
            continue
        now_s = plan.end_s
        for request in engine.complete_step(now_s):
            assert request.num_output_tokens == request.max_output_tokens
            assert request.num_computed_tokens == request.num_tokens - 1
            finish_s[request.request_id] = now_s
            engine.release(request, decision, now_s)
            if on_finish is not None:
                on_finish(request, now_s)
        engine.check_invariants()
    raise AssertionError("did not drain")


def assert_all_free(engine: SimEngine) -> None:
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    assert engine.pool.usage == 0.0
    assert not engine.running and len(engine.waiting) == 0
    engine.pool.check_invariants([])


# --------------------------------------------------------------------------- BlockPool


def test_allocate_and_free_conserve_blocks() -> None:
    pool = BlockPool(10)
    a = pool.allocate(4)
    assert a == [0, 1, 2, 3]
    assert (pool.num_free_blocks, pool.num_used_blocks) == (6, 4)
    assert pool.allocate(7) is None  # all or nothing
    assert pool.num_free_blocks == 6
    assert pool.can_allocate(6) and not pool.can_allocate(7)
    b = pool.allocate(6)
    assert b is not None and sorted(a + b) == list(range(10))
    assert pool.usage == 1.0
    pool.check_invariants([a, b])
    pool.free(a)
    assert pool.num_free_blocks == 4
    pool.check_invariants([b])
    pool.free(b)
    assert pool.num_free_blocks == 10 and pool.usage == 0.0
    pool.check_invariants([])
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        BlockPool(0)


def test_prefix_hits_after_free() -> None:
    pool = BlockPool(10)
    blocks = pool.allocate(3)
    assert blocks is not None
    pool.set_hash(blocks[0], ("s", 0))
    pool.set_hash(blocks[1], ("s", 1))  # the third block is partial: no hash
    pool.free(blocks)
    assert pool.num_free_blocks == 10  # cached blocks are free (evictable)
    assert pool.num_cached_prefix_blocks("s", 10) == 2
    assert pool.num_cached_prefix_blocks("s", 1) == 1
    assert pool.num_cached_prefix_blocks("other", 10) == 0
    taken = pool.take_cached("s", 2)
    assert taken == blocks[:2]
    assert pool.num_free_blocks == 8
    shared = pool.take_cached("s", 1)  # a second holder of block 0
    pool.check_invariants([taken, shared])
    pool.free(shared)
    pool.free(taken)
    pool.check_invariants([])


def test_prefix_caching_disabled_never_hits() -> None:
    pool = BlockPool(4, enable_prefix_caching=False)
    blocks = pool.allocate(2)
    assert blocks is not None
    pool.set_hash(blocks[0], ("s", 0))
    pool.free(blocks)
    assert pool.num_cached_prefix_blocks("s", 4) == 0
    assert pool.allocate(4) is not None and pool.num_evicted_blocks == 0


def test_eviction_takes_the_head_and_a_context_loses_its_tail_first() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    assert blocks is not None
    for i, block in enumerate(blocks):
        pool.set_hash(block, ("s", i))
    pool.free(blocks)
    assert pool.allocate(1) == [blocks[3]]  # the last block of the context goes first
    assert pool.num_cached_prefix_blocks("s", 4) == 3
    assert pool.num_evicted_blocks == 1
    assert pool.allocate(1) == [blocks[2]]
    assert pool.num_cached_prefix_blocks("s", 4) == 2
    assert pool.num_evicted_blocks == 2


def two_cached_sessions(second_evict_first: bool) -> BlockPool:
    """s1 (blocks 0-2) freed LRU, then s2 (blocks 3-5) freed as asked; 6-7 never used."""
    pool = BlockPool(8)
    s1, s2 = pool.allocate(3), pool.allocate(3)
    assert s1 == [0, 1, 2] and s2 == [3, 4, 5]
    for i in range(3):
        pool.set_hash(s1[i], ("s1", i))
        pool.set_hash(s2[i], ("s2", i))
    pool.free(s1)
    pool.free(s2, evict_first=second_evict_first)
    return pool


def test_evict_first_blocks_are_reused_before_never_used_ones() -> None:
    pool = two_cached_sessions(second_evict_first=True)
    assert pool.allocate(1) == [5]  # s2's last block, at the head
    assert pool.allocate(3) == [4, 3, 6]
    assert pool.num_evicted_blocks == 3
    assert pool.num_cached_prefix_blocks("s2", 3) == 0
    assert pool.num_cached_prefix_blocks("s1", 3) == 3


def test_lru_freed_blocks_go_behind_never_used_and_older_ones() -> None:
    pool = two_cached_sessions(second_evict_first=False)
    assert pool.allocate(4) == [6, 7, 2, 1]  # s1 (freed earlier) loses its tail
    assert pool.num_evicted_blocks == 2
    assert pool.num_cached_prefix_blocks("s1", 3) == 1
    assert pool.num_cached_prefix_blocks("s2", 3) == 3


def test_evicted_count_ignores_blocks_without_cached_content() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    assert blocks is not None
    pool.free(blocks)  # never hashed
    assert pool.allocate(4) is not None
    assert pool.num_evicted_blocks == 0


def test_same_content_keeps_its_first_block() -> None:
    pool = BlockPool(4)
    first, second = pool.allocate(1), pool.allocate(1)
    assert first is not None and second is not None
    pool.set_hash(first[0], ("s", 0))
    pool.set_hash(second[0], ("s", 0))  # recomputed elsewhere: the cache keeps the first
    pool.free(first)
    pool.free(second)
    assert pool.take_cached("s", 1) == first
    pool.check_invariants([first])


def test_check_invariants_catches_a_corrupted_reference_count() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    assert blocks is not None
    pool.check_invariants([blocks])
    with pytest.raises(AssertionError):
        pool.check_invariants([])  # a holder is missing
    with pytest.raises(AssertionError):
        pool.check_invariants([blocks, blocks[:1]])  # a holder too many
    pool._ref_cnt[blocks[0]] = 2  # corrupt
    with pytest.raises(AssertionError, match="reference counts"):
        pool.check_invariants([blocks])
    pool._ref_cnt[blocks[0]] = 1
    pool._ref_cnt[3] = 1  # a free block claims a holder
    with pytest.raises(AssertionError):
        pool.check_invariants([blocks, [3]])


def test_cpu_tier_keeps_the_most_recent_sessions() -> None:
    tier = CpuTier(10)
    assert tier.can_store(10) and not tier.can_store(11) and not tier.can_store(0)
    tier.store("a", 4)
    tier.store("b", 4)
    tier.store("a", 5)  # replaces a's prefix, a becomes most recent
    assert (tier.num_blocks, tier.num_prefix_blocks("a")) == (9, 5)
    tier.store("c", 5)  # evicts b (least recent)
    assert tier.num_prefix_blocks("b") == 0
    assert tier.num_blocks == 10
    tier.discard("a")
    assert (tier.num_blocks, tier.num_prefix_blocks("a")) == (5, 0)


# --------------------------------------------------------------------------- lone requests


@pytest.mark.parametrize("policy", sorted(SCHEDULERS))
@pytest.mark.parametrize(("prompt", "output"), [(100, 1), (3000, 2), (10000, 300), (20000, 40)])
def test_lone_request_timeline_equals_the_isolated_turn_time(
    policy: str, prompt: int, output: int
) -> None:
    engine = make_engine(SCHEDULERS[policy]())
    request = make_request("s", prompt, output)
    engine.add_request(request, 0.0)
    now_s, chunks = 0.0, []
    while request.is_running or not request.started:
        plan, _ = step(engine, now_s)
        chunks.append(scheduled(plan)["s#0"])
        now_s = plan.end_s
    config = engine.config
    assert now_s == pytest.approx(isolated_turn_s(cost_model(), config, 0, prompt, output), 1e-9)
    assert request.first_token_s == pytest.approx(
        isolated_turn_s(cost_model(), config, 0, prompt, 1), 1e-9
    )
    # Prefill in full-budget chunks whatever the quanta (leftover budget is handed back).
    num_prefill_steps = -(-prompt // 8192)
    expected = [min(8192, prompt - 8192 * i) for i in range(num_prefill_steps)]
    assert chunks[:num_prefill_steps] == expected
    assert (request.num_output_tokens, request.num_tokens) == (output, prompt + output)
    assert request.service_tokens == prompt + output - 1
    assert_all_free(engine)


def test_second_turn_hits_the_prefix_cache() -> None:
    engine = make_engine(MlfqScheduler(MlfqConfig()))
    first = make_request("s", 100, 20)
    engine.add_request(first, 0.0)
    end_s, _ = drain(engine, 0.0)
    assert first.num_computed_tokens == 119  # the last sampled token has no KV yet
    assert engine.pool.num_cached_prefix_blocks("s", 100) == 7  # 112 tokens in full blocks
    second = make_request("s", 150, 5, turn=1, arrival_s=end_s, prior=119)
    engine.add_request(second, end_s)
    plan, _ = step(engine, end_s)
    assert second.cached_tokens == 112
    assert scheduled(plan) == {"s#1": 150 - 112}  # computation starts at the cached prefix
    assert second.recomputed_tokens == 7  # 112..118 were computed before, in the partial block
    finish_s, _ = drain(engine, plan.end_s)
    expected = isolated_turn_s(cost_model(), engine.config, 119, 150, 5)
    assert finish_s - end_s == pytest.approx(expected, 1e-9)
    assert_all_free(engine)


def test_no_prefix_hit_when_caching_is_disabled() -> None:
    engine = make_engine(enable_prefix_caching=False)
    engine.add_request(make_request("s", 100, 20), 0.0)
    end_s, _ = drain(engine, 0.0)
    second = make_request("s", 150, 5, turn=1, arrival_s=end_s, prior=119)
    engine.add_request(second, end_s)
    plan, _ = step(engine, end_s)
    assert second.cached_tokens == 0 and scheduled(plan) == {"s#1": 150}


def test_prompt_larger_than_the_kv_cache_is_infeasible() -> None:
    engine = make_engine(num_blocks=10)  # 160 tokens
    with pytest.raises(InfeasibleError, match="session too-long needs 170 tokens"):
        engine.add_request(make_request("too-long", 150, 20), 0.0)
    assert len(engine.waiting) == 0
    engine.add_request(make_request("fits", 150, 10), 0.0)  # exactly 160
    drain(engine, 0.0)
    assert_all_free(engine)


# --------------------------------------------------------------------------- KV pressure


def pressure_setup(
    policy: SchedulerPolicy,
) -> tuple[SimEngine, EngineRequest, EngineRequest, float]:
    """40 blocks, 256-token steps. A (200-token prompt, 13 blocks) decodes; B (600 tokens)
    ran one 255-token chunk (16 blocks): 11 blocks are left, B's next chunk needs 16.
    vLLM's whole-prompt gate is off here, so B starts although it cannot finish: the
    state a running prefill reaches when others' decodes fill the cache under it."""
    engine = make_engine(policy, num_blocks=40, budget=256, reserve_full_prompt=False)
    a = make_request("a", 200, 100)
    engine.add_request(a, 0.0)
    plan, _ = step(engine, 0.0)
    b = make_request("b", 600, 10, arrival_s=plan.end_s)
    engine.add_request(b, plan.end_s)
    plan, _ = step(engine, plan.end_s)
    assert scheduled(plan) == {"a#0": 1, "b#0": 255}
    assert engine.pool.num_free_blocks == 11
    return engine, a, b, plan.end_s


def test_chunk_shrinking_schedules_a_smaller_chunk_instead_of_preempting() -> None:
    engine, a, b, now_s = pressure_setup(MlfqScheduler(MlfqConfig()))
    plan, _ = step(engine, now_s)
    assert scheduled(plan) == {"a#0": 1, "b#0": 127}  # 255 -> 127: 8 more blocks fit
    plan, _ = step(engine, plan.end_s)
    assert scheduled(plan) == {"a#0": 1, "b#0": 27}  # 218 -> 109 -> 54 -> 27
    assert engine.stats.num_preemptions == 0
    assert b.is_running and b.num_computed_tokens == 255 + 127 + 27
    drain(engine, plan.end_s)
    assert a.is_finished and b.is_finished
    assert_all_free(engine)


@pytest.mark.parametrize("policy", ["fcfs", "mlfq-no-shrink"])
def test_without_shrinking_the_running_prefill_is_preempted(policy: str) -> None:
    engine, a, b, now_s = pressure_setup(SCHEDULERS[policy]())
    free_before = engine.pool.num_free_blocks
    plan, _ = step(engine, now_s)
    # B (newest; level-0 fresh prefill for MLFQ) preempted; it cannot come back yet.
    assert scheduled(plan) == {"a#0": 1}
    assert engine.stats.num_preemptions == 1 and b.num_preemptions == 1
    assert not b.is_running and b not in engine.running
    assert list(engine.waiting) == [b]
    assert b.block_ids == [] and b.num_computed_tokens == 0
    assert engine.pool.num_free_blocks > free_before  # its 16 blocks came back
    assert engine.pool.num_cached_prefix_blocks("b", 100) == 15  # and stay cached
    assert plan.num_steps > 1  # the head is blocked on KV: A decodes in a run
    assert a.is_finished  # to its end, while B waited
    drain(engine, plan.end_s)
    assert b.is_finished
    assert b.recomputed_tokens == 255 - 240  # only the partial block is recomputed
    assert b.num_preemptions == 1
    assert_all_free(engine)


def test_waiting_request_waits_instead_of_preempting() -> None:
    engine = make_engine(FcfsScheduler(), num_blocks=20)
    a = make_request("a", 250, 40)  # 16 blocks, 18 by the end
    engine.add_request(a, 0.0)
    plan, _ = step(engine, 0.0)
    b = make_request("b", 100, 5)  # needs 7 blocks, 4 free
    engine.add_request(b, plan.end_s)
    plan, finished = step(engine, plan.end_s)
    assert scheduled(plan) == {"a#0": 1}  # then A decodes to its end in one run
    assert finished == [a] and plan.num_steps == 39
    assert engine.stats.num_preemptions == 0
    assert list(engine.waiting) == [b] and b.block_ids == []
    _, finish_s = drain(engine, plan.end_s)
    assert list(finish_s) == ["b#0"]


def test_mlfq_shrinks_a_new_request_into_the_free_blocks() -> None:
    # Without vLLM's whole-prompt gate (with it, b would wait until it fits whole).
    engine = make_engine(MlfqScheduler(MlfqConfig()), num_blocks=20, reserve_full_prompt=False)
    a = make_request("a", 250, 40)
    engine.add_request(a, 0.0)
    plan, _ = step(engine, 0.0)
    b = make_request("b", 100, 5)
    engine.add_request(b, plan.end_s)
    plan, _ = step(engine, plan.end_s)
    assert scheduled(plan) == {"a#0": 1, "b#0": 50}  # 100 -> 50 tokens (4 blocks)
    drain(engine, plan.end_s)
    assert_all_free(engine)


@pytest.mark.parametrize("decision", [KEEP, EVICT, pin(0.01)], ids=["keep", "evict", "pin"])
@pytest.mark.parametrize("policy", sorted(SCHEDULERS))
def test_no_block_leaks_under_pressure(policy: str, decision: RetentionDecision) -> None:
    """Six sessions of three turns contend for 48 blocks: every turn completes and all
    blocks are free afterwards, whatever the scheduler and the retention."""
    engine = make_engine(SCHEDULERS[policy](), num_blocks=48, budget=256)
    turns = {f"s{i}": [(120 + 37 * i, 30 + 5 * i), (50, 20), (10, 60)] for i in range(6)}
    finished: list[EngineRequest] = []

    def start(sid: str, index: int, now_s: float, context: int, prior: int) -> None:
        new, out = turns[sid][index]
        request = make_request(sid, context + new, out, turn=index, arrival_s=now_s, prior=prior)
        engine.add_request(request, now_s)

    def on_finish(request: EngineRequest, now_s: float) -> None:
        finished.append(request)
        sid, index = request.session_id, request.turn_index + 1
        if index < len(turns[sid]):
            start(sid, index, now_s, request.num_tokens, request.num_computed_tokens)

    for sid in turns:
        start(sid, 0, 0.0, 0, 0)
    end_s, _ = drain(engine, 0.0, decision, on_finish)
    assert len(finished) == 18
    assert engine.pool.num_evicted_blocks > 0
    assert engine.stats.num_preemptions > 0
    if decision.action is RetentionAction.PIN:
        assert engine.plan_step(end_s + 1.0) is None  # the last pins expire
    assert_all_free(engine)


@pytest.mark.parametrize("decision", [KEEP, EVICT, pin(0.01)], ids=["keep", "evict", "pin"])
def test_no_block_leaks_with_each_retention(decision: RetentionDecision) -> None:
    engine = make_engine(MlfqScheduler(MlfqConfig()), num_blocks=32, budget=128)
    for i in range(5):
        engine.add_request(make_request(f"s{i}", 150 + 40 * i, 25, arrival_s=0.0), 0.0)
    end_s, finish_s = drain(engine, 0.0, decision)
    assert len(finish_s) == 5
    if decision.action is RetentionAction.PIN:
        assert engine.pool.num_used_blocks > 0  # pins outlive the turns
        assert engine.plan_step(end_s + 1.0) is None  # expired
    assert_all_free(engine)


# --------------------------------------------------------------------------- retention


def finish_alone(engine: SimEngine, sid: str, prompt: int, now_s: float) -> EngineRequest:
    """Run a one-output turn to completion without releasing it."""
    request = make_request(sid, prompt, 1, arrival_s=now_s)
    engine.add_request(request, now_s)
    plan = engine.plan_step(now_s)
    assert plan is not None
    assert engine.complete_step(plan.end_s) == [request]
    return request


@pytest.mark.parametrize(
    ("s1_decision", "s2_decision", "evicted", "kept"),
    [(KEEP, EVICT, "s2", "s1"), (EVICT, KEEP, "s1", "s2")],
)
def test_release_action_decides_which_session_is_evicted_first(
    s1_decision: RetentionDecision, s2_decision: RetentionDecision, evicted: str, kept: str
) -> None:
    engine = make_engine(num_blocks=32)
    s1 = finish_alone(engine, "s1", 160, 0.0)  # 10 full blocks
    s2 = finish_alone(engine, "s2", 160, 1.0)
    engine.release(s1, s1_decision, 1.0)  # s1 freed first: older in LRU order
    engine.release(s2, s2_decision, 2.0)
    engine.check_invariants()
    assert engine.pool.num_cached_prefix_blocks("s1", 10) == 10
    assert engine.pool.num_cached_prefix_blocks("s2", 10) == 10
    # 16 blocks: the evict-first session's 10 go before the 12 never used.
    engine.add_request(make_request("s3", 256, 1), 3.0)
    step(engine, 3.0)
    assert engine.pool.num_cached_prefix_blocks(evicted, 10) == 0
    assert engine.pool.num_cached_prefix_blocks(kept, 10) == 10
    assert engine.pool.num_evicted_blocks == 10  # the evict-first session, before fresh blocks


def test_keep_lru_counts_retained_kv_in_demand_until_the_session_returns() -> None:
    engine = make_engine(num_blocks=100)
    first = finish_alone(engine, "s", 320, 0.0)
    engine.release(first, KEEP, 1.0)
    assert engine.pool.num_used_blocks == 0
    assert engine.kv_demand == pytest.approx(0.20)  # 20 blocks kept for the session
    assert engine.load().kv_demand == pytest.approx(0.20)
    back = make_request("s", 400, 1, turn=1, arrival_s=2.0, prior=320)
    engine.add_request(back, 2.0)
    step(engine, 2.0, EVICT)
    assert back.cached_tokens == 320
    assert engine.kv_demand == 0.0  # evict-first: not counted as kept
    other = finish_alone(engine, "o", 100, 3.0)
    engine.release(other, RetentionDecision(RetentionAction.KEEP_LRU), 4.0)
    assert engine.kv_demand == pytest.approx(0.07)


def test_pin_holds_blocks_until_the_ttl_expires() -> None:
    engine = make_engine(num_blocks=20)
    s1 = finish_alone(engine, "s1", 160, 0.0)
    engine.release(s1, pin(5.0), 1.0)
    engine.check_invariants()
    assert engine.pool.num_used_blocks == 10  # pinned: not evictable
    assert engine.next_wakeup_s() == 6.0
    big = make_request("big", 300, 1)  # needs 19 blocks, only 10 free
    engine.add_request(big, 2.0)
    assert engine.plan_step(2.0) is None
    assert engine.has_work and engine.plan_step(5.99) is None
    assert engine.pool.num_used_blocks == 10
    plan, _ = step(engine, 6.0)  # the pin expires, the blocks are evictable again
    assert scheduled(plan) == {"big#0": 300}
    assert engine.next_wakeup_s() is None
    assert engine.pool.num_cached_prefix_blocks("s1", 10) < 10
    assert_all_free(engine)


def test_keep_lru_lets_a_new_request_evict_the_kept_kv_at_once() -> None:
    engine = make_engine(num_blocks=20)
    s1 = finish_alone(engine, "s1", 160, 0.0)
    engine.release(s1, KEEP, 1.0)
    engine.add_request(make_request("big", 300, 1), 2.0)
    plan, _ = step(engine, 2.0)
    assert scheduled(plan) == {"big#0": 300}


def test_returning_session_takes_its_pinned_kv() -> None:
    engine = make_engine(num_blocks=40)
    first = finish_alone(engine, "s", 170, 0.0)  # computed 170: 10 full blocks + 1 partial
    engine.release(first, pin(10.0), 1.0)
    back = make_request("s", 200, 3, turn=1, arrival_s=2.0, prior=170)
    engine.add_request(back, 2.0)
    plan, _ = step(engine, 2.0)
    assert back.cached_tokens == 160
    assert scheduled(plan) == {"s#1": 40}
    assert engine.next_wakeup_s() is None  # the pin is gone
    drain(engine, plan.end_s)
    assert_all_free(engine)


def test_offload_then_reload_from_the_cpu_tier() -> None:
    engine = make_engine(num_blocks=30, cpu_offload_gb=1.0)
    first = finish_alone(engine, "s", 160, 0.0)
    ctx = engine.turn_end_context(first, predicted_tool_s=30.0)
    assert ctx.can_offload and ctx.num_blocks == 10 and ctx.context_tokens == 160
    assert ctx.reload_s == pytest.approx(cost_model().swap_time_s(160))
    engine.release(first, OFFLOAD, 1.0)
    assert engine.stats.num_offloaded_blocks == 10
    assert engine.kv_demand == 0.0  # offloaded KV is not kept on the GPU
    # The GPU copy went to the evict-first end: 10 new blocks overwrite it, not the
    # 20 never-used ones.
    engine.add_request(make_request("o", 160, 1), 2.0)
    step(engine, 2.0)
    assert engine.pool.num_cached_prefix_blocks("s", 10) == 0
    assert engine.pool.num_evicted_blocks == 10
    back = make_request("s", 200, 1, turn=1, arrival_s=3.0, prior=160)
    engine.add_request(back, 3.0)
    plan, _ = step(engine, 3.0)
    assert back.cached_tokens == 160
    assert engine.stats.num_reloaded_blocks == 10
    assert plan.extra_s == pytest.approx(cost_model().swap_time_s(160))
    assert scheduled(plan) == {"s#1": 40}
    assert_all_free(engine)


# --------------------------------------------------------------------------- decode runs


def test_decode_only_batch_is_planned_as_one_run() -> None:
    engine = make_engine()
    request = make_request("s", 100, 50)
    engine.add_request(request, 0.0)
    step(engine, 0.0)
    plan = engine.plan_step(1.0)
    assert plan is not None and plan.num_steps == 49
    first_s = cost_model().step_time_s(1, 1, 100, 0.0)
    assert plan.first_step_s == pytest.approx(first_s)
    assert plan.step_increment_s == pytest.approx(cost_model().kv_read_s_per_token)
    assert engine.interrupt(plan.end_s) is False  # every step done by then
    assert engine.complete_step(plan.end_s) == [request]


def test_interrupt_cuts_a_decode_run_at_the_next_step_boundary() -> None:
    engine = make_engine()
    a = make_request("a", 100, 50)
    engine.add_request(a, 0.0)
    prefill, _ = step(engine, 0.0)
    start_s = prefill.end_s
    plan = engine.plan_step(start_s)
    assert plan is not None and plan.num_steps == 49
    arrive_s = start_s + (plan.elapsed_s(9) + plan.elapsed_s(10)) / 2  # during step 10
    b = make_request("b", 64, 3, arrival_s=arrive_s)
    engine.add_request(b, arrive_s)
    assert engine.interrupt(arrive_s) is True
    assert plan.num_steps == 10
    assert plan.end_s == pytest.approx(start_s + plan.elapsed_s(10))
    assert engine.interrupt(arrive_s) is False  # already cut there
    assert engine.complete_step(plan.end_s) == []
    assert (a.num_output_tokens, a.num_computed_tokens, a.num_tokens) == (11, 110, 111)
    engine.check_invariants()
    plan, _ = step(engine, plan.end_s)
    assert scheduled(plan) == {"a#0": 1, "b#0": 64}
    assert b.first_token_s == plan.end_s
    _, finish_s = drain(engine, plan.end_s)
    assert (a.num_output_tokens, a.num_computed_tokens, a.num_tokens) == (50, 149, 150)
    assert (b.num_output_tokens, b.num_tokens) == (3, 67)
    assert a.service_tokens == 149 and b.service_tokens == 66
    assert set(finish_s) == {"a#0", "b#0"}
    assert_all_free(engine)


def test_cutting_a_decode_run_at_every_step_keeps_the_timeline() -> None:
    engine = make_engine()
    request = make_request("s", 1000, 300)
    engine.add_request(request, 0.0)
    now_s, num_plans = 0.0, 0
    while not request.is_finished:
        plan = engine.plan_step(now_s)
        assert plan is not None
        engine.interrupt(plan.start_s)  # one step at a time
        assert plan.num_steps == 1
        now_s = plan.end_s
        for finished in engine.complete_step(now_s):
            engine.release(finished, KEEP, now_s)
        engine.check_invariants()
        num_plans += 1
    assert num_plans == 300
    expected = isolated_turn_s(cost_model(), engine.config, 0, 1000, 300)
    assert now_s == pytest.approx(expected, 1e-9)
    assert (request.num_output_tokens, request.num_computed_tokens) == (300, 1299)
    assert_all_free(engine)


def test_batched_decode_run_matches_step_by_step_timing() -> None:
    """A run of k decode steps over several requests ends exactly when k single
    steps would (each step reads every request's growing context)."""
    finish: list[dict[str, float]] = []
    for cut_every_step in (False, True):
        engine = make_engine()
        for i, (prompt, output) in enumerate([(500, 90), (1500, 40), (64, 130)]):
            engine.add_request(make_request(f"s{i}", prompt, output), 0.0)
        now_s, done, max_steps = 0.0, {}, 1
        while engine.has_work:
            plan = engine.plan_step(now_s)
            assert plan is not None
            if cut_every_step:
                engine.interrupt(plan.start_s)
            max_steps = max(max_steps, plan.num_steps)
            now_s = plan.end_s
            for request in engine.complete_step(now_s):
                done[request.request_id] = now_s
                engine.release(request, KEEP, now_s)
            engine.check_invariants()
        assert (max_steps > 1) is not cut_every_step
        finish.append(done)
    runs, steps = finish
    assert runs.keys() == steps.keys() == {"s0#0", "s1#0", "s2#0"}
    for request_id, finish_s in runs.items():
        assert finish_s == pytest.approx(steps[request_id], 1e-9)


def test_a_single_step_plan_cannot_be_interrupted() -> None:
    engine = make_engine()
    engine.add_request(make_request("s", 100, 5), 0.0)
    plan = engine.plan_step(0.0)
    assert plan is not None and plan.num_steps == 1
    assert engine.interrupt(0.0) is False


def test_one_token_prefill_chunk_is_not_planned_as_a_decode_run() -> None:
    engine = make_engine(num_blocks=256, budget=16)
    small = [make_request(f"s{i}", 1, 100) for i in range(15)]
    big = make_request("big", 100, 5)
    for request in [*small, big]:
        engine.add_request(request, 0.0)
    plan = engine.plan_step(0.0)
    assert plan is not None
    assert scheduled(plan)["big#0"] == 1  # the budget's last token
    engine.complete_step(plan.end_s)
    # "big" has 99 prompt tokens left: it cannot have produced any output yet.
    assert big.num_output_tokens == 0
    assert big.num_tokens == 100


def test_kv_adopted_from_another_engine_is_a_prefix_hit_there() -> None:
    """KV migration: what one engine holds for a session, another adopts; the next
    turn there hits it, and both engines keep every block accounted for."""
    src, dst = make_engine(num_blocks=64), make_engine(num_blocks=64)
    src.add_request(make_request("s", 300, 20), 0.0)
    now_s, _ = drain(src, 0.0)
    held = src.cached_prefix_blocks("s")
    assert held == (300 + 20 - 1) // 16
    assert dst.cached_prefix_blocks("s") == 0
    assert dst.adopt_kv("s", held) == held
    dst.check_invariants()
    assert dst.cached_prefix_blocks("s") == held
    assert dst.adopt_kv("s", held) == 0, "already there: nothing to adopt twice"
    nxt = make_request("s", 340, 4, turn=1, prior=320)
    dst.add_request(nxt, now_s)
    drain(dst, now_s)
    assert nxt.cached_tokens == held * 16
    # a full pool adopts what fits (cached blocks of others are evicted for it)
    small = make_engine(num_blocks=8)
    assert small.adopt_kv("t", held) == 8
    small.check_invariants()


# --------------------------------------------------------------------------- start gates


def test_a_prompt_starts_only_when_it_fits_whole() -> None:
    """vLLM's gate: b's first chunk would fit in the 4 free blocks, its 100-token
    prompt (7 blocks) does not, so it waits until a finishes."""
    engine = make_engine(FcfsScheduler(), num_blocks=20)
    a = make_request("a", 250, 3)  # 16 blocks
    engine.add_request(a, 0.0)
    plan, _ = step(engine, 0.0)
    b = make_request("b", 100, 5)
    engine.add_request(b, plan.end_s)
    plan, _ = step(engine, plan.end_s)
    assert scheduled(plan) == {"a#0": 1}
    now_s = plan.end_s
    while not any(r.request_id == "b#0" for r in engine.running):
        plan, _ = step(engine, now_s)
        now_s = plan.end_s
    assert scheduled(plan)["b#0"] == 100
    drain(engine, now_s)
    assert_all_free(engine)


@pytest.mark.parametrize("reserve", [True, False], ids=["mars", "mars-no-reserve"])
def test_mars_keeps_free_what_running_prefills_still_need(reserve: bool) -> None:
    """130 blocks, 512-token steps. A (2000-token prompt, 125 blocks) has run one step
    (32 blocks held); B (160 tokens, 10 blocks) fits whole in the 98 free blocks, but
    not beside the 93 A still needs: vLLM's gate alone starts B, MARS holds it back
    until A is done (both cannot hold their KV at once)."""
    quanta = MlfqConfig(quanta_tokens=(256, 256, 256, 256))
    policy = MlfqScheduler(quanta, reserve_prefill_kv=reserve)
    engine = make_engine(policy, num_blocks=130, budget=512)
    a = make_request("a", 2000, 2)
    engine.add_request(a, 0.0)
    plan, _ = step(engine, 0.0)
    assert a.num_blocks == 32
    b = make_request("b", 160, 2, arrival_s=plan.end_s)
    engine.add_request(b, plan.end_s)
    plan, _ = step(engine, plan.end_s)
    assert ("b#0" in scheduled(plan)) is not reserve
    now_s = plan.end_s
    if reserve:
        while not a.is_finished:
            assert "b#0" not in scheduled(plan)
            plan, _ = step(engine, now_s)
            now_s = plan.end_s
        plan, _ = step(engine, now_s)
        assert "b#0" in scheduled(plan)  # A's blocks are free (cached) again
    drain(engine, plan.end_s)
    assert_all_free(engine)
