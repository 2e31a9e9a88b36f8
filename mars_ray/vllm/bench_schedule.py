"""What one ``schedule()`` costs: ``MarsScheduler`` beside vLLM's ``AsyncScheduler``.

    python -m mars_ray.vllm.bench_schedule [--running 256 --waiting 2000 --repeats 300]
        [--scenario steady|churn] [--json]

Both schedulers get the same requests (agentic turns: long-tailed prompt and output
lengths, session hints of multi-turn sessions) over the KV cache of the chosen GPU
profile, with ``max_num_seqs = --running``. Each timed repeat is one engine step
per scheduler, interleaved (the order alternates): ``schedule()`` is timed, the
step's output is fabricated by :class:`~mars_ray.vllm.executor.SimulatedModelRunner`
(the simulated GPU's model runner) and fed to ``update_from_output()`` (timed
separately).

* ``steady`` (default): the same state for both. ``--running`` turns are prefilled
  in an untimed warm-up and then decode (their outputs outlast the run); then
  ``--waiting`` turns queue behind them (the running set is full). Both schedulers
  hold the same requests at every timed step.
* ``churn``: ``--running + --waiting`` turns from the start; finished turns are
  replaced by new ones after every step. Each scheduler admits in its own order,
  so the states drift apart (the printed means show how far).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from mars_ray.engine.costmodel import CostModel
from mars_ray.vllm.executor import SimulatedModelRunner
from mars_ray.vllm.hints import SessionHints
from mars_ray.vllm.scheduler import MarsScheduler

BLOCK_SIZE = 16
#: the shapes of Llama 3.1 8B (only lengths and the KV spec matter to a scheduler)
_MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """One benchmark run (CLI flags in brackets)."""

    num_running: int = 256  # [--running] max_num_seqs, and the running set aimed at
    num_waiting: int = 2000  # [--waiting] kept waiting throughout
    num_repeats: int = 300  # [--repeats] timed steps per scheduler
    num_warmup_steps: int = 400  # [--warmup] untimed steps at most, to fill the running set
    max_num_batched_tokens: int = 8192  # [--batch-tokens]
    max_model_len: int = 32768
    gpu: str = "h200-141gb"  # [--gpu] the KV cache size comes from this cost-model profile
    model: str = "llama-3.1-8b"  # [--model]
    policy: str = "mars"  # [--policy]
    scenario: str = "steady"  # [--scenario] steady | churn
    seed: int = 0  # [--seed]
    num_blocks: int | None = None  # [--num-blocks] None: the profile's

    def resolved_num_blocks(self) -> int:
        if self.num_blocks is not None:
            return self.num_blocks
        return CostModel.from_names(self.gpu, self.model).num_gpu_blocks(BLOCK_SIZE, 0.9)


@dataclass(frozen=True, slots=True)
class Timing:
    """Per-call wall time of one scheduler method over the timed repeats."""

    median_us: float
    p90_us: float
    mean_us: float

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> Timing:
        us = sorted(s / 1000.0 for s in samples_ns)
        p90 = us[min(len(us) - 1, math.ceil(0.9 * len(us)) - 1)]
        return cls(statistics.median(us), p90, statistics.fmean(us))


@dataclass(slots=True)
class SchedulerRun:
    """One scheduler under test and what was measured of it."""

    name: str
    scheduler: AsyncScheduler
    stream: TurnStream
    runner: SimulatedModelRunner
    schedule_ns: list[int] = field(default_factory=list)
    update_ns: list[int] = field(default_factory=list)
    num_running: list[int] = field(default_factory=list)
    num_waiting: list[int] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0


@dataclass(frozen=True, slots=True)
class BenchResult:
    """Both schedulers' timings and the state they were measured in."""

    config: BenchConfig
    num_blocks: int
    stock_schedule: Timing
    mars_schedule: Timing
    stock_update: Timing
    mars_update: Timing
    stock_state: dict[str, float]
    mars_state: dict[str, float]

    @property
    def schedule_ratio(self) -> float:
        """MarsScheduler's median ``schedule()`` over the stock scheduler's."""
        return self.mars_schedule.median_us / self.stock_schedule.median_us

    def to_dict(self) -> dict[str, Any]:
        def timing(t: Timing) -> dict[str, float]:
            return {"median_us": t.median_us, "p90_us": t.p90_us, "mean_us": t.mean_us}

        return {
            "config": dataclasses.asdict(self.config),
            "num_blocks": self.num_blocks,
            "schedule": {
                "stock": timing(self.stock_schedule),
                "mars": timing(self.mars_schedule),
                "ratio_median": self.schedule_ratio,
                "ratio_p90": self.mars_schedule.p90_us / self.stock_schedule.p90_us,
            },
            "update_from_output": {
                "stock": timing(self.stock_update),
                "mars": timing(self.mars_update),
            },
            "state": {"stock": self.stock_state, "mars": self.mars_state},
        }


