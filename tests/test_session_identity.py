"""Session identity for stock clients: ids from every convention, sessions inferred from
the conversation (PrefixIndex), and the idle timeout rule."""

from __future__ import annotations

import random

import pytest

from mars_ray.actors.api import ChatMessage
from mars_ray.actors.session_identity import (
    MESSAGE_END,
    IdentityError,
    answer_bytes,
    chat_bytes,
    completion_bytes,
    resolve_identity,
)
from mars_ray.conversation_index import ContinuationKey, PrefixIndex
from mars_ray.session import IdleTimeout


def msgs(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=text) for role, text in pairs]  # type: ignore[arg-type]


# -- identity ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("headers", "body_sid", "extra", "expected"),
    [
        ({"x-session-id": "a"}, None, {}, ("a", "header x-session-id")),
        ({}, "b", {}, ("b", "body session_id")),
        ({"x-session-id": "a"}, "a", {}, ("a", "header x-session-id")),
        ({}, None, {"prompt_cache_key": "c"}, ("c", "body prompt_cache_key")),
        (
            {},
            None,
            {"nvext": {"agent_context": {"session_id": "d"}}},
            ("d", "body nvext.agent_context.session_id"),
        ),
        ({"x-dynamo-session-id": "e"}, None, {}, ("e", "header x-dynamo-session-id")),
        (
            {"x-claude-code-session-id": "root", "x-claude-code-agent-id": "sub"},
            None,
            {},
            ("sub", "header x-claude-code-agent-id"),
        ),
        ({"x-claude-code-session-id": "f"}, None, {}, ("f", "header x-claude-code-session-id")),
        ({"session-id": "g"}, None, {}, ("g", "header session-id")),
        # an explicit id beats an agent's cache key
        ({}, "h", {"prompt_cache_key": "other"}, ("h", "body session_id")),
        ({}, None, {}, (None, None)),
        ({"x-session-id": "  "}, None, {}, (None, None)),
    ],
)
def test_session_id_comes_from_every_convention_in_order(
    headers: dict[str, str],
    body_sid: str | None,
    extra: dict[str, object],
    expected: tuple[str | None, str | None],
) -> None:
    identity = resolve_identity(headers, body_sid, extra)
    assert (identity.session_id, identity.source) == expected


def test_configured_headers_are_read_last() -> None:
    identity = resolve_identity({"x-my-agent": "m"}, None, {}, ("X-My-Agent",))
    assert (identity.session_id, identity.source) == ("m", "header x-my-agent")
    assert resolve_identity({"x-my-agent": "m"}, None, {}).session_id is None


def test_conflicting_explicit_ids_are_refused_naming_both() -> None:
    with pytest.raises(IdentityError, match="header x-session-id is 'a' but body session_id"):
        resolve_identity({"x-session-id": "a"}, "b", {})


@pytest.mark.parametrize("bad", ["x" * 129, "a\x00b", 7])
def test_malformed_ids_are_refused(bad: object) -> None:
    with pytest.raises(IdentityError, match="prompt_cache_key"):
        resolve_identity({}, None, {"prompt_cache_key": bad})


def test_dynamo_final_flag_marks_the_last_turn() -> None:
    assert resolve_identity({"x-dynamo-session-final": "true"}, "s", {}).last_turn
    final = {"nvext": {"agent_context": {"session_id": "s", "session_final": True}}}
    assert resolve_identity({}, None, final).last_turn
    assert not resolve_identity({}, "s", {}).last_turn


