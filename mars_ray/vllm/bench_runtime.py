"""``mars-ray bench --runtime vllm``: the bench's sessions through real vLLM engines.

One vLLM 0.29 engine per GPU - ``AsyncLLM`` with :class:`MarsScheduler`
(``scheduler_cls``) and :class:`SimulatedExecutor` (``distributed_executor_backend``)
pricing steps with the cost model of ``cluster.gpu`` / ``cluster.model`` - with as
many KV blocks as the simulator's ``SimEngine`` has. Above the engines runs the
simulator's own logic, in scaled wall-clock time: the :class:`ClusterScheduler`
admits sessions (AIMD window for MARS) and places turns, a :class:`ToolPool` per
node runs the tool calls (processor sharing over the node's cores: a call takes its
``tool_s`` unless the cores are oversubscribed), and each admitted session is a
coroutine whose turns are requests with session hints. A turn's prompt is the
session's context so far - earlier prompts and the tokens vLLM generated, token for
token - plus its new tokens (seeded, distinct per session), so vLLM's prefix cache
hits exactly where the simulator's ``(session, block)`` hashes do.

Why ``AsyncLLM`` and not ``LLMEngine`` stepped in a loop: its engine core runs in a
child process, so the step loop (scheduler and simulated device) is never held up by
this process's work - session coroutines, output processing, admission ticks - and
the sessions meet the engine as clients of a deployment do, through the engine that
``vllm serve`` and Ray Serve LLM run. The simulated device keeps its own timeline
(``mars_ray.vllm.executor``), so the engine core's CPU time between the steps of a
busy engine is not simulated time either; :attr:`VllmRun.late_frac` says when the
machine could not keep up with ``time_scale``. What stays real is the latency of a
turn reaching an idle engine (client, IPC, prompt hashing: a few wall milliseconds,
``time_scale`` times that simulated).

Time: ``time_scale`` simulated seconds per wall second everywhere - the executor
sleeps ``step_s / time_scale``, MarsScheduler's policy clock and this driver's clock
run ``time_scale`` times faster than the wall; every reported time is simulated.

What vLLM 0.29 does not report, and so is approximated or absent:

* ``recomputed_tokens``: per turn, the context computed before minus the prefix-cache
  hit (re-prefill after eviction); recompute after a preemption is not visible.
* ``evicted_blocks``: 0 (vLLM counts no evictions; its KV residency metrics sample).
* per-request preemptions: 0 (the run's total comes from vLLM's iteration stats).
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from mars_ray.config import ClusterConfig, EngineConfig
from mars_ray.engine.costmodel import CostModel, Profile, load_profile, num_kv_blocks
from mars_ray.engine.ideal import session_ideal_s
from mars_ray.errors import ConfigError, InfeasibleError, MarsError
from mars_ray.policies.base import ClusterSignals, EngineLoad, SessionTicket
from mars_ray.policies.cluster import ClusterScheduler, Placement, ToolPoolLoad, scope_signals
from mars_ray.policies.registry import PolicyConfig, PolicySpec, get_policy
from mars_ray.results import RequestRecord, RunCounters, RunResult, SessionRecord, TimeSeries
from mars_ray.session import SessionSpec
from mars_ray.sim.tool_pool import ToolCall, ToolPool

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.outputs import RequestOutput
    from vllm.v1.engine.async_llm import AsyncLLM

    from mars_ray.vllm.stats import EngineBoard

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]

#: the first id of the tokens a turn appends (the simulated model emits 100..1099)
FIRST_NEW_TOKEN_ID = 2000
#: outputs later than this fraction of a turn's latency: the machine is too slow
LATE_WARNING_FRAC = 0.005
TIMESERIES_COLUMNS = (
    "kv_usage",
    "admission_window",
    "num_running",
    "num_waiting",
    "num_queued_sessions",
    "num_tools_in_flight",
)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """One simulated GPU's counters at the end of a run (``SimulatedExecutor``).

    A step's output is *late* when this machine delivered it after the step's end
    on the device timeline (the engine's CPU work outlasted the step, or the thread
    woke late); the timeline catches up on later steps, so lateness does not add
    up across steps, but every turn's end is seen that much later.
    """

    num_steps: int
    simulated_busy_s: float
    mean_late_s: float  # simulated seconds per step
    max_late_s: float  # simulated seconds, the worst step

    @classmethod
    def from_stats(cls, stats: dict[str, float], time_scale: float) -> DeviceReport:
        """From :data:`~mars_ray.vllm.executor.STATS_RPC`'s answer (wall seconds)."""
        num_steps = int(stats["num_steps"])
        return cls(
            num_steps,
            float(stats["simulated_busy_s"]),
            float(stats["late_s"]) * time_scale / max(1, num_steps),
            float(stats["max_late_s"]) * time_scale,
        )


