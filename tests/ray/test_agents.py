"""Agents as they are: stock ``openai`` clients that never open or close sessions.

A real deployment (2 logical GPUs, a small MARS admission window so that walking away
would wedge it) with a short idle timeout; clients send ids the ways agents do, or none
at all and resend their growing conversation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mars_ray.actors.config import deployment_config
from mars_ray.cluster.serving import RunningDeployment, running_deployment

TIME_SCALE = 20.0
IDLE_TIMEOUT_S = 40.0  # deployment seconds: 2 s of wall time
WINDOW = 4  # sessions admitted at once (2 per GPU)


@pytest.fixture(scope="module")
def deployment(port: int) -> Iterator[RunningDeployment]:
    admission = {"window_init_per_gpu": 2, "window_min_per_gpu": 2, "window_max_per_gpu": 2}
    config = deployment_config(
        {
            "cluster": {"num_gpus": 2, "num_nodes": 1},
            # a strict window, so that walked-away sessions would wedge it without the
            # idle timeout (work conservation would start newcomers on idle GPUs anyway)
            "policy": "mars-no-work-conservation",
            "time_scale": TIME_SCALE,
            "policy_config": {"admission": admission},
            "session_idle_timeout_s": IDLE_TIMEOUT_S,
            "inferred_session_idle_timeout_s": IDLE_TIMEOUT_S,
            "session_idle_timeout_max_s": 4 * IDLE_TIMEOUT_S,
            "session_id_headers": ["x-my-agent-run"],
        }
    )
    with running_deployment(config, num_nodes=1, port=port) as running:
        yield running


@pytest.fixture(scope="module")
def client(deployment: RunningDeployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(deployment: RunningDeployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment.url, timeout=60) as h:
        yield h


def ask(
    client: openai.OpenAI, messages: list[dict[str, str]], **extra: Any
) -> tuple[str, str, int]:
    """One chat turn; returns (answer, session id header, turn index header)."""
    raw = client.chat.completions.with_raw_response.create(
        model="mars-sim",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=6,
        timeout=60,
        **extra,
    )
    answer = raw.parse().choices[0].message.content or ""
    return answer, raw.headers["x-session-id"], int(raw.headers["x-mars-turn-index"])


def counter(http: httpx.Client, name: str) -> float:
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    family = families.get(name)
    return sum(s.value for s in family.samples if s.name.endswith("_total")) if family else 0.0


def wait_for(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_agents_that_walk_away_do_not_wedge_admission(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    """Twice the window of agents send x-session-id, run one turn and never come back
    (no DELETE): the first WINDOW hold every admission slot until they expire, then the
    rest are admitted; a newcomer is answered at once after that."""
    expired_before = counter(http, "mars_sessions_expired")
    num_agents = 2 * WINDOW
    answers: dict[int, tuple[str, int]] = {}

    def agent(i: int) -> None:
        _, sid, turn = ask(
            client,
            [{"role": "user", "content": f"agent {i}: run the tests"}],
            extra_headers={"x-session-id": f"walkaway-{i}"},
        )
        answers[i] = (sid, turn)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(num_agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert answers == {i: (f"walkaway-{i}", 0) for i in range(num_agents)}
    assert wait_for(
        lambda: counter(http, "mars_sessions_expired") - expired_before >= num_agents, 20
    ), "every walked-away session expires"
    status = http.get("/readyz").json()
    assert status["phases"]["active"] == 0 and status["phases"]["queued"] == 0
    assert http.get("/v1/sessions/walkaway-0").status_code == 404
    started = time.monotonic()
    _, sid, turn = ask(
        client, [{"role": "user", "content": "newcomer"}], extra_headers={"x-session-id": "new"}
    )
    assert (sid, turn) == ("new", 0)
    assert time.monotonic() - started < 5.0, "a newcomer is not queued behind idle sessions"
    # a turn for an expired session starts it over (not an error)
    _, sid, turn = ask(
        client, [{"role": "user", "content": "back"}], extra_headers={"x-session-id": "walkaway-1"}
    )
    assert (sid, turn) == ("walkaway-1", 0)
    # ... through admission like any new session (not continuing its ended record)
    assert http.get("/v1/sessions/walkaway-1").json()["phase"] == "active"
    assert http.get("/readyz").json()["phases"]["done"] == 0, "ended sessions are dropped"


def test_header_less_agents_are_one_session_each(client: openai.OpenAI, http: httpx.Client) -> None:
    """Agents that send no id and resend their growing conversation (two with the same
    system prompt and task) are recognised: one session per agent, its turns in order,
    its tool gaps recorded."""
    num_agents, num_turns = 2 * WINDOW, 3
    seen: dict[int, list[tuple[str, int]]] = {}
    infos: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def agent(i: int) -> None:
        try:
            task = "fix the failing test" if i < 2 else f"task {i}: add a feature"
            messages = [
                {"role": "system", "content": "You are a coding agent. Reply with one command."},
                {"role": "user", "content": task},
            ]
            seen[i] = []
            for step in range(num_turns):
                answer, sid, turn = ask(client, messages)
                seen[i].append((sid, turn))
                if step < num_turns - 1:
                    time.sleep(0.25)  # the agent's tool (5 s of deployment time)
                messages += [
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": f"output of step {step}: ok"},
                ]
            infos[i] = http.get(f"/v1/sessions/{seen[i][0][0]}").json()  # before it expires
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(num_agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not errors, errors
    session_ids = set()
    for turns in seen.values():
        assert len({sid for sid, _ in turns}) == 1, f"one session per agent: {turns}"
        assert [turn for _, turn in turns] == list(range(num_turns))
        session_ids.add(turns[0][0])
    assert len(session_ids) == num_agents, "distinct agents are distinct sessions"
    for info in infos.values():
        assert info["num_turns"] == num_turns and info["inferred"] is True, info
        assert info["tool_s"] >= 2 * 0.25 * TIME_SCALE * 0.9, "its tool gaps were recorded"


def test_completions_prompts_that_extend_their_answer_continue_the_session(
    client: openai.OpenAI,
) -> None:
    prompt = "Complete the shell session.\n$ ls\n"
    sids, turns = [], []
    for step in range(3):
        raw = client.completions.with_raw_response.create(
            model="mars-sim", prompt=prompt, max_tokens=4
        )
        sids.append(raw.headers["x-session-id"])
        turns.append(int(raw.headers["x-mars-turn-index"]))
        prompt += raw.parse().choices[0].text + f"\n$ step {step}\n"
    assert len(set(sids)) == 1 and turns == [0, 1, 2]


def test_streams_name_their_session_and_turn(deployment: RunningDeployment) -> None:
    body = {
        "messages": [{"role": "user", "content": "stream me"}],
        "max_tokens": 4,
        "stream": True,
    }
    with (
        httpx.Client(base_url=deployment.url, timeout=60) as h,
        h.stream("POST", "/v1/chat/completions", json=body, headers={"x-session-id": "st"}) as r,
    ):
        assert r.status_code == 200
        assert r.headers["x-session-id"] == "st" and r.headers["x-mars-turn-index"] == "0"
        assert "data: [DONE]" in r.read().decode()


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ({"x-claude-code-session-id": "cc-1"}, {}, "cc-1"),
        ({"session-id": "codex-1"}, {}, "codex-1"),
        ({}, {"prompt_cache_key": "pck-1"}, "pck-1"),
        ({}, {"nvext": {"agent_context": {"session_id": "dyn-1"}}}, "dyn-1"),
        ({"x-my-agent-run": "mine-1"}, {}, "mine-1"),
    ],
)
def test_agent_conventions_name_the_session(
    http: httpx.Client, headers: dict[str, str], body: dict[str, Any], expected: str
) -> None:
    payload = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **body}
    response = http.post("/v1/chat/completions", json=payload, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["x-session-id"] == expected
    assert http.get(f"/v1/sessions/{expected}").json()["num_turns"] == 1


def test_bad_session_identity_is_a_clear_400(http: httpx.Client) -> None:
    payload = {"messages": [{"role": "user", "content": "x"}], "session_id": "body-id"}
    response = http.post("/v1/chat/completions", json=payload, headers={"x-session-id": "hdr"})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "'hdr'" in message and "'body-id'" in message


def test_the_final_flag_closes_the_session(http: httpx.Client) -> None:
    payload = {"messages": [{"role": "user", "content": "bye"}], "max_tokens": 2}
    headers = {"x-dynamo-session-id": "fin-1", "x-dynamo-session-final": "true"}
    assert http.post("/v1/chat/completions", json=payload, headers=headers).status_code == 200
    assert http.get("/v1/sessions/fin-1").status_code == 404


# -- the Responses API ------------------------------------------------------------------
def test_responses_chain_into_one_session_streamed_or_not(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    first = client.responses.create(
        model="mars-sim",
        instructions="You are a coding agent.",
        input="list the files",
        max_output_tokens=6,
    )
    assert first.status == "completed" and first.incomplete_details is None
    assert len(first.output_text.split()) == 6
    assert first.usage is not None and first.usage.output_tokens == 6
    sid = (first.model_extra or {})["mars"]["session_id"]
    # streamed, chained: the same session, its next turn, the earlier context counted
    stream = client.responses.create(
        model="mars-sim",
        previous_response_id=first.id,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "now run the tests"}]}],
        max_output_tokens=5,
        stream=True,
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") >= 1
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    second = events[-1].response  # type: ignore[union-attr]
    assert second.output_text == deltas and len(deltas.split()) == 5
    assert (second.model_extra or {})["mars"]["session_id"] == sid
    assert (second.model_extra or {})["mars"]["turn_index"] == 1
    assert second.usage is not None
    assert second.usage.input_tokens == first.usage.input_tokens + 6 + 4  # + its new words
    assert client.responses.retrieve(second.id).output_text == deltas
    assert http.get(f"/v1/sessions/{sid}").json()["num_turns"] == 2


def test_responses_bad_chains_are_404_and_400(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.NotFoundError, match="unknown or expired"):
        client.responses.create(model="mars-sim", previous_response_id="resp_nope", input="x")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")
    first = client.responses.create(model="mars-sim", input="hello", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError, match="conflicting session ids"):
        client.responses.create(
            model="mars-sim",
            previous_response_id=first.id,
            input="x",
            extra_headers={"x-session-id": "someone-else"},
        )
    bad = http.post("/v1/responses", json={"input": [{"type": "image_generation_call"}]})
    assert bad.status_code == 400 and "input[0].type" in bad.json()["error"]["message"]
    # once its session has expired, the chain is broken: 404, and GET still answers
    sid = (first.model_extra or {})["mars"]["session_id"]
    assert wait_for(lambda: http.get(f"/v1/sessions/{sid}").status_code == 404, 20)
    with pytest.raises(openai.NotFoundError, match="has ended"):
        client.responses.create(model="mars-sim", previous_response_id=first.id, input="x")
    assert client.responses.retrieve(first.id).id == first.id
