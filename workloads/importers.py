"""Importers (docs/design.md §7): public agent trajectories as sessions of the trace schema.

Three formats are registered in :data:`IMPORTERS`, each ``importer(paths, options) ->
ImportedTrace``:

- ``swe-agent``: SWE-agent ``.traj`` files, one per session (:func:`import_swe_agent`);
- ``tracelab``: TraceLab's normalized round JSONL, one LLM round per line
  (:func:`import_tracelab`);
- ``mini-swe-agent``: mini-swe-agent ``.traj.json`` trajectories, or a per-call log
  of them (JSONL), with the provider's token counts and times
  (:func:`import_mini_swe_agent`).

The schema is append-only: a turn's prompt is everything before it plus its
``new_tokens``, and its output joins the context. Every importer maps its format
onto that model (the docstrings say how), keeps the tool call after a session's last
turn empty, and, given ``max_context_tokens``, makes every session fit the served
model's window by scaling or clipping it (:func:`fit_session`). Arrival times are the
trace's own where it has them (seconds after the earliest session); otherwise every
session arrives at 0 and the caller picks an arrival process (``arrivals.py``).

Errors in the input raise :class:`TraceError` in one line naming the file, the line
(JSONL) and the field, e.g. ``rounds.jsonl: line 7, field 'output_tokens': must be a
finite number >= 0, got -3`` or ``x.traj, field 'history[4].role': missing``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple, Protocol

from mars_ray.errors import ConfigError, TraceError
from mars_ray.registry import Registry
from mars_ray.session import SessionSpec, Turn

from .generators import LONG_TOOL_S, MIN_CONTEXT_TOKENS

PathLike = str | os.PathLike[str]

# Rule of thumb for English prose under BPE tokenizers (GPT, Llama 3, Qwen); code and
# logs tokenize denser (~3 characters per token), so this slightly undercounts them.
DEFAULT_CHARS_PER_TOKEN = 4.0
# CPU share of a tool call that is not recognised as running code: the generators draw
# it from 5-30% for quick calls (generators.QUICK_TOOL_CPU_FRACTION); 0.2 is an assumption.
DEFAULT_CPU_FRACTION = 0.2
# mini-swe-agent: the provider's time to answer a call is estimated as
# DEFAULT_CALL_OVERHEAD_S + completion_tokens / DEFAULT_DECODE_TOKENS_PER_S. The pair is
# the lower envelope (5th percentile) of the gaps after light commands (cat, grep, ls,
# sed, ...) in the Gemini 3 Pro log, per band of completion tokens: 2 s at 40 tokens,
# 5 s at 570, 9 s at 1,090, 16 s at 2,140, 32 s at 4,780.
DEFAULT_DECODE_TOKENS_PER_S = 150.0
DEFAULT_CALL_OVERHEAD_S = 1.5
# The least a mini-swe-agent turn appends: the observation of a command with no output
# ("<returncode>0</returncode>\n<output>\n</output>") is 17 tokens under Gemini's
# tokenizer, the most common growth between two calls in the log.
DEFAULT_MIN_NEW_TOKENS = 17


class Fit(StrEnum):
    """How a session whose context exceeds the window is made to fit (see :func:`fit_session`)."""

    scale = "scale"
    clip = "clip"


@dataclass(frozen=True)
class ImportOptions:
    """How imported trajectories map onto the schema; validated at construction."""

    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN
    """Characters per token when counting text without a tokenizer (``swe-agent`` only)."""
    max_context_tokens: int | None = None
    """Context window of the served model; ``None`` keeps sessions as they are."""
    fit: Fit = Fit.scale
    """``scale`` or ``clip`` a session longer than ``max_context_tokens``."""
    cpu_fraction: float = DEFAULT_CPU_FRACTION
    """CPU share of a tool call that does not run code (see :func:`split_tool_time`)."""
    decode_tokens_per_s: float = DEFAULT_DECODE_TOKENS_PER_S
    """Provider's decode rate, for the generation time in a gap (``mini-swe-agent`` only)."""
    call_overhead_s: float = DEFAULT_CALL_OVERHEAD_S
    """Provider's fixed time per call (queueing, prefill, network; ``mini-swe-agent``)."""
    min_new_tokens: int = DEFAULT_MIN_NEW_TOKENS
    """Floor of a later turn's ``new_tokens`` (``mini-swe-agent`` only)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.chars_per_token) and self.chars_per_token > 0):
            raise ConfigError(f"chars per token must be > 0, got {self.chars_per_token:g}")
        window = self.max_context_tokens
        if window is not None and window < MIN_CONTEXT_TOKENS:
            raise ConfigError(f"max context tokens must be >= {MIN_CONTEXT_TOKENS}, got {window}")
        if not 0.0 <= self.cpu_fraction <= 1.0:
            raise ConfigError(f"tool CPU fraction must be in [0, 1], got {self.cpu_fraction:g}")
        if self.fit not in tuple(Fit):
            raise ConfigError(f"fit must be one of {', '.join(Fit)}, got {self.fit!r}")
        rate = self.decode_tokens_per_s
        if not (math.isfinite(rate) and rate > 0):
            raise ConfigError(f"decode rate must be > 0 tokens/s, got {rate:g}")
        if not (math.isfinite(self.call_overhead_s) and self.call_overhead_s >= 0):
            raise ConfigError(f"call overhead must be >= 0 s, got {self.call_overhead_s:g}")
        if self.min_new_tokens < 0:
            raise ConfigError(f"min new tokens must be >= 0, got {self.min_new_tokens}")


DEFAULT_IMPORT_OPTIONS = ImportOptions()


class ImportedTrace(NamedTuple):
    """Sessions read from a set of trajectory files."""

    sessions: list[SessionSpec]
    has_arrival_times: bool
    """True when ``arrival_s`` are the trace's own times; else every session arrives at 0."""
    num_fitted: int
    """Sessions scaled or clipped to ``max_context_tokens``."""
    num_clamped_tool_gaps: int = 0
    """Tool times estimated below 0 and clamped to 0 (``mini-swe-agent``)."""
    num_floored_new_tokens: int = 0
    """Turns whose ``new_tokens`` were raised to ``min_new_tokens`` (``mini-swe-agent``)."""


