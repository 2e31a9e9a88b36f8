"""Which engine serves a turn: KV-affine global placement, or Ray Serve's power of two."""

from __future__ import annotations

import random
from collections.abc import Sequence
from operator import attrgetter

from mars_ray.policies.base import EngineLoad, PlacementPolicy

_BY_LOAD = attrgetter("load_score", "engine_id")  # ties go to the lowest id


def _least_loaded(engines: Sequence[EngineLoad]) -> EngineLoad:
    return min(engines, key=_BY_LOAD)


class KvAffinePlacement(PlacementPolicy):
    """New sessions go to the least-loaded engine; continuations return to the engine
    holding their KV unless it is overloaded relative to the best one (then the KV is
    re-prefilled elsewhere: a cold cache is cheaper than a long queue)."""

    def __init__(self, overload_factor: float = 2.0, overload_margin: float = 32.0) -> None:
        self._factor = overload_factor
        self._margin = overload_margin

    def place_new(self, session_id: str, engines: Sequence[EngineLoad]) -> int:
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
