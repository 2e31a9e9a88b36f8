"""``mars-ray bench --runtime ray``: one run = a fresh deployment, a trace replayed over
HTTP, faults injected on schedule, and a :class:`RunResult` like the simulator's.

Faults (``--fault KIND@T``, T wall seconds after the replay starts; repeatable):

* ``kill-gpu-worker@T`` kills the lowest-numbered live GPU worker;
* ``kill-tool-worker@T`` kills the tool executor of node 0 (it is re-created);
* ``remove-node@T`` removes the last emulated node (embedded multi-node Ray only);
* ``kill-scheduler@T`` kills the global scheduler actor (Ray restarts it; it reads
  its state back from the GCS store: ``num_sessions_reset`` in summary.json counts
  the sessions whose service or tool history was lost anyway).
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from mars_ray.actors.config import DeploymentConfig
from mars_ray.config import ClusterConfig, EngineConfig
from mars_ray.engine.costmodel import CostModel, load_profile
from mars_ray.engine.ideal import session_ideal_s
from mars_ray.errors import ConfigError
from mars_ray.results import RunCounters, RunResult, SessionRecord, TimeSeries
from mars_ray.session import SessionSpec

FAULT_KINDS = ("kill-gpu-worker", "kill-tool-worker", "remove-node", "kill-scheduler")
_FAULT_RE = re.compile(r"^(?P<kind>[a-z-]+)@(?P<at>\d+(\.\d+)?)s?$")


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    at_s: float  # wall seconds after the replay starts

    def __str__(self) -> str:
        return f"{self.kind}@{self.at_s:g}s"


def parse_fault(text: str) -> Fault:
    """``kill-gpu-worker@20s`` -> Fault; a bad spec raises ConfigError saying the form."""
    match = _FAULT_RE.match(text.strip())
    if match is None or match["kind"] not in FAULT_KINDS:
        raise ConfigError(
            f"bad --fault {text!r}: expected KIND@SECONDS with KIND one of {', '.join(FAULT_KINDS)}"
        )
    return Fault(match["kind"], float(match["at"]))


def run_ray(
    sessions: Sequence[SessionSpec],
    policy: str,
    *,
    cluster: ClusterConfig,
    engine: EngineConfig,
    time_scale: float,
    faults: Sequence[Fault] = (),
    rate_per_s: float | None = None,
    seed: int = 0,
    address: str | None = None,
    burn_cpu: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Serve, replay ``sessions`` over HTTP, inject ``faults``; returns the run's result."""
    from mars_ray.workloads.replay import replay

    from .serving import running_deployment

    config = DeploymentConfig(
        policy=policy,
        cluster=cluster,
        engine_config=engine,
        time_scale=time_scale,
        placement_strategy="SPREAD" if cluster.num_nodes > 1 else "PACK",
        seed=seed,
        tools={"allow_replay": True, "max_replay_s": 86_400.0},  # replays every traced call
    )
    if any(f.kind == "remove-node" for f in faults) and (cluster.num_nodes < 2 or address):
        raise ConfigError(
            "--fault remove-node needs the embedded multi-node Ray (--nodes >= 2, no --address)"
        )
    with running_deployment(
        config,
        address=address,
        num_nodes=cluster.num_nodes if address is None else 1,
        port=_free_port(),
    ) as running:
        stop = threading.Event()
        injector = threading.Thread(
            target=_inject, args=(faults, running, stop), name="mars-faults", daemon=True
        )
        injector.start()
        try:
            result = asyncio.run(
                replay(
                    running.url,
                    sessions,
                    time_scale=time_scale,
                    on_progress=on_progress,
                    burn_cpu=burn_cpu,
                )
            )
        finally:
            stop.set()
            injector.join()
        counters = _counters(running.url, cluster.num_gpus, result.span_s, time_scale)
    cost = CostModel(load_profile(cluster.gpu, cluster.model))
    specs = {s.session_id: s for s in sessions}
    records = [
        SessionRecord(
            session_id=o.session_id,
            arrival_s=o.arrival_s,
            admitted_s=None,
            finish_s=o.finish_s,
            ideal_s=session_ideal_s(cost, engine, specs[o.session_id]),
            num_turns=specs[o.session_id].num_turns,
            tool_s=o.tool_s,
            tool_ideal_s=specs[o.session_id].total_tool_s,
            failed_reason=o.failed_reason,
        )
        for o in result.sessions
    ]
    return RunResult(
        policy=policy,
        runtime="ray",
        num_gpus=cluster.num_gpus,
        num_nodes=cluster.num_nodes,
        rate_per_s=rate_per_s,
        sessions=records,
        requests=[r for o in result.sessions for r in o.requests],
        counters=counters,
        timeseries=TimeSeries(),
        simulated_s=result.span_s,
        wall_s=result.wall_s,
    )


def _inject(faults: Sequence[Fault], running: object, stop: threading.Event) -> None:
    import ray

    from mars_ray.actors.names import (
        NAMESPACE,
        SCHEDULER_ACTOR_NAME,
        executor_name,
        worker_name,
    )

    started = time.monotonic()
    for fault in sorted(faults, key=lambda f: f.at_s):
        if stop.wait(max(0.0, fault.at_s - (time.monotonic() - started))):
            return
        if fault.kind == "kill-gpu-worker":
            scheduler = ray.get_actor(SCHEDULER_ACTOR_NAME, namespace=NAMESPACE)
            status = cast(dict[str, Any], ray.get(scheduler.status.remote()))
            alive = status["alive_engines"]
            if alive:
                ray.kill(ray.get_actor(worker_name(alive[0]), namespace=NAMESPACE))
        elif fault.kind == "kill-tool-worker":
            ray.kill(ray.get_actor(executor_name(0), namespace=NAMESPACE))
        elif fault.kind == "kill-scheduler":
            scheduler = ray.get_actor(SCHEDULER_ACTOR_NAME, namespace=NAMESPACE)
            ray.kill(scheduler, no_restart=False)
        elif fault.kind == "remove-node":
            local = running.ray  # type: ignore[attr-defined]
            nodes = list(local.cluster.worker_nodes)
            local.cluster.remove_node(nodes[-1])


def _counters(url: str, num_gpus: int, span_s: float, time_scale: float) -> RunCounters:
    """Totals scraped from the deployment's own ``/metrics`` at the end of the run."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            if sample.name == "mars_kv_migrations_total":
                key = f"kv_migrations_{sample.labels['outcome']}"
                totals[key] = totals.get(key, 0.0) + sample.value
    busy_s = totals.get("mars_gpu_busy_seconds_total", 0.0)
    return RunCounters(
        num_preemptions=int(totals.get("mars_preemptions_total", 0)),
        num_evicted_blocks=int(totals.get("mars_kv_evicted_blocks_total", 0)),
        num_recomputed_tokens=int(totals.get("mars_recomputed_tokens_total", 0)),
        gpu_busy_frac=busy_s / (span_s * num_gpus) if span_s > 0 else math.nan,
        num_retries=int(
            totals.get("mars_turn_retries_total", 0) + totals.get("mars_tool_retries_total", 0)
        ),
        num_kv_moves=int(totals.get("kv_migrations_moved", 0)),
        num_kv_moved_blocks=int(totals.get("mars_kv_migrated_blocks_total", 0)),
        num_sessions_expired=int(totals.get("mars_sessions_expired_total", 0)),
        num_sessions_reset=int(totals.get("mars_sessions_reset_total", 0)),
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