class TraceImporter(Protocol):
    """Reads the files (or directories of them) at ``paths`` as sessions."""

    def __call__(
        self, paths: PathLike | Sequence[PathLike], options: ImportOptions = ...
    ) -> ImportedTrace: ...


IMPORTERS: Registry[TraceImporter] = Registry("trace format")


# --------------------------------------------------------------------------- shared rules


def count_tokens(text: str, chars_per_token: float = DEFAULT_CHARS_PER_TOKEN) -> int:
    """Approximate token count of ``text``: ``ceil(len(text) / chars_per_token)``."""
    return math.ceil(len(text) / chars_per_token)


def split_tool_time(tool_s: float, runs_code: bool, cpu_fraction: float) -> tuple[float, float]:
    """``(tool_cpu_s, tool_wait_s)`` of a tool call lasting ``tool_s``.

    A call that runs code (tests, scripts, builds) is all CPU; any other call (read a
    file, grep, edit, a web fetch) spends ``cpu_fraction`` of its time on the CPU and
    the rest waiting. Neither format records CPU time, so this is the whole model.
    """
    if runs_code:
        return tool_s, 0.0
    cpu_s = tool_s * cpu_fraction
    return cpu_s, tool_s - cpu_s


def fit_session(session: SessionSpec, max_context_tokens: int, fit: Fit) -> SessionSpec:
    """``session`` itself if its context fits ``max_context_tokens``, else a fitted copy.

    ``scale`` multiplies every turn's new and output tokens by ``max_context_tokens /
    context`` (rounding down; outputs and the first prompt stay >= 1 token), keeping
    every turn and tool call and their relative sizes; if those minimums still overflow
    (sessions of more than about half a window of turns), the result is clipped.
    ``clip`` keeps token counts and drops the turns from the first one that would
    overflow, as the generators do (the last kept turn loses its tool call); a first
    turn that alone overflows is shrunk, its output to at most half the window.
    """
    if session.max_context_tokens <= max_context_tokens:
        return session
    if fit == Fit.scale:
        session = _scale(session, max_context_tokens / session.max_context_tokens)
    return _clip(session, max_context_tokens)


def _scale(session: SessionSpec, factor: float) -> SessionSpec:
    turns = tuple(
        replace(
            turn,
            new_tokens=max(1 if i == 0 else 0, math.floor(turn.new_tokens * factor)),
            output_tokens=max(1, math.floor(turn.output_tokens * factor)),
        )
        for i, turn in enumerate(session.turns)
    )
    return replace(session, turns=turns)


