"""``bench --runtime ray`` with injected faults: every session completes exactly once
and the summary counts the retries (the fault flags' code path, end to end)."""

from __future__ import annotations

import pytest

from mars_ray.cluster.bench_runtime import parse_fault, run_ray
from mars_ray.config import ClusterConfig, EngineConfig
from mars_ray.errors import ConfigError
from mars_ray.session import SessionSpec, Turn


def sessions() -> list[SessionSpec]:
    turns = tuple(Turn(800, 300, tool_cpu_s=0.5, tool_wait_s=20.0) for _ in range(3))
    last = (Turn(200, 50),)
    return [SessionSpec(f"s{i}", 2.0 * i, turns + last) for i in range(6)]


def test_faults_lose_no_session_and_are_counted() -> None:
    faults = [
        parse_fault(f) for f in ("kill-gpu-worker@2s", "kill-tool-worker@3", "remove-node@5s")
    ]
    result = run_ray(
        sessions(),
        "mars",
        cluster=ClusterConfig(num_gpus=4, num_nodes=2),
        engine=EngineConfig(),
        time_scale=10.0,
        faults=faults,
    )
    assert [s.failed_reason for s in result.sessions] == [None] * 6
    assert all(s.completed for s in result.sessions)
    assert sorted(r.session_id for r in result.requests) == sorted(
        f"s{i}" for i in range(6) for _ in range(4)
    ), "every turn answered exactly once"
    assert result.counters.num_retries >= 1


@pytest.mark.parametrize("bad", ["kill-gpu-worker", "kill-everything@3", "remove-node@-1"])
def test_bad_fault_specs_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="KIND@SECONDS"):
        parse_fault(bad)


def test_a_killed_scheduler_resets_no_session() -> None:
    result = run_ray(
        sessions(),
        "mars",
        cluster=ClusterConfig(num_gpus=2),
        engine=EngineConfig(),
        time_scale=10.0,
        faults=[parse_fault("kill-scheduler@3s")],
    )
    assert [s.failed_reason for s in result.sessions] == [None] * 6
    assert sorted(r.session_id for r in result.requests) == sorted(
        f"s{i}" for i in range(6) for _ in range(4)
    ), "every turn answered exactly once"
    assert result.counters.num_sessions_reset == 0
