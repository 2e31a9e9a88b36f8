"""The policy core (DESIGN sections 4-5): MLFQ, baseline schedulers' victims, AIMD
admission, KV retention, placement, the cluster scheduler and the policy registry.

Everything here is pure and synchronous: requests are real :class:`EngineRequest`
objects whose token counts the tests set by hand, time is passed explicitly.
"""

from __future__ import annotations

import math
import random
import sys
import types

import pytest

from mars_ray.config import AdmissionConfig, MigrationConfig, MlfqConfig, RetentionConfig
from mars_ray.engine.request import EngineRequest
from mars_ray.errors import UnknownNameError
from mars_ray.policies import (
    POLICIES,
    ClusterSignals,
    EngineLoad,
    PolicyConfig,
    PolicySpec,
    Pressure,
    RetentionAction,
    SessionTicket,
    TurnEndContext,
    get_policy,
)
from mars_ray.policies.admission import AimdAdmission, UnlimitedAdmission
from mars_ray.policies.baselines import FcfsScheduler, PlasScheduler, ProgramFcfsScheduler
from mars_ray.policies.cluster import (
    ClusterScheduler,
    Placement,
    SessionPhase,
    ToolPoolLoad,
    scope_signals,
)
from mars_ray.policies.migration import KvMigrationRule
from mars_ray.policies.mlfq import MlfqScheduler, MlfqState
from mars_ray.policies.placement import KvAffinePlacement, PowerOfTwoPlacement
from mars_ray.policies.queues import FifoQueue, LeveledQueue
from mars_ray.policies.retention import (
    BenefitRetention,
    LruRetention,
    MinWasteRetention,
    TtlPinRetention,
)
from mars_ray.registry import Registry

# --------------------------------------------------------------------------- factories


def make_request(
    session_id: str = "s",
    *,
    turn: int = 0,
    arrival_s: float = 0.0,
    prompt: int = 100,
    output: int = 10,
    computed: int = 0,
) -> EngineRequest:
    """One turn with ``computed`` of its ``prompt`` tokens already computed."""
    request = EngineRequest(session_id, turn, arrival_s, prompt, output)
    request.num_computed_tokens = computed
    return request


def mlfq(**config: object) -> MlfqScheduler:
    return MlfqScheduler(MlfqConfig(**config))


def added(policy: MlfqScheduler, request: EngineRequest, now_s: float = 0.0) -> EngineRequest:
    policy.on_added(request, now_s)
    return request


def level(request: EngineRequest) -> int:
    state: MlfqState = request.policy_state
    return state.level


def signals(
    kv: float = 0.5, tools: int = 0, workers: int = 16, wait_s: float = 0.0
) -> ClusterSignals:
    return ClusterSignals(
        kv_usage=kv, num_tools_in_flight=tools, num_tool_workers=workers, tool_wait_ema_s=wait_s
    )


def aimd(num_gpus: int = 1, **config: object) -> AimdAdmission:
    return AimdAdmission(AdmissionConfig(**config), num_gpus)


def turn_end(
    *,
    num_blocks: int = 100,
    predicted_tool_s: float = 1.0,
    recompute_s: float = 0.5,
    reload_s: float = 0.1,
    total: int = 1000,
    used: int = 500,
    can_offload: bool = False,
    last: bool = False,
) -> TurnEndContext:
    return TurnEndContext(
        session_id="s",
        num_blocks=num_blocks,
        context_tokens=num_blocks * 16,
        predicted_tool_s=predicted_tool_s,
        recompute_s=recompute_s,
        reload_s=reload_s,
        num_total_blocks=total,
        num_used_blocks=used,
        can_offload=can_offload,
        is_last_turn=last,
    )


def load(
    engine_id: int,
    *,
    running: int = 0,
    waiting: int = 0,
    kv: float = 0.0,
    weight: float = 1.0,
    node: int = 0,
) -> EngineLoad:
    return EngineLoad(engine_id, node, kv, running, waiting, weight)


def ticket(session_id: str, arrival_s: float, work: int = 1000) -> SessionTicket:
    return SessionTicket(session_id, arrival_s, work)


def cluster_scheduler(
    policy: str = "mars", num_engines: int = 1, seed: int = 0, **admission: object
) -> ClusterScheduler:
    config = PolicyConfig(admission=AdmissionConfig(**admission))
    return ClusterScheduler(get_policy(policy), config, num_engines, random.Random(seed))


# --------------------------------------------------------------------------- MLFQ levels


@pytest.mark.parametrize(
    ("remaining", "expected"),
    [(1, 0), (2048, 0), (2049, 1), (8192, 1), (8193, 2), (32768, 2), (32769, 3), (10**6, 3)],
)
def test_bucket_level_of_remaining_prefill(remaining: int, expected: int) -> None:
    assert mlfq().bucket_level(remaining) == expected


@pytest.mark.parametrize(
    ("prompt", "computed", "expected"),
    [(100, 0, 0), (5000, 0, 1), (20000, 0, 2), (40000, 0, 3), (40000, 38000, 0), (50, 49, 0)],
)
def test_new_request_level_is_bucket_of_remaining_prefill(
    prompt: int, computed: int, expected: int
) -> None:
    request = added(mlfq(), make_request(prompt=prompt, computed=computed))
    assert level(request) == expected
    assert mlfq().chunk_quantum_tokens(request) == (2048, 1024, 512, 256)[expected]


def test_full_quantum_with_prefill_left_demotes_one_level_per_step() -> None:
    policy = mlfq()
    request = added(policy, make_request(prompt=5000))  # 5000 left: level 1, quantum 1024
    assert level(request) == 1
    policy.on_scheduled(request, 1024, 0.0)
    request.num_computed_tokens += 1024
    assert level(request) == 2  # bucket of 3976 is 1; feedback says 2
    policy.on_scheduled(request, 512, 0.1)
    request.num_computed_tokens += 512
    assert level(request) == 3
    policy.on_scheduled(request, 256, 0.2)  # already at the last level: stays there
    request.num_computed_tokens += 256
    assert level(request) == 3
    assert request.policy_state.feedback_level == 3


def test_leftover_budget_beyond_the_quantum_also_counts_as_a_full_quantum() -> None:
    policy = mlfq()
    request = added(policy, make_request(prompt=20000))  # level 2, quantum 512
    policy.on_scheduled(request, 8192, 0.0)  # quantum plus leftover, 11808 left
    assert level(request) == 3


def test_less_than_the_quantum_keeps_the_level() -> None:
    policy = mlfq()
    request = added(policy, make_request(prompt=5000))
    policy.on_scheduled(request, 1000, 0.0)  # < 1024
    request.num_computed_tokens += 1000
    assert level(request) == 1
    assert request.policy_state.feedback_level == 0


def test_level_falls_with_the_remaining_prefill_bucket_when_not_demoted() -> None:
    policy = mlfq()
    request = added(policy, make_request(prompt=9000))  # level 2
    policy.on_scheduled(request, 500, 0.0)  # < 512: no demotion, 8500 left
    request.num_computed_tokens += 500
    assert level(request) == 2
    policy.on_scheduled(request, 400, 0.0)  # 8100 left: bucket 1
    assert level(request) == 1


