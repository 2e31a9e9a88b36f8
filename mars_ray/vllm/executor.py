"""``SimulatedExecutor``: a vLLM v1 executor whose "GPU" is the MARS cost model.

Named by ``distributed_executor_backend`` (the class, or the string
``"mars_ray.vllm.executor.SimulatedExecutor"``), it lets the real ``AsyncLLM`` /
``LLMEngine``, scheduler, KV cache manager and OpenAI server run on a CPU machine:

* KV cache: one full-attention layer spec per model layer (shapes from the served
  model's ``config.json``), and as many blocks as the cost-model profile's GPU holds
  (``CostModel.num_gpu_blocks``) unless ``num_gpu_blocks_override`` is set.
* A step: the step time the cost model gives for the scheduled batch (docs/design.md
  §6), times ``sleep_scale``, on a single worker thread that keeps a device
  timeline: a step starts when the previous one ends if requests were left
  unfinished then (a busy engine), else when it is submitted, and its output is
  ready at ``start + step time``; the thread sleeps until then. The engine's own
  CPU work between the steps of a busy engine, and late wake-ups (the GIL,
  ``time.sleep`` overshoot), so do not add to the simulated time: the cost model's
  per-step constant already prices a real engine's overhead, which async scheduling
  hides on GPUs (vLLM's CPU platform turns async scheduling off, so without this
  every step would also pay this machine's scheduling time). Only when a step's
  CPU work outlasts the step itself does the timeline fall behind (it catches up
  on later steps); ``timeline.late_s`` / ``timeline.max_late_s`` say by how much
  outputs came after their timeline end (wall seconds, summed over steps / at worst).
  Then every request whose chunk reaches the end of its known tokens samples one
  token.
* Tokens are deterministic: the token at sequence position ``p`` is
  :func:`token_at` ``(p)``, independent of the request, so tests can predict them.

Settings come from ``additional_config={"mars_sim": {...}}`` (see
:class:`SimulationSettings`), falling back to the ``MARS_SIM_*`` environment
variables, then to the defaults. Only greedy-style generation is modelled: no
logprobs, spec decoding, pooling, LoRA or multimodal inputs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts
from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
from vllm.v1.executor.abstract import Executor
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheSpec
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from mars_ray.engine.costmodel import CostModel
from mars_ray.errors import ConfigError

#: key of the executor's settings in ``VllmConfig.additional_config``
SETTINGS_KEY = "mars_sim"

#: ``collective_rpc`` method name that answers the simulated device's counters
STATS_RPC = "mars_sim_stats"

_DEFAULT_GPU = "h100-80gb"
_DEFAULT_MODEL = "llama-3.1-8b"
_FIRST_TOKEN_ID = 100
_TOKEN_SPAN = 1000


def token_at(position: int, vocab_size: int = _FIRST_TOKEN_ID + _TOKEN_SPAN) -> int:
    """The token the simulated model emits at sequence position ``position``."""
    span = max(1, min(_TOKEN_SPAN, vocab_size - _FIRST_TOKEN_ID))
    return min(_FIRST_TOKEN_ID, vocab_size - 1) + position % span


@dataclass(frozen=True, slots=True)
class SimulationSettings:
    """How the simulated GPU behaves.

    ``gpu`` / ``model`` name a cost-model profile (``mars_ray/engine/profiles``).
    ``sleep_scale`` is real seconds slept per simulated step second: 1 runs in real
    time, 0 never sleeps (tests). (``WallClock.time_scale`` is its inverse, a
    speed-up; this one is a multiplier so that 0 can mean "no sleep".)
    """

    gpu: str = _DEFAULT_GPU
    model: str = _DEFAULT_MODEL
    sleep_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.sleep_scale >= 0:
            raise ConfigError(f"mars_sim.sleep_scale must be >= 0, got {self.sleep_scale}")

    @classmethod
    def from_vllm_config(cls, vllm_config: VllmConfig) -> SimulationSettings:
        """Settings from ``additional_config["mars_sim"]``, then ``MARS_SIM_*`` env vars."""
        extra = vllm_config.additional_config
        given: Mapping[str, Any] = extra.get(SETTINGS_KEY, {}) if isinstance(extra, dict) else {}
        unknown = sorted(set(given) - {"gpu", "model", "sleep_scale"})
        if unknown:
            raise ConfigError(
                f"unknown {SETTINGS_KEY} keys {unknown}; accepted: gpu, model, sleep_scale"
            )
        return cls(
            gpu=str(given.get("gpu", os.environ.get("MARS_SIM_GPU", _DEFAULT_GPU))),
            model=str(given.get("model", os.environ.get("MARS_SIM_MODEL", _DEFAULT_MODEL))),
            sleep_scale=float(
                given.get("sleep_scale", os.environ.get("MARS_SIM_SLEEP_SCALE", 1.0))
            ),
        )


@dataclass(frozen=True, slots=True)
class StepShape:
    """What the cost model needs to know of one scheduled batch."""

    num_seqs: int
    num_tokens: int
    kv_read_tokens: int  # decode contexts + prefill prior contexts
    prefill_attn_units: float


@dataclass(slots=True)
class DeviceTimeline:
    """When each step's output is ready on the simulated device (monotonic seconds).

    A step starts when the previous one ends if the engine was left busy by it (it
    would have launched the next step ahead, as async scheduling does on GPUs), else
    when it was submitted; it ends ``duration_s`` later.
    """

    free_at: float = 0.0  # when the last step ends
    late_s: float = 0.0  # summed over steps: how long after its end each output came
    max_late_s: float = 0.0

    def end_of(self, submitted_at: float, duration_s: float, busy: bool) -> float:
        """Place a step on the timeline; returns its end."""
        start = self.free_at if busy else max(self.free_at, submitted_at)
        self.free_at = start + duration_s
        return self.free_at

    def on_late(self, late_s: float) -> None:
        """The output was delivered ``late_s`` after its end (this machine was slow)."""
        self.late_s += late_s
        self.max_late_s = max(self.max_late_s, late_s)


@dataclass(slots=True)
class _SeqState:
    """The simulated model runner's view of one request."""

    num_known_tokens: int  # prompt (or resumed token list) + tokens sampled since


