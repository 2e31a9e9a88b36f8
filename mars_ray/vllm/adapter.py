"""Adapters between vLLM's ``Request`` / ``RequestQueue`` and the MARS policy core.

* :class:`RequestView` presents a vLLM ``Request`` as a
  :class:`~mars_ray.policies.base.SchedulableRequest` (hints read once, at arrival).
* :class:`PolicyRequestQueue` is a vLLM ``RequestQueue`` backed by a policy's
  :class:`~mars_ray.policies.base.WaitingQueue`, so vLLM's own ``schedule()`` pops
  waiting requests in MARS order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.request import Request

from mars_ray.policies.base import WaitingQueue
from mars_ray.vllm.hints import (
    HintError,
    SessionHints,
    carries_hints,
    one_turn_session,
    parse_hints,
)

logger = logging.getLogger(__name__)


def hints_of(request: Request) -> tuple[SessionHints, bool]:
    """The request's session hints and whether the client gave any.

    Malformed hints degrade to a one-turn session (``hinted`` False).
    The API rejects malformed hints (:mod:`mars_ray.vllm.validation`); a request
    that reaches the engine core another way must not crash it, so this logs instead.
    """
    params = request.sampling_params
    extra = params.extra_args if params is not None else None
    try:
        hints = parse_hints(extra, request.request_id)
    except HintError as exc:
        logger.warning("request %s: ignoring session hints: %s", request.request_id, exc)
        return one_turn_session(request.request_id), False
    return hints, carries_hints(extra)


class RequestView:
    """A vLLM ``Request`` as the policy core sees it (``SchedulableRequest``)."""

    __slots__ = (
        "block_size",
        "hinted",
        "hints",
        "num_rewound_tokens",
        "policy_state",
        "request",
        "session_arrival_s",
        "session_context_tokens",
        "session_service_s",
        "session_service_tokens",
    )

    def __init__(
        self,
        request: Request,
        hints: SessionHints,
        hinted: bool,
        block_size: int,
        session_service_tokens: int,
        session_arrival_s: float | None = None,
        session_context_tokens: int = 0,
    ) -> None:
        self.request = request
        # What this engine saw of the session: when its first turn arrived here and
        # how much of its context earlier turns computed here (0: unknown).
        self.session_arrival_s = (
            request.arrival_time if session_arrival_s is None else session_arrival_s
        )
        self.session_context_tokens = min(session_context_tokens, request.num_prompt_tokens)
        self.hints = hints
        self.hinted = hinted  # False: no (valid) hints, a plain one-turn request
        self.block_size = block_size
        self.session_service_tokens = session_service_tokens
        self.session_service_s = 0.0
        self.policy_state: Any = None
        # vLLM advances num_computed_tokens inside schedule(); the policy's feedback
        # (on_scheduled) wants the count the step started from. The scheduler sets
        # this to the step's tokens around that call: a rewind in place, cheaper than
        # a snapshot per request per step. 0 at all other times.
        self.num_rewound_tokens = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def session_id(self) -> str:
        return self.hints.session_id

    @property
    def turn_index(self) -> int:
        return self.hints.turn_index

    @property
    def arrival_s(self) -> float:
        return self.request.arrival_time

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return self.request.num_tokens

    @property
    def num_computed_tokens(self) -> int:
        return self.request.num_computed_tokens - self.num_rewound_tokens

    @property
    def num_output_tokens(self) -> int:
        return self.request.num_output_tokens

    @property
    def num_blocks(self) -> int:
        """Blocks covering the computed tokens (prefix-cache hits included)."""
        return -(-self.num_computed_tokens // self.block_size)

    @property
    def is_prefilling(self) -> bool:
        """More than one token left to compute (a decode step computes one)."""
        return self.request.num_tokens - self.num_computed_tokens > 1


class PolicyRequestQueue(RequestQueue):
    """vLLM's ``RequestQueue`` interface over a MARS ``WaitingQueue``.

    ``views`` maps request ids to their :class:`RequestView` (owned by the
    scheduler); ``now_s`` is the scheduler's clock.
    """

    def __init__(
        self, queue: WaitingQueue, views: dict[str, RequestView], now_s: Callable[[], float]
    ) -> None:
        self._queue = queue
        self._views = views
        self._now_s = now_s
        # vLLM removes finished requests from both of its waiting queues, so
        # removal must tolerate absent requests; the policy queues do not.
        self._members: set[str] = set()

    def add_request(self, request: Request) -> None:
        self._queue.add(self._views[request.request_id], self._now_s())
        self._members.add(request.request_id)

    def pop_request(self) -> Request:
        request: Request = self._queue.pop().request  # type: ignore[attr-defined]
        self._members.discard(request.request_id)
        return request

    def peek_request(self) -> Request:
        head = self._queue.peek()
        if head is None:
            raise IndexError("peek from an empty queue")
        return head.request  # type: ignore[attr-defined]

    def prepend_request(self, request: Request) -> None:
        self._queue.prepend(self._views[request.request_id], self._now_s())
        self._members.add(request.request_id)

    def prepend_requests(self, requests: RequestQueue) -> None:
        """Each to the front in turn, as vLLM's FCFS queue does (``extendleft``)."""
        for request in list(requests):
            self.prepend_request(request)

    def remove_request(self, request: Request) -> None:
        if request.request_id in self._members:
            self._members.discard(request.request_id)
            self._queue.remove(self._views[request.request_id])

    def remove_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.remove_request(request)

    def refresh(self) -> None:
        """Apply the policy's time-driven changes (aging) before a scheduling pass."""
        self._queue.refresh(self._now_s())

    def __bool__(self) -> bool:
        return len(self._queue) > 0

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return (view.request for view in self._queue)  # type: ignore[attr-defined]