def test_chunk_that_finishes_the_prefill_does_not_demote() -> None:
    policy = mlfq()
    request = added(policy, make_request(prompt=5000, computed=3976))  # 1024 left, level 0
    assert level(request) == 0
    policy.on_scheduled(request, 1024, 0.0)
    assert level(request) == 0
    assert request.policy_state.feedback_level == 0
    # Same at level 1: exactly the quantum, nothing left afterwards.
    request = added(policy, make_request(prompt=5000))
    request.policy_state.level = 1
    request.num_computed_tokens = 5000 - 1024
    policy.on_scheduled(request, 1024, 0.0)
    assert level(request) == 0
    assert request.policy_state.feedback_level == 0


def test_decoding_request_is_level_zero() -> None:
    policy = mlfq()
    request = added(policy, make_request(prompt=40000))
    policy.on_scheduled(request, 40000, 0.0)  # whole prompt at once: decoding next
    assert level(request) == 0


# --------------------------------------------------------------------------- MLFQ queue


def test_aging_promotes_one_level_per_aging_period() -> None:
    policy = mlfq(aging_s=30.0)
    queue = policy.make_waiting_queue()
    old = added(policy, make_request("old", prompt=20000))  # level 2
    mid = added(policy, make_request("mid", prompt=5000), 1.0)  # level 1
    queue.add(old, 0.0)
    queue.add(mid, 1.0)
    assert list(queue) == [mid, old]
    queue.refresh(29.9)
    assert level(old) == 2
    queue.refresh(30.0)
    assert level(old) == 1
    assert list(queue) == [mid, old]  # same level now: mid entered it first
    queue.refresh(31.0)  # mid's own aging (entered at 1 s)
    assert level(mid) == 0
    assert queue.peek() is mid
    queue.refresh(60.0)
    assert level(old) == 0
    queue.refresh(1000.0)  # level 0 is the top: nothing more happens
    assert level(old) == 0
    assert len(queue) == 2


def test_aging_does_not_apply_to_a_request_that_left_the_queue() -> None:
    policy = mlfq(aging_s=30.0)
    queue = policy.make_waiting_queue()
    request = added(policy, make_request(prompt=20000))
    queue.add(request, 0.0)
    assert queue.pop() is request
    queue.refresh(100.0)
    assert level(request) == 2
    assert len(queue) == 0 and queue.peek() is None


def test_continuations_go_before_first_turns_within_a_level() -> None:
    policy = mlfq()
    queue = policy.make_waiting_queue()
    first_a = added(policy, make_request("a", prompt=100))
    first_b = added(policy, make_request("b", prompt=100))
    cont_c = added(policy, make_request("c", turn=3, prompt=1000))
    big_cont = added(policy, make_request("d", turn=1, prompt=5000))  # level 1
    for t, request in enumerate([first_a, big_cont, first_b, cont_c]):
        queue.add(request, float(t))
    assert list(queue) == [cont_c, first_a, first_b, big_cont]
    assert [queue.pop() for _ in range(4)] == [cont_c, first_a, first_b, big_cont]


def test_within_a_level_older_sessions_go_first_and_younger_ones_are_evicted_first() -> None:
    """Session age, not turn age, breaks ties: admitted sessions finish in order."""
    policy = mlfq()
    old = added(policy, EngineRequest("old", 4, 30.0, 1000, 10, session_arrival_s=0.0))
    young = added(policy, EngineRequest("young", 1, 20.0, 1000, 10, session_arrival_s=10.0))
    queue = policy.make_waiting_queue()
    queue.add(young, 20.0)
    queue.add(old, 30.0)
    assert list(queue) == [old, young]
    assert policy.order_running_prefills([young, old]) == [old, young]
    assert policy.choose_victim([old, young], 31.0) is young


@pytest.mark.parametrize(
    ("prompt", "session_context", "expected"),
    [(40000, 38000, 0), (40000, 32000, 1), (40000, 30000, 2), (40000, 0, 3), (3000, 1000, 0)],
)
def test_bucket_counts_only_the_turns_own_prefill(
    prompt: int, session_context: int, expected: int
) -> None:
    """A continuation's earlier context is not its remaining prefill, even when it was
    evicted and must be recomputed (the session is not penalised twice for that)."""
    policy = mlfq(quanta_tokens=(8192, 8192, 8192, 8192))  # no demotion by quantum here
    request = added(
        policy, EngineRequest("s", 3, 0.0, prompt, 10, prior_computed_tokens=session_context)
    )
    assert level(request) == expected
    policy.on_scheduled(request, 2500, 0.0)  # recomputing context keeps the level
    assert level(request) == expected


def test_preempted_request_returns_to_level_zero_at_the_front() -> None:
    policy = mlfq()
    queue = policy.make_waiting_queue()
    cont = added(policy, make_request("cont", turn=2, prompt=500))  # level 0 continuation
    queue.add(cont, 0.0)
    victim = added(policy, make_request("victim", prompt=20000))  # level 2
    policy.on_scheduled(victim, 512, 0.0)
    assert level(victim) == 3
    victim.num_computed_tokens = 0  # the engine drops its KV
    policy.on_preempted(victim, 1.0)
    queue.prepend(victim, 1.0)
    assert level(victim) == 0
    assert list(queue) == [victim, cont]
    assert policy.chunk_quantum_tokens(victim) == 2048


def test_resuming_request_stays_level_zero_while_recomputing() -> None:
    policy = mlfq()
    victim = added(policy, make_request(prompt=20000))
    policy.on_scheduled(victim, 8192, 0.0)  # demoted to 3
    victim.num_computed_tokens = 8192
    policy.on_scheduled(victim, 8192, 0.1)
    victim.num_computed_tokens = 0
    policy.on_preempted(victim, 0.2)
    for _ in range(7):  # recompute 14336 of the 16384 tokens it had, a full quantum at a time
        policy.on_scheduled(victim, 2048, 0.3)
        victim.num_computed_tokens += 2048
        assert level(victim) == 0
        assert victim.policy_state.resuming
    policy.on_scheduled(victim, 20000 - victim.num_computed_tokens, 0.4)
    assert level(victim) == 0
    assert not victim.policy_state.resuming


def test_leveled_queue_prepend_remove_and_iteration() -> None:
    policy = mlfq()
    queue = policy.make_waiting_queue()
    a, b, c = (added(policy, make_request(s, prompt=100)) for s in "abc")
    queue.add(a, 0.0)
    queue.add(b, 0.0)
    queue.prepend(c, 0.0)
    assert list(queue) == [c, a, b]
    queue.remove(a)
    assert list(queue) == [c, b] and len(queue) == 2
    assert queue.pop() is c and queue.pop() is b
    with pytest.raises(IndexError):
        queue.pop()


def test_leveled_queue_keeps_one_live_entry_per_request() -> None:
    """Re-adding a request (e.g. it was re-ranked) leaves one live entry."""
    policy = mlfq()
    queue = policy.make_waiting_queue()
    a = added(policy, make_request("a", prompt=100))
    queue.add(a, 0.0)
    queue.prepend(a, 1.0)
    assert list(queue) == [a] and len(queue) == 1


def test_fifo_queue_is_first_come_first_served_with_prepend() -> None:
    queue = FifoQueue()
    a, b, c = (make_request(s) for s in "abc")
    queue.add(a, 0.0)
    queue.add(b, 0.0)
    queue.prepend(c, 0.0)
    assert queue.peek() is c and list(queue) == [c, a, b]
    queue.remove(a)
    assert [queue.pop(), queue.pop()] == [c, b] and len(queue) == 0


