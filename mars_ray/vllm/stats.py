"""What a driver sees of a running vLLM engine: a stat logger that fills a board.

vLLM 0.29's ``AsyncLLM`` hands every step's ``SchedulerStats`` and ``IterationStats``
to its stat loggers, in the client process (the engine core may run in a child
process). :class:`BoardStatLogger` keeps what admission control and placement read
(KV usage, running and waiting requests) and what a run reports (preemptions) on an
:class:`EngineBoard`; pass ``stat_loggers=[BoardStatLogger.factory(board)]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats


@dataclass(slots=True)
class EngineBoard:
    """The latest state of one engine, as of its last step."""

    kv_usage: float = 0.0  # blocks held by requests / all blocks (cached free ones are free)
    num_running: int = 0
    num_waiting: int = 0
    num_steps: int = 0
    num_preemptions: int = 0  # since the engine started
    num_prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    num_prefix_hits: int = 0


class BoardStatLogger(StatLoggerBase):
    """A vLLM stat logger that only records onto an :class:`EngineBoard`."""

    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0, *, board: EngineBoard):
        self.board = board

    @classmethod
    def factory(cls, board: EngineBoard) -> Callable[[VllmConfig, int], StatLoggerBase]:
        """What ``AsyncLLM(stat_loggers=[...])`` takes: one logger per engine core."""

        def make(vllm_config: VllmConfig, engine_index: int) -> StatLoggerBase:
            return cls(vllm_config, engine_index, board=board)

        return make

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: MultiModalCacheStats | None = None,
        engine_idx: int = 0,
    ) -> None:
        board = self.board
        if scheduler_stats is not None:
            board.kv_usage = scheduler_stats.kv_cache_usage
            board.num_running = scheduler_stats.num_running_reqs
            board.num_waiting = (
                scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            )
            board.num_steps += 1
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:  # per step (vLLM resets it after each report)
                board.num_prefix_queries += prefix.queries
                board.num_prefix_hits += prefix.hits
        if iteration_stats is not None:
            board.num_preemptions += iteration_stats.num_preempted_reqs

    def log_engine_initialized(self) -> None:
        """Nothing to log."""
