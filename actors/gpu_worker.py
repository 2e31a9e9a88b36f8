"""``GPUWorker``: one Ray actor per GPU, owning one engine.

``engine="sim"`` steps a SimEngine in (time-scaled) wall-clock time through
:class:`SimEngineRunner`; ``engine="vllm"`` runs vLLM's ``AsyncLLM`` with
``MarsScheduler`` through :class:`VllmEngineRunner` (a real model on the actor's
GPU, or a simulated device on CPU). Both stream the same messages, so the ingress
and the global scheduler never ask which. The actor is a thin adapter: placement,
priorities and retention all come from the policy objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import ray

from mars_ray.engine.costmodel import CostModel, load_profile
from mars_ray.engine.sim_engine import SimEngine
from mars_ray.policies.registry import get_policy
from mars_ray.telemetry import EngineSnapshot

from .config import DeploymentConfig
from .engine_runner import SimEngineRunner
from .messages import TokenChunk, TurnDone, TurnWork
from .vllm_runner import VllmEngineRunner

#: a send or receive of migrating KV gives up after this (the turn then recomputes)
KV_TRANSFER_TIMEOUT_S = 20.0


class GPUWorkerImpl:
    """The actor's body (also usable without Ray for direct measurements)."""

    def __init__(self, engine_id: int, node_index: int, config: DeploymentConfig) -> None:
        self.engine_id = engine_id
        self.runner: SimEngineRunner | VllmEngineRunner
        if config.engine == "vllm":
            self.runner = VllmEngineRunner(engine_id, node_index, config)
            return
        spec = get_policy(config.policy)
        cost = CostModel(load_profile(config.cluster.gpu, config.cluster.model))
        engine = SimEngine(
            engine_id,
            cost,
            config.engine_config,
            spec.make_scheduler(config.policy_config),
            node_id=node_index,
        )
        self.runner = SimEngineRunner(
            engine, spec.make_retention(config.policy_config), time_scale=config.time_scale
        )

    async def start(self) -> None:
        """Ready to serve (a vLLM engine is built and warmed up here)."""
        if isinstance(self.runner, VllmEngineRunner):
            await self.runner.start()

    def max_context_tokens(self) -> int:
        if isinstance(self.runner, VllmEngineRunner):
            return self.runner.max_tokens
        return self.runner.engine.max_tokens


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=10_000)  # type: ignore[call-overload]  # Ray stubs lack actor options
class GPUWorker:
    """One GPU's engine. ``num_gpus=1`` is set by the caller's ``.options`` together
    with the placement-group bundle, so the same class serves logical GPUs in tests."""

    def __init__(self, engine_id: int, node_index: int, config: DeploymentConfig) -> None:
        self._impl = GPUWorkerImpl(engine_id, node_index, config)
        self._config = config
        self._transport: Any = None  # KvTransport, once the workers' group is formed

    # -- KV migration over torch.distributed (sim engines: scaled stand-in payloads) --
    def kv_rendezvous(self) -> tuple[str, int]:
        """Rank 0 names the group's TCP rendezvous: its node's address, a free port."""
        from mars_ray.cluster.kv_transfer import free_port

        return ray.util.get_node_ip_address(), free_port()

    async def join_kv_group(self, master_addr: str, master_port: int, world_size: int) -> None:
        """Join the GPU workers' process group (gloo; blocks until all have joined)."""
        from mars_ray.cluster.kv_transfer import KvTransport, TransportConfig

        if self._transport is not None:
            return
        config = TransportConfig(
            backend="gloo",
            master_addr=master_addr,
            master_port=master_port,
            world_size=world_size,
            timeout_s=KV_TRANSFER_TIMEOUT_S,
        )
        self._transport = await asyncio.to_thread(KvTransport, config, self._impl.engine_id)

    async def send_kv(self, session_id: str, dst_engine_id: int) -> int:
        """Send the session's cached KV to ``dst_engine_id`` (which calls ``receive_kv``
        at the same time) and forget it here; returns the blocks sent."""
        from mars_ray.cluster.kv_transfer import KvHeader, sim_kv_payload

        runner = self._sim_runner()
        num_blocks = runner.export_kv(session_id)
        block_size = self._config.engine_config.block_size
        payload = sim_kv_payload(session_id, num_blocks, self._sim_bytes_per_block())
        header = KvHeader(session_id, num_blocks * block_size, num_blocks, payload.numel())
        await asyncio.to_thread(self._transport.send, dst_engine_id, header, payload)
        return num_blocks

    async def receive_kv(self, session_id: str, src_engine_id: int) -> int:
        """Receive a session's KV from ``src_engine_id``, check it, adopt it; returns
        the blocks adopted."""
        from mars_ray.cluster.kv_transfer import KvTransferError, verify_sim_kv_payload

        runner = self._sim_runner()
        header, payload, _ = await asyncio.to_thread(
            self._transport.recv, src_engine_id, session_id
        )
        if not verify_sim_kv_payload(session_id, payload, self._sim_bytes_per_block()):
            raise KvTransferError(f"KV of session {session_id!r} arrived corrupt")
        return await runner.adopt_kv(session_id, header.num_blocks)

    def _sim_runner(self) -> SimEngineRunner:
        runner = self._impl.runner
        if not isinstance(runner, SimEngineRunner) or self._transport is None:
            raise RuntimeError("KV migration needs sim engines in a formed KV group")
        return runner

    def _sim_bytes_per_block(self) -> int:
        from mars_ray.cluster.kv_transfer import sim_bytes_per_block

        runner = self._sim_runner()
        block_size = self._config.engine_config.block_size
        return sim_bytes_per_block(runner.engine.cost.kv_bytes_per_token * block_size)

    async def ready(self) -> dict[str, Any]:
        """Where this worker runs, once its engine serves (the caller waits on this)."""
        await self._impl.start()
        ctx = ray.get_runtime_context()
        return {
            "engine_id": self._impl.engine_id,
            "node_id": ctx.get_node_id(),
            "gpu_ids": ray.get_gpu_ids(),
            "max_context_tokens": self._impl.max_context_tokens(),
        }

    async def generate(self, work: TurnWork) -> AsyncIterator[TokenChunk | TurnDone]:
        """Stream one turn: token chunks, then its TurnDone (call with
        ``num_returns="streaming"``)."""
        async for item in self._impl.runner.generate(work):
            yield item

    async def run_turn(self, work: TurnWork) -> tuple[list[int], TurnDone]:
        """One turn in one call (for non-streaming requests): its token ids and end."""
        ids: list[int] = []
        async for item in self._impl.runner.generate(work):
            if isinstance(item, TokenChunk):
                ids.extend(item.token_ids)
            else:
                return ids, item
        raise RuntimeError(f"turn {work.request_id} ended without a TurnDone")

    async def snapshot(self) -> EngineSnapshot:
        return self._impl.runner.snapshot()

    async def forget(self, session_id: str) -> None:
        self._impl.runner.forget(session_id)
