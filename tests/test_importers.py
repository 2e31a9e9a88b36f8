"""Importers: SWE-agent ``.traj``, TraceLab JSONL and mini-swe-agent trajectories and call logs
into the trace schema, and ``trace import``."""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mars_ray import cli
from mars_ray.errors import ConfigError, TraceError, UnknownNameError
from mars_ray.session import SessionSpec, Turn
from mars_ray.workloads import poisson_arrivals, read_trace, write_trace
from mars_ray.workloads.importers import (
    IMPORTERS,
    Fit,
    ImportOptions,
    command_programs,
    count_tokens,
    estimate_tool_s,
    fit_session,
    import_mini_swe_agent,
    import_swe_agent,
    import_tracelab,
    program_runs_code,
    reply_programs,
    runs_code,
    split_tool_time,
)

# --------------------------------------------------------------------------- fixtures

# A SWE-agent 1.x trajectory: function calling, a list-of-parts message, and the submit
# step after the last call. Tokens are ceil(characters / 4).
GREP_ARGUMENTS = '{"command": "grep -rn TimeDelta src"}'


def django_traj() -> dict[str, Any]:
    return {
        "environment": "main",
        "trajectory": [
            {"action": "grep -rn TimeDelta src", "observation": "...", "execution_time": 0.4},
            {"action": "cd /testbed && python reproduce.py", "execution_time": 42.5},
            {"action": "submit", "execution_time": 0.2},
        ],
        "history": [
            {"role": "system", "content": "S" * 400, "agent": "main"},  # 100 tokens
            {"role": "user", "content": "T" * 801, "agent": "main"},  # 201 tokens
            {
                "role": "assistant",
                "content": "A" * 120,
                "thought": "A" * 120,
                "action": "grep -rn TimeDelta src",
                "tool_calls": [
                    {"type": "function", "function": {"name": "bash", "arguments": GREP_ARGUMENTS}}
                ],
            },
            {"role": "tool", "content": "O" * 1000},  # 250 tokens
            {"role": "assistant", "content": "B" * 200},  # 50 tokens
            {"role": "tool", "content": "P" * 50},  # 13 tokens
            {"role": "user", "content": "U" * 30},  # 8 tokens
            {"role": "assistant", "content": [{"type": "text", "text": "C" * 40}]},  # 10 tokens
            {"role": "tool", "content": "diff --git ..."},  # after the last call: dropped
        ],
        "info": {
            "exit_status": "submitted",
            "model_stats": {"tokens_sent": 9000, "tokens_received": 120, "api_calls": 3},
        },
    }


DJANGO_TURNS = (
    # 301 = system + task; output = thought + "bash" + arguments; grep waits 80%.
    Turn(301, math.ceil((120 + 4 + len(GREP_ARGUMENTS)) / 4), 0.4 * 0.2, 0.4 * 0.8, "grep"),
    Turn(250, 50, 42.5, 0.0, "python"),  # runs code: all CPU
    Turn(13 + 8, 10),  # the last turn: no tool call
)


def old_traj() -> dict[str, Any]:
    """A SWE-agent 0.x trajectory: demonstrations in the history, no execution_time."""
    return {
        "trajectory": [{"action": "open foo.py\n", "observation": "..."}, {"action": "submit\n"}],
        "history": [
            {"role": "system", "content": "s" * 40, "agent": "primary"},  # 10
            {"role": "user", "content": "d" * 400, "is_demo": True},  # 100
            {"role": "assistant", "content": "e" * 80, "is_demo": True},  # 20, prompt
            {"role": "user", "content": "t" * 100},  # 25
            {"role": "assistant", "content": "r" * 44},  # 11
            {"role": "user", "content": "o" * 8},  # 2
            {"role": "assistant", "content": "q" * 4},  # 1
        ],
        "info": {"exit_status": "submitted"},
    }


OLD_TURNS = (Turn(155, 11, 0.0, 0.0, "open"), Turn(2, 1))


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def traj_dir(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    write_json(root / "django__django-11099.traj", django_traj())
    write_json(root / "old.traj", old_traj())
    write_json(root / "run2" / "old.traj", old_traj())  # the same instance in another run
    (root / "notes.txt").write_text("not a trajectory")
    return root


def tool(name: str, wall_ms: int | None, internal_ms: int | None = None) -> dict[str, Any]:
    return {
        "tool_name": name,
        "tool_wall_latency_ms": wall_ms,
        "tool_internal_latency_ms": internal_ms,
        "is_error": False,
    }


def events(timestamp: str) -> list[dict[str, Any]]:
    return [
        {"event_type": "text", "timestamp": "2026-06-01T06:00:00Z", "source": "assistant"},
        {"event_type": "user_message", "timestamp": timestamp, "source": "user.message"},
    ]


# Three sessions in TraceLab's normalized shape, interleaved, one round out of order.
TRACELAB_RECORDS: list[dict[str, Any]] = [
    {"provider": "claude", "session_id": "claude:a", "round_index": 0,
     "input_tokens_total": 32272, "prefix_tokens": 27217, "newly_append_tokens": 5055,
     "output_tokens": 931, "timing_events": events("2026-06-01T05:40:20.151Z"),
     "tools": [tool("Bash", 860), tool("WebSearch", 19291, 19287)]},
    {"provider": "codex", "session_id": "codex:b", "round_index": 0, "input_tokens_total": 1000,
     "output_tokens": 200, "timing_events": events("2026-06-01T05:41:20.151Z"),
     "tools": [tool("exec_command", 12000)]},
    {"provider": "claude", "session_id": "claude:a", "round_index": 2,
     "input_tokens_total": 38592, "output_tokens": 0, "tools": []},
    {"provider": "claude", "session_id": "claude:a", "round_index": 1,
     "input_tokens_total": 35740, "output_tokens": 1016, "tools": [tool("Bash", 45010, 45000)]},
    {"session_id": "c", "round_index": 0, "input_tokens_total": 500, "output_tokens": 20,
     "timestamp": "2026-06-01T05:40:50.151Z", "tools": [tool("Read", 30)]},
    {"provider": "codex", "session_id": "codex:b", "round_index": 1, "input_tokens_total": 1100,
     "output_tokens": 50, "tools": [tool("shell", 500)]},
]  # fmt: skip

TRACELAB_SESSIONS = {
    "claude:a": (
        # Bash 0.86 s and WebSearch 19.287 s (internal over wall), 20% CPU each.
        Turn(32272, 931, (0.86 + 19.287) * 0.2, (0.86 + 19.287) * 0.8, "WebSearch"),
        Turn(35740 - 32272 - 931, 1016, 45.0, 0.0, "Bash"),  # a 45 s shell call: CPU
        Turn(38592 - 35740 - 1016, 1),  # 0 output tokens read as 1
    ),
    "c": (Turn(500, 20),),
    "codex:b": (
        Turn(1000, 200, 12.0, 0.0, "exec_command"),
        Turn(0, 50),  # 1100 - 1000 - 200 < 0: clamped
    ),
}


@pytest.fixture
def tracelab_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "rounds.jsonl", TRACELAB_RECORDS)