@dataclass(slots=True)
class SimulatedModelRunner:
    """Turns a ``SchedulerOutput`` into a step shape and deterministic sampled tokens."""

    vocab_size: int
    seqs: dict[str, _SeqState] = field(default_factory=dict)
    # outputs each unfinished request has left to sample (preempted ones included)
    num_left: dict[str, int] = field(default_factory=dict)

    @property
    def has_unfinished(self) -> bool:
        """Whether a request seen so far still has tokens to sample (the engine is busy)."""
        return bool(self.num_left)

    def shape_and_output(self, so: SchedulerOutput) -> tuple[StepShape, ModelRunnerOutput]:
        """Apply one scheduled step: the batch's shape and the tokens it samples."""
        self._apply_membership(so)
        computed = self._computed_before(so)
        req_ids = list(so.num_scheduled_tokens)
        sampled: list[list[int]] = []
        num_decodes, kv_read, attn_units = 0, 0, 0.0
        for req_id in req_ids:
            n, c = so.num_scheduled_tokens[req_id], computed[req_id]
            if n == 1 and c > 0:
                num_decodes += 1
            else:
                attn_units += CostModel.prefill_attn_units(n, c)
            kv_read += c
            sampled.append(self._sample(req_id, c + n))
        shape = StepShape(len(req_ids), so.total_num_scheduled_tokens, kv_read, attn_units)
        output = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
        )
        return shape, output

    def _apply_membership(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:  # finished, or aborted
            self.seqs.pop(req_id, None)
            self.num_left.pop(req_id, None)
        for req_id in so.preempted_req_ids or ():
            self.seqs.pop(req_id, None)
        for new in so.scheduled_new_reqs:
            self.seqs[new.req_id] = _SeqState(
                len(new.prefill_token_ids or new.prompt_token_ids or ())
            )
            params = new.sampling_params
            if params is not None and params.max_tokens and new.req_id not in self.num_left:
                self.num_left[new.req_id] = params.max_tokens
        cached = so.scheduled_cached_reqs
        for req_id in cached.resumed_req_ids:
            self.seqs[req_id] = _SeqState(len(cached.all_token_ids[req_id]))

    @staticmethod
    def _computed_before(so: SchedulerOutput) -> dict[str, int]:
        computed = {new.req_id: new.num_computed_tokens for new in so.scheduled_new_reqs}
        cached = so.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        return computed

    def _sample(self, req_id: str, end_position: int) -> list[int]:
        """One token when the chunk reaches the end of the known sequence, else none."""
        seq = self.seqs.get(req_id)
        if seq is None or end_position < seq.num_known_tokens:
            return []  # a prefill chunk with more prompt to go
        seq.num_known_tokens += 1
        left = self.num_left.get(req_id)
        if left is not None:
            if left <= 1:
                del self.num_left[req_id]
            else:
                self.num_left[req_id] = left - 1
        return [token_at(end_position, self.vocab_size)]


class SimulatedExecutor(Executor):
    """A vLLM ``Executor`` that sleeps cost-model step times instead of running a model."""

    def _init_executor(self) -> None:
        self.settings = SimulationSettings.from_vllm_config(self.vllm_config)
        self.cost_model = CostModel.from_names(self.settings.gpu, self.settings.model)
        self.runner = SimulatedModelRunner(self.model_config.get_vocab_size())
        # One thread: steps run in submission order, like a CUDA stream, and the
        # engine may schedule the next step while this one "computes".
        self._device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mars-sim-gpu")
        self._pending_output: ModelRunnerOutput | None = None
        self.timeline = DeviceTimeline()
        self._busy_after_last_step = False  # requests were left unfinished by it
        self.num_steps = 0
        self.simulated_busy_s = 0.0

    # -- KV cache set-up -----------------------------------------------------
    def get_kv_cache_specs(self) -> list[dict[str, KVCacheSpec]]:
        spec = self._layer_spec()
        num_layers = self.model_config.get_num_layers(self.parallel_config)
        return [{f"model.layers.{i}.self_attn.attn": spec for i in range(num_layers)}]

    def _layer_spec(self) -> FullAttentionSpec:
        return FullAttentionSpec(
            block_size=self.cache_config.block_size,
            num_kv_heads=self.model_config.get_num_kv_heads(self.parallel_config),
            head_size=self.model_config.get_head_size(),
            dtype=_kv_dtype(self.model_config.dtype),
        )

    def determine_available_memory(self) -> list[int]:
        """Bytes for the KV cache: the profile GPU's block count at this model's page size."""
        num_blocks = self.cost_model.num_gpu_blocks(
            self.cache_config.block_size, self.cache_config.gpu_memory_utilization
        )
        num_layers = self.model_config.get_num_layers(self.parallel_config)
        return [num_blocks * self._layer_spec().page_size_bytes * num_layers]

    def get_supported_kv_cache_layouts(self) -> list[list[str]]:
        return [[layout.name for layout in get_supported_kv_cache_layouts([])]]

    def set_kv_cache_layout(self, layout_name: str) -> None:
        """Nothing to lay out: the engine core already recorded it on the cache config."""

    def initialize_from_config(self, kv_cache_configs: list[KVCacheConfig]) -> None:
        self.kv_cache_config = kv_cache_configs[0]

    def compile_or_warm_up_model(self) -> None:
        """Nothing to compile."""

    @property
    def supported_tasks(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("generate",)

    # -- steps ---------------------------------------------------------------
    def execute_model(  # type: ignore[override]
        self, scheduler_output: SchedulerOutput, non_block: bool = False
    ) -> ModelRunnerOutput | Future[ModelRunnerOutput | None] | None:
        future = self._device.submit(self._run_step, scheduler_output, time.monotonic())
        return future if non_block else future.result()

    def sample_tokens(  # type: ignore[override]
        self, grammar_output: GrammarOutput | None, non_block: bool = False
    ) -> ModelRunnerOutput | Future[ModelRunnerOutput]:
        future = self._device.submit(self._take_output)
        return future if non_block else future.result()

    def _run_step(self, so: SchedulerOutput, submitted_at: float) -> ModelRunnerOutput | None:
        """Runs on the device thread: sleep the step, keep the output for sampling."""
        shape, output = self.runner.shape_and_output(so)
        if shape.num_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        step_s = self.cost_model.step_time_s(
            shape.num_seqs, shape.num_tokens, shape.kv_read_tokens, shape.prefill_attn_units
        )
        self.num_steps += 1
        self.simulated_busy_s += step_s
        if self.settings.sleep_scale > 0:
            self._sleep_on_timeline(submitted_at, step_s * self.settings.sleep_scale)
        self._busy_after_last_step = self.runner.has_unfinished
        self._pending_output = output
        return None  # like vLLM's runner: tokens come from sample_tokens()

    def _sleep_on_timeline(self, submitted_at: float, duration_s: float) -> None:
        """Sleep until the step's end on the device timeline (see the module docstring)."""
        end = self.timeline.end_of(submitted_at, duration_s, self._busy_after_last_step)
        delay_s = end - time.monotonic()
        if delay_s > 0:
            time.sleep(delay_s)
        else:
            self.timeline.on_late(-delay_s)

    def _take_output(self) -> ModelRunnerOutput:
        output, self._pending_output = self._pending_output, None
        if output is None:
            raise RuntimeError("sample_tokens() called without a preceding executed step")
        return output

    def take_draft_token_ids(self) -> None:
        return None

    def supports_draft_weight_updates(self) -> bool:
        """No draft model (asked by the multiprocess engine core at start-up)."""
        return False

    def execute_dummy_batch(self) -> None:
        """No model: a dummy batch (data-parallel padding) costs nothing."""

    # -- plumbing ------------------------------------------------------------
    def collective_rpc(
        self,
        method: str | Callable[..., Any],
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        non_block: bool = False,
    ) -> Any:
        """The no-op control calls the engine may make, and :data:`STATS_RPC` (one
        worker's :meth:`device_stats`); anything else fails loudly."""
        name = method if isinstance(method, str) else getattr(method, "__name__", repr(method))
        if name != STATS_RPC and name not in _NOOP_RPCS:
            raise NotImplementedError(
                f"SimulatedExecutor does not support collective_rpc({name!r})"
            )
        result: list[Any] = [self.device_stats() if name == STATS_RPC else None]
        if non_block:
            done: Future[list[Any]] = Future()
            done.set_result(result)
            return done
        return result

    def device_stats(self) -> dict[str, float]:
        """Counters of the simulated device (plain values: they cross processes)."""
        return {
            "num_steps": self.num_steps,
            "simulated_busy_s": self.simulated_busy_s,
            "late_s": self.timeline.late_s,
            "max_late_s": self.timeline.max_late_s,
        }

    def check_health(self) -> None:
        """Always healthy: there is no device to lose."""

    def shutdown(self) -> None:
        self._device.shutdown(wait=True, cancel_futures=True)

    @classmethod
    def supports_async_scheduling(cls) -> bool:
        return True


_NOOP_RPCS = frozenset(
    {
        "update_max_model_len",
        "synchronize_device",
        "reset_mm_cache",
        "reset_encoder_cache",
        "profile",
        "shutdown",
    }
)


def _kv_dtype(model_dtype: torch.dtype | str) -> torch.dtype:
    """The KV dtype to size pages with (CPU runs may resolve the model to float32;
    ``ModelConfig`` has resolved a dtype name to a ``torch.dtype`` by now)."""
    if isinstance(model_dtype, torch.dtype) and model_dtype.is_floating_point:
        return model_dtype
    return torch.bfloat16
