"""Session hints carried in ``SamplingParams.extra_args`` (DESIGN section 10).

An agent client marks each LLM call with the session it belongs to::

    SamplingParams(max_tokens=256, extra_args={"mars": {
        "session_id": "s-17", "turn_index": 3, "last_turn": False, "expected_tool_s": 1.5}})

Through vLLM's OpenAI server the same dict travels in the request body's
``vllm_xargs`` field. Every key is optional except ``session_id`` when the
``"mars"`` dict is present; a request without hints is a session of one turn
(scheduled as plain vLLM would schedule it). Malformed hints raise
:class:`HintError` with a one-line message naming the key and what is accepted.

This module imports nothing from vLLM: it validates plain dicts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mars_ray.errors import MarsError

#: the key in ``SamplingParams.extra_args`` that holds the hints
HINTS_KEY = "mars"


class HintError(MarsError, ValueError):
    """Session hints in ``extra_args`` are malformed."""


@dataclass(frozen=True, slots=True)
class SessionHints:
    """What the scheduler knows about the session a request (turn) belongs to.

    ``expected_tool_s`` is the client's estimate of the tool call that follows
    this turn (0: unknown or none); it feeds the retention decision at turn end.
    """

    session_id: str
    turn_index: int = 0
    last_turn: bool = True
    expected_tool_s: float = 0.0

    @property
    def is_continuation(self) -> bool:
        return self.turn_index > 0

    def to_extra_args(self) -> dict[str, dict[str, Any]]:
        """The ``extra_args`` dict that carries these hints."""
        return {
            HINTS_KEY: {
                "session_id": self.session_id,
                "turn_index": self.turn_index,
                "last_turn": self.last_turn,
                "expected_tool_s": self.expected_tool_s,
            }
        }


_ACCEPTED = (
    "session_id (str), turn_index (int >= 0), last_turn (bool), expected_tool_s (float >= 0)"
)


def one_turn_session(request_id: str) -> SessionHints:
    """Hints of a request that carries none: its own session of one turn."""
    return SessionHints(session_id=request_id)


def parse_hints(extra_args: Mapping[str, Any] | None, request_id: str) -> SessionHints:
    """Validated hints of a request, or a one-turn session when it carries none.

    Raises :class:`HintError` for a non-dict ``"mars"`` value, unknown keys,
    wrong types (``bool`` is not accepted as a number), negative or non-finite
    values, and an empty ``session_id``.
    """
    if not extra_args or HINTS_KEY not in extra_args:
        return one_turn_session(request_id)
    raw = extra_args[HINTS_KEY]
    if not isinstance(raw, Mapping):
        raise HintError(
            f"extra_args[{HINTS_KEY!r}] must be a dict of {_ACCEPTED}; got {type(raw).__name__}"
        )
    unknown = sorted(set(raw) - {"session_id", "turn_index", "last_turn", "expected_tool_s"})
    if unknown:
        raise HintError(f"unknown session hint key(s) {unknown}; accepted: {_ACCEPTED}")
    return SessionHints(
        session_id=_session_id(raw.get("session_id")),
        turn_index=_turn_index(raw.get("turn_index", 0)),
        last_turn=_last_turn(raw.get("last_turn", True)),
        expected_tool_s=_expected_tool_s(raw.get("expected_tool_s", 0.0)),
    )


def _session_id(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise HintError(f"session hint 'session_id' must be a non-empty str, got {value!r}")
    return value


def _turn_index(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HintError(f"session hint 'turn_index' must be an int >= 0, got {value!r}")
    if value < 0:
        raise HintError(f"session hint 'turn_index' must be >= 0, got {value}")
    return value


def _last_turn(value: Any) -> bool:
    if not isinstance(value, bool):
        raise HintError(f"session hint 'last_turn' must be a bool, got {value!r}")
    return value


def _expected_tool_s(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HintError(f"session hint 'expected_tool_s' must be a number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise HintError(f"session hint 'expected_tool_s' must be finite and >= 0, got {value}")
    return float(value)
