"""Replay a trace against a live mars-ray endpoint over HTTP.

Each session arrives at its trace time (divided by ``time_scale``), opens a session,
then for every turn streams a chat completion whose new message has exactly the
turn's ``new_tokens`` words (the simulated model's tokenizer counts words) and
``max_tokens = output_tokens``, and after every turn but the last replays its tool
call through ``/v1/sessions/{id}/tools`` (real CPU burn plus waiting on the tool
pool). It records the same per-session and per-request metrics as the simulator,
in simulated seconds (wall seconds x ``time_scale``) from the replay's start.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from mars_ray.results import RequestRecord
from mars_ray.session import SessionSpec

ProgressFn = Callable[[int, int], None]


@dataclass(slots=True)
class SessionOutcome:
    """One replayed session (times in simulated seconds from the replay's start)."""

    session_id: str
    arrival_s: float
    finish_s: float | None = None
    tool_s: float = 0.0
    failed_reason: str | None = None
    requests: list[RequestRecord] = field(default_factory=list)


@dataclass(slots=True)
class ReplayResult:
    sessions: list[SessionOutcome]
    span_s: float  # simulated seconds from start to the last finish
    wall_s: float


class _Clock:
    def __init__(self, time_scale: float) -> None:
        self.scale = time_scale
        self.origin = time.monotonic()

    def now_s(self) -> float:
        return (time.monotonic() - self.origin) * self.scale

    async def sleep_until(self, t_s: float) -> None:
        delay = t_s / self.scale - (time.monotonic() - self.origin)
        if delay > 0:
            await asyncio.sleep(delay)


async def replay(
    url: str,
    sessions: Sequence[SessionSpec],
    *,
    time_scale: float = 1.0,
    api_key: str | None = None,
    on_progress: ProgressFn | None = None,
    request_timeout_s: float = 3600.0,
    burn_cpu: bool = True,
) -> ReplayResult:
    """Replay ``sessions`` against ``url``; never raises for a failed session (it is
    recorded with its reason), so one bad session cannot hide the others' results.
    ``burn_cpu=False`` replays tool CPU time as waiting (see ToolExecutor.replay)."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    clock = _Clock(time_scale)
    wall_start = time.perf_counter()
    done = 0

    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=request_timeout_s, limits=limits
    ) as client:

        async def one(spec: SessionSpec) -> SessionOutcome:
            nonlocal done
            await clock.sleep_until(spec.arrival_s)
            outcome = SessionOutcome(spec.session_id, spec.arrival_s)
            try:
                await _run_session(client, clock, spec, outcome, burn_cpu)
            except Exception as exc:  # recorded, not raised: see the docstring
                outcome.failed_reason = f"{type(exc).__name__}: {exc}"[:500]
            done += 1
            if on_progress is not None:
                on_progress(done, len(sessions))
            return outcome

        outcomes = await asyncio.gather(*(one(s) for s in sessions))
    finishes = [o.finish_s for o in outcomes if o.finish_s is not None]
    return ReplayResult(
        list(outcomes), max(finishes, default=0.0), time.perf_counter() - wall_start
    )


async def _run_session(
    client: httpx.AsyncClient,
    clock: _Clock,
    spec: SessionSpec,
    outcome: SessionOutcome,
    burn_cpu: bool,
) -> None:
    sid = spec.session_id
    _check(await client.post("/v1/sessions", json={"session_id": sid}))
    messages: list[dict[str, str]] = []
    for index, turn in enumerate(spec.turns):
        messages.append({"role": "user", "content": " ".join(["w"] * turn.new_tokens)})
        last = index == spec.num_turns - 1
        body = {
            "messages": messages,
            "max_tokens": turn.output_tokens,
            "stream": True,
            "mars": {"turn_index": index, "last_turn": last},
        }
        text, record = await _stream_turn(client, clock, sid, index, body)
        outcome.requests.append(record)
        messages.append({"role": "assistant", "content": text})
        if last:
            outcome.finish_s = clock.now_s()
            return
        if turn.tool_s > 0:
            replay_body = {
                "replay": {
                    "cpu_s": turn.tool_cpu_s,
                    "wait_s": turn.tool_wait_s,
                    "burn_cpu": burn_cpu,
                }
            }
            started_s = clock.now_s()
            _check(await client.post(f"/v1/sessions/{sid}/tools", json=replay_body))
            outcome.tool_s += clock.now_s() - started_s


async def _stream_turn(
    client: httpx.AsyncClient, clock: _Clock, sid: str, index: int, body: dict[str, Any]
) -> tuple[str, RequestRecord]:
    submit_s = clock.now_s()
    first_s = math.nan
    pieces: list[str] = []
    info: dict[str, Any] = {}
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"x-session-id": sid}
    ) as response:
        if response.status_code != 200:
            await response.aread()
            _check(response)
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "mars" in event:
                info = event["mars"]
            for choice in event.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    if math.isnan(first_s):
                        first_s = clock.now_s()
                    pieces.append(content)
    finish_s = clock.now_s()
    text = "".join(pieces)
    record = RequestRecord(
        session_id=sid,
        turn_index=index,
        engine_id=int(info.get("engine_id", -1)),
        submit_s=submit_s,
        first_token_s=finish_s if math.isnan(first_s) else first_s,
        finish_s=finish_s,
        prompt_tokens=int(body_prompt_tokens(body)),
        output_tokens=len(text.split()),
        cached_tokens=int(info.get("cached_tokens", 0)),
        recomputed_tokens=int(info.get("recomputed_tokens", 0)),
        num_preemptions=int(info.get("num_preemptions", 0)),
    )
    return text, record


def body_prompt_tokens(body: dict[str, Any]) -> int:
    return sum(len(m["content"].split()) for m in body["messages"])


def _check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise RuntimeError(f"HTTP {response.status_code} from {response.url.path}: {message}")
