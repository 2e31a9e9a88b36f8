"""Faults on a live deployment (head + two emulated nodes, two logical GPUs each): a
GPU worker killed mid-turn, a tool worker killed mid-call, the global scheduler
restarted, a node removed. No session may be lost or answered twice."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import ray

from mars_ray.actors.config import deployment_config
from mars_ray.actors.engine_runner import sim_token_id
from mars_ray.actors.names import NAMESPACE, SCHEDULER_ACTOR_NAME, executor_name, worker_name
from mars_ray.cluster.serving import RunningDeployment, running_deployment

TIME_SCALE = 5.0


@pytest.fixture(scope="module")
def deployment(port: int) -> Iterator[RunningDeployment]:
    config = deployment_config(
        {
            "cluster": {"num_gpus": 4, "num_nodes": 2},
            "placement_strategy": "SPREAD",
            "time_scale": TIME_SCALE,
            "tools": {"allow_replay": True},  # the tests replay traced tool calls
        }
    )
    with running_deployment(config, num_nodes=2, port=port) as running:
        yield running


@pytest.fixture
def http(deployment: RunningDeployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment.url, timeout=120) as client:
        yield client


def words(n: int) -> str:
    return " ".join(["w"] * n)


def stream_turn(
    http: httpx.Client, sid: str, prompt: int, max_tokens: int, first_token: threading.Event
) -> tuple[list[str], dict]:
    import json

    body = {
        "messages": [{"role": "user", "content": words(prompt)}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    text: list[str] = []
    info: dict = {}
    with http.stream(
        "POST", "/v1/chat/completions", json=body, headers={"x-session-id": sid}
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            info = event.get("mars", info)
            for choice in event["choices"]:
                piece = choice.get("delta", {}).get("content")
                if piece:
                    text.extend(piece.split())
                    first_token.set()
    return text, info


def run_in_thread(fn, *args):  # type: ignore[no-untyped-def]
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # surfaced by the caller
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def test_a_gpu_worker_killed_mid_turn_is_retried_elsewhere_without_duplicates(
    http: httpx.Client,
) -> None:
    sid = "victim-session"
    http.post("/v1/sessions", json={"session_id": sid})
    first = threading.Event()
    # 1500 decode steps of ~6.5 ms = ~10 s simulated, ~2 s of wall time at 5x
    thread, box = run_in_thread(stream_turn, http, sid, 1000, 1500, first)
    assert first.wait(30)
    engine_id = http.get(f"/v1/sessions/{sid}").json()["engine_id"]
    ray.kill(ray.get_actor(worker_name(engine_id), namespace=NAMESPACE))
    thread.join(60)
    assert "error" not in box, box.get("error")
    tokens, info = box["result"]
    assert tokens == [f"t{sim_token_id(sid, 0, i)}" for i in range(1500)], (
        "every token exactly once, in order, across the retry"
    )
    assert info["attempt"] == 1 and info["engine_id"] != engine_id
    ready = http.get("/readyz").json()
    assert engine_id not in ready["alive_engines"]
    assert ready["num_turn_retries"] >= 1
    # the session goes on on the survivors
    second = http.post(
        "/v1/chat/completions",
        headers={"x-session-id": sid},
        json={
            "messages": [{"role": "user", "content": words(2600)}],
            "max_tokens": 3,
            "mars": {"turn_index": 1, "last_turn": True},
        },
    )
    assert second.status_code == 200, second.text


def test_a_tool_worker_killed_mid_call_is_retried_and_replaced(http: httpx.Client) -> None:
    sid = "tool-session"
    http.post("/v1/sessions", json={"session_id": sid})
    assert (
        http.post(
            "/v1/chat/completions",
            headers={"x-session-id": sid},
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ).status_code
        == 200
    )
    node = http.get(f"/v1/sessions/{sid}").json()["engine_id"]
    call = {"replay": {"cpu_s": 0.0, "wait_s": 10.0}}  # 2 s of wall time
    thread, box = run_in_thread(lambda: http.post(f"/v1/sessions/{sid}/tools", json=call))
    time.sleep(0.7)
    status = http.get("/readyz").json()
    for node in status["tool_nodes"]:  # kill every executor: wherever the call went
        ray.kill(ray.get_actor(executor_name(node), namespace=NAMESPACE))
    thread.join(60)
    assert "error" not in box, repr(box.get("error"))
    response = box["result"]
    assert response.status_code == 200, response.text
    assert response.json()["attempts"] >= 2  # every executor was killed: maybe twice
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(http.get("/readyz").json()["tool_nodes"]) < 2:
        time.sleep(0.2)
    assert http.get("/readyz").json()["tool_nodes"] == [0, 1], "executors were re-created"
    again = http.post(f"/v1/sessions/{sid}/tools", json={"argv": ["python3", "-c", "print(1)"]})
    assert again.status_code == 200 and again.json()["stdout"].strip() == "1"
    assert http.delete(f"/v1/sessions/{sid}").status_code == 200


def test_a_restarted_scheduler_is_detected_and_sessions_go_on(http: httpx.Client) -> None:
    sid = "survivor"
    http.post("/v1/sessions", json={"session_id": sid})
    assert (
        http.post(
            "/v1/chat/completions",
            headers={"x-session-id": sid},
            json={"messages": [{"role": "user", "content": words(100)}], "max_tokens": 2},
        ).status_code
        == 200
    )
    before = http.get("/readyz").json()["incarnation"]
    ray.kill(ray.get_actor(SCHEDULER_ACTOR_NAME, namespace=NAMESPACE), no_restart=False)
    deadline = time.monotonic() + 60
    status: dict = {}
    while time.monotonic() < deadline:
        response = http.get("/readyz")
        if response.status_code == 200:
            status = response.json()
            if status["incarnation"] != before:
                break
        time.sleep(0.3)
    assert status.get("incarnation") not in (None, before), "the restart was detected"
    assert status["alive_engines"], "the new scheduler found the GPU workers"
    # The session table survived (the GCS store): the session goes on, nothing reset.
    assert status["num_sessions_reset"] == 0 and status["num_sessions_restored"] >= 1
    turn = http.post(
        "/v1/chat/completions",
        headers={"x-session-id": sid},
        json={
            "messages": [{"role": "user", "content": words(110)}],
            "max_tokens": 2,
            "mars": {"turn_index": 1, "last_turn": True},
        },
    )
    assert turn.status_code == 200, turn.text
    assert turn.json()["mars"]["turn_index"] == 1


def test_removing_a_node_loses_no_session(
    deployment: RunningDeployment, http: httpx.Client
) -> None:
    sids = [f"node-{i}" for i in range(4)]
    for sid in sids:
        http.post("/v1/sessions", json={"session_id": sid})
        assert (
            http.post(
                "/v1/chat/completions",
                headers={"x-session-id": sid},
                json={"messages": [{"role": "user", "content": words(300)}], "max_tokens": 2},
            ).status_code
            == 200
        )
    cluster = deployment.ray.cluster
    victim = list(cluster.worker_nodes)[-1]
    cluster.remove_node(victim)
    for sid in sids:  # every session finishes, whichever node it was on
        tool = http.post(f"/v1/sessions/{sid}/tools", json={"replay": {"cpu_s": 0.1}})
        assert tool.status_code == 200, tool.text
        turn = http.post(
            "/v1/chat/completions",
            headers={"x-session-id": sid},
            json={
                "messages": [{"role": "user", "content": words(310)}],
                "max_tokens": 2,
                "mars": {"turn_index": 1, "last_turn": True},
            },
        )
        assert turn.status_code == 200, turn.text
    alive = http.get("/readyz").json()["alive_engines"]
    assert 0 < len(alive) < 4