def approx_turns(turns: tuple[Turn, ...]) -> list[tuple[Any, ...]]:
    return [
        (t.new_tokens, t.output_tokens, pytest.approx(t.tool_cpu_s), pytest.approx(t.tool_wait_s),
         t.tool_name)
        for t in turns
    ]  # fmt: skip


def as_tuples(turns: tuple[Turn, ...]) -> list[tuple[Any, ...]]:
    return [
        (t.new_tokens, t.output_tokens, t.tool_cpu_s, t.tool_wait_s, t.tool_name) for t in turns
    ]


# --------------------------------------------------------------------------- shared rules


def test_count_tokens_and_tool_split() -> None:
    assert [count_tokens(t) for t in ("", "abcd", "abcde")] == [0, 1, 2]
    assert count_tokens("a" * 10, chars_per_token=2.5) == 4
    assert count_tokens("a" * 10, chars_per_token=3) == 4
    assert split_tool_time(10.0, True, 0.2) == (10.0, 0.0)
    assert split_tool_time(10.0, False, 0.25) == (2.5, 7.5)


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("python reproduce.py", True),
        ("cd /testbed && python -m pytest tests/test_x.py", True),
        ("timeout 60 pytest -x", True),
        ("PYTHONPATH=src /usr/bin/python3.11 -c 'import x'", True),
        ("make -j8", True),
        ("open src/python/fields.py 1474", False),
        ("find_file python.py", False),
        ("edit 1:1\npython reproduce.py\nend_of_edit", False),  # the body is not run
        ("grep -rn pytest .", False),
        ("", False),
    ],
)
def test_runs_code(action: str, expected: bool) -> None:
    assert runs_code(action) is expected


def test_import_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="chars per token must be > 0"):
        ImportOptions(chars_per_token=0)
    with pytest.raises(ConfigError, match="max context tokens must be >= 2"):
        ImportOptions(max_context_tokens=1)
    with pytest.raises(ConfigError, match=r"tool CPU fraction must be in \[0, 1\]"):
        ImportOptions(cpu_fraction=1.5)
    with pytest.raises(ConfigError, match="fit must be one of scale, clip"):
        ImportOptions(fit="squeeze")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="decode rate must be > 0 tokens/s"):
        ImportOptions(decode_tokens_per_s=0)
    with pytest.raises(ConfigError, match="call overhead must be >= 0 s"):
        ImportOptions(call_overhead_s=-1)
    with pytest.raises(ConfigError, match="min new tokens must be >= 0"):
        ImportOptions(min_new_tokens=-1)
    assert sorted(IMPORTERS) == ["mini-swe-agent", "swe-agent", "tracelab"]


# --------------------------------------------------------------------------- fitting


def long_session() -> SessionSpec:
    turns = (Turn(600, 100, 1.0, 0.5, "x"), Turn(300, 100, 2.0, 0.0, "y"), Turn(200, 100))
    return SessionSpec("s", 3.0, turns, tenant="t")


def test_fit_keeps_sessions_that_fit() -> None:
    session = long_session()
    assert session.max_context_tokens == 1400
    assert fit_session(session, 1400, Fit.scale) is session
    assert fit_session(session, 1400, Fit.clip) is session


def test_fit_scale_keeps_every_turn_and_tool_call() -> None:
    fitted = fit_session(long_session(), 700, Fit.scale)
    assert as_tuples(fitted.turns) == [
        (300, 50, 1.0, 0.5, "x"),
        (150, 50, 2.0, 0.0, "y"),
        (100, 50, 0.0, 0.0, None),
    ]
    assert (fitted.session_id, fitted.arrival_s, fitted.tenant) == ("s", 3.0, "t")


