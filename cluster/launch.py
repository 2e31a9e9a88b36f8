"""Bringing up a mars-ray runtime on a Ray cluster.

* :func:`connect` starts an embedded local Ray (the default; ``num_nodes > 1``
  emulates several nodes on this machine with ``ray.cluster_utils.Cluster``) or
  joins an existing cluster (``address``, e.g. ``auto`` inside a KubeRay pod).
* :func:`ensure_runtime` creates, or finds, the deployment's actors: a placement
  group with one ``{"GPU": 1}`` bundle per GPU (``PACK`` or ``SPREAD`` across
  nodes), a ``GPUWorker`` in each bundle, a ``ToolExecutor`` pinned to each node
  that hosts GPU workers, and the ``GlobalScheduler``. All are named and detached
  in the ``mars`` namespace so any ingress replica (or a restarted scheduler)
  finds them; :func:`teardown_runtime` removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

import ray
from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from mars_ray.actors.config import DeploymentConfig
from mars_ray.actors.names import (
    NAMESPACE,
    PG_NAME,
    SCHEDULER_ACTOR_NAME,
    executor_name,
    worker_name,
)
from mars_ray.errors import ConfigError

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
#: loading real weights (and vLLM's compile and CUDA graph capture) takes longer
MODEL_READY_TIMEOUT_S = 1800.0


@dataclass
class LocalRay:
    """An embedded Ray started by :func:`connect` (None fields: joined an existing one)."""

    address: str
    cluster: Any = None  # ray.cluster_utils.Cluster when emulating several nodes
    started: bool = False
    node_ids: list[str] = field(default_factory=list)

    def shutdown(self) -> None:
        if not self.started:
            return
        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()


def connect(
    address: str | None = None,
    *,
    num_gpus: int = 1,
    num_nodes: int = 1,
    num_cpus_per_node: int | None = None,
) -> LocalRay:
    """Join ``address``, or start an embedded Ray with ``num_gpus`` logical GPUs
    spread over ``num_nodes`` emulated nodes (the head node holds no GPUs then)."""
    if address is not None:
        ray.init(address=address, namespace=NAMESPACE, ignore_reinit_error=True)
        return LocalRay(address=address)
    if num_gpus % num_nodes:
        raise ConfigError(f"--gpus ({num_gpus}) must be a multiple of --nodes ({num_nodes})")
    # Ray actors reserve CPUs; ours reserve 0, but Serve's replicas and tasks need some.
    cpus = num_cpus_per_node or max(4, os.cpu_count() or 1)
    # Ray Serve's documented low-overhead mode (user code on the replica's main loop,
    # buffered access logs): it roughly halves what the ingress adds to a turn here.
    # Workers inherit the driver's environment; on KubeRay the manifests set it.
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # That mode serves HTTP on the replica itself and, on shutdown, holds the replica
    # open 30 s so that load balancers in front can deregister it. An embedded Ray
    # has none in front: drain in-flight requests, then stop (SIGINT/SIGTERM of
    # `mars-ray serve` took 34 s, now about 6).
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    if num_nodes == 1:
        info = ray.init(
            address="local",  # always a fresh Ray, never one that happens to be running
            num_cpus=cpus,
            num_gpus=num_gpus,
            namespace=NAMESPACE,
            include_dashboard=False,
            configure_logging=True,
            logging_level=logging.WARNING,
        )
        return LocalRay(address=info.address_info["address"], started=True)  # type: ignore[attr-defined]
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "num_gpus": 0})
    node_ids = []
    for _ in range(num_nodes):
        node = cluster.add_node(num_cpus=cpus, num_gpus=num_gpus // num_nodes)
        node_ids.append(node.node_id)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, logging_level=logging.WARNING)
    return LocalRay(address=cluster.address, cluster=cluster, started=True, node_ids=node_ids)


@dataclass
class RuntimeHandles:
    """The actors of one deployment."""

    scheduler: Any
    workers: dict[int, Any]
    engine_nodes: dict[int, int]  # engine id -> node index
    node_ray_ids: dict[int, str]  # node index -> Ray node id
    executors: dict[int, Any]
    max_context_tokens: int


def ensure_runtime(config: DeploymentConfig) -> RuntimeHandles:
    """Create the deployment's actors, or find them if they exist (idempotent)."""
    from mars_ray.actors.gpu_worker import GPUWorker
    from mars_ray.actors.scheduler import GlobalScheduler

    num_gpus = config.cluster.num_gpus
    pg = _placement_group(num_gpus, config.placement_strategy)
    workers = {}
    for engine_id in range(num_gpus):
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=engine_id)
        workers[engine_id] = GPUWorker.options(
            name=worker_name(engine_id),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_gpus=1,
            scheduling_strategy=strategy,
        ).remote(engine_id, 0, config)
    timeout_s = READY_TIMEOUT_S if config.vllm_model is None else MODEL_READY_TIMEOUT_S
    infos = ray.get([w.ready.remote() for w in workers.values()], timeout=timeout_s)
    node_index: dict[str, int] = {}
    engine_nodes = {}
    for engine_id, info in zip(workers, infos, strict=True):
        engine_nodes[engine_id] = node_index.setdefault(info["node_id"], len(node_index))
    node_ray_ids = {i: n for n, i in node_index.items()}
    if config.migrates_kv:
        _form_kv_group(workers)
    # run_id: where this deployment's scheduler keeps its state in the GCS store (fresh
    # per deployment; a restarted scheduler is constructed with the same arguments)
    scheduler = GlobalScheduler.options(
        name=SCHEDULER_ACTOR_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        **_on_head_node(),
    ).remote(config, uuid.uuid4().hex)
    ray.get(
        scheduler.register_workers.remote(workers, engine_nodes, node_ray_ids),
        timeout=READY_TIMEOUT_S,
    )
    gpus_on_node = {i: sum(1 for n in engine_nodes.values() if n == i) for i in node_ray_ids}
    executors = ensure_tool_executors(config, node_ray_ids, gpus_on_node)
    ray.get(scheduler.register_tool_executors.remote(executors), timeout=READY_TIMEOUT_S)
    ray.get(scheduler.ready.remote(), timeout=READY_TIMEOUT_S)
    return RuntimeHandles(
        scheduler,
        workers,
        engine_nodes,
        node_ray_ids,
        executors,
        min(i["max_context_tokens"] for i in infos),
    )


