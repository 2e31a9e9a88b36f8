"""The HTTP API's request and response bodies (OpenAI-compatible, plus sessions).

Validated with pydantic; anything malformed is answered 400 with a message naming
the field. Agent hints travel in the body's ``mars`` object::

    {"model": "mars-sim", "messages": [...], "max_tokens": 256,
     "session_id": "s-1",                      # or the x-session-id header
     "mars": {"turn_index": 3, "last_turn": false, "expected_tool_s": 2.0}}

The simulated model's tokenizer counts whitespace-separated words of the message
contents (no chat template overhead), so a replayed trace's token counts are exact.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Hints(BaseModel):
    """MARS session hints (all optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    turn_index: int | None = Field(None, ge=0, description="must match the session's next turn")
    last_turn: bool = Field(False, description="the session ends after this turn")
    expected_tool_s: float | None = Field(None, ge=0, description="estimate of the next tool")
    tool_s: float | None = Field(None, ge=0, description="the tool before this turn took this long")


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
    model_config = ConfigDict(extra="forbid")
    cpu_s: float = Field(ge=0, le=3600)
    wait_s: float = Field(0.0, ge=0, le=3600)
    burn_cpu: bool = Field(
        True, description="burn cpu_s on a real core (False: wait it out, no CPU contention)"
    )


class ToolRunRequest(BaseModel):
    """Run a command in the session's sandbox, or replay a traced call."""

    model_config = ConfigDict(extra="forbid")
    argv: list[str] | None = Field(None, min_length=1)
    stdin: str | None = None
    timeout_s: float | None = Field(None, gt=0, le=3600)
    replay: ToolReplay | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ToolRunRequest:
        if (self.argv is None) == (self.replay is None):
            raise ValueError("give exactly one of argv (run a command) or replay (cpu_s, wait_s)")
        return self


class ToolEvent(BaseModel):
    """The agent ran a tool itself and reports how long it took."""

    model_config = ConfigDict(extra="forbid")
    tool_s: float = Field(ge=0, le=86400)


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
