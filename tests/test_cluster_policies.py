"""Rule tests of the global scheduler's mechanisms (docs/design.md §9) and of the
per-GPU baseline they compete with: session-affine routing, late binding, work
conservation, CPU-aware placement, rebalancing, capacity weights."""

from __future__ import annotations

import random

import pytest

from mars_ray.config import AdmissionConfig, ClusterConfig
from mars_ray.errors import ConfigError
from mars_ray.policies.base import ClusterSignals, EngineLoad, SessionTicket
from mars_ray.policies.cluster import (
    ClusterScheduler,
    Move,
    Placement,
    SessionPhase,
    scope_signals,
)
from mars_ray.policies.placement import (
    KvAffinePlacement,
    RebalanceRule,
    SessionAffinePlacement,
    cpu_roomy,
)
from mars_ray.policies.registry import PolicyConfig, get_policy


def load(
    engine_id: int,
    *,
    running: int = 0,
    waiting: int = 0,
    kv: float = 0.0,
    node: int = 0,
    tools: float = 0.0,
    weight: float = 1.0,
) -> EngineLoad:
    return EngineLoad(
        engine_id, node, kv, running, waiting, weight, kv_demand=kv, node_tool_load=tools
    )


def ticket(session_id: str, arrival_s: float, work: int = 1000) -> SessionTicket:
    return SessionTicket(session_id, arrival_s, work)


def signals(kv: float = 0.0, tools: int = 0, workers: int = 64) -> ClusterSignals:
    return ClusterSignals(kv, tools, workers, 0.0)


def scheduler(
    policy: str = "mars",
    num_engines: int = 2,
    weights: list[float] | None = None,
    **admission: object,
) -> ClusterScheduler:
    config = PolicyConfig(admission=AdmissionConfig(**admission))
    return ClusterScheduler(
        get_policy(policy), config, num_engines, random.Random(0), capacity_weights=weights
    )


ONE_SLOT = {"window_min_per_gpu": 1, "window_init_per_gpu": 1, "window_max_per_gpu": 1}


# --------------------------------------------------------------------------- the baseline


def test_session_affine_router_sends_new_sessions_to_the_least_loaded_and_keeps_them() -> None:
    router = SessionAffinePlacement()
    engines = [load(0, running=4), load(1, running=1), load(2, kv=0.5)]
    assert router.place_new("a", engines) == 1
    # continuations stay, however loaded their GPU is (a router moves no one) ...
    hot = [load(0, running=90, waiting=90), load(1), load(2)]
    assert router.place_continuation("a", 0, hot) == 0
    # ... unless their GPU is gone
    assert router.place_continuation("a", 0, hot[1:]) == 1
    assert router.place_continuation("a", None, hot) == 1


def test_mars_local_affine_is_per_engine_session_affine_and_never_migrates() -> None:
    spec = get_policy("mars-local-affine")
    assert spec.admission_scope == "engine" and spec.placement == "session-affine"
    assert spec.make_migration(PolicyConfig(), 1) is None
    assert isinstance(spec.make_placement(random.Random(0)), SessionAffinePlacement)
    sched = scheduler("mars-local-affine", **ONE_SLOT)
    engines = [load(0, running=3), load(1)]
    assert sched.on_session_arrival(ticket("a", 0.0), 0.0, engines) == [Placement("a", 0, 1)]
    # b goes to engine 1 too (least loaded on arrival) and waits for its window there,
    # though engine 0's window has room: no global queue
    assert sched.on_session_arrival(ticket("b", 1.0), 1.0, engines) == []
    assert sched.sessions["b"].scope == 1 and sched.windows() == [1, 1]
    sched.on_turn_finished("a", 10, 0.1)
    busy_1 = [load(0), load(1, running=50, waiting=50)]
    assert sched.on_tool_finished("a", 1.0, busy_1).engine_id == 1  # affine
    assert sched.rebalance(busy_1) == []  # a router does not rebalance


# --------------------------------------------------------------------------- late binding


def test_late_binding_places_a_queued_session_where_there_is_room_at_admission() -> None:
    for policy, expected in (("mars", 1), ("mars-early-bind", 0)):
        sched = scheduler(policy, **ONE_SLOT)
        busy = [load(0, running=1), load(1, running=1)]
        sched.on_session_arrival(ticket("a", 0.0), 0.0, busy)
        sched.on_session_arrival(ticket("b", 0.1), 0.1, busy)
        # c arrives with engine 1 loaded: early binding ties it to engine 0 now
        at_arrival = [load(0, running=1), load(1, running=9)]
        assert sched.on_session_arrival(ticket("c", 0.2), 0.2, at_arrival) == []
        # when a slot frees, engine 0 is the loaded one
        sched.on_turn_finished("a", 10, 0.1)
        at_admission = [load(0, running=9), load(1, running=1)]
        started = sched.on_session_finished("a", 1.0, at_admission)
        assert started == [Placement("c", 0, expected)], policy
        sched.check_invariants()


