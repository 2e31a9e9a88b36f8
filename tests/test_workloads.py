"""Workloads: the Parquet trace schema, generators, arrivals and the ``trace`` commands."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mars_ray.errors import ConfigError, TraceError, UnknownNameError
from mars_ray.session import SessionSpec, Turn
from mars_ray.workloads import (
    WORKLOADS,
    assign_arrivals,
    burst_arrivals,
    generate_workload,
    poisson_arrivals,
    read_trace,
    write_trace,
)

WINDOW_TOKENS = 131_072

# --------------------------------------------------------------------------- factories


def make_sessions() -> list[SessionSpec]:
    """Three sessions (rows 0-2, 3-4, 5 once written), deliberately not in arrival order."""
    return [
        SessionSpec(
            "a",
            1.0,
            (
                Turn(100, 20, 0.5, 0.1, "grep"),
                Turn(0, 20, 1.0, 0.0, "run_tests"),
                Turn(60, 20),
            ),
            tenant="t1",
        ),
        SessionSpec("b", 0.0, (Turn(200, 30, 0.2, 0.3, "shell"), Turn(10, 30))),
        SessionSpec("c", 1.0, (Turn(30, 5),), tenant="t2"),
    ]


def base_columns() -> dict[str, list[Any]]:
    """The rows of :func:`make_sessions` as plain column lists, ready to corrupt."""
    return {
        "session_id": ["a", "a", "a", "b", "b", "c"],
        "arrival_s": [1.0, 1.0, 1.0, 0.0, 0.0, 1.0],
        "turn_index": [0, 1, 2, 0, 1, 0],
        "new_tokens": [100, 0, 60, 200, 10, 30],
        "output_tokens": [20, 20, 20, 30, 30, 5],
        "tool_cpu_s": [0.5, 1.0, 0.0, 0.2, 0.0, 0.0],
        "tool_wait_s": [0.1, 0.0, 0.0, 0.3, 0.0, 0.0],
        "tool_name": ["grep", "run_tests", None, "shell", None, None],
        "tenant": ["t1", "t1", "t1", None, None, "t2"],
    }


TYPES = {
    "session_id": pa.string(),
    "arrival_s": pa.float64(),
    "turn_index": pa.int32(),
    "new_tokens": pa.int32(),
    "output_tokens": pa.int32(),
    "tool_cpu_s": pa.float64(),
    "tool_wait_s": pa.float64(),
    "tool_name": pa.string(),
    "tenant": pa.string(),
}


def write_columns(
    path: Path, columns: dict[str, list[Any]], types: dict[str, pa.DataType] | None = None
) -> Path:
    types = {**TYPES, **(types or {})}
    arrays = {name: pa.array(values, type=types[name]) for name, values in columns.items()}
    pq.write_table(pa.table(arrays), path)
    return path


def trace_error(path: Path) -> str:
    with pytest.raises(TraceError) as info:
        read_trace(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


# --------------------------------------------------------------------------- schema


def test_round_trip_sorts_by_arrival_stably(tmp_path: Path) -> None:
    sessions = make_sessions()
    write_trace(sessions, tmp_path / "t.parquet")
    back = read_trace(tmp_path / "t.parquet")
    assert back == [sessions[1], sessions[0], sessions[2]]  # b at 0 s; a, c tie at 1 s


def test_hand_written_columns_read_back_as_the_sessions(tmp_path: Path) -> None:
    back = read_trace(write_columns(tmp_path / "t.parquet", base_columns()))
    assert back == sorted(make_sessions(), key=lambda s: s.arrival_s)


def test_generated_workload_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    sessions = generate_workload("swe", 50, rng, WINDOW_TOKENS)
    sessions = assign_arrivals(sessions, poisson_arrivals(50, 2.0, rng))
    write_trace(sessions, tmp_path / "swe.parquet")
    assert read_trace(tmp_path / "swe.parquet") == sessions


def test_optional_columns_may_be_absent(tmp_path: Path) -> None:
    columns = base_columns()
    del columns["tool_name"], columns["tenant"]
    back = read_trace(write_columns(tmp_path / "t.parquet", columns))
    assert all(s.tenant is None for s in back)
    assert all(t.tool_name is None for s in back for t in s.turns)


@pytest.mark.parametrize(
    "types",
    [
        {"turn_index": pa.int8(), "new_tokens": pa.int16(), "output_tokens": pa.int64()},
        {"new_tokens": pa.uint16(), "output_tokens": pa.uint64()},
        {"arrival_s": pa.float32(), "tool_cpu_s": pa.float32(), "tool_wait_s": pa.float16()},
        {"new_tokens": pa.float64(), "tool_wait_s": pa.int64()},  # lossless either way
        {"session_id": pa.large_string(), "tenant": pa.dictionary(pa.int8(), pa.string())},
    ],
)
def test_any_lossless_numeric_width_is_accepted(
    tmp_path: Path, types: dict[str, pa.DataType]
) -> None:
    columns = base_columns()
    for name, data_type in types.items():
        if pa.types.is_floating(data_type):
            columns[name] = [float(v) for v in columns[name]]
    back = read_trace(write_columns(tmp_path / "t.parquet", columns, types))
    expected = sorted(make_sessions(), key=lambda s: s.arrival_s)
    assert [s.session_id for s in back] == [s.session_id for s in expected]
    assert [len(s.turns) for s in back] == [len(s.turns) for s in expected]
    assert [t.new_tokens for s in back for t in s.turns] == [
        t.new_tokens for s in expected for t in s.turns
    ]


def _set(column: str, row: int, value: Any) -> Callable[[dict[str, list[Any]]], None]:
    def corrupt(columns: dict[str, list[Any]]) -> None:
        columns[column][row] = value

    return corrupt


BAD_ROWS = [
    # (corruption, extra column types, row, column, message fragment)
    (_set("output_tokens", 4, 0), {}, 4, "output_tokens", "must be >= 1, got 0"),
    (_set("new_tokens", 3, 0), {}, 3, "new_tokens", "must be >= 1 on a session's first turn"),
    (_set("new_tokens", 2, -5), {}, 2, "new_tokens", "must be >= 0, got -5"),
    (_set("arrival_s", 4, 5.0), {}, 4, "arrival_s", "differs within a session"),
    (_set("arrival_s", 0, math.nan), {}, 0, "arrival_s", "must not be NaN"),
    (_set("arrival_s", 5, -1.0), {}, 5, "arrival_s", "must be >= 0, got -1.0"),
    (_set("arrival_s", 5, math.inf), {}, 5, "arrival_s", "must be finite"),
    (_set("tool_cpu_s", 1, math.nan), {}, 1, "tool_cpu_s", "must not be NaN"),
    (_set("tool_wait_s", 0, -0.1), {}, 0, "tool_wait_s", "must be >= 0"),
    (_set("tool_cpu_s", 2, 1.0), {}, 2, "tool_cpu_s", "must be 0 after the last turn"),
    (_set("tool_wait_s", 5, 3.0), {}, 5, "tool_wait_s", "must be 0 after the last turn"),
    (_set("turn_index", 2, 3), {}, 2, "turn_index", "expected 2"),
    (_set("turn_index", 3, 1), {}, 3, "turn_index", "expected 0"),
    (_set("session_id", 5, "a"), {}, 5, "session_id", "grouped by session"),
    (_set("session_id", 1, None), {}, 1, "session_id", "missing value (null)"),
    (_set("session_id", 0, ""), {}, 0, "session_id", "must not be empty"),
    (_set("output_tokens", 3, None), {}, 3, "output_tokens", "missing value (null)"),
    (_set("tenant", 1, "t9"), {}, 1, "tenant", "differs within a session"),
    (_set("new_tokens", 2, 2**40), {"new_tokens": pa.int64()}, 2, "new_tokens", "int32"),
    (
        _set("output_tokens", 0, 20.5),
        {"output_tokens": pa.float64()},
        0,
        "output_tokens",
        "whole number",
    ),
]


@pytest.mark.parametrize(("corrupt", "types", "row", "column", "fragment"), BAD_ROWS)
def test_bad_value_names_first_bad_row_and_column(
    tmp_path: Path,
    corrupt: Callable[[dict[str, list[Any]]], None],
    types: dict[str, pa.DataType],
    row: int,
    column: str,
    fragment: str,
) -> None:
    columns = base_columns()
    corrupt(columns)
    path = write_columns(tmp_path / "bad.parquet", columns, types)
    message = trace_error(path)
    assert message.startswith(f"{path}: row {row}, column {column!r}: "), message
    assert fragment in message


def test_message_format_is_exact(tmp_path: Path) -> None:
    columns = base_columns()
    columns["output_tokens"][4] = 0
    path = write_columns(tmp_path / "trace.parquet", columns)
    assert trace_error(path) == f"{path}: row 4, column 'output_tokens': must be >= 1, got 0"


def test_the_earliest_bad_row_wins_across_columns(tmp_path: Path) -> None:
    columns = base_columns()
    columns["tool_wait_s"][5] = 1.0  # row 5
    columns["output_tokens"][2] = 0  # row 2: reported first
    assert ": row 2, column 'output_tokens'" in trace_error(
        write_columns(tmp_path / "t.parquet", columns)
    )


@pytest.mark.parametrize(
    ("column", "values", "data_type", "fragment"),
    [
        ("new_tokens", ["1"] * 6, pa.string(), "column 'new_tokens' must be an integer"),
        ("arrival_s", ["0"] * 6, pa.string(), "column 'arrival_s' must be a number"),
        ("session_id", list(range(6)), pa.int64(), "column 'session_id' must be a string"),
        ("output_tokens", [True] * 6, pa.bool_(), "column 'output_tokens' must be an integer"),
    ],
)
def test_mistyped_column_is_rejected(
    tmp_path: Path, column: str, values: list[Any], data_type: pa.DataType, fragment: str
) -> None:
    columns = base_columns()
    columns[column] = values
    path = write_columns(tmp_path / "t.parquet", columns, {column: data_type})
    assert fragment in trace_error(path)


def test_missing_column_is_named(tmp_path: Path) -> None:
    columns = base_columns()
    del columns["output_tokens"]
    assert "missing column 'output_tokens'" in trace_error(
        write_columns(tmp_path / "t.parquet", columns)
    )


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in trace_error(tmp_path / "nope.parquet")


def test_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    path.write_text("session_id,arrival_s\na,0\n")
    assert "not a readable Parquet file" in trace_error(path)


def test_empty_trace(tmp_path: Path) -> None:
    columns: dict[str, list[Any]] = {name: [] for name in TYPES}
    assert "empty" in trace_error(write_columns(tmp_path / "t.parquet", columns))


def test_write_refuses_invalid_or_empty_sessions(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="empty"):
        write_trace([], tmp_path / "t.parquet")
    with pytest.raises(TraceError, match="session 'x' has no turns"):
        write_trace([SessionSpec("x", 0.0, ())], tmp_path / "t.parquet")
    bad = [SessionSpec("a", 0.0, (Turn(10, 0),))]
    with pytest.raises(TraceError, match="row 0, column 'output_tokens'"):
        write_trace(bad, tmp_path / "t.parquet")
    duplicated = [make_sessions()[2], make_sessions()[1], make_sessions()[2]]
    with pytest.raises(TraceError, match="grouped by session"):
        write_trace(duplicated, tmp_path / "t.parquet")
    assert not (tmp_path / "t.parquet").exists()


# --------------------------------------------------------------------------- generators


def generate(name: str, num_sessions: int, seed: int = 0) -> list[SessionSpec]:
    return generate_workload(name, num_sessions, np.random.default_rng(seed), WINDOW_TOKENS)


def tool_calls_s(sessions: list[SessionSpec]) -> np.ndarray:
    return np.array([t.tool_s for s in sessions for t in s.turns[:-1]])


def appended_tokens(sessions: list[SessionSpec]) -> np.ndarray:
    """New tokens of every continuation (the first turn is a prompt, not an append)."""
    return np.array([t.new_tokens for s in sessions for t in s.turns[1:]])


@pytest.mark.parametrize("name", ["swe", "agentic", "longctx", "chat"])
def test_generators_are_deterministic_for_a_seed(name: str) -> None:
    assert generate(name, 30, seed=7) == generate(name, 30, seed=7)
    assert generate(name, 30, seed=7) != generate(name, 30, seed=8)


@pytest.mark.parametrize("name", ["swe", "agentic", "longctx", "chat"])
@pytest.mark.parametrize("max_context_tokens", [WINDOW_TOKENS, 16_384, 1_000, 2])
def test_generated_sessions_are_well_formed_and_fit_the_window(
    name: str, max_context_tokens: int
) -> None:
    rng = np.random.default_rng(1)
    sessions = generate_workload(name, 300, rng, max_context_tokens)
    assert [s.session_id for s in sessions] == [f"{name}-{i:06d}" for i in range(300)]
    for session in sessions:
        assert session.arrival_s == 0.0
        assert session.max_context_tokens <= max_context_tokens
        assert session.turns[0].new_tokens >= 1
        assert all(t.output_tokens >= 1 and t.new_tokens >= 0 for t in session.turns)
        assert all(t.tool_cpu_s >= 0 and t.tool_wait_s >= 0 for t in session.turns)
        assert session.turns[-1].tool_s == 0.0


def test_swe_shape() -> None:
    sessions = generate("swe", 2000)
    num_turns = np.array([s.num_turns for s in sessions])
    assert num_turns.min() >= 10 and num_turns.max() <= 60
    assert 15 <= np.median(num_turns) <= 25
    first_prompts = np.array([s.turns[0].new_tokens for s in sessions])
    assert first_prompts.min() >= 4_000 and first_prompts.max() <= 10_000
    appended = appended_tokens(sessions)
    assert 750 <= np.median(appended) <= 1_250
    assert np.percentile(appended, 99) > 5 * np.median(appended)  # heavy tail
    outputs = np.array([t.output_tokens for s in sessions for t in s.turns])
    assert outputs.min() >= 100 and outputs.max() <= 600
    tool_s = tool_calls_s(sessions)
    assert np.mean(tool_s < 1.0) > 0.75  # most tools under a second
    test_runs = [t for s in sessions for t in s.turns if t.tool_s >= 60]
    assert 0.02 < len(test_runs) / len(tool_s) < 0.1  # a few test runs of minutes...
    assert all(t.tool_cpu_s > t.tool_wait_s for t in test_runs)  # ...that burn CPU
    quick = [t for s in sessions for t in s.turns[:-1] if t.tool_s < 1]
    assert all(t.tool_wait_s > t.tool_cpu_s for t in quick)


def test_agentic_shape_follows_tracelab() -> None:
    sessions = generate("agentic", 2000)
    appended = appended_tokens(sessions)
    assert abs(np.median(appended) - 875) <= 0.25 * 875
    assert np.mean(appended < 1_000) > 0.85
    outputs = np.array([t.output_tokens for s in sessions for t in s.turns])
    assert abs(np.median(outputs) - 214) <= 0.25 * 214
    assert abs(outputs.mean() - 523) <= 0.25 * 523
    assert np.percentile(outputs, 90) < 1_700
    tool_s = tool_calls_s(sessions)
    assert 0.2 <= np.median(tool_s) <= 0.45  # TraceLab p50 0.3 s
    assert 9 <= np.percentile(tool_s, 90) <= 20  # p90 13.6 s
    assert 120 <= np.percentile(tool_s, 99) <= 400  # p99 3.6 min
    assert 0.02 <= np.mean(tool_s > 60) <= 0.06  # 3.97% of calls over a minute
    num_turns = np.array([s.num_turns for s in sessions])
    assert 12 <= np.median(num_turns) <= 20  # 1 + 15 tool-triggered rounds
    assert num_turns.max() > 60  # heavy tail, bounded by the window


def test_longctx_mixes_long_and_short_sessions() -> None:
    sessions = generate("longctx", 2000)
    context = np.array([s.max_context_tokens for s in sessions])
    is_long = context >= 50_000
    assert 0.25 <= is_long.mean() <= 0.35
    assert context.max() <= 120_000
    assert np.median(context[~is_long]) < 10_000


def test_chat_is_single_turn_without_tools() -> None:
    sessions = generate("chat", 2000)
    assert all(s.num_turns == 1 and s.total_tool_s == 0 for s in sessions)
    prompts = np.array([s.turns[0].new_tokens for s in sessions])
    outputs = np.array([s.turns[0].output_tokens for s in sessions])
    assert prompts.min() >= 100 and prompts.max() <= 4_000
    assert outputs.min() >= 50 and outputs.max() <= 800


def test_generator_arguments_are_checked() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(UnknownNameError, match="known: agentic, chat, longctx, swe"):
        generate_workload("nope", 1, rng, WINDOW_TOKENS)
    with pytest.raises(ConfigError, match="num_sessions"):
        generate_workload("swe", -1, rng, WINDOW_TOKENS)
    with pytest.raises(ConfigError, match="max_context_tokens"):
        generate_workload("chat", 1, rng, 1)
    assert generate_workload("agentic", 0, rng, WINDOW_TOKENS) == []
    assert sorted(WORKLOADS) == ["agentic", "chat", "longctx", "swe"]


# --------------------------------------------------------------------------- arrivals


def test_poisson_arrivals_have_the_requested_rate() -> None:
    times_s = poisson_arrivals(5000, 0.5, np.random.default_rng(0))
    assert times_s[0] == 0.0
    gaps_s = np.diff(times_s)
    assert np.all(gaps_s >= 0)
    assert abs(gaps_s.mean() - 2.0) <= 0.1 * 2.0


@pytest.mark.parametrize("rate_per_s", [0.0, -1.0, math.nan])
def test_poisson_rejects_a_rate_that_is_not_positive(rate_per_s: float) -> None:
    with pytest.raises(ConfigError, match="rate must be > 0 sessions/s"):
        poisson_arrivals(10, rate_per_s, np.random.default_rng(0))


def test_rate_error_message() -> None:
    with pytest.raises(ConfigError) as info:
        poisson_arrivals(10, -1, np.random.default_rng(0))
    assert str(info.value) == "rate must be > 0 sessions/s, got -1"


def test_burst_arrivals() -> None:
    assert burst_arrivals(4).tolist() == [0.0] * 4
    assert burst_arrivals(7, burst_size=3, interval_s=10).tolist() == [0, 0, 0, 10, 10, 10, 20]
    with pytest.raises(ConfigError):
        burst_arrivals(4, burst_size=0)


def test_assign_arrivals_keeps_order_and_checks_lengths() -> None:
    sessions = make_sessions()
    stamped = assign_arrivals(sessions, [5.0, 6.0, 7.0])
    assert [(s.session_id, s.arrival_s) for s in stamped] == [("a", 5.0), ("b", 6.0), ("c", 7.0)]
    assert [s.turns for s in stamped] == [s.turns for s in sessions]
    with pytest.raises(ConfigError, match="2 arrival times for 3 sessions"):
        assign_arrivals(sessions, [1.0, 2.0])
    with pytest.raises(ConfigError, match=">= 0"):
        assign_arrivals(sessions, [1.0, -2.0, 3.0])


# --------------------------------------------------------------------------- cli


def test_cli_generate_then_inspect(tmp_path: Path, trace_cli: Callable[..., Any]) -> None:
    out = tmp_path / "swe.parquet"
    result = trace_cli("generate", "--workload", "swe", "--sessions", "40", "--rate", "2.0",
                       "--seed", "3", "--max-context", "65536", "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote 40 swe sessions" in result.output
    sessions = read_trace(out)
    assert len(sessions) == 40 and max(s.max_context_tokens for s in sessions) <= 65536

    result = trace_cli("inspect", str(out), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["num_sessions"] == 40
    assert summary["num_turns"] == sum(s.num_turns for s in sessions)
    assert 10 <= summary["turns_per_session_p50"] <= 60
    assert 0 < summary["tool_cpu_share"] < 1
    assert 1.0 <= summary["arrival_rate_per_s"] <= 4.0

    result = trace_cli("inspect", str(out))
    assert result.exit_code == 0, result.output
    for label in ("sessions", "turns / session", "context tokens", "tool time", "arrivals"):
        assert label in result.output


def test_cli_same_seed_gives_same_sessions_at_any_rate(
    tmp_path: Path, trace_cli: Callable[..., Any]
) -> None:
    for name, rate in (("slow", "0.1"), ("fast", "5")):
        trace_cli("generate", "--workload", "agentic", "--sessions", "20", "--rate", rate,
                  "--out", str(tmp_path / f"{name}.parquet"))  # fmt: skip
    slow, fast = read_trace(tmp_path / "slow.parquet"), read_trace(tmp_path / "fast.parquet")
    assert [s.turns for s in slow] == [s.turns for s in fast]
    assert slow[-1].arrival_s > fast[-1].arrival_s


def test_cli_burst_and_errors(tmp_path: Path, trace_cli: Callable[..., Any]) -> None:
    out = tmp_path / "chat.parquet"
    result = trace_cli("generate", "--workload", "chat", "--sessions", "5", "--arrival", "burst",
                       "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(trace_cli("inspect", str(out), "--json").output)
    assert summary["arrival_rate_per_s"] is None and summary["num_tool_calls"] == 0
    assert "all at once" in trace_cli("inspect", str(out)).output

    result = trace_cli("generate", "--workload", "nope", "--out", str(tmp_path / "x.parquet"))
    assert isinstance(result.exception, UnknownNameError)
    result = trace_cli("generate", "--rate", "-1", "--out", str(tmp_path / "x.parquet"))
    assert isinstance(result.exception, ConfigError)
    result = trace_cli("inspect", str(tmp_path / "missing.parquet"))
    assert isinstance(result.exception, TraceError)
