"""A GPU worker's vLLM engine: ``AsyncLLM`` with ``MarsScheduler``, serving turns.

The same interface as :class:`~mars_ray.actors.engine_runner.SimEngineRunner`
(``generate`` streams :class:`TokenChunk` then one :class:`TurnDone`; ``snapshot``;
``forget``), so ``GPUWorker``, the ingress and the global scheduler do not know
which engine runs. Two devices:

* a real model (``DeploymentConfig.vllm_model``): vLLM loads it on this actor's GPU
  (Ray sets ``CUDA_VISIBLE_DEVICES``; the engine core process inherits it);
* a simulated device (no model): vLLM's engine, ``MarsScheduler``, KV cache manager
  and prefix cache run for real, and ``SimulatedExecutor`` prices each step with the
  cost model of ``cluster.gpu`` x ``cluster.model`` and sleeps it out in wall time
  scaled by ``time_scale`` - what the tests and CPU-only clusters run.

What each turn carries into vLLM: the prompt's token ids (the ingress tokenizes;
a session's next prompt repeats its earlier ids, so the prefix cache hits on the
engine the global scheduler placed it on) and the session hints in
``SamplingParams.extra_args``, including the session's attained service on every
GPU (``service_tokens``: the global MLFQ), the predicted tool time (retention) and
whether it is the last turn.

What vLLM 0.29 does not expose to this process, and so is absent from
:meth:`snapshot`: MLFQ level populations (the scheduler runs in the engine core
process), evicted blocks, per-turn preemptions and busy time.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mars_ray.engine.costmodel import CostModel, load_profile
from mars_ray.errors import ConfigError
from mars_ray.telemetry import EngineSnapshot

from .config import DeploymentConfig
from .messages import TokenChunk, TurnDone, TurnWork

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from mars_ray.vllm.stats import EngineBoard


def simulated_engine_args(config: DeploymentConfig, model_dir: Path) -> AsyncEngineArgs:
    """Engine arguments of a simulated device (writes a shape-only ``config.json``)."""
    from mars_ray.engine.costmodel import num_kv_blocks
    from mars_ray.vllm.bench_runtime import engine_args, write_model_config

    cost = CostModel(load_profile(config.cluster.gpu, config.cluster.model))
    num_blocks = num_kv_blocks(cost, config.engine_config)
    max_model_len = min(
        cost.profile.model.max_model_len_tokens, num_blocks * config.engine_config.block_size
    )
    write_model_config(cost.profile, max_model_len, model_dir)
    return engine_args(
        model_dir,
        config.policy,
        config.cluster,
        config.engine_config,
        num_blocks=num_blocks,
        max_model_len=max_model_len,
        time_scale=config.time_scale,
    )


def model_engine_args(config: DeploymentConfig, model: str) -> AsyncEngineArgs:
    """Engine arguments of a real model on this worker's GPU, scheduled by MARS."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from mars_ray.vllm.scheduler import MarsScheduler
    from mars_ray.vllm.validation import MarsHintsValidator

    engine = config.engine_config
    return AsyncEngineArgs(
        model=model,
        scheduler_cls=MarsScheduler,
        logits_processors=[MarsHintsValidator],
        block_size=engine.block_size,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        max_num_seqs=engine.max_num_seqs,
        enable_prefix_caching=engine.enable_prefix_caching,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        disable_log_stats=False,  # the stat logger feeds snapshots (admission, placement)
        additional_config={
            "mars": {
                "policy": config.policy,
                "gpu": config.cluster.gpu,
                "model": config.cluster.model,
                "time_scale": 1.0,
                # every tunable of the deployment's policy config reaches the engine
                "policy_config": config.policy_config.model_dump(mode="json"),
            }
        },
    )


