"""SimulatedExecutor's device timeline and busy tracking, and the stat-logger board the
vLLM runtime reads (no engine process: vLLM's scheduler and stats types, for real)."""

from __future__ import annotations

from pathlib import Path

import pytest
from factories import make_request, make_scheduler
from vllm.v1.metrics.stats import IterationStats, SchedulerStats

from mars_ray.vllm.executor import DeviceTimeline, SimulatedModelRunner
from mars_ray.vllm.hints import SessionHints
from mars_ray.vllm.scheduler import MarsScheduler
from mars_ray.vllm.stats import BoardStatLogger, EngineBoard


def test_a_busy_engine_runs_steps_back_to_back() -> None:
    timeline = DeviceTimeline()
    assert timeline.end_of(submitted_at=10.0, duration_s=1.0, busy=False) == 11.0
    # submitted late (the engine's own CPU work) but busy: starts when the last ended
    assert timeline.end_of(submitted_at=11.4, duration_s=1.0, busy=True) == 12.0
    # idle in between: starts when submitted
    assert timeline.end_of(submitted_at=20.0, duration_s=0.5, busy=False) == 20.5
    # never before the device is free
    assert timeline.end_of(submitted_at=20.1, duration_s=0.5, busy=False) == 21.0
    timeline.on_late(0.25)
    timeline.on_late(0.5)
    assert (timeline.late_s, timeline.max_late_s) == (0.75, 0.5)


def test_the_runner_knows_when_requests_are_left_unfinished(tiny_model_dir: Path) -> None:
    """The timeline's busy flag: some request seen has tokens left to sample."""
    sched = make_scheduler(MarsScheduler, tiny_model_dir)
    runner = SimulatedModelRunner(vocab_size=2048)
    sched.add_request(make_request("r", 40, 3, hints=SessionHints("s")))
    busy_after = []
    while sched.has_requests():
        so = sched.schedule()
        _, output = runner.shape_and_output(so)
        sched.update_from_output(so, output)
        busy_after.append(runner.has_unfinished)
    # prefill + 1st token, 2nd, 3rd (done); then the step that reports it finished
    assert busy_after == [True, True, False, False]


def test_the_board_keeps_the_latest_state_and_counts_preemptions() -> None:
    board = EngineBoard()
    stat_logger = BoardStatLogger.factory(board)(None, 0)  # type: ignore[arg-type]
    stats = SchedulerStats(
        num_running_reqs=3, num_waiting_reqs=2, num_skipped_waiting_reqs=1, kv_cache_usage=0.5
    )
    iteration = IterationStats()
    iteration.num_preempted_reqs = 2
    stat_logger.record(stats, iteration)
    stat_logger.record(SchedulerStats(num_running_reqs=1, kv_cache_usage=0.25), iteration)
    assert (board.num_running, board.num_waiting) == (1, 0)
    assert board.kv_usage == pytest.approx(0.25)
    assert board.num_preemptions == 4 and board.num_steps == 2
