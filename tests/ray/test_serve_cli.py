"""`mars-ray serve` as a user runs it: a real process in the foreground, answering the
official `openai` client (with and without `--api-key`), then stopped by SIGINT (Ctrl-C)
or SIGTERM (a supervisor), which must shut the deployment and its embedded Ray down:
exit code 0 and no process of it left behind."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest
from conftest import free_port

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 90.0


def _lines(stream: object, into: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)


def _wait_for(lines: queue.Queue[str], needle: str, timeout_s: float, seen: list[str]) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        seen.append(line)
        if needle in line:
            return True
    return False


def _openai_client_is_served(port: int, api_key: str | None) -> None:
    """What a newcomer does first: list the models and stream a chat completion with the
    official client, unmodified (with the key the server wants, or any key without one)."""
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key or "unused", max_retries=0
    )
    assert [m.id for m in client.models.list()] == ["mars-sim"]
    stream = client.chat.completions.create(
        model="mars-sim",
        messages=[{"role": "user", "content": "list the files in this repository"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert text.strip(), "no text streamed"
    assert usage and usage[-1].completion_tokens == 8
    if api_key is not None:
        wrong = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0
        )
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


# SIGINT with an API key, SIGTERM without: each run also serves the official client.
@pytest.mark.parametrize(
    ("sig", "api_key"),
    [(signal.SIGINT, "cli-key"), (signal.SIGTERM, None)],
    ids=["SIGINT-api-key", "SIGTERM-no-key"],
)
def test_serve_answers_the_openai_client_and_stops_cleanly_on_a_signal(
    sig: signal.Signals, api_key: str | None
) -> None:
    port = free_port()
    code = "from mars_ray.cli import main; main()"
    argv = [sys.executable, "-c", code, "serve", "--gpus", "2", "--engine", "sim"]
    argv += ["--port", str(port), "--time-scale", "20"]
    if api_key is not None:
        argv += ["--api-key", api_key]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    descendants: list[psutil.Process] = []
    try:
        assert _wait_for(lines, "mars-ray serving", START_TIMEOUT_S, seen), "".join(seen[-40:])
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        _openai_client_is_served(port, api_key)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in p.name() for p in descendants), "no embedded Ray under it"
        proc.send_signal(sig)
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, "".join(seen[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
    _wait_for(lines, "mars-ray: stopped", 5.0, seen)
    assert any("mars-ray: stopped" in line for line in seen), "".join(seen[-40:])
    _, alive = psutil.wait_procs(descendants, timeout=20)
    left = [p.name() for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert left == [], f"left running after {sig.name}: {left}"
