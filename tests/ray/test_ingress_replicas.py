"""Two ingress replicas (Serve ``num_replicas: 2``): a session's turns reach either one
and stay consistent (order, grants, tool history), because a session's state lives in
the global scheduler, not in a replica. Both replicas start together and share one
runtime (one set of GPU workers and one process group)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from mars_ray.actors.config import deployment_config
from mars_ray.cluster.serving import RunningDeployment, running_deployment

NUM_SESSIONS, NUM_TURNS = 8, 6


@pytest.fixture(scope="module")
def deployment(port: int) -> Iterator[RunningDeployment]:
    config = deployment_config(
        {"cluster": {"num_gpus": 2}, "time_scale": 20.0, "ingress_replicas": 2}
    )
    with running_deployment(config, port=port) as running:
        yield running


async def _session(http: httpx.AsyncClient, i: int) -> list[tuple[str, int, str]]:
    """One named session's turns, each with a reported tool between them."""
    sid, seen = f"two-{i}", []
    messages = [{"role": "user", "content": f"agent {i} " + "w " * 50}]
    for turn in range(NUM_TURNS):
        body = {"messages": messages, "max_tokens": 4}
        r = await http.post("/v1/chat/completions", json=body, headers={"x-session-id": sid})
        r.raise_for_status()
        seen.append(
            (
                r.headers["x-session-id"],
                int(r.headers["x-mars-turn-index"]),
                r.headers["x-mars-ingress-replica"],
            )
        )
        answer = r.json()["choices"][0]["message"]["content"]
        if turn < NUM_TURNS - 1:
            tool = await http.post(f"/v1/sessions/{sid}/tool_events", json={"tool_s": 1.0})
            tool.raise_for_status()
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "ok"}]
    return seen


def test_a_sessions_turns_reach_either_replica_and_stay_consistent(
    deployment: RunningDeployment,
) -> None:
    async def run() -> list[list[tuple[str, int, str]]]:
        async with httpx.AsyncClient(base_url=deployment.url, timeout=120) as http:
            return await asyncio.gather(*(_session(http, i) for i in range(NUM_SESSIONS)))

    sessions = asyncio.run(run())
    replicas = {replica for turns in sessions for _, _, replica in turns}
    assert len(replicas) == 2, f"both replicas answered: {replicas}"
    mixed = [turns for turns in sessions if len({r for _, _, r in turns}) == 2]
    assert mixed, "at least one session's turns reached both replicas"
    with httpx.Client(base_url=deployment.url, timeout=30) as http:
        for i, turns in enumerate(sessions):
            assert [sid for sid, _, _ in turns] == [f"two-{i}"] * NUM_TURNS
            assert [t for _, t, _ in turns] == list(range(NUM_TURNS)), "in order, once each"
            info = http.get(f"/v1/sessions/two-{i}").json()
            assert info["num_turns"] == NUM_TURNS
            assert info["tool_s"] == pytest.approx(NUM_TURNS - 1), "every tool counted once"
        assert http.get("/readyz").json()["alive_engines"] == [0, 1], "one runtime"
