"""Factories for scheduler-level tests: a scheduler over a tiny KV cache, requests
with session hints, and fabricated model-runner outputs (as vLLM's CPU tests do)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from mars_ray.clock import VirtualClock
from mars_ray.vllm.hints import SessionHints
from mars_ray.vllm.scheduler import MarsFeatures, MarsScheduler

BLOCK_SIZE = 16
_HASH_FN = sha256
init_none_hash(_HASH_FN)
_BLOCK_HASHER = get_request_block_hasher(BLOCK_SIZE, _HASH_FN)


def make_vllm_config(
    model_dir: Path,
    *,
    num_blocks: int,
    max_num_batched_tokens: int = 256,
    max_num_seqs: int = 16,
    max_model_len: int = 1024,
    long_prefill_token_threshold: int = 0,
    mars: dict[str, Any] | None = None,
) -> VllmConfig:
    """A VllmConfig for a scheduler over ``num_blocks`` blocks of 16 tokens."""
    model_config = ModelConfig(
        model=str(model_dir),
        skip_tokenizer_init=True,
        max_model_len=max_model_len,
        dtype="bfloat16",
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_chunked_prefill=True,
        is_encoder_decoder=False,
        async_scheduling=True,
        long_prefill_token_threshold=long_prefill_token_threshold,
    )
    cache_config = CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True)
    cache_config.num_gpu_blocks = num_blocks
    return VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        additional_config={"mars": mars or {}},
    )


def make_scheduler(
    cls: type[AsyncScheduler],
    model_dir: Path,
    *,
    num_blocks: int = 64,
    policy: str = "mars",
    features: MarsFeatures | None = None,
    clock: VirtualClock | None = None,
    policy_config: dict[str, Any] | None = None,
    **config: Any,
) -> AsyncScheduler:
    """A ``cls`` (MarsScheduler or vLLM's AsyncScheduler) over a tiny KV cache."""
    mars: dict[str, Any] = {"policy": policy, "features": features or MarsFeatures()}
    if policy_config is not None:
        mars["policy_config"] = policy_config
    vllm_config = make_vllm_config(model_dir, num_blocks=num_blocks, mars=mars, **config)
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer0"],
                FullAttentionSpec(
                    block_size=BLOCK_SIZE, num_kv_heads=1, head_size=16, dtype=torch.bfloat16
                ),
            )
        ],
    )
    kwargs: dict[str, Any] = dict(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK_SIZE,
        log_stats=True,
    )
    if clock is not None:
        kwargs["clock"] = clock
    return cls(**kwargs)


def make_request(
    request_id: str,
    num_prompt_tokens: int,
    max_tokens: int = 4,
    *,
    hints: SessionHints | None = None,
    extra_args: dict[str, Any] | None = None,
    arrival_s: float = 0.0,
    prompt: list[int] | None = None,
) -> Request:
    """A request of ``num_prompt_tokens`` distinct tokens (no accidental prefix hits)."""
    if hints is not None:
        extra_args = hints.to_extra_args()
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args)
    base = (abs(hash(request_id)) % 1000) * 10_000
    tokens = prompt if prompt is not None else [base + i for i in range(num_prompt_tokens)]
    return Request(
        request_id, tokens, params, None, arrival_time=arrival_s, block_hasher=_BLOCK_HASHER
    )


def runner_output(
    scheduler: AsyncScheduler, so: SchedulerOutput, token_id: int = 7
) -> ModelRunnerOutput:
    """What a model runner returns for ``so``: one token for each request whose
    chunk reached the end of its known tokens (prefill complete, or decoding).
    Call right after ``schedule()``, which has advanced ``num_computed_tokens``."""
    req_ids = list(so.num_scheduled_tokens)
    sampled = []
    for req_id in req_ids:
        request = scheduler.requests[req_id]
        sampled.append([token_id] if request.num_computed_tokens >= request.num_tokens else [])
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=sampled,
    )


def step(scheduler: AsyncScheduler, token_id: int = 7) -> SchedulerOutput:
    """One synchronous engine step: schedule, fabricate the output, update."""
    so = scheduler.schedule()
    scheduler.update_from_output(so, runner_output(scheduler, so, token_id))
    return so


def run_to_completion(scheduler: AsyncScheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    """Step until nothing is left; every step's output, in order."""
    outputs = []
    for _ in range(max_steps):
        if not scheduler.has_requests():
            return outputs
        outputs.append(step(scheduler))
    raise AssertionError(f"not finished after {max_steps} steps")


def num_free_blocks(scheduler: AsyncScheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def expire_pins(scheduler: AsyncScheduler, clock: VirtualClock) -> None:
    """Advance the policy clock past every pin's TTL and run one pass (pins expire at
    the start of a pass): what an idle engine's next arrival would see."""
    assert isinstance(scheduler, MarsScheduler)
    clock.advance_to(clock.now_s() + 1e9)
    step(scheduler)
    assert scheduler.num_pinned_blocks == 0


def assert_no_leak(scheduler: AsyncScheduler) -> None:
    """Every block but the null block is free (no pin holds any), and no request is
    tracked. A session that never ended leaves its pin until the TTL: call
    :func:`expire_pins` first."""
    if isinstance(scheduler, MarsScheduler):
        assert scheduler.num_pinned_blocks == 0 and not scheduler.pinned_sessions
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    assert not scheduler.requests
    assert not scheduler.running and not scheduler.waiting and not scheduler.skipped_waiting