def _clip(session: SessionSpec, max_context_tokens: int) -> SessionSpec:
    kept: list[Turn] = []
    context_tokens = 0
    for turn in session.turns:
        size = turn.new_tokens + turn.output_tokens
        if kept and context_tokens + size > max_context_tokens:
            break
        kept.append(turn)
        context_tokens += size
    if context_tokens > max_context_tokens:  # the first turn alone overflows
        output_tokens = min(kept[0].output_tokens, max_context_tokens // 2)
        kept[0] = replace(
            kept[0], new_tokens=max_context_tokens - output_tokens, output_tokens=output_tokens
        )
    last = kept[-1]
    kept[-1] = Turn(last.new_tokens, last.output_tokens)  # no tool call after the end
    return replace(session, turns=tuple(kept))


def _finish(
    sessions: list[SessionSpec],
    has_arrival_times: bool,
    options: ImportOptions,
    label: str,
    estimate_counts: tuple[int, int] = (0, 0),
) -> ImportedTrace:
    """The imported trace, fitted to the window; ``estimate_counts`` are the clamped
    tool gaps and floored ``new_tokens`` of the estimating importers."""
    if not sessions:
        raise TraceError(f"{label}: no sessions found")
    window = options.max_context_tokens
    if window is None:
        return ImportedTrace(sessions, has_arrival_times, 0, *estimate_counts)
    fitted = [fit_session(session, window, options.fit) for session in sessions]
    num_fitted = sum(new is not old for new, old in zip(fitted, sessions, strict=True))
    return ImportedTrace(fitted, has_arrival_times, num_fitted, *estimate_counts)


# --------------------------------------------------------------------------- reading input


def _input_files(paths: PathLike | Sequence[PathLike], patterns: Sequence[str]) -> list[Path]:
    """The files named, with each directory replaced by its files matching ``patterns``."""
    named = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not named:
        raise ConfigError("no input files given")
    files: list[Path] = []
    for path in map(Path, named):
        if path.is_dir():
            found = sorted({f for pattern in patterns for f in path.rglob(pattern) if f.is_file()})
            if not found:
                raise TraceError(f"{path}: no {' or '.join(patterns)} files in this directory")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise TraceError(f"{path}: no such file")
    return files


def _read_json(path: Path) -> object:
    """The JSON document in ``path``, or a :class:`TraceError` naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise TraceError(f"{path}: not valid JSON ({exc.msg} at {where})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read ({exc})") from None


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


class _Fields:
    """A JSON object found at ``where`` (``t.jsonl: line 7``), with typed, named access."""

    def __init__(self, data: object, where: str, prefix: str = "") -> None:
        if not isinstance(data, dict):
            what = f"{where}, field {prefix.rstrip('.')!r}" if prefix else where
            raise TraceError(f"{what}: expected a JSON object, got {_json_type(data)}")
        self.data: dict[str, object] = data
        self.where = where
        self.prefix = prefix  # names nested fields: 'tools[0].tool_name'

    def error(self, name: str, message: str) -> TraceError:
        return TraceError(f"{self.where}, field {self.prefix + name!r}: {message}")

    def find(self, names: Sequence[str]) -> tuple[str, object] | None:
        """The first of ``names`` present with a non-null value, with that value."""
        for name in names:
            value = self.data.get(name)
            if value is not None:
                return name, value
        return None

    def missing(self, names: Sequence[str]) -> TraceError:
        aliases = ", ".join(repr(self.prefix + name) for name in names[1:])
        also = f" (or {aliases})" if aliases else ""
        return self.error(names[0], f"missing{also}")

    def number(self, names: Sequence[str], default: float | None = None) -> float:
        """A finite number >= 0 from the first of ``names`` present (``default`` if none)."""
        found = self.find(names)
        if found is None:
            if default is None:
                raise self.missing(names)
            return default
        name, value = found
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"must be a number, got {_json_type(value)} {value!r}")
        if not math.isfinite(value) or value < 0:
            raise self.error(name, f"must be a finite number >= 0, got {value!r}")
        return float(value)

    def count(self, names: Sequence[str], default: int | None = None) -> int:
        """A whole number >= 0, like :meth:`number`."""
        value = self.number(names, None if default is None else float(default))
        if value != int(value):
            name = next(n for n in names if self.data.get(n) is not None)
            raise self.error(name, f"must be a whole number, got {value!r}")
        return int(value)

    def text(self, names: Sequence[str], default: str | None = None) -> str:
        """A string (an integer is accepted as its decimal text)."""
        found = self.find(names)
        if found is None:
            if default is None:
                raise self.missing(names)
            return default
        name, value = found
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {_json_type(value)}")
        return value

    def object(self, name: str) -> _Fields | None:
        """The object in field ``name`` (``None`` if absent or null), named ``name.`` in errors."""
        value = self.data.get(name)
        return None if value is None else _Fields(value, self.where, f"{self.prefix}{name}.")

    def objects(self, name: str, required: bool = True) -> list[_Fields]:
        """The list of objects in field ``name``, each named ``name[i]`` in errors."""
        value = self.data.get(name)
        if value is None:
            if required:
                raise self.missing([name])
            return []
        if not isinstance(value, list):
            raise self.error(name, f"must be a list, got {_json_type(value)}")
        return [
            _Fields(item, self.where, f"{self.prefix}{name}[{i}].") for i, item in enumerate(value)
        ]


# --------------------------------------------------------------------------- SWE-agent

# First words of shell commands that run code (tests, scripts, builds): such a step's
# whole execution_time is CPU. Anything else (open, edit, find_file, grep, ls, git,
# submit) is a quick call that mostly waits.
CODE_COMMANDS = frozenset(
    {"python", "python3", "pytest", "py.test", "tox", "nox", "make", "cmake", "ctest", "ninja",
     "cargo", "go", "npm", "npx", "yarn", "pnpm", "node", "mvn", "gradle", "java", "javac",
     "gcc", "g++", "clang", "rustc", "ruby", "rake", "php", "bash", "sh", "sphinx-build",
     "pylint", "pyreverse", "mypy", "flake8"}
)  # fmt: skip
_COMMAND_SEPARATORS = re.compile(r"&&|\|\||[;|]")
_PYTHON_VERSION = re.compile(r"^python\d+(\.\d+)?$")


def _command_heads(action: str) -> Iterator[str]:
    """The first word of each command on the action's first line (later lines are the
    body of an edit or a heredoc), past env assignments and wrappers."""
    lines = action.strip().splitlines()
    for command in _COMMAND_SEPARATORS.split(lines[0] if lines else ""):
        words = command.split()
        while words and ("=" in words[0] or words[0] in ("timeout", "time", "env", "sudo")):
            words = words[2:] if words[0] == "timeout" else words[1:]
        if words:
            yield words[0]


def _command_words(action: str) -> Iterator[str]:
    """:func:`_command_heads` without their directories: ``/usr/bin/python3`` is ``python3``."""
    return (head.rsplit("/", 1)[-1] for head in _command_heads(action))


def runs_code(action: str) -> bool:
    """Whether a SWE-agent action runs code, e.g. ``cd /testbed && python -m pytest``."""
    return any(w in CODE_COMMANDS or _PYTHON_VERSION.match(w) for w in _command_words(action))


def _tool_name(action: str) -> str | None:
    """The action's first command, passing over ``cd``: ``cd /testbed && pytest`` is ``pytest``."""
    words = list(_command_words(action))
    return next((word for word in words if word != "cd"), words[0] if words else None)


