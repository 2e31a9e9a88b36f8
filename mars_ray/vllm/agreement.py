"""Does the vLLM runtime agree with the simulator? The same sessions through both.

    python -m mars_ray.vllm.agreement --workload swe --sessions 20 --rate 0.1 \\
        --policies fcfs,mars --time-scale 10 [--gpus 1] [--seed 0] [--json]

The sessions are the bench's (``mars-ray bench`` with the same flags): one
``mars_ray.sim.simulate`` run and one :func:`~mars_ray.vllm.bench_runtime.drive_vllm`
run per policy. Printed per policy: mean JCT of each and their ratio (the target:
within 15%), and, because a session's JCT is mostly tool time in agentic workloads,
the same for its LLM time (JCT minus tool time: queueing, prefill and decode), TTFT
and turn latency, with the counters that explain a gap (prefix-cache hits,
re-prefilled tokens, preemptions) and how late the simulated device ran.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mars_ray.results import RunResult

#: the agreement target on mean JCT
TOLERANCE = 0.15


@dataclass(frozen=True, slots=True)
class Side:
    """One runtime's figures for one policy."""

    num_completed: int
    mean_jct_s: float
    mean_llm_s: float  # per session: JCT minus tool time
    mean_tool_s: float
    mean_ttft_ms: float
    mean_e2el_ms: float  # per turn
    cached_frac: float  # prompt tokens served from the prefix cache
    recomputed_tokens: int
    preemptions: int
    gpu_busy_frac: float
    simulated_s: float
    wall_s: float

    @classmethod
    def of(cls, run: RunResult) -> Side:
        done = [s for s in run.sessions if s.completed]
        requests = run.requests
        prompt = sum(r.prompt_tokens for r in requests)
        return cls(
            num_completed=len(done),
            mean_jct_s=_mean([s.jct_s for s in done if s.jct_s is not None]),
            mean_llm_s=_mean([s.jct_s - s.tool_s for s in done if s.jct_s is not None]),
            mean_tool_s=_mean([s.tool_s for s in done]),
            mean_ttft_ms=1e3 * _mean([r.ttft_s for r in requests]),
            mean_e2el_ms=1e3 * _mean([r.e2el_s for r in requests]),
            cached_frac=sum(r.cached_tokens for r in requests) / prompt if prompt else math.nan,
            recomputed_tokens=run.counters.num_recomputed_tokens,
            preemptions=run.counters.num_preemptions,
            gpu_busy_frac=run.counters.gpu_busy_frac,
            simulated_s=run.simulated_s,
            wall_s=run.wall_s,
        )


@dataclass(frozen=True, slots=True)
class Agreement:
    """One policy through both runtimes."""

    policy: str
    num_sessions: int
    sim: Side
    vllm: Side
    late_frac: float  # how much this machine stretched the vLLM turns (VllmRun.late_frac)

    @property
    def jct_ratio(self) -> float:
        return self.vllm.mean_jct_s / self.sim.mean_jct_s

    @property
    def llm_ratio(self) -> float:
        return self.vllm.mean_llm_s / self.sim.mean_llm_s

    @property
    def within_tolerance(self) -> bool:
        return abs(self.jct_ratio - 1) <= TOLERANCE

    def to_dict(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "sessions": self.num_sessions,
            "jct_ratio": round(self.jct_ratio, 3),
            "llm_ratio": round(self.llm_ratio, 3),
            "within_15pct": self.within_tolerance,
            "late_frac": round(self.late_frac, 4),
            "sim": asdict(self.sim),
            "vllm": asdict(self.vllm),
        }


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


@dataclass(frozen=True, slots=True)
class AgreementConfig:
    policies: tuple[str, ...] = ("fcfs", "mars")
    workload: str = "swe"
    num_sessions: int = 20
    rate_per_s: float | None = None  # None: load
    load: float = 1.0  # fraction of the estimated saturation rate
    num_gpus: int = 1
    gpu: str = "h100-80gb"
    model: str = "llama-3.1-8b"
    time_scale: float = 10.0
    seed: int = 0


