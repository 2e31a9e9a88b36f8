"""``--runtime vllm`` end to end: tiny sessions through real vLLM engines (AsyncLLM, its
engine core in a child process) with MarsScheduler and SimulatedExecutor, and the
bench writing ``summary.json`` from them. No timing assertions: the counts must add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mars_ray.bench import BenchConfig, run_bench
from mars_ray.config import ClusterConfig, EngineConfig, validated
from mars_ray.errors import InfeasibleError
from mars_ray.session import SessionSpec, Turn
from mars_ray.vllm.bench_runtime import ScaledClock, drive_vllm, run_vllm

TIME_SCALE = 50.0  # simulated seconds per wall second: the sessions below take ~0.1 s wall


def _sessions() -> list[SessionSpec]:
    """Three small sessions, staggered: turns with tool calls between them."""
    return [
        SessionSpec(
            "a",
            0.0,
            (Turn(300, 8, 0.0, 0.5), Turn(40, 5, 0.2, 0.3), Turn(120, 6)),
        ),
        SessionSpec("b", 0.5, (Turn(1000, 12, 0.0, 1.0), Turn(20, 3))),
        SessionSpec("c", 1.0, (Turn(17, 1),)),
    ]


def test_every_turn_is_served_with_the_session_prefix_cached() -> None:
    sessions = _sessions()
    run = drive_vllm(
        sessions,
        "mars",
        cluster=ClusterConfig(),
        engine=EngineConfig(),
        time_scale=TIME_SCALE,
    )
    result = run.result
    assert result.runtime == "vllm" and result.policy == "mars"
    assert [s.session_id for s in result.sessions] == ["a", "b", "c"]
    for record, spec in zip(result.sessions, sessions, strict=True):
        assert record.completed, record.failed_reason
        assert record.num_turns == spec.num_turns
        assert record.jct_s is not None and record.jct_s >= spec.total_tool_s
        assert record.tool_s >= spec.total_tool_s * 0.99
    requests = {(r.session_id, r.turn_index): r for r in result.requests}
    assert len(requests) == sum(s.num_turns for s in sessions)
    for spec in sessions:
        computed = 0  # tokens of KV the previous turns computed
        for index, turn in enumerate(spec.turns):
            request = requests[(spec.session_id, index)]
            assert request.prompt_tokens == spec.prompt_tokens(index)
            assert request.output_tokens == turn.output_tokens
            # the previous turns' full blocks are hits: the prompts share their prefix
            assert request.cached_tokens == computed // 16 * 16
            # the partial last block is computed again, as in the simulator
            assert request.recomputed_tokens == computed - request.cached_tokens
            assert request.submit_s <= request.first_token_s <= request.finish_s
            computed = request.prompt_tokens + request.output_tokens - 1
    assert result.counters.num_preemptions == 0
    assert 0 < result.counters.gpu_busy_frac < 1
    [device] = run.devices
    assert device.num_steps > 0 and device.simulated_busy_s > 0


def test_the_bench_writes_summary_json_from_the_vllm_runtime(tmp_path: Path) -> None:
    from mars_ray.workloads.schema import write_trace

    trace = tmp_path / "tiny.parquet"
    write_trace(_sessions()[1:], trace)
    config = validated(
        BenchConfig,
        trace=trace,
        policies=("fcfs",),
        runtime="vllm",
        time_scale=TIME_SCALE,
        out_dir=tmp_path / "out",
    )
    summary = run_bench(config, progress=False, show_table=False)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written == summary
    [entry] = written["runs"]
    assert entry["runtime"] == "vllm" and entry["policy"] == "fcfs"
    assert entry["num_sessions"] == entry["num_completed"] == 2
    assert entry["num_requests"] == 3
    assert written["config"]["runtime"] == "vllm"


def test_a_session_that_cannot_fit_is_refused_before_engines_start() -> None:
    huge = SessionSpec("huge", 0.0, (Turn(100_000, 10),))
    with pytest.raises(InfeasibleError, match="huge needs"):
        run_vllm(
            [huge],
            "fcfs",
            cluster=ClusterConfig(),
            engine=EngineConfig(num_gpu_blocks_override=1000),
            time_scale=TIME_SCALE,
        )


def test_scaled_clock_maps_both_ways() -> None:
    clock = ScaledClock(time_scale=10.0, origin=100.0)
    assert clock.sim_s(101.5) == pytest.approx(15.0)
    assert clock.monotonic_at(15.0) == pytest.approx(101.5)
