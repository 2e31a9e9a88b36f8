"""Which engine serves a turn: KV-affine global placement, a session-affine load-aware
router (what a Ray Serve LLM deployment with session affinity does), or Ray Serve's
power of two; plus the CPU-aware filter and the rebalancing rule of the global
scheduler (docs/design.md §9.2)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from operator import attrgetter

from mars_ray.policies.base import EngineLoad, PlacementPolicy

_BY_LOAD = attrgetter("load_score", "engine_id")  # ties go to the lowest id


def _least_loaded(engines: Sequence[EngineLoad]) -> EngineLoad:
    return min(engines, key=_BY_LOAD)


def cpu_roomy(engines: Sequence[EngineLoad], room_below: float = 1.0) -> list[EngineLoad]:
    """CPU-aware placement's filter (a session's tools run on its GPU's node): the
    engines whose node's tool pool has room (fewer tools in flight than cores,
    ``node_tool_load < room_below``); when no node has room, those of the least
    loaded pool(s). The caller then takes the least-loaded engine among them."""
    roomy = [e for e in engines if e.node_tool_load < room_below]
    if roomy:
        return roomy
    coolest = min(e.node_tool_load for e in engines)
    return [e for e in engines if e.node_tool_load <= coolest]


class KvAffinePlacement(PlacementPolicy):
    """New sessions go to the least-loaded engine; continuations return to the engine
    holding their KV unless it is overloaded relative to the best one (then the KV is
    re-prefilled elsewhere: a cold cache is cheaper than a long queue).

    With ``cpu_aware`` a new session goes to the least-loaded engine among those whose
    node's tool pool has room (:func:`cpu_roomy`)."""

    def __init__(
        self,
        overload_factor: float = 2.0,
        overload_margin: float = 32.0,
        *,
        cpu_aware: bool = False,
    ) -> None:
        self._factor = overload_factor
        self._margin = overload_margin
        self._cpu_aware = cpu_aware

    def place_new(self, session_id: str, engines: Sequence[EngineLoad]) -> int:
        if self._cpu_aware:
            engines = cpu_roomy(engines)
        return _least_loaded(engines).engine_id

    def place_continuation(
        self, session_id: str, last_engine_id: int | None, engines: Sequence[EngineLoad]
    ) -> int:
        best = _least_loaded(engines)
        if last_engine_id is None:
            return best.engine_id
        last = _find(engines, last_engine_id)
        if last is None:  # its engine is gone (failed, removed): place it afresh
            return best.engine_id
        if last.load_score > self._factor * best.load_score + self._margin:
            return best.engine_id
        return last_engine_id


class SessionAffinePlacement(PlacementPolicy):
    """A session-affine, load-aware router (Ray Serve LLM's session-affinity recipe,
    llm-d and Dynamo routing by session and load): a new session goes to the
    least-loaded engine when it arrives, every continuation to the engine that served
    the session before (only a lost engine sends it elsewhere). It never moves a
    session for load: a router does not know where KV is worth moving."""

    def place_new(self, session_id: str, engines: Sequence[EngineLoad]) -> int:
        return _least_loaded(engines).engine_id

    def place_continuation(
        self, session_id: str, last_engine_id: int | None, engines: Sequence[EngineLoad]
    ) -> int:
        if last_engine_id is not None and _find(engines, last_engine_id) is not None:
            return last_engine_id
        return _least_loaded(engines).engine_id


class PowerOfTwoPlacement(PlacementPolicy):
    """Ray Serve's default router: sample two engines, take the shorter queue.
    No session affinity: continuations land wherever the two samples say."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def _choose(self, engines: Sequence[EngineLoad]) -> int:
        if len(engines) == 1:
            return engines[0].engine_id
        a, b = self._rng.sample(range(len(engines)), 2)
        ea, eb = engines[a], engines[b]
        qa, qb = ea.num_running + ea.num_waiting, eb.num_running + eb.num_waiting
        return ea.engine_id if qa <= qb else eb.engine_id

    def place_new(self, session_id: str, engines: Sequence[EngineLoad]) -> int:
        return self._choose(engines)

    def place_continuation(
        self, session_id: str, last_engine_id: int | None, engines: Sequence[EngineLoad]
    ) -> int:
        return self._choose(engines)


def _find(engines: Sequence[EngineLoad], engine_id: int) -> EngineLoad | None:
    """The engine with ``engine_id``; lists may hold only the live engines."""
    if engine_id < len(engines) and engines[engine_id].engine_id == engine_id:
        return engines[engine_id]  # the usual case: every engine, in id order
    return next((e for e in engines if e.engine_id == engine_id), None)


class RebalanceRule:
    """Rebalancing during tool calls (the global scheduler's; a router has no view of
    where KV is or which sessions are between turns).

    An engine is hot when its load score exceeds ``factor`` x the coolest engine's
    score plus ``margin``. Each plan moves at most one session per hot engine (hottest
    first), a session now in a tool call on it (the caller lists them in the order it
    prefers, longest predicted tool first so the KV copy hides behind the tool), to
    the coolest engine not yet chosen in this plan. The thresholds sit below the
    continuation escape of :class:`KvAffinePlacement` (2x + 32): moving early, while
    the tool runs, costs the session nothing when the copy lands before it returns.
    """

    def __init__(self, factor: float = 1.5, margin: float = 16.0) -> None:
        if factor < 1 or margin < 0:
            raise ValueError(f"need factor >= 1 and margin >= 0, got {factor}, {margin}")
        self._factor = factor
        self._margin = margin

    def plan(
        self, engines: Sequence[EngineLoad], in_tool: Mapping[int, Sequence[str]]
    ) -> list[tuple[str, int, int]]:
        """Moves ``(session_id, from engine, to engine)``; ``in_tool`` maps an engine id
        to the sessions in a tool call whose KV it holds."""
        if len(engines) < 2:
            return []
        by_load = sorted(engines, key=_BY_LOAD)
        bar = self._factor * by_load[0].load_score + self._margin
        cool = [e for e in by_load if e.load_score <= bar]
        moves: list[tuple[str, int, int]] = []
        for hot in reversed(by_load):
            if hot.load_score <= bar or not cool:
                break
            candidates = in_tool.get(hot.engine_id, ())
            if not candidates:
                continue
            dest = cool.pop(0)
            moves.append((candidates[0], hot.engine_id, dest.engine_id))
        return moves
