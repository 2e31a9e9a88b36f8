"""Hostile input against a real deployment (Ray, Serve, HTTP), in two parts.

The fuzzer: schemathesis against the live OpenAPI document of a real deployment (Ray, Serve,
HTTP): every operation gets schemathesis's coverage cases (boundary values, wrong types,
missing and extra fields, unsupported methods; valid and invalid) and
``MAX_EXAMPLES`` Hypothesis-generated cases of each generation mode (valid, invalid),
sent over the real HTTP path. No answer may be a 5xx, every 4xx must be the API's error
shape (``{"error": {"message": ...}}``), and afterwards a normal chat completion must
still succeed.

Deterministic: ``derandomize=True`` (the same cases on every run, no example database).
Runs through schemathesis's Python API (``openapi.from_url``, ``iter_coverage_cases``,
``APIOperation.as_strategy``), not its pytest plugin: the plugin's fixture-loaded
schemas (``schemathesis.pytest.from_fixture``, the only way to load a schema served
by a fixture) break on pytest 9.2 (``Function._nodeid`` is gone).

Nothing is excluded: the operations fuzzed are checked to be exactly the app's routes.
``POST /v1/sessions/{id}/tools`` runs commands: it is fuzzed as a default deployment
exposes it to a client holding the API key (tool replay off, commands confined by the
sandbox, here with a 2 s timeout).

The limits (docs/security.md), each answered with a 4xx whose message names it: the
request body size (by Content-Length and for chunked bodies), bodies that are not
Unicode text, absurd max_tokens, token ids and durations, tool argv and stdin sizes,
tool replay being off by default. The deployment runs with small limits so that the
tests need not send megabytes. (The replay cap is tested in test_api.py, whose
deployment allows replays.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402  (after the importorskip)
from hypothesis.errors import Unsatisfiable  # noqa: E402

from mars_ray.actors.config import deployment_config  # noqa: E402
from mars_ray.cluster.serving import RunningDeployment, running_deployment  # noqa: E402

KEY = "fuzz-key"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_EXAMPLES = 50  # per operation and generation mode (valid, invalid)
TIME_SCALE = 1000.0  # a generated max_tokens of thousands still decodes in a moment
BODY_LIMIT = 1 << 20


def _routes() -> list[tuple[str, str]]:
    """(method, path) of every operation the ingress documents, known at collection time
    (the live document is checked to list the same)."""
    from mars_ray.actors.ingress import app

    paths = app.openapi()["paths"]
    ops = {(method.upper(), path) for path, item in paths.items() for method in item}
    return sorted(ops, key=lambda op: (op[1], op[0]))


ROUTES = _routes()


@pytest.fixture(scope="module")
def deployment(port: int) -> Iterator[RunningDeployment]:
    config = deployment_config(
        {
            "cluster": {"num_gpus": 1, "num_nodes": 1},
            "time_scale": TIME_SCALE,
            "api_key": KEY,
            "max_body_bytes": BODY_LIMIT,
            # the idle timeout is on the deployment's clock: 600 s would be 0.6 s here
            "session_idle_timeout_s": 600.0 * TIME_SCALE,
            "session_idle_timeout_max_s": 600.0 * TIME_SCALE,
            "tools": {
                "timeout_s": 2.0,
                "max_output_bytes": 4096,
                "max_argv_items": 64,
                "max_argv_bytes": 16 << 10,
                "max_stdin_bytes": 16 << 10,
            },
        }
    )
    with running_deployment(config, num_nodes=1, port=port) as running:
        yield running


@pytest.fixture(scope="module")
def live_schema(deployment: RunningDeployment) -> Any:
    from schemathesis.config import SchemathesisConfig

    config = SchemathesisConfig.from_dict(
        {"headers": AUTH, "request-timeout": 60, "generation": {"deterministic": True}}
    )
    schema = schemathesis.openapi.from_url(f"{deployment.url}/openapi.json", config=config)
    fuzzed = {(op.method.upper(), op.path) for op in (r.ok() for r in schema.get_all_operations())}
    assert fuzzed == set(ROUTES), "the live document and the app's routes differ"
    return schema


def _open_session(url: str) -> str:
    answer = httpx.post(f"{url}/v1/sessions", json={}, headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    session_id: str = answer.json()["session_id"]
    return session_id


def _check(case: Any, url: str, seen: list[int]) -> None:
    response = case.call(base_url=url, timeout=60)
    seen.append(response.status_code)
    where = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, (
        f"{response.status_code} from {where}: {response.text[:500]}\n"
        f"reproduce: {case.as_curl_command()}"
    )
    if response.status_code >= 400:
        try:
            error = response.json().get("error")
        except ValueError:
            error = None
        assert isinstance(error, dict) and error.get("message"), (
            f"{response.status_code} from {where} is not the API's error shape: "
            f"{response.text[:500]}\nreproduce: {case.as_curl_command()}"
        )


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_no_operation_answers_5xx(
    method: str, path: str, live_schema: Any, deployment: RunningDeployment
) -> None:
    from schemathesis import GenerationMode

    operation = live_schema[path][method]
    seen: list[int] = []
    coverage = live_schema.iter_coverage_cases(
        operation,
        generation_modes=list(GenerationMode),
        generation_config=live_schema.config.generation_for(operation=operation, phase="coverage"),
    )
    for case in coverage:  # finite: one case per boundary, type and method tried
        case.headers = {**(case.headers or {}), **AUTH}
        _check(case, deployment.url, seen)
    # a random session id is unknown (404 before anything runs): ops on a session are
    # fuzzed on a live one too, so that tool calls reach the pool and its sandbox
    on_session = "{session_id}" in path
    runs = [(mode, None) for mode in GenerationMode]
    if on_session:
        runs += [(mode, _open_session(deployment.url)) for mode in GenerationMode]
    for mode, session_id in runs:
        path_parameters = {"session_id": session_id} if session_id else None

        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
        @settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any) -> None:
            case.headers = {**(case.headers or {}), **AUTH}
            _check(case, deployment.url, seen)

        try:
            fuzz()
        except Unsatisfiable:
            # nothing in the schema can be invalid (no body, and parameters that are any
            # string, like a path's session id): only valid cases exist
            assert mode is GenerationMode.NEGATIVE, f"{method} {path}: no valid case generated"
            assert not operation.body, f"{method} {path}: no invalid body generated"
    print(f"{method} {path}: {len(seen)} cases, statuses {sorted(set(seen))}")


def test_a_normal_chat_completion_succeeds_afterwards(deployment: RunningDeployment) -> None:
    with httpx.Client(base_url=deployment.url, headers=AUTH, timeout=60) as http:
        body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
        started = time.monotonic()
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
        assert time.monotonic() - started < 30
        assert http.get("/readyz").status_code == 200


# -- the limits ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(deployment: RunningDeployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment.url, headers=AUTH, timeout=60) as client:
        yield client


def _chat(text: str, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 2, **extra}


def _raw(http: httpx.Client, path: str, body: bytes | Iterator[bytes]) -> httpx.Response:
    return http.post(path, content=body, headers={"content-type": "application/json"})


def _chunks(total: int, size: int = 64 << 10) -> Iterator[bytes]:
    """A chat body of about ``total`` bytes sent chunked (no Content-Length)."""
    yield b'{"messages": [{"role": "user", "content": "'
    for _ in range(total // size):
        yield b"w " * (size // 2)
    yield b'"}], "max_tokens": 2}'


def _error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message: str = response.json()["error"]["message"]
    return message


@pytest.mark.parametrize(
    ("body", "status", "needles"),
    [
        # by Content-Length, before the body is read
        (b'{"prompt": "' + b"w " * BODY_LIMIT + b'"}', 413, ["max_body_bytes", str(BODY_LIMIT)]),
        # chunked: no Content-Length, counted as it arrives (64 MiB would follow)
        (_chunks(64 << 20), 413, ["max_body_bytes"]),
        (b'{"prompt": "caf\xe9"}', 400, ["not UTF-8"]),
        (b'{"prompt": "a \\ud800 b"}', 400, ["lone surrogate"]),
        (b'{"prompt": [1, 99999999999999999999], "max_tokens": 2}', 400, ["token id"]),
        (b'{"prompt": [5, -1], "max_tokens": 2}', 400, ["token id -1"]),
        (
            b'{"prompt": "w w", "max_tokens": 1000000000000000000000}',
            400,
            ["max_tokens", "context"],
        ),
        (b'{"prompt": "w w", "max_tokens": 1e400}', 400, ["max_tokens", "finite"]),
        (b'{"prompt": "w", "mars": {"expected_tool_s": Infinity}}', 400, ["finite"]),
        (b'{"prompt": "w", "mars": {"tool_s": 1e300}}', 400, ["mars.tool_s", "86400"]),
        (b"[" * 100_000 + b"]" * 100_000, 400, ["parsing the body"]),
    ],
    ids=[
        "content-length",
        "chunked",
        "not-utf8",
        "surrogate",
        "huge-token-id",
        "negative-token-id",
        "huge-max-tokens",
        "infinite-max-tokens",
        "infinite-duration",
        "huge-duration",
        "deep-nesting",
    ],
)
def test_bodies_over_a_limit_get_a_4xx_naming_it(
    http: httpx.Client, body: bytes | Iterator[bytes], status: int, needles: list[str]
) -> None:
    message = _error_of(_raw(http, "/v1/completions", body), status)
    for needle in needles:
        assert needle in message


def test_escaped_surrogate_pairs_and_unicode_are_fine(http: httpx.Client) -> None:
    emoji = _raw(http, "/v1/completions", b'{"prompt": "a \\ud83d\\ude00 b", "max_tokens": 2}')
    assert emoji.status_code == 200, emoji.text
    unicode = http.post("/v1/chat/completions", json=_chat("caf\u00e9 \u4e16\u754c"))
    assert unicode.status_code == 200, unicode.text


def test_session_ids_that_cannot_be_echoed_are_refused(http: httpx.Client) -> None:
    body = _chat("w w", session_id="caf\u00e9-\u20ac")
    message = _error_of(http.post("/v1/chat/completions", json=body), 400)
    assert "printable ASCII" in message and "session_id" in message


def test_routing_errors_have_the_api_error_shape(http: httpx.Client) -> None:
    assert _error_of(http.put("/v1/models"), 405) == "Method Not Allowed"
    assert _error_of(http.get("/v1/nothing-here"), 404) == "Not Found"


@pytest.mark.parametrize(
    ("call", "status", "needle"),
    [
        ({"argv": ["true"] + ["x"] * 64}, 413, "tools.max_argv_items = 64"),
        ({"argv": ["echo", "x" * (16 << 10)]}, 413, "tools.max_argv_bytes = 16384"),
        (
            {"argv": ["cat"], "stdin": "\u00e9" * 8200},
            413,
            "tools.max_stdin_bytes = 16384",
        ),
        ({"replay": {"cpu_s": 0.1}}, 403, "tools.allow_replay"),
        ({"replay": {"cpu_s": 0.1}}, 403, "--allow-tool-replay"),
        ({"argv": ["echo", "\u00e9"], "timeout_s": "inf"}, 400, "timeout_s"),
    ],
    ids=["argv-items", "argv-bytes", "stdin-bytes", "replay-off", "replay-flag", "timeout"],
)
def test_tool_calls_over_a_limit_get_a_4xx_naming_it(
    http: httpx.Client, call: dict[str, object], status: int, needle: str
) -> None:
    sid = http.post("/v1/sessions", json={}).json()["session_id"]
    try:
        assert http.post("/v1/chat/completions", json=_chat("w w", session_id=sid)).is_success
        message = _error_of(http.post(f"/v1/sessions/{sid}/tools", json=call), status)
        assert needle in message
        # just under the limits, the same session's tools run
        ok = http.post(
            f"/v1/sessions/{sid}/tools",
            json={"argv": ["cat"], "stdin": "x" * (16 << 10)},
        )
        assert ok.status_code == 200 and len(ok.json()["stdout"]) == 4096, ok.text
    finally:
        http.delete(f"/v1/sessions/{sid}")
