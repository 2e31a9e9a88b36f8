"""Session hints in ``SamplingParams.extra_args``: parsing and rejection of bad input."""

from __future__ import annotations

import math

import pytest

from mars_ray.vllm.hints import HintError, SessionHints, parse_hints


def test_no_hints_is_a_one_turn_session() -> None:
    for extra in (None, {}, {"other": 1}):
        hints = parse_hints(extra, "req-1")
        assert hints == SessionHints(
            session_id="req-1", turn_index=0, last_turn=True, expected_tool_s=0.0
        )


def test_full_hints_round_trip() -> None:
    hints = SessionHints("s-1", turn_index=3, last_turn=False, expected_tool_s=1.5)
    assert parse_hints(hints.to_extra_args(), "req-9") == hints
    assert hints.is_continuation


def test_defaults_for_missing_keys_and_int_tool_time() -> None:
    hints = parse_hints({"mars": {"session_id": "s", "expected_tool_s": 2}}, "r")
    assert hints == SessionHints("s", 0, True, 2.0)
    assert isinstance(hints.expected_tool_s, float)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("s-1", "must be a dict"),
        ({"session_id": "s", "turn": 1}, "unknown session hint key(s) ['turn']"),
        ({}, "'session_id' must be a non-empty str"),
        ({"session_id": ""}, "'session_id' must be a non-empty str"),
        ({"session_id": 5}, "'session_id' must be a non-empty str"),
        ({"session_id": "s", "turn_index": -1}, "'turn_index' must be >= 0"),
        ({"session_id": "s", "turn_index": 1.0}, "'turn_index' must be an int"),
        ({"session_id": "s", "turn_index": True}, "'turn_index' must be an int"),
        ({"session_id": "s", "last_turn": 1}, "'last_turn' must be a bool"),
        ({"session_id": "s", "expected_tool_s": -0.1}, "'expected_tool_s' must be finite and >= 0"),
        ({"session_id": "s", "expected_tool_s": math.inf}, "finite"),
        ({"session_id": "s", "expected_tool_s": "3"}, "'expected_tool_s' must be a number"),
        ({"session_id": "s", "expected_tool_s": False}, "'expected_tool_s' must be a number"),
    ],
)
def test_malformed_hints_are_rejected_with_a_clear_message(raw: object, message: str) -> None:
    with pytest.raises(HintError) as info:
        parse_hints({"mars": raw}, "r")
    assert message in str(info.value)
    assert "\n" not in str(info.value)
