"""Configuration of a serving deployment: what ``mars-ray serve`` and the Ray Serve
application builder (``mars_ray.actors.app:build_app``, the ``serveConfigV2``
import path) accept.

``DeploymentConfig`` is frozen and validated like every other config; the MARS
policy tunables come from a YAML or JSON file (a KubeRay ``ConfigMap`` mounted into
the pod) read by :func:`load_policy_config`, which refuses unknown keys and
out-of-range values with a message naming the key rather than starting on defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mars_ray.config import ClusterConfig, EngineConfig, FrozenConfig, validated
from mars_ray.errors import ConfigError
from mars_ray.policies.registry import POLICIES, PolicyConfig
from mars_ray.session import IdleTimeout

API_KEY_ENV = "MARS_API_KEY"
POLICY_CONFIG_ENV = "MARS_POLICY_CONFIG"


class ToolConfig(FrozenConfig):
    """The CPU tool-executor pool: one executor actor per node."""

    slots_per_node: int = Field(0, ge=0, description="concurrent tool calls; 0: the node's CPUs")
    sandbox_root: str = Field("/tmp/mars-ray/sandboxes", min_length=1)
    timeout_s: float = Field(300.0, gt=0)
    memory_bytes: int = Field(2 << 30, gt=0)
    max_output_bytes: int = Field(256 << 10, gt=0)
    max_attempts: int = Field(3, ge=1, description="a call is retried when its worker dies")
    allow_replay: bool = Field(
        False,
        description="serve tool replay (POST /v1/sessions/{id}/tools with 'replay': real "
        "CPU burn and waiting for a traced call), a benchmarking feature any client could "
        "use to occupy the tool pool: off unless enabled (mars-ray serve "
        "--allow-tool-replay; mars-ray bench --runtime ray enables it)",
    )
    max_replay_s: float = Field(
        900.0,
        gt=0,
        description="cpu_s + wait_s of one replayed call, in simulated seconds (the "
        "longest test run the swe workload generates)",
    )
    max_argv_items: int = Field(1024, ge=1, description="arguments of one command")
    max_argv_bytes: int = Field(
        1 << 20, ge=1, description="UTF-8 bytes of one command's arguments together"
    )
    max_stdin_bytes: int = Field(8 << 20, ge=0, description="UTF-8 bytes of one command's stdin")


class DeploymentConfig(FrozenConfig):
    """One mars-ray deployment: engines, policy, tools and the HTTP ingress."""

    engine: Literal["sim", "vllm"] = "sim"
    policy: str = "mars"
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    engine_config: EngineConfig = Field(default_factory=EngineConfig)
    policy_config: PolicyConfig = Field(default_factory=PolicyConfig)
    tools: ToolConfig = Field(default_factory=ToolConfig)
    time_scale: float = Field(
        1.0, gt=0, description="simulated seconds per wall second (simulated devices only)"
    )
    vllm_model: str | None = Field(
        None,
        min_length=1,
        description="engine=vllm: the model (directory or hub id) each GPU worker loads "
        "on its GPU; None: a simulated device - vLLM's engine, scheduler and KV cache run "
        "for real, steps are priced by the cost model of cluster.gpu x cluster.model",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="placement group strategy for the GPU workers' bundles"
    )
    model_name: str = Field("mars-sim", min_length=1, description="served model id")
    max_prompt_tokens: int = Field(
        0, ge=0, description="reject longer prompts with 400; 0: what one GPU's KV holds"
    )
    kv_migration: bool = Field(
        True,
        description="a continuation placed away from its KV brings the KV along over "
        "torch.distributed (sim engines, 2+ GPUs); False: it recomputes the prefix",
    )
    api_key: str | None = Field(None, description="required bearer token; None: open")
    ingress_replicas: int = Field(
        1,
        ge=1,
        le=64,
        description="Serve replicas of the HTTP ingress; a session's turns may reach any "
        "of them (its state lives in the global scheduler)",
    )
    max_body_bytes: int = Field(
        64 << 20, ge=1, description="larger request bodies are refused (413), chunked or not"
    )
    session_idle_timeout_s: float = Field(
        600.0,
        gt=0,
        description="a session with no turn for this long (the deployment's clock) has "
        "walked away: its admission slot, held KV and state are released. Longer for a "
        "session whose own tool calls were long (3x its longest), up to "
        "session_idle_timeout_max_s. Default: 10 min, the longest a stock coding agent "
        "lets one tool command run (Claude Code's bash tool cap; SWE-agent and "
        "mini-swe-agent default to less)",
    )
    session_idle_timeout_max_s: float = Field(
        2400.0, gt=0, description="no session is held idle longer than this"
    )
    inferred_session_idle_timeout_s: float = Field(
        120.0,
        gt=0,
        description="the idle timeout of a session recognised from its conversation (no "
        "id sent) until its second turn: it may be a one-off request, and holds an "
        "admission slot while idle. 2 min covers the p99 tool call of the real "
        "mini-swe-agent trace (34 s) with room",
    )
    session_id_headers: tuple[str, ...] = Field(
        (),
        description="more request headers that carry a session id, checked after the "
        "built-in ones (docs/agents.md)",
    )
    infer_sessions: bool = Field(
        True,
        description="a request with no session id that extends an earlier turn's "
        "conversation (its messages plus that turn's answer) continues that session",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DeploymentConfig:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if self.vllm_model is not None and self.engine != "vllm":
            raise ValueError("vllm_model is given but engine is not 'vllm'")
        if self.vllm_model is not None and self.time_scale != 1.0:
            raise ValueError("a real model runs in real time: time_scale must be 1")
        for name in ("session_idle_timeout_s", "inferred_session_idle_timeout_s"):
            if self.session_idle_timeout_max_s < getattr(self, name):
                raise ValueError(
                    f"session_idle_timeout_max_s ({self.session_idle_timeout_max_s}) is "
                    f"below {name} ({getattr(self, name)})"
                )
        return self

    @property
    def idle_timeout(self) -> IdleTimeout:
        return IdleTimeout(
            self.session_idle_timeout_s,
            self.session_idle_timeout_max_s,
            self.inferred_session_idle_timeout_s,
        )

    @property
    def migrates_kv(self) -> bool:
        """KV moves with a session between GPU workers (a process group is formed).
        vLLM 0.29 exposes no KV export without a KV connector, so sim engines only."""
        return self.kv_migration and self.engine == "sim" and self.cluster.num_gpus > 1

    @property
    def simulated_device(self) -> bool:
        """Steps are priced by the cost model (every sim engine; vLLM without a model)."""
        return self.vllm_model is None


def load_policy_config(path: str | os.PathLike[str]) -> PolicyConfig:
    """Read MARS tunables from a YAML or JSON file; unknown keys or bad values raise
    :class:`ConfigError` naming the key (``PolicyConfig.admission.tick_s: ...``)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read MARS policy config {p}: {exc.strerror}") from None
    data = _parse(text, p)
    if not isinstance(data, dict):
        raise ConfigError(f"MARS policy config {p} must be a mapping, got {type(data).__name__}")
    return validated(PolicyConfig, **data)


def _parse(text: str, path: Path) -> Any:
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    import yaml  # a Ray dependency

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None


def deployment_config(args: dict[str, Any]) -> DeploymentConfig:
    """Build the config from application args (``serveConfigV2`` ``args``, CLI flags).

    ``policy_config_path`` (or ``$MARS_POLICY_CONFIG``) names the tunables file;
    ``api_key`` falls back to ``$MARS_API_KEY``.
    """
    values = dict(args)
    path = values.pop("policy_config_path", None) or os.environ.get(POLICY_CONFIG_ENV)
    if path:
        values["policy_config"] = load_policy_config(path)
    if values.get("api_key") is None and os.environ.get(API_KEY_ENV):
        values["api_key"] = os.environ[API_KEY_ENV]
    return validated(DeploymentConfig, **values)
