"""Session, request and run metrics over the boundary types of :mod:`mars_ray.results`.

Pure functions: every runtime (simulator, Ray, vLLM) produces a :class:`RunResult`
and these turn it into the numbers of docs/design.md §8.

Conventions:

- Session latency (JCT, slowdown) is taken over *completed* sessions only; goodput
  is a fraction of *all* sessions, so failed or unfinished sessions count as not
  meeting the bound.
- Percentiles are numpy's default (linear interpolation), as ``vllm bench serve``.
- A statistic over no samples is ``None``, never NaN: summaries go straight to JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mars_ray.results import RequestRecord, RunResult, SessionRecord

GOODPUT_ALPHAS: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0)
"""Slowdown bounds reported as goodput (docs/design.md §2; the paper's default is 3)."""

DEFAULT_ALPHA = 3.0


def alpha_key(alpha: float) -> str:
    """JSON key of a goodput bound: ``1.5 -> "1.5"``, ``3.0 -> "3"``."""
    return f"{alpha:g}"


@dataclass(frozen=True, slots=True)
class SessionMetrics:
    """Session-level latency and goodput (docs/design.md §8)."""

    num_sessions: int
    num_completed: int
    num_failed: int  # failed_reason set; sessions merely unfinished are neither
    mean_jct_s: float | None
    p50_jct_s: float | None
    p90_jct_s: float | None
    p95_jct_s: float | None
    p99_jct_s: float | None
    mean_slowdown: float | None
    goodput: dict[str, float | None]  # alpha_key(alpha) -> fraction of all sessions
    sessions_per_min_goodput: float | None  # sessions/min meeting DEFAULT_ALPHA


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    """Per-request (per-turn) serving metrics with ``vllm bench serve`` field names.

    TPOT is ``(E2EL - TTFT) / (output_tokens - 1)`` over requests with more than one
    output token. Our engines emit one token per request per step, so each request's
    inter-token latencies average to its TPOT; ``mean_itl_ms`` pools every gap across
    requests as vLLM does, i.e. ``sum(decode spans) / sum(output_tokens - 1)``: the
    token-weighted mean TPOT (exact for vLLM's definition, whatever the gaps' spread).
    """

    num_requests: int
    mean_ttft_ms: float | None
    median_ttft_ms: float | None
    p99_ttft_ms: float | None
    mean_tpot_ms: float | None
    median_tpot_ms: float | None
    p99_tpot_ms: float | None
    mean_itl_ms: float | None
    mean_e2el_ms: float | None
    median_e2el_ms: float | None
    p99_e2el_ms: float | None
    request_throughput: float | None  # requests/s
    output_throughput: float | None  # output tokens/s
    total_token_throughput: float | None  # (prompt + output) tokens/s


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _ms(value_s: float | None) -> float | None:
    return None if value_s is None else value_s * 1e3


def _per_s(count: float, duration_s: float | None) -> float | None:
    return None if not duration_s or duration_s <= 0 else count / duration_s


def session_slowdown(record: SessionRecord) -> float | None:
    """JCT / ideal time of a completed session; ``None`` if unfinished, failed or ideal <= 0."""
    jct_s = record.jct_s
    if not record.completed or jct_s is None or record.ideal_s <= 0:
        return None
    return jct_s / record.ideal_s


def goodput_fraction(sessions: Sequence[SessionRecord], alpha: float) -> float | None:
    """Fraction of all sessions completed with slowdown <= ``alpha``; None for no sessions."""
    if not sessions:
        return None
    slowdowns = (session_slowdown(s) for s in sessions)
    return sum(1 for x in slowdowns if x is not None and x <= alpha) / len(sessions)


def _span_s(sessions: Sequence[SessionRecord]) -> float | None:
    finishes = [s.finish_s for s in sessions if s.finish_s is not None]
    if not finishes:
        return None
    return max(finishes) - min(s.arrival_s for s in sessions)


def session_metrics(
    sessions: Sequence[SessionRecord], *, duration_s: float | None = None
) -> SessionMetrics:
    """JCT, slowdown and goodput of a run's sessions.

    ``duration_s`` is the time over which sessions/min is counted (the run's
    simulated span); by default first arrival to last finish.
    """
    completed = [s for s in sessions if s.completed]
    jcts_s = [s.jct_s for s in completed if s.jct_s is not None]
    slowdowns = [x for x in map(session_slowdown, completed) if x is not None]
    goodput = {alpha_key(a): goodput_fraction(sessions, a) for a in GOODPUT_ALPHAS}
    span_s = duration_s if duration_s is not None else _span_s(sessions)
    fraction = goodput[alpha_key(DEFAULT_ALPHA)]
    meeting = 0.0 if fraction is None else fraction * len(sessions)
    per_s = _per_s(meeting, span_s)
    return SessionMetrics(
        num_sessions=len(sessions),
        num_completed=len(completed),
        num_failed=sum(1 for s in sessions if s.failed_reason is not None),
        mean_jct_s=_mean(jcts_s),
        p50_jct_s=_percentile(jcts_s, 50),
        p90_jct_s=_percentile(jcts_s, 90),
        p95_jct_s=_percentile(jcts_s, 95),
        p99_jct_s=_percentile(jcts_s, 99),
        mean_slowdown=_mean(slowdowns),
        goodput=goodput,
        sessions_per_min_goodput=None if per_s is None else per_s * 60.0,
    )


def _request_span_s(requests: Sequence[RequestRecord]) -> float | None:
    if not requests:
        return None
    return max(r.finish_s for r in requests) - min(r.submit_s for r in requests)


def _pooled_itl_s(requests: Sequence[RequestRecord]) -> float | None:
    streams = [r for r in requests if r.output_tokens > 1]
    num_gaps = sum(r.output_tokens - 1 for r in streams)
    if not num_gaps:
        return None
    return sum(r.finish_s - r.first_token_s for r in streams) / num_gaps


def request_metrics(
    requests: Sequence[RequestRecord], *, duration_s: float | None = None
) -> RequestMetrics:
    """TTFT / TPOT / ITL / E2EL and throughputs, as ``vllm bench serve`` reports them.

    ``duration_s`` is the denominator of the throughputs (the run's span); by
    default first submission to last finish.
    """
    ttfts_s = [r.ttft_s for r in requests]
    tpots_s = [x for x in (r.tpot_s for r in requests) if x is not None]
    e2els_s = [r.e2el_s for r in requests]
    span_s = duration_s if duration_s is not None else _request_span_s(requests)
    num_output = sum(r.output_tokens for r in requests)
    num_prompt = sum(r.prompt_tokens for r in requests)
    return RequestMetrics(
        num_requests=len(requests),
        mean_ttft_ms=_ms(_mean(ttfts_s)),
        median_ttft_ms=_ms(_percentile(ttfts_s, 50)),
        p99_ttft_ms=_ms(_percentile(ttfts_s, 99)),
        mean_tpot_ms=_ms(_mean(tpots_s)),
        median_tpot_ms=_ms(_percentile(tpots_s, 50)),
        p99_tpot_ms=_ms(_percentile(tpots_s, 99)),
        mean_itl_ms=_ms(_pooled_itl_s(requests)),
        mean_e2el_ms=_ms(_mean(e2els_s)),
        median_e2el_ms=_ms(_percentile(e2els_s, 50)),
        p99_e2el_ms=_ms(_percentile(e2els_s, 99)),
        request_throughput=_per_s(len(requests), span_s) if requests else None,
        output_throughput=_per_s(num_output, span_s) if requests else None,
        total_token_throughput=_per_s(num_prompt + num_output, span_s) if requests else None,
    )


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats as ``None`` and numpy scalars as Python ones, recursively."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _per_min(count: int, duration_s: float) -> float | None:
    rate = _per_s(count, duration_s)
    return None if rate is None else rate * 60.0


def summarize_run(run: RunResult, *, load: float | None = None) -> dict[str, Any]:
    """One ``runs`` entry of ``summary.json`` (docs/design.md §8), JSON-safe.

    The keys of docs/design.md §8 come first, then extras: ``nodes``, ``p95_jct_s``,
    ``sessions_per_min_goodput`` (alpha = 3), ``speedup_vs_real_time`` (simulated_s /
    wall_s), ``retries``, ``cpu_utilization``, ``mean_tool_queue_wait_s``, per-minute
    preemptions and evicted blocks, the remaining request metrics, and ``load``
    (fraction of the estimated saturation rate) when given.
    """
    duration_s = run.simulated_s if run.simulated_s > 0 else None
    sm = session_metrics(run.sessions, duration_s=duration_s)
    rm = request_metrics(run.requests, duration_s=duration_s)
    c = run.counters
    entry: dict[str, Any] = {
        "policy": run.policy,
        "runtime": run.runtime,
        "gpus": run.num_gpus,
        "rate_per_s": run.rate_per_s,
        "num_sessions": sm.num_sessions,
        "num_completed": sm.num_completed,
        "num_failed": sm.num_failed,
        "mean_jct_s": sm.mean_jct_s,
        "p50_jct_s": sm.p50_jct_s,
        "p90_jct_s": sm.p90_jct_s,
        "p99_jct_s": sm.p99_jct_s,
        "mean_slowdown": sm.mean_slowdown,
        "goodput": sm.goodput,
        "mean_ttft_ms": rm.mean_ttft_ms,
        "p99_ttft_ms": rm.p99_ttft_ms,
        "mean_tpot_ms": rm.mean_tpot_ms,
        "preemptions": c.num_preemptions,
        "evicted_blocks": c.num_evicted_blocks,
        "recomputed_tokens": c.num_recomputed_tokens,
        "gpu_busy_frac": c.gpu_busy_frac,
        "simulated_s": run.simulated_s,
        "wall_s": run.wall_s,
        # extras
        "nodes": run.num_nodes,
        "p95_jct_s": sm.p95_jct_s,
        "sessions_per_min_goodput": sm.sessions_per_min_goodput,
        "speedup_vs_real_time": run.simulated_s / run.wall_s if run.wall_s > 0 else None,
        "retries": c.num_retries,
        "cpu_utilization": c.cpu_utilization,
        "mean_tool_queue_wait_s": c.mean_tool_queue_wait_s,
        "preemptions_per_min": _per_min(c.num_preemptions, run.simulated_s),
        "evicted_blocks_per_min": _per_min(c.num_evicted_blocks, run.simulated_s),
        "offloaded_blocks": c.num_offloaded_blocks,
        "reloaded_blocks": c.num_reloaded_blocks,
        "kv_moves": c.num_kv_moves,
        "kv_moved_blocks": c.num_kv_moved_blocks,
        "sessions_expired": c.num_sessions_expired,
        "num_sessions_reset": c.num_sessions_reset,
    }
    extra_request = {k: v for k, v in asdict(rm).items() if k not in entry}
    entry.update(extra_request)
    if load is not None:
        entry["load"] = load
    result: dict[str, Any] = json_safe(entry)
    return result
