"""MARS in an existing Ray Serve LLM deployment: one ``LLMConfig`` (Ray 2.60, vLLM 0.29).

    from ray import serve
    from ray.serve.llm import build_openai_app
    from mars_ray.vllm.serve_llm import mars_llm_config

    llm_config = mars_llm_config(
        "qwen-7b", "Qwen/Qwen2.5-7B-Instruct",
        accelerator_type="H100",
        deployment_config={"autoscaling_config": {"min_replicas": 2, "max_replicas": 8}},
    )
    serve.run(build_openai_app({"llm_configs": [llm_config]}))

:func:`mars_llm_config` is ``LLMConfig(...)`` plus three settings, merged into what
the caller passes (anything ``LLMConfig`` takes goes through ``overrides``):

* ``engine_kwargs["scheduler_cls"]``: ``MarsScheduler`` by import path, with
  ``additional_config["mars"]`` (policy, cost-model profile, features) validated here;
* ``engine_kwargs["logits_processors"]`` gains ``MarsHintsValidator``, so malformed
  session hints are answered with HTTP 400 (left out with speculative decoding,
  where vLLM refuses custom logits processors);
* ``deployment_config["request_router_config"]``: :class:`MarsSessionRouter`, which
  keeps a session's turns on one replica (unless the caller chose a router).

Clients mark turns as :mod:`mars_ray.vllm.hints` says (``vllm_xargs`` with
``mars_session_id``, ...); the router also takes the ``x-session-id`` header.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve.llm import LLMConfig

from mars_ray.errors import ConfigError
from mars_ray.policies.registry import PolicyConfig, get_policy
from mars_ray.vllm.scheduler import SETTINGS_KEY, MarsScheduler, MarsSchedulerSettings
from mars_ray.vllm.session_router import DEFAULT_NUM_VIRTUAL_NODES, ROUTER_CLASS
from mars_ray.vllm.validation import VALIDATOR_FQCN, is_registered

#: what ``engine_kwargs["scheduler_cls"]`` (``--scheduler-cls``) takes
SCHEDULER_CLS = "mars_ray.vllm.scheduler.MarsScheduler"
_SCHEDULER_NAMES = frozenset({SCHEDULER_CLS, "mars_ray.vllm.scheduler:MarsScheduler"})


def mars_llm_config(
    model_id: str,
    model_source: str,
    *,
    policy: str = "mars",
    gpu: str | None = None,
    model: str | None = None,
    policy_config: PolicyConfig | Mapping[str, Any] | None = None,
    session_router: bool = True,
    num_virtual_nodes: int = DEFAULT_NUM_VIRTUAL_NODES,
    **overrides: Any,
) -> LLMConfig:
    """An ``LLMConfig`` serving ``model_source`` as ``model_id`` with MARS turned on.

    ``policy`` is any name of ``mars_ray.policies.registry``; ``gpu`` / ``model`` name
    the cost-model profile that prices re-prefill in the retention decision (default
    ``MarsSchedulerSettings``'s). ``policy_config``: MARS tunables (a ``PolicyConfig``
    or the mapping a policy-config file holds), validated here, passed whole to every
    engine. ``session_router=False`` keeps Ray Serve's router.
    ``overrides`` are ``LLMConfig`` fields; their ``engine_kwargs``,
    ``deployment_config`` and ``model_loading_config`` are merged with these settings.
    Raises ``ConfigError`` (or ``UnknownNameError``) naming what is wrong, before Ray
    Serve sees the config; ``LLMConfig``'s own validation runs on construction.
    """
    get_policy(policy)
    engine_kwargs = _engine_kwargs(
        dict(overrides.pop("engine_kwargs", None) or {}), policy=policy, gpu=gpu, model=model
    )
    if policy_config is not None:
        settings = engine_kwargs["additional_config"][SETTINGS_KEY]
        tunables = (
            policy_config.model_dump(mode="json")
            if isinstance(policy_config, PolicyConfig)
            else dict(policy_config)
        )
        MarsSchedulerSettings.from_mapping({**settings, "policy_config": tunables})  # check
        settings["policy_config"] = tunables
    deployment_config = dict(overrides.pop("deployment_config", None) or {})
    if session_router and "request_router_config" not in deployment_config:
        deployment_config["request_router_config"] = {
            "request_router_class": ROUTER_CLASS,
            "request_router_kwargs": {"num_virtual_nodes": num_virtual_nodes},
        }
    loading = dict(overrides.pop("model_loading_config", None) or {})
    loading.update(model_id=model_id, model_source=model_source)
    return LLMConfig(
        model_loading_config=loading,
        engine_kwargs=engine_kwargs,
        deployment_config=deployment_config,
        **overrides,
    )


def _engine_kwargs(
    given: dict[str, Any], *, policy: str, gpu: str | None, model: str | None
) -> dict[str, Any]:
    scheduler = given.get("scheduler_cls")
    if scheduler not in (None, MarsScheduler, *_SCHEDULER_NAMES):
        raise ConfigError(
            f"engine_kwargs.scheduler_cls is {scheduler!r}; MARS runs as {SCHEDULER_CLS!r}"
        )
    given["scheduler_cls"] = SCHEDULER_CLS  # a path: the config crosses processes
    given["additional_config"] = _additional_config(
        given.get("additional_config"), policy=policy, gpu=gpu, model=model
    )
    processors = list(given.get("logits_processors") or [])
    if not is_registered(processors) and given.get("speculative_config") is None:
        processors.append(VALIDATOR_FQCN)
    if processors:
        given["logits_processors"] = processors
    return given


def _additional_config(
    given: Mapping[str, Any] | None, *, policy: str, gpu: str | None, model: str | None
) -> dict[str, Any]:
    """``additional_config`` with the scheduler's settings, checked as it will read them."""
    additional = dict(given or {})
    settings = dict(additional.get(SETTINGS_KEY) or {})
    settings["policy"] = policy
    settings.update({k: v for k, v in (("gpu", gpu), ("model", model)) if v is not None})
    checked = MarsSchedulerSettings.from_mapping(settings)
    from mars_ray.engine.costmodel import load_profile

    load_profile(checked.gpu, checked.model)  # unknown names fail here, listing the known
    additional[SETTINGS_KEY] = settings
    return additional