# -- canonical forms --------------------------------------------------------------------
def test_a_continuation_extends_its_predecessor_in_canonical_form() -> None:
    first = msgs(("system", "You are an agent."), ("user", "fix the bug"))
    answer = " t1 t2 t3"
    registered = chat_bytes(first) + answer_bytes("chat", answer, [])
    # the client echoes the answer stripped and with extra fields; then the tool output
    echoed = [*first, ChatMessage(role="assistant", content=answer.strip(), refusal=None)]
    second = chat_bytes([*echoed, ChatMessage(role="user", content="ran: ok")])
    assert second.startswith(registered) and len(second) > len(registered)
    parts = [*first, ChatMessage(role="assistant", content=[{"type": "text", "text": answer}])]
    assert chat_bytes(parts) == registered
    # the same words with a different role split do not match
    other = msgs(("system", "You are an agent.fix the bug"))
    assert not chat_bytes(other).startswith(chat_bytes(first)[: len(chat_bytes(other))])


def test_completion_prompts_extend_as_text_or_ids() -> None:
    assert completion_bytes("abc def").startswith(completion_bytes("abc"))
    ids = completion_bytes([1, 2]) + answer_bytes("ids", "", [3])
    assert completion_bytes([1, 2, 3, 4]).startswith(ids)
    assert not completion_bytes([1, 2, 3]).startswith(completion_bytes("abc"))


# -- the index --------------------------------------------------------------------------
def test_index_finds_the_longest_registered_prefix_and_consumes_it() -> None:
    index = PrefixIndex()
    base = b"S" * 100
    index.register("a", ContinuationKey.of(base + b"-a1"))
    index.register("b", ContinuationKey.of(base + b"-a1-b2"))  # same system prompt, longer
    assert index.find(base + b"-a1-b2-more") == "b"
    assert index.find(base + b"-a1-x") == "a"
    assert index.find(base + b"-a1") is None, "a continuation must add something"
    assert index.find(base + b"-zz") is None
    taken = index.take(base + b"-a1-x")
    assert taken is not None and taken[0] == "a"
    assert index.find(base + b"-a1-x") is None, "consumed: no second continuation"
    index.register("a", *taken[1])  # an abandoned claim is put back
    assert index.find(base + b"-a1-x") == "a"


def test_identical_conversations_are_still_two_sessions() -> None:
    index = PrefixIndex()
    key = ContinuationKey.of(b"same prompt and same answer" * 4)
    index.register("a", key)
    index.register("b", key)
    prompt = b"same prompt and same answer" * 4 + b" next"
    first, second = index.take(prompt), index.take(prompt)
    assert first is not None and second is not None
    assert {first[0], second[0]} == {"a", "b"}
    assert index.take(prompt) is None


def test_an_agent_that_drops_its_answer_still_continues_its_session() -> None:
    """mini-swe-agent keeps no answer it could not parse: its next prompt is the last
    prompt plus a format-error message. The prompt-only key catches it; an agent that
    echoes the answer matches the longer key first."""
    index = PrefixIndex()
    prompt = b"system + task " * 10
    index.register("a", ContinuationKey.of(prompt + b"answer"), ContinuationKey.of(prompt))
    index.register("b", ContinuationKey.of(b"other" * 20))
    assert index.find(prompt + b"format error") == "a"
    assert index.find(prompt + b"answer + tool output") == "a"
    taken = index.take(prompt + b"format error")
    assert taken is not None and len(taken[1]) == 2
    assert index.find(prompt + b"answer + tool output") is None, "both keys consumed"


def test_a_session_holds_its_latest_keys_and_memory_is_bounded() -> None:
    index = PrefixIndex(max_entries=3)
    index.register("a", ContinuationKey.of(b"x" * 80 + b"1"))
    index.register("a", ContinuationKey.of(b"x" * 80 + b"12"))  # its next turn replaces it
    assert len(index) == 1 and len(index.keys_of("a")) == 1
    for name in "bcd":
        index.register(name, ContinuationKey.of(name.encode() * 90))
    assert len(index) == 3 and index.keys_of("a") == (), "the oldest session went first"
    for name in "bcd":
        index.forget(name)
    assert len(index) == 0 and not index._buckets


