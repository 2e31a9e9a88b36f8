"""Prometheus metrics of a running deployment (the Ray runtime's ``/metrics``).

Every signal MARS acts on (docs/design.md §4) is exported under the ``mars_`` prefix
with its unit in the name. The global scheduler owns one :class:`Telemetry`: GPU
workers and tool executors report :class:`EngineSnapshot` / :class:`ToolPoolSnapshot`
each control tick and the scheduler records session outcomes; the ingress serves
``render()``. Cumulative engine counters arrive as totals and are turned into counter
increments here, so a restarted worker (totals back at zero) never makes a counter
go down.

:data:`METRICS` is the single list of what is exported; the Grafana dashboard test
checks every query against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

GOODPUT_ALPHAS = (1.5, 2.0, 3.0, 5.0)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # without the _total / _bucket suffixes prometheus-client adds
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


_JCT_BUCKETS_S = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
_SLOWDOWN_BUCKETS = (1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)
_SHORT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

METRICS: tuple[MetricSpec, ...] = (
    # GPU workers (one series per engine)
    MetricSpec("mars_kv_usage_ratio", "gauge", "KV blocks in use / capacity", ("engine",)),
    MetricSpec(
        "mars_kv_demand_ratio",
        "gauge",
        "KV working set (in use + kept for sessions in tools) / capacity; > 1 means thrashing",
        ("engine",),
    ),
    MetricSpec("mars_kv_evicted_blocks", "counter", "cached KV blocks evicted", ("engine",)),
    MetricSpec("mars_preemptions", "counter", "running requests preempted", ("engine",)),
    MetricSpec(
        "mars_recomputed_tokens", "counter", "tokens recomputed after eviction", ("engine",)
    ),
    MetricSpec("mars_engine_running_requests", "gauge", "requests in the batch", ("engine",)),
    MetricSpec("mars_engine_waiting_requests", "gauge", "requests queued", ("engine",)),
    MetricSpec(
        "mars_mlfq_level_requests",
        "gauge",
        "requests (running + waiting) per MLFQ level",
        ("engine", "level"),
    ),
    MetricSpec("mars_gpu_busy_seconds", "counter", "time the GPU ran steps", ("engine",)),
    # global scheduler
    MetricSpec(
        "mars_admission_window_sessions",
        "gauge",
        "AIMD admission window (sessions admitted at once); absent when unlimited",
        ("scope",),
    ),
    MetricSpec("mars_sessions_queued", "gauge", "sessions waiting for admission"),
    MetricSpec("mars_sessions_active", "gauge", "admitted sessions (on a GPU or in a tool)"),
    MetricSpec("mars_sessions_started", "counter", "sessions opened"),
    MetricSpec("mars_sessions_completed", "counter", "sessions closed after their last turn"),
    MetricSpec("mars_sessions_failed", "counter", "sessions that ended in an error"),
    MetricSpec(
        "mars_sessions_expired",
        "counter",
        "sessions ended by the idle timeout (no turn for session_idle_timeout_s)",
    ),
    MetricSpec(
        "mars_sessions_reset",
        "counter",
        "sessions whose attained service or tool history was lost (re-registered mid-way "
        "with a scheduler that did not know them)",
    ),
    MetricSpec(
        "mars_sessions_goodput",
        "counter",
        "completed sessions with slowdown <= alpha (goodput = rate / completed rate)",
        ("alpha",),
    ),
    MetricSpec(
        "mars_session_jct_seconds", "histogram", "session completion time", (), _JCT_BUCKETS_S
    ),
    MetricSpec(
        "mars_session_slowdown_ratio",
        "histogram",
        "session JCT / ideal time",
        (),
        _SLOWDOWN_BUCKETS,
    ),
    MetricSpec("mars_turns", "counter", "turns finished", ("engine",)),
    MetricSpec("mars_turn_retries", "counter", "turns retried after a worker failure"),
    MetricSpec(
        "mars_kv_migrations",
        "counter",
        "continuations placed away from their KV: moved, recomputed (the rule), failed",
        ("outcome",),
    ),
    MetricSpec("mars_kv_migrated_blocks", "counter", "KV blocks moved between GPUs"),
    MetricSpec(
        "mars_turn_ttft_seconds", "histogram", "time to first token of a turn", (), _SHORT_BUCKETS_S
    ),
    # CPU tool pool (one series per node)
    MetricSpec("mars_tool_in_flight_calls", "gauge", "tool calls running or queued", ("node",)),
    MetricSpec("mars_tool_workers", "gauge", "tool slots (CPU cores) of the pool", ("node",)),
    MetricSpec(
        "mars_tool_queue_wait_seconds",
        "gauge",
        "EMA of tool delay beyond its uncontended time",
        ("node",),
    ),
    MetricSpec("mars_tool_cpu_seconds", "counter", "CPU time used by tool calls", ("node",)),
    MetricSpec("mars_tool_calls", "counter", "tool calls finished", ("node",)),
    MetricSpec("mars_tool_retries", "counter", "tool calls retried after a worker failure"),
)

METRIC_NAMES = frozenset(m.name for m in METRICS)


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """A GPU worker's state at one instant; counters are cumulative totals."""

    engine_id: int
    node_id: int
    kv_usage: float
    kv_demand: float
    num_running: int
    num_waiting: int
    level_populations: tuple[int, ...] = ()
    num_evicted_blocks: int = 0
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0
    busy_s: float = 0.0
    incarnation: int = 0  # bumped when the worker restarts: totals restart from zero


@dataclass(frozen=True, slots=True)
class ToolPoolSnapshot:
    """A tool executor's state at one instant; counters are cumulative totals."""

    node_id: int
    num_in_flight: int
    num_workers: int
    wait_ema_s: float
    cpu_s: float = 0.0
    num_completed: int = 0
    incarnation: int = 0


