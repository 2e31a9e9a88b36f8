"""``mars-ray bench``: sweep policies x arrival rates through a runtime, write results.

One bench is a grid: every policy runs the *same* sessions with the *same* arrival
times at each rate (Poisson, seeded; or a trace's own arrivals). Rates are given in
sessions/s or as loads, fractions of the cluster's estimated saturation rate
(:func:`estimate_saturation`). The output directory gets ``summary.json`` (docs/design.md
§8), per-session, per-request and time-series Parquet, and PNG plots; the
terminal gets a table per (policy, rate) and MARS's ratios against each baseline.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

import numpy as np
import typer
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mars_ray.config import ClusterConfig, EngineConfig, FrozenConfig, validated
from mars_ray.engine.ideal import isolated_turn_s
from mars_ray.errors import ConfigError, MarsError
from mars_ray.metrics import DEFAULT_ALPHA, GOODPUT_ALPHAS, alpha_key, json_safe, summarize_run
from mars_ray.results import RunResult
from mars_ray.session import SessionSpec

if TYPE_CHECKING:  # the runtime (cost model, workloads, simulator) is imported lazily
    from mars_ray.engine.costmodel import CostModel

DEFAULT_WORKLOAD = "swe"
DEFAULT_POLICIES: tuple[str, ...] = ("mars", "fcfs", "autellix", "continuum", "infercept")
DEFAULT_LOADS: tuple[float, ...] = (0.5, 1.0, 1.5)
DEFAULT_NUM_SESSIONS = 60
DEFAULT_OUT_DIR = Path("results/bench")
_CLUSTER_FIELDS = ClusterConfig.model_fields
DEFAULT_GPU: str = _CLUSTER_FIELDS["gpu"].default
DEFAULT_MODEL: str = _CLUSTER_FIELDS["model"].default
DEFAULT_CPU_CORES_PER_GPU: int = _CLUSTER_FIELDS["cpu_cores_per_gpu"].default
FALLBACK_MAX_CONTEXT_TOKENS = 131_072
AVAILABLE_RUNTIMES = ("sim", "ray", "vllm")
MARS = "mars"


def _bad(message: str) -> PydanticCustomError:
    # A custom error keeps the message as written (no "Value error, " prefix).
    return PydanticCustomError("bench_config", message)


class BenchConfig(FrozenConfig):
    """One bench: what to run, on what cluster, at which arrival rates.

    Left out, ``workload`` is ``swe`` (unless a ``trace`` is given), ``num_sessions``
    is 60 for a workload (a trace's sessions all run), and with neither
    ``rates_per_s`` nor ``loads`` a workload sweeps ``DEFAULT_LOADS`` while a trace
    keeps its own arrival times. Defaults are filled in at construction, so a dumped
    config names everything needed to rerun it.
    """

    workload: str | None = Field(None, description="workload generator name")
    trace: Path | None = Field(None, description="Parquet trace (docs/design.md §7)")
    policies: tuple[str, ...] = Field(DEFAULT_POLICIES, description="policy names")
    rates_per_s: tuple[float, ...] | None = Field(None, description="session arrival rates")
    loads: tuple[float, ...] | None = Field(
        None, description="arrival rates as fractions of the estimated saturation rate"
    )
    num_gpus: int = 1
    num_nodes: int = 1
    gpu: str = DEFAULT_GPU
    model: str = DEFAULT_MODEL
    cpu_cores_per_gpu: int = Field(DEFAULT_CPU_CORES_PER_GPU, description="tool-pool cores per GPU")
    node_gpus: tuple[str, ...] | None = Field(None, description="GPU name per node (mixed)")
    node_cpu_cores: tuple[int, ...] | None = Field(None, description="tool-pool cores per node")
    num_sessions: int | None = Field(
        None,
        description="sessions per run; None: whole trace; more than a trace holds: "
        "its sessions again (cycle_sessions)",
    )
    seed: int = 0
    out_dir: Path = DEFAULT_OUT_DIR
    runtime: Literal["sim", "vllm", "ray"] = "sim"
    time_scale: float = Field(
        10.0, gt=0, description="ray and vllm runtimes: simulated seconds per wall second"
    )
    faults: tuple[str, ...] = Field((), description="ray runtime: KIND@SECONDS fault injections")
    address: str | None = Field(None, description="ray runtime: join this Ray cluster")
    alpha: float = Field(DEFAULT_ALPHA, description="goodput slowdown bound for table and plots")

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = dict(values)
        if values.get("workload") is None and values.get("trace") is None:
            values["workload"] = DEFAULT_WORKLOAD
        if values.get("trace") is None and values.get("num_sessions") is None:
            values["num_sessions"] = DEFAULT_NUM_SESSIONS
        no_rates = values.get("rates_per_s") is None and values.get("loads") is None
        if no_rates and values.get("trace") is None:
            values["loads"] = DEFAULT_LOADS
        return values

    @model_validator(mode="after")
    def _check(self) -> BenchConfig:
        if self.workload is not None and self.trace is not None:
            raise _bad("give either --workload or --trace, not both")
        if self.rates_per_s is not None and self.loads is not None:
            raise _bad("give either --rates or --load, not both")
        _check_positive("--rates", self.rates_per_s)
        _check_positive("--load", self.loads)
        if not self.policies:
            raise _bad("--policies needs at least one policy name")
        if len(set(self.policies)) != len(self.policies):
            raise _bad(f"--policies names a policy twice: {','.join(self.policies)}")
        for flag, value in (
            ("--gpus", self.num_gpus),
            ("--nodes", self.num_nodes),
            ("--cpu-cores-per-gpu", self.cpu_cores_per_gpu),
        ):
            if value < 1:
                raise _bad(f"{flag} must be >= 1, got {value}")
        if self.num_sessions is not None and self.num_sessions < 1:
            raise _bad(f"--sessions must be >= 1, got {self.num_sessions}")
        if self.num_gpus % self.num_nodes:
            raise _bad(f"--gpus ({self.num_gpus}) must be a multiple of --nodes ({self.num_nodes})")
        if self.address is not None and self.runtime != "ray":
            raise _bad("--address needs --runtime ray")
        if self.faults:
            from mars_ray.cluster.bench_runtime import parse_fault

            if self.runtime != "ray":
                raise _bad("--fault needs --runtime ray")
            for fault in self.faults:
                parse_fault(fault)
        if self.alpha not in GOODPUT_ALPHAS:
            known = ", ".join(alpha_key(a) for a in GOODPUT_ALPHAS)
            raise _bad(f"--alpha must be one of the reported bounds {known}, got {self.alpha:g}")
        return self

    @property
    def cluster(self) -> ClusterConfig:
        return validated(
            ClusterConfig,
            num_gpus=self.num_gpus,
            num_nodes=self.num_nodes,
            gpu=self.gpu,
            model=self.model,
            cpu_cores_per_gpu=self.cpu_cores_per_gpu,
            node_gpus=self.node_gpus,
            node_cpu_cores=self.node_cpu_cores,
        )


def _check_positive(flag: str, values: tuple[float, ...] | None) -> None:
    if values is None:
        return
    if not values:
        raise _bad(f"{flag} needs at least one value")
    for value in values:
        if not (value > 0 and math.isfinite(value)):
            raise _bad(f"{flag} values must be finite and > 0, got {value:g}")


def rerun_command(config: BenchConfig, rates_per_s: Sequence[float] | None = None) -> str:
    """A ``mars-ray bench`` command line that reruns ``config``.

    With ``rates_per_s`` (the resolved rates) it pins the rates, so the rerun does not
    depend on the saturation estimate staying the same.
    """
    args = ["mars-ray", "bench"]
    args += ["--trace", str(config.trace)] if config.trace else ["--workload", str(config.workload)]
    args += ["--policies", ",".join(config.policies)]
    if rates_per_s is not None:
        args += ["--rates", ",".join(f"{r:.6g}" for r in rates_per_s)]
    elif config.rates_per_s is not None:
        args += ["--rates", ",".join(f"{r:g}" for r in config.rates_per_s)]
    elif config.loads is not None:
        args += ["--load", ",".join(f"{x:g}" for x in config.loads)]
    args += ["--gpus", str(config.num_gpus), "--nodes", str(config.num_nodes)]
    args += ["--gpu", config.gpu, "--model", config.model]
    args += ["--cpu-cores-per-gpu", str(config.cpu_cores_per_gpu)]
    if config.node_gpus is not None:
        args += ["--node-gpus", ",".join(config.node_gpus)]
    if config.node_cpu_cores is not None:
        args += ["--node-cpu-cores", ",".join(str(c) for c in config.node_cpu_cores)]
    if config.num_sessions is not None:
        args += ["--sessions", str(config.num_sessions)]
    args += ["--seed", str(config.seed), "--out", str(config.out_dir), "--runtime", config.runtime]
    if config.runtime in ("ray", "vllm"):
        args += ["--time-scale", f"{config.time_scale:g}"]
        for fault in config.faults:
            args += ["--fault", fault]
        if config.address is not None:
            args += ["--address", config.address]
    args += ["--alpha", f"{config.alpha:g}"]
    return shlex.join(args)


# --------------------------------------------------------------------------- saturation


class SaturationEstimate(NamedTuple):
    """How many sessions/s a cluster can sustain, from GPU, CPU and KV needs per session.

    Approximate by construction: it assumes warm continuations (no re-prefill after
    eviction), steady full batches and perfect packing of work onto GPUs and cores.
    Warm continuations need each session's KV to stay on the GPU through its tool
    calls, so the KV cache bounds the rate too (Little's law: sessions/s x
    KV-token-seconds per session <= KV tokens). Contention makes the real knee
    lower; the estimate only puts loads on a scale.
    """

    prefill_s_per_session: float  # GPU-seconds
    decode_s_per_session: float  # GPU-seconds
    decode_batch: int  # sequences per decode step the estimate assumes
    tool_cpu_s_per_session: float  # core-seconds
    gpu_rate_per_s: float  # sessions/s the GPUs sustain
    cpu_rate_per_s: float  # sessions/s the tool cores sustain (inf without CPU work)
    kv_token_s_per_session: float = 0.0  # KV tokens held x seconds, uncontended
    kv_rate_per_s: float = math.inf  # sessions/s whose KV the GPUs hold warm

    @property
    def rate_per_s(self) -> float:
        """The binding limit: the smallest of the GPU, CPU and KV rates."""
        return min(self.gpu_rate_per_s, self.cpu_rate_per_s, self.kv_rate_per_s)

    @property
    def bottleneck(self) -> str:
        limits = {"GPU": self.gpu_rate_per_s, "CPU": self.cpu_rate_per_s}
        limits["KV"] = self.kv_rate_per_s
        return min(limits, key=lambda name: limits[name])


def kv_capacity_tokens(cost_model: CostModel, engine: EngineConfig) -> int:
    """Tokens of KV one engine holds (its block count x block size)."""
    from mars_ray.engine.costmodel import num_kv_blocks

    return num_kv_blocks(cost_model, engine) * engine.block_size


def _decode_batch(sessions: Sequence[SessionSpec], kv_tokens: int, max_num_seqs: int) -> int:
    """Sequences that fit in KV at the sessions' mean decode context, capped by max_num_seqs."""
    context_sum = 0.0
    num_tokens = 0
    for session in sessions:
        for index, turn in enumerate(session.turns):
            prompt = session.prompt_tokens(index)
            out = turn.output_tokens
            context_sum += out * prompt + out * (out - 1) / 2
            num_tokens += out
    mean_context = context_sum / max(num_tokens, 1)
    return int(min(max_num_seqs, max(1, kv_tokens // max(mean_context, 1.0))))


def _turn_gpu_s(
    cm: CostModel, prompt: int, new: int, out: int, chunk: int, batch: int
) -> tuple[float, float]:
    """(prefill, decode) GPU-seconds of one warm turn, as its share of full steps.

    Prefill: dense work at the efficiency of a full ``chunk``-token step, plus the
    attention and KV reads of its own chunks. Decode: one ``batch``-th of a
    ``batch``-sequence step per token, plus the KV reads of its own context.
    """
    base_s = cm.step_time_s(1, 1, 0, 0.0)
    prefill_s = cm.step_time_s(1, chunk, 0, 0.0) * new / chunk
    done = 0
    while done < new:
        q = min(chunk, new - done)
        prior = prompt - new + done
        units = cm.prefill_attn_units(q, prior)
        prefill_s += cm.step_time_s(1, 1, prior, units) - base_s
        done += q
    decode_context_sum = out * prompt + out * (out - 1) / 2
    decode_s = out * cm.step_time_s(batch, batch, 0, 0.0) / batch
    decode_s += cm.step_time_s(1, 1, decode_context_sum, 0.0) - base_s
    return prefill_s, decode_s


def estimate_saturation(
    sessions: Sequence[SessionSpec],
    cost_model: CostModel,
    cluster: ClusterConfig,
    engine_config: EngineConfig,
) -> SaturationEstimate:
    """Sessions/s the cluster sustains with GPUs, tool cores or KV cache always full.

    Each session's GPU work is costed from the cost model, turn by turn: prefill of
    its new tokens on warm context in full ``max_num_batched_tokens`` chunks, decode
    at the batch where the KV cache is full at the mean decode context (capped at
    ``max_num_seqs``). ``num_gpus / mean GPU-seconds`` is the GPU rate;
    ``cores / mean tool CPU-seconds`` the CPU rate; ``num_gpus x KV tokens / mean
    KV-token-seconds`` the KV rate (each turn holds its context for its isolated
    time and the tool call after it); the estimate is the smallest. See
    :class:`SaturationEstimate` for what it leaves out.
    """
    if not sessions:
        raise ConfigError("cannot estimate a saturation rate without sessions")
    if cluster.node_gpus is not None and set(cluster.node_gpus) != {cluster.gpu}:
        return _mixed_saturation(sessions, cost_model, cluster, engine_config)
    chunk = engine_config.max_num_batched_tokens
    kv_tokens = kv_capacity_tokens(cost_model, engine_config)
    batch = _decode_batch(sessions, kv_tokens, engine_config.max_num_seqs)
    prefill_s = decode_s = 0.0
    for session in sessions:
        for index, turn in enumerate(session.turns):
            prompt = session.prompt_tokens(index)
            p, d = _turn_gpu_s(
                cost_model, prompt, turn.new_tokens, turn.output_tokens, chunk, batch
            )
            prefill_s += p
            decode_s += d
    n = len(sessions)
    gpu_s = (prefill_s + decode_s) / n
    cpu_s = sum(t.tool_cpu_s for s in sessions for t in s.turns) / n
    cores = sum(cluster.node_cores(n) for n in range(cluster.num_nodes))
    kv_token_s = sum(_kv_token_s(cost_model, engine_config, s) for s in sessions) / n
    return SaturationEstimate(
        prefill_s_per_session=prefill_s / n,
        decode_s_per_session=decode_s / n,
        decode_batch=batch,
        tool_cpu_s_per_session=cpu_s,
        gpu_rate_per_s=cluster.num_gpus / gpu_s,
        cpu_rate_per_s=cores / cpu_s if cpu_s > 0 else math.inf,
        kv_token_s_per_session=kv_token_s,
        kv_rate_per_s=cluster.num_gpus * kv_tokens / kv_token_s if kv_token_s > 0 else math.inf,
    )


def _mixed_saturation(
    sessions: Sequence[SessionSpec],
    cost_model: CostModel,
    cluster: ClusterConfig,
    engine_config: EngineConfig,
) -> SaturationEstimate:
    """A mixed cluster (``node_gpus``): each node's GPU and KV rates from its own GPU's
    cost model, summed; the CPU rate over all nodes' cores; per-session figures of
    the nominal GPU (``cluster.gpu``)."""
    from mars_ray.engine.costmodel import CostModel, load_profile

    nominal = estimate_saturation(
        sessions, cost_model, cluster.model_copy(update={"node_gpus": None}), engine_config
    )
    gpu_rate = kv_rate = 0.0
    for node in range(cluster.num_nodes):
        one = ClusterConfig(
            num_gpus=cluster.gpus_per_node,
            num_nodes=1,
            gpu=cluster.node_gpu(node),
            model=cluster.model,
            cpu_cores_per_gpu=cluster.cpu_cores_per_gpu,
        )
        node_cost = CostModel(load_profile(one.gpu, one.model))
        estimate = estimate_saturation(sessions, node_cost, one, engine_config)
        gpu_rate += estimate.gpu_rate_per_s
        kv_rate += estimate.kv_rate_per_s
    return nominal._replace(gpu_rate_per_s=gpu_rate, kv_rate_per_s=kv_rate)


def _kv_token_s(cost_model: CostModel, engine: EngineConfig, session: SessionSpec) -> float:
    """KV tokens x seconds a session holds when it runs alone and its KV stays warm:
    each turn holds its context (half its output on average) for its isolated time,
    then all of it through the tool call that follows."""
    total = 0.0
    computed = 0
    for index, turn in enumerate(session.turns):
        prompt = session.prompt_tokens(index)
        turn_s = isolated_turn_s(cost_model, engine, computed, prompt, turn.output_tokens)
        total += (prompt + turn.output_tokens / 2) * turn_s
        total += (prompt + turn.output_tokens) * turn.tool_s
        computed = prompt + turn.output_tokens - 1
    return total


def estimate_saturation_rate_per_s(
    sessions: Sequence[SessionSpec],
    cost_model: CostModel,
    cluster: ClusterConfig,
    engine_config: EngineConfig,
) -> float:
    """Sessions/s the cluster can sustain (approximate; see :func:`estimate_saturation`)."""
    return estimate_saturation(sessions, cost_model, cluster, engine_config).rate_per_s


def describe_saturation(estimate: SaturationEstimate) -> str:
    """One line for the terminal."""
    cpu = (
        "no tool CPU work"
        if math.isinf(estimate.cpu_rate_per_s)
        else (f"CPU {estimate.cpu_rate_per_s:.4g}/s ({estimate.tool_cpu_s_per_session:.1f} core-s)")
    )
    return (
        f"estimated saturation: {estimate.rate_per_s:.4g} sessions/s "
        f"({estimate.rate_per_s * 60:.3g}/min, {estimate.bottleneck}-bound; GPU "
        f"{estimate.gpu_rate_per_s:.4g}/s from {estimate.prefill_s_per_session:.2f} s prefill + "
        f"{estimate.decode_s_per_session:.2f} s decode per session at batch "
        f"{estimate.decode_batch}; {cpu}; KV {estimate.kv_rate_per_s:.4g}/s "
        f"({estimate.kv_token_s_per_session / 1e6:.3g}M token-s)) - approximate: warm KV, "
        "full batches, no contention"
    )


# --------------------------------------------------------------------------- the plan


class SweepPoint(NamedTuple):
    """One arrival setting: a Poisson rate (with its load, if given as one) or the trace's."""

    rate_per_s: float | None
    load: float | None


@dataclass(frozen=True)
class BenchPlan:
    """Everything resolved before the first run: sessions, cluster, the sweep."""

    sessions: list[SessionSpec]  # arrivals 0 (workload) or the trace's own
    cluster: ClusterConfig
    engine: EngineConfig
    saturation: SaturationEstimate
    points: list[SweepPoint]
    policies: tuple[str, ...]

    @property
    def num_runs(self) -> int:
        return len(self.points) * len(self.policies)

    @property
    def rates_per_s(self) -> list[float] | None:
        """The resolved Poisson rates; None when the trace's own arrivals are used."""
        rates = [p.rate_per_s for p in self.points if p.rate_per_s is not None]
        return rates or None


def check_runnable(config: BenchConfig) -> None:
    """Every name and the runtime, before anything runs (UnknownNameError lists the known)."""
    from mars_ray.engine.costmodel import load_profile
    from mars_ray.policies.registry import get_policy
    from mars_ray.workloads.generators import WORKLOADS

    if config.runtime not in AVAILABLE_RUNTIMES:
        raise MarsError(
            f"runtime {config.runtime!r} is not available yet in bench; use --runtime sim or ray"
        )
    for name in config.policies:
        get_policy(name)
    if config.workload is not None:
        WORKLOADS.get(config.workload)
    for name in config.cluster.gpu_names if config.node_gpus else (config.gpu,):
        load_profile(name, config.model)


def _max_context_tokens(cost_model: CostModel, engine: EngineConfig) -> int:
    window = getattr(cost_model.profile.model, "max_model_len_tokens", FALLBACK_MAX_CONTEXT_TOKENS)
    # A session whose context outgrows one GPU's KV cache could never finish.
    return int(min(window, kv_capacity_tokens(cost_model, engine)))


def load_sessions(
    config: BenchConfig, cost_model: CostModel, engine: EngineConfig
) -> list[SessionSpec]:
    """The bench's sessions: generated (seeded, arrival 0) or read from the trace."""
    if config.trace is not None:
        from mars_ray.workloads.schema import read_trace

        sessions = read_trace(config.trace)
        if config.num_sessions and config.num_sessions > len(sessions):
            return cycle_sessions(sessions, config.num_sessions)
        return sessions[: config.num_sessions] if config.num_sessions else sessions
    from mars_ray.workloads.generators import WORKLOADS

    generate = WORKLOADS.get(str(config.workload))
    rng = np.random.default_rng([config.seed, 0])
    return generate(int(config.num_sessions or 0), rng, _max_context_tokens(cost_model, engine))


def cycle_sessions(sessions: Sequence[SessionSpec], num_sessions: int) -> list[SessionSpec]:
    """``num_sessions`` sessions from a shorter trace: its sessions again in order, the
    k-th repeat with ids ``ID#k`` and arrivals shifted by k trace spans (one mean gap
    after the last arrival), so a trace's own arrival process goes on at its rate."""
    import dataclasses

    if not sessions:
        return []
    first, last = sessions[0].arrival_s, sessions[-1].arrival_s
    span_s = last - first + (last - first) / max(1, len(sessions) - 1)
    out = []
    for i in range(num_sessions):
        k, spec = divmod(i, len(sessions))
        base = sessions[spec]
        if k == 0:
            out.append(base)
            continue
        out.append(
            dataclasses.replace(
                base, session_id=f"{base.session_id}#{k}", arrival_s=base.arrival_s + k * span_s
            )
        )
    return out


def _sweep_points(config: BenchConfig, saturation_rate_per_s: float) -> list[SweepPoint]:
    if config.rates_per_s is not None:
        return [SweepPoint(rate, None) for rate in config.rates_per_s]
    if config.loads is not None:
        return [SweepPoint(load * saturation_rate_per_s, load) for load in config.loads]
    return [SweepPoint(None, None)]


def plan_bench(config: BenchConfig) -> BenchPlan:
    """Validate names, load the sessions, estimate saturation and resolve the rates."""
    from mars_ray.engine.costmodel import CostModel, load_profile

    check_runnable(config)
    cluster = config.cluster
    engine = validated(EngineConfig)
    cost_model = CostModel(load_profile(config.gpu, config.model))
    sessions = load_sessions(config, cost_model, engine)
    if not sessions:
        raise ConfigError("the bench has no sessions to run")
    saturation = estimate_saturation(sessions, cost_model, cluster, engine)
    points = _sweep_points(config, saturation.rate_per_s)
    return BenchPlan(sessions, cluster, engine, saturation, points, config.policies)


def sessions_at(plan: BenchPlan, point: SweepPoint, seed: int) -> list[SessionSpec]:
    """The plan's sessions with Poisson arrivals at ``point`` (or their own, for a trace).

    Every rate draws from the same seed, so the arrival patterns are time-scaled
    copies of one another and every policy at a rate sees identical arrivals.
    """
    if point.rate_per_s is None:
        return list(plan.sessions)
    from mars_ray.workloads.arrivals import assign_arrivals, poisson_arrivals

    rng = np.random.default_rng([seed, 1])
    times_s = poisson_arrivals(len(plan.sessions), point.rate_per_s, rng)
    return assign_arrivals(plan.sessions, times_s)


# --------------------------------------------------------------------------- running


ProgressFn = Callable[[int, int], None]


def sessions_progress(console: Console, enabled: bool) -> Progress:
    """The bar of simulator runs, counted in sessions (bench, capacity); shown only
    when ``enabled`` and the console is a terminal."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("sessions"),
        TimeElapsedColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=True,
    )


@contextmanager
def _progress_bar(
    console: Console, total: int, enabled: bool
) -> Iterator[Callable[[str, int], ProgressFn]]:
    """Yields ``start(label, num_done_before) -> on_progress``: one bar over all runs' sessions.

    Disabled unless ``enabled`` and the console is a terminal.
    """
    progress = sessions_progress(console, enabled)
    task = progress.add_task("bench", total=total)

    def start(label: str, num_done_before: int) -> ProgressFn:
        progress.update(task, description=label, completed=num_done_before)

        def on_progress(num_finished: int, num_sessions: int) -> None:
            progress.update(task, completed=num_done_before + num_finished)

        return on_progress

    with progress:
        yield start


def _run_one(
    plan: BenchPlan, config: BenchConfig, policy: str, point: SweepPoint, on_progress: ProgressFn
) -> RunResult:
    from mars_ray.policies.registry import PolicyConfig
    from mars_ray.sim import simulate

    sessions = sessions_at(plan, point, config.seed)
    if config.runtime == "ray":
        from mars_ray.cluster.bench_runtime import parse_fault, run_ray

        return run_ray(
            sessions,
            policy,
            cluster=plan.cluster,
            engine=plan.engine,
            time_scale=config.time_scale,
            faults=[parse_fault(f) for f in config.faults],
            address=config.address,
            rate_per_s=point.rate_per_s,
            seed=config.seed,
            on_progress=on_progress,
        )
    if config.runtime == "vllm":
        from mars_ray.vllm.bench_runtime import run_vllm

        return run_vllm(
            sessions,
            policy,
            cluster=plan.cluster,
            engine=plan.engine,
            time_scale=config.time_scale,
            seed=config.seed,
            rate_per_s=point.rate_per_s,
            on_progress=on_progress,
        )
    result = simulate(
        sessions,
        policy,
        cluster=plan.cluster,
        engine=plan.engine,
        policy_config=PolicyConfig(),
        seed=config.seed,
        rate_per_s=point.rate_per_s,
        on_progress=on_progress,
    )
    on_progress(len(sessions), len(sessions))
    return result


def _point_label(point: SweepPoint) -> str:
    if point.rate_per_s is None:
        return "trace arrivals"
    rate = f"{point.rate_per_s:.3g}/s"
    return rate if point.load is None else f"load {point.load:g} ({rate})"


def run_sweep(
    plan: BenchPlan, config: BenchConfig, console: Console, progress: bool
) -> list[tuple[SweepPoint, RunResult]]:
    """Every policy at every point, in order (rate-major), each a fresh simulation."""
    runs: list[tuple[SweepPoint, RunResult]] = []
    total = plan.num_runs * len(plan.sessions)
    with _progress_bar(console, total, progress) as start:
        for point in plan.points:
            for policy in plan.policies:
                label = f"{policy} @ {_point_label(point)}"
                on_progress = start(label, len(runs) * len(plan.sessions))
                runs.append((point, _run_one(plan, config, policy, point, on_progress)))
    return runs


def build_summary(
    config: BenchConfig, plan: BenchPlan, runs: Sequence[tuple[SweepPoint, RunResult]]
) -> dict[str, Any]:
    """``summary.json``: ``{"config": ..., "runs": [...]}`` (docs/design.md §8), JSON-safe."""
    config_entry = config.model_dump(mode="json") | {
        "command": rerun_command(config),
        "rerun_command": rerun_command(config, plan.rates_per_s),
        "argv": list(sys.argv),
        "resolved_rates_per_s": plan.rates_per_s,
        "saturation": plan.saturation._asdict() | {"rate_per_s": plan.saturation.rate_per_s},
        "engine": plan.engine.model_dump(mode="json"),
        "num_sessions_run": len(plan.sessions),
    }
    entries = [summarize_run(run, load=point.load) for point, run in runs]
    summary: dict[str, Any] = json_safe({"config": config_entry, "runs": entries})
    return summary


def run_bench(
    config: BenchConfig,
    progress: bool = True,
    *,
    console: Console | None = None,
    show_table: bool = True,
) -> dict[str, Any]:
    """Run the whole sweep, write ``config.out_dir``, print the tables; return the summary.

    Everything (names, runtime, trace, rates) is validated before the first run.
    ``console`` receives the saturation line, progress and tables (default: stdout).
    """
    console = console or Console()
    plan = plan_bench(config)
    console.print(describe_saturation(plan.saturation), highlight=False)
    started_s = time.perf_counter()
    runs = run_sweep(plan, config, console, progress)
    summary = build_summary(config, plan, runs)
    summary["config"]["bench_wall_s"] = time.perf_counter() - started_s
    written = write_outputs(config.out_dir, summary, runs, alpha=config.alpha)
    if show_table:
        print_tables(console, summary["runs"], alpha=config.alpha)
        console.print(f"wrote {len(written)} files to {config.out_dir}", highlight=False)
    return summary


# --------------------------------------------------------------------------- outputs


def _tag(
    table_columns: dict[str, list[Any]], num_rows: int, point: SweepPoint, policy: str
) -> None:
    table_columns["policy"] = [policy] * num_rows
    table_columns["rate_per_s"] = [point.rate_per_s] * num_rows
    table_columns["load"] = [point.load] * num_rows


def _session_columns(point: SweepPoint, run: RunResult) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {}
    _tag(columns, len(run.sessions), point, run.policy)
    rows = [asdict(s) | {"completed": s.completed, "jct_s": s.jct_s} for s in run.sessions]
    from mars_ray.metrics import session_slowdown

    for name in rows[0] if rows else ():
        columns[name] = [row[name] for row in rows]
    columns["slowdown"] = [session_slowdown(s) for s in run.sessions]
    return columns


def _request_columns(point: SweepPoint, run: RunResult) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {}
    _tag(columns, len(run.requests), point, run.policy)
    rows = [
        asdict(r) | {"ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "e2el_s": r.e2el_s}
        for r in run.requests
    ]
    for name in rows[0] if rows else ():
        columns[name] = [row[name] for row in rows]
    return columns


def _timeseries_columns(point: SweepPoint, run: RunResult) -> dict[str, list[Any]]:
    ts = run.timeseries
    columns: dict[str, list[Any]] = {}
    _tag(columns, len(ts.t_s), point, run.policy)
    columns["t_s"] = list(ts.t_s)
    columns.update({name: list(values) for name, values in ts.columns.items()})
    return columns


def _write_parquet(path: Path, parts: list[dict[str, list[Any]]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pa.table(part) for part in parts if part.get("policy")]
    if tables:
        table = pa.concat_tables(tables, promote_options="permissive")
    else:
        table = pa.table({"policy": pa.array([], pa.string())})
    pq.write_table(table, path)
    return path


def write_outputs(
    out_dir: Path,
    summary: dict[str, Any],
    runs: Sequence[tuple[SweepPoint, RunResult]],
    *,
    alpha: float = DEFAULT_ALPHA,
) -> list[Path]:
    """``summary.json``, ``sessions``/``requests``/``timeseries.parquet`` and the plots."""
    from mars_ray import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    written = [
        summary_path,
        _write_parquet(out_dir / "sessions.parquet", [_session_columns(p, r) for p, r in runs]),
        _write_parquet(out_dir / "requests.parquet", [_request_columns(p, r) for p, r in runs]),
        _write_parquet(
            out_dir / "timeseries.parquet", [_timeseries_columns(p, r) for p, r in runs]
        ),
    ]
    results = [run for _, run in runs]
    loads = [point.load for point, _ in runs]
    written += plots.write_plots(out_dir, results, loads, alpha=alpha)
    return written


# --------------------------------------------------------------------------- tables


def _fmt(value: Any, spec: str | None = None) -> str:
    """``-`` for None; by default 3 significant digits, whole numbers from 100 up."""
    if value is None:
        return "-"
    if spec is None:
        spec = ",.0f" if abs(value) >= 100 else ".3g"
    return format(value, spec)


def _rate_label(entry: dict[str, Any]) -> str:
    rate = entry.get("rate_per_s")
    if rate is None:
        return "trace"
    load = entry.get("load")
    return f"{rate:.3g}/s" if load is None else f"{load:g} ({rate:.3g}/s)"


def results_table(entries: Sequence[dict[str, Any]], *, alpha: float = DEFAULT_ALPHA) -> Table:
    """Policy x rate: latency, goodput, TTFT, preemptions, simulation speed."""
    table = Table(title="bench results (JCT in s, TTFT in ms)")
    for header in (
        "load (rate)", "policy", "done", "mean JCT", "p90 JCT", "mean slowdown",
        f"goodput@{alpha:g}", "mean TTFT", "preempt", "x real time",
    ):  # fmt: skip
        table.add_column(header, justify="left" if header == "policy" else "right")
    for e in entries:
        table.add_row(
            _rate_label(e),
            e["policy"],
            f"{e['num_completed']}/{e['num_sessions']}",
            _fmt(e["mean_jct_s"]),
            _fmt(e["p90_jct_s"]),
            _fmt(e["mean_slowdown"]),
            _fmt(_goodput(e, alpha), ".0%"),
            _fmt(e["mean_ttft_ms"]),
            str(e["preemptions"]),
            _fmt(e.get("speedup_vs_real_time"), ".0f"),
        )
    return table


def _goodput(entry: dict[str, Any], alpha: float) -> float | None:
    """Goodput at ``alpha`` from the entry (a reported bound), else None."""
    value: float | None = entry["goodput"].get(alpha_key(alpha))
    return value


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None:
        return "-"
    if denominator == 0:
        return "inf" if numerator > 0 else "-"
    return f"{numerator / denominator:.2f}x"


def mars_ratio_table(
    entries: Sequence[dict[str, Any]], *, alpha: float = DEFAULT_ALPHA
) -> Table | None:
    """MARS against each other policy at each rate; None when MARS did not run."""
    table = Table(title="MARS vs each policy (ratios > 1 favour MARS)")
    headers = ("load (rate)", "vs policy", "mean JCT other/MARS", "p90 JCT other/MARS",
               f"goodput@{alpha:g} MARS/other")  # fmt: skip
    for header in headers:
        table.add_column(header, justify="left" if header == "vs policy" else "right")
    num_rows = 0
    for mars in (e for e in entries if e["policy"] == MARS):
        for other in entries:
            same_point = other["rate_per_s"] == mars["rate_per_s"]
            if other["policy"] == MARS or not same_point:
                continue
            table.add_row(
                _rate_label(mars),
                other["policy"],
                _ratio(other["mean_jct_s"], mars["mean_jct_s"]),
                _ratio(other["p90_jct_s"], mars["p90_jct_s"]),
                _ratio(_goodput(mars, alpha), _goodput(other, alpha)),
            )
            num_rows += 1
    return table if num_rows else None


def print_tables(
    console: Console, entries: Sequence[dict[str, Any]], *, alpha: float = DEFAULT_ALPHA
) -> None:
    """The results table and, when MARS ran beside others, its ratio table."""
    console.print(results_table(entries, alpha=alpha))
    ratios = mars_ratio_table(entries, alpha=alpha)
    if ratios is not None:
        console.print(ratios)


# --------------------------------------------------------------------------- CLI


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def _floats(flag: str, text: str | None) -> tuple[float, ...] | None:
    parts = _split(text)
    if parts is None:
        return None
    try:
        return tuple(float(part) for part in parts)
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def _ints(flag: str, text: str | None) -> tuple[int, ...] | None:
    values = _floats(flag, text)
    if values is None:
        return None
    if any(v != int(v) for v in values):
        raise ConfigError(f"{flag} takes comma-separated whole numbers, got {text!r}")
    return tuple(int(v) for v in values)


def bench_command(
    workload: Annotated[
        str | None,
        typer.Option("--workload", help="workload generator", show_default=DEFAULT_WORKLOAD),
    ] = None,
    trace: Annotated[Path | None, typer.Option("--trace", help="Parquet trace instead")] = None,
    policies: Annotated[
        str, typer.Option("--policies", help="comma-separated policy names")
    ] = ",".join(DEFAULT_POLICIES),
    rates: Annotated[
        str | None, typer.Option("--rates", help="comma-separated arrival rates, sessions/s")
    ] = None,
    load: Annotated[
        str | None,
        typer.Option(
            "--load",
            help="comma-separated fractions of the estimated saturation rate",
            show_default=",".join(f"{x:g}" for x in DEFAULT_LOADS) + " for a workload",
        ),
    ] = None,
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs in the cluster")] = 1,
    nodes: Annotated[int, typer.Option("--nodes", help="nodes (GPUs split evenly)")] = 1,
    gpu: Annotated[str, typer.Option("--gpu", help="GPU name")] = DEFAULT_GPU,
    model: Annotated[str, typer.Option("--model", help="model name")] = DEFAULT_MODEL,
    sessions: Annotated[
        int | None,
        typer.Option(
            "--sessions",
            help="sessions per run",
            show_default=f"{DEFAULT_NUM_SESSIONS}, or all of a trace",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of workload and arrivals")] = 0,
    out: Annotated[Path, typer.Option("--out", help="output directory")] = DEFAULT_OUT_DIR,
    runtime: Annotated[
        str,
        typer.Option(
            "--runtime",
            help="sim, ray (a live deployment, replayed over HTTP), or vllm (real vLLM "
            "engines with MarsScheduler on simulated GPUs; needs the vllm extra)",
        ),
    ] = "sim",
    time_scale: Annotated[
        float, typer.Option("--time-scale", help="ray, vllm: simulated seconds per wall second")
    ] = 10.0,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            "--fault",
            help="ray: inject KIND@SECONDS (kill-gpu-worker, "
            "kill-tool-worker, remove-node); repeatable",
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="ray: join this Ray cluster (e.g. auto), not a local one"),
    ] = None,
    cpu_cores_per_gpu: Annotated[
        int, typer.Option("--cpu-cores-per-gpu", help="tool-pool CPU cores per GPU")
    ] = DEFAULT_CPU_CORES_PER_GPU,
    node_gpus: Annotated[
        str | None,
        typer.Option(
            "--node-gpus",
            help="GPU name of each node, comma-separated (a mixed cluster, e.g. "
            "h100-80gb,h200-141gb); --gpu is then the nominal GPU of ideal times",
        ),
    ] = None,
    node_cpu_cores: Annotated[
        str | None,
        typer.Option(
            "--node-cpu-cores",
            help="tool-pool cores of each node, comma-separated (e.g. a CPU-hot node: 16,64)",
        ),
    ] = None,
    alpha: Annotated[
        float, typer.Option("--alpha", help="goodput slowdown bound of the table and plots")
    ] = DEFAULT_ALPHA,
    as_json: Annotated[bool, typer.Option("--json", help="print summary JSON, not tables")] = False,
) -> None:
    """Compare scheduling policies on one workload across arrival rates."""
    if runtime not in ("sim", "vllm", "ray"):
        raise ConfigError(f"unknown runtime {runtime!r}; known: sim, vllm, ray")
    config = validated(
        BenchConfig,
        workload=workload,
        trace=trace,
        policies=tuple(_split(policies) or ()),
        rates_per_s=_floats("--rates", rates),
        loads=_floats("--load", load),
        num_gpus=gpus,
        num_nodes=nodes,
        gpu=gpu,
        model=model,
        cpu_cores_per_gpu=cpu_cores_per_gpu,
        node_gpus=None if node_gpus is None else tuple(_split(node_gpus) or ()),
        node_cpu_cores=_ints("--node-cpu-cores", node_cpu_cores),
        num_sessions=sessions,
        seed=seed,
        out_dir=out,
        runtime=runtime,
        time_scale=time_scale,
        faults=tuple(fault or ()),
        address=address,
        alpha=alpha,
    )
    console = Console(stderr=True) if as_json else Console()
    summary = run_bench(config, console=console, show_table=not as_json)
    if as_json:
        print(json.dumps(summary, indent=2, allow_nan=False))


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command to ``app``."""
    app.command("bench")(bench_command)
