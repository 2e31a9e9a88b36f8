"""The HTTP API's request and response bodies (OpenAI-compatible, plus sessions).

Validated with pydantic; anything malformed is answered 400 with a message naming
the field. Agent hints travel in the body's ``mars`` object::

    {"model": "mars-sim", "messages": [...], "max_tokens": 256,
     "session_id": "s-1",                      # or the x-session-id header
     "mars": {"turn_index": 3, "last_turn": false, "expected_tool_s": 2.0}}

The simulated model's tokenizer counts whitespace-separated words of the message
contents (no chat template overhead), so a replayed trace's token counts are exact.

Numbers are bounded where the runtime does arithmetic with them: token ids are in
``[0, MAX_TOKEN_ID]``, durations are finite and at most ``MAX_DURATION_S``. Sizes the
deployment configures (body, tool argv and stdin, replay length) are checked by the
ingress against ``DeploymentConfig`` (docs/security.md).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOKEN_ID = 2**31 - 1
"""Token ids are int32 in every tokenizer and engine (vLLM's included)."""
MAX_DURATION_S = 86_400.0
"""No tool call, hint or report is longer than a day."""


def _duration(default: Any = ..., *, gt: float | None = None, **kwargs: Any) -> Any:
    """A duration in seconds: finite (no NaN or Infinity, which JSON parsers accept),
    >= 0 (or > ``gt``) and at most MAX_DURATION_S."""
    bounds: dict[str, Any] = {"gt": gt} if gt is not None else {"ge": 0}
    return Field(default, allow_inf_nan=False, le=MAX_DURATION_S, **bounds, **kwargs)


class Hints(BaseModel):
    """MARS session hints (all optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    turn_index: int | None = Field(None, ge=0, description="must match the session's next turn")
    last_turn: bool = Field(False, description="the session ends after this turn")
    expected_tool_s: float | None = _duration(None, description="estimate of the next tool")
    tool_s: float | None = _duration(None, description="the tool before this turn took this long")


class _Open(BaseModel):
    """OpenAI bodies carry many optional fields; unknown ones are accepted and ignored."""

    model_config = ConfigDict(extra="allow")


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class _Generation(_Open):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    session_id: str | None = Field(None, min_length=1, max_length=128)
    mars: Hints | None = None

    def output_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Generation):
    prompt: str | list[int] = Field(min_length=1)

    @field_validator("prompt")
    @classmethod
    def _token_ids(cls, prompt: str | list[int]) -> str | list[int]:
        if isinstance(prompt, list):
            bad = next((i for i in prompt if not 0 <= i <= MAX_TOKEN_ID), None)
            if bad is not None:
                raise ValueError(f"token id {bad} is outside [0, {MAX_TOKEN_ID}]")
        return prompt


class ResponsesRequest(_Open):
    """``POST /v1/responses`` (actors/responses_api.py): OpenAI's Responses API."""

    model: str | None = None
    input: str | list[Any] = Field(min_length=1)
    instructions: str | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=128)
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    session_id: str | None = Field(None, min_length=1, max_length=128)
    mars: Hints | None = None

    def output_tokens(self, default: int) -> int:
        return self.max_output_tokens or default


class OpenSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_id: str | None = Field(
        None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$"
    )


class ToolReplay(BaseModel):
    """Replay a traced tool call: ``cpu_s`` of CPU burn then ``wait_s`` of waiting
    (simulated seconds). A benchmarking feature: refused (403) unless the deployment
    sets ``tools.allow_replay``; ``cpu_s + wait_s`` is capped by ``tools.max_replay_s``."""

    model_config = ConfigDict(extra="forbid")
    cpu_s: float = _duration()
    wait_s: float = _duration(0.0)
    burn_cpu: bool = Field(
        True, description="burn cpu_s on a real core (False: wait it out, no CPU contention)"
    )


class ToolRunRequest(BaseModel):
    """Run a command in the session's sandbox, or replay a traced call. ``argv`` and
    ``stdin`` are bounded by ``tools.max_argv_items``, ``tools.max_argv_bytes`` and
    ``tools.max_stdin_bytes`` (413 naming the limit)."""

    model_config = ConfigDict(extra="forbid")
    argv: list[str] | None = Field(None, min_length=1)
    stdin: str | None = None
    timeout_s: float | None = _duration(None, gt=0)
    replay: ToolReplay | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ToolRunRequest:
        if (self.argv is None) == (self.replay is None):
            raise ValueError("give exactly one of argv (run a command) or replay (cpu_s, wait_s)")
        return self


class ToolEvent(BaseModel):
    """The agent ran a tool itself and reports how long it took."""

    model_config = ConfigDict(extra="forbid")
    tool_s: float = _duration()


def count_tokens(text: str) -> int:
    """The simulated model's tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def message_tokens(messages: list[ChatMessage]) -> int:
    total = 0
    for message in messages:
        if isinstance(message.content, str):
            total += count_tokens(message.content)
        elif message.content is not None:
            for part in message.content:
                if isinstance(part.get("text"), str):
                    total += count_tokens(part["text"])
    return total


def prompt_tokens(prompt: str | list[int]) -> int:
    return len(prompt) if isinstance(prompt, list) else count_tokens(prompt)
