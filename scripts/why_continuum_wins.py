"""Why Continuum beats MARS on `swe` (docs/results.md, "Open"): swap one mechanism at a time.

    .venv/bin/python scripts/why_continuum_wins.py [--workload swe] [--sessions 60]

Same sessions and loads as the swe / H100 table (1.0x and 1.5x of the estimated
saturation rate, seed 0). The variants are registered for this run only, built
from the registry's own specs with one part replaced:

* ``mars+ttl-pin``: MARS with Continuum's retention (pin short-tool sessions' KV);
* ``mars+benefit-pin``: MARS pinning what its benefit rule keeps (TTL 1.5x tool);
* ``continuum-no-pin``: Continuum's program-level FCFS with vLLM's LRU retention;
* ``continuum+admission``: Continuum with MARS's AIMD admission window;
* ``program-fcfs+mars-retention+admission``: MARS with Continuum's program-level
  FCFS in place of its MLFQ (MARS's benefit retention and admission kept).

Prints mean JCT (s) per policy and load.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from mars_ray.bench import BenchConfig, plan_bench, sessions_at
from mars_ray.config import validated
from mars_ray.policies.base import RetentionAction, RetentionDecision, TurnEndContext
from mars_ray.policies.registry import POLICIES
from mars_ray.policies.retention import BenefitRetention, LruRetention, TtlPinRetention
from mars_ray.sim import simulate


class BenefitPin(BenefitRetention):
    """MARS's benefit rule, but what it keeps is pinned for 1.5x the predicted tool."""

    def on_turn_end(self, ctx: TurnEndContext) -> RetentionDecision:
        decision = super().on_turn_end(ctx)
        if decision.action is RetentionAction.KEEP_LRU and not ctx.is_last_turn:
            return RetentionDecision(
                RetentionAction.PIN, ttl_s=1.5 * ctx.predicted_tool_s, reason="back soon: pin"
            )
        return decision


def register_variants() -> list[str]:
    mars, continuum = POLICIES.get("mars"), POLICIES.get("continuum")
    variants = [
        dataclasses.replace(
            mars, name="mars+ttl-pin", make_retention=lambda c: TtlPinRetention(c.retention)
        ),
        dataclasses.replace(mars, name="mars+benefit-pin", make_retention=lambda c: BenefitPin()),
        dataclasses.replace(
            continuum, name="continuum-no-pin", make_retention=lambda c: LruRetention()
        ),
        dataclasses.replace(continuum, name="continuum+admission", aimd_admission=True),
        dataclasses.replace(
            continuum,
            name="program-fcfs+mars-retention+admission",
            make_retention=lambda c: BenefitRetention(c.retention),
            aimd_admission=True,
        ),
    ]
    for spec in variants:
        POLICIES.add(spec.name, spec)
    return [spec.name for spec in variants]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="swe")
    parser.add_argument("--sessions", type=int, default=60)
    args = parser.parse_args()
    policies = ["mars", "continuum", *register_variants()]
    config = validated(
        BenchConfig,
        workload=args.workload,
        policies=tuple(policies),
        loads=(1.0, 1.5),
        num_gpus=1,
        num_sessions=args.sessions,
        seed=0,
        cpu_cores_per_gpu=16,
    )
    plan = plan_bench(config)
    print(f"{args.workload}, mean JCT (s):", flush=True)
    for point in plan.points:
        sessions = sessions_at(plan, point, 0)
        cells = []
        for policy in policies:
            run = simulate(
                sessions,
                policy,
                cluster=plan.cluster,
                engine=plan.engine,
                seed=0,
                rate_per_s=point.rate_per_s,
            )
            jcts = [s.jct_s for s in run.sessions if s.jct_s is not None and s.completed]
            cells.append(f"{policy} {statistics.fmean(jcts):.0f}")
        print(f"load {point.load}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
