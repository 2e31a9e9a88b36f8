"""A session-affine request router for Ray Serve LLM (Ray 2.60's request router API).

A session's turns should land on the replica that holds its KV cache: there its
next prompt is a prefix-cache hit and MarsScheduler's retention decisions pay off.
:class:`MarsSessionRouter` sends requests of one session to one replica by
consistent hashing of the session id over the replica ids (virtual nodes, so a
replica joining or leaving moves only the sessions it gains or loses), and falls
back to Ray Serve's default power-of-two choices when a request has no session id
or the session's replica is full (its queue at ``max_ongoing_requests``).

The session id, first found of:

1. the ``x-session-id`` header (Ray Serve's own session header, which it copies to
   the request metadata; renamed by ``RAY_SERVE_SESSION_ID_HEADER_KEY``), or that
   header in the ``RawRequestInfo`` Ray Serve LLM passes along;
2. a ``session_id`` field in the request body (vLLM keeps unknown body fields);
3. ``vllm_xargs["mars_session_id"]``, the flat session hint of
   :mod:`mars_ray.vllm.hints`, so hinted requests need nothing else.

Enable it with ``deployment_config={"request_router_config": {"request_router_class":
ROUTER_CLASS}}`` (``mars_ray.vllm.serve_llm.mars_llm_config`` does). Ray Serve pickles
this module by value into every router, so it imports neither vLLM nor the rest of
mars_ray. ``choose_replicas`` returns ranked tiers, ``[[the session's replica],
[power-of-two pair without it]]``; Ray Serve's routing loop takes the first tier
with a replica that accepts, which is how a full replica overflows to the fallback.

Ray private API relied on (Ray pinned at 2.60 by the ``vllm`` extra):
``ray.serve._private.request_router.pow_2_router.PowerOfTwoChoicesRequestRouter
.choose_replicas``, called unbound for the fallback, as Ray's own
``PrefixCacheAffinityRouter`` does. The router leaves out ``FIFOMixin``: FIFO
fulfilment hands a replica found for one request to the oldest pending one, which
would break affinity.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

#: what ``request_router_config.request_router_class`` takes
ROUTER_CLASS = "mars_ray.vllm.session_router:MarsSessionRouter"
SESSION_HEADER = "x-session-id"
BODY_KEY = "session_id"
XARGS_KEY = "mars_session_id"
DEFAULT_NUM_VIRTUAL_NODES = 64


def session_id_of(pending_request: PendingRequest | None) -> str | None:
    """The request's session id (see the module docstring for where it is looked for)."""
    if pending_request is None:
        return None
    from_metadata = getattr(pending_request.metadata, "session_id", "")
    if from_metadata:
        return str(from_metadata)
    args = list(pending_request.args or ()) + list((pending_request.kwargs or {}).values())
    for arg in args:
        found = _from_headers(getattr(arg, "headers", None))
        if found:
            return found
    for arg in args:
        found = _from_body(arg)
        if found:
            return found
    return None


def _from_headers(headers: Any) -> str | None:
    if not isinstance(headers, Mapping):
        return None
    for key, value in headers.items():
        if str(key).lower().replace("_", "-") == SESSION_HEADER and value:
            return str(value)
    return None


def _from_body(body: Any) -> str | None:
    """``session_id`` or ``vllm_xargs["mars_session_id"]`` of a request body (a
    pydantic model with extra fields kept, or a plain dict)."""
    get = body.get if isinstance(body, Mapping) else lambda key: getattr(body, key, None)
    session_id = get(BODY_KEY)
    if isinstance(session_id, str) and session_id:
        return session_id
    xargs = get("vllm_xargs")
    if isinstance(xargs, Mapping):
        hinted = xargs.get(XARGS_KEY)
        if isinstance(hinted, str) and hinted:
            return hinted
    return None


class SessionRing:
    """Consistent hashing of session ids onto replica ids."""

    def __init__(self, num_virtual_nodes: int = DEFAULT_NUM_VIRTUAL_NODES) -> None:
        if num_virtual_nodes < 1:
            raise ValueError(f"num_virtual_nodes must be >= 1, got {num_virtual_nodes}")
        self.num_virtual_nodes = num_virtual_nodes
        self._hashes: list[int] = []
        self._owners: list[str] = []
        self._members: frozenset[str] = frozenset()

    @property
    def members(self) -> frozenset[str]:
        return self._members

    def rebuild(self, replica_ids: Iterable[str]) -> None:
        """Place every replica's virtual nodes (a no-op when the set is unchanged)."""
        members = frozenset(replica_ids)
        if members == self._members:
            return
        points = sorted(
            (_hash(f"{replica_id}#{i}"), replica_id)
            for replica_id in members
            for i in range(self.num_virtual_nodes)
        )
        self._hashes = [h for h, _ in points]
        self._owners = [r for _, r in points]
        self._members = members

    def owner(self, session_id: str) -> str | None:
        """The replica id ``session_id`` maps to (None: no replicas)."""
        if not self._hashes:
            return None
        index = bisect.bisect_right(self._hashes, _hash(session_id)) % len(self._hashes)
        return self._owners[index]


def _hash(key: str) -> int:
    """A hash stable across processes and runs (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class MarsSessionRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Session affinity by consistent hashing, power-of-two choices otherwise.

    ``request_router_kwargs``: ``num_virtual_nodes`` (default 64).
    """

    def initialize_state(self, **kwargs: Any) -> None:
        """``request_router_kwargs``; unknown keys are refused."""
        unknown = sorted(set(kwargs) - {"num_virtual_nodes"})
        if unknown:
            raise ValueError(
                f"unknown MarsSessionRouter kwargs {unknown}; accepted: num_virtual_nodes"
            )
        num_virtual_nodes = kwargs.get("num_virtual_nodes", DEFAULT_NUM_VIRTUAL_NODES)
        if not isinstance(num_virtual_nodes, int) or isinstance(num_virtual_nodes, bool):
            raise ValueError(f"num_virtual_nodes must be an int, got {num_virtual_nodes!r}")
        self._ring = SessionRing(num_virtual_nodes)
        self._ring.rebuild(r.unique_id for r in self._replica_id_set)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._session_ring.rebuild(r.unique_id for r in self._replica_id_set)

    @property
    def _session_ring(self) -> SessionRing:
        # initialize_state runs after construction; replicas may come first
        if not hasattr(self, "_ring"):
            self._ring = SessionRing()
        return self._ring

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        # Serve's default, called unbound (as Ray's own PrefixCacheAffinityRouter does)
        power_of_two: Any = PowerOfTwoChoicesRequestRouter.choose_replicas
        fallback: list[list[RunningReplica]] = await power_of_two(
            self, candidate_replicas=candidate_replicas, pending_request=pending_request
        )
        return self.rank(candidate_replicas, pending_request, fallback)

    def rank(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None,
        fallback: list[list[RunningReplica]],
    ) -> list[list[RunningReplica]]:
        """The session's replica first (when it is a candidate), then ``fallback``
        without it; ``fallback`` alone for a request without a session id."""
        session_id = session_id_of(pending_request)
        if session_id is None:
            return fallback
        owner = self._session_ring.owner(session_id)
        affine = [r for r in candidate_replicas if r.replica_id.unique_id == owner]
        if not affine:
            return fallback
        rest = [[r for r in tier if r.replica_id.unique_id != owner] for tier in fallback]
        return [affine] + [tier for tier in rest if tier]
