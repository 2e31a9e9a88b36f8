"""``mars-ray perf sessions``: what recognising sessions from the conversation costs
per request, with many sessions live.

Every live session shares one system prompt (the hard case: one fingerprint bucket)
and holds its two keys. Each timed request is one agent's next turn: its whole
conversation resent plus the last answer and a tool's output. Timed per request:

* ``canonical``: the ingress turns the parsed messages into their canonical bytes;
* ``lookup``: the scheduler finds and claims the session (``PrefixIndex.take``);
* ``register``: at the turn's end, the session's two new keys are computed and kept.

Chat lookups try only message ends; a completion prompt (free text) tries every
registered length of its bucket, which does grow with the live sessions: both are
printed. Figures, never assertions.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

from mars_ray.actors.api import ChatMessage
from mars_ray.actors.session_identity import (
    MESSAGE_END,
    answer_bytes,
    chat_bytes,
    completion_bytes,
)
from mars_ray.conversation_index import ContinuationKey, PrefixIndex

SYSTEM_PROMPT = "You are a coding agent working in a repository. " * 40  # ~2 KB


@dataclass(frozen=True, slots=True)
class InferenceCost:
    """Per-request microseconds (median and p99) of each step, and their total."""

    num_live_sessions: int
    num_messages: int
    prompt_kib: float
    canonical_us: tuple[float, float]
    lookup_us: tuple[float, float]
    register_us: tuple[float, float]
    total_us: tuple[float, float]
    completion_lookup_us: tuple[float, float]
    num_recognised: int
    num_requests: int


def _conversation(rng: random.Random, index: int, num_turns: int, tool_bytes: int) -> list:
    messages = [("system", SYSTEM_PROMPT), ("user", f"Fix issue #{index}: tests fail.")]
    for turn in range(num_turns):
        messages.append(("assistant", f"THOUGHT: step {turn}\n```bash\nrun {rng.random()}\n```"))
        messages.append(("user", "output: " + "x" * tool_bytes))
    return messages


def _parsed(pairs: list) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=text) for role, text in pairs]


def median_and_p99(values: list[float], scale: float = 1.0) -> tuple[float, float]:
    """The median and the 99th percentile of ``values`` times ``scale``, rounded."""
    if not values:
        return 0.0, 0.0
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return round(statistics.median(ordered) * scale, 2), round(p99 * scale, 2)


def _stats_us(samples_s: list[float]) -> tuple[float, float]:
    return median_and_p99(samples_s, scale=1e6)


def measure_inference(
    num_live_sessions: int = 10_000,
    num_turns: int = 20,
    tool_bytes: int = 4000,
    num_requests: int = 200,
    seed: int = 0,
) -> InferenceCost:
    """Fill an index with ``num_live_sessions`` sessions, then time ``num_requests``
    continuations (``num_turns`` turns of ``tool_bytes`` tool output each)."""
    rng = random.Random(seed)
    index, texts = PrefixIndex(max_entries=num_live_sessions + num_requests), PrefixIndex()
    answer = answer_bytes("chat", "t1 t2 t3", [])
    for i in range(num_live_sessions):  # background sessions: keys only, of various sizes
        prompt = chat_bytes(_parsed(_conversation(rng, i, rng.randint(1, num_turns), 200)))
        index.register(f"bg-{i}", *ContinuationKey.turn(prompt, answer))
        text = completion_bytes(SYSTEM_PROMPT + f"task {i} " + "y" * rng.randint(0, 20_000))
        texts.register(f"bg-{i}", ContinuationKey.of(text))
    timed = []
    for i in range(num_requests):
        pairs = _conversation(rng, 10**6 + i, num_turns, tool_bytes)
        prompt = chat_bytes(_parsed(pairs))
        index.register(
            f"agent-{i}", ContinuationKey.of(prompt + answer), ContinuationKey.of(prompt)
        )
        follow = [*pairs, ("assistant", "t1 t2 t3"), ("user", "output: " + "z" * tool_bytes)]
        text = completion_bytes(SYSTEM_PROMPT + f"agent {i} " + "y" * 20_000)
        texts.register(f"agent-{i}", ContinuationKey.of(text))
        timed.append((f"agent-{i}", _parsed(follow), text + b" more"))
    canonical, lookup, register, total, completion = [], [], [], [], []
    recognised = 0
    for session_id, messages, text in timed:
        t0 = time.perf_counter()
        prompt = chat_bytes(messages)
        t1 = time.perf_counter()
        taken = index.take(prompt, MESSAGE_END)
        t2 = time.perf_counter()
        index.register(session_id, *ContinuationKey.turn(prompt, answer))
        t3 = time.perf_counter()
        recognised += taken is not None and taken[0] == session_id
        canonical.append(t1 - t0)
        lookup.append(t2 - t1)
        register.append(t3 - t2)
        total.append(t3 - t0)
        t4 = time.perf_counter()
        texts.find(text)
        completion.append(time.perf_counter() - t4)
    return InferenceCost(
        num_live_sessions=num_live_sessions + num_requests,
        num_messages=len(timed[0][1]),
        prompt_kib=round(len(chat_bytes(timed[0][1])) / 1024, 1),
        canonical_us=_stats_us(canonical),
        lookup_us=_stats_us(lookup),
        register_us=_stats_us(register),
        total_us=_stats_us(total),
        completion_lookup_us=_stats_us(completion),
        num_recognised=recognised,
        num_requests=num_requests,
    )