def test_leveled_queue_with_program_fcfs_orders_by_session_arrival() -> None:
    policy = ProgramFcfsScheduler()
    queue = policy.make_waiting_queue()
    late = make_request("late", turn=0, arrival_s=5.0)
    early_cont = EngineRequest("early", 3, 9.0, 100, 10, session_arrival_s=1.0)
    queue.add(late, 5.0)
    queue.add(early_cont, 9.0)
    assert isinstance(queue, LeveledQueue)
    assert list(queue) == [early_cont, late]


# --------------------------------------------------------------------------- victims


def running_mix(policy: MlfqScheduler) -> dict[str, EngineRequest]:
    """Running requests at several levels and phases, arrival order = name order."""
    reqs = {
        "decode_old": make_request("a", arrival_s=0.0, prompt=100, computed=99),
        "prefill0_old": make_request("b", arrival_s=1.0, prompt=1000),
        "decode_new": make_request("c", arrival_s=2.0, prompt=100, computed=99),
        "prefill0_new": make_request("d", arrival_s=3.0, prompt=1000),
        "prefill2": make_request("e", arrival_s=0.5, prompt=20000),
        "prefill1": make_request("f", arrival_s=4.0, prompt=5000),
    }
    for request in reqs.values():
        added(policy, request)
    return reqs


def test_victim_level_dominates_then_fresh_prefills_then_newest() -> None:
    policy = mlfq()
    reqs = running_mix(policy)
    running = list(reqs.values())
    order = []
    while running:
        victim = policy.choose_victim(running, 0.0)
        order.append(next(k for k, v in reqs.items() if v is victim))
        running.remove(victim)
    assert order == [
        "prefill2",  # highest level, although it is the oldest prefill
        "prefill1",
        "prefill0_new",  # level 0: fresh prefills before decodes, newest first
        "prefill0_old",
        "decode_new",
        "decode_old",
    ]


def test_resuming_request_is_evicted_after_fresh_prefills_of_its_level() -> None:
    policy = mlfq()
    resuming = added(policy, make_request("r", arrival_s=9.0, prompt=1000))
    policy.on_preempted(resuming, 0.0)
    fresh = added(policy, make_request("f", arrival_s=1.0, prompt=1000))
    decode = added(policy, make_request("d", arrival_s=0.0, prompt=100, computed=99))
    assert policy.choose_victim([resuming, fresh, decode], 0.0) is fresh
    # Among the non-fresh of a level (resuming and decodes): the newest goes first.
    assert policy.choose_victim([resuming, decode], 0.0) is resuming


def test_victim_ignores_kv_blocks_held() -> None:
    """The code's documented rule: no "most KV blocks first" tie-break (livelock)."""
    policy = mlfq()
    big = added(policy, make_request("big", arrival_s=0.0, prompt=1000))
    big.block_ids = list(range(60))
    small = added(policy, make_request("small", arrival_s=1.0, prompt=1000))
    small.block_ids = [99]
    assert policy.choose_victim([big, small], 0.0) is small


def test_without_unified_eviction_the_newest_is_the_victim() -> None:
    policy = MlfqScheduler(MlfqConfig(), unified_eviction=False)
    reqs = running_mix(policy)
    assert policy.choose_victim(list(reqs.values()), 0.0) is reqs["prefill1"]  # arrival 4.0
    without = [r for k, r in reqs.items() if k != "prefill1"]
    assert policy.choose_victim(without, 0.0) is reqs["prefill0_new"]  # 3.0, level 0


def test_baseline_victims() -> None:
    old = make_request("old", arrival_s=0.0, prompt=100, computed=99)
    new = make_request("new", arrival_s=5.0, prompt=5000)
    assert FcfsScheduler().choose_victim([old, new], 0.0) is new
    # Program FCFS: the session that arrived last loses, whatever its turn's arrival.
    first_session = EngineRequest("x", 4, 10.0, 100, 10, session_arrival_s=0.0)
    second_session = EngineRequest("y", 0, 2.0, 100, 10, session_arrival_s=2.0)
    assert ProgramFcfsScheduler().choose_victim([first_session, second_session], 0.0) is (
        second_session
    )
    # PLAS: most attained service loses, newest among equals.
    plas = PlasScheduler()
    heavy = EngineRequest("h", 3, 0.0, 100, 10, session_service_tokens=50000)
    light = EngineRequest("l", 0, 9.0, 100, 10)
    assert plas.choose_victim([heavy, light], 0.0) is heavy


def test_plas_levels_and_anti_starvation() -> None:
    plas = PlasScheduler()
    queue = plas.make_waiting_queue()
    heavy = EngineRequest("h", 3, 0.0, 100, 10, session_service_tokens=9000, session_service_s=3.0)
    light = EngineRequest("l", 0, 1.0, 100, 10)
    plas.on_added(heavy, 0.0)
    plas.on_added(light, 1.0)
    assert heavy.policy_state.level == 2 and light.policy_state.level == 0
    queue.add(heavy, 0.0)
    queue.add(light, 1.0)
    assert list(queue) == [light, heavy]
    queue.refresh(5.9)  # promotion after 2 x 3 s of service
    assert heavy.policy_state.level == 2
    queue.refresh(6.0)
    assert heavy.policy_state.level == 0
    assert list(queue) == [heavy, light]  # same level: earlier arrival first


# --------------------------------------------------------------------------- AIMD


def test_aimd_starts_at_the_initial_window_scaled_by_gpus() -> None:
    assert aimd().window() == 30
    assert aimd(num_gpus=4).window() == 120
    assert UnlimitedAdmission().window() is None


def test_aimd_additive_increase_when_healthy() -> None:
    admission = aimd(window_init_per_gpu=10)
    decision = admission.on_tick(signals(kv=0.5, tools=16, workers=16, wait_s=2.0), 0.0)
    assert (decision.window, decision.reason) == (11, "increase")
    assert decision.pressure is Pressure.NONE
    assert admission.on_tick(signals(kv=0.85), 0.2).window == 12  # 0.85 still grows


@pytest.mark.parametrize(
    "sig",
    [
        signals(tools=32, workers=16),  # ratio 2.0
        signals(tools=100, workers=16),
        signals(wait_s=5.0),  # EMA tool wait
        signals(tools=20, workers=16, wait_s=9.0),
    ],
)
def test_aimd_multiplicative_decrease_on_cpu_overload(sig: ClusterSignals) -> None:
    admission = aimd()
    decision = admission.on_tick(sig, 0.0)
    assert decision.window == 21  # 30 * 0.7
    assert decision.reason == "decrease: cpu overloaded"
    assert decision.pressure is Pressure.CPU
    assert admission.on_tick(sig, 0.2).window == 14  # 21 * 0.7 = 14.7


@pytest.mark.parametrize("kv", [0.90, 0.95, 1.3])
def test_aimd_decreases_on_high_kv_down_to_the_floor(kv: float) -> None:
    admission = aimd()
    decision = admission.on_tick(signals(kv=kv), 0.0)
    assert decision.reason == "decrease: kv high"
    # x0.7 gives 21 but the KV cap has reached W_min at 0.90.
    assert decision.window == 4
    assert decision.pressure is Pressure.KV