def _form_kv_group(workers: dict[int, Any]) -> None:
    """The GPU workers' torch.distributed group for KV migration (rank = engine id)."""
    addr, port = ray.get(workers[0].kv_rendezvous.remote(), timeout=READY_TIMEOUT_S)
    joins = [w.join_kv_group.remote(addr, port, len(workers)) for w in workers.values()]
    ray.get(joins, timeout=READY_TIMEOUT_S)


@ray.remote(num_cpus=0)
class _RuntimeLock:
    """One creator at a time: ingress replicas that start together must not each form
    the GPU workers' process group (``find_or_create_runtime``)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        await self._lock.acquire()

    def release(self) -> None:
        self._lock.release()


RUNTIME_LOCK_NAME = "mars-runtime-lock"


def find_or_create_runtime(config: DeploymentConfig) -> RuntimeHandles:
    """The deployment's runtime: found by name, or created by the first caller while
    the others wait (several ingress replicas start at once)."""
    lock = _RuntimeLock.options(  # type: ignore[attr-defined]
        name=RUNTIME_LOCK_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()
    ray.get(lock.acquire.remote(), timeout=MODEL_READY_TIMEOUT_S)
    try:
        return find_runtime(config) or ensure_runtime(config)
    finally:
        ray.get(lock.release.remote())


def find_runtime(config: DeploymentConfig) -> RuntimeHandles | None:
    """Find the live actors of a deployment by name (a restarted scheduler rebuilds its
    registry this way); None if no GPU worker is alive."""
    try:
        scheduler = ray.get_actor(SCHEDULER_ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return None  # not started yet
    workers: dict[int, Any] = {}
    infos: dict[int, dict[str, Any]] = {}
    for engine_id in range(config.cluster.num_gpus):
        try:
            worker = ray.get_actor(worker_name(engine_id), namespace=NAMESPACE)
            infos[engine_id] = cast(dict[str, Any], ray.get(worker.ready.remote(), timeout=30))
        except Exception:  # gone or dead: not part of the runtime any more
            continue
        workers[engine_id] = worker
    if not workers:
        return None
    node_index: dict[str, int] = {}
    engine_nodes = {
        e: node_index.setdefault(info["node_id"], len(node_index)) for e, info in infos.items()
    }
    executors = {}
    for index in node_index.values():
        try:
            executors[index] = ray.get_actor(executor_name(index), namespace=NAMESPACE)
        except ValueError:
            continue
    return RuntimeHandles(
        scheduler,
        workers,
        engine_nodes,
        {i: n for n, i in node_index.items()},
        executors,
        min(i["max_context_tokens"] for i in infos.values()),
    )


def ensure_tool_executors(
    config: DeploymentConfig, node_ray_ids: dict[int, str], gpus_on_node: dict[int, int]
) -> dict[int, Any]:
    """One ToolExecutor per live node that hosts GPU workers (created if missing).

    Its slots are ``tools.slots_per_node``, or the cluster's ``cpu_cores_per_gpu`` x
    the node's GPUs: the tool-pool size the simulator models for the same config."""
    from mars_ray.actors.tool_executor import ToolExecutor

    alive = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
    executors = {}
    for index, ray_node_id in node_ray_ids.items():
        node = alive.get(ray_node_id)
        if node is None:
            continue
        slots = config.tools.slots_per_node or config.cluster.cpu_cores_per_gpu * max(
            1, gpus_on_node.get(index, 1)
        )
        executors[index] = ToolExecutor.options(
            name=executor_name(index),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray_node_id, soft=False),
        ).remote(index, config, slots)
    ray.get([e.ready.remote() for e in executors.values()], timeout=READY_TIMEOUT_S)
    return executors


