"""Metrics on hand-built records: exact values, failures, the TPOT/ITL definitions, empties."""

from __future__ import annotations

import json
import math

import pytest

from mars_ray.metrics import (
    alpha_key,
    goodput_fraction,
    json_safe,
    request_metrics,
    session_metrics,
    summarize_run,
)
from mars_ray.results import RequestRecord, RunCounters, RunResult, SessionRecord, TimeSeries

DESIGN_RUN_KEYS = {
    "policy", "runtime", "gpus", "rate_per_s", "num_sessions", "num_completed", "num_failed",
    "mean_jct_s", "p50_jct_s", "p90_jct_s", "p99_jct_s", "mean_slowdown", "goodput",
    "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "preemptions", "evicted_blocks",
    "recomputed_tokens", "gpu_busy_frac", "simulated_s", "wall_s",
}  # fmt: skip


def make_session(
    jct_s: float | None,
    ideal_s: float = 1.0,
    *,
    arrival_s: float = 0.0,
    failed: str | None = None,
    sid: str = "s",
) -> SessionRecord:
    finish_s = None if jct_s is None else arrival_s + jct_s
    return SessionRecord(
        session_id=sid,
        arrival_s=arrival_s,
        admitted_s=arrival_s,
        finish_s=finish_s,
        ideal_s=ideal_s,
        num_turns=3,
        tool_s=0.5,
        tool_ideal_s=0.5,
        failed_reason=failed,
    )


def make_request(
    submit_s: float,
    ttft_s: float,
    decode_s: float,
    output_tokens: int,
    prompt_tokens: int = 100,
) -> RequestRecord:
    return RequestRecord(
        session_id="s",
        turn_index=0,
        engine_id=0,
        submit_s=submit_s,
        first_token_s=submit_s + ttft_s,
        finish_s=submit_s + ttft_s + decode_s,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        cached_tokens=0,
        recomputed_tokens=0,
        num_preemptions=0,
    )


def test_jct_percentiles_are_numpy_linear() -> None:
    sessions = [make_session(float(j), sid=f"s{j}") for j in range(1, 11)]  # JCT 1..10 s

    m = session_metrics(sessions)

    assert m.num_sessions == m.num_completed == 10
    assert m.mean_jct_s == pytest.approx(5.5)
    assert m.p50_jct_s == pytest.approx(5.5)
    assert m.p90_jct_s == pytest.approx(9.1)
    assert m.p95_jct_s == pytest.approx(9.55)
    assert m.p99_jct_s == pytest.approx(9.91)
    assert m.mean_slowdown == pytest.approx(5.5)  # ideal 1 s each


def test_goodput_counts_failed_and_unfinished_as_missing() -> None:
    sessions = [
        make_session(1.0, ideal_s=1.0),  # slowdown 1
        make_session(2.5, ideal_s=1.0),  # 2.5
        make_session(4.0, ideal_s=1.0),  # 4
        make_session(1.0, ideal_s=1.0, failed="prompt exceeds KV cache"),
        make_session(None, ideal_s=1.0),  # never finished
    ]

    m = session_metrics(sessions)

    assert m.num_completed == 3
    assert m.num_failed == 1
    assert m.goodput == {"1.5": 0.2, "2": 0.2, "3": 0.4, "5": 0.6}
    assert m.mean_jct_s == pytest.approx(2.5)  # completed only
    assert m.mean_slowdown == pytest.approx(2.5)


def test_goodput_bound_is_inclusive_and_keys_are_compact() -> None:
    assert goodput_fraction([make_session(3.0, ideal_s=1.0)], 3.0) == 1.0
    assert alpha_key(3.0) == "3"
    assert alpha_key(1.5) == "1.5"


def test_sessions_per_min_uses_given_duration() -> None:
    sessions = [make_session(1.0, sid="a"), make_session(10.0, sid="b")]  # slowdown 1, 10

    assert session_metrics(sessions, duration_s=30.0).sessions_per_min_goodput == 2.0
    assert session_metrics(sessions).sessions_per_min_goodput == pytest.approx(6.0)  # 1 per 10 s


