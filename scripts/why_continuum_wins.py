"""What each part of MARS contributes against Continuum (docs/results.md, "Where MARS
needed fixing"): one mechanism swapped at a time, on the sessions of the tables.

    .venv/bin/python scripts/why_continuum_wins.py [--workload swe] [--sessions 60]

Same sessions and loads as the H100 tables (1.0x and 1.5x of the estimated
saturation rate, seed 0). The variants are registered for this run only, built
from the registry's own specs with one part replaced:

* ``mars/turn-ties``: MLFQ ties broken by turn arrival (round robin over sessions)
  instead of session arrival;
* ``mars/context-buckets``: remaining-prefill buckets counting the session's earlier
  (possibly evicted) context, not only the turn's own tokens;
* ``mars-no-reserve``: no KV reserved for running prefills (vLLM's start gate only);
* ``mars/lru-keep``: KV that MARS keeps goes to the protected end of the LRU free
  queue instead of being held through the tool call;
* ``continuum+reserve`` and ``continuum+admission``: Continuum with MARS's start gate
  or its AIMD admission window (does the mechanism help any order?);
* ``mars@no-gate`` and ``continuum@no-gate``: both on an engine without vLLM 0.29's
  whole-prompt start gate (the simulator before it modelled the gate).

Prints mean JCT (s) per policy and load, and preemptions.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from mars_ray.bench import BenchConfig, plan_bench, sessions_at
from mars_ray.config import EngineConfig, validated
from mars_ray.policies.base import SchedulableRequest
from mars_ray.policies.baselines import ProgramFcfsScheduler
from mars_ray.policies.mlfq import MlfqScheduler, MlfqState
from mars_ray.policies.registry import POLICIES
from mars_ray.policies.retention import BenefitRetention
from mars_ray.sim import simulate


class TurnTies(MlfqScheduler):
    """Within a level: turn arrival order, newest turn evicted first."""

    def _rank(self, request: SchedulableRequest, now_s: float) -> tuple[int, float]:
        state: MlfqState = request.policy_state
        return state.level, (0.0 if request.turn_index > 0 else 1e12) + request.arrival_s

    def order_running_prefills(self, requests: list) -> list:  # type: ignore[type-arg]
        requests.sort(key=lambda r: (r.policy_state.level, r.arrival_s))
        return requests

    def victim_rank(self, request: SchedulableRequest, now_s: float) -> tuple:  # type: ignore[type-arg]
        state: MlfqState = request.policy_state
        return (state.level, request.is_prefilling and not state.resuming, request.arrival_s)


class ContextBuckets(MlfqScheduler):
    """Buckets read from everything left to compute, earlier context included."""

    @staticmethod
    def _prefill_left(request: SchedulableRequest, num_scheduled: int) -> int:
        return max(0, request.num_tokens - request.num_computed_tokens - num_scheduled)


class ReservingProgramFcfs(ProgramFcfsScheduler):
    reserves_prefill_kv = True


def register_variants() -> dict[str, bool]:
    """Variant name -> whether it runs without vLLM's start gate."""
    mars, continuum = POLICIES.get("mars"), POLICIES.get("continuum")
    variants = [
        dataclasses.replace(mars, name="mars/turn-ties", make_scheduler=lambda c: TurnTies(c.mlfq)),
        dataclasses.replace(
            mars, name="mars/context-buckets", make_scheduler=lambda c: ContextBuckets(c.mlfq)
        ),
        dataclasses.replace(
            mars,
            name="mars/lru-keep",
            make_retention=lambda c: BenefitRetention(c.retention, hold=False),
        ),
        dataclasses.replace(
            continuum, name="continuum+reserve", make_scheduler=lambda c: ReservingProgramFcfs()
        ),
        dataclasses.replace(continuum, name="continuum+admission", aimd_admission=True),
    ]
    for spec in variants:
        POLICIES.add(spec.name, spec)
    names = {spec.name: False for spec in variants}
    names["mars-no-reserve"] = False
    names["mars@no-gate"] = names["continuum@no-gate"] = True
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="swe")
    parser.add_argument("--sessions", type=int, default=60)
    args = parser.parse_args()
    runs = {"mars": False, "continuum": False, **register_variants()}
    config = validated(
        BenchConfig,
        workload=args.workload,
        policies=("mars",),
        loads=(1.0, 1.5),
        num_gpus=1,
        num_sessions=args.sessions,
        seed=0,
        cpu_cores_per_gpu=16,
    )
    plan = plan_bench(config)
    no_gate = validated(EngineConfig, **(plan.engine.model_dump() | {"reserve_full_prompt": False}))
    print(f"{args.workload}, mean JCT (s) / preemptions:", flush=True)
    for point in plan.points:
        sessions = sessions_at(plan, point, 0)
        cells = []
        for name, without_gate in runs.items():
            policy = name.split("@")[0]
            run = simulate(
                sessions,
                policy,
                cluster=plan.cluster,
                engine=no_gate if without_gate else plan.engine,
                seed=0,
                rate_per_s=point.rate_per_s,
            )
            jcts = [s.jct_s for s in run.sessions if s.jct_s is not None and s.completed]
            cells.append(f"{name} {statistics.fmean(jcts):.0f}/{run.counters.num_preemptions}")
        print(f"load {point.load}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