def test_fit_clip_drops_the_overflowing_turns() -> None:
    fitted = fit_session(long_session(), 1100, Fit.clip)
    # 700 + 400 = 1100 fits; the third turn would make 1400. The last kept turn loses its tool.
    assert as_tuples(fitted.turns) == [(600, 100, 1.0, 0.5, "x"), (300, 100, 0.0, 0.0, None)]
    alone = fit_session(long_session(), 500, Fit.clip)
    assert as_tuples(alone.turns) == [(400, 100, 0.0, 0.0, None)]
    tiny = fit_session(long_session(), 2, Fit.clip)
    assert as_tuples(tiny.turns) == [(1, 1, 0.0, 0.0, None)]


def test_fit_scale_clips_when_the_minimums_overflow() -> None:
    session = SessionSpec("many", 0.0, tuple(Turn(1, 1, 0.1, 0.0, "t") for _ in range(10)))
    fitted = fit_session(session, 4, Fit.scale)
    # Scaled: 1 + 1 then 0 + 1 per turn = 11 tokens; clipping keeps 2 + 1 + 1 = 4.
    assert as_tuples(fitted.turns) == [
        (1, 1, 0.1, 0.0, "t"),
        (0, 1, 0.1, 0.0, "t"),
        (0, 1, 0, 0, None),
    ]


