"""The MARS retention rule picks the turns vLLM's OffloadingConnector stores in the CPU
tier (scheduler side; a fake worker completes the transfers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import factories
import pytest
from factories import BLOCK_SIZE, make_request, make_scheduler, runner_output
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
    OffloadingWorkerMetadata,
)
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheTensor
from vllm.v1.kv_offload.base import LookupResult, make_offload_key
from vllm.v1.outputs import KVConnectorOutput

from mars_ray.policies.base import RetentionAction
from mars_ray.vllm.hints import SessionHints
from mars_ray.vllm.offload import MarsOffloadingConnector, MarsOffloadScheduler


@pytest.fixture
def scheduler(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> MarsOffloadScheduler:
    make_config = factories.make_vllm_config

    def with_connector(*args: Any, **kwargs: Any) -> Any:
        config = make_config(*args, **kwargs)
        config.kv_transfer_config = KVTransferConfig(
            kv_connector="MarsOffloadingConnector",
            kv_connector_module_path="mars_ray.vllm.offload",
            kv_role="kv_both",
            kv_connector_extra_config={"cpu_bytes_to_use": 1 << 20},
        )
        return config

    def with_tensor(num_blocks: int, kv_cache_tensors: Any, kv_cache_groups: Any) -> Any:
        # the connector sizes its CPU blocks from the GPU tensor's bytes per block
        page = kv_cache_groups[0].kv_cache_spec.page_size_bytes
        tensor = KVCacheTensor(
            size=num_blocks * page,
            layers=["layer0"],
            layer_stride=page * num_blocks,
            block_stride=page,
        )
        return KVCacheConfig(num_blocks, [tensor], kv_cache_groups)

    monkeypatch.setattr(factories, "make_vllm_config", with_connector)
    monkeypatch.setattr(factories, "KVCacheConfig", with_tensor)
    s = make_scheduler(MarsOffloadScheduler, tiny_model_dir, num_blocks=64)
    assert isinstance(s, MarsOffloadScheduler)
    return s


def _step(s: MarsOffloadScheduler, completed: dict[int, int]) -> SchedulerOutput:
    """One step; the fake worker reports the jobs in ``completed`` as done."""
    so = s.schedule()
    out = runner_output(s, so)
    out.kv_connector_output = KVConnectorOutput(
        kv_connector_worker_meta=OffloadingWorkerMetadata(completed_jobs=dict(completed))
    )
    completed.clear()
    s.update_from_output(so, out)
    return so


def _run(s: MarsOffloadScheduler) -> dict[str, list[int]]:
    """Run to the end, completing every store the step after it is issued; the
    GPU blocks stored per request."""
    stored: dict[str, list[int]] = {}
    completed: dict[int, int] = {}
    for _ in range(100):
        if not s.has_requests() and not s.connector.has_pending_push_work():
            return stored
        so = _step(s, completed)
        for job_id, job in so.kv_connector_metadata.store_jobs.items():
            stored.setdefault(job.req_id, []).extend(int(b) for b in job.src_spec.block_ids)
            completed[job_id] = 1
    raise AssertionError("not done")


def _hints(session: str, tool_s: float, last: bool = False) -> SessionHints:
    return SessionHints(session_id=session, turn_index=0, last_turn=last, expected_tool_s=tool_s)


def test_only_long_waits_are_offloaded_at_turn_end(scheduler: MarsOffloadScheduler) -> None:
    s = scheduler
    assert isinstance(s.connector, MarsOffloadingConnector)
    long_wait = make_request("long", 100, hints=_hints("a", 600.0))
    short_wait = make_request("short", 100, hints=_hints("b", 0.01))
    last = make_request("last", 100, hints=_hints("c", 600.0, last=True))
    plain = make_request("plain", 100)
    for r in (long_wait, short_wait, last, plain):
        s.add_request(r)

    stored = _run(s)

    assert s.offloaded_req_ids == ["long"]
    assert list(stored) == ["long"]  # nothing written through while running
    assert len(stored["long"]) == 103 // BLOCK_SIZE  # every full block of the turn
    manager = s.connector.connector_scheduler.manager
    for block_hash in long_wait.block_hashes:
        assert manager.lookup(make_offload_key(block_hash, 0), None) is LookupResult.HIT
    for block_hash in short_wait.block_hashes:
        assert manager.lookup(make_offload_key(block_hash, 0), None) is LookupResult.MISS
    # GPU side unchanged: an offloaded turn's blocks are evicted first
    assert s.retention_actions[RetentionAction.EVICT_FIRST] == 2  # long, last
    assert s.requests == {}


def test_next_turn_hits_the_cpu_tier(scheduler: MarsOffloadScheduler) -> None:
    s = scheduler
    first = make_request("t0", 100, hints=_hints("a", 600.0))
    s.add_request(first)
    _run(s)
    s.reset_prefix_cache()  # the GPU copy is gone (evicted while the tool ran)
    prompt = list(first.all_token_ids) + [5] * 20
    s.add_request(make_request("t1", 0, prompt=prompt, hints=_hints("a", 600.0)))
    so = s.schedule()
    load_jobs = so.kv_connector_metadata.load_jobs
    assert [job.req_id for job in load_jobs.values()] == ["t1"]
    # the turn's computed prefix (full blocks) comes from the CPU tier
    assert sum(len(job.dst_spec.block_ids) for job in load_jobs.values()) == 103 // BLOCK_SIZE
