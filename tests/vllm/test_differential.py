"""With MARS's overrides off (or the ``fcfs`` policy through the queue adapter),
MarsScheduler makes exactly vLLM's decisions on randomised request mixes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from factories import assert_no_leak, make_request, make_scheduler, step
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput

from mars_ray.vllm.hints import SessionHints
from mars_ray.vllm.scheduler import MarsFeatures, MarsScheduler

Decision = tuple[dict[str, int], list[str], list[str], list[str]]


def _decision(so: SchedulerOutput) -> Decision:
    return (
        dict(so.num_scheduled_tokens),
        sorted(so.preempted_req_ids or ()),
        sorted(so.finished_req_ids),
        [r.req_id for r in so.scheduled_new_reqs],
    )


def _trace(sched: AsyncScheduler, seed: int) -> list[Decision]:
    rng = random.Random(seed)
    arrivals = []
    for i in range(14):
        hints = SessionHints(f"s{i % 4}", i // 4, i % 3 == 0, rng.choice([0.0, 1.0, 1e4]))
        arrivals.append(
            (
                rng.randint(0, 30),
                make_request(
                    f"r{i}",
                    rng.randint(5, 200),
                    rng.randint(20, 250),
                    hints=hints,
                    arrival_s=float(i),
                ),
            )
        )
    decisions = []
    for t in range(2000):
        for at, request in arrivals:
            if at == t:
                sched.add_request(request)
        if t > 30 and not sched.has_requests():
            break
        decisions.append(_decision(step(sched)))
    assert_no_leak(sched)
    return decisions


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("variant", ["features-off", "fcfs-policy"])
def test_same_decisions_as_stock_vllm(tiny_model_dir: Path, seed: int, variant: str) -> None:
    kwargs = dict(num_blocks=32, max_num_batched_tokens=128, max_num_seqs=6)
    stock = make_scheduler(AsyncScheduler, tiny_model_dir, **kwargs)
    if variant == "features-off":
        mars = make_scheduler(MarsScheduler, tiny_model_dir, features=MarsFeatures.off(), **kwargs)
    else:
        mars = make_scheduler(MarsScheduler, tiny_model_dir, policy="fcfs", **kwargs)
    expected = _trace(stock, seed)
    assert any(d[1] for d in expected), "the mix should force preemptions"
    assert _trace(mars, seed) == expected