def test_fitted_sessions_always_fit_and_stay_valid(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    fitted: dict[Fit, list[SessionSpec]] = {Fit.scale: [], Fit.clip: []}
    for i in range(200):
        num_turns = int(rng.integers(1, 40))
        turns = [
            Turn(
                int(rng.integers(0 if t else 1, 50_000)), int(rng.integers(1, 4_000)), 1.0, 0.5, "x"
            )
            for t in range(num_turns)
        ]
        turns[-1] = Turn(turns[-1].new_tokens, turns[-1].output_tokens)
        session = SessionSpec(f"s{i}", 0.0, tuple(turns))
        window = int(rng.integers(2, 200_000))
        scaled, clipped = (fit_session(session, window, fit) for fit in (Fit.scale, Fit.clip))
        assert scaled.max_context_tokens <= window and clipped.max_context_tokens <= window
        # Scaling never grows a turn, so it keeps at least the turns clipping keeps.
        assert scaled.num_turns >= clipped.num_turns
        fitted[Fit.scale].append(scaled)
        fitted[Fit.clip].append(clipped)
    assert sum(s.num_turns for s in fitted[Fit.scale]) > sum(s.num_turns for s in fitted[Fit.clip])
    for fit, sessions in fitted.items():
        write_trace(sessions, tmp_path / f"{fit}.parquet")  # validates every row


# --------------------------------------------------------------------------- SWE-agent


def test_swe_agent_turns_tokens_and_tool_times(tmp_path: Path) -> None:
    path = write_json(tmp_path / "django__django-11099.traj", django_traj())
    imported = import_swe_agent(path)
    assert imported.has_arrival_times is False and imported.num_fitted == 0
    [session] = imported.sessions
    assert (session.session_id, session.arrival_s) == ("django__django-11099", 0.0)
    assert as_tuples(session.turns) == approx_turns(DJANGO_TURNS)
    assert DJANGO_TURNS[0].output_tokens == 41  # ceil((120 + 4 + 37) / 4)


def test_swe_agent_demonstrations_are_prompt_and_time_defaults_to_zero(tmp_path: Path) -> None:
    [session] = import_swe_agent(write_json(tmp_path / "old.traj", old_traj())).sessions
    assert as_tuples(session.turns) == as_tuples(OLD_TURNS)


def test_swe_agent_directories_and_repeated_names(traj_dir: Path) -> None:
    imported = import_swe_agent([traj_dir])
    assert [s.session_id for s in imported.sessions] == ["django__django-11099", "old", "old-2"]
    assert [s.num_turns for s in imported.sessions] == [3, 2, 2]


def test_swe_agent_chars_per_token_and_cpu_fraction(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.traj", django_traj())
    options = ImportOptions(chars_per_token=2.0, cpu_fraction=0.5)
    first, second, third = import_swe_agent(path, options).sessions[0].turns
    assert (first.new_tokens, second.new_tokens, third.new_tokens) == (601, 500, 25 + 15)
    assert (first.tool_cpu_s, first.tool_wait_s) == pytest.approx((0.2, 0.2))


def test_swe_agent_window_fit(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.traj", django_traj())
    imported = import_swe_agent(path, ImportOptions(max_context_tokens=400, fit=Fit.clip))
    assert imported.num_fitted == 1
    assert [t.new_tokens for t in imported.sessions[0].turns] == [301]


def test_swe_agent_round_trips_through_the_schema(traj_dir: Path, tmp_path: Path) -> None:
    sessions = import_swe_agent(traj_dir).sessions
    write_trace(sessions, tmp_path / "t.parquet")
    assert read_trace(tmp_path / "t.parquet") == sessions


def corrupt(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = django_traj()
    change(data)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (corrupt(lambda d: d["history"][2].pop("role")), "field 'history[2].role': missing"),
        (corrupt(lambda d: d["history"][3].pop("content")), "field 'history[3].content': missing"),
        (
            corrupt(lambda d: d["history"][1].update(content=5)),
            "field 'history[1].content': must be a string or a list of parts, got a number",
        ),
        (
            corrupt(lambda d: d["trajectory"][1].update(execution_time=-1.5)),
            "field 'trajectory[1].execution_time': must be a finite number >= 0, got -1.5",
        ),
        (
            corrupt(lambda d: d["trajectory"][0].update(execution_time="0.4")),
            "field 'trajectory[0].execution_time': must be a number, got a string '0.4'",
        ),
        (corrupt(lambda d: d.pop("history")), "field 'history': missing"),
        (corrupt(lambda d: d.update(trajectory={})), "field 'trajectory': must be a list"),
        (
            corrupt(lambda d: d.update(trajectory=d["trajectory"][:1])),
            "field 'trajectory': has 1 steps but 'history' has 3 LLM calls",
        ),
        (
            corrupt(lambda d: d.update(history=d["history"][:2])),
            "field 'history': has no assistant message",
        ),
        (
            corrupt(lambda d: d["history"].__setitem__(4, "hi")),
            "'history[4]': expected a JSON object",
        ),
        ({"attempts": [], "info": {}}, "a retry-agent trajectory"),
        ([1, 2], "expected a JSON object, got a list"),
    ],
)
def test_swe_agent_errors_name_the_file_and_field(tmp_path: Path, data: Any, message: str) -> None:
    path = write_json(tmp_path / "bad.traj", data)
    with pytest.raises(TraceError, match=r"bad\.traj") as info:
        import_swe_agent(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_swe_agent_unreadable_inputs(tmp_path: Path) -> None:
    (tmp_path / "broken.traj").write_text('{"history": [\n  {"role": "user",}\n]}')
    with pytest.raises(TraceError, match=r"broken\.traj: not valid JSON \(.* at line 2, column"):
        import_swe_agent(tmp_path / "broken.traj")
    with pytest.raises(TraceError, match=r"missing\.traj: no such file"):
        import_swe_agent(tmp_path / "missing.traj")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match=r"empty: no \*\.traj files in this directory"):
        import_swe_agent(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no input files"):
        import_swe_agent([])


# --------------------------------------------------------------------------- TraceLab


def test_tracelab_sessions_turns_and_arrivals(tracelab_file: Path) -> None:
    imported = import_tracelab(tracelab_file)
    assert imported.has_arrival_times is True and imported.num_fitted == 0
    # Arrival = the session's earliest timestamp, relative to the earliest session.
    arrivals = [(s.session_id, s.arrival_s) for s in imported.sessions]
    assert arrivals == [
        ("claude:a", 0.0),
        ("c", pytest.approx(30.0)),
        ("codex:b", pytest.approx(60.0)),
    ]
    for session in imported.sessions:
        assert as_tuples(session.turns) == approx_turns(TRACELAB_SESSIONS[session.session_id])
    # The schema's prompt for each turn is the round's real input length.
    session_a = imported.sessions[0]
    assert [session_a.prompt_tokens(i) for i in range(3)] == [32272, 35740, 38592]


def test_tracelab_aliases_and_file_order(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "flat.jsonl", [
        {"session": 7, "cached_tokens": 0, "appended_tokens": 400, "completion_tokens": 30,
         "tool_time_s": 15.0, "tool_name": "Bash"},
        {"session": 7, "cached_tokens": 420, "appended_tokens": 100, "completion_tokens": 40,
         "tool_time_ms": 2500, "tool_name": "Read"},
        {"session": 7, "prompt_tokens": 700, "completion_tokens": 5},
    ])  # fmt: skip
    imported = import_tracelab(path, ImportOptions(cpu_fraction=0.4))
    assert imported.has_arrival_times is False
    [session] = imported.sessions
    assert session.session_id == "7" and session.arrival_s == 0.0
    assert as_tuples(session.turns) == approx_turns(
        (Turn(400, 30, 15.0, 0.0, "Bash"), Turn(520 - 400 - 30, 40, 1.0, 1.5, "Read"),
         Turn(700 - 520 - 40, 5))
    )  # fmt: skip


def test_tracelab_session_starts_at_its_earliest_time(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "times.jsonl", [
        {"session_id": "x", "round_index": 0, "input_tokens_total": 9, "output_tokens": 1,
         "timestamp": 100.0},
        {"session_id": "y", "round_index": 0, "input_tokens_total": 9, "output_tokens": 1,
         "timestamp": "1970-01-01T00:01:35+00:00"},
        {"session_id": "x", "round_index": 1, "input_tokens_total": 12, "output_tokens": 1,
         "timestamp": 90.0},  # a skewed clock: the session still starts at its earliest time
    ])  # fmt: skip
    imported = import_tracelab(path)
    assert [(s.session_id, s.arrival_s) for s in imported.sessions] == [("x", 0.0), ("y", 5.0)]


def test_tracelab_gzip_directory_and_missing_times(tmp_path: Path) -> None:
    folder = tmp_path / "release"
    folder.mkdir()
    with gzip.open(folder / "part1.jsonl.gz", "wt") as out:
        out.writelines(json.dumps(r) + "\n" for r in TRACELAB_RECORDS[:3])
    write_jsonl(folder / "part2.jsonl", [*TRACELAB_RECORDS[3:], {
        "session_id": "d", "input_tokens_total": 10, "output_tokens": 1}])  # fmt: skip
    imported = import_tracelab(folder)
    # Session d has no time, so no session keeps one; sessions stay in order of appearance.
    assert imported.has_arrival_times is False
    assert [s.session_id for s in imported.sessions] == ["claude:a", "codex:b", "c", "d"]
    assert all(s.arrival_s == 0.0 for s in imported.sessions)
    assert as_tuples(imported.sessions[0].turns) == approx_turns(TRACELAB_SESSIONS["claude:a"])


def test_tracelab_round_trips_through_the_schema(tracelab_file: Path, tmp_path: Path) -> None:
    sessions = import_tracelab(tracelab_file).sessions
    write_trace(sessions, tmp_path / "t.parquet")
    assert read_trace(tmp_path / "t.parquet") == sessions


def test_tracelab_window_fit_scales(tracelab_file: Path) -> None:
    imported = import_tracelab(tracelab_file, ImportOptions(max_context_tokens=20_000))
    assert imported.num_fitted == 1  # claude:a holds 38,593 tokens
    session_a = imported.sessions[0]
    assert session_a.num_turns == 3 and session_a.max_context_tokens <= 20_000
    assert session_a.turns[1].tool_cpu_s == 45.0


def record_with(**changes: Any) -> dict[str, Any]:
    record = {"session_id": "s", "round_index": 0, "input_tokens_total": 100, "output_tokens": 10,
              "tools": [tool("Bash", 100)], "timestamp": 1_780_000_000.0}  # fmt: skip
    record.update(changes)
    return {k: v for k, v in record.items() if v is not ...}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (record_with(output_tokens=...), "'output_tokens': missing (or 'completion_tokens')"),
        (record_with(output_tokens="12"), "'output_tokens': must be a number, got a string '12'"),
        (record_with(output_tokens=-3), "'output_tokens': must be a finite number >= 0, got -3"),
        (record_with(session_id=...), "'session_id': missing (or 'session', 'conversation_id')"),
        (record_with(session_id=[1]), "'session_id': must be a string, got a list"),
        (record_with(round_index=1.5), "'round_index': must be a whole number, got 1.5"),
        (
            record_with(input_tokens_total=...),
            "'input_tokens_total': missing (or 'prefix_tokens' + 'newly_append_tokens')",
        ),
        (
            record_with(input_tokens_total=..., prefix_tokens=5),
            "'newly_append_tokens': missing (or 'appended_tokens')",
        ),
        (
            record_with(tools=[tool("Bash", -5)]),
            "'tools[0].tool_wall_latency_ms': must be a finite number >= 0, got -5",
        ),
        (record_with(tools=[3]), "'tools[0]': expected a JSON object, got a number"),
        (record_with(tool_time_s=float("inf")), "'tool_time_s': must be a finite number >= 0"),
        (record_with(timestamp="yesterday"), "'timestamp': must be epoch seconds or an ISO 8601"),
        (
            record_with(timestamp=..., timing_events=[{"timestamp": "noon"}]),
            "'timing_events[0].timestamp': must be epoch seconds",
        ),
    ],
)
def test_tracelab_errors_name_the_line_and_field(
    tmp_path: Path, record: dict[str, Any], message: str
) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [record_with(), record])
    with pytest.raises(TraceError) as info:
        import_tracelab(path)
    assert str(info.value).startswith(f"{path}: line 2, field {message}")