class VllmRun(NamedTuple):
    """A run's result plus what only this runtime knows."""

    result: RunResult
    devices: list[DeviceReport]
    startup_s: float  # wall seconds to start the engines (not in ``result.wall_s``)

    @property
    def late_frac(self) -> float:
        """The worst device's mean lateness per step over the mean turn latency: how
        much this machine stretched the turns (0: it kept up with the time scale)."""
        e2el = [r.e2el_s for r in self.result.requests]
        mean_e2el_s = sum(e2el) / len(e2el) if e2el else 0.0
        late_s = max((d.mean_late_s for d in self.devices), default=0.0)
        return late_s / mean_e2el_s if mean_e2el_s > 0 else 0.0


class TurnTokens(NamedTuple):
    """A finished turn's token accounting, as far as vLLM 0.29 reports it."""

    recomputed: int  # earlier context computed again (it was evicted meanwhile)
    service: int  # tokens the engine computed for the turn (prefill misses + outputs)

    @classmethod
    def of(cls, num_prompt: int, num_output: int, cached: int, computed_before: int) -> TurnTokens:
        """``computed_before``: the session's context whose KV was computed by the end
        of its previous turn (all but that turn's last output token)."""
        recomputed = max(0, min(computed_before, num_prompt) - cached)
        return cls(recomputed, num_prompt - cached + num_output)


# --------------------------------------------------------------------------- time


@dataclass(frozen=True, slots=True)
class ScaledClock:
    """Wall-clock time run ``time_scale`` times faster, simulated 0 at ``origin``.

    ``origin`` is a ``time.monotonic()`` value, the clock of asyncio's loop and of
    vLLM's engine timestamps (``CLOCK_MONOTONIC``, shared by processes).
    """

    time_scale: float
    origin: float

    @classmethod
    def starting_now(cls, time_scale: float) -> ScaledClock:
        return cls(time_scale, time.monotonic())

    def now_s(self) -> float:
        return (time.monotonic() - self.origin) * self.time_scale

    def sim_s(self, monotonic_s: float) -> float:
        """Simulated time of a monotonic timestamp."""
        return (monotonic_s - self.origin) * self.time_scale

    def monotonic_at(self, sim_s: float) -> float:
        """The monotonic (asyncio loop) time of simulated time ``sim_s``."""
        return self.origin + sim_s / self.time_scale


# --------------------------------------------------------------------------- engines