class VllmEngineRunner:
    """One GPU's vLLM engine serving turns (module docstring). Call :meth:`start`
    (builds the engine and runs one warm-up request) before the first turn."""

    def __init__(self, engine_id: int, node_index: int, config: DeploymentConfig) -> None:
        if config.engine_config.cpu_offload_gb > 0:
            raise ConfigError("engine=vllm has no CPU KV tier here: cpu_offload_gb must be 0")
        self.engine_id = engine_id
        self.node_index = node_index
        self.config = config
        self.time_scale = config.time_scale
        self.incarnation = 0
        self.max_tokens = 0
        self._engine: AsyncLLM | None = None
        self._board: EngineBoard | None = None
        self._model_dir: tempfile.TemporaryDirectory[str] | None = None
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        """Build the engine (idempotent). Slow: seconds on CPU, minutes for real weights."""
        async with self._start_lock:
            if self._engine is not None:
                return
            from vllm.v1.engine.async_llm import AsyncLLM

            from mars_ray.vllm.bench_runtime import default_to_cpu_platform, warm_up
            from mars_ray.vllm.stats import BoardStatLogger, EngineBoard

            default_to_cpu_platform()
            if self.config.vllm_model is None:
                self._model_dir = tempfile.TemporaryDirectory(prefix="mars-vllm-model-")
                args = simulated_engine_args(self.config, Path(self._model_dir.name))
            else:
                args = model_engine_args(self.config, self.config.vllm_model)
            self._board = EngineBoard()
            engine = AsyncLLM.from_engine_args(
                args, stat_loggers=[BoardStatLogger.factory(self._board)]
            )
            await warm_up(engine)
            self.max_tokens = int(engine.model_config.max_model_len)
            self._engine = engine

    async def stop(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        if self._model_dir is not None:
            self._model_dir.cleanup()
            self._model_dir = None

    # -- turns -----------------------------------------------------------------
    async def generate(self, work: TurnWork) -> AsyncIterator[TokenChunk | TurnDone]:
        """Run one turn; yields token chunks as vLLM samples them, then its TurnDone.

        Closing the iterator early (the caller went away) aborts the request in vLLM.
        """
        if not work.prompt_token_ids:
            raise ValueError(f"turn {work.request_id}: engine=vllm needs the prompt's token ids")
        await self.start()
        engine = self._engine
        assert engine is not None
        submit_mono = time.monotonic()
        first_mono: float | None = None
        num_out = 0
        cached = 0
        async for output in engine.generate(
            {"prompt_token_ids": list(work.prompt_token_ids)},
            self._sampling_params(work),
            work.request_id,
        ):
            fresh = tuple(output.outputs[0].token_ids)
            if fresh:
                if first_mono is None:
                    first_mono = time.monotonic()
                yield TokenChunk(num_out, fresh)
                num_out += len(fresh)
            cached = output.num_cached_tokens or cached
        end_mono = time.monotonic()
        yield self._done(work, num_out, cached, submit_mono, first_mono or end_mono, end_mono)

    def _sampling_params(self, work: TurnWork) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from mars_ray.vllm.hints import SessionHints

        hints = SessionHints(
            work.session_id,
            work.turn_index,
            work.is_last_turn,
            work.predicted_tool_s,
            service_tokens=work.session_service_tokens,
        )
        return SamplingParams(
            max_tokens=work.max_output_tokens,
            # a simulated device samples positions, not a language: turns run their length
            ignore_eos=self.config.simulated_device,
            detokenize=False,  # the ingress decodes with its own tokenizer
            output_kind=RequestOutputKind.DELTA,
            extra_args=hints.to_extra_args(),
        )

    def _done(
        self,
        work: TurnWork,
        num_out: int,
        cached: int,
        submit_mono: float,
        first_mono: float,
        end_mono: float,
    ) -> TurnDone:
        from mars_ray.vllm.bench_runtime import TurnTokens

        num_prompt = len(work.prompt_token_ids)
        scale = self.time_scale  # simulated seconds per wall second (1: a real GPU)
        # the previous turn's last output token never had KV, hence the -1
        computed_before = max(0, work.prior_context_tokens - 1)
        tokens = TurnTokens.of(num_prompt, num_out, cached, computed_before)
        return TurnDone(
            session_id=work.session_id,
            turn_index=work.turn_index,
            engine_id=self.engine_id,
            prompt_tokens=num_prompt,
            output_tokens=num_out,
            cached_tokens=cached,
            recomputed_tokens=tokens.recomputed,
            num_preemptions=0,  # per-request preemptions are not reported by vLLM 0.29
            service_tokens=tokens.service,
            service_s=(end_mono - submit_mono) * scale,
            ttft_s=(first_mono - submit_mono) * scale,
            e2e_s=(end_mono - submit_mono) * scale,
        )

    def forget(self, session_id: str) -> None:
        """Nothing is dropped early: ``MarsScheduler`` lives in vLLM's engine-core
        process, out of reach here. KV it holds for a session that moved away stays
        held until the pin's TTL (1.5x the predicted tool time) runs out, then ages
        out of the prefix cache like any free block."""

    def snapshot(self) -> EngineSnapshot:
        board = self._board
        if board is None:
            return EngineSnapshot(self.engine_id, self.node_index, 0.0, 0.0, 0, 0, ())
        return EngineSnapshot(
            engine_id=self.engine_id,
            node_id=self.node_index,
            kv_usage=board.kv_usage,
            # blocks held plus what waiting requests would add are not reported;
            # usage is the lower bound admission and placement read
            kv_demand=board.kv_usage,
            num_running=board.num_running,
            num_waiting=board.num_waiting,
            level_populations=(),
            num_evicted_blocks=0,
            num_preemptions=board.num_preemptions,
            num_recomputed_tokens=0,
            busy_s=0.0,
            incarnation=self.incarnation,
        )
