"""Seeded workload generators (docs/design.md §7): ``swe``, ``agentic``, ``longctx``, ``chat``.

A generator is ``generate(num_sessions, rng, max_context_tokens) -> list[SessionSpec]``
registered in :data:`WORKLOADS`. It draws everything from ``rng`` (so one seed gives
one workload), sets ``arrival_s = 0`` (arrivals are assigned separately, see
``arrivals.py``), names sessions ``<workload>-000042``, and keeps every session's
total context (the sum of new and output tokens over its turns) within
``max_context_tokens`` by dropping the turns that would overflow it; a first turn
that alone overflows is shrunk. The tool call after a session's last turn is
always empty.

Every parameter below cites the fact it reproduces (``workload-facts.md`` or
docs/design.md §7) or says that it is an assumption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol, cast

import numpy as np
import numpy.typing as npt

from mars_ray.errors import ConfigError
from mars_ray.registry import Registry
from mars_ray.session import SessionSpec, Turn

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# A session needs at least one prompt token and one output token.
MIN_CONTEXT_TOKENS = 2


class WorkloadGenerator(Protocol):
    """Draws ``num_sessions`` sessions from ``rng`` that fit ``max_context_tokens``."""

    def __call__(
        self, num_sessions: int, rng: np.random.Generator, max_context_tokens: int
    ) -> list[SessionSpec]: ...


WORKLOADS: Registry[WorkloadGenerator] = Registry("workload")


def generate_workload(
    name: str, num_sessions: int, rng: np.random.Generator, max_context_tokens: int
) -> list[SessionSpec]:
    """Run the generator registered as ``name`` (UnknownNameError lists the known ones)."""
    return WORKLOADS.get(name)(num_sessions, rng, max_context_tokens)


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class QuantileTable:
    """A positive distribution given by its quantiles, log-linear between the knots.

    ``quantiles`` run from 0 to 1; ``values`` are the matching values. Sampling
    reproduces every knot exactly (the published percentiles) and interpolates
    geometrically in between, which keeps heavy tails heavy.
    """

    quantiles: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        q, v = np.asarray(self.quantiles), np.asarray(self.values)
        if len(q) != len(v) or len(q) < 2 or q[0] != 0 or q[-1] != 1:
            raise ConfigError("quantile table needs matching knots from quantile 0 to 1")
        if np.any(np.diff(q) <= 0) or np.any(np.diff(v) < 0) or v[0] <= 0:
            raise ConfigError("quantile table knots must increase and values be positive")

    def sample(self, rng: np.random.Generator, size: int) -> FloatArray:
        """``size`` independent draws."""
        log_values = np.log(np.asarray(self.values))
        return np.exp(np.interp(rng.random(size), self.quantiles, log_values))


class LogNormal(NamedTuple):
    """Lognormal with the given median and log-space ``sigma``, clipped to [low, high]."""

    median: float
    sigma: float
    low: float
    high: float

    def sample(self, rng: np.random.Generator, size: int) -> FloatArray:
        """``size`` independent draws."""
        return np.clip(rng.lognormal(np.log(self.median), self.sigma, size), self.low, self.high)


class LogUniform(NamedTuple):
    """Values whose logarithm is uniform on [log low, log high]."""

    low: float
    high: float

    def sample(self, rng: np.random.Generator, size: int) -> FloatArray:
        """``size`` independent draws."""
        return np.exp(rng.uniform(np.log(self.low), np.log(self.high), size))


def _whole(values: FloatArray) -> IntArray:
    return np.rint(values).astype(np.int64)


# --------------------------------------------------------------------------- tool calls

# Tool calls of at least this long are test runs / builds that burn CPU; shorter ones
# (read a file, grep, edit) mostly wait on I/O. docs/design.md §1: tool calls "run
# tests, grep, edit, build"; the CPU share is what couples sessions to the CPU pool.
LONG_TOOL_S = 10.0
LONG_TOOL_CPU_FRACTION = (0.70, 0.95)  # assumption: a test run is mostly CPU
QUICK_TOOL_CPU_FRACTION = (0.05, 0.30)  # assumption: a grep or a file read mostly waits
QUICK_TOOL_NAMES = ("read_file", "search", "edit_file", "shell")
LONG_TOOL_NAME = "run_tests"


class _ToolCalls(NamedTuple):
    cpu_s: FloatArray
    wait_s: FloatArray
    names: list[str]


def _split_tool_calls(
    rng: np.random.Generator, tool_s: FloatArray, is_long: BoolArray
) -> _ToolCalls:
    """Split each call's duration into CPU and waiting time and give it a tool name."""
    size = len(tool_s)
    cpu_fraction = np.where(
        is_long,
        rng.uniform(*LONG_TOOL_CPU_FRACTION, size),
        rng.uniform(*QUICK_TOOL_CPU_FRACTION, size),
    )
    quick_names = rng.choice(np.asarray(QUICK_TOOL_NAMES), size)
    names = np.where(is_long, LONG_TOOL_NAME, quick_names).tolist()
    cpu_s = tool_s * cpu_fraction
    return _ToolCalls(cpu_s, tool_s - cpu_s, names)


