"""The Ray Serve ingress: an OpenAI-compatible API with sessions and tools.

Routes (the OpenAPI document at ``/openapi.json`` is generated from these):

* ``POST /v1/chat/completions``, ``POST /v1/completions`` - streaming (SSE) or not;
  the session comes from the ids stock agents send (actors/session_identity.py,
  docs/agents.md) or, with none, from the conversation it extends; every response
  names it in ``x-session-id`` and ``x-mars-turn-index``.
* ``POST /v1/sessions`` opens a session; ``GET /v1/sessions/{id}``;
  ``POST /v1/sessions/{id}/tools`` runs a tool through the CPU pool (a command in
  the session's sandbox, or a traced replay); ``POST /v1/sessions/{id}/tool_events``
  reports a tool the agent ran itself; ``DELETE /v1/sessions/{id}`` closes it.
* ``POST /v1/responses`` (OpenAI's Responses API, streaming or not;
  ``previous_response_id`` chains turns into one session), ``GET /v1/responses/{id}``.
* ``GET /v1/models``, ``GET /metrics`` (Prometheus), ``GET /healthz`` (liveness),
  ``GET /readyz`` (readiness: the scheduler answers and a GPU worker is alive).

With an API key configured, ``/v1/*`` needs ``Authorization: Bearer <key>``
(401 otherwise). Errors use OpenAI's shape: ``{"error": {"message", "type", "code"}}``,
every 4xx included (unknown routes and methods, unparsable bodies).

Every request body is read whole by :class:`BodyGuard` before routing: over
``max_body_bytes`` it is 413 (chunked or not), not UTF-8 or carrying a lone surrogate
escape (``"\\ud800"``, which decodes to a Python string no encoder accepts) it is 400.
Tool calls are held to ``tools``'s limits (docs/security.md).
"""

# No `from __future__ import annotations` here: Ray Serve's class-based view replaces each
# route method's ``__signature__`` (to inject ``self``), and a replaced signature is not
# re-evaluated, so string annotations ("Request", the body models) reach FastAPI as bare
# forward references. FastAPI 0.137+ (what a base install resolves) no longer resolves
# them there and treats ``request`` as a required query parameter: every route that takes
# ``request: Request`` answered 400. Real annotation objects work on every version.
import asyncio
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import (
    ActorUnavailableError,
    ObjectLostError,
    OwnerDiedError,
    RayActorError,
    WorkerCrashedError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mars_ray.errors import MarsError

from .api import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenSessionRequest,
    ResponsesRequest,
    ToolEvent,
    ToolRunRequest,
    message_tokens,
    prompt_tokens,
)
from .config import DeploymentConfig
from .engine_runner import sim_token_id
from .messages import TokenChunk, TurnAsk, TurnDone, TurnGrant, TurnReport, TurnWork
from .names import NAMESPACE, executor_name, worker_name
from .responses_api import (
    InputError,
    ResponseTurn,
    StoredResponse,
    input_messages,
    response_body,
    stream_events,
)
from .scheduler import ONE_SHOT_PREFIX, SessionError
from .session_identity import (
    IdentityError,
    answer_bytes,
    chat_bytes,
    completion_bytes,
    resolve_identity,
)
from .tokenizer import make_tokenizer, sampled_text
from .tool_executor import ToolLimitError, check_replay, check_tool_call
from .turn_channel import TurnChannel, TurnOp, TurnOutcome

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
SCHEDULER_RESTART_WAIT_S = 30.0
# The call's actor or its node went away (not an error the call itself raised):
# retried elsewhere. A node removal can surface as lost objects rather than a dead actor.
LOST = (RayActorError, ObjectLostError, OwnerDiedError, WorkerCrashedError)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _error(status: int, message: str, code: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": code}}, status_code=status
    )


