"""`mars-ray serve` as a user runs it: a real process in the foreground, stopped by
SIGINT (Ctrl-C) or SIGTERM (a supervisor), which must shut the deployment and its
embedded Ray down: exit code 0 and no process of it left behind."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_cleanly_on_a_signal(sig: signal.Signals) -> None:
    port = free_port()
    code = "from mars_ray.cli import main; main()"
    argv = [sys.executable, "-c", code, "serve", "--gpus", "1", "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    descendants: list[psutil.Process] = []
    try:
        assert _wait_for(lines, "mars-ray serving", START_TIMEOUT_S, seen), "".join(seen[-40:])
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
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
