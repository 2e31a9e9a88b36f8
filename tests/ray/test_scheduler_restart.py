"""The global scheduler killed mid-run (``ray.kill(no_restart=False)``) while sessions
are mid-turn, in a tool and waiting for admission: Ray restarts it, it reads its
state back from the GCS store, and nothing is lost or answered twice — attained
service, tool history, turn indices and the admission window and queue survive,
and no session is counted as reset."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray

from mars_ray.actors.config import deployment_config
from mars_ray.actors.engine_runner import sim_token_id
from mars_ray.actors.names import NAMESPACE, SCHEDULER_ACTOR_NAME
from mars_ray.cluster.serving import RunningDeployment, running_deployment

TIME_SCALE = 5.0


@pytest.fixture(scope="module")
def deployment(port: int) -> Iterator[RunningDeployment]:
    config = deployment_config(
        {
            "cluster": {"num_gpus": 2},
            "time_scale": TIME_SCALE,
            "tools": {"allow_replay": True},  # the test replays tool calls
            "policy_config": {  # a window of 2 sessions: a third one queues
                "admission": {
                    "window_init_per_gpu": 1,
                    "window_min_per_gpu": 1,
                    "window_max_per_gpu": 1,
                }
            },
        }
    )
    with running_deployment(config, port=port) as running:
        yield running


@pytest.fixture
def http(deployment: RunningDeployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment.url, timeout=120) as client:
        yield client


def words(n: int) -> str:
    return " ".join(["w"] * n)


def turn(http: httpx.Client, sid: str, index: int, prompt: int, out: int, last: bool = False):  # type: ignore[no-untyped-def]
    return http.post(
        "/v1/chat/completions",
        headers={"x-session-id": sid},
        json={
            "messages": [{"role": "user", "content": words(prompt)}],
            "max_tokens": out,
            "mars": {"turn_index": index, "last_turn": last},
        },
    )


def stream_turn(
    http: httpx.Client, sid: str, index: int, prompt: int, out: int, first: threading.Event
) -> tuple[list[str], dict[str, Any]]:
    body = {
        "messages": [{"role": "user", "content": words(prompt)}],
        "max_tokens": out,
        "stream": True,
        "mars": {"turn_index": index},
    }
    text: list[str] = []
    info: dict[str, Any] = {}
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
                    first.set()
    return text, info


def in_thread(fn, *args):  # type: ignore[no-untyped-def]
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # surfaced by the caller
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def info(http: httpx.Client, sid: str) -> dict[str, Any]:
    response = http.get(f"/v1/sessions/{sid}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_a_killed_scheduler_restarts_with_every_session_intact(http: httpx.Client) -> None:
    # a: mid-turn at the kill; b: in a tool; c: waiting for admission (window of 2)
    for sid in ("a", "b"):
        assert http.post("/v1/sessions", json={"session_id": sid}).status_code == 200
        assert turn(http, sid, 0, 300, 20).status_code == 200
    tool = http.post("/v1/sessions/a/tools", json={"replay": {"cpu_s": 0.0, "wait_s": 4.0}})
    assert tool.status_code == 200, tool.text
    assert http.post("/v1/sessions/b/tool_events", json={"tool_s": 300.0}).status_code == 200
    assert turn(http, "b", 1, 400, 20).status_code == 200
    before = {sid: info(http, sid) for sid in ("a", "b")}
    assert before["b"]["tool_s"] >= 300.0  # a's tool counts when its next turn begins
    assert before["b"]["idle_timeout_s"] > info(http, "a")["idle_timeout_s"]  # longest tool
    ready = http.get("/readyz").json()
    windows, incarnation = ready["windows"], ready["incarnation"]
    assert ready["phases"]["active"] == 2 and windows == [2], ready

    queued_thread, queued = in_thread(turn, http, "c", 0, 200, 5, True)
    deadline = time.monotonic() + 10
    while http.get("/readyz").json()["phases"]["queued"] < 1 and queued_thread.is_alive():
        assert time.monotonic() < deadline, "c neither queued nor answered"
        time.sleep(0.1)
    first = threading.Event()
    # 1500 decode steps of ~6.5 ms: ~10 s simulated, ~2 s of wall time at 5x
    streaming_thread, streamed = in_thread(stream_turn, http, "a", 1, 1000, 1500, first)
    assert first.wait(30)
    tool_thread, tool_call = in_thread(
        lambda: http.post("/v1/sessions/b/tools", json={"replay": {"cpu_s": 0.0, "wait_s": 10.0}})
    )
    time.sleep(0.3)

    ray.kill(ray.get_actor(SCHEDULER_ACTOR_NAME, namespace=NAMESPACE), no_restart=False)

    streaming_thread.join(90)
    assert "error" not in streamed, repr(streamed.get("error"))
    tokens, stream_info = streamed["result"]
    assert tokens == [f"t{sim_token_id('a', 1, i)}" for i in range(1500)], (
        "the turn in flight at the kill: every token once, in order"
    )
    assert stream_info["turn_index"] == 1
    tool_thread.join(90)
    assert "error" not in tool_call, repr(tool_call.get("error"))
    assert tool_call["result"].status_code == 200, tool_call["result"].text

    ready = http.get("/readyz").json()
    assert ready["incarnation"] != incarnation, "the scheduler did restart"
    # c, if it still waited at the kill, is restored waiting (work conservation may
    # have started it on an idle GPU before, and it may have finished)
    c_waits = ready["phases"]["queued"] == 1
    assert ready["num_sessions_restored"] in (2, 3), json.dumps(ready)
    assert ready["num_sessions_reset"] == 0
    assert ready["windows"] == windows, "the admission window survived"
    assert ready["phases"]["active"] == 2, ready["phases"]

    a, b = info(http, "a"), info(http, "b")
    deadline = time.monotonic() + 10  # a's end report may still be on its way
    while a["num_turns"] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        a = info(http, "a")
    assert a["num_turns"] == 2 and a["turn_in_flight"] is None
    assert a["service_tokens"] > before["a"]["service_tokens"], "service kept and grown"
    assert a["tool_s"] > 0, "a's tool before turn 1 kept"
    assert b["num_turns"] == 2 and b["service_tokens"] == before["b"]["service_tokens"]
    assert b["tool_s"] == before["b"]["tool_s"], "tool history kept"
    assert b["idle_timeout_s"] == before["b"]["idle_timeout_s"], "longest tool kept"
    assert not c_waits or queued_thread.is_alive(), "c still waits its turn"

    # the sessions go on with the next turn indices; c is admitted when b ends
    assert turn(http, "b", 2, 500, 3, last=True).status_code == 200
    queued_thread.join(60)
    assert "error" not in queued, repr(queued.get("error"))
    response = queued["result"]
    assert response.status_code == 200, response.text
    assert response.json()["mars"]["turn_index"] == 0
    twice = turn(http, "a", 1, 1100, 3)
    assert twice.status_code == 409, "turn 1 of a was answered once and cannot run again"
    assert turn(http, "a", 2, 1600, 3, last=True).status_code == 200
    metrics = http.get("/metrics").text
    assert "mars_sessions_reset_total 0.0" in metrics
    done = http.get("/readyz").json()
    assert done["sessions_open"] == 0 and done["phases"]["queued"] == 0
