"""``--engine vllm`` end to end: GPU-worker actors running vLLM's ``AsyncLLM`` with
``MarsScheduler`` on simulated devices (2 logical GPUs on 2 emulated nodes), behind
the real Serve ingress and global scheduler, driven by httpx and the ``openai`` client.

The simulated device samples ``token_at(position)``, so every answer is predictable;
the ingress's word tokenizer reads an echoed ``t<i>`` back as id ``i``, so a
session's next prompt repeats its earlier ids and vLLM's prefix cache must hit.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from mars_ray.actors.config import deployment_config
from mars_ray.cluster.serving import RunningDeployment, running_deployment

pytest.importorskip("vllm.v1.engine.async_llm", reason="engine=vllm needs the vllm extra")

from mars_ray.vllm.executor import token_at

BLOCK = 16
NUM_BLOCKS = 512  # per engine: a max_model_len of 8192 tokens


@pytest.fixture(scope="module")
def deployment(port: int) -> Iterator[RunningDeployment]:
    config = deployment_config(
        {
            "engine": "vllm",
            "cluster": {"num_gpus": 2, "num_nodes": 2},
            "placement_strategy": "STRICT_SPREAD",
            "engine_config": {"num_gpu_blocks_override": NUM_BLOCKS},
            "time_scale": 20.0,
        }
    )
    with running_deployment(config, num_nodes=2, port=port) as running:
        yield running


@pytest.fixture(scope="module")
def http(deployment: RunningDeployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment.url, timeout=120) as client:
        yield client


def expected_text(first_position: int, n: int) -> str:
    return "".join(f" t{token_at(p)}" for p in range(first_position, first_position + n))


def words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_a_session_runs_in_vllm_and_its_continuations_hit_the_prefix_cache(
    http: httpx.Client,
) -> None:
    messages = [{"role": "user", "content": words("task", 100)}]
    context = 0  # tokens of the conversation so far
    engines = set()
    for turn, (new_words, max_tokens) in enumerate([(100, 30), (37, 25), (60, 40)]):
        if turn > 0:
            messages.append({"role": "user", "content": words(f"obs{turn}-", new_words)})
        prompt = context + new_words
        body = {
            "messages": messages,
            "max_tokens": max_tokens,
            "session_id": "agent-1",
            "mars": {"turn_index": turn, "expected_tool_s": 2.0, "last_turn": turn == 2},
        }
        reply = http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        text = data["choices"][0]["message"]["content"]
        # the model's tokens, at the positions after the whole prompt: vLLM ran it
        assert text == expected_text(prompt, max_tokens)
        usage = data["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, max_tokens)
        # every full block of the last turn's computed KV (all but its last output) hits
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert cached == (max(0, context - 1) // BLOCK) * BLOCK, (turn, cached)
        engines.add(data["mars"]["engine_id"])
        messages.append({"role": "assistant", "content": text})
        context = prompt + max_tokens
    assert len(engines) == 1, "KV-affine placement keeps the session on its engine"


def test_streaming_through_the_openai_client(deployment: RunningDeployment) -> None:
    client = openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="mars-sim",
        messages=[{"role": "user", "content": words("q", 40)}],
        max_tokens=50,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"session_id": "stream-1"},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == expected_text(40, 50)
    assert len(pieces) > 1, "tokens arrive in several chunks"
    assert usage is not None and usage.completion_tokens == 50


def test_completions_take_token_ids_and_refuse_ids_outside_the_vocabulary(
    http: httpx.Client,
) -> None:
    ok = http.post("/v1/completions", json={"prompt": [5, 6, 7, 8], "max_tokens": 3})
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["text"] == expected_text(4, 3)
    bad = http.post("/v1/completions", json={"prompt": [5, 10**9], "max_tokens": 3})
    assert bad.status_code == 400
    assert "outside" in bad.json()["error"]["message"]


def test_a_prompt_beyond_vllm_s_context_is_400_and_others_carry_on(http: httpx.Client) -> None:
    models = http.get("/v1/models").json()["data"][0]
    assert models["max_model_len"] == NUM_BLOCKS * BLOCK
    too_long = http.post(
        "/v1/completions", json={"prompt": words("x", NUM_BLOCKS * BLOCK), "max_tokens": 8}
    )
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    fine = http.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 2})
    assert fine.status_code == 200


def test_engine_state_reaches_the_metrics(http: httpx.Client) -> None:
    """The global scheduler polls the vLLM workers' snapshots (stat loggers) into
    /metrics: one KV-usage series per engine."""
    text = http.get("/metrics").text
    engines = {
        line.split('engine="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("mars_kv_usage_ratio{")
    }
    assert engines == {"0", "1"}
