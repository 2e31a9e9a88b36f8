"""Loud failures when vLLM changes a private API that MarsScheduler relies on
(listed in ``mars_ray/vllm/scheduler.py``'s module docstring)."""

from __future__ import annotations

import inspect
from pathlib import Path

import vllm
from factories import make_request, make_scheduler
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue, KVCacheBlock
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_vllm_version_is_the_targeted_one() -> None:
    assert vllm.__version__.startswith("0.29."), (
        f"MarsScheduler targets vLLM 0.29; found {vllm.__version__}: re-check the private "
        "APIs listed in mars_ray/vllm/scheduler.py"
    )


def test_private_scheduler_methods_keep_their_signatures() -> None:
    assert _params(Scheduler._reserve_prefill_lookahead) == [
        "self",
        "request",
        "num_computed_tokens",
        "num_new_tokens",
    ]
    assert _params(Scheduler._preempt_request) == [
        "self",
        "request",
        "timestamp",
        "drop_stale_output",
    ]
    assert _params(Scheduler._free_request) == ["self", "request", "delay_free_blocks"]
    assert _params(Scheduler._free_request_blocks) == ["self", "request"]
    assert issubclass(AsyncScheduler, Scheduler)


def test_schedule_still_calls_the_hooks_we_override() -> None:
    source = inspect.getsource(Scheduler.schedule)
    assert source.count("self._reserve_prefill_lookahead(") == 2  # running and waiting loops
    assert "preempted_req = self.running.pop()" in source  # FCFS victim = last running
    assert "self._preempt_request(" in source
    assert "self._free_request_blocks(request)" in inspect.getsource(Scheduler._free_blocks)


def test_kv_cache_internals_we_touch_exist(tiny_model_dir: Path) -> None:
    sched = make_scheduler(AsyncScheduler, tiny_model_dir)
    for name in (
        "waiting",
        "skipped_waiting",
        "running",
        "requests",
        "policy",
        "defer_block_free",
        "processed_step_seq",
        "num_lookahead_tokens",
        "kv_cache_manager",
        "block_size",
        "max_num_scheduled_tokens",
        "max_num_running_reqs",
    ):
        assert hasattr(sched, name), f"Scheduler.{name} is gone"
    assert hasattr(make_request("r", 4), "last_sched_seq"), "Request.last_sched_seq is gone"
    source = inspect.getsource(Scheduler.schedule)
    assert "token_budget = self.max_num_scheduled_tokens" in source  # the leftover estimate
    assert "request.num_tokens_with_spec\n                + request.num_output_placeholders" in (
        source
    )
    assert isinstance(sched.running, list)
    assert isinstance(sched.kv_cache_manager.block_pool, BlockPool)
    assert _params(KVCacheManager.pop_blocks_for_free) == ["self", "request"]
    assert _params(KVCacheManager.get_block_ids) == ["self", "request_id"]
    assert isinstance(sched.kv_cache_manager.block_pool.free_block_queue, FreeKVCacheBlockQueue)
    assert _params(FreeKVCacheBlockQueue.remove) == ["self", "block"]
    assert _params(FreeKVCacheBlockQueue.prepend_n) == ["self", "blocks"]
    block = KVCacheBlock(0)
    for name in ("ref_cnt", "block_hash", "is_null"):
        assert hasattr(block, name), f"KVCacheBlock.{name} is gone"


def test_offloading_connector_internals_the_offload_prototype_overrides() -> None:
    """``mars_ray.vllm.offload`` overrides these private hooks of vLLM 0.29."""
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.scheduler import (
        OffloadingConnectorScheduler,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (
        OffloadingConnector,
    )

    assert callable(getattr(Scheduler, "_connector_finished", None)), "_connector_finished"
    build = getattr(OffloadingConnectorScheduler, "_build_store_jobs", None)
    assert callable(build), "OffloadingConnectorScheduler._build_store_jobs is gone"
    assert list(inspect.signature(build).parameters) == ["self", "scheduler_output"]
    source = inspect.getsource(build)
    assert "num_scheduled_tokens" in source and "finished_req_ids" in source
    assert "self.connector_scheduler" in inspect.getsource(OffloadingConnector.__init__)


def test_apis_the_kv_pins_rely_on() -> None:
    """Pins (``MarsScheduler._pin_request_blocks`` and friends) use these."""
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

    assert _params(BlockPool.free_blocks) == ["self", "ordered_blocks"]
    assert _params(Scheduler.reset_prefix_cache) == [
        "self",
        "reset_running_requests",
        "reset_connector",
    ]
    fields = SchedulerOutput.__dataclass_fields__
    assert "scheduled_new_reqs" in fields and "scheduled_cached_reqs" in fields
    assert "resumed_req_ids" in CachedRequestData.__dataclass_fields__
