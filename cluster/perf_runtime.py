"""Benchmarks of the Ray runtime that print figures (``mars-ray perf runtime|agreement``).

* overhead: median wall time of a one-turn request through HTTP -> Serve ingress ->
  global scheduler -> GPU worker, minus the same turn on a SimEngine called directly
  in-process (target: <= 5 ms on an idle deployment). Printed beside it, from the
  same run: the turn through the deployment's GPU-worker actor called directly (what
  any Ray deployment pays to reach the engine) and Serve's HTTP path alone.
* decisions: turn decisions (admission + placement + bookkeeping: ``begin_turn`` then
  ``end_turn``) per second the GlobalScheduler actor sustains under concurrent callers
  (target: >= 500/s).
* agreement: the same trace and policy through ``--runtime ray`` and ``--runtime sim``;
  mean JCTs side by side (target: within 15%).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Any

from mars_ray.actors.config import DeploymentConfig
from mars_ray.config import ClusterConfig


@dataclass(frozen=True, slots=True)
class Overhead:
    direct_ms: float  # median, SimEngine in-process
    served_ms: float  # median, through HTTP and the runtime
    p90_direct_ms: float
    p90_served_ms: float
    num_turns: int
    http_floor_ms: float  # median GET /healthz: Serve's HTTP path with no work behind it
    worker_actor_ms: float  # median, the GPU-worker actor's run_turn called from the driver

    @property
    def added_ms(self) -> float:
        return self.served_ms - self.direct_ms

    @property
    def added_over_worker_actor_ms(self) -> float:
        """What HTTP, the ingress and the scheduler add on top of reaching the engine."""
        return self.served_ms - self.worker_actor_ms


def _median_p90_ms(samples_s: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_s)
    return statistics.median(ordered) * 1e3, ordered[int(0.9 * (len(ordered) - 1))] * 1e3


async def _direct_turns_s(
    config: DeploymentConfig, num_turns: int, prompt: int, out: int
) -> list[float]:
    from mars_ray.actors.gpu_worker import GPUWorkerImpl

    runner = GPUWorkerImpl(0, 0, config).runner
    samples = []
    for i in range(num_turns):
        work = _one_turn_work(f"direct-{i}", prompt, out)
        started = time.perf_counter()
        async for _ in runner.generate(work):
            pass
        samples.append(time.perf_counter() - started)
    await runner.stop()
    return samples


def measure_overhead(
    num_turns: int = 60, prompt_tokens: int = 200, output_tokens: int = 4
) -> Overhead:
    """Sequential one-turn requests on an idle 1-GPU deployment vs the engine alone."""
    import httpx

    from .bench_runtime import _free_port
    from .serving import running_deployment

    config = DeploymentConfig(time_scale=1.0)
    direct = asyncio.run(_direct_turns_s(config, num_turns, prompt_tokens, output_tokens))
    body = {
        "messages": [{"role": "user", "content": " ".join(["w"] * prompt_tokens)}],
        "max_tokens": output_tokens,
        # a one-turn session, as before sessions were inferred from the conversation:
        # else every request stays open (unconfirmed) and fills the admission window
        "mars": {"last_turn": True},
    }
    served, floor, via_actor = [], [], []
    with (
        running_deployment(config, port=_free_port()) as running,
        httpx.Client(base_url=running.url, timeout=60) as client,
    ):
        worker = _gpu_worker(0)
        for i in range(5):  # warm the proxy, replica and actor connections
            client.post("/v1/chat/completions", json=body).raise_for_status()
            _actor_turn_s(worker, f"warm-{i}", prompt_tokens, output_tokens)
        for i in range(num_turns):  # interleaved, so the three share the machine's noise
            started = time.perf_counter()
            client.post("/v1/chat/completions", json=body).raise_for_status()
            served.append(time.perf_counter() - started)
            started = time.perf_counter()
            client.get("/healthz").raise_for_status()
            floor.append(time.perf_counter() - started)
            via_actor.append(_actor_turn_s(worker, f"actor-{i}", prompt_tokens, output_tokens))
    d50, d90 = _median_p90_ms(direct)
    s50, s90 = _median_p90_ms(served)
    floor_ms, actor_ms = _median_p90_ms(floor)[0], _median_p90_ms(via_actor)[0]
    return Overhead(d50, s50, d90, s90, num_turns, floor_ms, actor_ms)


def _gpu_worker(engine_id: int) -> Any:
    import ray

    from mars_ray.actors.names import NAMESPACE, worker_name

    return ray.get_actor(worker_name(engine_id), namespace=NAMESPACE)


def _one_turn_work(session_id: str, prompt: int, out: int) -> Any:
    """A session's first and last turn: no prior context, service or tool after it."""
    from mars_ray.actors.messages import TurnWork

    return TurnWork(session_id, 0, prompt, out, 0, 0, 0.0, 0.0, True, 0.0)


def _actor_turn_s(worker: Any, session_id: str, prompt: int, out: int) -> float:
    """One last turn on the GPU-worker actor, called directly (no ingress, no scheduler)."""
    import ray

    work = _one_turn_work(session_id, prompt, out)
    started = time.perf_counter()
    ray.get(worker.run_turn.remote(work))
    return time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class DecisionRate:
    num_decisions: int
    wall_s: float
    concurrency: int
    batched: bool  # through the ingress's TurnChannel (else one actor call per message)
    mean_batch: float  # messages per actor call

    @property
    def per_s(self) -> float:
        return self.num_decisions / self.wall_s