def test_tracelab_unreadable_inputs(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(record_with()) + "\n\n" + '{"session_id": "s",\n')
    with pytest.raises(TraceError, match=r"t\.jsonl: line 3: not valid JSON \(.* at column"):
        import_tracelab(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(TraceError, match=r"t\.jsonl: line 1: expected a JSON object, got a list"):
        import_tracelab(path)
    path.write_text("\n")
    with pytest.raises(TraceError, match=r"t\.jsonl: no sessions found"):
        import_tracelab(path)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(TraceError, match=r"bad\.jsonl\.gz: cannot read"):
        import_tracelab(tmp_path / "bad.jsonl.gz")
    with pytest.raises(TraceError, match=r"nope\.jsonl: no such file"):
        import_tracelab(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- mini-swe-agent

# ../shared/traces: the public Gemini 3 Pro run (not copied into the repository).
SHARED_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
CALL_LOG = SHARED_TRACES / "minisweagent-gemini3pro-swebench-verified.calls.jsonl.gz"
RAW_SAMPLES = SHARED_TRACES / "minisweagent-samples"


@pytest.fixture
def shared_traces() -> Path:
    """``../shared/traces``; skip without it (fail under ``MARS_REQUIRE_ALL=1``)."""
    if not (CALL_LOG.is_file() and RAW_SAMPLES.is_dir()):
        reason = f"the mini-swe-agent traces are not in {SHARED_TRACES} (see its README.md)"
        if os.environ.get("MARS_REQUIRE_ALL") == "1":
            pytest.fail(f"MARS_REQUIRE_ALL=1: {reason}")
        pytest.skip(reason)
    return SHARED_TRACES


def reply(command_block: str, created: float, prompt: int, completion: int) -> dict[str, Any]:
    """An assistant message of a raw trajectory, with the provider's response."""
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    response = {"created": created, "usage": usage, "model": "google/gemini-3-pro-preview"}
    return {"role": "assistant", "content": f"THOUGHT: ...\n\n{command_block}",
            "extra": {"response": response}}  # fmt: skip


def mini_traj() -> dict[str, Any]:
    """Four calls at t = 1000, 1010, 1020 and 1021 s, and an assistant message without a
    response (not a call). Generation is 1.5 s + completion / 150 tokens/s by default."""
    submit = "```bash\necho COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && git add -A && git diff\n```"
    return {
        "trajectory_format": "mini-swe-agent-1",
        "instance_id": "astropy__astropy-1",
        "info": {"exit_status": "Submitted", "model_stats": {"api_calls": 4}},
        "messages": [
            {"role": "system", "content": "You are a helpful assistant ..."},
            {"role": "user", "content": "<pr_description> ..."},
            reply("```bash\nls -la\n```", 1000, 1500, 150),
            {"role": "user", "content": "<returncode>0</returncode>"},
            reply("```bash\ncd /testbed && python -m pytest -x\n```", 1010, 2000, 300),
            {"role": "user", "content": "<returncode>1</returncode>"},
            {"role": "assistant", "content": "a hand-written reply", "extra": {}},
            reply("```bash\nls\n```\n```bash\npwd\n```", 1020, 2400, 150),  # two blocks
            {"role": "user", "content": "Please always provide EXACTLY ONE action"},
            reply(submit, 1021, 2500, 600),
            {"role": "user", "content": "diff --git ..."},
        ],
    }


MINI_TURNS = (
    # gap 10 s - (1.5 + 150/150) = 7.5 s of `ls`: 20% CPU.
    Turn(1500, 150, 7.5 * 0.2, 7.5 * 0.8, "ls"),
    # 2000 - 1500 - 150 new; gap 10 s - (1.5 + 300/150) = 6.5 s of pytest: all CPU.
    Turn(350, 300, 6.5, 0.0, "python"),
    # gap 1 s - 2.5 s: clamped to 0; the reply had two blocks, so ran nothing.
    Turn(100, 150, 0.0, 0.0, None),
    # 2500 - 2400 - 150 = -50: floored at 17.
    Turn(17, 600),
)


def logged_call(session: str, index: int, created_s: float, prompt: int, completion: int,
                programs: list[str]) -> dict[str, Any]:  # fmt: skip
    """One line of a call log."""
    return {"session": session, "call": index, "created_s": created_s, "prompt_tokens": prompt,
            "completion_tokens": completion, "cached_tokens": 0, "programs": programs}  # fmt: skip


def mini_log_records() -> list[dict[str, Any]]:
    """The call log of :func:`mini_traj` (calls out of order) and of a later session."""
    name = "astropy__astropy-1"
    return [
        logged_call(name, 1, 1010, 2000, 300, ["python"]),
        logged_call(name, 0, 1000, 1500, 150, ["ls"]),
        logged_call("b", 0, 1100, 1200, 50, ["git"]),
        logged_call(name, 2, 1020, 2400, 150, []),
        logged_call(name, 3, 1021, 2500, 600, ["git", "git"]),
    ]


@pytest.mark.parametrize(
    ("content", "programs", "runs"),
    [
        ("```bash\nls -la\n```", ("ls",), False),
        ("```bash\ncd /testbed && python -m pytest\n```", ("python",), True),
        ("```bash\nnl -ba a.py | sed -n '1,9p'\n```", ("nl", "sed"), False),
        ("```bash\ncat <<'EOF' > x.py\nimport os\nEOF\n```", ("cat",), False),
        ("```bash\necho DONE && git add -A && git diff --cached\n```", ("git", "git"), False),
        ("```bash\n./tests/runtests.py utils_tests\n```", ("./tests/runtests.py",), True),
        ("```bash\nPYTHONPATH=. timeout 60 python3.11 x.py\n```", ("python3.11",), True),
        ("```bash\nsphinx-build -b html doc out\n```", ("sphinx-build",), True),
        ("```bash\na | b | c | d | e\n```", ("a", "b", "c", "d"), False),
        ("```bash\nls\n```\n```bash\npwd\n```", (), False),  # two blocks: nothing runs
        ("no block", (), False),
    ],
)
def test_mini_swe_agent_programs(content: str, programs: tuple[str, ...], runs: bool) -> None:
    assert reply_programs(content) == programs
    assert any(program_runs_code(p) for p in programs) is runs


def test_mini_swe_agent_log_programs_run_code() -> None:
    assert command_programs("cd tests && python3 runtests.py") == ("python3",)
    for program in ("pytest", "/usr/bin/python3", "bin/test", "./run.sh", "PYTHONPATH"):
        assert program_runs_code(program), program
    for program in ("cat", "grep", "ls", "cd", "sed", "git", "/", "print", "Q"):
        assert not program_runs_code(program), program


def test_mini_swe_agent_tool_time_estimate() -> None:
    assert estimate_tool_s(10.0, 150, ImportOptions()) == (7.5, False)
    options = ImportOptions(decode_tokens_per_s=50.0, call_overhead_s=0.0)
    assert estimate_tool_s(10.0, 150, options) == (7.0, False)
    assert estimate_tool_s(2.0, 150, options) == (0.0, True)


def test_mini_swe_agent_raw_trajectories(tmp_path: Path) -> None:
    write_json(tmp_path / "astropy__astropy-1.traj.json", mini_traj())
    later = {"messages": [reply("```bash\ngit status\n```", 1100, 1200, 50)]}
    write_json(tmp_path / "sub" / "b.traj.json", later)
    imported = import_mini_swe_agent(tmp_path)
    assert imported.has_arrival_times is True and imported.num_fitted == 0
    assert (imported.num_clamped_tool_gaps, imported.num_floored_new_tokens) == (1, 1)
    first, second = imported.sessions
    assert (first.session_id, first.arrival_s) == ("astropy__astropy-1", 0.0)
    assert (second.session_id, second.arrival_s) == ("b", 100.0)
    assert as_tuples(first.turns) == approx_turns(MINI_TURNS)
    assert as_tuples(second.turns) == [(1200, 50, 0.0, 0.0, None)]


def test_mini_swe_agent_call_log_matches_the_trajectory(tmp_path: Path) -> None:
    path = tmp_path / "run.calls.jsonl.gz"
    with gzip.open(path, "wt") as out:
        out.writelines(json.dumps(record) + "\n" for record in mini_log_records())
    imported = import_mini_swe_agent(path)
    assert [(s.session_id, s.arrival_s) for s in imported.sessions] == [
        ("astropy__astropy-1", 0.0),
        ("b", 100.0),
    ]
    assert as_tuples(imported.sessions[0].turns) == approx_turns(MINI_TURNS)
    raw = write_json(tmp_path / "astropy__astropy-1.traj.json", mini_traj())
    assert import_mini_swe_agent(raw).sessions[0].turns == imported.sessions[0].turns


def test_mini_swe_agent_options(tmp_path: Path) -> None:
    path = write_json(tmp_path / "a.traj.json", mini_traj())
    options = ImportOptions(decode_tokens_per_s=100.0, call_overhead_s=0.5, min_new_tokens=0,
                            cpu_fraction=0.5, max_context_tokens=2400, fit=Fit.clip)  # fmt: skip
    imported = import_mini_swe_agent(path, options)
    assert imported.num_fitted == 1 and imported.num_floored_new_tokens == 1  # -50 < 0
    first, second = imported.sessions[0].turns  # 1650 + 650 tokens: clipped at 2400
    # The gap of 10 s less 0.5 + 150 / 100 s of generation: 8 s of `ls`, half CPU.
    assert (first.tool_cpu_s, first.tool_wait_s) == pytest.approx((4.0, 4.0))
    assert second == Turn(350, 300)


def mini_with(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = mini_traj()
    change(data)
    return data


def response_of(data: dict[str, Any], index: int) -> dict[str, Any]:
    response: dict[str, Any] = data["messages"][index]["extra"]["response"]
    return response


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            mini_with(lambda d: response_of(d, 2).pop("created")),
            "field 'messages[2].extra.response.created': missing",
        ),
        (
            mini_with(lambda d: response_of(d, 4)["usage"].update(prompt_tokens=-5)),
            "field 'messages[4].extra.response.usage.prompt_tokens': must be a finite number"
            " >= 0, got -5",
        ),
        (
            mini_with(lambda d: response_of(d, 7)["usage"].update(completion_tokens=1.5)),
            "field 'messages[7].extra.response.usage.completion_tokens': must be a whole number",
        ),
        (
            mini_with(lambda d: response_of(d, 2).pop("usage")),
            "field 'messages[2].extra.response.usage': missing",
        ),
        (
            mini_with(lambda d: d["messages"][2].update(extra="x")),
            "field 'messages[2].extra': expected a JSON object, got a string",
        ),
        (
            mini_with(lambda d: d["messages"][2].update(content=5)),
            "field 'messages[2].content': must be a string or a list of parts",
        ),
        (mini_with(lambda d: d["messages"][3].pop("role")), "field 'messages[3].role': missing"),
        (mini_with(lambda d: d.pop("messages")), "field 'messages': missing"),
        (
            mini_with(lambda d: d.update(trajectory_format="swe-agent")),
            "field 'trajectory_format': must be 'mini-swe-agent-1', got 'swe-agent'",
        ),
        (
            mini_with(lambda d: d.update(messages=d["messages"][:2])),
            "field 'messages': has no assistant message with 'extra.response'",
        ),
        ([1, 2], "expected a JSON object, got a list"),
    ],
)
def test_mini_swe_agent_errors_name_the_file_and_field(
    tmp_path: Path, data: Any, message: str
) -> None:
    path = write_json(tmp_path / "bad.traj.json", data)
    with pytest.raises(TraceError) as info:
        import_mini_swe_agent(path)
    assert str(info.value).startswith(f"{path}")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"created_s": ...}, "field 'created_s': missing"),
        ({"created_s": "noon"}, "field 'created_s': must be a number, got a string 'noon'"),
        ({"session": ...}, "field 'session': missing"),
        ({"prompt_tokens": -1}, "field 'prompt_tokens': must be a finite number >= 0, got -1"),
        ({"programs": "ls"}, "field 'programs': must be a list of strings, got 'ls'"),
        ({"call": 1}, "field 'call': repeats call 1 of session 'astropy__astropy-1'"),
    ],
)
def test_mini_swe_agent_log_errors_name_the_line_and_field(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    first, *_ = mini_log_records()
    bad = {k: v for k, v in {**first, "call": 0, **change}.items() if v is not ...}
    path = write_jsonl(tmp_path / "calls.jsonl", [first, bad])
    with pytest.raises(TraceError) as info:
        import_mini_swe_agent(path)
    assert str(info.value).startswith(f"{path}: line 2, {message}")


def test_mini_swe_agent_unreadable_inputs(tmp_path: Path) -> None:
    (tmp_path / "broken.traj.json").write_text('{"messages": [\n  {"role": "user",}\n]}')
    with pytest.raises(TraceError, match=r"broken\.traj\.json: not valid JSON \(.* line 2"):
        import_mini_swe_agent(tmp_path / "broken.traj.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match=r"empty: no \*\.traj\.json or \*\.jsonl or"):
        import_mini_swe_agent(tmp_path / "empty")
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(TraceError, match=r"blank\.jsonl: no sessions found"):
        import_mini_swe_agent(tmp_path / "blank.jsonl")


def assistant_calls(path: Path) -> int:
    """Assistant messages with a provider response in a raw trajectory."""
    messages = json.loads(path.read_text())["messages"]
    return sum(m["role"] == "assistant" and "response" in m.get("extra", {}) for m in messages)


def test_mini_swe_agent_imports_the_raw_samples(shared_traces: Path) -> None:
    files = sorted((shared_traces / "minisweagent-samples").glob("*.traj.json"))
    assert len(files) == 5
    imported = import_mini_swe_agent(files)
    by_id = {session.session_id: session for session in imported.sessions}
    for path in files:
        session = by_id[path.name.removesuffix(".traj.json")]
        assert session.num_turns == assistant_calls(path)
        assert all(t.new_tokens > 0 and t.output_tokens > 0 for t in session.turns)
        assert all(t.tool_cpu_s >= 0 and t.tool_wait_s >= 0 for t in session.turns)
        assert sum(t.tool_s for t in session.turns) > 0
    assert min(s.arrival_s for s in imported.sessions) == 0.0
    # The same run's call log yields the same sessions.
    logged = {s.session_id: s for s in import_mini_swe_agent(CALL_LOG).sessions}
    assert all(logged[sid].turns == session.turns for sid, session in by_id.items())


def test_mini_swe_agent_imports_the_call_log(shared_traces: Path) -> None:
    imported = import_mini_swe_agent(shared_traces / CALL_LOG.name)
    sessions = imported.sessions
    assert (len(sessions), sum(s.num_turns for s in sessions)) == (500, 20_163)
    assert imported.has_arrival_times is True and imported.num_fitted == 0
    # The figures docs/workloads.md quotes, with the default estimates.
    assert (imported.num_clamped_tool_gaps, imported.num_floored_new_tokens) == (381, 1_292)
    assert sessions[0].arrival_s == 0.0 and sessions[-1].arrival_s == pytest.approx(6220.0)
    turns = [turn for session in sessions for turn in session.turns]
    assert all(t.tool_cpu_s >= 0 and t.tool_wait_s >= 0 for t in turns)
    assert all(t.new_tokens > 0 and t.output_tokens > 0 for t in turns)
    assert all(s.turns[-1].tool_s == 0.0 for s in sessions)


# --------------------------------------------------------------------------- cli


def test_cli_imports_swe_agent_with_poisson_arrivals(
    traj_dir: Path, tmp_path: Path, trace_cli: Callable[..., Any]
) -> None:
    out = tmp_path / "swe.parquet"
    result = trace_cli("import", "--format", "swe-agent", str(traj_dir), "--out", str(out),
                       "--rate", "2", "--seed", "3", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["arrivals"] == "Poisson at 2 sessions/s"
    assert (summary["num_sessions"], summary["num_turns"], summary["num_fitted"]) == (3, 7, 0)

    inspected = trace_cli("inspect", str(out), "--json")
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.output)["num_turns"] == 7
    expected_s = poisson_arrivals(3, 2.0, np.random.default_rng(np.random.SeedSequence(3)))
    assert [s.arrival_s for s in read_trace(out)] == pytest.approx(expected_s.tolist())

    result = trace_cli("import", "--format", "swe-agent", str(traj_dir), "--out", str(out),
                       "--arrival", "burst")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "arrivals: all at t=0" in result.output and "turns / session" in result.output
    assert {s.arrival_s for s in read_trace(out)} == {0.0}


def test_cli_imports_tracelab_with_its_own_times(
    tracelab_file: Path, tmp_path: Path, trace_cli: Callable[..., Any]
) -> None:
    out = tmp_path / "tl.parquet"
    result = trace_cli("import", "--format", "tracelab", str(tracelab_file), "--out", str(out),
                       "--max-context-tokens", "4000", "--fit", "clip")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote 3 tracelab sessions (4 turns)" in result.output
    assert "arrivals: the trace's own times" in result.output
    assert "1 session clipped to the 4,000-token window" in result.output
    sessions = read_trace(out)
    assert [s.arrival_s for s in sessions] == pytest.approx([0.0, 30.0, 60.0])
    assert max(s.max_context_tokens for s in sessions) <= 4000
    assert trace_cli("inspect", str(out)).exit_code == 0


def test_cli_import_errors(traj_dir: Path, tmp_path: Path, trace_cli: Callable[..., Any]) -> None:
    out = str(tmp_path / "x.parquet")
    result = trace_cli("import", "--format", "swe-agent", str(traj_dir), "--out", out,
                       "--arrival", "trace")  # fmt: skip
    assert isinstance(result.exception, ConfigError)
    assert "carry no session start times" in str(result.exception)
    result = trace_cli("import", "--format", "openhands", str(traj_dir), "--out", out)
    assert isinstance(result.exception, UnknownNameError)
    assert "known: mini-swe-agent, swe-agent, tracelab" in str(result.exception)
    result = trace_cli("import", "--format", "swe-agent", str(traj_dir), "--out", out,
                       "--chars-per-token", "0")  # fmt: skip
    assert isinstance(result.exception, ConfigError)
    assert not Path(out).exists()


def test_console_script_prints_one_line_for_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(record_with()) + "\n" + "{oops\n")
    with pytest.raises(SystemExit) as info:
        cli.main(["trace", "import", "--format", "tracelab", str(path),
                  "--out", str(tmp_path / "x.parquet")])  # fmt: skip
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: line 2: not valid JSON")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_imports_mini_swe_agent(
    shared_traces: Path, tmp_path: Path, trace_cli: Callable[..., Any]
) -> None:
    out = tmp_path / "x.parquet"
    samples = str(shared_traces / "minisweagent-samples")
    result = trace_cli("import", "--format", "mini-swe-agent", samples, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "wrote 5 mini-swe-agent sessions (108 turns)" in result.output
    assert "arrivals: the trace's own times" in result.output
    assert [s.num_turns for s in read_trace(out)] == [18, 21, 24, 18, 27]

    log = str(shared_traces / CALL_LOG.name)
    result = trace_cli("import", "--format", "mini-swe-agent", log, "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["num_sessions"], summary["num_turns"]) == (500, 20_163)
    inspected = trace_cli("inspect", str(out), "--json")
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.output)["num_tool_calls"] == 20_163 - 500
