"""The Ray Serve LLM recipe: ``mars_llm_config`` builds an ``LLMConfig`` that Ray Serve LLM
and vLLM accept as they would in a deployment, and ``MarsSessionRouter`` keeps a
session on one replica, overflowing to power-of-two choices when that replica is
full. Ray runs for real (a fresh local instance); the replicas are stand-in actors
that answer the queue-length probe, since an LLMServer replica needs a GPU."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
    RunningReplicaInfo,
)
from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.config import RequestRouterConfig
from ray.serve.llm import LLMConfig, build_llm_deployment, build_openai_app
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
from vllm.engine.arg_utils import AsyncEngineArgs

from mars_ray.errors import ConfigError, UnknownNameError
from mars_ray.vllm.scheduler import MarsScheduler, MarsSchedulerSettings
from mars_ray.vllm.serve_llm import SCHEDULER_CLS, mars_llm_config
from mars_ray.vllm.session_router import ROUTER_CLASS, MarsSessionRouter, SessionRing
from mars_ray.vllm.validation import VALIDATOR_FQCN, is_registered

CPU_ENGINE = {  # what a CPU test needs; a GPU deployment passes none of these
    "load_format": "dummy",
    "skip_tokenizer_init": True,
    "enforce_eager": True,
    "num_gpu_blocks_override": 64,
    "max_model_len": 512,
}


def _config(model_dir: Path, **overrides: Any) -> LLMConfig:
    overrides.setdefault("engine_kwargs", dict(CPU_ENGINE))
    return mars_llm_config("tiny", str(model_dir), **overrides)


# -- the LLMConfig --------------------------------------------------------------------


def test_the_config_passes_ray_serve_llm_and_vllm_validation(tiny_model_dir: Path) -> None:
    config = _config(tiny_model_dir, deployment_config={"num_replicas": 2})
    assert isinstance(config, LLMConfig)
    # Ray Serve LLM's engine kwargs, then vLLM's own config built from them, as a
    # replica does: the scheduler import path resolves to MarsScheduler
    kwargs = config.get_engine_config().get_initialization_kwargs()
    vllm_config = AsyncEngineArgs(**kwargs).create_engine_config()
    assert vllm_config.scheduler_config.get_scheduler_cls() is MarsScheduler
    assert is_registered(vllm_config.model_config.logits_processors)
    assert vllm_config.additional_config["mars"] == {"policy": "mars"}
    router_config = RequestRouterConfig(**config.deployment_config["request_router_config"])
    router_cls = router_config.get_request_router_class()  # Ray pickles it by value
    assert router_cls.__name__ == "MarsSessionRouter" and issubclass(router_cls, RequestRouter)
    assert config.deployment_config["num_replicas"] == 2


def test_the_recipe_passes_the_whole_policy_config(tiny_model_dir: Path) -> None:
    tunables = {"mlfq": {"aging_s": 12.0}, "retention": {"tool_time_prior_s": 3.0}}
    config = _config(tiny_model_dir, policy_config=tunables)
    kwargs = config.get_engine_config().get_initialization_kwargs()
    vllm_config = AsyncEngineArgs(**kwargs).create_engine_config()
    settings = MarsSchedulerSettings.from_mapping(vllm_config.additional_config["mars"])
    assert settings.policy_config.mlfq.aging_s == 12.0
    assert settings.policy_config.retention.tool_time_prior_s == 3.0
    with pytest.raises(ConfigError, match=r"PolicyConfig\.mlfq\.aging_s"):
        _config(tiny_model_dir, policy_config={"mlfq": {"aging_s": 0}})


def test_callers_settings_are_merged_not_replaced(tiny_model_dir: Path) -> None:
    engine = dict(CPU_ENGINE)
    engine["logits_processors"] = ["my.module:Processor"]
    engine["additional_config"] = {"mars": {"features": {"retention": False}}, "other": 1}
    custom_router = {
        "request_router_class": "ray.serve.llm.request_router.PrefixCacheAffinityRouter"
    }
    config = _config(
        tiny_model_dir,
        policy="autellix",
        gpu="h200-141gb",
        engine_kwargs=engine,
        deployment_config={"request_router_config": custom_router},
        model_loading_config={"model_id": "ignored", "tokenizer_source": str(tiny_model_dir)},
    )
    kwargs = config.engine_kwargs
    assert kwargs["scheduler_cls"] == SCHEDULER_CLS and kwargs["max_model_len"] == 512
    assert kwargs["logits_processors"] == ["my.module:Processor", VALIDATOR_FQCN]
    assert kwargs["additional_config"] == {
        "mars": {"features": {"retention": False}, "policy": "autellix", "gpu": "h200-141gb"},
        "other": 1,
    }
    assert config.deployment_config["request_router_config"] == custom_router
    assert config.model_id == "tiny"
    assert config.model_loading_config.tokenizer_source == str(tiny_model_dir)
    plain = _config(tiny_model_dir, session_router=False)
    assert "request_router_config" not in plain.deployment_config
    speculative = _config(tiny_model_dir, engine_kwargs={"speculative_config": {"method": "ngram"}})
    assert "logits_processors" not in speculative.engine_kwargs  # vLLM refuses them there


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"policy": "nosuch"}, UnknownNameError, "unknown policy 'nosuch'; known:"),
        ({"gpu": "a100-1gb"}, UnknownNameError, "unknown gpu 'a100-1gb'; known:"),
        (
            {"engine_kwargs": {"scheduler_cls": "my.Scheduler"}},
            ConfigError,
            "scheduler_cls is 'my.Scheduler'; MARS runs as",
        ),
        (
            {"engine_kwargs": {"additional_config": {"mars": {"features": {"fast": True}}}}},
            ConfigError,
            "unknown mars.features ['fast']",
        ),
    ],
)
def test_a_bad_setting_is_refused_naming_it(
    tiny_model_dir: Path, overrides: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        _config(tiny_model_dir, **overrides)
    assert message in str(info.value)


# -- Ray ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A fresh local Ray, never one that happens to be running on the machine."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_the_openai_app_builds_with_the_session_router(
    local_ray: None, tiny_model_dir: Path
) -> None:
    from ray.serve.deployment import deployment_to_schema

    config = _config(tiny_model_dir, deployment_config={"max_ongoing_requests": 32})
    app = build_openai_app({"llm_configs": [config]})
    assert app is not None
    schema = deployment_to_schema(build_llm_deployment(config)._bound_deployment)
    router = RequestRouterConfig(**dict(schema.request_router_config))  # type: ignore[arg-type]
    assert router.request_router_class == ROUTER_CLASS
    assert schema.max_ongoing_requests == 32


@ray.remote(num_cpus=0)
class ReplicaStandIn:
    """Answers Serve's queue-length probe like a replica (``get_num_ongoing_requests``)."""

    def __init__(self) -> None:
        self.num_ongoing = 0

    def get_num_ongoing_requests(self) -> int:
        return self.num_ongoing

    def set_num_ongoing(self, num_ongoing: int) -> None:
        self.num_ongoing = num_ongoing