@pytest.mark.parametrize(
    "sig",
    [
        signals(tools=24, workers=16),  # ratio 1.5: neither healthy nor overloaded
        signals(wait_s=3.0),
        signals(tools=16, workers=16, wait_s=2.5),
    ],
)
def test_aimd_holds_between_the_thresholds(sig: ClusterSignals) -> None:
    admission = aimd(window_init_per_gpu=10)
    decision = admission.on_tick(sig, 0.0)
    assert (decision.window, decision.reason) == (10, "hold")
    assert admission.on_tick(sig, 0.2).window == 10


@pytest.mark.parametrize(("kv", "cap"), [(0.85, 30), (0.87, 19), (0.88, 14), (0.89, 9)])
def test_aimd_kv_cap_falls_linearly_from_max_to_min(kv: float, cap: int) -> None:
    admission = aimd()
    decision = admission.on_tick(signals(kv=kv, workers=100), 0.0)  # tool cap out of the way
    assert decision.window == cap  # 30 - (kv - 0.85) / 0.05 * 26, truncated
    if kv > 0.85:
        assert decision.reason == "hold" and decision.pressure is Pressure.KV


def test_aimd_tool_worker_cap_and_floor() -> None:
    admission = aimd()
    assert admission.on_tick(signals(workers=3), 0.0).window == 5  # ceil(1.5 * 3)
    assert admission.on_tick(signals(workers=11), 0.2).window == 6  # grows again from 5
    # The floor wins over the tool cap: ceil(1.5 * 2) = 3 < W_min = 4.
    assert admission.on_tick(signals(workers=2), 0.4).window == 4


def test_aimd_bounds_scale_with_gpus() -> None:
    admission = aimd(num_gpus=4)
    for i in range(10):
        admission.on_tick(signals(workers=1000), 0.2 * i)
    assert admission.window() == 120  # W_max = 30 x 4
    for i in range(20):
        admission.on_tick(signals(tools=5000, workers=1000), 0.2 * i)
    assert admission.window() == 16  # W_min = 4 x 4
    assert admission.on_tick(signals(workers=1000), 5.0).window == 17


def test_admission_order_by_pressure() -> None:
    a, b, c = ticket("a", 0.0, 500), ticket("b", 1.0, 100), ticket("c", 2.0, 900)
    d = ticket("d", 3.0, 100)
    waiting = [c, d, a, b]
    admission = aimd()
    assert admission.pressure is Pressure.NONE
    assert admission.order(waiting) == [a, b, c, d]  # FCFS
    admission.on_tick(signals(kv=0.87), 0.0)
    assert admission.pressure is Pressure.KV
    assert admission.order(waiting) == [b, d, a, c]  # shortest first, FCFS among equals
    admission.on_tick(signals(tools=40), 0.2)
    assert admission.pressure is Pressure.CPU
    assert admission.order(waiting) == [c, a, b, d]  # longest first
    admission.on_tick(signals(kv=0.5), 0.4)
    assert admission.order(waiting) == [a, b, c, d]
    assert UnlimitedAdmission().order(waiting) == [a, b, c, d]


def test_hysteresis_holds_the_overload_flag_from_the_high_mark_to_the_low_mark() -> None:
    admission = aimd(window_init_per_gpu=20)
    assert admission.on_tick(signals(kv=0.87), 0.0).reason == "hold"  # between the marks
    assert admission.on_tick(signals(kv=0.91), 0.2).reason == "decrease: kv high"  # >= 0.90
    # Back between the marks: still overloaded, still shrinking (not a hold).
    decision = admission.on_tick(signals(kv=0.87), 0.4)
    assert decision.reason == "decrease: kv high" and admission.overloaded == (False, True)
    assert admission.on_tick(signals(kv=0.84), 0.6).reason == "increase"  # cleared at <= 0.85
    assert admission.overloaded == (False, False)
    # CPU: set at 2.0 tools per core, cleared only at 1.0 and a tool delay <= 2 s.
    admission.on_tick(signals(tools=32), 0.8)
    assert admission.on_tick(signals(tools=24), 1.0).reason == "decrease: cpu overloaded"
    assert admission.on_tick(signals(tools=16, wait_s=3.0), 1.2).reason.startswith("decrease")
    assert admission.on_tick(signals(tools=16, wait_s=1.0), 1.4).reason == "increase"


def test_without_hysteresis_overload_is_read_afresh_each_tick() -> None:
    admission = aimd(window_init_per_gpu=20, hysteresis=False)
    admission.on_tick(signals(kv=0.91), 0.0)
    assert admission.on_tick(signals(kv=0.87), 0.2).reason == "hold"
    assert admission.overloaded == (False, False)


def test_long_prefill_gate_admits_one_long_session_per_gpu_until_its_first_turn_ends() -> None:
    admission = aimd(kv_fit=False)
    long1, long2 = ticket("l1", 0.0, 60_000), ticket("l2", 1.0, 50_001)
    short, edge = ticket("s", 2.0, 1_000), ticket("e", 3.0, 50_000)  # 50,000 is not long
    assert admission.is_long(long2) and not admission.is_long(edge)
    assert admission.select([long1, long2, short, edge], 10) == [long1, short, edge]
    short2 = ticket("s2", 4.0, 1_000)
    assert admission.select([long2, short2], 10) == [short2]  # l1 still in its first turn
    admission.on_first_turn_done("l1")
    assert admission.select([long2], 10) == [long2]
    assert aimd(num_gpus=2, kv_fit=False).select([long1, long2], 10) == [long1, long2]
    assert aimd(kv_fit=False, long_prefill_tokens=0).select([long1, long2], 10) == [long1, long2]


def test_tail_mode_admits_up_to_three_long_sessions_when_only_long_ones_wait() -> None:
    admission = aimd(kv_fit=False)
    longs = [ticket(f"l{i}", float(i), 60_000) for i in range(5)]
    assert admission.select(longs, 10) == longs[:3]
    admission.on_session_done("l0")  # cancelled or finished: its slot frees too
    assert admission.select(longs[3:], 10) == longs[3:4]


def test_kv_fit_packs_first_prompts_into_the_kv_left_below_the_high_mark() -> None:
    admission = aimd()
    # 100k tokens of KV at usage 0.5: 40k left below 0.90.
    admission.on_tick(ClusterSignals(0.5, 0, 16, 0.0, kv_capacity_tokens=100_000), 0.0)
    a, b, c = ticket("a", 0.0, 30_000), ticket("b", 1.0, 20_000), ticket("c", 2.0, 5_000)
    assert admission.select([a, b, c], 10) == [a, c]  # b does not fit after a; c does
    # Admitted first prompts count until their first turn ends (the engines'
    # figures do not hold them yet): 5k left.
    assert admission.select([b], 10) == []
    admission.on_first_turn_done("a")
    assert admission.select([b], 10) == [b]
    # Unknown capacity (a runtime that does not report it): no packing.
    blind = aimd()
    blind.on_tick(signals(kv=0.89), 0.0)
    assert blind.select([a, b, c], 10) == [c, b, a]  # KV pressure: shortest first
    assert aimd(kv_fit=False).select([a, b, c], 2) == [a, b]


