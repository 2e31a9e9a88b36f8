"""KV held for sessions in a tool call, written once for every engine adapter.

MARS (and Continuum) *pin* a finished turn's KV: its blocks stay out of the free queue
until the session's next turn takes them or a time-to-live runs out. The simulated
engine (block ids) and the vLLM scheduler (vLLM's block objects) keep the same table:
a pin per session, and an expiry heap with lazy deletion (a replaced or released pin
leaves its heap entry behind; entries whose pin is gone or newer are skipped).

:func:`turn_end_context` is the one builder of what a retention policy weighs when a
turn ends (docs/design.md §4.5).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from mars_ray.engine.costmodel import CostModel
from mars_ray.policies.base import TurnEndContext

B = TypeVar("B")


@dataclass(slots=True)
class Pin(Generic[B]):
    """A session's pinned KV: its blocks in prefix order, held until ``expires_s``."""

    blocks: list[B]
    expires_s: float


class PinTable(Generic[B]):
    """Pins by session. ``release`` gives a pin's blocks back to the engine's pool."""

    def __init__(self, release: Callable[[list[B]], None]) -> None:
        self._release = release
        self._pins: dict[str, Pin[B]] = {}
        self._expiries: list[tuple[float, str]] = []  # lazy: may hold stale entries
        self.num_blocks = 0  # blocks pinned now

    def __len__(self) -> int:
        return len(self._pins)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._pins

    def __bool__(self) -> bool:
        return bool(self._pins)

    def sessions(self) -> frozenset[str]:
        return frozenset(self._pins)

    def held(self) -> Iterator[list[B]]:
        """Every pin's blocks (for the pool's invariant checks)."""
        return (pin.blocks for pin in self._pins.values())

    def pin(self, session_id: str, blocks: list[B], expires_s: float) -> None:
        """Hold ``blocks`` for the session until ``expires_s`` (its earlier pin, if
        any, is released first)."""
        self.unpin(session_id)
        self._pins[session_id] = Pin(blocks, expires_s)
        self.num_blocks += len(blocks)
        heapq.heappush(self._expiries, (expires_s, session_id))

    def unpin(self, session_id: str) -> bool:
        """Release the session's pin, if it has one; returns whether it had."""
        pin = self._pins.pop(session_id, None)
        if pin is None:
            return False
        self.num_blocks -= len(pin.blocks)
        self._release(pin.blocks)
        return True

    def expire(self, now_s: float) -> int:
        """Release every pin whose time is up; returns how many."""
        expiries, num_expired = self._expiries, 0
        while expiries and expiries[0][0] <= now_s:
            expires_s, session_id = heapq.heappop(expiries)
            pin = self._pins.get(session_id)
            if pin is not None and pin.expires_s == expires_s and self.unpin(session_id):
                num_expired += 1
        return num_expired

    def next_expiry_s(self) -> float | None:
        """When the earliest live pin expires (stale heap entries are dropped)."""
        expiries = self._expiries
        while expiries:
            expires_s, session_id = expiries[0]
            pin = self._pins.get(session_id)
            if pin is not None and pin.expires_s == expires_s:
                return expires_s
            heapq.heappop(expiries)
        return None

    def earliest_entry_s(self) -> float | None:
        """The heap's earliest entry, stale or not: a bound no later than the next
        expiry, without the clean-up (the simulator's step planning reads it)."""
        return self._expiries[0][0] if self._expiries else None

    def release_all(self) -> None:
        for session_id in list(self._pins):
            self.unpin(session_id)


def turn_end_context(
    cost: CostModel,
    *,
    session_id: str,
    num_blocks: int,
    context_tokens: int,
    predicted_tool_s: float,
    num_total_blocks: int,
    num_used_blocks: int,
    chunk_budget_tokens: int,
    can_offload: bool,
    is_last_turn: bool,
) -> TurnEndContext:
    """What a retention policy weighs for a finished turn's KV: re-prefilling the
    context later (chunked at the engine's own budget) against holding its blocks."""
    return TurnEndContext(
        session_id=session_id,
        num_blocks=num_blocks,
        context_tokens=context_tokens,
        predicted_tool_s=predicted_tool_s,
        recompute_s=cost.prefill_time_s(context_tokens, 0, chunk_budget_tokens),
        reload_s=cost.swap_time_s(context_tokens),
        num_total_blocks=num_total_blocks,
        num_used_blocks=num_used_blocks,
        can_offload=can_offload,
        is_last_turn=is_last_turn,
    )
