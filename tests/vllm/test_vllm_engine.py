"""The real vLLM engine on CPU: SimulatedExecutor as the model, MarsScheduler inside."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm import EngineArgs, LLMEngine, SamplingParams
from vllm.outputs import RequestOutput

from mars_ray.vllm.executor import SimulatedExecutor, token_at
from mars_ray.vllm.hints import SessionHints
from mars_ray.vllm.scheduler import MarsScheduler

VOCAB = 2048


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    args = EngineArgs(
        model=str(tiny_model_dir),
        skip_tokenizer_init=True,
        load_format="dummy",
        enforce_eager=True,
        distributed_executor_backend=SimulatedExecutor,
        scheduler_cls=MarsScheduler,
        num_gpu_blocks_override=64,
        block_size=16,
        max_model_len=512,
        max_num_batched_tokens=256,
        max_num_seqs=8,
        additional_config={"mars_sim": {"sleep_scale": 0}, "mars": {"policy": "mars"}},
    )
    return LLMEngine.from_engine_args(args)


def _run(
    engine: LLMEngine, prompts: dict[str, tuple[list[int], SamplingParams]]
) -> dict[str, RequestOutput]:
    for rid, (prompt, params) in prompts.items():
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def _params(max_tokens: int, hints: SessionHints | None = None) -> SamplingParams:
    extra = hints.to_extra_args() if hints else None
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra)


def test_the_engine_runs_mars_scheduler(engine: LLMEngine) -> None:
    core = engine.engine_core.engine_core  # in-process client (no multiprocessing)
    assert isinstance(core.scheduler, MarsScheduler)
    assert isinstance(core.model_executor, SimulatedExecutor)


def test_multi_turn_session_generates_deterministic_tokens(engine: LLMEngine) -> None:
    prompt = list(range(10, 60))
    out = _run(engine, {"t0": (prompt, _params(5, SessionHints("s", 0, False, 0.2)))})
    tokens0 = list(out["t0"].outputs[0].token_ids)
    assert tokens0 == [token_at(p, VOCAB) for p in range(50, 55)]
    prompt1 = prompt + tokens0 + list(range(300, 320))
    out = _run(engine, {"t1": (prompt1, _params(4, SessionHints("s", 1, True, 0.0)))})
    assert out["t1"].num_cached_tokens >= 48  # turn 0's context was kept warm
    assert list(out["t1"].outputs[0].token_ids) == [
        token_at(p, VOCAB) for p in range(len(prompt1), len(prompt1) + 4)
    ]


def test_concurrent_requests_and_malformed_hints_never_crash_the_engine(
    engine: LLMEngine,
) -> None:
    prompts = {f"c{i}": (list(range(100 + i, 180 + i)), _params(6)) for i in range(6)}
    prompts["bad"] = (
        list(range(5, 25)),
        SamplingParams(
            max_tokens=3, ignore_eos=True, extra_args={"mars": {"session_id": "x", "turn": 1}}
        ),
    )
    done = _run(engine, prompts)
    assert all(
        len(o.outputs[0].token_ids) == p[1].max_tokens
        for o, p in ((done[k], v) for k, v in prompts.items())
    )
    core = engine.engine_core.engine_core
    pool = core.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
