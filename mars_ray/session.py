"""Sessions, turns and tool calls: the unit of work of an agent (docs/design.md §2)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Turn:
    """One LLM call of a session and the tool call that follows it.

    ``new_tokens`` are appended to the session's context before the call (the
    first turn's prompt); the prompt is all earlier context plus these tokens.
    ``tool_cpu_s`` / ``tool_wait_s`` describe the tool call after the turn and
    are 0 after the last turn.
    """

    new_tokens: int
    output_tokens: int
    tool_cpu_s: float = 0.0
    tool_wait_s: float = 0.0
    tool_name: str | None = None

    @property
    def tool_s(self) -> float:
        """Uncontended duration of the tool call after this turn."""
        return self.tool_cpu_s + self.tool_wait_s


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """An agent session as a workload describes it: immutable input to every runtime."""

    session_id: str
    arrival_s: float
    turns: tuple[Turn, ...]
    tenant: str | None = None

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    def prompt_tokens(self, turn_index: int) -> int:
        """Prompt length of turn ``turn_index``: all earlier context plus its new tokens."""
        total = 0
        for turn in self.turns[:turn_index]:
            total += turn.new_tokens + turn.output_tokens
        return total + self.turns[turn_index].new_tokens

    @property
    def max_context_tokens(self) -> int:
        """Context length at the end of the last turn."""
        return sum(t.new_tokens + t.output_tokens for t in self.turns)

    @property
    def total_tool_s(self) -> float:
        return sum(t.tool_s for t in self.turns)

    def with_arrival(self, arrival_s: float) -> SessionSpec:
        return SessionSpec(self.session_id, arrival_s, self.turns, self.tenant)


@dataclass(slots=True)
class ToolHistory:
    """Recent tool durations of one session, for predicting the next one.

    An exponential moving average (weight ``alpha`` on the newest sample); with no
    history the prediction is ``prior_s``.
    """

    alpha: float = 0.5
    prior_s: float = 1.0
    ema_s: float | None = None
    num_samples: int = 0

    def observe(self, duration_s: float) -> None:
        self.num_samples += 1
        self.ema_s = (
            duration_s
            if self.ema_s is None
            else self.alpha * duration_s + (1 - self.alpha) * self.ema_s
        )

    def predict_s(self) -> float:
        return self.prior_s if self.ema_s is None else self.ema_s


IDLE_TOOL_MULTIPLE = 3.0  # a session idle 3x its longest tool call so far has walked away


@dataclass(frozen=True, slots=True)
class IdleTimeout:
    """When a session that sends no next turn is over (stock agents never say so).

    A session is idle from its last sign of life (opened, a turn ended, a tool reported)
    while no turn is in flight. It expires after ``base_s``, or after
    ``IDLE_TOOL_MULTIPLE`` times the longest tool call it has made, whichever is longer,
    never after more than ``max_s``: a session whose tools run for minutes is given time
    for the next one, and no client holds its admission slot longer than ``max_s`` by
    walking away. A session recognised only from its conversation that has not yet
    continued (it may be a one-off chat request) gets ``unconfirmed_s`` instead.
    """

    base_s: float
    max_s: float
    unconfirmed_s: float

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.max_s:
            raise ValueError(f"need 0 < base_s <= max_s, got {self.base_s}, {self.max_s}")
        if not 0 < self.unconfirmed_s <= self.max_s:
            raise ValueError(f"need 0 < unconfirmed_s <= max_s, got {self.unconfirmed_s}")

    def timeout_s(self, longest_tool_s: float, confirmed: bool = True) -> float:
        if not confirmed:
            return self.unconfirmed_s
        return min(self.max_s, max(self.base_s, IDLE_TOOL_MULTIPLE * longest_tool_s))

    def expired(self, idle_s: float, longest_tool_s: float, confirmed: bool = True) -> bool:
        return idle_s > self.timeout_s(longest_tool_s, confirmed)
