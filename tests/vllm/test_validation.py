"""Malformed session hints are refused at the API (``MarsHintsValidator``): a clear
error naming the key, HTTP 400 from vLLM's OpenAI server, and the engine goes on
serving with no block leaked."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TINY_LLAMA
from factories import make_scheduler
from vllm import EngineArgs, LLMEngine, SamplingParams
from vllm.exceptions import VLLMValidationError

from mars_ray.vllm.executor import SimulatedExecutor, token_at
from mars_ray.vllm.scheduler import MarsScheduler
from mars_ray.vllm.validation import VALIDATOR_FQCN, MarsHintsValidator, is_registered

VOCAB = 2048
BAD_HINTS: list[tuple[dict[str, Any], str]] = [
    ({"mars": {"session_id": "s", "turn": 1}}, "unknown session hint key(s) ['turn']"),
    ({"mars": {"session_id": "s", "expected_tool_s": -1.0}}, "'expected_tool_s' must be finite"),
    ({"mars": {"session_id": 7}}, "'session_id' must be a non-empty str"),
    ({"mars": "s-1"}, "must be a dict"),
    ({"mars_session_id": "s", "mars_turn_index": "3"}, "'mars_turn_index' must be an int"),
    ({"mars_session_id": "s", "mars_tool_s": 1}, "unknown session hint key(s) ['mars_tool_s']"),
]


def _params(max_tokens: int, extra_args: dict[str, Any] | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args)


@pytest.mark.parametrize(("extra_args", "message"), BAD_HINTS)
def test_validate_params_raises_a_400_error_naming_the_key(
    extra_args: dict[str, Any], message: str
) -> None:
    with pytest.raises(VLLMValidationError) as info:
        MarsHintsValidator.validate_params(_params(4, extra_args))
    assert message in str(info.value)
    assert info.value.parameter == "vllm_xargs"


def test_validate_params_passes_good_absent_and_foreign_extra_args() -> None:
    for extra in (
        None,
        {},
        {"kv_transfer_params": {"x": 1}},
        {"mars": {"session_id": "s", "turn_index": 2, "last_turn": False}},
        {"mars_session_id": "s", "mars_last_turn": 1, "mars_expected_tool_s": 3},
    ):
        MarsHintsValidator.validate_params(_params(4, extra))


def test_registration_is_recognised_by_class_or_name() -> None:
    assert is_registered([MarsHintsValidator]) and is_registered([VALIDATOR_FQCN])
    assert not is_registered(None) and not is_registered(["other.mod:Proc"])


def test_scheduler_says_when_hints_are_not_validated_at_the_api(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="mars_ray.vllm.scheduler"):
        make_scheduler(MarsScheduler, tiny_model_dir)
    assert VALIDATOR_FQCN in caplog.text


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    args = EngineArgs(
        model=str(tiny_model_dir),
        skip_tokenizer_init=True,
        load_format="dummy",
        enforce_eager=True,
        distributed_executor_backend=SimulatedExecutor,
        scheduler_cls=MarsScheduler,
        logits_processors=[MarsHintsValidator],
        num_gpu_blocks_override=64,
        block_size=16,
        max_model_len=512,
        max_num_batched_tokens=256,
        max_num_seqs=8,
        additional_config={"mars_sim": {"sleep_scale": 0}},
    )
    return LLMEngine.from_engine_args(args)


def _num_leaked_blocks(engine: LLMEngine) -> int:
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    return pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()


def test_engine_refuses_bad_hints_then_serves_a_good_request(engine: LLMEngine) -> None:
    for i, (extra_args, message) in enumerate(BAD_HINTS):
        with pytest.raises(VLLMValidationError, match="invalid MARS session hints") as info:
            engine.add_request(f"bad{i}", {"prompt_token_ids": [5, 6, 7]}, _params(3, extra_args))
        assert message in str(info.value)
        assert not engine.has_unfinished_requests()
    good = {"mars_session_id": "s", "mars_turn_index": 1, "mars_last_turn": 1}
    engine.add_request("good", {"prompt_token_ids": list(range(10, 40))}, _params(3, good))
    done = {}
    while engine.has_unfinished_requests():
        done.update({out.request_id: out for out in engine.step() if out.finished})
    assert list(done["good"].outputs[0].token_ids) == [token_at(p, VOCAB) for p in (30, 31, 32)]
    scheduler = engine.engine_core.engine_core.scheduler
    assert isinstance(scheduler, MarsScheduler)
    assert _num_leaked_blocks(engine) == 0 and scheduler.num_live_views == 0


# -- vLLM's OpenAI server, in process (its engine core runs in a child process) --


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama plus a word-level tokenizer (``w0`` ... ``w2047``) and a chat
    template, so that the server can render chat messages and detokenize."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny-chat-llama")
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    vocab = {f"w{i}": i for i in range(1, VOCAB)} | {"<unk>": 0}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "w1",
        "eos_token": "w2",
        "unk_token": "<unk>",
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


async def _serve_and_post(model_dir: Path, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """Build vLLM's OpenAI app the way ``vllm serve`` does and post ``bodies`` in turn."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import (
        build_async_engine_client_from_engine_args,
    )
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli = [
        "--model", str(model_dir),
        "--load-format", "dummy",
        "--enforce-eager",
        "--distributed-executor-backend", "mars_ray.vllm.executor.SimulatedExecutor",
        "--scheduler-cls", "mars_ray.vllm.scheduler.MarsScheduler",
        "--logits-processors", VALIDATOR_FQCN,
        "--num-gpu-blocks-override", "64",
        "--block-size", "16",
        "--max-model-len", "512",
        "--max-num-seqs", "8",
        "--additional-config", json.dumps({"mars_sim": {"sleep_scale": 0}}),
    ]  # fmt: skip
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(cli)
    engine_args = AsyncEngineArgs.from_cli_args(args)
    async with build_async_engine_client_from_engine_args(engine_args) as client:
        tasks = await client.get_supported_tasks()
        app = build_app(args, tasks, client.model_config)
        await init_app_state(client, app.state, args, tasks)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mars") as http:
            return [await http.post("/v1/chat/completions", json=body) for body in bodies]


def test_openai_server_answers_bad_hints_with_400_and_serves_good_ones(
    chat_model_dir: Path,
) -> None:
    chat = {
        "model": str(chat_model_dir),
        "messages": [{"role": "user", "content": "w5 w6 w7"}],
        "max_tokens": 3,
    }
    good_xargs = {
        "mars_session_id": "s-1",
        "mars_turn_index": 2,
        "mars_last_turn": False,  # JSON false: pydantic hands over 0
        "mars_expected_tool_s": 1.5,
    }
    bad_xargs = [
        {"mars_session_id": "s-1", "mars_turn": 1},
        {"mars_session_id": "s-1", "mars_expected_tool_s": -2},
        {"mars_session_id": 5},
        {"mars_session_id": "s-1", "mars_last_turn": "yes"},
    ]
    bodies = [{**chat, "vllm_xargs": x} for x in bad_xargs]
    bodies += [{**chat, "vllm_xargs": good_xargs}, chat]
    responses = asyncio.run(_serve_and_post(chat_model_dir, bodies))
    *bad, hinted, plain = responses
    for response, key in zip(
        bad, ["mars_turn", "mars_expected_tool_s", "mars_session_id", "mars_last_turn"], strict=True
    ):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "invalid MARS session hints" in error["message"] and key in error["message"]
        assert error["param"] == "vllm_xargs"
    for response in (hinted, plain):
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert len(choice["message"]["content"].split()) == 3
