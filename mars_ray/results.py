"""Result types every runtime (simulator, Ray, vLLM) produces, and metrics consume."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One turn (LLM call) as served."""

    session_id: str
    turn_index: int
    engine_id: int
    submit_s: float  # reached the engine
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache (GPU or CPU tier)
    recomputed_tokens: int  # tokens computed again after preemption or eviction
    num_preemptions: int

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.submit_s

    @property
    def e2el_s(self) -> float:
        return self.finish_s - self.submit_s

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output - 1), as ``vllm bench serve`` defines it."""
        if self.output_tokens <= 1:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One session from arrival to its last token (or failure)."""

    session_id: str
    arrival_s: float
    admitted_s: float | None
    finish_s: float | None  # None: not completed
    ideal_s: float  # alone on an idle cluster (docs/design.md §2)
    num_turns: int
    tool_s: float  # tool time as experienced (contention included)
    tool_ideal_s: float
    failed_reason: str | None = None

    @property
    def completed(self) -> bool:
        return self.finish_s is not None and self.failed_reason is None

    @property
    def jct_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def slowdown(self) -> float | None:
        jct = self.jct_s
        return None if jct is None else jct / self.ideal_s


@dataclass(frozen=True)
class TimeSeries:
    """System state sampled at a fixed period (cluster totals; KV usage averaged)."""

    t_s: list[float] = field(default_factory=list)
    columns: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class RunCounters:
    """Totals over a run."""

    num_preemptions: int = 0
    num_evicted_blocks: int = 0
    num_recomputed_tokens: int = 0
    num_offloaded_blocks: int = 0
    num_reloaded_blocks: int = 0
    gpu_busy_frac: float = 0.0  # mean over GPUs of time spent in steps
    cpu_utilization: float = 0.0  # mean over nodes of busy cores / cores
    mean_tool_queue_wait_s: float = 0.0  # tool delay beyond its uncontended time
    num_retries: int = 0
    num_kv_moves: int = 0  # sessions whose KV followed them to another GPU
    num_kv_moved_blocks: int = 0
    num_sessions_expired: int = 0  # ended by the idle timeout (Ray runtime: never closed)
    #: sessions whose attained service or tool history was lost mid-way (Ray runtime: a
    #: scheduler restart that could not restore them); the simulator never loses one
    num_sessions_reset: int = 0


@dataclass(frozen=True)
class RunResult:
    """Everything one (policy, rate) run produced."""

    policy: str
    runtime: str  # "sim", "vllm" or "ray"
    num_gpus: int
    num_nodes: int
    rate_per_s: float | None  # None: the trace's own arrivals
    sessions: list[SessionRecord]
    requests: list[RequestRecord]
    counters: RunCounters
    timeseries: TimeSeries
    simulated_s: float
    wall_s: float