def _message_text(message: _Fields) -> str:
    """A chat message's text: a string, or the ``text`` of each part of a list."""
    if "content" not in message.data:
        raise message.missing(["content"])
    content = message.data["content"]
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [part.get("text") for part in content if isinstance(part, dict)]
        return "".join(text for text in parts if isinstance(text, str))
    raise message.error(
        "content", f"must be a string or a list of parts, got {_json_type(content)}"
    )


def _tool_call_text(message: _Fields) -> str:
    """Name and arguments of each function call an assistant message makes."""
    texts = []
    for call in message.objects("tool_calls", required=False):
        function = call.data.get("function")
        if isinstance(function, dict):
            arguments = function.get("arguments", "")
            texts.append(str(function.get("name", "")))
            texts.append(arguments if isinstance(arguments, str) else json.dumps(arguments))
    return "".join(texts)


class _Call(NamedTuple):
    new_tokens: int
    output_tokens: int


def _swe_agent_calls(history: list[_Fields], chars_per_token: float) -> list[_Call]:
    """One call per assistant message (demonstrations excepted): the tokens of the
    messages since the previous call, and of the response."""
    calls: list[_Call] = []
    pending_tokens = 0
    for message in history:
        role = message.text(["role"])
        text = _message_text(message)
        if role == "assistant" and message.data.get("is_demo") is not True:
            response = text + _tool_call_text(message)
            new_tokens = max(1, pending_tokens) if not calls else pending_tokens
            calls.append(_Call(new_tokens, max(1, count_tokens(response, chars_per_token))))
            pending_tokens = 0
        else:
            pending_tokens += count_tokens(text, chars_per_token)
    return calls


def _swe_agent_session(path: Path, session_id: str, options: ImportOptions) -> SessionSpec:
    root = _Fields(_read_json(path), str(path))
    if "attempts" in root.data and "history" not in root.data:
        raise TraceError(
            f"{path}: a retry-agent trajectory ('attempts'); import each attempt's .traj"
        )
    history = root.objects("history")
    steps = root.objects("trajectory")
    calls = _swe_agent_calls(history, options.chars_per_token)
    if not calls:
        raise root.error("history", "has no assistant message (no LLM call)")
    if len(steps) < len(calls) - 1:
        raise root.error(
            "trajectory",
            f"has {len(steps)} steps but 'history' has {len(calls)} LLM calls;"
            " every call but the last needs its step",
        )
    turns = [
        _swe_agent_turn(call, step, options) for call, step in zip(calls[:-1], steps, strict=False)
    ]
    last = calls[-1]
    turns.append(Turn(last.new_tokens, last.output_tokens))
    return SessionSpec(session_id, 0.0, tuple(turns))


def _swe_agent_turn(call: _Call, step: _Fields, options: ImportOptions) -> Turn:
    action = step.text(["action"], default="")
    tool_s = step.number(["execution_time"], default=0.0)
    cpu_s, wait_s = split_tool_time(tool_s, runs_code(action), options.cpu_fraction)
    return Turn(call.new_tokens, call.output_tokens, cpu_s, wait_s, _tool_name(action))


def _unique_ids(names: Sequence[str]) -> list[str]:
    """``names`` with repeats suffixed ``-2``, ``-3``, ... in order."""
    seen: dict[str, int] = {}
    ids = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        ids.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return ids


@IMPORTERS.register("swe-agent")
def import_swe_agent(
    paths: PathLike | Sequence[PathLike], options: ImportOptions = DEFAULT_IMPORT_OPTIONS
) -> ImportedTrace:
    """Import SWE-agent trajectories: each ``.traj`` file (directories are searched for
    them) is one session named after the file (``django__django-11099``; a repeated
    name gets ``-2``, ``-3``, ...).

    Read from the file's JSON object (SWE-agent 0.x and 1.x write these fields):

    - ``history``: the chat messages in order (``role``, ``content``: a string or a
      list of ``{"text": ...}`` parts). Each ``assistant`` message is one LLM call and
      one turn; messages with ``"is_demo": true`` (demonstrations) count as prompt.
      A turn's ``new_tokens`` are the tokens of the messages since the previous call
      (the first turn: system prompt, demonstrations and task), its ``output_tokens``
      those of the response (``content`` plus any ``tool_calls`` name and arguments),
      at least 1.
    - ``trajectory``: step ``i`` is the action after call ``i``: ``execution_time``
      (seconds; absent before SWE-agent 1.0, then 0) is the tool time after turn
      ``i``, split by :func:`split_tool_time` with :func:`runs_code` of its ``action``,
      whose first word is the ``tool_name``. The step after the last call (usually
      ``submit``) is dropped.

    Tokens are ``ceil(characters / options.chars_per_token)``, without chat-template
    overhead. The context is append-only: history processors that elide old
    observations from later prompts are not modelled. ``info.model_stats`` (totals
    over calls, including retries) is not used. The files carry no start times, so
    every session arrives at 0.
    """
    files = _input_files(paths, ["*.traj"])
    ids = _unique_ids([path.stem for path in files])
    sessions = [
        _swe_agent_session(path, id_, options) for path, id_ in zip(files, ids, strict=True)
    ]
    return _finish(sessions, False, options, ", ".join(map(str, files)))


# --------------------------------------------------------------------------- TraceLab