def test_stale_signals_fall_back_to_a_small_fixed_window() -> None:
    admission = aimd(num_gpus=2, kv_fit=False)
    fresh = ClusterSignals(0.5, 0, 64, 0.0, observed_s=9.0)
    assert admission.on_tick(fresh, 10.0).window == 60  # 1 s old: fresh
    decision = admission.on_tick(ClusterSignals(0.5, 0, 64, 0.0, observed_s=7.9), 10.0)
    assert decision.window == 4 and decision.reason == "stale signals"  # 2 per GPU
    assert (
        admission.select([ticket("l", 0.0, 60_000), ticket("s", 1.0, 10)], 4)[0].session_id == "s"
    )
    assert len(admission.select([ticket("l2", 0.0, 60_000)], 4)) == 0  # no long session
    assert admission.on_tick(fresh, 10.0).window == 60  # fresh again: the window is back
    trusting = aimd(stale_signal_after_s=math.inf)
    assert trusting.on_tick(ClusterSignals(0.5, 0, 32, 0.0, observed_s=0.0), 1e6).window == 30


def test_cluster_scheduler_tells_admission_when_a_first_turn_ends() -> None:
    spec = POLICIES.get("mars")
    cluster = ClusterScheduler(spec, PolicyConfig(), 1, random.Random(0))
    engines = [EngineLoad(0, 0, 0.5, 0, 0)]
    cluster.on_tick([ClusterSignals(0.5, 0, 16, 0.0, kv_capacity_tokens=100_000)], 0.0, engines)
    assert len(cluster.on_session_arrival(ticket("a", 0.0, 30_000), 0.0, engines)) == 1
    assert cluster.on_session_arrival(ticket("b", 0.1, 20_000), 0.1, engines) == []  # no room
    cluster.on_turn_finished("a", 30_000, 1.0)
    _, started = cluster.on_tick(
        [ClusterSignals(0.5, 0, 16, 0.0, kv_capacity_tokens=100_000)], 0.2, engines
    )
    assert [p.session_id for p in started] == ["b"]


def test_scope_signals_read_the_kv_working_set_of_each_engine() -> None:
    pools = [ToolPoolLoad(3, 16, 1.0)]
    loads = [EngineLoad(0, 0, 0.5, 0, 0, kv_demand=0.9), EngineLoad(1, 0, 0.7, 0, 0)]
    signals = scope_signals(loads, pools, kv_capacity_tokens=1000, observed_s=4.0)
    assert signals.kv_usage == pytest.approx((0.9 + 0.7) / 2)  # working set, usage as floor
    assert (signals.kv_capacity_tokens, signals.observed_s) == (1000, 4.0)
    assert scope_signals([0.25], pools).kv_usage == 0.25  # a float is taken as given


# --------------------------------------------------------------------------- retention


def test_benefit_retention_holds_kv_when_holding_is_cheaper_than_recompute() -> None:
    policy = BenefitRetention(RetentionConfig(mars_hold_ttl_factor=2.0))
    # 1 s x 100 / 1000 blocks = 0.1 GPU-s of memory <= 0.5 s of re-prefill: held for 2 s.
    decision = policy.on_turn_end(turn_end())
    assert decision.action is RetentionAction.PIN and decision.ttl_s == pytest.approx(2.0)
    # Boundary: 5 s x 0.1 = 0.5 <= 0.5 still holds.
    decision = policy.on_turn_end(turn_end(predicted_tool_s=5.0))
    assert decision.action is RetentionAction.PIN and decision.ttl_s == pytest.approx(10.0)
    # Without holding, kept KV only goes to the protected end of the LRU order.
    unheld = BenefitRetention(hold=False).on_turn_end(turn_end())
    assert unheld.action is RetentionAction.KEEP_LRU


def test_benefit_retention_long_waits_evict_or_offload() -> None:
    policy = BenefitRetention()
    long_wait_s = 10.0  # hold cost 1.0 > 0.5
    decision = policy.on_turn_end(turn_end(predicted_tool_s=long_wait_s))
    assert decision.action is RetentionAction.EVICT_FIRST
    decision = policy.on_turn_end(
        turn_end(predicted_tool_s=long_wait_s, can_offload=True, reload_s=0.1)
    )
    assert decision.action is RetentionAction.OFFLOAD
    decision = policy.on_turn_end(
        turn_end(predicted_tool_s=long_wait_s, can_offload=True, reload_s=0.5)
    )
    assert decision.action is RetentionAction.EVICT_FIRST  # reload not cheaper


def test_benefit_retention_evicts_first_after_the_last_turn() -> None:
    decision = BenefitRetention().on_turn_end(turn_end(predicted_tool_s=0.0, last=True))
    assert decision.action is RetentionAction.EVICT_FIRST


def test_ttl_pin_retention() -> None:
    policy = TtlPinRetention(RetentionConfig())
    decision = policy.on_turn_end(turn_end(predicted_tool_s=1.0))
    assert decision.action is RetentionAction.PIN
    assert decision.ttl_s == pytest.approx(1.5)
    assert policy.on_turn_end(turn_end(predicted_tool_s=2.0)).action is RetentionAction.KEEP_LRU
    last = turn_end(predicted_tool_s=0.1, last=True)
    assert policy.on_turn_end(last).action is RetentionAction.KEEP_LRU
    custom = TtlPinRetention(RetentionConfig(continuum_pin_below_s=5.0, continuum_ttl_factor=2.0))
    decision = custom.on_turn_end(turn_end(predicted_tool_s=4.0))
    assert (decision.action, decision.ttl_s) == (RetentionAction.PIN, 8.0)


def test_min_waste_retention_picks_the_cheapest_action() -> None:
    policy = MinWasteRetention()
    # preserve 100 x 0.1 = 10 < discard 0.5 x 600 = 300
    decision = policy.on_turn_end(turn_end(predicted_tool_s=0.1))
    assert (decision.action, decision.ttl_s) == (RetentionAction.PIN, 0.1)
    # preserve 1000 > discard 300, no CPU tier
    decision = policy.on_turn_end(turn_end(predicted_tool_s=10.0))
    assert (decision.action, decision.ttl_s) == (RetentionAction.EVICT_FIRST, 0.0)
    # swap 2 x 0.1 x 500 = 100 < discard 300 < preserve 1000
    decision = policy.on_turn_end(turn_end(predicted_tool_s=10.0, can_offload=True))
    assert decision.action is RetentionAction.OFFLOAD
    # swap 2 x 0.4 x 500 = 400 > discard 300
    decision = policy.on_turn_end(turn_end(predicted_tool_s=10.0, can_offload=True, reload_s=0.4))
    assert decision.action is RetentionAction.EVICT_FIRST
    last = turn_end(predicted_tool_s=0.1, last=True)
    assert policy.on_turn_end(last).action is RetentionAction.KEEP_LRU


def test_lru_retention_always_keeps() -> None:
    assert LruRetention().on_turn_end(turn_end(last=True)).action is RetentionAction.KEEP_LRU


# --------------------------------------------------------------------------- placement


def test_kv_affine_new_session_goes_to_the_least_loaded_engine() -> None:
    placement = KvAffinePlacement()
    engines = [load(0, running=5), load(1, running=1), load(2, running=1)]
    assert placement.place_new("s", engines) == 1  # tie broken by engine id
    engines = [load(0, kv=0.5), load(1, running=10), load(2, waiting=6)]
    assert placement.place_new("s", engines) == 1  # 10 < 12 < 32
    # Capacity weight: an engine twice as fast looks half as loaded.
    assert placement.place_new("s", [load(0, running=4), load(1, running=6, weight=2.0)]) == 1