# "Most under a second" (docs/design.md §7); TraceLab's per-call median is 0.3 s. Median 0.25 s,
# sigma 1.0: 92% of quick calls finish within a second, p99 2.6 s.
QUICK_TOOL_S = LogNormal(median=0.25, sigma=1.0, low=0.01, high=LONG_TOOL_S)


# --------------------------------------------------------------------------- assembly


class _TurnArrays(NamedTuple):
    """Per-turn draws for a whole workload, sessions back to back."""

    new_tokens: IntArray
    output_tokens: IntArray
    tool_cpu_s: FloatArray
    tool_wait_s: FloatArray
    tool_names: list[str] | None


def _first_turn_mask(num_turns: IntArray) -> BoolArray:
    first = np.zeros(int(num_turns.sum()), dtype=bool)
    first[np.cumsum(num_turns) - num_turns] = True
    return first


def _assemble(
    prefix: str, num_turns: IntArray, turns: _TurnArrays, max_context_tokens: int
) -> list[SessionSpec]:
    """Cut the back-to-back turn arrays into sessions that fit the context window."""
    stops = np.cumsum(num_turns)
    starts = (stops - num_turns).tolist()
    return [
        _fit_session(f"{prefix}-{i:06d}", turns, start, stop, max_context_tokens)
        for i, (start, stop) in enumerate(zip(starts, stops.tolist(), strict=True))
    ]