class TurnStream:
    """A seeded stream of agentic turns; two streams with one seed are identical.

    Sessions of 1-8 turns; each turn's prompt is its context so far (lognormal,
    median 1k tokens for a first turn, a quarter more per turn), its output
    lognormal (median ~120 tokens), and its hints name the session, the turn, whether
    it is the last, and the expected tool time (lognormal, median 1 s).
    """

    def __init__(self, seed: int, max_model_len: int) -> None:
        self._rng = random.Random(seed)
        self._max_model_len = max_model_len
        self._hasher = get_request_block_hasher(BLOCK_SIZE, sha256)
        self._num_made = 0
        self._num_sessions = 0
        self._open: list[tuple[str, int, int]] = []  # (session, next turn, num turns)

    def next_request(self, arrival_s: float, min_output: int = 0) -> Request:
        rng = self._rng
        session, turn, num_turns = self._next_turn()
        num_output = int(min(1024, max(4, rng.lognormvariate(math.log(120), 0.9))))
        num_output = max(num_output, min_output)
        first = rng.lognormvariate(math.log(1000), 0.7)
        num_prompt = int(min(first * (1 + 0.25 * turn), self._max_model_len - num_output - 1))
        num_prompt = max(16, num_prompt)
        hints = SessionHints(
            session,
            turn_index=turn,
            last_turn=turn == num_turns - 1,
            expected_tool_s=rng.lognormvariate(0.0, 1.0),
        )
        params = SamplingParams(
            max_tokens=num_output, ignore_eos=True, extra_args=hints.to_extra_args()
        )
        self._num_made += 1
        base = self._num_made * 100_003  # distinct tokens: no accidental prefix hits
        tokens = [(base + i) % 120_000 + 1000 for i in range(num_prompt)]
        return Request(
            f"{session}-t{turn}",
            tokens,
            params,
            None,
            arrival_time=arrival_s,
            block_hasher=self._hasher,
        )

    def _next_turn(self) -> tuple[str, int, int]:
        rng = self._rng
        if self._open and rng.random() < 0.6:  # a continuation of an open session
            i = rng.randrange(len(self._open))
            session, turn, num_turns = self._open[i]
            if turn + 1 < num_turns:
                self._open[i] = (session, turn + 1, num_turns)
            else:
                self._open[i] = self._open[-1]
                self._open.pop()
            return session, turn, num_turns
        self._num_sessions += 1
        session, num_turns = f"s{self._num_sessions}", rng.randint(1, 8)
        if num_turns > 1:
            self._open.append((session, 1, num_turns))
        return session, 0, num_turns


def _write_model_dir(path: Path) -> Path:
    """A model directory holding only ``config.json`` (nothing is loaded)."""
    (path / "config.json").write_text(json.dumps(_MODEL_CONFIG))
    return path