def test_kv_affine_continuation_sticks_unless_overloaded() -> None:
    placement = KvAffinePlacement()  # overloaded: score > 2 x best + 32
    assert placement.place_continuation("s", None, [load(0, running=3), load(1)]) == 1
    engines = [load(0, running=34), load(1, running=1)]
    assert placement.place_continuation("s", 0, engines) == 0  # 34 == 2 x 1 + 32
    engines = [load(0, running=35), load(1, running=1)]
    assert placement.place_continuation("s", 0, engines) == 1
    engines = [load(0, running=10, waiting=5), load(1, running=0)]
    assert placement.place_continuation("s", 0, engines) == 0  # 20 <= 32
    # KV usage weighs 64 queue slots: 64 x 0.45 = 28.8 <= 32 stays, 64 x 0.6 = 38.4 moves.
    assert placement.place_continuation("s", 1, [load(0), load(1, kv=0.45)]) == 1
    assert placement.place_continuation("s", 1, [load(0), load(1, kv=0.6)]) == 0


def test_power_of_two_is_deterministic_for_a_seed_and_takes_the_shorter_queue() -> None:
    engines = [load(i, running=i % 3, waiting=(5 * i) % 4) for i in range(6)]
    first = PowerOfTwoPlacement(random.Random(42))
    second = PowerOfTwoPlacement(random.Random(42))
    picks = [first.place_new(f"s{i}", engines) for i in range(50)]
    assert picks == [second.place_new(f"s{i}", engines) for i in range(50)]
    replay = random.Random(42)
    for pick in picks:
        a, b = replay.sample(range(len(engines)), 2)
        qa = engines[a].num_running + engines[a].num_waiting
        qb = engines[b].num_running + engines[b].num_waiting
        assert pick == (a if qa <= qb else b)
    assert len(set(picks)) > 1
    # No affinity: a continuation ignores where the KV is.
    cont = PowerOfTwoPlacement(random.Random(42))
    assert [cont.place_continuation(f"s{i}", 0, engines) for i in range(50)] == picks
    assert PowerOfTwoPlacement(random.Random(0)).place_new("s", [load(7)]) == 7


def test_power_of_two_differs_across_seeds() -> None:
    engines = [load(i) for i in range(8)]
    picks = {PowerOfTwoPlacement(random.Random(seed)).place_new("s", engines) for seed in range(20)}
    assert len(picks) > 1


# --------------------------------------------------------------------------- cluster scheduler


def test_window_limits_active_sessions_and_finishing_admits_the_next() -> None:
    sched = cluster_scheduler(window_min_per_gpu=1, window_init_per_gpu=2, window_max_per_gpu=2)
    engines = [load(0)]
    assert sched.on_session_arrival(ticket("a", 0.0), 0.0, engines) == [Placement("a", 0, 0)]
    assert sched.on_session_arrival(ticket("b", 1.0), 1.0, engines) == [Placement("b", 0, 0)]
    assert sched.on_session_arrival(ticket("c", 2.0), 2.0, engines) == []
    sched.check_invariants()
    assert (sched.num_active(), sched.num_queued()) == (2, 1)
    assert sched.sessions["c"].phase is SessionPhase.QUEUED
    # a runs a turn and a tool, then its continuation is placed without admission.
    sched.on_turn_finished("a", 1000, 0.5)
    assert sched.on_tool_finished("a", 2.0, engines) == Placement("a", 1, 0)
    assert sched.predicted_tool_s("a") == 2.0
    sched.on_turn_finished("a", 200, 0.1)
    assert sched.sessions["a"].service_tokens == 1200
    assert sched.sessions["a"].service_s == pytest.approx(0.6)
    assert sched.on_session_finished("a", 5.0, engines) == [Placement("c", 0, 0)]
    sched.check_invariants()
    assert sched.sessions["a"].phase is SessionPhase.DONE
    assert sched.sessions["c"].admitted_s == 5.0
    assert (sched.num_active(), sched.num_queued()) == (2, 0)


def test_window_shrinks_on_a_tick_and_holds_back_admission() -> None:
    sched = cluster_scheduler(window_min_per_gpu=1, window_init_per_gpu=3, window_max_per_gpu=3)
    engines = [load(0)]
    for i, sid in enumerate("abcde"):
        sched.on_session_arrival(ticket(sid, float(i)), float(i), engines)
    assert (sched.num_active(), sched.num_queued()) == (3, 2)
    decisions, started = sched.on_tick([signals(kv=0.95)], 5.0, engines)
    assert decisions[0].window == 1 and started == []
    assert sched.on_session_finished("a", 6.0, engines) == []  # 2 active > window 1
    assert sched.on_session_finished("b", 7.0, engines) == []  # 1 active == window 1
    sched.check_invariants()
    _, started = sched.on_tick([signals(kv=0.1)], 8.0, engines)  # window back to 2
    assert started == [Placement("d", 0, 0)]
    sched.check_invariants()


def test_tick_admits_shortest_first_under_kv_pressure() -> None:
    sched = cluster_scheduler(window_min_per_gpu=1, window_init_per_gpu=1, window_max_per_gpu=3)
    engines = [load(0, running=1)]  # busy: work conservation stays out of it
    sched.on_session_arrival(ticket("a", 0.0, 100), 0.0, engines)
    sched.on_session_arrival(ticket("long", 1.0, 9000), 1.0, engines)
    sched.on_session_arrival(ticket("short", 2.0, 10), 2.0, engines)
    _, started = sched.on_tick([signals(kv=0.86)], 3.0, engines)  # hold at 1, KV pressure
    assert started == []
    sched.on_session_finished("a", 4.0, engines)  # frees the slot; KV pressure in force
    assert sched.sessions["short"].phase is SessionPhase.ACTIVE
    assert sched.sessions["long"].phase is SessionPhase.QUEUED


def test_unlimited_admission_starts_everyone_on_arrival() -> None:
    sched = cluster_scheduler("fcfs", num_engines=2)
    engines = [load(0, running=3), load(1)]
    for i in range(50):
        assert len(sched.on_session_arrival(ticket(f"s{i}", float(i)), float(i), engines)) == 1
    assert sched.windows() == [None]
    assert (sched.num_active(), sched.num_queued()) == (50, 0)
    sched.check_invariants()


def test_session_errors() -> None:
    sched = cluster_scheduler(window_min_per_gpu=1, window_init_per_gpu=1, window_max_per_gpu=1)
    engines = [load(0)]
    sched.on_session_arrival(ticket("a", 0.0), 0.0, engines)
    sched.on_session_arrival(ticket("b", 0.0), 0.0, engines)
    with pytest.raises(ValueError, match="arrived twice"):
        sched.on_session_arrival(ticket("a", 1.0), 1.0, engines)
    with pytest.raises(ValueError, match="finished while queued"):
        sched.on_session_finished("b", 1.0, engines)
    sched.on_session_finished("a", 1.0, engines)
    with pytest.raises(ValueError, match="finished while done"):
        sched.on_session_finished("a", 1.0, engines)
    sched.check_invariants()