def measure_decisions(
    num_sessions: int = 3000, concurrency: int = 64, num_gpus: int = 4
) -> list[DecisionRate]:
    """``begin`` + ``end`` of one-turn sessions against the real scheduler actor, as
    the ingress sends them (a :class:`TurnChannel`) and, side by side, one actor call
    per message (the path before batching)."""
    from .launch import connect, ensure_runtime, teardown_runtime

    config = DeploymentConfig(cluster=ClusterConfig(num_gpus=num_gpus))
    local = connect(None, num_gpus=num_gpus)
    try:
        scheduler = ensure_runtime(config).scheduler
        rates = []
        for batched in (False, True):
            run = _DecisionRun(scheduler, batched, num_sessions, concurrency)
            asyncio.run(run.drive("warm"))  # warm-up pass (connections, code paths)
            rates.append(run.timed())
    finally:
        teardown_runtime(num_gpus)
        local.shutdown()
    return rates


class _DecisionRun:
    def __init__(self, scheduler: Any, batched: bool, num_sessions: int, concurrency: int):
        self.scheduler, self.batched = scheduler, batched
        self.num_sessions, self.concurrency = num_sessions, concurrency
        self.pending: list[Any] = []
        self.mean_batch = 1.0

    async def one(self, channel: Any, sid: str) -> None:
        from mars_ray.actors.messages import TurnAsk, TurnReport

        ask = TurnAsk(sid, 0, 100, 10, True)
        if channel is None:
            grant = await self.scheduler.begin_turn.remote(ask)
        else:
            grant = await channel.begin(ask)
        report = TurnReport(sid, 0, grant.engine_id, 110, 0.01, 100, 10, 0.001, True)
        # as the ingress does: the end is sent, not awaited
        if channel is None:
            self.pending.append(self.scheduler.end_turn.remote(report))
        else:
            self.pending.append(channel.end(report))

    async def drive(self, prefix: str) -> float:
        from mars_ray.actors.ingress import scheduler_channel

        channel = scheduler_channel(self.scheduler) if self.batched else None
        queue = iter(range(self.num_sessions))

        async def caller() -> None:
            for i in queue:
                await self.one(channel, f"{prefix}-{int(self.batched)}-{i}")

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(self.concurrency)))
        await asyncio.gather(*self.pending)  # every end processed before the clock stops
        self.pending.clear()
        if channel is not None:
            self.mean_batch = channel.mean_batch
        return time.perf_counter() - started

    def timed(self) -> DecisionRate:
        wall_s = asyncio.run(self.drive("timed"))
        return DecisionRate(
            self.num_sessions, wall_s, self.concurrency, self.batched, self.mean_batch
        )


@dataclass(frozen=True, slots=True)
class Agreement:
    policy: str
    num_sessions: int
    sim_mean_jct_s: float
    ray_mean_jct_s: float
    sim_completed: int
    ray_completed: int
    ray_wall_s: float
    sim_mean_tool_s: float  # tool time as experienced (contention included), per session
    ray_mean_tool_s: float

    @property
    def ratio(self) -> float:
        return self.ray_mean_jct_s / self.sim_mean_jct_s


def measure_agreement(
    policies: list[str],
    *,
    workload: str = "swe",
    num_sessions: int = 8,
    rate_per_s: float = 0.05,
    num_gpus: int = 1,
    time_scale: float = 10.0,
    seed: int = 0,
    burn_cpu: bool = True,
) -> list[Agreement]:
    """The same sessions through the simulator and through a live deployment."""
    from mars_ray.bench import BenchConfig, plan_bench, sessions_at
    from mars_ray.config import validated
    from mars_ray.sim import simulate

    from .bench_runtime import run_ray

    config = validated(
        BenchConfig,
        workload=workload,
        policies=tuple(policies),
        rates_per_s=(rate_per_s,),
        num_gpus=num_gpus,
        num_sessions=num_sessions,
        seed=seed,
        runtime="ray",
        time_scale=time_scale,
    )
    plan = plan_bench(config)
    sessions = sessions_at(plan, plan.points[0], seed)
    results = []
    for policy in policies:
        sim = simulate(sessions, policy, cluster=plan.cluster, engine=plan.engine, seed=seed)
        live = run_ray(
            sessions,
            policy,
            cluster=plan.cluster,
            engine=plan.engine,
            time_scale=time_scale,
            burn_cpu=burn_cpu,
        )
        results.append(
            Agreement(
                policy,
                len(sessions),
                _mean_jct(sim.sessions),
                _mean_jct(live.sessions),
                sum(1 for s in sim.sessions if s.completed),
                sum(1 for s in live.sessions if s.completed),
                live.wall_s,
                statistics.fmean(s.tool_s for s in sim.sessions),
                statistics.fmean(s.tool_s for s in live.sessions),
            )
        )
    return results


def _mean_jct(sessions: Any) -> float:
    jcts = [s.jct_s for s in sessions if s.completed]
    return statistics.fmean(jcts) if jcts else float("nan")
