"""The Serve ingress end to end: a real deployment on a head + two emulated nodes with
logical GPUs, driven by raw HTTP (httpx) and the official ``openai`` client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mars_ray.actors.config import deployment_config
from mars_ray.actors.engine_runner import sim_token_id
from mars_ray.cluster.serving import RunningDeployment, running_deployment

KEY = "test-key"
TIME_SCALE = 20.0
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def deployment(port: int) -> Iterator[RunningDeployment]:
    config = deployment_config(
        {
            "cluster": {"num_gpus": 2, "num_nodes": 2},
            "placement_strategy": "STRICT_SPREAD",
            "time_scale": TIME_SCALE,
            "api_key": KEY,
            "tools": {
                "timeout_s": 5.0,
                "max_output_bytes": 4096,
                "allow_replay": True,  # replays traced tool calls (off by default)
                "max_replay_s": 60.0,
            },
        }
    )
    with running_deployment(config, num_nodes=2, port=port) as running:
        yield running


@pytest.fixture(scope="module")
def http(deployment: RunningDeployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment.url, headers=AUTH, timeout=60) as client:
        yield client


def words(n: int) -> str:
    return " ".join(["w"] * n)


def chat(http: httpx.Client, text: str, max_tokens: int, **extra: object) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **extra}
    return http.post("/v1/chat/completions", json=body)


def test_health_models_and_openapi_match_the_routes(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz").json()
    assert ready["alive_engines"] == [0, 1]
    assert ready["tool_nodes"] == [0, 1], "one tool executor per GPU node"
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["mars-sim"]
    paths = set(http.get("/openapi.json").json()["paths"])
    assert {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/sessions",
        "/v1/sessions/{session_id}",
        "/v1/sessions/{session_id}/tools",
        "/v1/sessions/{session_id}/tool_events",
        "/metrics",
        "/healthz",
        "/readyz",
    } <= paths


def test_gpu_workers_are_spread_over_the_two_nodes(deployment: RunningDeployment) -> None:
    import ray

    from mars_ray.actors.names import NAMESPACE, worker_name

    nodes = {
        ray.get(ray.get_actor(worker_name(i), namespace=NAMESPACE).ready.remote())["node_id"]
        for i in range(2)
    }
    assert len(nodes) == 2
    assert nodes <= set(deployment.ray.node_ids)


def test_a_moved_session_brings_its_kv_to_the_other_gpu(http: httpx.Client) -> None:
    """Rebalancing moves a session between turns with its KV over torch.distributed
    (gloo between the two nodes' workers): the new GPU, which never ran the session,
    serves its next turn from cache."""
    import ray

    from mars_ray.actors.names import NAMESPACE, SCHEDULER_ACTOR_NAME

    scheduler = ray.get_actor(SCHEDULER_ACTOR_NAME, namespace=NAMESPACE)
    first = chat(http, words(300), 20, session_id="mover", mars={"expected_tool_s": 5.0})
    assert first.status_code == 200, first.text
    engine = first.json()["mars"]["engine_id"]
    moves_before = ray.get(scheduler.status.remote())["num_kv_moves"]
    num_blocks = ray.get(scheduler.move_session.remote("mover", 1 - engine))
    assert num_blocks == (300 + 20 - 1) // 16, "every full block of the computed context"
    status = ray.get(scheduler.status.remote())
    assert status["num_kv_moves"] == moves_before + 1
    assert status["num_kv_move_failures"] == 0
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    moved = [s for s in families["mars_kv_migrations"].samples if s.name.endswith("_total")]
    assert [(s.labels["outcome"], s.value) for s in moved] == [("moved", 1.0)]
    (blocks,) = [
        s for s in families["mars_kv_migrated_blocks"].samples if s.name.endswith("_total")
    ]
    assert blocks.value == num_blocks
    second = chat(http, words(330), 5, session_id="mover")
    assert second.status_code == 200, second.text
    mars = second.json()["mars"]
    assert mars["engine_id"] == 1 - engine
    assert mars["cached_tokens"] == num_blocks * 16, "the moved KV was a prefix hit"
    assert mars["recomputed_tokens"] == 320 - 1 - num_blocks * 16  # the partial block only


def test_one_shot_chat_completion_counts_tokens(http: httpx.Client) -> None:
    response = chat(http, words(40), 7)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["prompt_tokens"] == 40
    assert body["usage"]["completion_tokens"] == 7
    assert len(body["choices"][0]["message"]["content"].split()) == 7
    assert body["choices"][0]["finish_reason"] == "length"


def test_completions_endpoint_accepts_token_ids(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"prompt": list(range(100)), "max_tokens": 3})
    assert response.status_code == 200, response.text
    assert response.json()["usage"] == {
        "prompt_tokens": 100,
        "completion_tokens": 3,
        "total_tokens": 103,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_openai_client_streams_a_multi_turn_session_with_tools(
    deployment: RunningDeployment, http: httpx.Client
) -> None:
    client = openai.OpenAI(base_url=f"{deployment.url}/v1", api_key=KEY, max_retries=0)
    sid = http.post("/v1/sessions", json={"session_id": "agent-1"}).json()["session_id"]
    assert sid == "agent-1"
    messages = [{"role": "user", "content": words(600)}]
    stream = client.chat.completions.create(
        model="mars-sim",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-session-id": sid},
        extra_body={"mars": {"expected_tool_s": 1.0}},
    )
    pieces, chunks = [], 0
    for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    text = "".join(pieces)
    expected = [f"t{sim_token_id(sid, 0, i)}" for i in range(40)]
    assert text.split() == expected, "every token exactly once, in order"
    assert chunks >= 3

    ran = http.post(f"/v1/sessions/{sid}/tools", json={"argv": ["python3", "-c", "print(6*7)"]})
    assert ran.status_code == 200, ran.text
    assert ran.json()["stdout"].strip() == "42" and ran.json()["exit_code"] == 0
    replay = http.post(f"/v1/sessions/{sid}/tools", json={"replay": {"cpu_s": 1.0, "wait_s": 1.0}})
    assert replay.status_code == 200, replay.text
    assert replay.json()["wall_s"] >= 2.0 * 0.9  # simulated seconds

    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": words(50)}]
    second = client.chat.completions.create(
        model="mars-sim",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=5,
        extra_headers={"x-session-id": sid},
        extra_body={"mars": {"turn_index": 1, "last_turn": True}},
    )
    assert second.usage is not None and second.usage.prompt_tokens == 690
    extra = second.model_extra or {}
    assert extra["mars"]["turn_index"] == 1
    assert extra["mars"]["cached_tokens"] >= 600, "the session's KV was kept across the tool"
    # the last turn closed the session
    assert http.get(f"/v1/sessions/{sid}").status_code == 404


def test_session_close_returns_its_summary(http: httpx.Client) -> None:
    sid = http.post("/v1/sessions", json={}).json()["session_id"]
    assert chat(http, words(20), 4, session_id=sid).status_code == 200
    time.sleep(2.5 / TIME_SCALE)  # the agent's own tool, reported below
    assert http.post(f"/v1/sessions/{sid}/tool_events", json={"tool_s": 2.5}).status_code == 200
    assert chat(http, words(30), 4, session_id=sid).status_code == 200
    summary = http.delete(f"/v1/sessions/{sid}").json()
    assert summary["num_turns"] == 2
    assert summary["tool_s"] == pytest.approx(2.5)
    assert summary["slowdown"] >= 0.99


@pytest.mark.parametrize(
    ("call", "status", "needle"),
    [
        (
            lambda h: h.post(
                "/v1/chat/completions",
                content=b"{bad json",
                headers={"content-type": "application/json"},
            ),
            400,
            "JSON",
        ),
        (lambda h: h.post("/v1/chat/completions", json={"max_tokens": 3}), 400, "messages"),
        (
            lambda h: h.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
            ),
            400,
            "max_tokens",
        ),
        (lambda h: chat(h, "x", 2, mars={"turn_idx": 1}), 400, "turn_idx"),
        (lambda h: chat(h, "x", 2, mars={"expected_tool_s": -1}), 400, "expected_tool_s"),
        (lambda h: chat(h, "x", 2, model="gpt-4"), 404, "gpt-4"),
        (lambda h: chat(h, words(500_000), 2), 400, "context"),
        (lambda h: h.delete("/v1/sessions/nope"), 404, "nope"),
        (lambda h: h.post("/v1/sessions/nope/tools", json={"argv": ["ls"]}), 404, "nope"),
        (lambda h: h.post("/v1/sessions", json={"session_id": "bad id!"}), 400, "session_id"),
        (
            lambda h: h.post(
                "/v1/sessions/nope/tools", json={"replay": {"cpu_s": 50, "wait_s": 11}}
            ),
            400,
            "tools.max_replay_s = 60",
        ),
    ],
)
def test_bad_requests_get_a_clear_4xx(http: httpx.Client, call, status: int, needle: str) -> None:  # type: ignore[no-untyped-def]
    response = call(http)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]


def test_turn_conflicts_and_sandbox_refusals(http: httpx.Client) -> None:
    sid = http.post("/v1/sessions", json={}).json()["session_id"]
    wrong = chat(http, words(5), 2, session_id=sid, mars={"turn_index": 3})
    assert wrong.status_code == 409 and "expects turn 0" in wrong.json()["error"]["message"]
    assert chat(http, words(5), 2, session_id=sid).status_code == 200
    escape = http.post(f"/v1/sessions/{sid}/tools", json={"argv": ["cat", "/etc/passwd"]})
    assert escape.status_code == 400 and "outside" in escape.json()["error"]["message"]
    both = http.post(f"/v1/sessions/{sid}/tools", json={"argv": ["ls"], "replay": {"cpu_s": 1}})
    assert both.status_code == 400 and "exactly one" in both.json()["error"]["message"]
    runaway = http.post(
        f"/v1/sessions/{sid}/tools",
        json={"argv": ["python3", "-c", "while True: pass"], "timeout_s": 1},
    )
    assert runaway.status_code == 200 and runaway.json()["exit_code"] is None
    huge = http.post(
        f"/v1/sessions/{sid}/tools", json={"argv": ["python3", "-c", "print('x' * 10_000_000)"]}
    )
    assert huge.status_code == 200 and huge.json()["stdout_truncated"]
    assert len(huge.json()["stdout"]) <= 4096
    assert http.delete(f"/v1/sessions/{sid}").status_code == 200


def test_wrong_or_missing_api_key_is_401(deployment: RunningDeployment) -> None:
    with httpx.Client(base_url=deployment.url, timeout=30) as anonymous:
        assert anonymous.get("/v1/models").status_code == 401
        bad = anonymous.post("/v1/sessions", json={}, headers={"authorization": "Bearer nope"})
        assert bad.status_code == 401 and "API key" in bad.json()["error"]["message"]
        assert anonymous.get("/healthz").status_code == 200  # probes stay open


def test_bad_requests_do_not_disturb_a_running_session(deployment: RunningDeployment) -> None:
    async def run() -> tuple[int, list[int]]:
        async with httpx.AsyncClient(base_url=deployment.url, headers=AUTH, timeout=60) as h:
            body = {"messages": [{"role": "user", "content": words(2000)}], "max_tokens": 300}
            good = h.post("/v1/chat/completions", json=body, headers={"x-session-id": "steady"})
            bad = [
                h.post("/v1/chat/completions", json={"messages": []}),
                h.post(
                    "/v1/chat/completions",
                    content=b"[",
                    headers={"content-type": "application/json"},
                ),
                h.delete("/v1/sessions/ghost"),
            ]
            results = await asyncio.gather(good, *bad)
            return results[0].status_code, [r.status_code for r in results[1:]]

    good, bad = asyncio.run(run())
    assert good == 200
    assert bad == [400, 400, 404]


def test_metrics_are_prometheus_text_with_mars_series(http: httpx.Client) -> None:
    text = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "mars_turns" in families  # counters are exposed as <name>_total
    assert sum(s.value for s in families["mars_turns"].samples if s.name.endswith("_total")) >= 3
    assert "mars_kv_usage_ratio" in families
    assert "mars_session_jct_seconds" in families
    engines = {s.labels["engine"] for s in families["mars_kv_usage_ratio"].samples}
    assert engines == {"0", "1"}