def test_per_engine_admission_scope_for_mars_local() -> None:
    sched = cluster_scheduler(
        "mars-local", num_engines=2, window_min_per_gpu=1, window_init_per_gpu=1
    )
    assert sched.per_engine_admission and len(sched.admissions) == 2
    busy_0 = [load(0, running=5, waiting=5), load(1)]
    assert sched.on_session_arrival(ticket("a", 0.0), 0.0, busy_0) == [Placement("a", 0, 1)]
    # Engine 1's window (1) is full; engine 0's is not used by "b", routed to engine 1.
    assert sched.on_session_arrival(ticket("b", 1.0), 1.0, busy_0) == []
    assert sched.sessions["b"].scope == 1
    busy_1 = [load(0), load(1, running=5, waiting=5)]
    assert sched.on_session_arrival(ticket("c", 2.0), 2.0, busy_1) == [Placement("c", 0, 0)]
    assert sched.windows() == [1, 1]
    sched.check_invariants()
    # A tick on engine 0 alone cannot admit b; freeing engine 1's slot can.
    _, started = sched.on_tick([signals(), signals(kv=0.95)], 3.0, busy_1)
    assert started == []
    sched.on_turn_finished("a", 100, 0.1)
    assert sched.on_session_finished("a", 4.0, busy_1) == [Placement("b", 0, 1)]
    sched.check_invariants()


def test_a_removed_engine_s_queued_sessions_move_to_live_scopes() -> None:
    """mars-local: sessions queued for a dead engine's window are re-homed to the live
    engines (in arrival order) instead of waiting for a window that never opens."""
    sched = cluster_scheduler(
        "mars-local", num_engines=2, window_min_per_gpu=1, window_init_per_gpu=1
    )
    busy_1 = [load(0), load(1, running=5, waiting=5)]
    assert sched.on_session_arrival(ticket("a", 0.0), 0.0, busy_1) == [Placement("a", 0, 0)]
    assert sched.on_session_arrival(ticket("b", 1.0), 1.0, busy_1) == []  # queued on 0
    assert sched.on_session_arrival(ticket("c", 2.0), 2.0, busy_1) == []
    assert {sched.sessions[s].scope for s in "bc"} == {0}
    live = [load(1)]
    # engine 0 dies: b (first in line) starts on engine 1, c waits there
    assert sched.on_engine_removed(0, 3.0, live) == [Placement("b", 0, 1)]
    assert sched.sessions["c"].scope == 1 and sched.num_queued() == 1
    assert sched.on_engine_removed(0, 3.0, live) == [], "idempotent"
    sched.check_invariants()
    # the dead scope admits no one again, even with a free slot after a's end
    sched.on_turn_finished("a", 10, 0.1)
    assert sched.on_session_finished("a", 4.0, live) == []
    sched.on_turn_finished("b", 10, 0.1)
    assert sched.on_session_finished("b", 5.0, live) == [Placement("c", 0, 1)]
    sched.check_invariants()
    # a global window has nothing to re-home
    assert cluster_scheduler("mars", num_engines=2).on_engine_removed(0, 0.0, live) == []


def test_global_scope_spans_all_engines() -> None:
    sched = cluster_scheduler("mars", num_engines=4)
    assert not sched.per_engine_admission
    assert sched.windows() == [120]
    engines = [load(0, running=9), load(1, running=2), load(2, running=1), load(3, running=4)]
    assert sched.on_session_arrival(ticket("a", 0.0), 0.0, engines) == [Placement("a", 0, 2)]
    sched.on_turn_finished("a", 100, 0.1)
    engines = [load(0), load(1), load(2, running=20), load(3)]
    assert sched.on_tool_finished("a", 1.0, engines).engine_id == 2  # KV-affine: sticks


# --------------------------------------------------------------------------- registry

EXPECTED_POLICIES = {
    "mars",
    "mars-no-admission",
    "mars-no-reserve",
    "mars-no-shrink",
    "mars-no-hysteresis",
    "mars-no-long-gate",
    "mars-no-kv-fit",
    "mars-no-stale-guard",
    "mars-no-unified-eviction",
    "mars-local",
    "mars-local-affine",
    "mars-early-bind",
    "mars-no-work-conservation",
    "mars-no-cpu-aware",
    "mars-no-rebalance",
    "mars-no-capacity-weight",
    "fcfs",
    "autellix",
    "continuum",
    "infercept",
}


def test_registry_holds_mars_its_ablations_and_the_baselines() -> None:
    assert set(POLICIES.names()) == EXPECTED_POLICIES
    assert list(POLICIES) == sorted(EXPECTED_POLICIES)


@pytest.mark.parametrize("name", sorted(EXPECTED_POLICIES))
def test_every_registered_policy_builds(name: str) -> None:
    spec = get_policy(name)
    assert spec.name == name and spec.summary
    config = PolicyConfig()
    scheduler = spec.make_scheduler(config)
    queue = scheduler.make_waiting_queue()
    request = make_request(prompt=3000)
    scheduler.on_added(request, 0.0)
    queue.add(request, 0.0)
    assert queue.pop() is request
    assert scheduler.choose_victim([request], 0.0) is request
    decision = spec.make_retention(config).on_turn_end(turn_end())
    assert isinstance(decision.action, RetentionAction)
    admission = spec.make_admission(config, 2)
    assert admission.window() == (60 if spec.aimd_admission else None)
    placement = spec.make_placement(random.Random(0))
    assert placement.place_new("s", [load(0), load(1)]) in (0, 1)


def test_ablations_differ_from_mars_where_named() -> None:
    config = PolicyConfig()
    assert get_policy("mars").make_scheduler(config).shrink_chunks
    assert not get_policy("mars-no-shrink").make_scheduler(config).shrink_chunks
    assert not get_policy("mars-no-admission").aimd_admission
    assert get_policy("mars-local").admission_scope == "engine"
    assert get_policy("mars-local").placement == "power-of-two"
    assert isinstance(get_policy("mars-no-unified-eviction").make_retention(config), LruRetention)


def test_unknown_policy_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError) as info:
        get_policy("marz")
    message = str(info.value)
    assert message.startswith("unknown policy 'marz'; known: ")
    for name in EXPECTED_POLICIES:
        assert name in message


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        POLICIES.add("mars", get_policy("fcfs"))
    assert get_policy("mars").name == "mars"  # untouched
    registry: Registry[int] = Registry("thing")
    registry.register("one")(1)
    with pytest.raises(ValueError, match="thing 'one' is registered twice"):
        registry.register("one")(2)
    assert registry.get("one") == 1


def test_import_path_loads_an_out_of_tree_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    custom = PolicySpec(
        "custom", "out of tree", lambda c: FcfsScheduler(), lambda c: LruRetention()
    )
    module = types.ModuleType("my_policies")
    module.CUSTOM = custom  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "my_policies", module)
    assert get_policy("my_policies:CUSTOM") is custom
    assert "my_policies:CUSTOM" not in POLICIES
    with pytest.raises(UnknownNameError, match="cannot import policy 'my_policies:MISSING'"):
        get_policy("my_policies:MISSING")
    with pytest.raises(UnknownNameError, match="cannot import policy 'no_such_mod_xyz:X'"):
        get_policy("no_such_mod_xyz:X")


# --------------------------------------------------------------------------- failures


def test_a_turn_whose_engine_died_is_placed_on_a_live_engine_and_queued_sessions_leave() -> None:
    scheduler = cluster_scheduler(
        "mars", num_engines=2, window_init_per_gpu=1, window_min_per_gpu=1, window_max_per_gpu=1
    )
    loads = [EngineLoad(0, 0, 0.0, 0, 0), EngineLoad(1, 0, 0.0, 0, 0)]
    started = scheduler.on_session_arrival(ticket("a", 0.0), 0.0, loads)
    started += scheduler.on_session_arrival(ticket("b", 0.1), 0.1, loads)
    assert [p.session_id for p in started] == ["a", "b"]  # window of 2 (1 per GPU)
    assert scheduler.on_session_arrival(ticket("c", 0.2), 0.2, loads) == []  # queued
    lost_engine = scheduler.sessions["a"].last_engine_id
    live = [load for load in loads if load.engine_id != lost_engine]
    placement = scheduler.on_engine_lost("a", live)
    assert placement.engine_id != lost_engine
    assert scheduler.sessions["a"].last_engine_id == placement.engine_id
    assert scheduler.on_session_cancelled("c", 0.3, live) == []  # left the queue
    assert scheduler.num_queued() == 0
    scheduler.check_invariants()


