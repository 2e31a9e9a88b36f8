"""Where the global scheduler keeps what its restart must not lose.

The :class:`~mars_ray.actors.scheduler.GlobalScheduler` actor writes each session's
record (its runtime fields, its cluster-scheduler record and its conversation keys),
the admission state and the Responses API records to Ray's GCS key-value store: it
outlives the actor, and under KubeRay's GCS fault tolerance (an external Redis) the
head node too. Keys live in the ``mars-scheduler`` namespace under the deployment's
run id (a fresh one per deployment, so a new deployment never reads an old one's).

:class:`GcsStore` is that store; :class:`MemoryStore` the same interface in memory
(tests, and a scheduler run outside Ray).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

log = logging.getLogger(__name__)

NAMESPACE = b"mars-scheduler"
STORE_TIMEOUT_S = 10.0  # one write or read; GCS restarting under FT takes seconds


class SchedulerStore(Protocol):
    async def write(self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes]) -> None:
        """Put ``puts`` and delete ``deletes`` (keys relative to the run's prefix)."""

    def load(self) -> dict[bytes, bytes]:
        """Every key of the run (relative) and its value."""

    def drop(self) -> None:
        """Delete the run's keys (the deployment is shut down)."""


class GcsStore:
    """The run's keys in Ray's GCS internal KV (``ray.experimental.internal_kv``).

    Writes go through the GCS client's async calls, concurrently, so the actor's
    event loop keeps serving while they travel; reads (a restart) are synchronous."""

    def __init__(self, run_id: str) -> None:
        self.prefix = f"{run_id}/".encode()

    @staticmethod
    def _client() -> Any:
        from ray.experimental import internal_kv

        client = internal_kv.internal_kv_get_gcs_client()
        if client is None:
            raise RuntimeError("Ray is not connected (no GCS client)")
        return client

    async def write(self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes]) -> None:
        client = self._client()
        calls = [
            client.async_internal_kv_put(
                self.prefix + key, value, True, NAMESPACE, timeout=STORE_TIMEOUT_S
            )
            for key, value in puts.items()
        ]
        calls += [
            client.async_internal_kv_del(
                self.prefix + key, False, NAMESPACE, timeout=STORE_TIMEOUT_S
            )
            for key in deletes
        ]
        if calls:
            await asyncio.gather(*calls)

    def load(self) -> dict[bytes, bytes]:
        client = self._client()
        keys = client.internal_kv_keys(self.prefix, NAMESPACE, timeout=STORE_TIMEOUT_S)
        if not keys:
            return {}
        values = client.internal_kv_multi_get(keys, NAMESPACE, timeout=STORE_TIMEOUT_S)
        n = len(self.prefix)
        return {k[n:]: v for k, v in values.items() if v is not None}

    def drop(self) -> None:
        self._client().internal_kv_del(self.prefix, True, NAMESPACE, timeout=STORE_TIMEOUT_S)


def drop_all() -> int:
    """Delete every run's keys (teardown: one deployment per Ray namespace)."""
    from ray.experimental import internal_kv

    client = internal_kv.internal_kv_get_gcs_client()
    if client is None:
        return 0
    return int(client.internal_kv_del(b"", True, NAMESPACE, timeout=STORE_TIMEOUT_S))


class MemoryStore:
    """:class:`SchedulerStore` in a dict; ``writes`` counts write calls, ``puts`` keys put."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.writes = 0
        self.puts = 0

    async def write(self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes]) -> None:
        self.writes += 1
        self.puts += len(puts)
        self.data.update(puts)
        for key in deletes:
            self.data.pop(key, None)

    def load(self) -> dict[bytes, bytes]:
        return dict(self.data)

    def drop(self) -> None:
        self.data.clear()
