"""``mars-ray bench``: config validation through the real CLI, the saturation estimate,
and an end-to-end tiny bench through the real simulator."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mars_ray import cli
from mars_ray.bench import (
    DEFAULT_LOADS,
    DEFAULT_NUM_SESSIONS,
    DEFAULT_POLICIES,
    BenchConfig,
    estimate_saturation,
    estimate_saturation_rate_per_s,
    kv_capacity_tokens,
    rerun_command,
)
from mars_ray.config import ClusterConfig, EngineConfig, validated
from mars_ray.engine.costmodel import CostModel
from mars_ray.errors import ConfigError
from mars_ray.session import SessionSpec, Turn


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``mars-ray bench ARGS`` through the console-script entry point: (exit code, out, err)."""
    code: int | str | None = 0
    try:
        cli.main(["bench", *args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return (code if isinstance(code, int) else 1), out, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policies", "mars,nosuch"], "unknown policy 'nosuch'; known:"),
        (["--policies", "nosuch,mars,other"], "unknown policy 'nosuch'"),
        (["--workload", "nosuch"], "unknown workload 'nosuch'; known:"),
        (["--gpu", "a100-1gb"], "unknown gpu 'a100-1gb'; known:"),
        (["--model", "gpt-9"], "unknown model 'gpt-9'; known:"),
        (["--rates", "0.1,-1"], "--rates values must be finite and > 0, got -1"),
        (["--rates", "0"], "--rates values must be finite and > 0, got 0"),
        (["--rates", "fast"], "--rates takes comma-separated numbers, got 'fast'"),
        (["--load", "0"], "--load values must be finite and > 0, got 0"),
        (["--sessions", "0"], "--sessions must be >= 1, got 0"),
        (["--gpus", "3", "--nodes", "2"], "--gpus (3) must be a multiple of --nodes (2)"),
        (["--gpus", "0"], "--gpus must be >= 1, got 0"),
        (["--workload", "swe", "--trace", "t.parquet"], "either --workload or --trace, not both"),
        (["--rates", "0.1", "--load", "0.5"], "either --rates or --load, not both"),
        (["--policies", "mars,mars"], "--policies names a policy twice"),
        (["--runtime", "tpu"], "unknown runtime 'tpu'; known: sim, vllm, ray"),
        (["--fault", "kill-gpu-worker@3s"], "--fault needs --runtime ray"),
        (["--runtime", "ray", "--fault", "explode@3"], "bad --fault 'explode@3'"),
        (["--runtime", "tpu"], "unknown runtime 'tpu'"),
        (["--alpha", "4"], "--alpha must be one of the reported bounds 1.5, 2, 3, 5, got 4"),
        (["--trace", "no/such/trace.parquet"], "no/such/trace.parquet: no such file"),
    ],
)
def test_bad_input_is_one_line_error_with_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"

    code, _, err = run_cli([*args, "--out", str(out_dir)], capsys)

    assert code == 2
    assert err.startswith("error: ")
    assert message in err
    assert err.count("\n") == 1  # one line, no traceback
    assert not out_dir.exists()  # validated before anything ran or was written


def test_defaults_fill_in_a_quick_comparison() -> None:
    config = validated(BenchConfig)

    assert config.workload == "swe" and config.trace is None
    assert config.num_sessions == DEFAULT_NUM_SESSIONS
    assert config.loads == DEFAULT_LOADS and config.rates_per_s is None
    assert config.policies == DEFAULT_POLICIES
    assert (config.gpu, config.model, config.num_gpus) == ("h100-80gb", "llama-3.1-8b", 1)


def test_trace_keeps_its_own_arrivals_and_sessions_by_default(tmp_path: Path) -> None:
    config = validated(BenchConfig, trace=tmp_path / "t.parquet")

    assert config.workload is None
    assert config.loads is None and config.rates_per_s is None and config.num_sessions is None


def test_config_is_frozen_and_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="seeds"):
        validated(BenchConfig, seeds=3)
    config = validated(BenchConfig)
    with pytest.raises(ValueError):
        config.seed = 3


def test_rerun_command_pins_resolved_rates() -> None:
    config = validated(BenchConfig, policies=("mars", "fcfs"), num_sessions=8)

    command = rerun_command(config, [0.0125, 0.025])

    assert "--policies mars,fcfs" in command and "--sessions 8" in command
    assert "--rates 0.0125,0.025" in command and "--load" not in command
    assert "--load 0.5,1,1.5" in rerun_command(config)