# --------------------------------------------------------------------------- KV migration


def test_migration_rule_prices_the_link_and_moves_only_when_faster() -> None:
    config = MigrationConfig(intra_node_gb_per_s=100.0, inter_node_gb_per_s=10.0, setup_ms=1.0)
    rule = KvMigrationRule(config, kv_bytes_per_token=100_000)  # 1k tokens = 0.1 GB
    assert rule.transfer_s(1000, same_node=True) == pytest.approx(0.001 + 0.001)
    assert rule.transfer_s(1000, same_node=False) == pytest.approx(0.001 + 0.01)
    assert rule.decide(1000, same_node=False, recompute_s=0.02).move
    slow = rule.decide(1000, same_node=False, recompute_s=0.005)
    assert not slow.move and slow.reason.startswith("recompute: 1000 tokens")
    assert not rule.decide(0, same_node=True, recompute_s=1.0).move  # nothing to move
    with pytest.raises(ValueError):
        rule.decide(-1, same_node=True, recompute_s=1.0)


def test_only_a_global_kv_aware_placement_migrates_kv() -> None:
    config = PolicyConfig()
    assert get_policy("mars").make_migration(config, 1) is not None
    assert get_policy("fcfs").make_migration(config, 1) is not None
    assert get_policy("mars-local").make_migration(config, 1) is None  # router knows no KV
    off = PolicyConfig(migration=MigrationConfig(enabled=False))
    assert get_policy("mars").make_migration(off, 1) is None


# ----------------------------------------------------- snapshot / restore (scheduler restart)


def _drive(cluster: ClusterScheduler, engines: list[EngineLoad], start: int, end: int) -> list:
    """Arrivals, ticks, turns and tools, deterministic; returns what the scheduler said."""
    said: list = []
    for i in range(start, end):
        said += cluster.on_session_arrival(
            ticket(f"s{i}", float(i), 500 + 997 * i % 9000), i, engines
        )
        kv = 0.95 if i % 4 == 3 else 0.3  # KV pressure now and then: the window shrinks
        signals = [
            scope_signals(
                [kv] * (len(engines) // len(cluster.admissions)), [ToolPoolLoad(i % 5, 16, 0.1)]
            )
            for _ in cluster.admissions
        ]
        decisions, started = cluster.on_tick(signals, i + 0.5, engines)
        said += [d.window for d in decisions] + started
        for sid, state in sorted(cluster.sessions.items()):
            if state.phase is SessionPhase.ACTIVE and (hash(sid) + i) % 3 == 0:
                cluster.on_turn_finished(sid, 100 + i, 0.01 * i)
                said.append(cluster.on_tool_finished(sid, 0.5 + i % 4, engines))
                if state.next_turn >= 3:
                    said += cluster.on_session_finished(sid, i + 0.7, engines)
    return said


@pytest.mark.parametrize("policy", ["mars", "fcfs", "mars-local", "autellix"])
def test_cluster_snapshot_round_trips_and_the_restored_scheduler_decides_alike(
    policy: str,
) -> None:
    # every GPU busy: work conservation (mars) leaves the queue to the window
    engines = [
        load(0, running=1),
        load(1, running=2),
        load(2, kv=0.4, running=1),
        load(3, waiting=1),
    ]
    original = cluster_scheduler(
        policy, num_engines=4, window_init_per_gpu=1, window_min_per_gpu=1, window_max_per_gpu=2
    )
    _drive(original, engines, 0, 30)
    snapshot = original.snapshot()
    assert snapshot.sessions and any(s.phase is SessionPhase.QUEUED for s in snapshot.sessions) == (
        policy in ("mars", "mars-local")
    )
    restored = cluster_scheduler(
        policy, num_engines=4, window_init_per_gpu=1, window_min_per_gpu=1, window_max_per_gpu=2
    )
    restored.restore(snapshot)
    restored.check_invariants()
    assert restored.snapshot() == snapshot, "restore(snapshot()) loses nothing"
    assert restored.windows() == original.windows()
    assert (restored.num_queued(), restored.num_active()) == (
        original.num_queued(),
        original.num_active(),
    )
    for sid, record in ((r.session_id, r) for r in snapshot.sessions):
        assert restored.session_snapshot(sid) == record
        assert restored.predicted_tool_s(sid) == original.predicted_tool_s(sid)
    if policy != "mars-local":  # power-of-two choices' random stream is not kept
        assert _drive(restored, engines, 30, 60) == _drive(original, engines, 30, 60)
        assert restored.snapshot() == original.snapshot()


def test_cluster_restore_from_per_session_records_and_rejects_a_mismatch() -> None:
    engines = [load(0), load(1)]
    original = cluster_scheduler(
        "mars", num_engines=2, window_init_per_gpu=1, window_min_per_gpu=1, window_max_per_gpu=2
    )
    _drive(original, engines, 0, 12)
    core = original.snapshot(sessions=False)
    assert core.sessions == ()
    records = [original.session_snapshot(sid) for sid in original.sessions]
    restored = cluster_scheduler(
        "mars", num_engines=2, window_init_per_gpu=1, window_min_per_gpu=1, window_max_per_gpu=2
    )
    restored.restore(core, [r for r in reversed(records) if r is not None])  # any order
    assert restored.snapshot() == original.snapshot()
    done = [sid for sid, s in original.sessions.items() if s.phase is SessionPhase.DONE]
    assert done and all(original.session_snapshot(sid) is None for sid in done)
    with pytest.raises(ValueError, match="admission scopes"):
        cluster_scheduler("mars-local", num_engines=2).restore(core)
    with pytest.raises(ValueError, match="needs its snapshot"):
        cluster_scheduler("mars", num_engines=2).restore(
            cluster_scheduler("fcfs", num_engines=2).snapshot()
        )


def test_aimd_snapshot_round_trips() -> None:
    aimd = AimdAdmission(AdmissionConfig(kv_fit=True), num_gpus=2)
    aimd.on_tick(ClusterSignals(0.95, 40, 16, 6.0, kv_capacity_tokens=100_000), 1.0)
    aimd.select([ticket("a", 0.0, 900), ticket("b", 0.1, 50_000)], 2)
    copy = AimdAdmission(AdmissionConfig(kv_fit=True), num_gpus=2)
    copy.restore(aimd.snapshot())
    assert copy.snapshot() == aimd.snapshot()
    assert copy.window() == aimd.window() and copy.pressure is aimd.pressure
    assert copy.overloaded == aimd.overloaded
    signals = ClusterSignals(0.5, 3, 16, 0.2, kv_capacity_tokens=100_000)
    assert copy.on_tick(signals, 2.0) == aimd.on_tick(signals, 2.0)
    waiting = [ticket(f"w{i}", float(i), 1000 * i) for i in range(6)]
    assert copy.select(waiting, 3) == aimd.select(waiting, 3)
    assert UnlimitedAdmission().snapshot() is None
