"""Session hints carried in ``SamplingParams.extra_args`` (docs/design.md §10.2).

An agent client marks each LLM call with the session it belongs to::

    SamplingParams(max_tokens=256, extra_args={"mars": {
        "session_id": "s-17", "turn_index": 3, "last_turn": False, "expected_tool_s": 1.5}})

vLLM's OpenAI server takes ``extra_args`` from the body's ``vllm_xargs``, whose
values may only be strings, numbers or lists of them (no nested dict; a JSON
boolean arrives as 0 or 1), so over HTTP the hints are flat ``mars_*`` keys::

    {"vllm_xargs": {"mars_session_id": "s-17", "mars_turn_index": 3,
                    "mars_last_turn": false, "mars_expected_tool_s": 1.5}}

(``mars_last_turn`` also accepts 0 / 1). ``service_tokens`` (int >= 0) is what a
global scheduler knows and an engine does not: the tokens the session was already
served on every GPU (the global MLFQ's attained service); without it the engine
counts only what it served itself. Every key is optional except the session
id once any hint is given; a request without hints is a session of one turn
(scheduled as plain vLLM would schedule it). Malformed hints raise
:class:`HintError` with a one-line message naming the key and what is accepted;
:mod:`mars_ray.vllm.validation` turns that into an HTTP 400 at the API.

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
#: prefix of the flat hint keys (``vllm_xargs`` of the OpenAI server)
FLAT_PREFIX = "mars_"
_NAMES = ("session_id", "turn_index", "last_turn", "expected_tool_s", "service_tokens")


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
    service_tokens: int | None = None  # attained service across GPUs (global scheduler)

    @property
    def is_continuation(self) -> bool:
        return self.turn_index > 0

    def to_extra_args(self) -> dict[str, dict[str, Any]]:
        """The ``extra_args`` dict that carries these hints."""
        hints: dict[str, Any] = {
            "session_id": self.session_id,
            "turn_index": self.turn_index,
            "last_turn": self.last_turn,
            "expected_tool_s": self.expected_tool_s,
        }
        if self.service_tokens is not None:
            hints["service_tokens"] = self.service_tokens
        return {HINTS_KEY: hints}


_ACCEPTED = (
    "session_id (str), turn_index (int >= 0), last_turn (bool), expected_tool_s (float >= 0), "
    "service_tokens (int >= 0)"
)
_ACCEPTED_FLAT = (
    f"{FLAT_PREFIX}session_id (str), {FLAT_PREFIX}turn_index (int >= 0), "
    f"{FLAT_PREFIX}last_turn (bool or 0/1), {FLAT_PREFIX}expected_tool_s (float >= 0), "
    f"{FLAT_PREFIX}service_tokens (int >= 0)"
)


def one_turn_session(request_id: str) -> SessionHints:
    """Hints of a request that carries none: its own session of one turn."""
    return SessionHints(session_id=request_id)


def carries_hints(extra_args: Mapping[str, Any] | None) -> bool:
    """Whether ``extra_args`` holds any session hint (valid or not)."""
    if not extra_args or not isinstance(extra_args, Mapping):
        return False
    return HINTS_KEY in extra_args or any(_is_flat(key) for key in extra_args)


def parse_hints(extra_args: Mapping[str, Any] | None, request_id: str) -> SessionHints:
    """Validated hints of a request, or a one-turn session when it carries none.

    Hints come as the ``"mars"`` dict or as flat ``mars_*`` keys, not both. Raises
    :class:`HintError` for a non-dict ``"mars"`` value, unknown keys, wrong types
    (``bool`` is not accepted as a number), negative or non-finite values, and a
    missing or empty session id. Other keys of ``extra_args`` are not ours and pass.
    """
    if not extra_args:
        return one_turn_session(request_id)
    if not isinstance(extra_args, Mapping):
        raise HintError(f"extra_args must be a dict, got {type(extra_args).__name__}")
    flat = {key[len(FLAT_PREFIX) :]: v for key, v in extra_args.items() if _is_flat(key)}
    if HINTS_KEY in extra_args:
        if flat:
            raise HintError(
                f"session hints come either as extra_args[{HINTS_KEY!r}] or as flat "
                f"{FLAT_PREFIX}* keys, not both"
            )
        return _from_dict(extra_args[HINTS_KEY])
    if flat:
        return _from_flat(flat)
    return one_turn_session(request_id)


def _is_flat(key: object) -> bool:
    return isinstance(key, str) and key.startswith(FLAT_PREFIX)


def _from_dict(raw: Any) -> SessionHints:
    if not isinstance(raw, Mapping):
        raise HintError(
            f"extra_args[{HINTS_KEY!r}] must be a dict of {_ACCEPTED}; got {type(raw).__name__}"
        )
    unknown = sorted(set(raw) - set(_NAMES), key=str)
    if unknown:
        raise HintError(f"unknown session hint key(s) {unknown}; accepted: {_ACCEPTED}")
    return SessionHints(
        session_id=_session_id(raw.get("session_id")),
        turn_index=_turn_index(raw.get("turn_index", 0)),
        last_turn=_last_turn(raw.get("last_turn", True)),
        expected_tool_s=_expected_tool_s(raw.get("expected_tool_s", 0.0)),
        service_tokens=_service_tokens(raw.get("service_tokens")),
    )


def _from_flat(raw: Mapping[str, Any]) -> SessionHints:
    """Hints from ``vllm_xargs`` keys (prefix stripped); ``last_turn`` may be 0 / 1."""
    unknown = sorted(FLAT_PREFIX + name for name in set(raw) - set(_NAMES))
    if unknown:
        raise HintError(f"unknown session hint key(s) {unknown}; accepted: {_ACCEPTED_FLAT}")
    last_turn = raw.get("last_turn", True)
    if type(last_turn) is int and last_turn in (0, 1):  # a JSON boolean, after pydantic
        last_turn = bool(last_turn)
    return SessionHints(
        session_id=_session_id(raw.get("session_id"), FLAT_PREFIX),
        turn_index=_turn_index(raw.get("turn_index", 0), FLAT_PREFIX),
        last_turn=_last_turn(last_turn, FLAT_PREFIX),
        expected_tool_s=_expected_tool_s(raw.get("expected_tool_s", 0.0), FLAT_PREFIX),
        service_tokens=_service_tokens(raw.get("service_tokens"), FLAT_PREFIX),
    )


def _session_id(value: Any, prefix: str = "") -> str:
    if not isinstance(value, str) or not value:
        raise HintError(f"session hint '{prefix}session_id' must be a non-empty str, got {value!r}")
    return value


def _turn_index(value: Any, prefix: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HintError(f"session hint '{prefix}turn_index' must be an int >= 0, got {value!r}")
    if value < 0:
        raise HintError(f"session hint '{prefix}turn_index' must be >= 0, got {value}")
    return value


def _service_tokens(value: Any, prefix: str = "") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HintError(f"session hint '{prefix}service_tokens' must be an int >= 0, got {value!r}")
    return value


def _last_turn(value: Any, prefix: str = "") -> bool:
    if not isinstance(value, bool):
        raise HintError(f"session hint '{prefix}last_turn' must be a bool, got {value!r}")
    return value


def _expected_tool_s(value: Any, prefix: str = "") -> float:
    name = f"{prefix}expected_tool_s"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HintError(f"session hint '{name}' must be a number >= 0, got {value!r}")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond float range
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise HintError(f"session hint '{name}' must be finite and >= 0, got {value}")
    return seconds
