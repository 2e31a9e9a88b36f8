"""Prototype: the MARS retention rule decides which sessions vLLM 0.29 offloads to CPU.

Scheduler side only (see the issue note). vLLM's ``OffloadingConnector`` (CPU tier,
``CPUOffloadingSpec``) stores every request's full blocks write-through, as they are
computed. Here stores wait for the turn's end, and only the turns the retention rule
sends to ``OFFLOAD`` (a long predicted tool wait, reload cheaper than re-prefill) are
stored; the next turn of the session then loads the prefix back through vLLM's own
``get_num_new_matched_tokens`` lookup. Turned on by::

    scheduler_cls="mars_ray.vllm.offload.MarsOffloadScheduler",
    kv_transfer_config={
        "kv_connector": "MarsOffloadingConnector",
        "kv_connector_module_path": "mars_ray.vllm.offload",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"cpu_bytes_to_use": 8 << 30},
    }

The GPU side of an offloaded turn is unchanged: its blocks go to the evict-first end
(``MarsScheduler`` maps ``OFFLOAD`` to ``EVICT_FIRST``). The worker side is vLLM's own
(CUDA / XPU only), so on the CPU platform only the scheduler side runs.

Private vLLM 0.29 APIs relied on: ``Scheduler._connector_finished``,
``OffloadingConnector.connector_scheduler``, ``OffloadingConnectorScheduler``
``_build_store_jobs(scheduler_output)`` (iterates ``num_scheduled_tokens`` and
``finished_req_ids``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.scheduler import (
    OffloadingConnectorScheduler,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (
    OffloadingConnector,
)
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.request import Request

from mars_ray.policies.base import RetentionAction
from mars_ray.vllm.scheduler import MarsScheduler


class MarsOffloadingConnectorScheduler(OffloadingConnectorScheduler):
    """Stores only finished turns marked for offload, all their full blocks at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.offload_req_ids: set[str] = set()  # finished turns to store, until stored

    def _build_store_jobs(self, scheduler_output: SchedulerOutput) -> dict[int, Any]:
        # Running requests are left out (their store index does not advance), so
        # a marked turn's whole context is stored in the step after it finishes.
        finished = scheduler_output.finished_req_ids or set()
        marked = {r for r in finished if r in self.offload_req_ids}
        self.offload_req_ids -= marked
        filtered = dataclasses.replace(
            scheduler_output, num_scheduled_tokens={}, finished_req_ids=marked
        )
        return super()._build_store_jobs(filtered)


class MarsOffloadingConnector(OffloadingConnector):
    """vLLM's ``OffloadingConnector`` with :class:`MarsOffloadingConnectorScheduler`."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        if self.connector_scheduler is not None:
            old = self.connector_scheduler
            # same spec and manager as vLLM built; only the store selection differs
            new = MarsOffloadingConnectorScheduler.__new__(MarsOffloadingConnectorScheduler)
            new.__dict__.update(old.__dict__)
            new.offload_req_ids = set()
            self.connector_scheduler = new

    def mark_offload(self, request_id: str) -> None:
        """Store this (finishing) turn's KV in the CPU tier."""
        assert isinstance(self.connector_scheduler, MarsOffloadingConnectorScheduler)
        self.connector_scheduler.offload_req_ids.add(request_id)


class MarsOffloadScheduler(MarsScheduler):
    """``MarsScheduler`` that asks the retention rule, with a CPU tier, at turn end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.offloaded_req_ids: list[str] = []  # turns sent to the CPU tier (stats, tests)

    @property
    def can_offload(self) -> bool:
        return isinstance(self.connector, MarsOffloadingConnector)

    def offload_decision(self, request: Request) -> RetentionAction:
        """The retention rule's action for a finishing turn, the CPU tier available."""
        view = self._views.get(request.request_id)
        if view is None or not self._retention or not view.hinted:
            return RetentionAction.KEEP_LRU
        ctx = dataclasses.replace(self._turn_end_context(view), can_offload=self.can_offload)
        return self.retention_policy.on_turn_end(ctx).action

    def _connector_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        # Runs in _free_request before the blocks are freed (the view still exists).
        connector = self.connector
        if isinstance(connector, MarsOffloadingConnector) and (
            self.offload_decision(request) is RetentionAction.OFFLOAD
        ):
            connector.mark_offload(request.request_id)
            self.offloaded_req_ids.append(request.request_id)
        return super()._connector_finished(request)
