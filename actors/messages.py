"""The messages between the ingress, the global scheduler, GPU workers and tool
executors: explicit, frozen, picklable types (no dicts across actor boundaries).

One turn, end to end::

    ingress --begin_turn(TurnAsk)--> GlobalScheduler      (waits for admission + placement)
    ingress <--TurnGrant------------ GlobalScheduler      (engine id, MLFQ inputs)
    ingress --generate(TurnWork)--> GPUWorker             (streams TokenChunk ..., then TurnDone)
    ingress --end_turn(TurnReport)--> GlobalScheduler     (service, tool clock starts)
    ingress --run/replay--> ToolExecutor --ToolOutcome-->  (then the next begin_turn)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TurnAsk:
    """A turn asking to run: the prompt is the whole context (earlier turns + new)."""

    session_id: str
    turn_index: int
    prompt_tokens: int
    max_output_tokens: int
    is_last_turn: bool = False
    expected_tool_s: float | None = None  # the client's estimate of the tool after this turn
    tool_s: float | None = None  # measured duration of the tool before this turn, if known
    # The request named no session: the canonical form of its prompt (session_identity),
    # from which the scheduler finds the session it continues; session_id is then only
    # the id a new session gets.
    conversation: bytes | None = None
    # Names this ask across its retries (TurnChannel sets it): an ask sent again after
    # a scheduler restart lost its answer gets the same grant, never a second turn.
    ask_id: str | None = None


@dataclass(frozen=True, slots=True)
class TurnGrant:
    """Where and how a turn runs, decided by the global scheduler."""

    session_id: str
    turn_index: int
    engine_id: int  # the ingress holds the workers' handles (by name), not the grant
    prior_context_tokens: int  # context the engine may hold from the session's last turn
    session_service_tokens: int  # attained service across GPUs (global MLFQ)
    session_service_s: float
    session_arrival_s: float
    predicted_tool_s: float  # feeds the retention decision at turn end
    attempt: int = 0  # > 0: a retry after a worker failure


@dataclass(frozen=True, slots=True)
class TurnWork:
    """What a GPU worker runs for one turn."""

    session_id: str
    turn_index: int
    prompt_tokens: int
    max_output_tokens: int
    prior_context_tokens: int
    session_service_tokens: int
    session_service_s: float
    session_arrival_s: float
    is_last_turn: bool
    predicted_tool_s: float
    attempt: int = 0
    # The prompt's ids (the whole context), for engines that need them (vLLM); a
    # simulated engine only counts, and the ingress leaves this empty for it.
    prompt_token_ids: tuple[int, ...] = ()

    @property
    def request_id(self) -> str:
        return f"{self.session_id}#{self.turn_index}.{self.attempt}"


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Tokens sampled since the last chunk (``first_index`` counts from 0 in the turn)."""

    first_index: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TurnDone:
    """A turn's end as its engine saw it (engine time is simulated seconds)."""

    session_id: str
    turn_index: int
    engine_id: int
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    recomputed_tokens: int
    num_preemptions: int
    service_tokens: int
    service_s: float
    ttft_s: float
    e2e_s: float


@dataclass(frozen=True, slots=True)
class TurnReport:
    """The ingress tells the global scheduler a turn ended."""

    session_id: str
    turn_index: int
    engine_id: int
    service_tokens: int
    service_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    is_last_turn: bool
    answer: bytes | None = None  # an inferred session's answer, canonical (session_identity)

    @property
    def context_tokens(self) -> int:
        """Prompt + output: the next turn's prefix."""
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """A closed session as the global scheduler recorded it."""

    session_id: str
    arrival_s: float
    admitted_s: float | None
    finish_s: float
    num_turns: int
    ideal_s: float  # isolated GPU time of its turns + its tool time
    jct_s: float
    tool_s: float
    failed_reason: str | None = None
    expired: bool = False  # ended by the idle timeout (its client never closed it)

    @property
    def slowdown(self) -> float:
        return self.jct_s / self.ideal_s if self.ideal_s > 0 else 1.0


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """A tool call's result as the session API returns it."""

    session_id: str
    node_id: int
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    killed_reason: str | None
    wall_s: float
    cpu_s: float
    queue_s: float  # waiting for a free slot on the executor
    attempts: int = 1