# Accepted field names, TraceLab's own first; the first one present (and not null) wins.
SESSION_FIELDS = ("session_id", "session", "conversation_id")
ROUND_FIELDS = ("round_index", "round", "turn_index")
TOTAL_INPUT_FIELDS = ("input_tokens_total", "prompt_tokens")
CACHED_FIELDS = ("prefix_tokens", "cached_tokens")
APPENDED_FIELDS = ("newly_append_tokens", "appended_tokens")
OUTPUT_FIELDS = ("output_tokens", "completion_tokens")
TOOL_S_FIELDS = ("tool_time_s", "tool_s")
TOOL_MS_FIELDS = ("tool_time_ms",)
TOOL_LATENCY_MS_FIELDS = ("tool_internal_latency_ms", "tool_wall_latency_ms", "latency_ms")
TOOL_NAME_FIELDS = ("tool_name", "name")
TIMESTAMP_FIELDS = ("timestamp", "start_time", "created_at")
# Shell tools of Claude Code and Codex; a call of at least LONG_TOOL_S through one of them
# is taken for a test run or build and counted as CPU (generators.py uses the same cut).
SHELL_TOOL_NAMES = frozenset({"bash", "shell", "exec_command", "local_shell", "container.exec"})


class _ToolCall(NamedTuple):
    name: str | None
    tool_s: float


class _Round(NamedTuple):
    session_id: str
    order: tuple[int, int]  # (round index, position in the input): the order in the session
    input_tokens: int
    output_tokens: int
    tool_calls: list[_ToolCall]
    start_s: float | None  # epoch seconds


def _parse_time(fields: _Fields, name: str, value: object) -> float:
    """Epoch seconds from a number or an ISO 8601 string (UTC unless it says otherwise)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    raise fields.error(name, f"must be epoch seconds or an ISO 8601 time, got {value!r}")


def _round_start_s(record: _Fields) -> float | None:
    """The round's own timestamp, else its earliest ``timing_events`` timestamp."""
    found = record.find(TIMESTAMP_FIELDS)
    if found is not None:
        return _parse_time(record, *found)
    events = record.objects("timing_events", required=False)
    times = [
        _parse_time(event, "timestamp", event.data["timestamp"])
        for event in events
        if event.data.get("timestamp") is not None
    ]
    return min(times, default=None)


def _round_input_tokens(record: _Fields) -> int:
    if record.find(TOTAL_INPUT_FIELDS) is not None:
        return record.count(TOTAL_INPUT_FIELDS)
    if record.find(CACHED_FIELDS) is None and record.find(APPENDED_FIELDS) is None:
        alternatives = f"{CACHED_FIELDS[0]!r} + {APPENDED_FIELDS[0]!r}"
        raise record.error(TOTAL_INPUT_FIELDS[0], f"missing (or {alternatives})")
    return record.count(CACHED_FIELDS) + record.count(APPENDED_FIELDS)


def _round_tool_calls(record: _Fields) -> list[_ToolCall]:
    name = record.text(TOOL_NAME_FIELDS, default="") or None
    if record.find(TOOL_S_FIELDS) is not None:
        return [_ToolCall(name, record.number(TOOL_S_FIELDS))]
    if record.find(TOOL_MS_FIELDS) is not None:
        return [_ToolCall(name, record.number(TOOL_MS_FIELDS) / 1000)]
    tools = record.objects("tools", required=False)
    return [
        _ToolCall(
            tool.text(TOOL_NAME_FIELDS, default="") or None,
            tool.number(TOOL_LATENCY_MS_FIELDS, default=0.0) / 1000,
        )
        for tool in tools
    ]


def _tracelab_round(record: _Fields, position: int) -> _Round:
    return _Round(
        session_id=record.text(SESSION_FIELDS),
        order=(record.count(ROUND_FIELDS, default=position), position),
        input_tokens=_round_input_tokens(record),
        output_tokens=record.count(OUTPUT_FIELDS),
        tool_calls=_round_tool_calls(record),
        start_s=_round_start_s(record),
    )


def _jsonl_records(path: Path) -> Iterator[_Fields]:
    """Each non-blank line of a JSONL file (gzipped if it ends in ``.gz``) as an object."""
    opened = gzip.open if path.suffix == ".gz" else open
    try:
        with opened(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path}: line {number}"
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    message = f"{exc.msg} at column {exc.colno}"
                    raise TraceError(f"{where}: not valid JSON ({message})") from None
                yield _Fields(data, where)
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise TraceError(f"{path}: cannot read ({exc})") from None


def _tool_turn_fields(
    calls: list[_ToolCall], cpu_fraction: float
) -> tuple[float, float, str | None]:
    """CPU seconds, waiting seconds and name (the longest call's) of a round's tool calls,
    run one after the other."""
    cpu_s = wait_s = 0.0
    for call in calls:
        is_shell = (call.name or "").lower() in SHELL_TOOL_NAMES
        call_cpu_s, call_wait_s = split_tool_time(
            call.tool_s, is_shell and call.tool_s >= LONG_TOOL_S, cpu_fraction
        )
        cpu_s += call_cpu_s
        wait_s += call_wait_s
    longest = max(calls, key=lambda call: call.tool_s, default=None)
    return cpu_s, wait_s, longest.name if longest else None


