"""The scheduling-cost benchmark's code path at toy sizes (no timing assertion)."""

from __future__ import annotations

import json

import pytest

from mars_ray.vllm.bench_schedule import BenchConfig, format_result, main, run_bench


@pytest.mark.parametrize("scenario", ["steady", "churn"])
def test_bench_runs_both_schedulers_on_the_same_requests(scenario: str) -> None:
    config = BenchConfig(
        num_running=4,
        num_waiting=6,
        num_repeats=5,
        num_warmup_steps=60,
        num_blocks=1024,
        scenario=scenario,
    )
    result = run_bench(config)
    for timing in (result.stock_schedule, result.mars_schedule, result.mars_update):
        assert 0 < timing.median_us <= timing.p90_us
    assert result.schedule_ratio > 0
    if scenario == "steady":  # identical state: the same requests run and wait
        for state in (result.stock_state, result.mars_state):
            assert state["mean_running"] == 4 and state["mean_waiting"] == 6
            assert state["mean_tokens_per_step"] == 4  # one decode token each
    assert "MarsScheduler" in format_result(result)


def test_cli_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--running", "2", "--waiting", "3", "--repeats", "2", "--num-blocks", "512", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["num_running"] == 2
    assert result["schedule"]["ratio_median"] > 0