def write_model_config(profile: Profile, max_model_len: int, directory: Path) -> Path:
    """A ``config.json`` vLLM accepts for ``profile``'s model, in ``directory``.

    Only the KV cache's shape matters to ``SimulatedExecutor`` (layers, KV heads,
    head size, bf16), so every model is written as a Llama of that shape; no weights
    are loaded (``load_format="dummy"``) and no tokenizer is needed.
    """
    m = profile.model
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size or m.moe_intermediate_size or 4 * m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_q_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": max(max_model_len, m.max_model_len_tokens),
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": m.tie_word_embeddings,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def engine_args(
    model_dir: Path,
    policy: str,
    cluster: ClusterConfig,
    engine: EngineConfig,
    *,
    num_blocks: int,
    max_model_len: int,
    time_scale: float,
) -> AsyncEngineArgs:
    """Engine arguments of one simulated GPU running ``policy`` inside vLLM."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from mars_ray.vllm.executor import SimulatedExecutor
    from mars_ray.vllm.scheduler import MarsScheduler
    from mars_ray.vllm.validation import MarsHintsValidator

    profile = {"gpu": cluster.gpu, "model": cluster.model}
    return AsyncEngineArgs(
        model=str(model_dir),
        skip_tokenizer_init=True,
        load_format="dummy",
        enforce_eager=True,
        scheduler_cls=MarsScheduler,
        distributed_executor_backend=SimulatedExecutor,
        logits_processors=[MarsHintsValidator],
        num_gpu_blocks_override=num_blocks + 1,  # vLLM never hands out its null block
        block_size=engine.block_size,
        max_model_len=max_model_len,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        max_num_seqs=engine.max_num_seqs,
        enable_prefix_caching=engine.enable_prefix_caching,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        disable_log_stats=False,  # the stat loggers feed admission and placement
        additional_config={
            "mars": {
                "policy": policy,
                **profile,
                "time_scale": time_scale,
                "policy_config": PolicyConfig().model_dump(mode="json"),  # as the bench's
            },
            "mars_sim": {**profile, "sleep_scale": 1.0 / time_scale},
        },
    )


def _find_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    try:
        return importlib.util.find_spec(name)
    except ImportError:  # a parent package is missing
        return None


def default_to_cpu_platform() -> None:
    """Without a GPU (and without vLLM's CPU build) vLLM finds no platform: name the
    CPU one, unless the caller chose. Before vLLM resolves its platform; inherited by
    the engine core's process."""
    import torch

    if "VLLM_TARGET_DEVICE" not in os.environ and not torch.cuda.is_available():
        os.environ["VLLM_TARGET_DEVICE"] = "cpu"


# --------------------------------------------------------------------------- tools


class _ToolNode:
    """A node's :class:`ToolPool` in scaled wall time: calls resolve when the pool
    says they end (timers on the asyncio loop, re-armed at every change)."""

    def __init__(self, pool: ToolPool, clock: ScaledClock) -> None:
        self.pool = pool
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[int, asyncio.Future[float]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def call(self, call: ToolCall) -> asyncio.Future[float]:
        """Start ``call`` now; the future resolves to its duration (simulated s)."""
        done: asyncio.Future[float] = self._loop.create_future()
        self._waiting[call.call_id] = done
        self.pool.start(call, self._clock.now_s())
        self._arm()
        return done

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        next_s = self.pool.next_event_s()
        if next_s is not None:
            self._timer = self._loop.call_at(self._clock.monotonic_at(next_s), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now_s = self._clock.now_s()
        for call in self.pool.advance(now_s):
            self._waiting.pop(call.call_id).set_result(now_s - call.start_s)
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


# --------------------------------------------------------------------------- sessions


class _TurnFailed(Exception):
    """The engine refused or failed a turn (the session fails, the run goes on)."""


@dataclass(slots=True)
class _SessionRun:
    """A session's progress: its context as token ids, as vLLM saw it."""

    spec: SessionSpec
    ideal_s: float
    rng: np.random.Generator  # the session's new tokens
    context: list[int] = field(default_factory=list)  # prompts and outputs so far
    computed_tokens: int = 0  # of which KV was computed (all but the last output)
    tool_s: float = 0.0
    finish_s: float | None = None
    failed_reason: str | None = None

    def prompt(self, turn_index: int, vocab_size: int) -> list[int]:
        new = self.spec.turns[turn_index].new_tokens
        ids = self.rng.integers(FIRST_NEW_TOKEN_ID, vocab_size, size=new)
        return self.context + ids.tolist()


class _Driver:
    """One run: the sessions through the engines, under the cluster scheduler.

    Handlers mirror the simulator's (arrival, tick, sample, turn end, tool end);
    each returns the placements to start, which :meth:`_start` turns into session
    coroutines. Everything runs on one asyncio loop, so handlers never interleave.
    """

    def __init__(
        self,
        sessions: Sequence[SessionSpec],
        spec: PolicySpec,
        *,
        cluster: ClusterConfig,
        engine: EngineConfig,
        engines: Sequence[AsyncLLM],
        boards: Sequence[EngineBoard],
        seed: int,
        time_scale: float,
        on_progress: ProgressFn | None,
    ) -> None:
        policy_config = PolicyConfig()
        cost = CostModel(load_profile(cluster.gpu, cluster.model))
        self.cluster = cluster
        self.engines, self.boards = list(engines), list(boards)
        self.scheduler = ClusterScheduler(
            spec, policy_config, cluster.num_gpus, random.Random(seed)
        )
        self.runs = {
            s.session_id: _SessionRun(
                s, session_ideal_s(cost, engine, s), np.random.default_rng([seed, 2, i])
            )
            for i, s in enumerate(sessions)
        }
        self._vocab_size = cost.profile.model.vocab_size
        self._kv_capacity_tokens = num_kv_blocks(cost, engine) * engine.block_size  # per engine
        self._tick_s = policy_config.admission.tick_s
        self._wait_alpha = policy_config.admission.tool_wait_ema_alpha
        self._time_scale = time_scale
        self._on_progress = on_progress
        self.requests: list[RequestRecord] = []
        self.timeseries = TimeSeries([], {c: [] for c in TIMESERIES_COLUMNS})
        self._num_done = 0
        self._num_calls = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}  # pending arrivals, tick, sample
        self._error: BaseException | None = None
        self._done = asyncio.Event()
        self.clock = ScaledClock.starting_now(time_scale)  # restarted by run()
        self.nodes: list[_ToolNode] = []

    # -- the run --------------------------------------------------------------
    async def run(self) -> float:
        """Drive every session to its end; returns the span in simulated seconds."""
        self._loop = asyncio.get_running_loop()
        self.clock = ScaledClock.starting_now(self._time_scale)
        self.nodes = [
            _ToolNode(ToolPool(n, self.cluster.cpu_cores_per_node, self._wait_alpha), self.clock)
            for n in range(self.cluster.num_nodes)
        ]
        for run in self.runs.values():
            sid = run.spec.session_id
            self._at(f"arrival {sid}", run.spec.arrival_s, self._on_arrival, sid)
        self._on_tick(0)
        self._on_sample(0)
        try:
            await self._done.wait()
        finally:
            for timer in self._timers.values():
                timer.cancel()
            for node in self.nodes:
                node.close()
        if self._error is not None:
            raise self._error
        return self.clock.now_s()

    def _at(self, name: str, t_s: float, handler: Callable[..., None], *args: Any) -> None:
        """Call ``handler(*args)`` at simulated time ``t_s`` (replacing ``name``'s timer)."""

        def fire() -> None:
            del self._timers[name]
            handler(*args)

        self._timers[name] = self._loop.call_at(self.clock.monotonic_at(t_s), fire)

    def _start(self, placements: Sequence[Placement]) -> None:
        for placement in placements:
            # placements from arrivals, ticks and session ends are admissions
            assert placement.turn_index == 0, placement
            task = self._loop.create_task(self._session(placement.session_id, placement.engine_id))
            self._tasks.add(task)
            task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()  # a bug here, not an engine error: stop
            self._done.set()

    # -- handlers ---------------------------------------------------------------
    def _on_arrival(self, session_id: str) -> None:
        spec = self.runs[session_id].spec
        ticket = SessionTicket(session_id, spec.arrival_s, spec.turns[0].new_tokens)
        self._start(self.scheduler.on_session_arrival(ticket, self.clock.now_s(), self._loads()))

    def _on_tick(self, index: int) -> None:
        now_s = self.clock.now_s()
        _, placements = self.scheduler.on_tick(self._signals(), now_s, self._loads())
        self._start(placements)
        self._at("tick", (index + 1) * self._tick_s, self._on_tick, index + 1)

    def _on_sample(self, index: int) -> None:
        ts, boards = self.timeseries, self.boards
        windows = self.scheduler.windows()
        cols = ts.columns
        ts.t_s.append(self.clock.now_s())
        cols["kv_usage"].append(sum(b.kv_usage for b in boards) / len(boards))
        cols["admission_window"].append(
            math.nan if windows[0] is None else float(sum(w or 0 for w in windows))
        )
        cols["num_running"].append(sum(b.num_running for b in boards))
        cols["num_waiting"].append(sum(b.num_waiting for b in boards))
        cols["num_queued_sessions"].append(self.scheduler.num_queued())
        cols["num_tools_in_flight"].append(sum(n.pool.num_in_flight for n in self.nodes))
        self._at("sample", index + 1.0, self._on_sample, index + 1)  # every simulated second

    def _loads(self) -> list[EngineLoad]:
        # vLLM reports no working set: its usage counts the KV MARS pins through tool
        # calls, which is MARS's working set (as actors/vllm_runner.py reports it)
        per_node = self.cluster.gpus_per_node
        return [
            EngineLoad(
                i, i // per_node, b.kv_usage, b.num_running, b.num_waiting, kv_demand=b.kv_usage
            )
            for i, b in enumerate(self.boards)
        ]

    def _signals(self) -> list[ClusterSignals]:
        pools = [n.pool for n in self.nodes]
        loads, cap = self._loads(), self._kv_capacity_tokens
        if not self.scheduler.per_engine_admission:
            return [_pool_signals(pools, loads, cap * len(loads))]
        per_node = self.cluster.gpus_per_node
        return [_pool_signals([pools[i // per_node]], [load], cap) for i, load in enumerate(loads)]

    # -- one session -------------------------------------------------------------
    async def _session(self, session_id: str, engine_id: int) -> None:
        run = self.runs[session_id]
        try:
            for index in range(run.spec.num_turns):
                await self._turn(run, index, engine_id)
                if index < run.spec.num_turns - 1:
                    engine_id = await self._tool(run, index, engine_id)
        except _TurnFailed as exc:  # the engine refused or failed a turn: the session fails
            logger.warning("session %s failed: %s", session_id, exc)
            run.failed_reason = f"{type(exc).__name__}: {exc}"
            placements = self.scheduler.on_session_cancelled(
                session_id, self.clock.now_s(), self._loads()
            )
        else:
            run.finish_s = self.clock.now_s()
            placements = self.scheduler.on_session_finished(session_id, run.finish_s, self._loads())
        self._num_done += 1
        if self._on_progress is not None:
            self._on_progress(self._num_done, len(self.runs))
        if self._num_done == len(self.runs):
            self._done.set()
        self._start(placements)

    async def _turn(self, run: _SessionRun, index: int, engine_id: int) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from mars_ray.vllm.hints import SessionHints

        spec, turn = run.spec, run.spec.turns[index]
        sid = spec.session_id
        prompt = run.prompt(index, self._vocab_size)
        hints = SessionHints(
            sid, index, index == spec.num_turns - 1, self.scheduler.predicted_tool_s(sid)
        )
        params = SamplingParams(
            max_tokens=turn.output_tokens,
            ignore_eos=True,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
            extra_args=hints.to_extra_args(),
        )
        submit_s = self.clock.now_s()
        final: RequestOutput | None = None
        engine = self.engines[engine_id]
        try:
            async for output in engine.generate(
                {"prompt_token_ids": prompt}, params, f"{sid}#{index}"
            ):
                final = output
        except Exception as exc:  # vLLM's errors (validation, a dead engine) have no common base
            raise _TurnFailed(f"turn {index}: {type(exc).__name__}: {exc}") from exc
        finish_s = self.clock.now_s()
        if final is None or len(final.outputs[0].token_ids) != turn.output_tokens:
            raise _TurnFailed(f"turn {index}: the engine ended it early ({final!r:.200})")
        self._record(run, index, engine_id, prompt, final, submit_s, finish_s)

    def _record(
        self,
        run: _SessionRun,
        index: int,
        engine_id: int,
        prompt: list[int],
        final: RequestOutput,
        submit_s: float,
        finish_s: float,
    ) -> None:
        output_ids = list(final.outputs[0].token_ids)
        cached = final.num_cached_tokens or 0
        tokens = TurnTokens.of(len(prompt), len(output_ids), cached, run.computed_tokens)
        metrics = getattr(final, "metrics", None)
        first_mono = getattr(metrics, "first_token_ts", 0.0) or 0.0
        first_token_s = self.clock.sim_s(first_mono) if first_mono > 0 else finish_s
        self.requests.append(
            RequestRecord(
                session_id=run.spec.session_id,
                turn_index=index,
                engine_id=engine_id,
                submit_s=submit_s,
                first_token_s=min(max(first_token_s, submit_s), finish_s),
                finish_s=finish_s,
                prompt_tokens=len(prompt),
                output_tokens=len(output_ids),
                cached_tokens=cached,
                recomputed_tokens=tokens.recomputed,
                num_preemptions=0,
            )
        )
        run.context = prompt + output_ids
        run.computed_tokens = len(run.context) - 1  # the last output's KV is never computed
        self.scheduler.on_turn_finished(run.spec.session_id, tokens.service, finish_s - submit_s)

    async def _tool(self, run: _SessionRun, index: int, engine_id: int) -> int:
        """The tool call after turn ``index``; returns the engine of the next turn."""
        turn, sid = run.spec.turns[index], run.spec.session_id
        node = self.nodes[engine_id // self.cluster.gpus_per_node]
        self._num_calls += 1
        call = ToolCall(self._num_calls, sid, turn.tool_cpu_s, turn.tool_wait_s, self.clock.now_s())
        tool_s = await node.call(call)
        run.tool_s += tool_s
        placement = self.scheduler.on_tool_finished(sid, tool_s, self._loads())
        return placement.engine_id

    # -- results -------------------------------------------------------------------
    def session_records(self) -> list[SessionRecord]:
        records = []
        for sid, run in self.runs.items():
            state = self.scheduler.sessions.get(sid)
            failed = run.failed_reason or (None if run.finish_s is not None else "not finished")
            records.append(
                SessionRecord(
                    session_id=sid,
                    arrival_s=run.spec.arrival_s,
                    admitted_s=None if state is None else state.admitted_s,
                    finish_s=run.finish_s,
                    ideal_s=run.ideal_s,
                    num_turns=run.spec.num_turns,
                    tool_s=run.tool_s,
                    tool_ideal_s=run.spec.total_tool_s,
                    failed_reason=failed,
                )
            )
        return records


def _pool_signals(
    pools: Sequence[ToolPool], engines: Sequence[EngineLoad], kv_capacity_tokens: int
) -> ClusterSignals:
    """The simulator's signal aggregation (one place: ``scope_signals``)."""
    loads = [ToolPoolLoad(p.num_in_flight, p.num_cores, p.wait_ema_s) for p in pools]
    return scope_signals(engines, loads, kv_capacity_tokens=kv_capacity_tokens)


# --------------------------------------------------------------------------- entry points


def run_vllm(
    sessions: Sequence[SessionSpec],
    policy: str,
    *,
    cluster: ClusterConfig,
    engine: EngineConfig,
    time_scale: float,
    seed: int = 0,
    rate_per_s: float | None = None,
    on_progress: ProgressFn | None = None,
) -> RunResult:
    """``sessions`` (with their arrival times) through real vLLM engines; see the module
    docstring. Logs a warning when the machine could not keep up with ``time_scale``."""
    run = drive_vllm(
        sessions,
        policy,
        cluster=cluster,
        engine=engine,
        time_scale=time_scale,
        seed=seed,
        rate_per_s=rate_per_s,
        on_progress=on_progress,
    )
    late = run.late_frac
    if late > LATE_WARNING_FRAC:
        logger.warning(
            "vLLM runtime: this machine could not keep up with --time-scale %g: outputs "
            "came on average %.0f%% of a turn's latency late (lower the time scale)",
            time_scale,
            100 * late,
        )
    return run.result


def drive_vllm(
    sessions: Sequence[SessionSpec],
    policy: str,
    *,
    cluster: ClusterConfig,
    engine: EngineConfig,
    time_scale: float,
    seed: int = 0,
    rate_per_s: float | None = None,
    on_progress: ProgressFn | None = None,
) -> VllmRun:
    """:func:`run_vllm`, with the simulated devices' reports and the start-up time."""
    if _find_spec("vllm.v1.engine") is None:  # a submodule: tests/vllm can pose as "vllm"
        raise MarsError("--runtime vllm needs vLLM 0.29: install the vllm extra (see docs/vllm.md)")
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise ConfigError(f"time_scale must be finite and > 0, got {time_scale}")
    if not sessions:
        raise ConfigError("the vLLM runtime has no sessions to run")
    if engine.cpu_offload_gb > 0:
        raise ConfigError("the vLLM runtime has no CPU KV tier: cpu_offload_gb must be 0")
    spec = get_policy(policy)
    cost = CostModel(load_profile(cluster.gpu, cluster.model))
    num_blocks = num_kv_blocks(cost, engine)
    kv_tokens = num_blocks * engine.block_size
    for session in sessions:
        if session.max_context_tokens > kv_tokens:
            raise InfeasibleError(
                f"session {session.session_id} needs {session.max_context_tokens} tokens of "
                f"KV cache but one GPU holds {kv_tokens} ({cost.profile.name})"
            )
    max_model_len = min(cost.profile.model.max_model_len_tokens, kv_tokens)
    default_to_cpu_platform()
    with tempfile.TemporaryDirectory(prefix="mars-vllm-model-") as tmp:
        model_dir = write_model_config(cost.profile, max_model_len, Path(tmp))
        args = engine_args(
            model_dir,
            spec.name,
            cluster,
            engine,
            num_blocks=num_blocks,
            max_model_len=max_model_len,
            time_scale=time_scale,
        )
        return asyncio.run(
            _serve_and_drive(
                args,
                sessions,
                spec,
                cluster=cluster,
                engine=engine,
                seed=seed,
                time_scale=time_scale,
                rate_per_s=rate_per_s,
                on_progress=on_progress,
            )
        )


async def _serve_and_drive(
    args: AsyncEngineArgs,
    sessions: Sequence[SessionSpec],
    spec: PolicySpec,
    *,
    cluster: ClusterConfig,
    engine: EngineConfig,
    seed: int,
    time_scale: float,
    rate_per_s: float | None,
    on_progress: ProgressFn | None,
) -> VllmRun:
    from vllm.v1.engine.async_llm import AsyncLLM

    from mars_ray.vllm.executor import STATS_RPC
    from mars_ray.vllm.stats import BoardStatLogger, EngineBoard

    started = time.perf_counter()
    boards = [EngineBoard() for _ in range(cluster.num_gpus)]
    engines: list[AsyncLLM] = []
    try:
        for board in boards:
            engines.append(
                AsyncLLM.from_engine_args(args, stat_loggers=[BoardStatLogger.factory(board)])
            )
        await asyncio.gather(*(warm_up(e) for e in engines))
        startup_s = time.perf_counter() - started
        driver = _Driver(
            sessions,
            spec,
            cluster=cluster,
            engine=engine,
            engines=engines,
            boards=boards,
            seed=seed,
            time_scale=time_scale,
            on_progress=on_progress,
        )
        drive_started = time.perf_counter()
        span_s = await driver.run()
        wall_s = time.perf_counter() - drive_started
        stats = [(await e.collective_rpc(STATS_RPC))[0] for e in engines]
    finally:
        for built in engines:
            built.shutdown()
    devices = [DeviceReport.from_stats(s, time_scale) for s in stats]
    result = _result(driver, spec.name, cluster, boards, devices, span_s, wall_s, rate_per_s)
    return VllmRun(result, devices, startup_s)


async def warm_up(engine: AsyncLLM) -> None:
    """One tiny request through the whole path (first-call costs out of the run's time);
    shorter than a block, so it leaves nothing in the prefix cache."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False)
    async for _ in engine.generate({"prompt_token_ids": [FIRST_NEW_TOKEN_ID]}, params, "warm-up"):
        pass


def _result(
    driver: _Driver,
    policy: str,
    cluster: ClusterConfig,
    boards: Sequence[EngineBoard],
    devices: Sequence[DeviceReport],
    span_s: float,
    wall_s: float,
    rate_per_s: float | None,
) -> RunResult:
    pools = [n.pool for n in driver.nodes]
    counters = RunCounters(
        num_preemptions=sum(b.num_preemptions for b in boards),
        num_evicted_blocks=0,  # not observable in vLLM 0.29 (module docstring)
        num_recomputed_tokens=sum(r.recomputed_tokens for r in driver.requests),
        gpu_busy_frac=_safe_div(sum(d.simulated_busy_s for d in devices), span_s * len(devices)),
        cpu_utilization=_safe_div(
            sum(p.busy_core_s for p in pools), span_s * sum(p.num_cores for p in pools)
        ),
        mean_tool_queue_wait_s=_safe_div(
            sum(p.total_delay_s for p in pools), sum(p.num_completed for p in pools)
        ),
    )
    return RunResult(
        policy=policy,
        runtime="vllm",
        num_gpus=cluster.num_gpus,
        num_nodes=cluster.num_nodes,
        rate_per_s=rate_per_s,
        sessions=driver.session_records(),
        requests=driver.requests,
        counters=counters,
        timeseries=driver.timeseries,
        simulated_s=span_s,
        wall_s=wall_s,
    )


def _safe_div(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0