def _tracelab_session(session_id: str, rounds: list[_Round], cpu_fraction: float) -> SessionSpec:
    turns = []
    for i, round_ in enumerate(rounds):
        if i == 0:
            new_tokens = max(1, round_.input_tokens)
        else:
            # The context grew by the previous output and by what came after it.
            previous = rounds[i - 1]
            grown = round_.input_tokens - previous.input_tokens - previous.output_tokens
            new_tokens = max(0, grown)
        output_tokens = max(1, round_.output_tokens)
        if i == len(rounds) - 1:
            turns.append(Turn(new_tokens, output_tokens))
        else:
            tool = _tool_turn_fields(round_.tool_calls, cpu_fraction)
            turns.append(Turn(new_tokens, output_tokens, *tool))
    return SessionSpec(session_id, 0.0, tuple(turns))


@IMPORTERS.register("tracelab")
def import_tracelab(
    paths: PathLike | Sequence[PathLike], options: ImportOptions = DEFAULT_IMPORT_OPTIONS
) -> ImportedTrace:
    """Import TraceLab round traces (UW SyFI lab's Claude Code / Codex dataset).

    Input: JSONL files (``.jsonl``, or gzipped ``.jsonl.gz`` like the released
    ``syfi_coding_trace.jsonl.gz``; directories are searched for both), one JSON
    object per line and LLM round. Fields, TraceLab's normalized names first, then the
    aliases accepted (the first present and not null wins):

    - session: ``session_id`` | ``session`` | ``conversation_id`` (string or integer);
    - order: ``round_index`` | ``round`` | ``turn_index`` (optional; else file order;
      ties keep file order);
    - input: ``input_tokens_total`` | ``prompt_tokens`` (the whole prompt), else
      ``prefix_tokens`` | ``cached_tokens`` plus ``newly_append_tokens`` |
      ``appended_tokens``;
    - output: ``output_tokens`` | ``completion_tokens`` (0 is read as 1);
    - tools run after the round: ``tool_time_s`` | ``tool_s`` (seconds) or
      ``tool_time_ms``, with an optional ``tool_name``; else the ``tools`` list, each
      call ``tool_internal_latency_ms`` | ``tool_wall_latency_ms`` | ``latency_ms``
      (null or absent: 0) and ``tool_name`` | ``name``;
    - time: ``timestamp`` | ``start_time`` | ``created_at`` (epoch seconds or ISO 8601),
      else the earliest ``timing_events[].timestamp`` (optional).

    Mapping: rounds group into sessions by id (in order of first appearance) and turns
    by order. Turn 0's ``new_tokens`` is its whole input; turn k's is
    ``input(k) - input(k-1) - output(k-1)`` (clamped at 0), the growth of the context
    beyond the previous output, so that turn k's prompt in the schema is its real input
    length while the context only grows. Compaction or dropped reasoning shrink the real
    context; the schema cannot, so such sessions grow longer than they were (the window
    fit then applies). The provider's cache split is not used: the serving system under
    test decides what it has cached. A round's tool calls are taken as sequential: their
    times add up; a shell call (``SHELL_TOOL_NAMES``) of at least ``LONG_TOOL_S`` is all
    CPU, any other call ``options.cpu_fraction`` CPU; ``tool_name`` is the longest call's.
    Human idle time between requests is not represented. A session arrives at its
    earliest time, relative to the earliest session; if any session has no time, none
    has (``has_arrival_times`` is False and all arrive at 0).
    """
    files = _input_files(paths, ["*.jsonl", "*.jsonl.gz"])
    rounds: dict[str, list[_Round]] = {}
    position = 0
    for path in files:
        for record in _jsonl_records(path):
            round_ = _tracelab_round(record, position)
            rounds.setdefault(round_.session_id, []).append(round_)
            position += 1
    sessions, starts_s = [], []
    for session_id, session_rounds in rounds.items():
        session_rounds.sort(key=lambda r: r.order)
        sessions.append(_tracelab_session(session_id, session_rounds, options.cpu_fraction))
        known_starts_s = [r.start_s for r in session_rounds if r.start_s is not None]
        starts_s.append(min(known_starts_s, default=None))
    has_times = bool(starts_s) and all(start is not None for start in starts_s)
    if has_times:
        origin_s = min(s for s in starts_s if s is not None)
        sessions = [
            session.with_arrival(start_s - origin_s)
            for session, start_s in zip(sessions, starts_s, strict=True)
            if start_s is not None
        ]
        sessions.sort(key=lambda session: session.arrival_s)
    return _finish(sessions, has_times, options, ", ".join(map(str, files)))


# --------------------------------------------------------------------------- mini-swe-agent

MINI_SWE_AGENT_FORMAT = "mini-swe-agent-1"
# Program names the call log leaves out, and so does the raw reader: shell built-ins that
# only set the scene (``cd /testbed && pytest`` runs ``pytest``).
SKIPPED_PROGRAMS = frozenset({"cd", "echo"})
MAX_PROGRAMS = 4
# A program named by a path or a script file runs project code: ``./tests/runtests.py``,
# ``bin/test``, ``./run.sh``.
SCRIPT_SUFFIXES = (".py", ".sh")
# The log keeps an env assignment's name instead of its program (``PYTHONPATH=. python
# x.py`` is logged as ``PYTHONPATH``); a Python variable implies a Python run.
_PYTHON_ENV = re.compile(r"^PYTHON[A-Z_]*$")
# mini-swe-agent's own action regex: the reply must hold exactly one such block.
_BASH_BLOCK = re.compile(r"```bash\s*\n(.*?)\n```", re.DOTALL)
LOG_SUFFIXES = (".jsonl", ".jsonl.gz")


