"""Which session a request belongs to, from what stock clients already send.

Checked in this order (docs/agents.md); the first present wins:

1. explicit ids, which must agree with each other (else 400 naming both):
   the ``x-session-id`` header (Ray Serve's session-affinity header, also OpenCode's),
   the body's ``session_id``, Dynamo's ``nvext.agent_context.session_id`` and its
   ``x-dynamo-session-id`` header;
2. ids agents send for their own reasons: OpenAI's ``prompt_cache_key`` (Codex sets
   it to its conversation id), Claude Code's ``x-claude-code-agent-id`` (a subagent:
   its own session) then ``x-claude-code-session-id``, Codex's ``session-id`` /
   ``session_id`` headers, Qwen Code's ``x-qwen-code-session-id``;
3. the deployment's own ``session_id_headers``.

With none, the runtime infers the session from the conversation
(:mod:`mars_ray.conversation_index`): :func:`chat_bytes` and :func:`completion_bytes`
are the canonical forms it hashes. ``x-dynamo-session-final: true`` (or
``nvext.agent_context.session_final``) marks the session's last turn.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .api import ChatMessage

MAX_SESSION_ID_CHARS = 128

EXPLICIT_HEADERS = ("x-session-id", "x-dynamo-session-id")
AGENT_HEADERS = (
    "x-claude-code-agent-id",
    "x-claude-code-session-id",
    "session-id",
    "session_id",
    "x-qwen-code-session-id",
)
FINAL_HEADER = "x-dynamo-session-final"


class IdentityError(ValueError):
    """The request names its session in a way that cannot be honoured (answered 400)."""


@dataclass(frozen=True, slots=True)
class SessionIdentity:
    """A request's session as it named it; ``session_id`` None: infer it."""

    session_id: str | None
    source: str | None  # where the id came from, e.g. "header x-session-id"
    last_turn: bool = False


def _checked(value: object, source: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise IdentityError(f"session id from {source} must be a string")
    value = value.strip()
    if not value:
        return None
    if len(value) > MAX_SESSION_ID_CHARS or not value.isprintable():
        raise IdentityError(
            f"session id from {source} must be printable and at most "
            f"{MAX_SESSION_ID_CHARS} characters"
        )
    return value


def _agent_context(extra: Mapping[str, Any]) -> Mapping[str, Any]:
    nvext = extra.get("nvext")
    context = nvext.get("agent_context") if isinstance(nvext, Mapping) else None
    return context if isinstance(context, Mapping) else {}


def _truthy(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def resolve_identity(
    headers: Mapping[str, str],
    body_session_id: str | None,
    body_extra: Mapping[str, Any],
    extra_headers: Sequence[str] = (),
) -> SessionIdentity:
    """The request's session (module docstring); raises :class:`IdentityError`."""
    context = _agent_context(body_extra)
    explicit = [
        ("header x-session-id", headers.get("x-session-id")),
        ("body session_id", body_session_id),
        ("body nvext.agent_context.session_id", context.get("session_id")),
        ("header x-dynamo-session-id", headers.get("x-dynamo-session-id")),
    ]
    hinted = [("body prompt_cache_key", body_extra.get("prompt_cache_key"))]
    hinted += [(f"header {name}", headers.get(name)) for name in AGENT_HEADERS]
    hinted += [(f"header {name.lower()}", headers.get(name.lower())) for name in extra_headers]
    last_turn = _truthy(headers.get(FINAL_HEADER)) or _truthy(context.get("session_final"))
    found = [(source, sid) for source, raw in explicit if (sid := _checked(raw, source))]
    for (source, sid), (other, other_sid) in itertools.pairwise(found):
        if sid != other_sid:
            raise IdentityError(
                f"conflicting session ids: {source} is {sid!r} but {other} is {other_sid!r}"
            )
    if found:
        return SessionIdentity(found[0][1], found[0][0], last_turn)
    for source, raw in hinted:
        sid = _checked(raw, source)
        if sid:
            return SessionIdentity(sid, source, last_turn)
    return SessionIdentity(None, None, last_turn)


# -- canonical forms for session inference ---------------------------------------------
# A message is its role and its text, stripped (clients differ in edge whitespace and in
# the extra fields they echo back: refusal, annotations, tool_calls: null). Separators are
# control characters no role contains, so one message list has one byte form and a
# conversation that extends another has a byte form that extends the other's.
_ROLE_END, MESSAGE_END = b"\x1f", b"\x1e"
CHAT_TAG = b"chat\x1d"  # chat forms start with it; their keys end at a MESSAGE_END


def message_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()
    return "".join(p["text"] for p in content if isinstance(p.get("text"), str)).strip()


def message_bytes(role: str, text: str) -> bytes:
    return role.encode() + _ROLE_END + text.strip().encode() + MESSAGE_END


def chat_bytes(messages: Sequence[ChatMessage]) -> bytes:
    """The canonical form of a chat request's messages."""
    return CHAT_TAG + b"".join(message_bytes(m.role, message_text(m.content)) for m in messages)


def completion_bytes(prompt: str | Sequence[int]) -> bytes:
    """The canonical form of a completion prompt (text, or token ids)."""
    if isinstance(prompt, str):
        return b"text\x1d" + prompt.encode()
    return b"ids\x1d" + array("q", prompt).tobytes()


def answer_bytes(kind: str, text: str, ids: Sequence[int]) -> bytes:
    """What a turn's answer adds to its prompt's canonical form, as the client will
    resend it: an assistant message (chat), or the text or ids appended (completions)."""
    if kind == "chat":
        return message_bytes("assistant", text)
    if kind == "ids":
        return array("q", ids).tobytes()
    return text.encode()