def test_index_agrees_with_a_brute_force_prefix_search() -> None:
    rng = random.Random(7)
    index = PrefixIndex()
    keys: dict[str, bytes] = {}
    for i in range(300):
        head = b"P" * rng.choice([4, 60, 64])  # short keys (their own bucket) and long ones
        data = head + bytes(rng.choice(b"ab") for _ in range(rng.randint(0, 12)))
        keys[f"s{i}"] = data
        index.register(f"s{i}", ContinuationKey.of(data))
    for _ in range(200):
        head = b"P" * rng.choice([4, 62, 64, 70])
        prompt = head + bytes(rng.choice(b"ab") for _ in range(rng.randint(0, 14)))
        found = index.find(prompt)
        best = max(
            (len(d) for d in keys.values() if len(d) < len(prompt) and prompt.startswith(d)),
            default=None,
        )
        if best is None:
            assert found is None
        else:
            assert found is not None and len(keys[found]) == best and prompt.startswith(keys[found])


# -- idle timeout -----------------------------------------------------------------------
def test_idle_timeout_grows_with_the_sessions_own_tools_up_to_a_cap() -> None:
    rule = IdleTimeout(base_s=600, max_s=2400, unconfirmed_s=120)
    assert rule.timeout_s(longest_tool_s=10) == 600
    assert rule.timeout_s(longest_tool_s=300) == 900  # 3x its longest tool
    assert rule.timeout_s(longest_tool_s=5000) == 2400
    assert rule.timeout_s(longest_tool_s=300, confirmed=False) == 120
    assert rule.expired(601, 10) and not rule.expired(599, 10)


def test_idle_timeout_is_validated() -> None:
    with pytest.raises(ValueError, match="base_s"):
        IdleTimeout(base_s=100, max_s=50, unconfirmed_s=10)
    with pytest.raises(ValueError, match="unconfirmed_s"):
        IdleTimeout(base_s=100, max_s=200, unconfirmed_s=0)


def test_chat_lookups_try_only_message_ends_and_agree_with_the_full_search() -> None:
    """Chat keys end at a message's end, so a chat lookup tries the prompt's message ends
    only (its cost does not grow with the live sessions) and finds what the search over
    every registered length finds."""
    rng = random.Random(11)
    system = ("system", "You are a coding agent. " * 5)  # shared by every agent
    index = PrefixIndex()
    conversations: dict[str, list[tuple[str, str]]] = {}
    for i in range(200):
        conv = [system, ("user", f"task {rng.randint(0, 40)}")]
        for _ in range(rng.randint(0, 3)):
            conv += [("assistant", f"t{rng.randint(0, 3)}"), ("user", "ok")]
        conversations[f"s{i}"] = conv
        prompt = chat_bytes(msgs(*conv))
        answer = answer_bytes("chat", f"t{rng.randint(0, 3)}", [])
        index.register(f"s{i}", ContinuationKey.of(prompt + answer), ContinuationKey.of(prompt))
    for conv in list(conversations.values())[:100]:
        follow = [*conv, ("assistant", f"t{rng.randint(0, 3)}"), ("user", "output")]
        prompt = chat_bytes(msgs(*follow))
        assert index.find(prompt, MESSAGE_END) == index.find(prompt)


@pytest.mark.parametrize("num_prompt_bytes", [3, 60, 64, 200])
def test_a_turns_keys_hash_the_prompt_once_and_equal_the_plain_keys(num_prompt_bytes: int) -> None:
    prompt, answer = b"p" * num_prompt_bytes, b"answer!"
    assert ContinuationKey.turn(prompt, answer) == (
        ContinuationKey.of(prompt + answer),
        ContinuationKey.of(prompt),
    )


def test_the_inference_benchmark_recognises_every_continuation() -> None:
    """``mars-ray perf sessions`` at a small size: each timed agent is found (its figures
    are printed by the command, never asserted)."""
    from mars_ray.perf_sessions import measure_inference

    cost = measure_inference(num_live_sessions=50, num_turns=3, tool_bytes=100, num_requests=10)
    assert cost.num_recognised == cost.num_requests == 10
