"""Waiting queues: FIFO (vLLM's default) and a leveled priority queue (MLFQ, PLAS).

Both are O(log n) per operation so that a scheduling pass over thousands of
waiting requests only touches the few it schedules.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator

from mars_ray.policies.base import SchedulableRequest, WaitingQueue


class FifoQueue(WaitingQueue):
    """First come, first served; ``prepend`` puts a request back at the head."""

    def __init__(self) -> None:
        self._queue: deque[SchedulableRequest] = deque()

    def add(self, request: SchedulableRequest, now_s: float) -> None:
        self._queue.append(request)

    def prepend(self, request: SchedulableRequest, now_s: float) -> None:
        self._queue.appendleft(request)

    def peek(self) -> SchedulableRequest | None:
        return self._queue[0] if self._queue else None

    def pop(self) -> SchedulableRequest:
        return self._queue.popleft()

    def remove(self, request: SchedulableRequest) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[SchedulableRequest]:
        return iter(list(self._queue))


RankFn = Callable[[SchedulableRequest, float], tuple[int, float]]
"""(level, tie-break) of a request entering the queue at ``now_s``; lower goes first."""
PromoteAtFn = Callable[[SchedulableRequest, float], float | None]
"""When a queued request should next be promoted (None: never)."""
PromoteFn = Callable[[SchedulableRequest, float], None]
"""Raise the request's level (the policy updates its own state); ``rank`` is asked again."""


class LeveledQueue(WaitingQueue):
    """Priority levels (0 first), each a heap ordered by (tie-break, insertion).

    ``prepend`` puts a request at the front of its level. Time-driven promotion
    (aging, anti-starvation) is a heap of deadlines applied by :meth:`refresh`.
    Removed or re-ranked entries are invalidated lazily: each live request maps
    to the token of its one valid heap entry.
    """

    _FRONT = float("-inf")

    def __init__(
        self, num_levels: int, rank: RankFn, promote_at: PromoteAtFn, promote: PromoteFn
    ) -> None:
        self._levels: list[list[tuple[float, int, int, SchedulableRequest]]] = [
            [] for _ in range(num_levels)
        ]
        self._promotions: list[tuple[float, int, SchedulableRequest]] = []
        self._live: dict[str, int] = {}  # request_id -> token of its valid entry
        self._rank, self._promote_at, self._promote = rank, promote_at, promote
        self._tokens = itertools.count()
        self._front_seq = itertools.count(-1, -1)

    def add(self, request: SchedulableRequest, now_s: float) -> None:
        self._push(request, now_s, front=False)

    def prepend(self, request: SchedulableRequest, now_s: float) -> None:
        self._push(request, now_s, front=True)

    def _push(self, request: SchedulableRequest, now_s: float, front: bool) -> None:
        level, tie = self._rank(request, now_s)
        token = next(self._tokens)
        order = next(self._front_seq) if front else token
        self._live[request.request_id] = token
        heapq.heappush(self._levels[level], (self._FRONT if front else tie, order, token, request))
        deadline_s = self._promote_at(request, now_s)
        if deadline_s is not None:
            heapq.heappush(self._promotions, (deadline_s, token, request))

    def refresh(self, now_s: float) -> None:
        promotions = self._promotions
        while promotions and promotions[0][0] <= now_s:
            _, token, request = heapq.heappop(promotions)
            if self._live.get(request.request_id) != token:
                continue  # left the queue or was re-ranked since
            self._promote(request, now_s)
            self._push(request, now_s, front=False)

    def _head_level(self) -> list[tuple[float, int, int, SchedulableRequest]] | None:
        live = self._live
        for heap in self._levels:
            while heap:
                entry = heap[0]
                if live.get(entry[3].request_id) == entry[2]:
                    return heap
                heapq.heappop(heap)  # stale
        return None

    def peek(self) -> SchedulableRequest | None:
        heap = self._head_level()
        return heap[0][3] if heap else None

    def pop(self) -> SchedulableRequest:
        heap = self._head_level()
        if heap is None:
            raise IndexError("pop from an empty queue")
        request = heapq.heappop(heap)[3]
        del self._live[request.request_id]
        return request

    def remove(self, request: SchedulableRequest) -> None:
        del self._live[request.request_id]

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[SchedulableRequest]:
        live = self._live
        ordered = []
        for level, heap in enumerate(self._levels):
            for tie, order, token, request in heap:
                if live.get(request.request_id) == token:
                    ordered.append((level, tie, order, request))
        ordered.sort(key=lambda e: e[:3])
        return iter([e[3] for e in ordered])