class _LlmCall(NamedTuple):
    """One LLM call of a mini-swe-agent session, in either input."""

    created_s: float  # the provider's ``created`` time, epoch seconds
    prompt_tokens: int
    completion_tokens: int
    programs: tuple[str, ...]  # of the command the reply ran (the tool call after it)


class _Estimates(NamedTuple):
    """A session built from estimates, and how often an estimate was cut."""

    session: SessionSpec  # arrival_s: epoch seconds of the first call, re-based later
    num_clamped_tool_gaps: int
    num_floored_new_tokens: int


def command_programs(command: str) -> tuple[str, ...]:
    """Programs a bash command runs, as the call log records them: the first word of
    each command on its first line (:func:`_command_heads`), without ``cd`` and
    ``echo``, at most four: ``cd /testbed && python -m pytest`` is ``("python",)``."""
    heads = (head for head in _command_heads(command) if head not in SKIPPED_PROGRAMS)
    return tuple(heads)[:MAX_PROGRAMS]


def reply_programs(content: str) -> tuple[str, ...]:
    """Programs of the one ```` ```bash ```` block of a reply; none unless there is
    exactly one (mini-swe-agent then runs nothing and answers with a format error)."""
    blocks = _BASH_BLOCK.findall(content)
    return command_programs(blocks[0]) if len(blocks) == 1 else ()


def program_runs_code(program: str) -> bool:
    """Whether a program runs code (tests, scripts, builds) rather than a light command
    (``cat``, ``grep``, ``ls``, ``sed``, ``git``): an interpreter, test runner or build
    tool (:data:`CODE_COMMANDS`, ``python3.11``), a script (``*.py``, ``*.sh``), a
    relative path (``./tests/runtests.py``, ``bin/test``), or a ``PYTHON*`` variable."""
    name = program.rsplit("/", 1)[-1]
    is_relative_path = "/" in program and not program.startswith("/") and bool(name)
    return (
        name in CODE_COMMANDS
        or bool(_PYTHON_VERSION.match(name) or _PYTHON_ENV.match(name))
        or name.endswith(SCRIPT_SUFFIXES)
        or is_relative_path
    )


def estimate_tool_s(
    gap_s: float, completion_tokens: int, options: ImportOptions
) -> tuple[float, bool]:
    """The tool time within ``gap_s``, the time from one call's ``created`` to the next's,
    and whether the estimate was clamped.

    The gap holds the provider's answer and then the tool call; the answer is taken to
    last ``options.call_overhead_s + completion_tokens / options.decode_tokens_per_s``
    (completion tokens include hidden reasoning). The rest is the tool's, clamped at 0
    when the answer came faster than that (``True`` is returned then).
    """
    generation_s = options.call_overhead_s + completion_tokens / options.decode_tokens_per_s
    tool_s = gap_s - generation_s
    return max(0.0, tool_s), tool_s < 0


def _new_tokens(calls: Sequence[_LlmCall], i: int, min_new_tokens: int) -> tuple[int, bool]:
    """Turn ``i``'s ``new_tokens`` and whether the floor raised it: the first prompt
    (at least 1), else the prompt's growth beyond the previous prompt and output."""
    if i == 0:
        return max(1, calls[0].prompt_tokens), False
    previous = calls[i - 1]
    grown = calls[i].prompt_tokens - previous.prompt_tokens - previous.completion_tokens
    return max(min_new_tokens, grown), grown < min_new_tokens


def _mini_swe_agent_session(
    session_id: str, calls: Sequence[_LlmCall], options: ImportOptions
) -> _Estimates:
    turns = []
    num_clamped = num_floored = 0
    for i, call in enumerate(calls):
        new_tokens, floored = _new_tokens(calls, i, options.min_new_tokens)
        num_floored += floored
        output_tokens = max(1, call.completion_tokens)
        if i == len(calls) - 1:
            turns.append(Turn(new_tokens, output_tokens))
            break
        gap_s = calls[i + 1].created_s - call.created_s
        tool_s, clamped = estimate_tool_s(gap_s, call.completion_tokens, options)
        num_clamped += clamped
        runs = any(program_runs_code(program) for program in call.programs)
        cpu_s, wait_s = split_tool_time(tool_s, runs, options.cpu_fraction)
        name = call.programs[0] if call.programs else None
        turns.append(Turn(new_tokens, output_tokens, cpu_s, wait_s, name))
    session = SessionSpec(session_id, calls[0].created_s, tuple(turns))
    return _Estimates(session, num_clamped, num_floored)


def _usage_call(response: _Fields, programs: tuple[str, ...]) -> _LlmCall:
    """An assistant message's ``extra.response`` as a call."""
    usage = response.object("usage")
    if usage is None:
        raise response.missing(["usage"])
    return _LlmCall(
        created_s=response.number(["created"]),
        prompt_tokens=usage.count(["prompt_tokens"]),
        completion_tokens=usage.count(["completion_tokens"]),
        programs=programs,
    )


