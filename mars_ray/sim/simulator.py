"""The cluster simulator: N simulated GPUs on M nodes, a CPU tool pool per node, and
the global scheduler, in virtual time.

A short heap-ordered event loop; each handler advances one component and pushes
follow-up events. All decisions come from the policy objects (scheduler,
retention, admission, placement) - this module only moves sessions between them.
Deterministic for a seed: ties in time are broken by insertion order.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mars_ray.clock import VirtualClock
from mars_ray.config import ClusterConfig, EngineConfig
from mars_ray.engine.costmodel import CostModel, load_profile
from mars_ray.engine.ideal import session_ideal_s
from mars_ray.engine.request import EngineRequest
from mars_ray.engine.sim_engine import SimEngine
from mars_ray.policies.base import ClusterSignals, EngineLoad, SessionTicket
from mars_ray.policies.cluster import (
    ClusterScheduler,
    Move,
    Placement,
    ToolPoolLoad,
    scope_signals,
)
from mars_ray.policies.registry import PolicyConfig, get_policy
from mars_ray.results import RequestRecord, RunCounters, RunResult, SessionRecord, TimeSeries
from mars_ray.session import SessionSpec
from mars_ray.sim.tool_pool import ToolCall, ToolPool

ProgressFn = Callable[[int, int], None]

TIMESERIES_COLUMNS = (
    "kv_usage",
    "kv_demand",
    "num_evicted_blocks",
    "admission_window",
    "num_running",
    "num_waiting",
    "num_queued_sessions",
    "num_active_sessions",
    "num_tools_in_flight",
    "gpu_busy_frac",
)


@dataclass(slots=True)
class _SessionRun:
    """A session's progress through the simulation."""

    spec: SessionSpec
    ideal_s: float
    context_tokens: int = 0  # prompt + outputs of the turns done
    computed_tokens: int = 0  # of which KV was computed (all but the last sampled token)
    tool_s: float = 0.0
    finish_s: float | None = None