def make_scheduler(
    cls: type[AsyncScheduler], config: BenchConfig, model_dir: Path, num_blocks: int
) -> AsyncScheduler:
    """``cls`` as the engine core would build it, over ``num_blocks`` KV blocks."""
    model_config = ModelConfig(
        model=str(model_dir),
        skip_tokenizer_init=True,
        max_model_len=config.max_model_len,
        dtype="bfloat16",
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=config.num_running,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len,
        enable_chunked_prefill=True,
        is_encoder_decoder=False,
        async_scheduling=True,
    )
    cache_config = CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True)
    cache_config.num_gpu_blocks = num_blocks
    vllm_config = VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        additional_config={"mars": {"policy": config.policy}},
    )
    spec = FullAttentionSpec(
        block_size=BLOCK_SIZE,
        num_kv_heads=_MODEL_CONFIG["num_key_value_heads"],
        head_size=_MODEL_CONFIG["head_dim"],
        dtype=torch.bfloat16,
    )
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)],
    )
    return cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK_SIZE,
        log_stats=True,
    )


def _step(run: SchedulerRun, timed: bool) -> None:
    """One engine step: schedule, simulated GPU, update; then top the queues up."""
    sched = run.scheduler
    t0 = time.perf_counter_ns()
    so = sched.schedule()
    t1 = time.perf_counter_ns()
    _, output = run.runner.shape_and_output(so)
    t2 = time.perf_counter_ns()
    sched.update_from_output(so, output)
    t3 = time.perf_counter_ns()
    if timed:
        run.schedule_ns.append(t1 - t0)
        run.update_ns.append(t3 - t2)
        run.num_running.append(len(sched.running))
        run.num_waiting.append(len(sched.waiting) + len(sched.skipped_waiting))
        run.num_tokens.append(so.total_num_scheduled_tokens)
        run.num_preempted += len(so.preempted_req_ids or ())


def _top_up(run: SchedulerRun, config: BenchConfig, now_s: float) -> None:
    """Keep ``num_running + num_waiting`` requests in the scheduler."""
    sched = run.scheduler
    target = config.num_running + config.num_waiting
    while sched.get_num_unfinished_requests() < target:
        sched.add_request(run.stream.next_request(now_s))


def _warm_up_churn(run: SchedulerRun, config: BenchConfig) -> None:
    _top_up(run, config, time.time())
    for _ in range(config.num_warmup_steps):
        if len(run.scheduler.running) >= config.num_running:
            return
        _step(run, timed=False)
        _top_up(run, config, time.time())


def _warm_up_steady(run: SchedulerRun, config: BenchConfig) -> None:
    """Prefill ``num_running`` long-output turns, then queue ``num_waiting`` more."""
    sched, now_s = run.scheduler, time.time()
    min_output = config.num_warmup_steps + config.num_repeats + 2
    for _ in range(config.num_running):
        sched.add_request(run.stream.next_request(now_s, min_output))
    for _ in range(config.num_warmup_steps):
        if not sched.waiting and all(r.num_output_tokens > 0 for r in sched.running):
            break
        _step(run, timed=False)
    else:
        raise RuntimeError(
            f"{run.name}: the running set is still prefilling after "
            f"{config.num_warmup_steps} warm-up steps; raise --warmup or the KV cache"
        )
    for _ in range(config.num_waiting):
        sched.add_request(run.stream.next_request(now_s))


def run_bench(config: BenchConfig) -> BenchResult:
    """Build both schedulers over the same requests, warm up, time interleaved steps."""
    if config.scenario not in ("steady", "churn"):
        raise ValueError(f"unknown scenario {config.scenario!r}; accepted: steady, churn")
    init_none_hash(sha256)
    num_blocks = config.resolved_num_blocks()
    with tempfile.TemporaryDirectory(prefix="mars-bench-model-") as tmp:
        model_dir = _write_model_dir(Path(tmp))
        runs = [
            SchedulerRun(
                name,
                make_scheduler(cls, config, model_dir, num_blocks),
                TurnStream(config.seed, config.max_model_len),
                SimulatedModelRunner(vocab_size=_MODEL_CONFIG["vocab_size"]),
            )
            for name, cls in (("stock", AsyncScheduler), ("mars", MarsScheduler))
        ]
    churn = config.scenario == "churn"
    for run in runs:
        (_warm_up_churn if churn else _warm_up_steady)(run, config)
    gc.collect()
    for i in range(config.num_repeats):
        for run in runs if i % 2 == 0 else runs[::-1]:
            _step(run, timed=True)
            if churn:
                _top_up(run, config, time.time())
    stock, mars = runs
    return BenchResult(
        config=config,
        num_blocks=num_blocks,
        stock_schedule=Timing.of(stock.schedule_ns),
        mars_schedule=Timing.of(mars.schedule_ns),
        stock_update=Timing.of(stock.update_ns),
        mars_update=Timing.of(mars.update_ns),
        stock_state=_state(stock),
        mars_state=_state(mars),
    )