# JSON escapes of UTF-16 surrogates; a lone one decodes to a str that cannot be encoded
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _has_lone_surrogate(body: bytes) -> bool:
    """Whether the JSON ``body`` decodes to a string with a lone surrogate (only parsed
    when it has a surrogate escape at all: pairs, e.g. escaped emoji, are fine)."""
    if not _SURROGATE_ESCAPE.search(body):  # ~30 us for an 85 KiB prompt
        return False
    try:
        json.dumps(json.loads(body), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (ValueError, RecursionError):
        return False  # not JSON at all: the route's parser says so
    return False


class BodyGuard:
    """ASGI middleware: read the request body before routing, refusing one larger than
    ``max_bytes`` (413; by its Content-Length before reading, and by count for chunked
    bodies, which stop being read at the limit) or one that is not Unicode text (400),
    then hand the app the body it read."""

    max_bytes = 64 << 20  # the Ingress sets its deployment's max_body_bytes

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = BodyGuard.max_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(scope, send, f"request body of {declared} bytes", limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _refuse(scope, send, "request body", limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            await _send_error(scope, send, 400, f"request body is not UTF-8 (byte {exc.start})")
            return
        if _has_lone_surrogate(body):
            await _send_error(
                scope,
                send,
                400,
                "request body has a lone surrogate escape (\\ud800-\\udfff without its pair): "
                "not Unicode text",
            )
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # e.g. http.disconnect, for streaming responses
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(scope: Scope, send: Send, what: str, limit: int) -> None:
    message = f"{what} is over the limit of {limit} bytes (max_body_bytes)"
    await _send_error(scope, send, 413, message)


async def _send_error(scope: Scope, send: Send, status: int, message: str) -> None:
    code = "body_too_large" if status == 413 else "invalid_body"
    response = _error(status, message, code)
    response.headers["connection"] = "close"  # the rest of the body is not read
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


app = FastAPI(
    title="mars-ray",
    version="0.1.0",
    description="Agent-aware LLM serving: OpenAI API with MARS sessions and tools.",
)
app.add_middleware(BodyGuard)


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.code)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing's own 4xx (unknown path, method not allowed, unparsable body) in the
    API's error shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    response = _error(exc.status_code, str(exc.detail), code)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value  # e.g. Allow on a 405
    return response


@app.exception_handler(ToolLimitError)
async def _tool_limit(_: Request, exc: ToolLimitError) -> JSONResponse:
    return _error(exc.status, str(exc), exc.code)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        message, where = "request body is not valid JSON", "body"
    return _error(400, f"{where}: {message}", "invalid_request")


@app.exception_handler(SessionError)
async def _session_error(_: Request, exc: SessionError) -> JSONResponse:
    code = {404: "session_not_found", 409: "session_conflict", 503: "unavailable"}
    return _error(exc.status, str(exc), code.get(exc.status, "session_error"))


@app.exception_handler(IdentityError)
async def _identity_error(_: Request, exc: IdentityError) -> JSONResponse:
    return _error(400, str(exc), "invalid_session_id")


@app.exception_handler(MarsError)
async def _mars_error(_: Request, exc: MarsError) -> JSONResponse:
    return _error(400, str(exc), "invalid_request")


def _session_error_from(exc: BaseException) -> BaseException:
    """Unwrap a SessionError raised inside the scheduler actor."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, SessionError | MarsError):
        return cause
    return exc


async def call_actor(ref: Any, retry: bool = False) -> Any:
    """Await a runtime actor's call: its own errors (SessionError, MarsError) come out
    unwrapped for the HTTP handlers, a dead actor is 503, and an unavailable one (a
    restart under way) is re-raised when ``retry`` so the caller can try again."""
    try:
        return await ref
    except ActorUnavailableError:
        if retry:
            raise
        raise ApiError(503, "runtime unavailable: ActorUnavailableError", "unavailable") from None
    except RayActorError as exc:
        raise ApiError(
            503, f"runtime unavailable: {exc.__class__.__name__}", "unavailable"
        ) from None
    except Exception as exc:
        cause = _session_error_from(exc)
        if cause is not exc:
            raise cause from None
        raise


def scheduler_channel(scheduler: Any) -> TurnChannel:
    """The batched turn channel to the global scheduler actor, as the ingress uses it."""

    async def submit(ops: list[TurnOp]) -> list[TurnOutcome]:
        outcomes: list[TurnOutcome] = await call_actor(scheduler.turns.remote(ops), retry=True)
        return outcomes

    async def await_grant(key: int, ask: TurnAsk) -> TurnGrant:
        grant: TurnGrant = await call_actor(scheduler.await_grant.remote(key, ask), retry=True)
        return grant

    # a restarting scheduler: calls are sent again (the scheduler makes that idempotent)
    return TurnChannel(submit, await_grant, retry_on=(ActorUnavailableError,))


class _Turn:
    """One turn through a GPU worker, retried on another worker if its worker dies."""

    def __init__(
        self,
        ingress: "Ingress",
        ask: TurnAsk,
        grant: TurnGrant,
        prompt_ids: tuple[int, ...],
        answer_kind: str | None = None,
    ) -> None:
        self.ingress, self.ask, self.grant = ingress, ask, grant
        self.prompt_ids = prompt_ids  # empty for a simulated engine (it only counts)
        self.done: TurnDone | None = None
        self.created_s = int(time.time())
        # An inferred session's answer, as the client will resend it ("chat", "text" or
        # "ids"; None: the session was named): registered at the turn's end.
        self.answer_kind = answer_kind
        self.answer_ids: list[int] = []
        self.answer_text: list[str] = []

    def _work(self) -> TurnWork:
        g, a = self.grant, self.ask
        return TurnWork(
            session_id=g.session_id,
            turn_index=g.turn_index,
            prompt_tokens=a.prompt_tokens,
            max_output_tokens=a.max_output_tokens,
            prior_context_tokens=g.prior_context_tokens,
            session_service_tokens=g.session_service_tokens,
            session_service_s=g.session_service_s,
            session_arrival_s=g.session_arrival_s,
            is_last_turn=a.is_last_turn,
            predicted_tool_s=g.predicted_tool_s,
            attempt=g.attempt,
            prompt_token_ids=self.prompt_ids,
        )

    async def tokens(self) -> AsyncIterator[list[int]]:
        """Token ids as they are sampled (streaming); a retry skips what was sent."""
        num_sent = 0
        finished = False
        try:
            while self.done is None:
                worker = self.ingress.worker(self.grant.engine_id)
                stream = worker.generate.options(num_returns="streaming").remote(self._work())
                try:
                    async for ref in stream:
                        item = await ref
                        if isinstance(item, TokenChunk):
                            fresh = list(item.token_ids[max(0, num_sent - item.first_index) :])
                            if fresh:
                                num_sent += len(fresh)
                                self.answer_ids += fresh
                                yield fresh
                        else:
                            self.done = item
                except LOST as exc:
                    await self._retry(exc)
            self._report_end()
            finished = True
        finally:
            if not finished:
                self._abandon()

    async def collect(self) -> list[int]:
        """The whole turn in one call per attempt (non-streaming requests)."""
        finished = False
        try:
            while self.done is None:
                try:
                    worker = self.ingress.worker(self.grant.engine_id)
                    ids, self.done = await worker.run_turn.remote(self._work())
                except LOST as exc:
                    await self._retry(exc)
            self.answer_ids = list(ids)
            self.answer_text = [self.ingress.decode(ids)]
            self._report_end()
            finished = True
            return ids
        finally:
            if not finished:
                self._abandon()

    async def _retry(self, exc: BaseException) -> None:
        log.warning(
            "turn %s/%d lost its worker: %r", self.ask.session_id, self.grant.turn_index, exc
        )
        self.grant = await self.ingress._sched(
            "retry_turn", self._ask(), self.grant.engine_id, repr(exc)
        )

    def _report_end(self) -> None:
        """Tell the scheduler the turn ended without making the client wait for it: the
        call is submitted now (so it is ordered before this replica's later calls) and
        a next turn that overtakes it from elsewhere waits for it (TURN_END_GRACE_S)."""
        done = self.done
        assert done is not None
        report = TurnReport(
            session_id=self.grant.session_id,
            turn_index=self.grant.turn_index,
            engine_id=done.engine_id,
            service_tokens=done.service_tokens,
            service_s=done.service_s,
            prompt_tokens=done.prompt_tokens,
            output_tokens=done.output_tokens,
            ttft_s=done.ttft_s,
            is_last_turn=self.ask.is_last_turn,
            answer=None
            if self.answer_kind is None
            else answer_bytes(self.answer_kind, "".join(self.answer_text), self.answer_ids),
        )
        ended = self.ingress.channel.end(report)
        _background(ended, f"end of turn {report.session_id}/{report.turn_index}")

    def _abandon(self) -> None:
        """The client went away or the turn failed: release the turn."""
        ref = self.ingress.scheduler.abandon_turn.remote(
            self.grant.session_id, self.grant.turn_index
        )
        _background(ref, f"abandon of {self.grant.session_id}/{self.grant.turn_index}")

    def _ask(self) -> TurnAsk:
        a = self.ask
        return TurnAsk(
            a.session_id,
            self.grant.turn_index,
            a.prompt_tokens,
            a.max_output_tokens,
            a.is_last_turn,
            a.expected_tool_s,
            a.tool_s,
            a.conversation,
        )

    @property
    def usage(self) -> dict[str, int]:
        done = self.done
        prompt = self.ask.prompt_tokens
        output = done.output_tokens if done else 0
        cached = done.cached_tokens if done else 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": output,
            "total_tokens": prompt + output,
            "prompt_tokens_details": {"cached_tokens": cached},  # type: ignore[dict-item]
        }

    def headers(self) -> dict[str, str]:
        """Every response names its session and turn (streams too: headers go first),
        and the ingress replica that answered."""
        return {
            "x-session-id": self.grant.session_id,
            "x-mars-turn-index": str(self.grant.turn_index),
            "x-mars-ingress-replica": self.ingress.replica_id,
        }

    def mars_info(self) -> dict[str, Any]:
        done = self.done
        info: dict[str, Any] = {
            "session_id": self.grant.session_id,
            "turn_index": self.grant.turn_index,
            "engine_id": self.grant.engine_id,
            "attempt": self.grant.attempt,
        }
        if done is not None:
            info.update(
                ttft_s=done.ttft_s,
                e2e_s=done.e2e_s,
                cached_tokens=done.cached_tokens,
                recomputed_tokens=done.recomputed_tokens,
                num_preemptions=done.num_preemptions,
            )
        return info


_pending: set[asyncio.Task[Any]] = set()


def _background(ref: Any, what: str) -> None:
    """Await an actor call in the background and log (never lose) its failure."""

    async def wait() -> None:
        try:
            outcome = await ref
        except Exception as exc:
            log.warning("%s failed: %r", what, exc)
        else:
            if isinstance(outcome, BaseException):  # a batched message's own error
                log.warning("%s failed: %r", what, outcome)

    task = asyncio.get_running_loop().create_task(wait())
    _pending.add(task)  # keep a reference until done
    task.add_done_callback(_pending.discard)


Decode = Callable[[list[int]], str]


def _full_response(
    rid: str, kind: str, model: str, turn: _Turn, ids: list[int], decode: Decode
) -> dict[str, Any]:
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": decode(ids)},
            "finish_reason": "length",
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": decode(ids), "finish_reason": "length"}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": turn.created_s,
        "model": model,
        "choices": [choice],
        "usage": turn.usage,
        "mars": turn.mars_info(),
    }


async def _sse(
    turn: _Turn, rid: str, kind: str, model: str, include_usage: bool, decode: Decode
) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def event(choice: dict[str, Any], **extra: Any) -> str:
        payload = {"id": rid, "object": obj, "created": turn.created_s, "model": model}
        payload["choices"] = [choice] if choice else []
        payload.update(extra)
        return f"data: {json.dumps(payload)}\n\n"

    if kind == "chat":
        yield event(
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        )
    async for ids in turn.tokens():
        text = decode(ids)  # chunk by chunk (a real tokenizer may split a character)
        turn.answer_text.append(text)  # what the client receives, for its next turn
        if kind == "chat":
            yield event({"index": 0, "delta": {"content": text}, "finish_reason": None})
        else:
            yield event({"index": 0, "text": text, "finish_reason": None})
    last = (
        {"index": 0, "delta": {}, "finish_reason": "length"}
        if kind == "chat"
        else {"index": 0, "text": "", "finish_reason": "length"}
    )
    yield event(last, mars=turn.mars_info())
    if include_usage:
        yield event({}, usage=turn.usage)
    yield "data: [DONE]\n\n"


def _asdict(obj: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(obj)


@serve.deployment(
    name="mars-ingress",
    # On the head node, beside the global scheduler: removing or losing a worker node
    # must not take the HTTP front door (and the requests in flight) with it.
    ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
    max_ongoing_requests=10_000,
    health_check_period_s=10,
)
@serve.ingress(app)
class Ingress:
    """HTTP front door; owns nothing but handles to the runtime's actors."""

    def __init__(self, config: dict[str, Any]) -> None:
        from mars_ray.cluster.launch import find_or_create_runtime

        self.config = DeploymentConfig(**config)
        BodyGuard.max_bytes = self.config.max_body_bytes  # one Ingress per replica process
        # A replica restarted after a failure joins the running runtime (whatever
        # survived); only the first replica of a deployment creates it.
        self.runtime = find_or_create_runtime(self.config)
        # which replica answered (x-mars-ingress-replica): several may serve one session
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.scheduler = self.runtime.scheduler
        self.channel = scheduler_channel(self.scheduler)
        limit = self.config.max_prompt_tokens or self.runtime.max_context_tokens
        self.max_context_tokens = min(limit, self.runtime.max_context_tokens)
        self.tokenizer = make_tokenizer(self.config)
        self.decode: Decode = sampled_text if self.tokenizer is None else self.tokenizer.decode
        self.started_s = time.time()

    # -- actor handles ---------------------------------------------------------------
    # Handles are looked up by name once and cached: sending them in every grant costs
    # more than the decision itself. An executor re-created after a failure has a new
    # handle: its name is looked up again.
    def worker(self, engine_id: int) -> Any:
        handle = self.runtime.workers.get(engine_id)
        if handle is None:
            handle = ray.get_actor(worker_name(engine_id), namespace=NAMESPACE)
            self.runtime.workers[engine_id] = handle
        return handle

    def executor(self, node: int) -> Any:
        handle = self.runtime.executors.get(node)
        if handle is None:
            handle = ray.get_actor(executor_name(node), namespace=NAMESPACE)
            self.runtime.executors[node] = handle
        return handle

    # -- auth and helpers -----------------------------------------------------------
    def _check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not given or not secrets.compare_digest(given.encode(), key.encode()):
            raise ApiError(
                401, "missing or wrong API key (Authorization: Bearer <key>)", "unauthorized"
            )

    async def _sched(self, method: str, *args: Any) -> Any:
        """Call the global scheduler; while it restarts (ActorUnavailableError), retry
        for up to SCHEDULER_RESTART_WAIT_S before answering 503."""
        return await self._retrying(
            lambda: self._call(getattr(self.scheduler, method).remote(*args), retry=True)
        )

    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        deadline = time.monotonic() + SCHEDULER_RESTART_WAIT_S
        while True:
            try:
                return await call()
            except ActorUnavailableError as exc:
                if time.monotonic() > deadline:
                    raise ApiError(
                        503, f"global scheduler unavailable: {exc!r}", "unavailable"
                    ) from None
                await asyncio.sleep(0.2)

    async def _call(self, ref: Any, retry: bool = False) -> Any:
        return await call_actor(ref, retry)

    # -- models, health, metrics -------------------------------------------------------
    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._check_key(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": self.config.model_name,
                    "object": "model",
                    "created": int(self.started_s),
                    "owned_by": "mars-ray",
                    "max_model_len": self.max_context_tokens,
                }
            ],
        }

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        try:
            status = await asyncio.wait_for(self.scheduler.status.remote(), 5.0)
        except Exception as exc:
            return _error(503, f"global scheduler not answering: {exc!r}", "not_ready")
        if not status["alive_engines"]:
            return _error(503, "no GPU worker is alive", "not_ready")
        return JSONResponse({"status": "ready", **status})

    @app.get("/metrics")
    async def metrics(self) -> Response:
        text = await self._sched("metrics_text")
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- sessions ----------------------------------------------------------------------
    @app.post("/v1/sessions")
    async def open_session(
        self, request: Request, body: OpenSessionRequest | None = None
    ) -> dict[str, Any]:
        self._check_key(request)
        sid = await self._sched("open_session", body.session_id if body else None)
        return {"session_id": sid, "object": "session"}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(self, session_id: str, request: Request) -> dict[str, Any]:
        self._check_key(request)
        info = await self._sched("session_info", session_id)
        return {"object": "session", **info}

    @app.delete("/v1/sessions/{session_id}")
    async def close_session(self, session_id: str, request: Request) -> dict[str, Any]:
        self._check_key(request)
        summary = await self._sched("close_session", session_id)
        for executor in self.runtime.executors.values():
            executor.close_session.remote(session_id)
        return {"object": "session.summary", **_asdict(summary), "slowdown": summary.slowdown}

    @app.post("/v1/sessions/{session_id}/tool_events")
    async def tool_event(
        self, session_id: str, body: ToolEvent, request: Request
    ) -> dict[str, Any]:
        self._check_key(request)
        await self._sched("tool_finished", session_id, body.tool_s)
        return {"session_id": session_id, "recorded_tool_s": body.tool_s}

    @app.post("/v1/sessions/{session_id}/tools")
    async def run_tool(
        self, session_id: str, body: ToolRunRequest, request: Request
    ) -> dict[str, Any]:
        self._check_key(request)
        if body.replay is not None:
            check_replay(self.config.tools, body.replay.cpu_s, body.replay.wait_s)
        else:
            check_tool_call(self.config.tools, body.argv or (), body.stdin)
        attempts = self.config.tools.max_attempts
        last_error = ""
        for attempt in range(1, attempts + 1):
            node = await self._sched("tool_executor_for", session_id)
            try:
                executor = self.executor(node)
            except ValueError:  # gone by name: its node was removed, or it is restarting
                last_error = f"no tool executor on node {node}"
                await self._sched("tool_executor_failed", node, last_error)
                continue
            try:
                if body.replay is not None:
                    r = body.replay
                    ref = executor.replay.remote(session_id, r.cpu_s, r.wait_s, r.burn_cpu)
                else:
                    ref = executor.run.remote(session_id, body.argv, body.stdin, body.timeout_s)
                outcome = await ref
            except LOST as exc:
                last_error = repr(exc)
                self.runtime.executors.pop(node, None)  # its replacement has a new handle
                await self._sched("tool_executor_failed", node, last_error)
                continue
            except Exception as exc:
                cause = getattr(exc, "cause", exc)
                if isinstance(cause, ToolLimitError):
                    raise cause from None
                if isinstance(cause, MarsError):
                    raise ApiError(400, str(cause), "tool_refused") from None
                raise
            tool_s = (
                outcome.wall_s
                if body.replay is not None
                else outcome.wall_s * self.config.time_scale
            )
            await self._sched("tool_finished", session_id, tool_s)
            return {"object": "tool.result", **_asdict(outcome), "attempts": attempt}
        raise ApiError(503, f"tool call failed {attempts} times: {last_error}", "tool_failed")

    # -- generation ----------------------------------------------------------------------
    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        self._check_key(request)
        ids: tuple[int, ...] = ()
        if self.tokenizer is None:
            num_prompt = message_tokens(body.messages)
        else:
            ids = tuple(self.tokenizer.chat_ids(body.messages))
            num_prompt = len(ids)
        return await self._generate(
            body, num_prompt, ids, "chat", request, lambda: chat_bytes(body.messages), "chat"
        )

    @app.post("/v1/completions", response_model=None)
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        self._check_key(request)
        answer_kind = "ids" if isinstance(body.prompt, list) else "text"
        conversation = lambda: completion_bytes(body.prompt)  # noqa: E731
        if self.tokenizer is None:
            return await self._generate(
                body, prompt_tokens(body.prompt), (), "text", request, conversation, answer_kind
            )
        if isinstance(body.prompt, list):
            ids = body.prompt
            vocab = self.tokenizer.vocab_size
            bad = next((i for i in ids if not 0 <= i < vocab), None)
            if bad is not None:
                raise ApiError(400, f"prompt token id {bad} is outside [0, {vocab})", "bad_token")
        else:
            ids = self.tokenizer.text_ids(body.prompt)
        return await self._generate(
            body, len(ids), tuple(ids), "text", request, conversation, answer_kind
        )

    async def _generate(
        self,
        body: Any,
        num_prompt: int,
        ids: tuple[int, ...],
        kind: str,
        request: Request,
        conversation: Callable[[], bytes],
        answer_kind: str,
    ) -> Any:
        turn = await self._begin(body, num_prompt, ids, request, conversation, answer_kind)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        headers = turn.headers()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(turn, rid, kind, self.config.model_name, include_usage, self.decode),
                media_type="text/event-stream",
                headers=headers,
            )
        out_ids = await turn.collect()
        return JSONResponse(
            _full_response(rid, kind, self.config.model_name, turn, out_ids, self.decode),
            headers=headers,
        )

    async def _begin(
        self,
        body: Any,
        num_prompt: int,
        ids: tuple[int, ...],
        request: Request,
        conversation: Callable[[], bytes],
        answer_kind: str,
        chained_session: str | None = None,
    ) -> _Turn:
        """Validate a generation request, find its session and wait for its turn's grant.
        ``chained_session``: the session a ``previous_response_id`` names."""
        if body.model is not None and body.model != self.config.model_name:
            raise ApiError(
                404,
                f"model {body.model!r} is not served; use {self.config.model_name!r}",
                "model_not_found",
            )
        if num_prompt < 1:
            raise ApiError(400, "the prompt is empty (no tokens)", "empty_prompt")
        max_out = body.output_tokens(DEFAULT_MAX_TOKENS)
        if num_prompt + max_out > self.max_context_tokens:
            raise ApiError(
                400,
                f"prompt ({num_prompt} tokens) + max_tokens ({max_out}) exceeds the model's "
                f"context of {self.max_context_tokens} tokens",
                "context_length_exceeded",
            )
        identity = resolve_identity(
            request.headers, body.session_id, body.model_extra or {}, self.config.session_id_headers
        )
        sid = identity.session_id
        if sid is not None and not (sid.isascii() and sid.isprintable()):
            # it is echoed in the x-session-id response header, which is ASCII
            raise ApiError(
                400,
                f"session id from {identity.source} must be printable ASCII, got {sid!r}",
                "invalid_session_id",
            )
        if chained_session is not None:
            if sid is not None and sid != chained_session:
                raise ApiError(
                    400,
                    f"conflicting session ids: previous_response_id belongs to session "
                    f"{chained_session!r} but {identity.source} is {sid!r}",
                    "invalid_session_id",
                )
            sid = chained_session
        hints = body.mars
        inferred = sid is None and self.config.infer_sessions
        one_shot = sid is None and not inferred
        if sid is None:
            prefix = "conv-" if inferred else ONE_SHOT_PREFIX
            sid = f"{prefix}{uuid.uuid4().hex[:16]}"
        ask = TurnAsk(
            session_id=sid,
            turn_index=hints.turn_index if hints and hints.turn_index is not None else -1,
            prompt_tokens=num_prompt,
            max_output_tokens=max_out,
            is_last_turn=one_shot or identity.last_turn or bool(hints and hints.last_turn),
            expected_tool_s=hints.expected_tool_s if hints else None,
            tool_s=hints.tool_s if hints else None,
            conversation=conversation() if inferred else None,
        )
        grant = await self._retrying(lambda: self.channel.begin(ask))
        return _Turn(self, ask, grant, ids, answer_kind if inferred else None)

    # -- the Responses API ---------------------------------------------------------------
    @app.post("/v1/responses", response_model=None)
    async def create_response(self, body: ResponsesRequest, request: Request) -> Any:
        self._check_key(request)
        try:
            messages = input_messages(body.instructions, body.input)
        except InputError as exc:
            raise ApiError(400, str(exc), "invalid_input") from None
        previous: StoredResponse | None = None
        if body.previous_response_id is not None:
            previous = await self._sched("chained_response", body.previous_response_id)
        new_ids: tuple[int, ...] = ()
        if self.tokenizer is None:
            num_new = message_tokens(messages)
        else:
            new_ids = tuple(self.tokenizer.chat_ids(messages))
            num_new = len(new_ids)
        num_prompt = num_new + (previous.context_tokens if previous else 0)
        ids = (previous.context_ids if previous else ()) + new_ids
        turn = await self._begin(
            body,
            num_prompt,
            ids if self.tokenizer is not None else (),
            request,
            lambda: chat_bytes(messages),
            "chat",
            chained_session=previous.session_id if previous else None,
        )
        ids_kept = ids if self.tokenizer is not None else ()
        meta = ResponseTurn(
            response_id=f"resp_{uuid.uuid4().hex[:24]}",
            message_id=f"msg_{uuid.uuid4().hex[:24]}",
            model=self.config.model_name,
            created_s=turn.created_s,
            previous_response_id=body.previous_response_id,
            max_output_tokens=turn.ask.max_output_tokens,
        )

        async def finish(text: str) -> dict[str, Any]:
            usage = dict(turn.usage)
            usage["cached_tokens"] = turn.done.cached_tokens if turn.done else 0
            stored_body = response_body(meta, text, usage, turn.mars_info())
            out_ids = tuple(turn.answer_ids) if self.tokenizer is not None else ()
            stored = StoredResponse(
                response_id=meta.response_id,
                session_id=turn.grant.session_id,
                context_tokens=num_prompt + usage["completion_tokens"],
                context_ids=ids_kept + out_ids,
                body=stored_body,
            )
            await self._sched("store_response", stored)  # before the client can chain it
            return stored_body

        if body.stream:

            async def chunks() -> AsyncIterator[str]:
                async for token_ids in turn.tokens():
                    text = self.decode(token_ids)
                    turn.answer_text.append(text)
                    yield text

            return StreamingResponse(
                stream_events(meta, chunks(), finish),
                media_type="text/event-stream",
                headers=turn.headers(),
            )
        out_ids = await turn.collect()
        return JSONResponse(await finish(self.decode(out_ids)), headers=turn.headers())

    @app.get("/v1/responses/{response_id}")
    async def get_response(self, response_id: str, request: Request) -> dict[str, Any]:
        self._check_key(request)
        stored: StoredResponse = await self._sched("stored_response", response_id)
        return stored.body


__all__ = ["Ingress", "app", "sim_token_id"]