DEPLOYMENT = DeploymentID(name="LLMServer:tiny", app_name="llm")
MAX_ONGOING = 4
_request_ids = itertools.count()


@pytest.fixture(scope="module")
def stand_ins(local_ray: None) -> dict[str, Any]:
    actors = {
        f"r{i}": ReplicaStandIn.options(name=f"mars-test-r{i}", namespace=SERVE_NAMESPACE).remote()
        for i in range(3)
    }
    ray.get([a.set_num_ongoing.remote(0) for a in actors.values()])
    return actors


def _replicas(names: list[str]) -> list[RunningReplica]:
    return [
        RunningReplica(
            RunningReplicaInfo(
                replica_id=ReplicaID(name, DEPLOYMENT),
                node_id=None,
                node_ip=None,
                availability_zone=None,
                actor_name=f"mars-test-{name}",
                max_ongoing_requests=MAX_ONGOING,
            )
        )
        for name in names
    ]


def _router(names: list[str]) -> MarsSessionRouter:
    router = MarsSessionRouter(
        deployment_id=DEPLOYMENT,
        handle_source=DeploymentHandleSource.REPLICA,  # the ingress calls LLMServer
        use_replica_queue_len_cache=False,
    )
    router.initialize_state(num_virtual_nodes=32)
    router.update_replicas(_replicas(names))
    return router