def test_sessions_admitted_together_spread_over_the_gpus() -> None:
    """A tick that opens several slots places each session with the ones before it
    counted, instead of piling them all on the engine that was least loaded."""
    sched = scheduler("mars-no-work-conservation", num_engines=3)
    engines = [load(i, running=1) for i in range(3)]
    stale = ClusterSignals(0.0, 0, 64, 0.0, observed_s=0.0)
    sched.on_tick([stale], 10.0, engines)  # stale signals: a window of 2 per GPU
    for i in range(100):
        sched.on_session_arrival(ticket(f"s{i}", 10.0), 10.0, engines)
    assert sched.num_active() == 6
    first = {sid for sid, state in sched.sessions.items() if state.last_engine_id is not None}
    _, started = sched.on_tick([signals()], 11.0, engines)  # fresh: the window is 90
    assert len(started) == 84
    per_engine = [sum(1 for p in started if p.engine_id == e) for e in range(3)]
    assert per_engine == [28, 28, 28]
    assert not first & {p.session_id for p in started}


# --------------------------------------------------------------------------- work conservation


def test_an_idle_gpu_takes_a_queued_session_beyond_the_window() -> None:
    sched = scheduler("mars", **ONE_SLOT)
    busy = [load(0, running=1), load(1, running=1)]
    for i, sid in enumerate("abcd"):
        sched.on_session_arrival(ticket(sid, float(i)), float(i), busy)
    assert (sched.num_active(), sched.num_queued()) == (2, 2)
    # a and b are in tool calls: both GPUs sit idle while c and d wait
    idle = [load(0), load(1, kv=0.3)]
    _, started = sched.on_tick([signals()], 5.0, idle)
    assert started == [Placement("c", 0, 0), Placement("d", 0, 1)]
    assert sched.num_active() == 4 > sum(w or 0 for w in sched.windows())
    sched.check_invariants()


@pytest.mark.parametrize(
    ("engines", "sig", "why"),
    [
        ([load(0, running=1), load(1, waiting=1)], signals(), "no GPU is idle"),
        ([load(0, kv=0.86), load(1, kv=0.9)], signals(), "idle GPUs' KV is at the mark"),
        ([load(0), load(1)], signals(kv=0.95), "KV overloaded"),
        ([load(0), load(1)], signals(tools=200, workers=64), "tool pool overloaded"),
    ],
)
def test_work_conservation_stays_out_where_a_start_would_thrash(
    engines: list[EngineLoad], sig: ClusterSignals, why: str
) -> None:
    sched = scheduler("mars", **ONE_SLOT)
    busy = [load(0, running=1), load(1, running=1)]
    for i, sid in enumerate("abc"):
        sched.on_session_arrival(ticket(sid, float(i)), float(i), busy)
    _, started = sched.on_tick([sig], 5.0, engines)
    assert started == [], why


def test_without_work_conservation_idle_gpus_wait_for_the_window() -> None:
    sched = scheduler("mars-no-work-conservation", **ONE_SLOT)
    busy = [load(0, running=1), load(1, running=1)]
    for i, sid in enumerate("abc"):
        sched.on_session_arrival(ticket(sid, float(i)), float(i), busy)
    _, started = sched.on_tick([signals()], 5.0, [load(0), load(1)])
    assert started == []


# --------------------------------------------------------------------------- CPU-aware placement


def test_cpu_aware_placement_avoids_a_node_whose_tool_pool_is_full() -> None:
    engines = [
        load(0, node=0, tools=1.4),
        load(1, node=0, tools=1.4),
        load(2, node=1, running=3, tools=0.5),
        load(3, node=1, running=5, tools=0.5),
    ]
    assert cpu_roomy(engines) == engines[2:]
    assert KvAffinePlacement(cpu_aware=True).place_new("s", engines) == 2
    assert KvAffinePlacement().place_new("s", engines) == 0  # blind: GPU load alone
    # no node has room: the least loaded pool's engines
    full = [load(0, node=0, tools=3.0), load(1, node=1, tools=2.0, running=4)]
    assert cpu_roomy(full) == full[1:]
    # continuations stay with their KV whatever the pool (their tools run there)
    assert KvAffinePlacement(cpu_aware=True).place_continuation("s", 0, engines) == 0
    assert get_policy("mars").cpu_aware and not get_policy("mars-no-cpu-aware").cpu_aware


# --------------------------------------------------------------------------- rebalancing