def _fit_session(
    session_id: str, turns: _TurnArrays, start: int, stop: int, max_context_tokens: int
) -> SessionSpec:
    """One session of rows ``start:stop``, cut to the turns that fit the window."""
    new_tokens = turns.new_tokens[start:stop].tolist()
    output_tokens = turns.output_tokens[start:stop].tolist()
    context_tokens = np.cumsum(turns.new_tokens[start:stop] + turns.output_tokens[start:stop])
    num_kept = max(1, int(np.searchsorted(context_tokens, max_context_tokens, side="right")))
    if new_tokens[0] + output_tokens[0] > max_context_tokens:
        # Even the first turn overflows: give the output at most half the window.
        output_tokens[0] = min(output_tokens[0], max_context_tokens // 2)
        new_tokens[0] = max_context_tokens - output_tokens[0]
    names = turns.tool_names[start:stop] if turns.tool_names else [None] * (stop - start)
    cpu_s = turns.tool_cpu_s[start:stop].tolist()
    wait_s = turns.tool_wait_s[start:stop].tolist()
    kept = [
        Turn(new_tokens[i], output_tokens[i], cpu_s[i], wait_s[i], names[i])
        for i in range(num_kept - 1)
    ]
    last = num_kept - 1
    kept.append(Turn(new_tokens[last], output_tokens[last]))  # no tool call after the end
    return SessionSpec(session_id, 0.0, tuple(kept))


def _check_args(num_sessions: int, max_context_tokens: int) -> None:
    if num_sessions < 0:
        raise ConfigError(f"num_sessions must be >= 0, got {num_sessions}")
    if max_context_tokens < MIN_CONTEXT_TOKENS:
        raise ConfigError(
            f"max_context_tokens must be >= {MIN_CONTEXT_TOKENS}, got {max_context_tokens}"
        )


# --------------------------------------------------------------------------- swe

# 10-60 turns (docs/design.md §7), median 20: above Continuum's SWE-bench mean of 10.9 turns
# because OpenHands-style agents "commonly exceed 50 rounds" (workload-facts).
# Clipping puts ~8% of sessions at 10 turns and ~1% at 60.
SWE_TURNS = LogNormal(median=20, sigma=0.5, low=10, high=60)
SWE_FIRST_PROMPT_TOKENS = LogUniform(4_000, 10_000)  # docs/design.md §7: 4-10k tokens
# Appended observations heavy-tailed around 1k tokens (docs/design.md §7): median 1k, p90 3.6k,
# p99 10k; one observation (a large file or log) is at most 32k or a quarter window.
SWE_OBSERVATION_TOKENS = LogNormal(median=1_000, sigma=1.0, low=16, high=32_768)
# 100-600 output tokens (docs/design.md §7): a short thought and one action, median 250.
SWE_OUTPUT_TOKENS = LogNormal(median=250, sigma=0.4, low=100, high=600)
# "A few test runs of minutes that burn CPU" (docs/design.md §7): 8% of tool calls, ~1.5 per
# 20-turn session, ~3 min of tests, in line with ~10 min of wall time for one
# OpenHands SWE-bench Lite instance (workload-facts). Median 90 s, p10 37 s, p90 220 s.
SWE_TEST_RUN_PROBABILITY = 0.08
SWE_TEST_RUN_S = LogNormal(median=90.0, sigma=0.7, low=20.0, high=900.0)


@WORKLOADS.register("swe")
def generate_swe(
    num_sessions: int, rng: np.random.Generator, max_context_tokens: int
) -> list[SessionSpec]:
    """SWE-bench-like coding-agent sessions (docs/design.md §7)."""
    _check_args(num_sessions, max_context_tokens)
    num_turns = _whole(SWE_TURNS.sample(rng, num_sessions))
    size = int(num_turns.sum())
    first = _first_turn_mask(num_turns)
    observation_cap = max(16, min(SWE_OBSERVATION_TOKENS.high, max_context_tokens // 4))
    observations = SWE_OBSERVATION_TOKENS._replace(high=observation_cap).sample(rng, size)
    prompts = SWE_FIRST_PROMPT_TOKENS.sample(rng, size)
    new_tokens = _whole(np.where(first, prompts, observations))
    output_tokens = _whole(SWE_OUTPUT_TOKENS.sample(rng, size))
    is_test_run = rng.random(size) < SWE_TEST_RUN_PROBABILITY
    tool_s = np.where(is_test_run, SWE_TEST_RUN_S.sample(rng, size), QUICK_TOOL_S.sample(rng, size))
    tools = _split_tool_calls(rng, tool_s, is_test_run)
    turns = _TurnArrays(new_tokens, output_tokens, tools.cpu_s, tools.wait_s, tools.names)
    return _assemble("swe", num_turns, turns, max_context_tokens)


# --------------------------------------------------------------------------- agentic

# Shaped on TraceLab's Claude Code / Codex statistics (workload-facts). Their contexts
# are a frontier model's (cached prefix p50 ~119k of a ~200k window), so token sizes
# above the bulk scale by window / 200k, and sessions end when the window is full.
FRONTIER_WINDOW_TOKENS = 200_000

# Tool-triggered rounds per session: p50 15, p90 135, p99 1,107 (TraceLab); the table's
# mean is ~85 rounds (TraceLab: 83.7). In a 128k window the long ones end early.
AGENTIC_TOOL_ROUNDS = QuantileTable(
    quantiles=(0.0, 0.5, 0.9, 0.99, 1.0), values=(0.5, 15.0, 135.0, 1_107.0, 3_000.0)
)
# Newly appended tokens per round (TraceLab): p50 875, > 90% of rounds append < 1k,
# > 70% of appended tokens come from rounds appending >= 10k (this table at a 200k
# window: 74%; at 128k: 62%). Knots above 1k scale with the window. TraceLab's mean of
# 6.5k cannot fit an append-only 128k window; we keep the shape (this mean: ~2.6k).
AGENTIC_APPENDED_TOKENS = QuantileTable(
    quantiles=(0.0, 0.5, 0.91, 0.95, 0.99, 1.0),
    values=(32.0, 875.0, 1_000.0, 10_000.0, 60_000.0, 100_000.0),
)
# First round: system prompt, tool schemas and the task. Not in TraceLab's figures:
# an assumption of 4-16k tokens at a 200k window, scaled like the tail.
AGENTIC_FIRST_PROMPT_TOKENS = LogUniform(4_000, 16_000)
# Output tokens per round: p50 214, mean 523 (TraceLab) -> sigma = sqrt(2 ln(523/214))
# = 1.34; the lognormal's p90 of 1.2k meets "p90 < 1.7k". At most 8k per round.
AGENTIC_OUTPUT_TOKENS = LogNormal(median=214, sigma=1.34, low=1, high=8_192)
# Tool time per call: p50 0.3 s, p90 13.6 s, p99 3.6 min, 3.97% of calls over a
# minute (TraceLab). Capped at 30 min, the calls over a minute hold ~77% of tool time
# (TraceLab: 84.7%, from calls longer still). One tool call per round (TraceLab: 1.2).
AGENTIC_TOOL_S = QuantileTable(
    quantiles=(0.0, 0.5, 0.9, 1 - 0.0397, 0.99, 1.0),
    values=(0.01, 0.3, 13.6, 60.0, 216.0, 1_800.0),
)


def _window_scale(max_context_tokens: int) -> float:
    return min(1.0, max_context_tokens / FRONTIER_WINDOW_TOKENS)


def _agentic_appended_tokens(max_context_tokens: int) -> QuantileTable:
    """The appended-token table with its tail (above 1k) scaled to the window."""
    scale = _window_scale(max_context_tokens)
    bulk_top = AGENTIC_APPENDED_TOKENS.values[2]
    values = tuple(
        v if v <= bulk_top else max(bulk_top, v * scale) for v in AGENTIC_APPENDED_TOKENS.values
    )
    return QuantileTable(AGENTIC_APPENDED_TOKENS.quantiles, values)


@WORKLOADS.register("agentic")
def generate_agentic(
    num_sessions: int, rng: np.random.Generator, max_context_tokens: int
) -> list[SessionSpec]:
    """Claude Code / Codex-like sessions shaped on TraceLab's published statistics."""
    _check_args(num_sessions, max_context_tokens)
    num_turns = 1 + _whole(AGENTIC_TOOL_ROUNDS.sample(rng, num_sessions))
    size = int(num_turns.sum())
    first = _first_turn_mask(num_turns)
    scale = _window_scale(max_context_tokens)
    low, high = AGENTIC_FIRST_PROMPT_TOKENS
    prompts = LogUniform(low * scale, high * scale).sample(rng, size)
    appended = _agentic_appended_tokens(max_context_tokens).sample(rng, size)
    new_tokens = _whole(np.where(first, prompts, appended))
    output_tokens = _whole(AGENTIC_OUTPUT_TOKENS.sample(rng, size))
    tool_s = AGENTIC_TOOL_S.sample(rng, size)
    tools = _split_tool_calls(rng, tool_s, tool_s >= LONG_TOOL_S)
    turns = _TurnArrays(new_tokens, output_tokens, tools.cpu_s, tools.wait_s, tools.names)
    return _assemble("agentic", num_turns, turns, max_context_tokens)


# --------------------------------------------------------------------------- longctx

# Long-context sessions of 50-120k tokens in all, mixed with short ones (docs/design.md §7): the
# regime where chunk shrinking and admission matter. The 30% mix is an assumption.
LONGCTX_LONG_FRACTION = 0.3
# Total context of a long session (docs/design.md §7), scaled down if the window is smaller.
LONGCTX_TOTAL_TOKENS = (50_000, 120_000)
LONGCTX_LONG_TURNS = (1, 4)  # a large document or repository, then a few questions
LONGCTX_SHORT_TURNS = (1, 3)
LONGCTX_SHORT_PROMPT_TOKENS = LogUniform(200, 4_000)  # chat-sized
LONGCTX_FOLLOW_UP_TOKENS = LogNormal(median=300, sigma=0.8, low=16, high=4_096)
LONGCTX_OUTPUT_TOKENS = LogNormal(median=300, sigma=0.6, low=32, high=2_048)


def _turns_between(rng: np.random.Generator, bounds: tuple[int, int], size: int) -> IntArray:
    return rng.integers(bounds[0], bounds[1] + 1, size).astype(np.int64)


@WORKLOADS.register("longctx")
def generate_longctx(
    num_sessions: int, rng: np.random.Generator, max_context_tokens: int
) -> list[SessionSpec]:
    """Long-context sessions (50-120k tokens in all) mixed with short ones."""
    _check_args(num_sessions, max_context_tokens)
    is_long = rng.random(num_sessions) < LONGCTX_LONG_FRACTION
    long_turns = _turns_between(rng, LONGCTX_LONG_TURNS, num_sessions)
    short_turns = _turns_between(rng, LONGCTX_SHORT_TURNS, num_sessions)
    num_turns = np.where(is_long, long_turns, short_turns)
    size = int(num_turns.sum())
    first = _first_turn_mask(num_turns)
    follow_ups = _whole(LONGCTX_FOLLOW_UP_TOKENS.sample(rng, size))
    short_prompts = _whole(LONGCTX_SHORT_PROMPT_TOKENS.sample(rng, size))
    new_tokens = np.where(first, short_prompts, follow_ups)
    output_tokens = _whole(LONGCTX_OUTPUT_TOKENS.sample(rng, size))
    # A long session's first prompt is whatever its total leaves after the other turns.
    scale = min(1.0, max_context_tokens / LONGCTX_TOTAL_TOKENS[1])
    totals = _whole(rng.uniform(*LONGCTX_TOTAL_TOKENS, num_sessions) * scale)
    first_rows = np.flatnonzero(first)
    rest = np.add.reduceat(new_tokens + output_tokens, first_rows) - new_tokens[first_rows]
    new_tokens[first_rows[is_long]] = np.maximum(1, totals - rest)[is_long]
    tool_s = QUICK_TOOL_S.sample(rng, size)
    tools = _split_tool_calls(rng, tool_s, np.zeros(size, dtype=bool))
    turns = _TurnArrays(new_tokens, output_tokens, tools.cpu_s, tools.wait_s, tools.names)
    return _assemble("longctx", num_turns, turns, max_context_tokens)


# --------------------------------------------------------------------------- chat

# Single-turn requests without tools, to show no regression where agents are absent
# (docs/design.md §7): prompts of 100-4,000 tokens and outputs of 50-800 (median 200).
CHAT_PROMPT_TOKENS = LogUniform(100, 4_000)
CHAT_OUTPUT_TOKENS = LogNormal(median=200, sigma=0.7, low=50, high=800)


@WORKLOADS.register("chat")
def generate_chat(
    num_sessions: int, rng: np.random.Generator, max_context_tokens: int
) -> list[SessionSpec]:
    """Single-turn chat requests with no tool calls."""
    _check_args(num_sessions, max_context_tokens)
    num_turns = np.ones(num_sessions, dtype=np.int64)
    new_tokens = _whole(CHAT_PROMPT_TOKENS.sample(rng, num_sessions))
    output_tokens = _whole(CHAT_OUTPUT_TOKENS.sample(rng, num_sessions))
    no_tool_s = np.zeros(num_sessions)
    turns = _TurnArrays(new_tokens, output_tokens, no_tool_s, no_tool_s, None)
    return _assemble("chat", num_turns, turns, max_context_tokens)


# --------------------------------------------------------------------------- heavy tails

# Heavy-tailed contexts (issue 13, item 4): a few sessions start from a context many
# times the usual one (a repository dump, a long log), most do not. Assumption: the
# first prompt is multiplied by a Pareto factor >= 1 of tail index 1.1, so 8% of
# sessions start at >= 10x and 0.6% at >= 100x (capped at 64x, then at the window).
HEAVY_TAIL_INDEX = 1.1
HEAVY_TAIL_MAX_FACTOR = 64.0


class Pareto(NamedTuple):
    """Pareto (type I) from ``low`` with tail index ``tail_index``, capped at ``high``:
    P(X > x) = (low / x) ** tail_index."""

    low: float
    tail_index: float
    high: float

    def sample(self, rng: np.random.Generator, size: int) -> FloatArray:
        """``size`` independent draws."""
        u = 1.0 - rng.random(size)  # in (0, 1]
        return np.minimum(self.low * u ** (-1.0 / self.tail_index), self.high)


def heavy_tailed_contexts(
    generator: WorkloadGenerator,
    *,
    tail_index: float = HEAVY_TAIL_INDEX,
    max_factor: float = HEAVY_TAIL_MAX_FACTOR,
) -> WorkloadGenerator:
    """``generator`` with each session's first prompt scaled by a Pareto factor >= 1.

    The factors are drawn from the same ``rng`` after the sessions, so one seed still
    gives one workload; sessions are then cut to the window as every generator's are
    (the turns that would overflow it are dropped). Smaller ``tail_index`` is heavier.
    Not registered in :data:`WORKLOADS`; e.g.
    ``heavy_tailed_contexts(WORKLOADS.get("swe"))(100, rng, 131_072)``.
    """
    if not (tail_index > 0 and np.isfinite(tail_index)):
        raise ConfigError(f"tail index must be finite and > 0, got {tail_index:g}")
    if not (max_factor >= 1 and np.isfinite(max_factor)):
        raise ConfigError(f"max factor must be finite and >= 1, got {max_factor:g}")
    factors = Pareto(1.0, tail_index, max_factor)

    def generate(
        num_sessions: int, rng: np.random.Generator, max_context_tokens: int
    ) -> list[SessionSpec]:
        sessions = generator(num_sessions, rng, max_context_tokens)
        scales = factors.sample(rng, len(sessions)).tolist()
        return [
            _scale_first_prompt(s, f, max_context_tokens)
            for s, f in zip(sessions, scales, strict=True)
        ]

    return generate


def _scale_first_prompt(
    session: SessionSpec, factor: float, max_context_tokens: int
) -> SessionSpec:
    turns = session.turns
    new_tokens = np.array([t.new_tokens for t in turns], dtype=np.int64)
    new_tokens[0] = max(1, round(new_tokens[0] * factor))
    arrays = _TurnArrays(
        new_tokens,
        np.array([t.output_tokens for t in turns], dtype=np.int64),
        np.array([t.tool_cpu_s for t in turns]),
        np.array([t.tool_wait_s for t in turns]),
        # Turn names may be None (the last turn's); _fit_session passes them through.
        cast(list[str], [t.tool_name for t in turns]) if any(t.tool_name for t in turns) else None,
    )
    fitted = _fit_session(session.session_id, arrays, 0, len(turns), max_context_tokens)
    return SessionSpec(fitted.session_id, session.arrival_s, fitted.turns, session.tenant)
