"""The OpenAI Responses API (``POST /v1/responses``), as the newer agent SDKs and CLIs
speak it, on the same turns as chat completions.

* ``input`` (a string, or a list of items: messages, ``function_call`` and
  ``function_call_output`` items) and ``instructions`` become chat messages
  (:func:`input_messages`); reasoning items carry no prompt text and are skipped.
* ``previous_response_id`` chains turns into one session: the new prompt is the earlier
  response's whole context (its prompt and answer) plus the new input, and the turn
  belongs to that response's session. Responses are kept (``GET /v1/responses/{id}``)
  while their session lives; an unknown or expired id is 404.
* Without it, the session comes from the request as for chat (ids, or inferred from a
  resent conversation).

Response bodies and streaming events follow OpenAI's shapes (:func:`response_body`,
:func:`stream_events`); ``mars`` carries the session and turn.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from .api import ChatMessage


class InputError(ValueError):
    """An ``input`` item the API does not accept (answered 400, naming it)."""


_MESSAGE_ROLES = {"user", "system", "developer", "assistant"}


def _item_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "".join(texts)
    raise InputError(f"{where}.content must be a string or a list of content parts")


def _item_message(item: Mapping[str, Any], where: str) -> ChatMessage | None:
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in _MESSAGE_ROLES:
            raise InputError(f"{where}.role must be one of {sorted(_MESSAGE_ROLES)}")
        return ChatMessage(role=role, content=_item_text(item.get("content"), where))
    if kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else json.dumps(output)
        return ChatMessage(role="tool", content=text)
    if kind == "function_call":
        call = f"{item.get('name', '')}({item.get('arguments', '')})"
        return ChatMessage(role="assistant", content=call)
    if kind == "reasoning":
        return None
    raise InputError(f"{where}.type {kind!r} is not supported")


def input_messages(instructions: str | None, items: str | list[Any]) -> list[ChatMessage]:
    """The request's prompt as chat messages (instructions first, as a system message)."""
    messages = [ChatMessage(role="system", content=instructions)] if instructions else []
    if isinstance(items, str):
        return [*messages, ChatMessage(role="user", content=items)]
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise InputError(f"input[{i}] must be an object")
        message = _item_message(item, f"input[{i}]")
        if message is not None:
            messages.append(message)
    return messages


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """What a later turn (``previous_response_id``) and ``GET`` need of a response."""

    response_id: str
    session_id: str
    context_tokens: int  # its prompt + its answer: the next chained turn's prefix
    context_ids: tuple[int, ...]  # the same as token ids (empty for a simulated engine)
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ResponseTurn:
    """The ids and figures of one response, for its body and events."""

    response_id: str
    message_id: str
    model: str
    created_s: int
    previous_response_id: str | None
    max_output_tokens: int


def response_body(
    turn: ResponseTurn,
    text: str | None,
    usage: Mapping[str, Any] | None,
    mars: Mapping[str, Any],
) -> dict[str, Any]:
    """The response object; ``text`` None: still in progress (no output yet).

    Finished responses are ``completed``: the simulated model has no end-of-text, its
    answer is exactly as long as asked, and a turn's end carries no finish reason from
    the engine. (Reported ``incomplete``, every simulated answer would be a failure to
    SDKs that treat it as one, as the OpenAI Agents SDK does.)"""
    done = text is not None
    output = [_message_item(turn, text, "completed")] if done and text is not None else []
    body: dict[str, Any] = {
        "id": turn.response_id,
        "object": "response",
        "created_at": turn.created_s,
        "status": "completed" if done else "in_progress",
        "incomplete_details": None,
        "model": turn.model,
        "output": output,
        "parallel_tool_calls": False,
        "tool_choice": "auto",
        "tools": [],
        "previous_response_id": turn.previous_response_id,
        "max_output_tokens": turn.max_output_tokens,
        "error": None,
        "mars": dict(mars),
    }
    if usage is not None:
        body["usage"] = {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        }
    return body


def _message_item(turn: ResponseTurn, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [_text_part(text)]
    return {
        "type": "message",
        "id": turn.message_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _event(kind: str, number: int, **fields: Any) -> str:
    payload = {"type": kind, "sequence_number": number, **fields}
    return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"


async def stream_events(
    turn: ResponseTurn,
    chunks: AsyncIterator[str],
    finish: Any,
) -> AsyncIterator[str]:
    """The SSE events of a streamed response: created, the message's deltas, then
    ``response.completed`` (``response.incomplete`` if it was) with the whole response.
    ``finish(text)`` is awaited after the last chunk and returns the final body."""
    number = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal number
        number += 1
        return _event(kind, number - 1, **fields)

    start = response_body(turn, None, None, {})
    yield event("response.created", response=start)
    yield event("response.in_progress", response=start)
    item = _message_item(turn, None, "in_progress")
    yield event("response.output_item.added", output_index=0, item=item)
    where = {"item_id": turn.message_id, "output_index": 0, "content_index": 0}
    yield event("response.content_part.added", **where, part=_text_part(""))
    pieces: list[str] = []
    async for text in chunks:
        pieces.append(text)
        yield event("response.output_text.delta", **where, delta=text, logprobs=[])
    text = "".join(pieces)
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=_text_part(text))
    body = await finish(text)
    yield event("response.output_item.done", output_index=0, item=body["output"][0])
    final = "response.completed" if body["status"] == "completed" else "response.incomplete"
    yield event(final, response=body)
