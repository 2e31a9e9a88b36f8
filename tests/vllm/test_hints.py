"""Session hints in ``SamplingParams.extra_args``: parsing and rejection of bad input."""

from __future__ import annotations

import math
import random

import pytest

from mars_ray.vllm.hints import HintError, SessionHints, carries_hints, parse_hints


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


def test_service_tokens_from_a_global_scheduler_round_trip() -> None:
    hints = SessionHints("s-1", 2, False, 1.0, service_tokens=12_345)
    assert parse_hints(hints.to_extra_args(), "r") == hints
    flat = {"mars_session_id": "s-1", "mars_service_tokens": 7}
    assert parse_hints(flat, "r").service_tokens == 7
    assert parse_hints({"mars": {"session_id": "s"}}, "r").service_tokens is None
    assert "service_tokens" not in SessionHints("s").to_extra_args()["mars"]


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
        ({"session_id": "s", "service_tokens": -1}, "'service_tokens' must be an int >= 0"),
        ({"session_id": "s", "service_tokens": 1.5}, "'service_tokens' must be an int >= 0"),
        ({"session_id": "s", "service_tokens": True}, "'service_tokens' must be an int >= 0"),
    ],
)
def test_malformed_hints_are_rejected_with_a_clear_message(raw: object, message: str) -> None:
    with pytest.raises(HintError) as info:
        parse_hints({"mars": raw}, "r")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_flat_vllm_xargs_keys_round_trip() -> None:
    """The OpenAI server's ``vllm_xargs`` holds no nested dict, and pydantic turns a
    JSON boolean into 0 / 1 there: the flat form takes both."""
    xargs = {
        "mars_session_id": "s-1",
        "mars_turn_index": 3,
        "mars_last_turn": 0,
        "mars_expected_tool_s": 1.5,
        "kv_transfer_params": "not ours",
    }
    assert parse_hints(xargs, "r") == SessionHints("s-1", 3, False, 1.5)
    assert parse_hints({"mars_session_id": "s", "mars_last_turn": True}, "r").last_turn
    assert parse_hints({"mars_session_id": "s"}, "r") == SessionHints("s")
    assert carries_hints(xargs) and carries_hints({"mars": {}})
    assert not carries_hints({"kv_transfer_params": {}}) and not carries_hints(None)


@pytest.mark.parametrize(
    ("xargs", "message"),
    [
        ({"mars_session_id": "s", "mars_turn": 1}, "unknown session hint key(s) ['mars_turn']"),
        ({"mars_turn_index": 1}, "'mars_session_id' must be a non-empty str"),
        ({"mars_session_id": "s", "mars_turn_index": -2}, "'mars_turn_index' must be >= 0"),
        ({"mars_session_id": "s", "mars_last_turn": 2}, "'mars_last_turn' must be a bool"),
        ({"mars_session_id": "s", "mars_last_turn": "no"}, "'mars_last_turn' must be a bool"),
        ({"mars_session_id": "s", "mars_expected_tool_s": -1}, "'mars_expected_tool_s' must"),
        ({"mars_session_id": "s", "mars_expected_tool_s": 10**400}, "finite"),
        ({"mars_session_id": "s", "mars": {"session_id": "s"}}, "not both"),
    ],
)
def test_malformed_flat_hints_name_the_key(xargs: dict[str, object], message: str) -> None:
    with pytest.raises(HintError) as info:
        parse_hints(xargs, "r")
    assert message in str(info.value)


def test_any_garbage_raises_hint_error_or_nothing() -> None:
    """The engine catches only HintError: nothing else may escape, whatever comes in."""
    rng = random.Random(11)
    values: list[object] = [
        None,
        True,
        0,
        -1,
        2**70,
        1.5,
        -0.5,
        math.nan,
        math.inf,
        "",
        "s",
        [],
        [1, "a"],
        {},
        {1: 2},
        {"session_id": "s"},
        object(),
    ]
    keys: list[object] = [
        "mars",
        "mars_session_id",
        "mars_turn_index",
        "mars_last_turn",
        "mars_expected_tool_s",
        "mars_x",
        "session_id",
        "other",
        7,
        None,
    ]
    for _ in range(3000):
        extra = {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(0, 4))}
        if rng.random() < 0.5:
            inner = {rng.choice([*keys, "turn_index", "last_turn"]): rng.choice(values)}
            extra["mars"] = inner
        try:
            parse_hints(extra, "r")  # type: ignore[arg-type]
        except HintError as exc:
            assert "\n" not in str(exc)
    for not_a_dict in ([("mars", {})], "mars", 3):
        with pytest.raises(HintError):
            parse_hints(not_a_dict, "r")  # type: ignore[arg-type]