def measure_agreement(config: AgreementConfig) -> list[Agreement]:
    """Every policy through the simulator and through vLLM, on the bench's sessions."""
    from mars_ray.bench import BenchConfig, plan_bench, sessions_at
    from mars_ray.config import validated
    from mars_ray.sim import simulate
    from mars_ray.vllm.bench_runtime import drive_vllm

    rates = {"rates_per_s": (config.rate_per_s,)} if config.rate_per_s else {}
    loads = {} if config.rate_per_s else {"loads": (config.load,)}
    bench = validated(
        BenchConfig,
        workload=config.workload,
        policies=config.policies,
        num_gpus=config.num_gpus,
        gpu=config.gpu,
        model=config.model,
        num_sessions=config.num_sessions,
        seed=config.seed,
        runtime="vllm",
        time_scale=config.time_scale,
        **rates,
        **loads,
    )
    plan = plan_bench(bench)
    point = plan.points[0]
    sessions = sessions_at(plan, point, config.seed)
    results = []
    for policy in config.policies:
        sim = simulate(
            sessions,
            policy,
            cluster=plan.cluster,
            engine=plan.engine,
            seed=config.seed,
            rate_per_s=point.rate_per_s,
        )
        live = drive_vllm(
            sessions,
            policy,
            cluster=plan.cluster,
            engine=plan.engine,
            time_scale=config.time_scale,
            seed=config.seed,
            rate_per_s=point.rate_per_s,
        )
        results.append(
            Agreement(policy, len(sessions), Side.of(sim), Side.of(live.result), live.late_frac)
        )
    return results


def format_agreement(agreements: Sequence[Agreement]) -> str:
    """A table: the two runtimes side by side, then the ratios."""
    header = (
        f"{'policy':<8}{'runtime':<8}{'done':>5}{'JCT s':>9}{'LLM s':>9}{'tool s':>9}"
        f"{'TTFT ms':>9}{'turn ms':>9}{'cached':>8}{'re-pf tok':>11}{'preempt':>8}"
        f"{'busy':>6}{'wall s':>8}"
    )
    lines = [header]
    for a in agreements:
        for name, side in (("sim", a.sim), ("vllm", a.vllm)):
            lines.append(
                f"{a.policy:<8}{name:<8}{side.num_completed:>5}{side.mean_jct_s:>9.1f}"
                f"{side.mean_llm_s:>9.2f}{side.mean_tool_s:>9.1f}{side.mean_ttft_ms:>9.0f}"
                f"{side.mean_e2el_ms:>9.0f}{side.cached_frac:>8.1%}{side.recomputed_tokens:>11,}"
                f"{side.preemptions:>8}{side.gpu_busy_frac:>6.0%}{side.wall_s:>8.1f}"
            )
    lines.append("")
    for a in agreements:
        verdict = "within" if a.within_tolerance else "OUTSIDE"
        lines.append(
            f"{a.policy}: mean JCT vllm/sim {a.jct_ratio:.3f} ({verdict} {TOLERANCE:.0%}), "
            f"LLM time vllm/sim {a.llm_ratio:.3f}, outputs late {a.late_frac:.1%} of a turn"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> tuple[AgreementConfig, bool]:
    default = AgreementConfig()
    parser = argparse.ArgumentParser(prog="python -m mars_ray.vllm.agreement")
    parser.add_argument("--policies", default=",".join(default.policies))
    parser.add_argument("--workload", default=default.workload)
    parser.add_argument("--sessions", type=int, default=default.num_sessions)
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, default=None, help="sessions/s")
    rate.add_argument(
        "--load", type=float, default=default.load, help="fraction of the saturation rate"
    )
    parser.add_argument("--gpus", type=int, default=default.num_gpus)
    parser.add_argument("--gpu", default=default.gpu)
    parser.add_argument("--model", default=default.model)
    parser.add_argument("--time-scale", type=float, default=default.time_scale)
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--json", action="store_true", help="one JSON object per policy")
    ns = parser.parse_args(argv)
    config = AgreementConfig(
        policies=tuple(p for p in ns.policies.split(",") if p),
        workload=ns.workload,
        num_sessions=ns.sessions,
        rate_per_s=ns.rate,
        load=ns.load,
        num_gpus=ns.gpus,
        gpu=ns.gpu,
        model=ns.model,
        time_scale=ns.time_scale,
        seed=ns.seed,
    )
    return config, ns.json


def main(argv: Sequence[str] | None = None) -> None:
    config, as_json = parse_args(argv)
    agreements = measure_agreement(config)
    if as_json:
        for a in agreements:
            print(json.dumps(a.to_dict(), allow_nan=True), flush=True)
    else:
        print(format_agreement(agreements), flush=True)


if __name__ == "__main__":  # the engine core is a spawned process: guard the entry point
    main()