def _placement_group(num_gpus: int, strategy: str) -> Any:
    try:
        pg = get_placement_group(PG_NAME)
    except ValueError:
        pg = placement_group(
            [{"GPU": 1}] * num_gpus, strategy=strategy, name=PG_NAME, lifetime="detached"
        )
    if not pg.wait(timeout_seconds=READY_TIMEOUT_S):
        have = ray.cluster_resources().get("GPU", 0)
        raise ConfigError(
            f"could not reserve {num_gpus} GPU bundle(s) ({strategy}) within "
            f"{READY_TIMEOUT_S:.0f} s; the cluster has {have:g} GPU"
        )
    return pg


HEAD_RESOURCE = "node:__internal_head__"  # what Ray gives the head node, whichever it is


def _on_head_node() -> dict[str, Any]:
    """Actor options that pin to the head node: it outlives worker nodes (removal,
    scale-down), so the single source of session state does not move with them. By
    the head's resource, not its node id: a head that is replaced (KubeRay with GCS
    fault tolerance) is a new node, and a restarted scheduler must come back on it
    (it needs no CPU, so the head always has room). If no node has the resource, the
    calling node (softly)."""
    if any(n.get("Alive") and HEAD_RESOURCE in n.get("Resources", {}) for n in ray.nodes()):
        return {"resources": {HEAD_RESOURCE: 0.001}}
    here = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=True)}


def teardown_runtime(num_gpus: int) -> None:
    """Kill the deployment's named actors, release its GPUs and drop the scheduler's
    stored state."""
    from mars_ray.actors.scheduler_store import drop_all

    try:
        drop_all()
    except Exception as exc:  # a GCS that is gone has nothing left to drop
        log.warning("could not drop the scheduler's stored state: %r", exc)
    names = [SCHEDULER_ACTOR_NAME, RUNTIME_LOCK_NAME, *(worker_name(i) for i in range(num_gpus))]
    names += [executor_name(i) for i in range(num_gpus)]
    for name in names:
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    with contextlib.suppress(ValueError):
        remove_placement_group(get_placement_group(PG_NAME))