def _trajectory_calls(path: Path) -> list[_LlmCall]:
    """The calls of a raw ``.traj.json``: its assistant messages with ``extra.response``."""
    root = _Fields(_read_json(path), str(path))
    found = root.find(["trajectory_format"])
    if found is not None and found[1] != MINI_SWE_AGENT_FORMAT:
        raise root.error(
            "trajectory_format", f"must be {MINI_SWE_AGENT_FORMAT!r}, got {found[1]!r}"
        )
    calls = []
    for message in root.objects("messages"):
        if message.text(["role"]) != "assistant":
            continue
        extra = message.object("extra")
        response = extra.object("response") if extra is not None else None
        if response is not None:
            calls.append(_usage_call(response, reply_programs(_message_text(message))))
    if not calls:
        raise root.error("messages", "has no assistant message with 'extra.response'")
    return calls


def _trajectory_name(path: Path) -> str:
    """``astropy__astropy-7336`` for ``astropy__astropy-7336.traj.json``."""
    name = path.name.removesuffix(".json")
    return name.removesuffix(".traj") if name != path.name else path.stem


def _log_programs(record: _Fields) -> tuple[str, ...]:
    value = record.data.get("programs")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise record.error("programs", f"must be a list of strings, got {value!r}")
    return tuple(value)


def _log_call(record: _Fields) -> tuple[str, int, _LlmCall]:
    """``(session, call index, call)`` of one line of the call log."""
    call = _LlmCall(
        created_s=record.number(["created_s"]),
        prompt_tokens=record.count(["prompt_tokens"]),
        completion_tokens=record.count(["completion_tokens"]),
        programs=_log_programs(record),
    )
    return record.text(["session"]), record.count(["call"]), call


def _log_sessions(path: Path, found: dict[str, dict[int, _LlmCall]]) -> None:
    """Add the calls of a call log to ``found`` (session -> call index -> call)."""
    for record in _jsonl_records(path):
        session_id, index, call = _log_call(record)
        calls = found.setdefault(session_id, {})
        if index in calls:
            raise record.error("call", f"repeats call {index} of session {session_id!r}")
        calls[index] = call


def _mini_swe_agent_inputs(files: Sequence[Path]) -> list[tuple[str, list[_LlmCall]]]:
    """``(session id, calls in order)`` of every trajectory and every session in a log,
    in input order; a repeated name gets ``-2``, ``-3``, ..."""
    named: list[tuple[str, list[_LlmCall]]] = []
    for path in files:
        if path.name.endswith(LOG_SUFFIXES):
            found: dict[str, dict[int, _LlmCall]] = {}
            _log_sessions(path, found)
            named += [(sid, [calls[i] for i in sorted(calls)]) for sid, calls in found.items()]
        else:
            named.append((_trajectory_name(path), _trajectory_calls(path)))
    ids = _unique_ids([name for name, _ in named])
    return [(id_, calls) for id_, (_, calls) in zip(ids, named, strict=True)]


@IMPORTERS.register("mini-swe-agent")
def import_mini_swe_agent(
    paths: PathLike | Sequence[PathLike], options: ImportOptions = DEFAULT_IMPORT_OPTIONS
) -> ImportedTrace:
    """Import mini-swe-agent runs: raw ``.traj.json`` trajectories (format
    ``mini-swe-agent-1``), one session per file named after it, and call logs
    (``.jsonl`` or ``.jsonl.gz``), one session per ``session`` value. Directories are
    searched for all three.

    - Raw trajectories: each ``messages[]`` entry of ``role`` ``assistant`` with an
      ``extra.response`` is one LLM call: ``created`` (epoch seconds),
      ``usage.prompt_tokens`` and ``usage.completion_tokens``; the programs are those
      of its ``content``'s one ```` ```bash ```` block (:func:`reply_programs`).
    - Call logs: one JSON object per call with ``session``, ``call`` (its index; calls
      are put in this order), ``created_s``, ``prompt_tokens``, ``completion_tokens``
      and ``programs`` (optional; ``cached_tokens`` is not used).

    Each call is a turn. Turn 0's ``new_tokens`` is its prompt; turn k's is
    ``prompt(k) - prompt(k-1) - completion(k-1)``, floored at ``options.min_new_tokens``
    (the growth is below it when hidden reasoning, counted in the completion, is not
    sent back). ``output_tokens`` is the completion (at least 1). The tool time after
    turn k is :func:`estimate_tool_s` of the gap between calls k and k+1's ``created``
    times (whole seconds): the gap less ``options.call_overhead_s + completion(k) /
    options.decode_tokens_per_s``, clamped at 0. It is all CPU if one of the call's
    programs runs code (:func:`program_runs_code`: ``python``, ``pytest``, ...), else
    ``options.cpu_fraction`` CPU (``cat``, ``grep``, ``ls``, ``sed``); ``tool_name``
    is the first program. The count of clamped gaps and floored turns is returned.
    A session arrives at its first call's ``created`` time, relative to the earliest
    session's.
    """
    files = _input_files(paths, ["*.traj.json", *(f"*{suffix}" for suffix in LOG_SUFFIXES)])
    estimates = [
        _mini_swe_agent_session(session_id, calls, options)
        for session_id, calls in _mini_swe_agent_inputs(files)
    ]
    origin_s = min((e.session.arrival_s for e in estimates), default=0.0)
    sessions = sorted(
        (e.session.with_arrival(e.session.arrival_s - origin_s) for e in estimates),
        key=lambda session: session.arrival_s,
    )
    counts = (
        sum(e.num_clamped_tool_gaps for e in estimates),
        sum(e.num_floored_new_tokens for e in estimates),
    )
    return _finish(sessions, True, options, ", ".join(map(str, files)), counts)