def _session(num_turns: int, new_tokens: int, output_tokens: int, cpu_s: float) -> SessionSpec:
    turns = [Turn(new_tokens, output_tokens, cpu_s, 0.5) for _ in range(num_turns - 1)]
    return SessionSpec("s", 0.0, (*turns, Turn(new_tokens, output_tokens)))


def test_saturation_scales_with_gpus_and_work() -> None:
    cost_model = CostModel.from_names("h100-80gb", "llama-3.1-8b")
    engine = validated(EngineConfig)
    light = [_session(10, 1000, 200, 0.0)]
    heavy = [_session(10, 2000, 400, 0.0)]
    one_gpu = validated(ClusterConfig, num_gpus=1)
    two_gpus = validated(ClusterConfig, num_gpus=2)

    rate_1 = estimate_saturation_rate_per_s(light, cost_model, one_gpu, engine)
    rate_2 = estimate_saturation_rate_per_s(light, cost_model, two_gpus, engine)
    rate_heavy = estimate_saturation_rate_per_s(heavy, cost_model, one_gpu, engine)

    assert rate_2 == pytest.approx(2 * rate_1)
    assert rate_heavy < rate_1 / 1.5
    estimate = estimate_saturation(light, cost_model, one_gpu, engine)
    assert math.isinf(estimate.cpu_rate_per_s) and estimate.bottleneck == "GPU"
    # A 10-turn session of ~12k tokens of context at most: seconds, not ms or hours.
    gpu_s = estimate.prefill_s_per_session + estimate.decode_s_per_session
    assert 0.1 < gpu_s < 30
    assert 1 <= estimate.decode_batch <= engine.max_num_seqs


def test_saturation_is_cpu_bound_when_tools_burn_cores() -> None:
    cost_model = CostModel.from_names("h100-80gb", "llama-3.1-8b")
    sessions = [_session(10, 1000, 200, 60.0)]  # 9 minutes of CPU per session
    cluster = validated(ClusterConfig, cpu_cores_per_gpu=2)

    estimate = estimate_saturation(sessions, cost_model, cluster, validated(EngineConfig))

    assert estimate.bottleneck == "CPU"
    assert estimate.rate_per_s == pytest.approx(2 / 540)


def test_saturation_is_kv_bound_when_sessions_hold_big_contexts_through_long_waits() -> None:
    """Little's law on the KV cache: a session holding ~20k tokens through ten
    100-second waits needs 2e7 token-seconds; one GPU holds ``kv`` tokens, so at
    most ``kv / 2e7`` such sessions per second keep their KV warm."""
    cost_model = CostModel.from_names("h100-80gb", "llama-3.1-8b")
    engine = validated(EngineConfig)
    turns = [Turn(2000, 10, 0.0, 100.0) for _ in range(10)]
    sessions = [SessionSpec("s", 0.0, (*turns, Turn(10, 10)))]
    estimate = estimate_saturation(sessions, cost_model, validated(ClusterConfig), engine)
    assert estimate.bottleneck == "KV"
    waits = sum((i + 1) * 2010 * 100.0 for i in range(10))  # context x wait, turn by turn
    assert waits < estimate.kv_token_s_per_session < waits * 1.01  # plus the turns' own time
    kv_tokens = kv_capacity_tokens(cost_model, engine)
    assert estimate.rate_per_s == pytest.approx(kv_tokens / estimate.kv_token_s_per_session)
    assert estimate.kv_rate_per_s < estimate.gpu_rate_per_s