def _state(run: SchedulerRun) -> dict[str, float]:
    return {
        "mean_running": statistics.fmean(run.num_running),
        "mean_waiting": statistics.fmean(run.num_waiting),
        "mean_tokens_per_step": statistics.fmean(run.num_tokens),
        "num_preempted": run.num_preempted,
    }


def format_result(result: BenchResult) -> str:
    c = result.config
    lines = [
        f"schedule() cost, {c.num_running} running / {c.num_waiting} waiting target, "
        f"{c.num_repeats} interleaved repeats, scenario {c.scenario}, "
        f"{result.num_blocks} KV blocks ({c.gpu}, {c.model}), policy {c.policy}",
        f"{'':<22}{'median us':>12}{'p90 us':>12}{'mean us':>12}",
    ]
    rows = [
        ("AsyncScheduler", result.stock_schedule),
        ("MarsScheduler", result.mars_schedule),
    ]
    lines += [f"{n:<22}{t.median_us:>12.1f}{t.p90_us:>12.1f}{t.mean_us:>12.1f}" for n, t in rows]
    lines.append(
        f"ratio (Mars / stock)  median {result.schedule_ratio:.2f}x, "
        f"p90 {result.mars_schedule.p90_us / result.stock_schedule.p90_us:.2f}x"
    )
    lines.append(
        f"update_from_output() median us: stock {result.stock_update.median_us:.1f}, "
        f"mars {result.mars_update.median_us:.1f}"
    )
    for name, state in (("stock", result.stock_state), ("mars", result.mars_state)):
        lines.append(
            f"state {name:<6} mean running {state['mean_running']:.0f}, waiting "
            f"{state['mean_waiting']:.0f}, tokens/step {state['mean_tokens_per_step']:.0f}, "
            f"preempted {state['num_preempted']:.0f}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, bool]:
    parser = argparse.ArgumentParser(prog="python -m mars_ray.vllm.bench_schedule")
    default = BenchConfig()
    parser.add_argument("--running", type=int, default=default.num_running)
    parser.add_argument("--waiting", type=int, default=default.num_waiting)
    parser.add_argument("--repeats", type=int, default=default.num_repeats)
    parser.add_argument("--warmup", type=int, default=default.num_warmup_steps)
    parser.add_argument("--batch-tokens", type=int, default=default.max_num_batched_tokens)
    parser.add_argument("--gpu", default=default.gpu)
    parser.add_argument("--model", default=default.model)
    parser.add_argument("--policy", default=default.policy)
    parser.add_argument("--scenario", choices=("steady", "churn"), default=default.scenario)
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    ns = parser.parse_args(argv)
    config = BenchConfig(
        num_running=ns.running,
        num_waiting=ns.waiting,
        num_repeats=ns.repeats,
        num_warmup_steps=ns.warmup,
        max_num_batched_tokens=ns.batch_tokens,
        gpu=ns.gpu,
        model=ns.model,
        policy=ns.policy,
        scenario=ns.scenario,
        seed=ns.seed,
        num_blocks=ns.num_blocks,
    )
    return config, ns.json


def main(argv: Sequence[str] | None = None) -> None:
    config, as_json = parse_args(argv)
    result = run_bench(config)
    print(json.dumps(result.to_dict(), indent=2) if as_json else format_result(result))


if __name__ == "__main__":
    main()