class _Headers:
    """Ray Serve LLM's ``RawRequestInfo``: the client's headers, passed along."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


def _request(
    *, header: str | None = None, body: dict[str, Any] | None = None, metadata: str = ""
) -> PendingRequest:
    n = next(_request_ids)
    args: list[Any] = [body or {"model": "tiny"}]
    if header is not None:
        args.append(_Headers({"X-Session-Id": header}))
    return PendingRequest(
        args=args,
        kwargs={},
        metadata=RequestMetadata(
            request_id=f"q{n}", internal_request_id=f"i{n}", session_id=metadata
        ),
    )


async def _tiers(router: MarsSessionRouter, request: PendingRequest) -> list[list[str]]:
    tiers = await router.choose_replicas(router._replicas_list, request)
    return [[r.replica_id.unique_id for r in tier] for tier in tiers]


def test_a_session_sticks_to_one_replica_whichever_way_it_is_named(stand_ins: Any) -> None:
    async def owners_and_tiers() -> tuple[dict[str, str], list[list[str]]]:
        router = _router(["r0", "r1", "r2"])
        owners = {}
        for i in range(60):
            sid = f"s-{i}"
            firsts = set()
            for request in (
                _request(metadata=sid),  # Serve copied x-session-id into the metadata
                _request(header=sid),  # the header, in Ray Serve LLM's RawRequestInfo
                _request(body={"model": "tiny", "session_id": sid}),
                _request(body={"model": "tiny", "vllm_xargs": {"mars_session_id": sid}}),
            ):
                firsts.add((await _tiers(router, request))[0][0])
            assert len(firsts) == 1, sid
            owners[sid] = firsts.pop()
        return owners, await _tiers(router, _request(metadata="s-0"))

    owners, tiers = asyncio.run(owners_and_tiers())
    assert set(owners.values()) == {"r0", "r1", "r2"}  # sessions spread over replicas
    assert tiers[0] == [owners["s-0"]] and all(owners["s-0"] not in t for t in tiers[1:])
    assert tiers[1:]  # the power-of-two fallback follows


def test_without_a_session_id_it_is_power_of_two_choices(stand_ins: Any) -> None:
    async def tiers() -> list[list[str]]:
        return await _tiers(_router(["r0", "r1", "r2"]), _request())

    [pair] = asyncio.run(tiers())
    assert len(pair) == 2 and len(set(pair)) == 2


def test_a_replica_leaving_moves_only_its_own_sessions() -> None:
    ring = SessionRing(num_virtual_nodes=32)
    ring.rebuild(["r0", "r1", "r2"])
    before = {f"s-{i}": ring.owner(f"s-{i}") for i in range(200)}
    ring.rebuild(["r0", "r2"])
    after = {sid: ring.owner(sid) for sid in before}
    moved = {sid for sid in before if before[sid] != after[sid]}
    assert moved == {sid for sid, owner in before.items() if owner == "r1"}
    assert SessionRing().owner("s") is None


def test_a_full_replica_overflows_to_the_fallback(stand_ins: Any) -> None:
    """Ray Serve's own routing loop (queue-length probes to the replicas): the
    session's replica while it has room; another one when its queue is full."""

    async def routed_while(full: bool) -> tuple[str, str]:
        router = _router(["r0", "r1", "r2"])
        owner = (await _tiers(router, _request(metadata="sticky")))[0][0]
        await stand_ins[owner].set_num_ongoing.remote(MAX_ONGOING if full else 0)
        replica = await router._choose_replica_for_request(_request(metadata="sticky"))
        return owner, replica.replica_id.unique_id

    try:
        owner, chosen = asyncio.run(routed_while(full=False))
        assert chosen == owner
        owner, chosen = asyncio.run(routed_while(full=True))
        assert chosen != owner
    finally:
        ray.get([a.set_num_ongoing.remote(0) for a in stand_ins.values()])