class ClusterSim:
    """One simulation run (construct, then :meth:`run` once)."""

    def __init__(
        self,
        sessions: Sequence[SessionSpec],
        policy: str,
        *,
        cluster: ClusterConfig,
        engine: EngineConfig,
        policy_config: PolicyConfig,
        seed: int = 0,
        sample_period_s: float = 1.0,
        check_invariants: bool = False,
        on_progress: ProgressFn | None = None,
    ) -> None:
        self.spec = get_policy(policy)
        self.cluster_config = cluster
        self.clock = VirtualClock()
        # ideal times are on the nominal GPU (``cluster.gpu``); a mixed cluster
        # (``node_gpus``) gives each engine its own GPU's cost model
        self.cost = CostModel(load_profile(cluster.gpu, cluster.model))
        costs = {
            name: CostModel(load_profile(name, cluster.model)) for name in set(cluster.gpu_names)
        }
        rng = random.Random(seed)
        self.engines = [
            SimEngine(
                i,
                costs[name],
                engine,
                self.spec.make_scheduler(policy_config),
                node_id=i // cluster.gpus_per_node,
            )
            for i, name in enumerate(cluster.gpu_names)
        ]
        # capacity weight: an engine's KV capacity relative to the smallest one's
        # (1 everywhere on a uniform cluster, or for a policy that ignores capacity)
        smallest = min(self.engines, key=lambda e: e.pool.num_blocks)
        if self.spec.capacity_weighted:
            for e in self.engines:
                e.capacity_weight = e.pool.num_blocks / smallest.pool.num_blocks
        self.pools = [
            ToolPool(n, cluster.node_cores(n), policy_config.admission.tool_wait_ema_alpha)
            for n in range(cluster.num_nodes)
        ]
        self.retention = self.spec.make_retention(policy_config)
        self.migration = (
            self.spec.make_migration(policy_config, self.cost.kv_bytes_per_token)
            if cluster.num_gpus > 1
            else None
        )
        self._num_kv_moves = self._num_kv_moved_blocks = 0
        #: sessions whose KV is on the link after a rebalance: the continuation placed
        #: meanwhile (None while the tool still runs) waits for it to land
        self._kv_in_flight: dict[str, Placement | None] = {}
        self._engine_config = engine
        self.scheduler = ClusterScheduler(
            self.spec,
            policy_config,
            cluster.num_gpus,
            rng,
            capacity_weights=[e.capacity_weight for e in self.engines],
        )
        self._tick_s = policy_config.admission.tick_s
        self._sample_period_s = sample_period_s
        self._check = check_invariants
        self._on_progress = on_progress
        self.sessions = {
            s.session_id: _SessionRun(s, session_ideal_s(self.cost, engine, s)) for s in sessions
        }
        for s in sessions:
            smallest.check_fits(s.session_id, s.max_context_tokens)
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._engine_version = [0] * len(self.engines)
        self._pool_version = [0] * len(self.pools)
        self._requests: list[RequestRecord] = []
        self._num_done = 0
        self._timeseries = TimeSeries([], {c: [] for c in TIMESERIES_COLUMNS})
        self._tool_calls = itertools.count()
        self._busy_s_at_sample = 0.0  # engines' summed busy time at the last sample

    # -- event loop -------------------------------------------------------------
    def _push(self, t_s: float, handler: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (t_s, next(self._seq), handler, args))

    def run(self, horizon_s: float = math.inf) -> RunResult:
        """Run until every session finished (or virtual time passes ``horizon_s``)."""
        wall_start = time.perf_counter()
        for run in self.sessions.values():
            self._push(run.spec.arrival_s, self._on_arrival, run.spec.session_id)
        self._push(0.0, self._on_tick)
        self._push(0.0, self._on_sample)
        events, clock = self._events, self.clock
        while events and self._num_done < len(self.sessions):
            t_s, _, handler, args = heapq.heappop(events)
            if t_s > horizon_s:
                break
            clock.advance_to(t_s)
            handler(*args)
        return self._result(time.perf_counter() - wall_start)

    @property
    def now_s(self) -> float:
        return self.clock.now_s()

    def _loads(self) -> list[EngineLoad]:
        loads = [e.load() for e in self.engines]
        if not self.spec.cpu_aware:
            return loads
        tool_load = [p.num_in_flight / p.num_cores for p in self.pools]
        return [dataclasses.replace(x, node_tool_load=tool_load[x.node_id]) for x in loads]

    # -- sessions -----------------------------------------------------------------
    def _on_arrival(self, session_id: str) -> None:
        spec = self.sessions[session_id].spec
        ticket = SessionTicket(session_id, spec.arrival_s, spec.turns[0].new_tokens)
        for placement in self.scheduler.on_session_arrival(ticket, self.now_s, self._loads()):
            self._start_turn(placement)

    def _start_turn(self, placement: Placement) -> None:
        run = self.sessions[placement.session_id]
        turn = run.spec.turns[placement.turn_index]
        state = self.scheduler.sessions[placement.session_id]
        request = EngineRequest(
            placement.session_id,
            placement.turn_index,
            self.now_s,
            run.context_tokens + turn.new_tokens,
            turn.output_tokens,
            session_arrival_s=run.spec.arrival_s,
            prior_computed_tokens=run.computed_tokens,
            session_service_tokens=state.service_tokens,
            session_service_s=state.service_s,
            is_last_turn=placement.turn_index == run.spec.num_turns - 1,
        )
        engine = self.engines[placement.engine_id]
        engine.add_request(request, self.now_s)
        self._kick(engine)

    def _kick(self, engine: SimEngine) -> None:
        """Plan a step on an idle engine, or cut a decode run short for a newcomer."""
        now_s = self.now_s
        if engine.plan is not None:
            if engine.interrupt(now_s):
                self._schedule_step(engine)
            return
        if engine.plan_step(now_s) is not None:
            self._schedule_step(engine)
        elif engine.has_work:
            wake_s = engine.next_wakeup_s()
            if wake_s is not None:
                self._push(wake_s, self._on_wakeup, engine.engine_id)

    def _schedule_step(self, engine: SimEngine) -> None:
        assert engine.plan is not None
        self._engine_version[engine.engine_id] += 1
        version = self._engine_version[engine.engine_id]
        self._push(engine.plan.end_s, self._on_step_done, engine.engine_id, version)

    def _on_wakeup(self, engine_id: int) -> None:
        self._kick(self.engines[engine_id])

    def _on_step_done(self, engine_id: int, version: int) -> None:
        if version != self._engine_version[engine_id]:
            return  # superseded by an interrupt
        engine = self.engines[engine_id]
        for request in engine.complete_step(self.now_s):
            self._finish_turn(engine, request)
        if self._check:
            engine.check_invariants()
        self._kick(engine)

    def _finish_turn(self, engine: SimEngine, request: EngineRequest) -> None:
        now_s, sid = self.now_s, request.session_id
        self._requests.append(_request_record(engine.engine_id, request, now_s))
        run = self.sessions[sid]
        run.context_tokens = request.num_tokens  # prompt + all outputs
        run.computed_tokens = request.num_computed_tokens
        self.scheduler.on_turn_finished(sid, request.service_tokens, request.service_s)
        engine.end_turn(request, self.retention, self.scheduler.predicted_tool_s(sid), now_s)
        if request.is_last_turn:
            self._finish_session(run)
            return
        turn = run.spec.turns[request.turn_index]
        call = ToolCall(next(self._tool_calls), sid, turn.tool_cpu_s, turn.tool_wait_s, now_s)
        pool = self.pools[engine.node_id]
        pool.start(call, now_s)
        self._schedule_pool(pool)

    def _finish_session(self, run: _SessionRun) -> None:
        run.finish_s = self.now_s
        self._num_done += 1
        if self._on_progress is not None:
            self._on_progress(self._num_done, len(self.sessions))
        placements = self.scheduler.on_session_finished(
            run.spec.session_id, self.now_s, self._loads()
        )
        for placement in placements:
            self._start_turn(placement)

    # -- tools --------------------------------------------------------------------
    def _schedule_pool(self, pool: ToolPool) -> None:
        next_s = pool.next_event_s()
        self._pool_version[pool.node_id] += 1
        if next_s is not None:
            self._push(
                max(next_s, self.now_s),
                self._on_pool_event,
                pool.node_id,
                self._pool_version[pool.node_id],
            )

    def _on_pool_event(self, node_id: int, version: int) -> None:
        if version != self._pool_version[node_id]:
            return
        pool = self.pools[node_id]
        for call in pool.advance(self.now_s):
            tool_s = self.now_s - call.start_s
            self.sessions[call.session_id].tool_s += tool_s
            previous = self.scheduler.sessions[call.session_id].last_engine_id
            placement = self.scheduler.on_tool_finished(call.session_id, tool_s, self._loads())
            if call.session_id in self._kv_in_flight:  # starts when its KV lands
                self._kv_in_flight[call.session_id] = placement
            elif previous is None or previous == placement.engine_id:
                self._start_turn(placement)
            else:
                self._move_session(placement, previous)
        self._schedule_pool(pool)

    def _move_session(self, placement: Placement, src: int) -> None:
        """The next turn was placed away from engine ``src``: its KV follows over the
        GPU link when the migration rule says that beats recomputing (the turn starts
        when the copy lands), else the new engine recomputes it."""
        sid, source = placement.session_id, self.engines[src]
        num_blocks = source.cached_prefix_blocks(sid) if self.migration is not None else 0
        source.forget(sid)
        if self.migration is None or num_blocks == 0:
            self._start_turn(placement)
            return
        dest = self.engines[placement.engine_id]
        num_tokens = num_blocks * self._engine_config.block_size
        recompute_s = dest.cost.prefill_time_s(
            num_tokens, chunk_budget=self._engine_config.max_num_batched_tokens
        )
        decision = self.migration.decide(num_tokens, source.node_id == dest.node_id, recompute_s)
        if not decision.move:
            self._start_turn(placement)
            return
        self._push(self.now_s + decision.transfer_s, self._on_kv_arrived, placement, num_blocks)

    def _on_kv_arrived(self, placement: Placement, num_blocks: int) -> None:
        moved = self.engines[placement.engine_id].adopt_kv(placement.session_id, num_blocks)
        self._num_kv_moves += 1
        self._num_kv_moved_blocks += moved
        self._start_turn(placement)

    def _rebalance(self, move: Move) -> None:
        """A session in a tool call was moved to another engine: its KV follows over
        the link when the migration rule says that beats recomputing it (the copy
        overlaps the tool; a continuation placed before it lands waits for it)."""
        sid, source = move.session_id, self.engines[move.from_engine]
        num_blocks = source.cached_prefix_blocks(sid) if self.migration is not None else 0
        source.forget(sid)
        if self.migration is None or num_blocks == 0:
            return  # its next turn recomputes the context on the new engine
        dest = self.engines[move.to_engine]
        num_tokens = num_blocks * self._engine_config.block_size
        recompute_s = dest.cost.prefill_time_s(
            num_tokens, chunk_budget=self._engine_config.max_num_batched_tokens
        )
        decision = self.migration.decide(num_tokens, source.node_id == dest.node_id, recompute_s)
        if decision.move:
            self._kv_in_flight[sid] = None
            self._push(self.now_s + decision.transfer_s, self._on_rebalanced_kv, move, num_blocks)

    def _on_rebalanced_kv(self, move: Move, num_blocks: int) -> None:
        placement = self._kv_in_flight.pop(move.session_id)
        moved = self.engines[move.to_engine].adopt_kv(move.session_id, num_blocks)
        self._num_kv_moves += 1
        self._num_kv_moved_blocks += moved
        if placement is None:
            return  # the tool still runs; its next turn finds the KV here
        if placement.engine_id == move.to_engine:
            self._start_turn(placement)
        else:
            self._move_session(placement, move.to_engine)

    # -- control and sampling -------------------------------------------------------
    def _signals(self) -> list[ClusterSignals]:
        if not self.scheduler.per_engine_admission:
            return [self._pool_signals(self.pools, self.engines)]
        return [self._pool_signals([self.pools[e.node_id]], [e]) for e in self.engines]

    def _pool_signals(
        self, pools: Sequence[ToolPool], engines: Sequence[SimEngine]
    ) -> ClusterSignals:
        loads = [ToolPoolLoad(p.num_in_flight, p.num_cores, p.wait_ema_s) for p in pools]
        block_tokens = self._engine_config.block_size
        return scope_signals(
            [e.load() for e in engines],  # KV working set (SimEngine.kv_demand)
            loads,
            kv_capacity_tokens=sum(e.pool.num_blocks for e in engines) * block_tokens,
            observed_s=self.now_s,
        )

    def _on_tick(self) -> None:
        _, placements = self.scheduler.on_tick(self._signals(), self.now_s, self._loads())
        for placement in placements:
            self._start_turn(placement)
        for move in self.scheduler.rebalance(self._loads()):
            self._rebalance(move)
        self._push(self.now_s + self._tick_s, self._on_tick)
        if self._check:
            self.scheduler.check_invariants()

    def _on_sample(self) -> None:
        ts, engines = self._timeseries, self.engines
        windows = self.scheduler.windows()
        ts.t_s.append(self.now_s)
        cols = ts.columns
        cols["kv_usage"].append(sum(e.pool.usage for e in engines) / len(engines))
        cols["kv_demand"].append(sum(e.kv_demand for e in engines) / len(engines))
        cols["num_evicted_blocks"].append(sum(e.pool.num_evicted_blocks for e in engines))
        cols["admission_window"].append(
            math.nan if windows[0] is None else float(sum(w or 0 for w in windows))
        )
        cols["num_running"].append(sum(len(e.running) for e in engines))
        cols["num_waiting"].append(sum(len(e.waiting) for e in engines))
        cols["num_queued_sessions"].append(self.scheduler.num_queued())
        cols["num_active_sessions"].append(self.scheduler.num_active())
        cols["num_tools_in_flight"].append(sum(p.num_in_flight for p in self.pools))
        # busy time is booked when a step completes, so one sample may carry a
        # multi-step decode run that began in the period before (smooth over a few)
        busy_s = sum(e.stats.busy_s for e in engines)
        cols["gpu_busy_frac"].append(
            (busy_s - self._busy_s_at_sample) / (self._sample_period_s * len(engines))
        )
        self._busy_s_at_sample = busy_s
        self._push(self.now_s + self._sample_period_s, self._on_sample)

    # -- results ----------------------------------------------------------------------
    def _result(self, wall_s: float) -> RunResult:
        span_s = self.now_s
        sessions = [self._session_record(run) for run in self.sessions.values()]
        engines, pools = self.engines, self.pools
        counters = RunCounters(
            num_preemptions=sum(e.stats.num_preemptions for e in engines),
            num_evicted_blocks=sum(e.pool.num_evicted_blocks for e in engines),
            num_recomputed_tokens=sum(e.stats.num_recomputed_tokens for e in engines),
            num_offloaded_blocks=sum(e.stats.num_offloaded_blocks for e in engines),
            num_reloaded_blocks=sum(e.stats.num_reloaded_blocks for e in engines),
            gpu_busy_frac=_safe_div(sum(e.stats.busy_s for e in engines), span_s * len(engines)),
            cpu_utilization=_safe_div(
                sum(p.busy_core_s for p in pools), span_s * sum(p.num_cores for p in pools)
            ),
            mean_tool_queue_wait_s=_safe_div(
                sum(p.total_delay_s for p in pools), sum(p.num_completed for p in pools)
            ),
            num_kv_moves=self._num_kv_moves,
            num_kv_moved_blocks=self._num_kv_moved_blocks,
        )
        return RunResult(
            policy=self.spec.name,
            runtime="sim",
            num_gpus=self.cluster_config.num_gpus,
            num_nodes=self.cluster_config.num_nodes,
            rate_per_s=None,
            sessions=sessions,
            requests=self._requests,
            counters=counters,
            timeseries=self._timeseries,
            simulated_s=span_s,
            wall_s=wall_s,
        )

    def _session_record(self, run: _SessionRun) -> SessionRecord:
        spec = run.spec
        state = self.scheduler.sessions.get(spec.session_id)
        return SessionRecord(
            session_id=spec.session_id,
            arrival_s=spec.arrival_s,
            admitted_s=None if state is None else state.admitted_s,
            finish_s=run.finish_s,
            ideal_s=run.ideal_s,
            num_turns=spec.num_turns,
            tool_s=run.tool_s,
            tool_ideal_s=spec.total_tool_s,
            failed_reason=None if run.finish_s is not None else "not finished",
        )