def test_tiny_bench_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "bench"
    args = ["--sessions", "6", "--policies", "mars,fcfs", "--load", "0.8", "--seed", "3"]

    code, out, err = run_cli([*args, "--out", str(out_dir), "--json"], capsys)

    assert code == 0, err
    summary = json.loads(out)
    assert summary == json.loads((out_dir / "summary.json").read_text())
    config = summary["config"]
    assert config["num_sessions"] == 6 and config["policies"] == ["mars", "fcfs"]
    assert config["loads"] == [0.8] and config["saturation"]["rate_per_s"] > 0
    assert "--rates" in config["rerun_command"]
    runs = summary["runs"]
    assert [r["policy"] for r in runs] == ["mars", "fcfs"]
    rate = config["resolved_rates_per_s"][0]
    assert rate == pytest.approx(0.8 * config["saturation"]["rate_per_s"])
    for run in runs:
        assert run["runtime"] == "sim" and run["gpus"] == 1 and run["load"] == 0.8
        assert run["rate_per_s"] == pytest.approx(rate)
        assert run["num_sessions"] == 6
        assert run["num_completed"] + run["num_failed"] <= 6
        assert run["num_completed"] > 0
        assert set(run["goodput"]) == {"1.5", "2", "3", "5"}
        assert all(0 <= g <= 1 for g in run["goodput"].values())
        assert run["goodput"]["1.5"] <= run["goodput"]["3"] <= run["goodput"]["5"]
        assert run["mean_slowdown"] >= 1 - 1e-6
        assert run["p50_jct_s"] <= run["p90_jct_s"] <= run["p99_jct_s"]
        assert run["simulated_s"] > 0 and run["wall_s"] > 0
        assert 0 <= run["gpu_busy_frac"] <= 1

    sessions = pq.read_table(out_dir / "sessions.parquet").to_pylist()
    requests = pq.read_table(out_dir / "requests.parquet").to_pylist()
    timeseries = pq.read_table(out_dir / "timeseries.parquet")
    assert len(sessions) == 12
    by_policy = {p: [s for s in sessions if s["policy"] == p] for p in ("mars", "fcfs")}
    arrivals = {
        p: sorted((s["session_id"], s["arrival_s"]) for s in rows) for p, rows in by_policy.items()
    }
    assert arrivals["mars"] == arrivals["fcfs"]  # every policy sees the same arrivals
    for policy, rows in by_policy.items():
        assert sum(1 for r in rows if r["completed"]) == summary_run(runs, policy)["num_completed"]
        turns_done = sum(r["num_turns"] for r in rows if r["completed"])
        assert sum(1 for r in requests if r["policy"] == policy) >= turns_done
        assert all(r["rate_per_s"] == pytest.approx(rate) for r in rows)
    assert timeseries.num_rows > 0
    assert {"t_s", "kv_usage", "policy", "rate_per_s"} <= set(timeseries.column_names)
    for name in ("goodput_vs_load.png", "jct_cdf.png", "timeseries.png"):
        assert (out_dir / name).stat().st_size > 1000


def summary_run(runs: list[dict], policy: str) -> dict:
    return next(r for r in runs if r["policy"] == policy)


def test_bench_prints_tables_with_mars_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--sessions", "4", "--policies", "mars,fcfs", "--rates", "0.02", "--seed", "1"]

    code, out, err = run_cli([*args, "--out", str(tmp_path / "b")], capsys)

    assert code == 0, err
    assert "estimated saturation" in out
    assert "bench results" in out and "MARS vs each policy" in out
    assert "fcfs" in out


def test_trace_bench_keeps_trace_arrivals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mars_ray.workloads.schema import write_trace

    sessions = [
        SessionSpec(f"t{i}", 7.0 * i, (Turn(500, 50, 0.2, 0.1), Turn(200, 40))) for i in range(3)
    ]
    trace = tmp_path / "trace.parquet"
    write_trace(sessions, trace)
    out_dir = tmp_path / "b"

    code, out, err = run_cli(
        ["--trace", str(trace), "--policies", "fcfs", "--out", str(out_dir), "--json"], capsys
    )

    assert code == 0, err
    summary = json.loads(out)
    assert summary["config"]["resolved_rates_per_s"] is None
    (run,) = summary["runs"]
    assert run["rate_per_s"] is None and "load" not in run
    assert run["num_sessions"] == run["num_completed"] == 3
    rows = pq.read_table(out_dir / "sessions.parquet").to_pylist()
    assert sorted(r["arrival_s"] for r in rows) == [0.0, 7.0, 14.0]
    assert (out_dir / "goodput_vs_load.png").exists()


def test_a_trace_shorter_than_sessions_asked_is_cycled_with_new_ids() -> None:
    from mars_ray.bench import cycle_sessions
    from mars_ray.session import SessionSpec, Turn

    trace = [SessionSpec(f"t{i}", 10.0 * i, (Turn(100, 10),)) for i in range(3)]
    cycled = cycle_sessions(trace, 7)
    assert [s.session_id for s in cycled] == ["t0", "t1", "t2", "t0#1", "t1#1", "t2#1", "t0#2"]
    assert [s.arrival_s for s in cycled] == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    assert cycled[3].turns == trace[0].turns


def test_bench_takes_a_gpu_and_a_core_count_per_node() -> None:
    config = validated(
        BenchConfig,
        num_gpus=4,
        num_nodes=2,
        node_gpus=("h100-80gb", "h200-141gb"),
        node_cpu_cores=(16, 64),
    )
    assert config.cluster.gpu_names[-1] == "h200-141gb"
    assert "--node-gpus h100-80gb,h200-141gb --node-cpu-cores 16,64" in rerun_command(config)
