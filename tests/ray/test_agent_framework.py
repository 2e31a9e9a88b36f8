"""A real agent framework, installed from PyPI and unmodified, against the deployment:
mini-swe-agent's default agent loop, talking to the server through litellm's OpenAI
provider with no session id and no MARS hints, exactly as it talks to a hosted model.

The simulated model's text is never a valid action, so every step is a format error the
agent reports back to the model and goes on: still a real multi-turn client. The agent
drops each unusable answer from its history (its next prompt is the last one plus the
complaint), which the server must still recognise as the same session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mars_ray.actors.config import deployment_config
from mars_ray.cluster.serving import RunningDeployment, running_deployment

NUM_STEPS = 5


@pytest.fixture(scope="module")
def deployment(port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDeployment]:
    # Before the framework's first import: its config dir, no banner, no network look-ups.
    os.environ["MSWEA_GLOBAL_CONFIG_DIR"] = str(tmp_path_factory.mktemp("mswea"))
    os.environ["MSWEA_SILENT_STARTUP"] = "1"
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    config = deployment_config({"cluster": {"num_gpus": 2}, "time_scale": 20.0})
    with running_deployment(config, port=port) as running:
        yield running


def _run_agent(url: str, workdir: Path) -> list[dict[str, Any]]:
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.environments.local import LocalEnvironment
    from minisweagent.models.litellm_textbased_model import LitellmTextbasedModel

    model = LitellmTextbasedModel(
        model_name="openai/mars-sim",
        model_kwargs={"api_base": f"{url}/v1", "api_key": "unused", "max_tokens": 16},
        cost_tracking="ignore_errors",
    )
    agent = DefaultAgent(
        model,
        LocalEnvironment(cwd=str(workdir)),
        system_template="You are a helpful assistant that can interact with a computer.",
        instance_template="Please solve this issue: {{task}}",
        step_limit=NUM_STEPS,
        max_consecutive_format_errors=0,  # keep going: the simulated model never complies
    )
    result = agent.run("List the files in the repository and fix the failing test.")
    assert result.get("exit_status") == "LimitsExceeded", result
    return agent.messages


def test_mini_swe_agent_runs_as_one_session(deployment: RunningDeployment, tmp_path: Path) -> None:
    messages = _run_agent(deployment.url, tmp_path)
    responses = [m["extra"]["response"] for m in messages if "response" in m.get("extra", {})]
    assert len(responses) == NUM_STEPS, "one model call per step"
    session_ids = {r["mars"]["session_id"] for r in responses}
    assert len(session_ids) == 1, f"the agent's calls are one session: {session_ids}"
    assert [r["mars"]["turn_index"] for r in responses] == list(range(NUM_STEPS))
    (sid,) = session_ids
    info = httpx.get(f"{deployment.url}/v1/sessions/{sid}", timeout=30).json()
    assert info["num_turns"] == NUM_STEPS and info["inferred"] is True
    assert info["tool_s"] > 0, "the gaps between its calls are its tool time"
