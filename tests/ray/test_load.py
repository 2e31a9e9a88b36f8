"""Load without loss (CI size of ``mars-ray perf load``, which prints the full figures):
concurrent agent sessions through the real HTTP path of a simulated 4-GPU, 2-node
deployment; named and header-less agents, streamed and not. Asserts only correctness:
every turn answered once and in order, each agent one session, every session
summarised with all its turns, and nothing left behind (no open, queued or active
session, no conversation key, no KV in use) once they have ended."""

from __future__ import annotations

from mars_ray.cluster.load_test import run_load


def test_concurrent_sessions_lose_nothing_and_leave_nothing() -> None:
    result = run_load(num_sessions=100, turns=3, num_gpus=4, num_nodes=2, rounds=1)
    print(result.to_json())  # the figures (RSS, overhead) for the log, never asserted
    assert result.errors == []
    assert result.num_failed == 0 and result.num_answered_twice == 0
    assert result.num_split == 0 and result.num_summaries_missing == 0
    assert (result.left_open, result.left_queued, result.left_active) == (0, 0, 0)
    assert result.left_conversation_keys == 0 and result.left_kv_usage == 0.0
    assert result.clean