def test_empty_and_all_failed_give_none_not_nan() -> None:
    empty = session_metrics([])
    assert empty.mean_jct_s is None and empty.p99_jct_s is None
    assert empty.goodput == {"1.5": None, "2": None, "3": None, "5": None}
    assert empty.sessions_per_min_goodput is None

    failed = session_metrics([make_session(None, failed="boom")])
    assert failed.mean_jct_s is None and failed.mean_slowdown is None
    assert failed.goodput["3"] == 0.0

    r = request_metrics([])
    assert r.num_requests == 0
    assert r.mean_ttft_ms is None and r.request_throughput is None and r.mean_itl_ms is None


def test_tpot_is_decode_span_over_output_minus_one() -> None:
    requests = [
        make_request(0.0, ttft_s=0.1, decode_s=0.9, output_tokens=10),  # TPOT 100 ms
        make_request(1.0, ttft_s=0.3, decode_s=0.2, output_tokens=101),  # TPOT 2 ms
        make_request(2.0, ttft_s=0.2, decode_s=0.0, output_tokens=1),  # no TPOT
    ]

    r = request_metrics(requests, duration_s=10.0)

    assert r.mean_ttft_ms == pytest.approx(200.0)
    assert r.median_ttft_ms == pytest.approx(200.0)
    assert r.mean_tpot_ms == pytest.approx(51.0)
    assert r.median_tpot_ms == pytest.approx(51.0)
    # vLLM pools every inter-token gap: (0.9 + 0.2) s over (9 + 100) gaps.
    assert r.mean_itl_ms == pytest.approx(1100.0 / 109)
    assert r.mean_e2el_ms == pytest.approx((1000.0 + 500.0 + 200.0) / 3)
    assert r.request_throughput == pytest.approx(0.3)
    assert r.output_throughput == pytest.approx(11.2)
    assert r.total_token_throughput == pytest.approx(41.2)


def test_request_throughput_defaults_to_first_submit_to_last_finish() -> None:
    requests = [make_request(0.0, 0.5, 0.5, 2), make_request(3.0, 0.5, 0.5, 2)]  # span 4 s

    assert request_metrics(requests).request_throughput == pytest.approx(0.5)


def make_run(sessions: list[SessionRecord], requests: list[RequestRecord]) -> RunResult:
    counters = RunCounters(
        num_preemptions=6, num_evicted_blocks=120, num_recomputed_tokens=900, gpu_busy_frac=0.5
    )
    return RunResult(
        policy="mars",
        runtime="sim",
        num_gpus=2,
        num_nodes=1,
        rate_per_s=0.5,
        sessions=sessions,
        requests=requests,
        counters=counters,
        timeseries=TimeSeries(),
        simulated_s=120.0,
        wall_s=4.0,
    )


def test_summarize_run_has_design_keys_and_is_strict_json() -> None:
    run = make_run(
        [make_session(2.0), make_session(None, failed="x")], [make_request(0, 0.1, 1, 11)]
    )

    entry = summarize_run(run, load=0.8)

    assert entry.keys() >= DESIGN_RUN_KEYS
    assert set(entry["goodput"]) == {"1.5", "2", "3", "5"}
    assert entry["gpus"] == 2 and entry["nodes"] == 1 and entry["load"] == 0.8
    assert entry["num_completed"] == 1 and entry["num_failed"] == 1
    assert entry["goodput"]["3"] == 0.5
    assert entry["speedup_vs_real_time"] == pytest.approx(30.0)
    assert entry["preemptions_per_min"] == pytest.approx(3.0)
    assert entry["evicted_blocks_per_min"] == pytest.approx(60.0)
    assert entry["mean_tpot_ms"] == pytest.approx(100.0)
    json.dumps(entry, allow_nan=False)


def test_summarize_run_without_completions_is_null_safe() -> None:
    run = make_run([make_session(None, failed="x")], [])

    entry = summarize_run(run)

    assert entry["mean_jct_s"] is None and entry["mean_ttft_ms"] is None
    assert "load" not in entry
    json.dumps(entry, allow_nan=False)


def test_json_safe_replaces_non_finite() -> None:
    assert json_safe({"a": math.nan, "b": [math.inf, 1.0], "c": (2,)}) == {
        "a": None,
        "b": [None, 1.0],
        "c": [2],
    }
