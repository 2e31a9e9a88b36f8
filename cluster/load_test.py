"""``mars-ray perf load``: many concurrent agent sessions through the real HTTP path,
and a check that nothing is lost, answered twice or left behind.

A fresh deployment (simulated GPUs on emulated nodes) is driven by ``num_sessions``
concurrent agents on one asyncio loop (httpx). Half send ``x-session-id``, half send
no id and resend their growing conversation (recognised from it); each half ends its
sessions in two ways: named agents mark their last turn or walk away, header-less ones
close the session named in ``x-session-id`` (``DELETE``) or walk away, and walked-away
sessions end by the idle timeout (``IDLE_TIMEOUT_WALL_S``). Half of every kind
streams. Every agent runs ``turns`` turns with a think-and-tool gap between them.
Then:

* **lost / twice**: every agent got exactly one answer per turn, turn indices 0..n-1
  in order and one session id throughout (``x-session-id``, ``x-mars-turn-index``);
  the scheduler's summaries hold each session once with all its turns;
* **left behind**: once every session has ended, no session is open, queued or
  active, no conversation key is kept, and no GPU holds KV blocks in use;
* **memory**: the RSS of the global scheduler and the ingress replica after a warm-up
  and after each round of the load (``rounds``): a leak grows round after round, an
  allocator that keeps freed pages grows once (printed, not asserted);
* **overhead**: per turn, the client's latency less the engine's own time for the
  turn (``mars.e2e_s``), p50 and p99, in wall milliseconds.

Figures are printed; the CI test (tests/ray/test_load.py) runs a smaller load and
asserts only the correctness checks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from mars_ray.actors.config import DeploymentConfig, deployment_config
from mars_ray.perf_sessions import median_and_p99

MIB = 1 << 20
# Walked-away sessions end after this much wall time without a turn: long enough that an
# overloaded 2-core machine's latency between an agent's turns never reaches it.
IDLE_TIMEOUT_WALL_S = 60.0


@dataclass(slots=True)
class AgentLog:
    """What one agent saw: per turn its session id, turn index and overhead."""

    named: bool
    walks_away: bool
    session_ids: list[str] = field(default_factory=list)
    turn_indices: list[int] = field(default_factory=list)
    overhead_ms: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class LoadResult:
    num_sessions: int
    num_turns: int
    wall_s: float
    num_failed: int  # agents with an error, or a turn not answered
    num_answered_twice: int  # turns seen twice (index repeated or out of order)
    num_split: int  # agents whose turns landed in more than one session
    num_summaries_missing: int  # sessions the scheduler has no (or a short) summary of
    left_open: int
    left_queued: int
    left_active: int
    left_conversation_keys: int
    left_kv_usage: float  # max over engines of KV blocks in use / capacity
    overhead_p50_ms: float
    overhead_p99_ms: float
    rss_mib: dict[str, list[float]]  # actor -> after warm-up, then after each round
    errors: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @property
    def clean(self) -> bool:
        """Nothing lost, answered twice or left behind."""
        return (
            self.num_failed == 0
            and self.num_answered_twice == 0
            and self.num_split == 0
            and self.num_summaries_missing == 0
            and self.left_open == self.left_queued == self.left_active == 0
            and self.left_conversation_keys == 0
            and self.left_kv_usage == 0.0
        )


def load_config(num_gpus: int, num_nodes: int, time_scale: float) -> DeploymentConfig:
    return deployment_config(
        {
            "cluster": {"num_gpus": num_gpus, "num_nodes": num_nodes},
            "placement_strategy": "SPREAD" if num_nodes > 1 else "PACK",
            "time_scale": time_scale,
            "session_idle_timeout_s": IDLE_TIMEOUT_WALL_S * time_scale,
            "inferred_session_idle_timeout_s": IDLE_TIMEOUT_WALL_S * time_scale,
        }
    )


async def _agent(
    http: httpx.AsyncClient,
    i: int,
    turns: int,
    time_scale: float,
    rng: random.Random,
    walk_aways: bool = True,
) -> AgentLog:
    log = AgentLog(named=i % 2 == 0, walks_away=walk_aways and i % 4 >= 2)
    stream = i % 8 < 4
    sid = f"load-{i}"
    messages = [
        {"role": "system", "content": "You are a coding agent. Reply with one command."},
        {"role": "user", "content": f"agent {i}: " + "fix the failing test " * rng.randint(5, 60)},
    ]
    try:
        for turn in range(turns):
            body: dict[str, Any] = {"messages": messages, "max_tokens": rng.randint(8, 48)}
            headers = {"x-session-id": sid} if log.named else {}
            if log.named and not log.walks_away and turn == turns - 1:
                body["mars"] = {"last_turn": True}
            started = time.monotonic()
            text, headers_seen, e2e_s = await _turn(http, body, headers, stream)
            latency_s = time.monotonic() - started
            log.session_ids.append(headers_seen["x-session-id"])
            log.turn_indices.append(int(headers_seen["x-mars-turn-index"]))
            log.overhead_ms.append(1000 * (latency_s - e2e_s / time_scale))
            messages += [
                {"role": "assistant", "content": text},
                {"role": "user", "content": "output: " + "ok " * rng.randint(5, 200)},
            ]
            await asyncio.sleep(rng.uniform(0.05, 0.3))  # the agent thinks and runs a tool
        if not log.named and not log.walks_away:  # it read its session from the header
            closed = await http.delete(f"/v1/sessions/{log.session_ids[-1]}")
            closed.raise_for_status()
    except Exception as exc:  # counted, not raised: every agent is accounted for
        log.error = f"agent {i}: {exc!r}"
    return log


async def _turn(
    http: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str], stream: bool
) -> tuple[str, httpx.Headers, float]:
    if not stream:
        response = await http.post("/v1/chat/completions", json=body, headers=headers)
        response.raise_for_status()
        data = response.json()
        return data["choices"][0]["message"]["content"], response.headers, data["mars"]["e2e_s"]
    pieces, e2e_s = [], 0.0
    body = {**body, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                pieces.append(choice.get("delta", {}).get("content") or "")
            e2e_s = chunk.get("mars", {}).get("e2e_s", e2e_s)
        return "".join(pieces), r.headers, e2e_s


async def _drive(
    url: str, num_sessions: int, turns: int, time_scale: float, walk_aways: bool = True
) -> list[AgentLog]:
    limits = httpx.Limits(max_connections=num_sessions, max_keepalive_connections=num_sessions)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        rngs = [random.Random(i) for i in range(num_sessions)]
        agents = (
            _agent(http, i, turns, time_scale, rngs[i], walk_aways) for i in range(num_sessions)
        )
        return await asyncio.gather(*agents)


def _actor_rss_mib() -> dict[str, float]:
    """RSS of the global scheduler and the ingress replica(s): this process's embedded
    Ray runs them as its descendants, titled ``ray::<Class>`` (another Ray on the same
    machine is not counted)."""
    import psutil

    titles = {"scheduler": "ray::GlobalScheduler", "ingress": "ray::ServeReplica:mars:mars-ingress"}
    rss: dict[str, float] = {}
    for process in psutil.Process().children(recursive=True):
        try:
            title = " ".join(process.cmdline()) or process.name()
            for key, prefix in titles.items():
                if title.startswith(prefix):
                    rss[key] = rss.get(key, 0.0) + process.memory_info().rss / MIB
        except psutil.Error:
            continue
    return rss


def _wait_until_drained(http: httpx.Client, timeout_s: float) -> dict[str, Any]:
    """Until no session is open or queued (walked-away ones end by the idle timeout)."""
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = http.get("/readyz").json()
        if status["sessions_open"] == 0 and status["phases"]["queued"] == 0:
            break
        time.sleep(0.5)
    return status


def _engines_kv_usage() -> float:
    import ray

    from mars_ray.actors.names import NAMESPACE, worker_name

    worst = 0.0
    engine = 0
    while True:
        try:
            worker = ray.get_actor(worker_name(engine), namespace=NAMESPACE)
        except ValueError:
            return worst
        snapshot: Any = ray.get(worker.snapshot.remote())
        worst = max(worst, float(snapshot.kv_usage))
        engine += 1


def _summaries_missing(logs: list[AgentLog], turns: int) -> int:
    import ray

    from mars_ray.actors.names import NAMESPACE, SCHEDULER_ACTOR_NAME

    scheduler = ray.get_actor(SCHEDULER_ACTOR_NAME, namespace=NAMESPACE)
    found: list[Any] = ray.get(scheduler.summaries.remote())
    summaries = {s.session_id: s for s in found}
    missing = 0
    for log in logs:
        summary = summaries.get(log.session_ids[0]) if log.session_ids else None
        missing += summary is None or summary.num_turns != turns
    return missing


def run_load(
    num_sessions: int = 500,
    turns: int = 3,
    num_gpus: int = 4,
    num_nodes: int = 2,
    time_scale: float = 10.0,
    rounds: int = 2,
    drain_timeout_s: float = 6 * IDLE_TIMEOUT_WALL_S,
) -> LoadResult:
    """Deploy, warm up, then ``rounds`` times: drive the load, wait for every session to
    end, check. Counts add up over the rounds."""
    from mars_ray.cluster.serving import running_deployment

    config = load_config(num_gpus, num_nodes, time_scale)
    with running_deployment(config, num_nodes=num_nodes, port=_free_port()) as running:
        url = running.url
        # warm-up (code paths, connections), with no session left to expire
        asyncio.run(_drive(url, 8, 2, time_scale, walk_aways=False))
        with httpx.Client(base_url=url, timeout=60) as http:
            _wait_until_drained(http, drain_timeout_s)
            rss = [_actor_rss_mib()]
            results = []
            for _ in range(rounds):
                started = time.monotonic()
                logs = asyncio.run(_drive(url, num_sessions, turns, time_scale))
                wall_s = time.monotonic() - started
                status = _wait_until_drained(http, drain_timeout_s)
                rss.append(_actor_rss_mib())
                results.append(_result(logs, turns, wall_s, status))
            return _combined(results, rss)


def _result(logs: list[AgentLog], turns: int, wall_s: float, status: dict[str, Any]) -> LoadResult:
    overhead_p50_ms, overhead_p99_ms = median_and_p99(
        [ms for log in logs for ms in log.overhead_ms]
    )
    return LoadResult(
        num_sessions=len(logs),
        num_turns=turns,
        wall_s=round(wall_s, 2),
        num_failed=sum(log.error is not None or len(log.turn_indices) < turns for log in logs),
        num_answered_twice=sum(log.turn_indices != sorted(set(log.turn_indices)) for log in logs),
        num_split=sum(len(set(log.session_ids)) > 1 for log in logs),
        num_summaries_missing=_summaries_missing(logs, turns),
        left_open=status["sessions_open"],
        left_queued=status["phases"]["queued"],
        left_active=status["phases"]["active"],
        left_conversation_keys=status.get("num_conversation_keys", 0),
        left_kv_usage=round(_engines_kv_usage(), 4),
        overhead_p50_ms=overhead_p50_ms,
        overhead_p99_ms=overhead_p99_ms,
        rss_mib={},
        errors=[log.error for log in logs if log.error][:10],
    )


def _combined(results: list[LoadResult], rss: list[dict[str, float]]) -> LoadResult:
    """The rounds together: counts summed, what is left taken after the last round,
    the slowest round's overhead."""
    last = results[-1]
    keys = sorted({k for r in rss for k in r})
    return dataclasses.replace(
        last,
        num_sessions=sum(r.num_sessions for r in results),
        wall_s=round(sum(r.wall_s for r in results), 2),
        num_failed=sum(r.num_failed for r in results),
        num_answered_twice=sum(r.num_answered_twice for r in results),
        num_split=sum(r.num_split for r in results),
        num_summaries_missing=sum(r.num_summaries_missing for r in results),
        overhead_p50_ms=max(r.overhead_p50_ms for r in results),
        overhead_p99_ms=max(r.overhead_p99_ms for r in results),
        rss_mib={k: [round(r.get(k, 0.0), 1) for r in rss] for k in keys},
        errors=[e for r in results for e in r.errors][:10],
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