@dataclass(slots=True)
class _Totals:
    incarnation: int = -1
    values: dict[str, float] = field(default_factory=dict)


class Telemetry:
    """The deployment's metrics, in a registry of their own (never the global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._m: dict[str, Counter | Gauge | Histogram] = {}
        for spec in METRICS:
            self._m[spec.name] = _make(spec, self.registry)
        self._totals: dict[tuple[str, int], _Totals] = {}

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    # -- engines and tool pools ------------------------------------------------
    def observe_engine(self, s: EngineSnapshot) -> None:
        e = str(s.engine_id)
        self._gauge("mars_kv_usage_ratio", e).set(s.kv_usage)
        self._gauge("mars_kv_demand_ratio", e).set(s.kv_demand)
        self._gauge("mars_engine_running_requests", e).set(s.num_running)
        self._gauge("mars_engine_waiting_requests", e).set(s.num_waiting)
        for level, count in enumerate(s.level_populations):
            self._gauge("mars_mlfq_level_requests", e, str(level)).set(count)
        totals = {
            "mars_kv_evicted_blocks": float(s.num_evicted_blocks),
            "mars_preemptions": float(s.num_preemptions),
            "mars_recomputed_tokens": float(s.num_recomputed_tokens),
            "mars_gpu_busy_seconds": s.busy_s,
        }
        self._add_totals(("engine", s.engine_id), s.incarnation, totals, e)

    def observe_tool_pool(self, s: ToolPoolSnapshot) -> None:
        n = str(s.node_id)
        self._gauge("mars_tool_in_flight_calls", n).set(s.num_in_flight)
        self._gauge("mars_tool_workers", n).set(s.num_workers)
        self._gauge("mars_tool_queue_wait_seconds", n).set(s.wait_ema_s)
        totals = {"mars_tool_cpu_seconds": s.cpu_s, "mars_tool_calls": float(s.num_completed)}
        self._add_totals(("node", s.node_id), s.incarnation, totals, n)

    # -- the global scheduler ----------------------------------------------------
    def observe_admission(
        self, windows: Sequence[int | None], num_queued: int, num_active: int
    ) -> None:
        for scope, window in enumerate(windows):
            if window is not None:
                self._gauge("mars_admission_window_sessions", str(scope)).set(window)
        self._gauge("mars_sessions_queued").set(num_queued)
        self._gauge("mars_sessions_active").set(num_active)

    def session_started(self) -> None:
        self._counter("mars_sessions_started").inc()

    def session_completed(self, jct_s: float, slowdown: float) -> None:
        self._counter("mars_sessions_completed").inc()
        self._histogram("mars_session_jct_seconds").observe(jct_s)
        self._histogram("mars_session_slowdown_ratio").observe(slowdown)
        for alpha in GOODPUT_ALPHAS:
            if slowdown <= alpha:
                self._counter("mars_sessions_goodput", f"{alpha:g}").inc()

    def session_failed(self) -> None:
        self._counter("mars_sessions_failed").inc()

    def session_expired(self) -> None:
        self._counter("mars_sessions_expired").inc()

    def session_reset(self) -> None:
        self._counter("mars_sessions_reset").inc()

    def turn_finished(self, engine_id: int, ttft_s: float) -> None:
        self._counter("mars_turns", str(engine_id)).inc()
        self._histogram("mars_turn_ttft_seconds").observe(ttft_s)

    def turn_retried(self) -> None:
        self._counter("mars_turn_retries").inc()

    def kv_migration(self, outcome: str, num_blocks: int = 0) -> None:
        """A continuation placed away from its KV: ``moved``, ``recomputed`` or ``failed``."""
        self._counter("mars_kv_migrations", outcome).inc()
        if num_blocks:
            self._counter("mars_kv_migrated_blocks").inc(num_blocks)

    def tool_retried(self) -> None:
        self._counter("mars_tool_retries").inc()

    # -- helpers -------------------------------------------------------------------
    def _add_totals(
        self, key: tuple[str, int], incarnation: int, totals: dict[str, float], label: str
    ) -> None:
        seen = self._totals.setdefault(key, _Totals())
        if incarnation != seen.incarnation:  # a new worker: its totals start from zero
            seen.incarnation, seen.values = incarnation, {}
        for name, total in totals.items():
            delta = total - seen.values.get(name, 0.0)
            if delta > 0:
                self._counter(name, label).inc(delta)
            seen.values[name] = max(total, seen.values.get(name, 0.0))

    def _gauge(self, name: str, *labels: str) -> Gauge:
        metric = self._m[name]
        assert isinstance(metric, Gauge), name
        return metric.labels(*labels) if labels else metric

    def _counter(self, name: str, *labels: str) -> Counter:
        metric = self._m[name]
        assert isinstance(metric, Counter), name
        return metric.labels(*labels) if labels else metric

    def _histogram(self, name: str, *labels: str) -> Histogram:
        metric = self._m[name]
        assert isinstance(metric, Histogram), name
        return metric.labels(*labels) if labels else metric


def _make(spec: MetricSpec, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, spec.labels, registry=registry)
    if spec.kind == "histogram":
        return Histogram(spec.name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)
    raise ValueError(f"unknown metric kind {spec.kind!r}")


def exported_series_names() -> frozenset[str]:
    """Every series name a scrape can return (with the suffixes prometheus-client adds)."""
    names: set[str] = set()
    for spec in METRICS:
        if spec.kind == "counter":
            names |= {spec.name + "_total", spec.name + "_created"}
        elif spec.kind == "histogram":
            names |= {spec.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(spec.name)
    return frozenset(names)