def test_rebalance_rule_moves_one_session_in_a_tool_off_each_hot_gpu() -> None:
    rule = RebalanceRule(factor=1.5, margin=16.0)
    engines = [
        load(0, running=40, waiting=10),  # score 60: hot
        load(1, running=2),  # 2: the bar is 1.5 x 2 + 16 = 19
        load(2, running=30),  # 30: hot
        load(3, running=10),  # 10: cool
    ]
    in_tool = {0: ["a", "b"], 2: ["c"], 1: ["d"]}
    assert rule.plan(engines, in_tool) == [("a", 0, 1), ("c", 2, 3)]
    assert rule.plan(engines, {1: ["d"]}) == []  # nothing in a tool on the hot GPUs
    balanced = [load(0, running=20), load(1, running=10)]  # 20 <= 1.5 x 10 + 16
    assert rule.plan(balanced, {0: ["a"]}) == []
    with pytest.raises(ValueError):
        RebalanceRule(factor=0.5)


def test_the_scheduler_rebalances_sessions_in_tool_calls_once_per_call() -> None:
    sched = scheduler("mars", num_engines=2)
    engines = [load(0, running=1), load(1, running=2)]
    for sid in "ab":
        sched.on_session_arrival(ticket(sid, 0.0), 0.0, engines)
    for sid in "ab":
        sched.sessions[sid].last_engine_id = 0
    sched.on_turn_finished("a", 10, 0.1)  # a in a tool call; b still on the GPU
    sched.on_tool_finished("a", 5.0, engines)
    sched.on_turn_finished("a", 10, 0.1)  # a in its second tool call (predicted 5 s)
    sched.on_turn_finished("b", 10, 0.1)  # b in its first (predicted 1 s)
    hot = [load(0, running=60), load(1, running=2)]
    assert sched.rebalance(hot) == [Move("a", 0, 1)]  # longest predicted tool first
    assert sched.sessions["a"].last_engine_id == 1
    assert sched.rebalance(hot) == [Move("b", 0, 1)]
    assert sched.rebalance(hot) == []  # each moves once per tool call
    assert scheduler("mars-no-rebalance").rebalance(hot) == []


# --------------------------------------------------------------------------- capacity weights


def test_capacity_weights_scale_windows_and_the_kv_signal() -> None:
    # an H200 (weight 2) beside an H100: the cluster window counts 3 GPUs' worth
    assert scheduler("mars", weights=[1.0, 2.0]).windows() == [90]
    assert scheduler("mars-no-capacity-weight", weights=[1.0, 2.0]).windows() == [60]
    assert scheduler("mars-local-affine", weights=[1.0, 2.0]).windows() == [30, 60]
    with pytest.raises(ValueError, match="capacity weights"):
        scheduler("mars", weights=[1.0])
    # the mean KV fraction is weighted by capacity (the share of the cluster's KV)
    sig = scope_signals([load(0, kv=0.9), load(1, kv=0.3, weight=2.0)], [])
    assert sig.kv_usage == pytest.approx(0.5)
    # placement divides the load score by the weight
    assert KvAffinePlacement().place_new("s", [load(0, running=3), load(1, running=5, weight=2)])


def test_cluster_config_takes_a_gpu_and_a_core_count_per_node() -> None:
    mixed = ClusterConfig(
        num_gpus=4, num_nodes=2, node_gpus=("h100-80gb", "h200-141gb"), node_cpu_cores=(8, 64)
    )
    assert mixed.gpu_names == ("h100-80gb", "h100-80gb", "h200-141gb", "h200-141gb")
    assert (mixed.node_cores(0), mixed.node_cores(1)) == (8, 64)
    assert ClusterConfig(num_gpus=2, num_nodes=2).node_cores(1) == 16
    from mars_ray.config import validated

    with pytest.raises(ConfigError, match="one value per node"):
        validated(ClusterConfig, num_gpus=4, num_nodes=2, node_gpus=("h100-80gb",))


def test_a_finished_session_is_forgotten_and_its_id_arrives_anew() -> None:
    """A long-running server drops ended sessions' records; an id that comes back after
    its session ended goes through admission again."""
    scheduler = ClusterScheduler(get_policy("mars"), PolicyConfig(), 1, random.Random(0))
    engines = [EngineLoad(0, 0, 0.0, 0, 0)]
    scheduler.on_session_arrival(SessionTicket("s", 0.0, 100), 0.0, engines)
    assert scheduler.sessions["s"].phase is SessionPhase.ACTIVE
    with pytest.raises(ValueError, match="not done"):
        scheduler.forget("s")
    scheduler.on_session_finished("s", 1.0, engines)
    scheduler.forget("s")
    scheduler.forget("never-seen")  # ignored
    assert "s" not in scheduler.sessions
    started = scheduler.on_session_arrival(SessionTicket("s", 2.0, 100), 2.0, engines)
    assert [p.session_id for p in started] == ["s"]
    assert scheduler.num_active() == 1
