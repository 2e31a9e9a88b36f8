"""The cluster simulator end to end: a lone session meets its ideal time under every
policy, runs are deterministic, a saturated run keeps every invariant, the tool pool
shares its cores, and impossible sessions are refused up front."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import sys
import types
from collections.abc import Sequence

import numpy as np
import pytest

from mars_ray.config import ClusterConfig, EngineConfig, MigrationConfig
from mars_ray.engine.costmodel import CostModel
from mars_ray.errors import InfeasibleError
from mars_ray.policies import POLICIES, PolicyConfig, PolicySpec, get_policy
from mars_ray.policies.base import EngineLoad, PlacementPolicy
from mars_ray.policies.baselines import FcfsScheduler
from mars_ray.policies.migration import KvMigrationRule
from mars_ray.policies.retention import LruRetention
from mars_ray.results import RunResult
from mars_ray.session import SessionSpec, Turn
from mars_ray.sim.simulator import ClusterSim, simulate
from mars_ray.sim.tool_pool import ToolCall, ToolPool
from mars_ray.workloads import WORKLOADS, assign_arrivals, poisson_arrivals

# --------------------------------------------------------------------------- factories

LONE_SESSIONS = [
    SessionSpec(
        "three-turns",
        0.5,
        (Turn(3000, 200, 0.3, 0.2, "grep"), Turn(500, 100, 1.0, 0.5, "shell"), Turn(200, 300)),
    ),
    SessionSpec(  # the first prompt exceeds the 8192-token step budget
        "big-first-prompt",
        1.0,
        (Turn(20000, 50, 0.1, 0.1, "read_file"), Turn(100, 400, 2.0, 0.0, "edit"), Turn(50, 20)),
    ),
    SessionSpec(  # CPU-heavy tools (test runs)
        "cpu-heavy-tool",
        0.0,
        (
            Turn(1000, 100, 30.0, 0.0, "run_tests"),
            Turn(300, 100, 5.0, 1.0, "run_tests"),
            Turn(10, 10),
        ),
    ),
    SessionSpec("one-turn", 2.0, (Turn(700, 64),)),
]

CLUSTERS = {
    "1gpu": ClusterConfig(),
    "4gpu-2nodes": ClusterConfig(num_gpus=4, num_nodes=2),
}

SATURATION_POLICIES = ["mars", "fcfs", "continuum", "infercept", "autellix", "mars-local"]
SATURATION_ENGINE = EngineConfig(num_gpu_blocks_override=1100)  # 17600 tokens per GPU
SATURATION_CLUSTER = ClusterConfig(num_gpus=2)


def swe_sessions(
    seed: int = 7, num_sessions: int = 20, rate_per_s: float = 50.0
) -> list[SessionSpec]:
    """``swe`` sessions (contexts up to 16k tokens) arriving far faster than they finish."""
    rng = np.random.default_rng(seed)
    sessions = WORKLOADS.get("swe")(num_sessions, rng, 16384)
    return assign_arrivals(sessions, poisson_arrivals(num_sessions, rate_per_s, rng))


def saturated_run(policy: str, seed: int = 7, sim_seed: int = 0) -> RunResult:
    return simulate(
        swe_sessions(seed),
        policy,
        cluster=SATURATION_CLUSTER,
        engine=SATURATION_ENGINE,
        seed=sim_seed,
        check_invariants=True,
    )


def jcts(result: RunResult) -> list[float | None]:
    return [s.jct_s for s in result.sessions]


def engines_used(result: RunResult) -> list[int]:
    return [r.engine_id for r in sorted(result.requests, key=lambda r: r.turn_index)]


def assert_requests_match_specs(result: RunResult, sessions: Sequence[SessionSpec]) -> None:
    """One record per turn, with the prompt and output the workload asked for."""
    specs = {s.session_id: s for s in sessions}
    assert len(result.requests) == sum(s.num_turns for s in sessions)
    seen = set()
    for record in result.requests:
        spec = specs[record.session_id]
        seen.add((record.session_id, record.turn_index))
        assert record.prompt_tokens == spec.prompt_tokens(record.turn_index)
        assert record.output_tokens == spec.turns[record.turn_index].output_tokens
        assert record.submit_s <= record.first_token_s <= record.finish_s
    assert len(seen) == len(result.requests)


# --------------------------------------------------------------------------- lone sessions


@pytest.mark.parametrize("session", LONE_SESSIONS, ids=lambda s: s.session_id)
@pytest.mark.parametrize("cluster", CLUSTERS.values(), ids=list(CLUSTERS))
@pytest.mark.parametrize("policy", POLICIES.names())
def test_lone_session_finishes_in_its_ideal_time(
    policy: str, cluster: ClusterConfig, session: SessionSpec
) -> None:
    result = simulate([session], policy, cluster=cluster, check_invariants=True)
    (record,) = result.sessions
    assert record.completed and record.admitted_s == session.arrival_s
    assert record.tool_s == pytest.approx(session.total_tool_s, 1e-9)
    assert_requests_match_specs(result, [session])
    assert record.slowdown is not None and record.slowdown >= 1 - 1e-9
    used = engines_used(result)
    if get_policy(policy).placement == "power-of-two" and len(set(used)) > 1:
        # Documented: the power-of-two router has no session affinity, so a
        # continuation on another GPU re-prefills context that was computed before.
        for prev, turn in zip(result.requests, result.requests[1:], strict=False):
            if turn.engine_id != prev.engine_id:
                assert turn.recomputed_tokens >= 16
        return
    assert record.slowdown == pytest.approx(1.0, abs=1e-6)
    for turn in result.requests[1:]:
        # Every continuation resumes warm: only the last, partial block is recomputed.
        assert turn.cached_tokens > 0 and turn.recomputed_tokens < 16


def test_power_of_two_router_moves_a_lone_session_between_gpus() -> None:
    """Why mars-local can miss the ideal time on several GPUs (see the test above)."""
    session = LONE_SESSIONS[0]
    result = simulate([session], "mars-local", cluster=CLUSTERS["4gpu-2nodes"], seed=0)
    assert len(set(engines_used(result))) > 1
    assert result.sessions[0].slowdown is not None and result.sessions[0].slowdown > 1.001
    kv_affine = simulate([session], "mars", cluster=CLUSTERS["4gpu-2nodes"], seed=0)
    assert len(set(engines_used(kv_affine))) == 1


def test_a_policy_given_by_import_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = PolicySpec("my-fcfs", "out of tree", lambda c: FcfsScheduler(), lambda c: LruRetention())
    module = types.ModuleType("my_sim_policies")
    module.SPEC = spec  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "my_sim_policies", module)
    result = simulate(LONE_SESSIONS[:1], "my_sim_policies:SPEC", check_invariants=True)
    assert result.policy == "my-fcfs"
    assert result.sessions[0].slowdown == pytest.approx(1.0, abs=1e-6)


def test_an_arrival_cuts_a_running_decode_run() -> None:
    """A request arriving while another decodes a long run starts at the next step."""
    long_decode = SessionSpec("long", 0.0, (Turn(100, 2000),))
    newcomer = SessionSpec("new", 1.0, (Turn(100, 10),))
    result = simulate([long_decode, newcomer], "fcfs", check_invariants=True)
    turn, long_turn = sorted(result.requests, key=lambda r: r.session_id != "new")
    assert turn.session_id == "new" and long_turn.session_id == "long"
    step_s = long_turn.tpot_s
    assert step_s is not None
    # Without the cut it would wait for the run to end (up to 256 steps).
    assert turn.ttft_s < 4 * step_s


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_runs() -> None:
    first, second = saturated_run("mars"), saturated_run("mars")
    assert jcts(first) == jcts(second)
    assert first.counters == second.counters
    assert [(r.session_id, r.turn_index, r.finish_s) for r in first.requests] == [
        (r.session_id, r.turn_index, r.finish_s) for r in second.requests
    ]


def test_different_workload_seed_gives_a_different_run() -> None:
    assert jcts(saturated_run("fcfs", seed=7)) != jcts(saturated_run("fcfs", seed=8))


def test_router_seed_is_the_only_randomness_of_mars_local() -> None:
    base = saturated_run("mars-local", sim_seed=0)
    assert jcts(saturated_run("mars-local", sim_seed=0)) == jcts(base)
    others = [engines_used(saturated_run("mars-local", sim_seed=s)) for s in (1, 2)]
    assert any(used != engines_used(base) for used in others)


# --------------------------------------------------------------------------- saturation


@pytest.mark.parametrize("policy", SATURATION_POLICIES)
def test_saturated_run_completes_with_invariants_checked(policy: str) -> None:
    sessions = swe_sessions()
    result = simulate(
        sessions,
        policy,
        cluster=SATURATION_CLUSTER,
        engine=SATURATION_ENGINE,
        check_invariants=True,  # blocks after every engine step, slots every tick
    )
    assert len(result.sessions) == 20
    assert all(s.completed for s in result.sessions)
    for record in result.sessions:
        assert record.slowdown is not None and record.slowdown >= 1 - 1e-9  # never beats ideal
        assert record.admitted_s is not None and record.admitted_s >= record.arrival_s
        assert record.tool_s >= record.tool_ideal_s - 1e-9
    assert_requests_match_specs(result, sessions)
    counters = result.counters
    assert sum(r.num_preemptions for r in result.requests) == counters.num_preemptions
    assert counters.num_evicted_blocks > 0  # the KV cache really was short
    assert 0.0 < counters.gpu_busy_frac <= 1.0
    assert {r.engine_id for r in result.requests} == {0, 1}
    if policy == "fcfs":
        assert counters.num_preemptions > 0
        assert counters.num_recomputed_tokens > 0
    windows = [w for w in result.timeseries.columns["admission_window"] if not math.isnan(w)]
    if get_policy(policy).aimd_admission:
        assert min(windows) < 60  # the AIMD window reacted to KV pressure
    else:
        assert windows == []


# --------------------------------------------------------------------------- tool pool


def run_pool(pool: ToolPool, calls: Sequence[tuple[float, ToolCall]]) -> dict[int, float]:
    """Start each call at its time, advance the pool event by event; call id -> finish."""
    pending = sorted(calls, key=lambda c: c[0])
    done: dict[int, float] = {}
    while pending or pool.num_in_flight:
        next_s = pool.next_event_s()
        if pending and (next_s is None or pending[0][0] <= next_s):
            start_s, call = pending.pop(0)
            pool.start(call, start_s)
            continue
        assert next_s is not None
        for call in pool.advance(next_s):
            done[call.call_id] = next_s
    return done


def cpu_call(call_id: int, cpu_s: float, wait_s: float = 0.0, start_s: float = 0.0) -> ToolCall:
    return ToolCall(call_id, f"s{call_id}", cpu_s, wait_s, start_s)


@pytest.mark.parametrize(("num_tools", "num_cores"), [(6, 4), (8, 2), (5, 1), (16, 16)])
def test_cpu_bound_tools_stretch_by_tools_over_cores(num_tools: int, num_cores: int) -> None:
    pool = ToolPool(0, num_cores)
    done = run_pool(pool, [(0.0, cpu_call(i, 2.0)) for i in range(num_tools)])
    stretch = max(1.0, num_tools / num_cores)
    assert sorted(done) == list(range(num_tools))
    for finish_s in done.values():
        assert finish_s == pytest.approx(2.0 * stretch)
    assert pool.busy_core_s == pytest.approx(2.0 * num_tools)  # work is conserved
    assert pool.num_completed == num_tools
    assert pool.total_delay_s == pytest.approx(num_tools * 2.0 * (stretch - 1))


def test_fewer_tools_than_cores_run_at_full_speed() -> None:
    pool = ToolPool(0, 4, wait_ema_alpha=0.2)
    done = run_pool(pool, [(0.0, cpu_call(i, 1.0 + i)) for i in range(3)])
    assert done == pytest.approx({0: 1.0, 1: 2.0, 2: 3.0})
    assert pool.wait_ema_s == 0.0 and pool.total_delay_s == 0.0


def test_waiting_phase_uses_no_cpu() -> None:
    pool = ToolPool(0, 1)
    done = run_pool(pool, [(0.0, cpu_call(i, 0.0, wait_s=1.0)) for i in range(8)])
    assert list(done.values()) == pytest.approx([1.0] * 8)
    assert pool.busy_core_s == 0.0


def test_processor_sharing_with_staggered_calls_and_wait_ema() -> None:
    pool = ToolPool(0, 1, wait_ema_alpha=0.2)
    a = cpu_call(0, 1.0)
    b = cpu_call(1, 1.0, wait_s=0.5)  # its CPU phase starts at 0.5
    c = cpu_call(2, 0.5, start_s=3.0)  # alone later
    done = run_pool(pool, [(0.0, a), (0.0, b), (3.0, c)])
    # 0-0.5: a alone; 0.5-1.5: a and b share (a ends); 1.5-2.0: b alone.
    assert done == pytest.approx({0: 1.5, 1: 2.0, 2: 3.5})
    assert pool.total_delay_s == pytest.approx(0.5 + 0.5 + 0.0)
    assert pool.wait_ema_s == pytest.approx(0.8 * (0.2 * 0.5 + 0.8 * 0.2 * 0.5))
    assert pool.busy_core_s == pytest.approx(2.5)


def test_tools_in_flight_are_counted_until_they_finish() -> None:
    pool = ToolPool(0, 2)
    for i in range(3):
        pool.start(cpu_call(i, 1.0, wait_s=0.5), 0.0)
    assert pool.num_in_flight == 3
    assert pool.next_event_s() == 0.5
    assert pool.advance(0.5) == []
    assert pool.num_in_flight == 3
    assert pool.next_event_s() == pytest.approx(0.5 + 1.5)
    assert len(pool.advance(2.0)) == 3 and pool.num_in_flight == 0
    assert pool.next_event_s() is None


def test_cpu_heavy_tools_contend_in_the_simulator() -> None:
    """Four sessions whose 10 s CPU-bound tools share 2 cores take twice as long there."""
    sessions = [
        SessionSpec(f"s{i}", 0.0, (Turn(100, 10, 10.0, 0.0, "run_tests"), Turn(10, 10)))
        for i in range(4)
    ]
    result = simulate(sessions, "fcfs", cluster=ClusterConfig(cpu_cores_per_gpu=2))
    for record in result.sessions:
        assert record.tool_ideal_s == 10.0
        assert record.tool_s == pytest.approx(20.0, rel=0.01)
    assert result.counters.mean_tool_queue_wait_s == pytest.approx(10.0, rel=0.01)


# --------------------------------------------------------------------------- infeasible


def test_session_whose_context_cannot_fit_any_gpu_is_refused() -> None:
    session = SessionSpec("huge-ctx", 0.0, (Turn(800, 100, 0.1), Turn(200, 50)))  # 1150 tokens
    with pytest.raises(InfeasibleError, match="session huge-ctx needs 1150 tokens"):
        simulate(
            [SessionSpec("small", 0.0, (Turn(100, 10),)), session],
            "mars",
            cluster=ClusterConfig(num_gpus=2),
            engine=EngineConfig(num_gpu_blocks_override=64),  # 1024 tokens per GPU
        )
    fits = SessionSpec("fits", 0.0, (Turn(800, 100, 0.1), Turn(50, 50)))  # 1000 tokens
    result = simulate([fits], "mars", engine=EngineConfig(num_gpu_blocks_override=64))
    assert result.sessions[0].completed


# --------------------------------------------------------------------------- regressions


def test_no_engine_reports_retained_kv_after_every_session_finished() -> None:
    session = LONE_SESSIONS[0]
    for seed in range(3):
        sim = ClusterSim(
            [session],
            "mars-local",
            cluster=CLUSTERS["4gpu-2nodes"],
            engine=EngineConfig(),
            policy_config=PolicyConfig(),
            seed=seed,
        )
        result = sim.run()
        assert result.sessions[0].completed
        assert [engine.kv_demand for engine in sim.engines] == [0.0] * 4


# --------------------------------------------------------------------------- KV migration


class _Alternate(PlacementPolicy):
    """Test placement: every continuation goes to the next GPU (engine ids wrap)."""

    def place_new(self, session_id: str, engines: Sequence[EngineLoad]) -> int:
        return 0

    def place_continuation(
        self, session_id: str, last_engine_id: int | None, engines: Sequence[EngineLoad]
    ) -> int:
        return ((last_engine_id or 0) + 1) % len(engines)


@dataclasses.dataclass(frozen=True)
class _AlternatingSpec(PolicySpec):
    def make_placement(self, rng: random.Random) -> PlacementPolicy:
        return _Alternate()


def _alternating_run(
    monkeypatch: pytest.MonkeyPatch, cluster: ClusterConfig, migration: MigrationConfig
) -> tuple[RunResult, float]:
    spec = _AlternatingSpec(
        "alt", "moves every turn", lambda c: FcfsScheduler(), lambda c: LruRetention()
    )
    module = types.ModuleType("alternating_policies")
    module.SPEC = spec  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "alternating_policies", module)
    session = LONE_SESSIONS[0]
    result = simulate(
        [session],
        "alternating_policies:SPEC",
        cluster=cluster,
        policy_config=PolicyConfig(migration=migration),
        check_invariants=True,
    )
    (record,) = result.sessions
    assert record.completed and record.jct_s is not None and record.ideal_s is not None
    return result, record.jct_s - record.ideal_s


@pytest.mark.parametrize("num_nodes", [1, 2], ids=["same-node", "across-nodes"])
def test_kv_follows_a_session_to_another_gpu(
    monkeypatch: pytest.MonkeyPatch, num_nodes: int
) -> None:
    """Each continuation lands on the other GPU with its whole computed context cached
    there, and the session is late by exactly the modelled link time of each copy."""
    cluster = ClusterConfig(num_gpus=2, num_nodes=num_nodes)
    config = MigrationConfig()
    result, late_s = _alternating_run(monkeypatch, cluster, config)
    turns = sorted(result.requests, key=lambda r: r.turn_index)
    assert [t.engine_id for t in turns] == [0, 1, 0]
    rule = KvMigrationRule(
        config, CostModel.from_names(cluster.gpu, cluster.model).kv_bytes_per_token
    )
    expected_late_s = 0.0
    for prev, turn in itertools.pairwise(turns):
        full_blocks = (prev.prompt_tokens + prev.output_tokens - 1) // 16
        assert turn.cached_tokens == full_blocks * 16 and turn.recomputed_tokens < 16
        expected_late_s += rule.transfer_s(full_blocks * 16, same_node=num_nodes == 1)
    assert result.counters.num_kv_moves == 2
    assert late_s == pytest.approx(expected_late_s, rel=1e-6, abs=1e-9)
    assert late_s > 0


def test_without_migration_or_over_a_slow_link_the_context_is_recomputed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = ClusterConfig(num_gpus=2, num_nodes=2)
    slow_link = MigrationConfig(inter_node_gb_per_s=1e-3)  # copying 1 MB takes a second
    for config in (MigrationConfig(enabled=False), slow_link):
        result, late_s = _alternating_run(monkeypatch, cluster, config)
        assert result.counters.num_kv_moves == 0
        _, second, third = sorted(result.requests, key=lambda r: r.turn_index)
        assert second.cached_tokens == 0 and second.recomputed_tokens == 3199  # turn 0 computed
        # Back on GPU 0, which still caches turn 0's context but not turn 1's.
        assert third.cached_tokens == 3184 and third.recomputed_tokens == 615
        assert late_s > 0.1  # re-prefilling 3k+ tokens twice


def test_admission_reads_the_kv_working_set_in_the_simulator() -> None:
    """docs/design.md §4.1: admission's KV signal is the working set (held blocks plus
    blocks kept for sessions expected back), not vLLM's plain usage; with LRU retention
    the two differ while sessions sit in tools, and the signal must follow the former."""
    sim = ClusterSim(
        swe_sessions(),
        "mars-no-unified-eviction",
        cluster=SATURATION_CLUSTER,
        engine=SATURATION_ENGINE,
        policy_config=PolicyConfig(),
    )
    gaps = []
    original = sim._on_tick

    def check() -> None:
        (signals,) = sim._signals()
        demand = sum(e.kv_demand for e in sim.engines) / len(sim.engines)
        usage = sum(e.pool.usage for e in sim.engines) / len(sim.engines)
        assert signals.kv_usage == pytest.approx(demand)
        assert signals.kv_capacity_tokens == sum(
            e.pool.num_blocks * SATURATION_ENGINE.block_size for e in sim.engines
        )
        assert signals.observed_s == sim.now_s
        gaps.append(demand - usage)
        original()

    sim._on_tick = check  # type: ignore[method-assign]
    sim.run(horizon_s=120.0)
    assert max(gaps) > 0.05  # the two signals did differ, so the test can tell them apart


# --------------------------------------------------------------------------- global mechanisms


MIXED = ClusterConfig(num_gpus=4, num_nodes=2, node_gpus=("h100-80gb", "h200-141gb"))


def test_a_mixed_cluster_gives_each_engine_its_gpu_and_a_capacity_weight() -> None:
    sim = ClusterSim(
        swe_sessions(num_sessions=4),
        "mars",
        cluster=MIXED,
        engine=EngineConfig(),
        policy_config=PolicyConfig(),
    )
    blocks = [e.pool.num_blocks for e in sim.engines]
    assert blocks[0] == blocks[1] < blocks[2] == blocks[3]
    weights = [e.capacity_weight for e in sim.engines]
    assert weights[:2] == [1.0, 1.0] and weights[2] == pytest.approx(blocks[2] / blocks[0])
    assert sim.scheduler.windows() == [int(30 * sum(weights))]
    flat = ClusterSim(
        swe_sessions(num_sessions=4),
        "mars-no-capacity-weight",
        cluster=MIXED,
        engine=EngineConfig(),
        policy_config=PolicyConfig(),
    )
    assert [e.capacity_weight for e in flat.engines] == [1.0] * 4
    assert flat.scheduler.windows() == [120]


@pytest.mark.parametrize(
    "policy",
    [
        "mars",
        "mars-local-affine",
        "mars-early-bind",
        "mars-no-work-conservation",
        "mars-no-rebalance",
    ],
)
def test_global_mechanisms_keep_every_invariant_in_a_saturated_mixed_run(policy: str) -> None:
    sessions = swe_sessions(num_sessions=40, rate_per_s=20.0)
    cluster = MIXED.model_copy(update={"node_cpu_cores": (2, 32)})
    result = simulate(
        sessions,
        policy,
        cluster=cluster,
        engine=EngineConfig(num_gpu_blocks_override=1100),
        check_invariants=True,
    )
    assert all(s.completed for s in result.sessions)
    assert_requests_match_specs(result, sessions)
    if policy == "mars-local-affine":  # affine: every turn of a session on one GPU
        by_session: dict[str, set[int]] = {}
        for r in result.requests:
            by_session.setdefault(r.session_id, set()).add(r.engine_id)
        assert all(len(engines) == 1 for engines in by_session.values())
        assert result.counters.num_kv_moves == 0


def test_cpu_aware_placement_keeps_new_sessions_off_a_cpu_hot_node() -> None:
    tests = Turn(500, 50, 20.0, 0.0, "run_tests")  # 20 CPU-seconds of tool each turn
    sessions = [SessionSpec(f"s{i}", 0.2 * i, (tests, tests, Turn(100, 20))) for i in range(30)]
    cluster = ClusterConfig(num_gpus=4, num_nodes=2, node_cpu_cores=(2, 64))

    def first_turns_on_hot_node(policy: str) -> int:
        result = simulate(sessions, policy, cluster=cluster)
        assert all(s.completed for s in result.sessions)
        return sum(1 for r in result.requests if r.turn_index == 0 and r.engine_id < 2)

    assert first_turns_on_hot_node("mars") < first_turns_on_hot_node("mars-no-cpu-aware")