def _request_record(engine_id: int, request: EngineRequest, now_s: float) -> RequestRecord:
    return RequestRecord(
        session_id=request.session_id,
        turn_index=request.turn_index,
        engine_id=engine_id,
        submit_s=request.arrival_s,
        first_token_s=now_s if request.first_token_s is None else request.first_token_s,
        finish_s=now_s,
        prompt_tokens=request.num_prompt_tokens,
        output_tokens=request.num_output_tokens,
        cached_tokens=request.cached_tokens,
        recomputed_tokens=request.recomputed_tokens,
        num_preemptions=request.num_preemptions,
    )


def _safe_div(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def simulate(
    sessions: Sequence[SessionSpec],
    policy: str,
    *,
    cluster: ClusterConfig | None = None,
    engine: EngineConfig | None = None,
    policy_config: PolicyConfig | None = None,
    seed: int = 0,
    rate_per_s: float | None = None,
    on_progress: ProgressFn | None = None,
    check_invariants: bool = False,
    sample_period_s: float = 1.0,
    horizon_s: float = math.inf,
) -> RunResult:
    """Run ``sessions`` (with their arrival times) through the cluster under ``policy``.

    ``rate_per_s`` is only recorded in the result; sessions unfinished at
    ``horizon_s`` (virtual seconds) are reported as not completed. ``check_invariants`` verifies
    block conservation after every engine step and admission slots every tick.
    """
    sim = ClusterSim(
        sessions,
        policy,
        cluster=cluster or ClusterConfig(),
        engine=engine or EngineConfig(),
        policy_config=policy_config or PolicyConfig(),
        seed=seed,
        sample_period_s=sample_period_s,
        check_invariants=check_invariants,
        on_progress=on_progress,
    )
    result = sim.run(horizon_s)
    return RunResult(**{**result.__dict__, "rate_per_s": rate_per_s})
