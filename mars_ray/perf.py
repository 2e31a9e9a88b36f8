"""Performance benchmarks that print figures (never timed assertions in tests).

* ``mars-ray perf schedule``: the cost of one scheduling decision (``plan_step``)
  of a SimEngine with R running and W waiting requests, per policy, and how it
  grows with the request count.
* ``mars-ray perf sim``: simulated seconds per wall second of the cluster
  simulator at saturation, for 1 GPU and for a large cluster.
* ``mars-ray perf load``: hundreds of concurrent agent sessions through the real HTTP
  path; checks that nothing is lost, answered twice or left behind (cluster/load_test.py).
* ``mars-ray perf sessions``: per-request cost of recognising a session from its
  conversation with many sessions live (mars_ray/perf_sessions.py).
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import typer

from mars_ray.config import ClusterConfig, EngineConfig
from mars_ray.engine.costmodel import CostModel, load_profile
from mars_ray.engine.request import EngineRequest
from mars_ray.engine.sim_engine import SimEngine
from mars_ray.policies.registry import PolicyConfig, get_policy


def _engine_with_load(policy: str, num_running: int, num_waiting: int) -> SimEngine:
    """An engine with ``num_running`` decoding requests (the batch is full) and
    ``num_waiting`` queued ones of mixed prompt lengths."""
    spec = get_policy(policy)
    config = EngineConfig(max_num_seqs=num_running, num_gpu_blocks_override=4_000_000)
    engine = SimEngine(
        0,
        CostModel(load_profile("h100-80gb", "llama-3.1-8b")),
        config,
        spec.make_scheduler(PolicyConfig()),
    )
    for i in range(num_running):
        engine.add_request(EngineRequest(f"r{i}", 1, 0.0, 64 + i % 512, 1_000_000), 0.0)
    now_s = 0.0
    while any(r.is_prefilling for r in engine.running) or len(engine.running) < num_running:
        plan = engine.plan_step(now_s)
        assert plan is not None
        now_s = plan.end_s
        engine.complete_step(now_s)
    rng = np.random.default_rng(0)
    for i in range(num_waiting):
        prompt = int(rng.integers(100, 40_000))
        engine.add_request(EngineRequest(f"w{i}", i % 3, now_s, prompt, 200), now_s)
    return engine


def time_schedule_us(policy: str, num_running: int, num_waiting: int, repeats: int) -> float:
    """Median microseconds of one ``plan_step`` (single steps: runs are cut to one)."""
    engine = _engine_with_load(policy, num_running, num_waiting)
    samples = []
    now_s = 1000.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan = engine.plan_step(now_s)
        samples.append(time.perf_counter() - t0)
        assert plan is not None
        plan.num_steps = 1
        now_s = plan.end_s
        engine.complete_step(now_s)
    return statistics.median(samples) * 1e6


def register(app: typer.Typer) -> None:
    perf = typer.Typer(help="Performance benchmarks (print figures).", no_args_is_help=True)
    app.add_typer(perf, name="perf")

    @perf.command("schedule")
    def schedule(
        policies: str = typer.Option("mars,fcfs", help="comma-separated policy names"),
        repeats: int = typer.Option(300, min=10, help="decisions timed per point"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
    ) -> None:
        """Median cost of one scheduling decision vs running/waiting request counts."""
        sizes = [(32, 250), (64, 500), (128, 1000), (256, 2000), (512, 4000)]
        names = [p.strip() for p in policies.split(",") if p.strip()]
        for name in names:
            get_policy(name)
        rows = [
            {
                "policy": name,
                "num_running": r,
                "num_waiting": w,
                "median_us": round(time_schedule_us(name, r, w, repeats), 1),
            }
            for name in names
            for r, w in sizes
        ]
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        for row in rows:
            print(
                f"{row['policy']:>10}  running={row['num_running']:>4}  "
                f"waiting={row['num_waiting']:>5}  median={row['median_us']:>8.1f} us"
            )

    @perf.command("sim")
    def sim(
        gpus: int = typer.Option(1, min=1),
        nodes: int = typer.Option(1, min=1),
        policy: str = typer.Option("mars"),
        duration_s: float = typer.Option(3600.0, min=1.0, help="simulated seconds"),
        rate_per_gpu: float = typer.Option(0.3, min=0.0001, help="sessions/s per GPU"),
        seed: int = typer.Option(0),
    ) -> None:
        """Simulated seconds per wall-clock second at saturation (swe workload)."""
        from mars_ray.sim import simulate
        from mars_ray.workloads.arrivals import assign_arrivals, poisson_arrivals
        from mars_ray.workloads.generators import WORKLOADS

        cluster = ClusterConfig(num_gpus=gpus, num_nodes=nodes)
        num_sessions = max(1, int(rate_per_gpu * gpus * duration_s))
        rng = np.random.default_rng(seed)
        sessions = WORKLOADS.get("swe")(num_sessions, rng, 131072)
        times = poisson_arrivals(num_sessions, rate_per_gpu * gpus, np.random.default_rng(seed + 1))
        sessions = assign_arrivals(sessions, times)
        result = simulate(sessions, policy, cluster=cluster, seed=seed, horizon_s=duration_s)
        steps = result.counters
        print(
            json.dumps(
                {
                    "gpus": gpus,
                    "nodes": nodes,
                    "policy": policy,
                    "num_sessions": num_sessions,
                    "simulated_s": round(result.simulated_s, 1),
                    "wall_s": round(result.wall_s, 2),
                    "speedup_vs_real_time": round(result.simulated_s / result.wall_s, 1),
                    "gpu_busy_frac": round(steps.gpu_busy_frac, 3),
                }
            )
        )

    @perf.command("sessions")
    def sessions(
        live: int = typer.Option(10_000, min=1, help="live sessions in the index"),
        turns: int = typer.Option(20, min=1, help="turns in each timed conversation"),
        tool_bytes: int = typer.Option(4000, min=0, help="tool output per turn (bytes)"),
        requests: int = typer.Option(200, min=10, help="continuations timed"),
    ) -> None:
        """Per-request cost of inferring sessions (no id sent) with many sessions live."""
        from dataclasses import asdict

        from mars_ray.perf_sessions import measure_inference

        cost = measure_inference(live, turns, tool_bytes, requests)
        row = asdict(cost)
        row["total_target_us"] = 1000.0
        print(json.dumps(row))

    @perf.command("load")
    def load(
        sessions: int = typer.Option(500, min=1, help="concurrent agent sessions"),
        turns: int = typer.Option(3, min=1, help="turns per session"),
        gpus: int = typer.Option(4, min=1, help="simulated GPUs"),
        nodes: int = typer.Option(2, min=1, help="emulated nodes"),
        time_scale: float = typer.Option(10.0, min=0.1, help="simulated s per wall s"),
        rounds: int = typer.Option(2, min=1, help="rounds of the load (RSS after each)"),
    ) -> None:
        """Concurrent sessions through HTTP: nothing lost, twice or left; RSS, overhead."""
        from mars_ray.cluster.load_test import run_load

        result = run_load(sessions, turns, gpus, nodes, time_scale, rounds)
        print(result.to_json())
        if not result.clean:
            raise SystemExit(1)

    @perf.command("runtime")
    def runtime(
        turns: int = typer.Option(60, min=5, help="sequential turns timed each way"),
        sessions: int = typer.Option(3000, min=100, help="sessions for the decision rate"),
        concurrency: int = typer.Option(64, min=1, help="concurrent scheduler callers"),
    ) -> None:
        """Ray runtime: per-turn overhead of ingress + scheduler, and decisions/s."""
        from mars_ray.cluster.perf_runtime import measure_decisions, measure_overhead

        overhead = measure_overhead(num_turns=turns)
        per_message, batched = measure_decisions(num_sessions=sessions, concurrency=concurrency)
        print(
            json.dumps(
                {
                    "turn_direct_median_ms": round(overhead.direct_ms, 2),
                    "turn_served_median_ms": round(overhead.served_ms, 2),
                    "added_median_ms": round(overhead.added_ms, 2),
                    "added_target_ms": 5.0,
                    "of_which_serve_http_floor_ms": round(overhead.http_floor_ms, 2),
                    "turn_via_worker_actor_median_ms": round(overhead.worker_actor_ms, 2),
                    "added_over_worker_actor_ms": round(overhead.added_over_worker_actor_ms, 2),
                    "turn_direct_p90_ms": round(overhead.p90_direct_ms, 2),
                    "turn_served_p90_ms": round(overhead.p90_served_ms, 2),
                    "decisions_per_s": round(batched.per_s, 1),
                    "decisions_target_per_s": 500,
                    "messages_per_call": round(batched.mean_batch, 1),
                    "decisions_per_s_one_call_per_message": round(per_message.per_s, 1),
                    "batching_speedup": round(batched.per_s / per_message.per_s, 2),
                    "decisions": batched.num_decisions,
                    "concurrency": batched.concurrency,
                }
            )
        )

    @perf.command("agreement")
    def agreement(
        policies: str = typer.Option("fcfs,mars", help="comma-separated policy names"),
        runtime: str = typer.Option("ray", help="ray (the Serve deployment) or vllm (AsyncLLM)"),
        workload: str = typer.Option("swe"),
        sessions: int = typer.Option(8, min=1),
        rate: float = typer.Option(0.05, min=0.0001, help="sessions/s"),
        gpus: int = typer.Option(1, min=1),
        time_scale: float = typer.Option(10.0, min=0.1, help="simulated s per wall s"),
        seed: int = typer.Option(0),
        tools: str = typer.Option(
            "burn", help="ray: burn: tool CPU burns real cores; wait: replayed as waiting"
        ),
    ) -> None:
        """Mean JCT of the same trace through --runtime ray|vllm and --runtime sim; one
        JSON line per policy as soon as it is measured."""
        if tools not in ("burn", "wait"):
            raise typer.BadParameter(f"--tools must be burn or wait, got {tools!r}")
        if runtime not in ("ray", "vllm"):
            raise typer.BadParameter(f"--runtime must be ray or vllm, got {runtime!r}")
        for policy in [p for p in policies.split(",") if p]:
            if runtime == "vllm":
                line = _vllm_agreement(policy, workload, sessions, rate, gpus, time_scale, seed)
            else:
                line = _ray_agreement(
                    policy, workload, sessions, rate, gpus, time_scale, seed, tools == "burn"
                )
            print(json.dumps(line, allow_nan=True), flush=True)


def _ray_agreement(
    policy: str,
    workload: str,
    sessions: int,
    rate: float,
    gpus: int,
    time_scale: float,
    seed: int,
    burn_cpu: bool,
) -> dict[str, object]:
    from mars_ray.cluster.perf_runtime import measure_agreement

    (a,) = measure_agreement(
        [policy],
        workload=workload,
        num_sessions=sessions,
        rate_per_s=rate,
        num_gpus=gpus,
        time_scale=time_scale,
        seed=seed,
        burn_cpu=burn_cpu,
    )
    return {
        "policy": a.policy,
        "runtime": "ray",
        "sessions": a.num_sessions,
        "sim_mean_jct_s": round(a.sim_mean_jct_s, 2),
        "ray_mean_jct_s": round(a.ray_mean_jct_s, 2),
        "ray_over_sim": round(a.ratio, 3),
        "within_15pct": abs(a.ratio - 1) <= 0.15,
        "completed_sim": a.sim_completed,
        "completed_ray": a.ray_completed,
        "ray_wall_s": round(a.ray_wall_s, 1),
        "sim_mean_tool_s": round(a.sim_mean_tool_s, 2),
        "ray_mean_tool_s": round(a.ray_mean_tool_s, 2),
    }


def _vllm_agreement(
    policy: str, workload: str, sessions: int, rate: float, gpus: int, time_scale: float, seed: int
) -> dict[str, object]:
    from mars_ray.vllm.agreement import AgreementConfig, measure_agreement

    config = AgreementConfig(
        policies=(policy,),
        workload=workload,
        num_sessions=sessions,
        rate_per_s=rate,
        num_gpus=gpus,
        time_scale=time_scale,
        seed=seed,
    )
    (a,) = measure_agreement(config)
    return {"runtime": "vllm", **a.to_dict()}
