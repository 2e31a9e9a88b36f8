"""``ToolExecutor``: the CPU tool pool, one actor per node.

Runs an agent's tool call for real in the session's sandbox (``sandbox.Sandbox``:
subprocess, timeout, CPU / memory / output limits), or replays a traced call as real
CPU burn plus waiting so that CPU contention between tools is real. Calls beyond
the node's slots queue; the queue wait, in-flight count and CPU time feed AIMD
admission through :class:`~mars_ray.telemetry.ToolPoolSnapshot`.

:func:`check_tool_call` and :func:`check_replay` hold a call to the deployment's
limits (``ToolConfig``): the ingress applies them before a call reaches a pool, the
pool again on arrival. docs/security.md has the threat model.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path

import ray

from mars_ray.errors import MarsError
from mars_ray.telemetry import ToolPoolSnapshot

from .config import DeploymentConfig, ToolConfig
from .messages import ToolOutcome
from .sandbox import Sandbox, SandboxLimits, replay_tool_call


class ToolLimitError(MarsError):
    """A tool call the deployment's limits refuse: ``status`` 403 (a feature that is
    off) or 413 / 400 (over a size), the message names the limit."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def check_tool_call(tools: ToolConfig, argv: Sequence[str], stdin: str | None) -> None:
    """Refuse a command whose argv or stdin is over ``tools``'s limits."""
    if len(argv) > tools.max_argv_items:
        raise ToolLimitError(
            413,
            "argv_too_long",
            f"argv has {len(argv)} arguments; the limit is tools.max_argv_items = "
            f"{tools.max_argv_items}",
        )
    argv_bytes = sum(len(arg.encode("utf-8", "surrogatepass")) for arg in argv)
    if argv_bytes > tools.max_argv_bytes:
        raise ToolLimitError(
            413,
            "argv_too_long",
            f"argv is {argv_bytes} bytes; the limit is tools.max_argv_bytes = "
            f"{tools.max_argv_bytes}",
        )
    # n characters are at most 4n bytes of UTF-8: encode only when that could be over
    if stdin is not None and len(stdin) * 4 > tools.max_stdin_bytes:
        stdin_bytes = len(stdin.encode("utf-8", "surrogatepass"))
        if stdin_bytes > tools.max_stdin_bytes:
            raise ToolLimitError(
                413,
                "stdin_too_large",
                f"stdin is {stdin_bytes} bytes; the limit is tools.max_stdin_bytes = "
                f"{tools.max_stdin_bytes}",
            )


def check_replay(tools: ToolConfig, cpu_s: float, wait_s: float) -> None:
    """Refuse a replay when the deployment does not serve replays, or one longer than
    ``tools.max_replay_s``."""
    if not tools.allow_replay:
        raise ToolLimitError(
            403,
            "tool_replay_disabled",
            "tool replay is off on this deployment (a benchmarking feature: "
            "tools.allow_replay, mars-ray serve --allow-tool-replay)",
        )
    if not cpu_s + wait_s <= tools.max_replay_s:
        raise ToolLimitError(
            400,
            "tool_replay_too_long",
            f"replay cpu_s + wait_s = {cpu_s + wait_s:g} s; the limit is "
            f"tools.max_replay_s = {tools.max_replay_s:g} s",
        )


class ToolExecutorImpl:
    """The pool of one node (Ray-free; the actor below wraps it)."""

    def __init__(self, node_index: int, config: DeploymentConfig, num_slots: int) -> None:
        self.node_index = node_index
        self.config = config
        self.num_slots = num_slots
        self.time_scale = config.time_scale
        self._slots = asyncio.Semaphore(num_slots)
        self._sandboxes: dict[str, Sandbox] = {}
        self._root = Path(config.tools.sandbox_root) / f"node-{node_index}-{os.getpid()}"
        self._limits = SandboxLimits(
            timeout_s=config.tools.timeout_s,
            cpu_s=config.tools.timeout_s,
            memory_bytes=config.tools.memory_bytes,
            max_output_bytes=config.tools.max_output_bytes,
        )
        self.num_in_flight = 0
        self.num_completed = 0
        self.cpu_s = 0.0
        self.wait_ema_s = 0.0
        self._alpha = config.policy_config.admission.tool_wait_ema_alpha

    def _sandbox(self, session_id: str) -> Sandbox:
        box = self._sandboxes.get(session_id)
        if box is None:
            box = self._sandboxes[session_id] = Sandbox(self._root, session_id, self._limits)
        return box

    async def run(
        self,
        session_id: str,
        argv: Sequence[str],
        stdin: str | None = None,
        timeout_s: float | None = None,
    ) -> ToolOutcome:
        """Run ``argv`` in the session's sandbox (refusals raise SandboxError, calls
        over the deployment's limits ToolLimitError)."""
        check_tool_call(self.config.tools, argv, stdin)
        box = self._sandbox(session_id)
        limits = None
        if timeout_s is not None:
            limits = SandboxLimits(
                timeout_s=min(timeout_s, self._limits.timeout_s),
                cpu_s=min(timeout_s, self._limits.cpu_s),
                memory_bytes=self._limits.memory_bytes,
                max_output_bytes=self._limits.max_output_bytes,
            )
        queued_s = time.monotonic()
        self.num_in_flight += 1
        try:
            async with self._slots:
                queue_s = time.monotonic() - queued_s
                result = await box.run(argv, stdin=stdin, limits=limits)
        finally:
            self.num_in_flight -= 1
        self._account(queue_s * self.time_scale, result.cpu_s)
        return ToolOutcome(
            session_id=session_id,
            node_id=self.node_index,
            exit_code=result.exit_code,
            stdout=result.stdout,
            stderr=result.stderr,
            stdout_truncated=result.stdout_truncated,
            stderr_truncated=result.stderr_truncated,
            timed_out=result.timed_out,
            killed_reason=result.killed_reason,
            wall_s=result.wall_s,
            cpu_s=result.cpu_s,
            queue_s=queue_s,
        )

    async def replay(
        self, session_id: str, cpu_s: float, wait_s: float, burn_cpu: bool = True
    ) -> ToolOutcome:
        """Replay a traced call: ``cpu_s`` of real CPU burn then ``wait_s`` of waiting,
        both in simulated seconds (divided by the time scale). Returns simulated times.
        ``burn_cpu=False`` waits the CPU time out instead (no contention: for comparing
        scheduling with a simulator whose CPU pool this host cannot reproduce).
        Refused (ToolLimitError) unless the deployment allows replays this long."""
        check_replay(self.config.tools, cpu_s, wait_s)
        scale = self.time_scale
        started_s = time.monotonic()
        self.num_in_flight += 1
        try:
            if burn_cpu:
                await replay_tool_call(cpu_s / scale, wait_s / scale)
            else:
                await asyncio.sleep((cpu_s + wait_s) / scale)
        finally:
            self.num_in_flight -= 1
        took_s = (time.monotonic() - started_s) * scale
        delay_s = max(0.0, took_s - cpu_s - wait_s)
        self._account(delay_s, cpu_s / scale)
        return ToolOutcome(
            session_id=session_id,
            node_id=self.node_index,
            exit_code=0,
            stdout="",
            stderr="",
            stdout_truncated=False,
            stderr_truncated=False,
            timed_out=False,
            killed_reason=None,
            wall_s=took_s,
            cpu_s=cpu_s,
            queue_s=delay_s,
        )

    def _account(self, delay_s: float, cpu_s: float) -> None:
        self.num_completed += 1
        self.cpu_s += cpu_s
        self.wait_ema_s += self._alpha * (delay_s - self.wait_ema_s)

    def close_session(self, session_id: str) -> None:
        box = self._sandboxes.pop(session_id, None)
        if box is not None:
            box.close()

    def snapshot(self) -> ToolPoolSnapshot:
        return ToolPoolSnapshot(
            node_id=self.node_index,
            num_in_flight=self.num_in_flight,
            num_workers=self.num_slots,
            wait_ema_s=self.wait_ema_s,
            cpu_s=self.cpu_s,
            num_completed=self.num_completed,
        )


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=10_000)  # type: ignore[call-overload]  # Ray stubs lack actor options
class ToolExecutor:
    """One node's tool pool (pinned to its node by the launcher)."""

    def __init__(self, node_index: int, config: DeploymentConfig, num_slots: int) -> None:
        self._impl = ToolExecutorImpl(node_index, config, num_slots)

    async def ready(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def run(
        self,
        session_id: str,
        argv: list[str],
        stdin: str | None = None,
        timeout_s: float | None = None,
    ) -> ToolOutcome:
        return await self._impl.run(session_id, argv, stdin, timeout_s)

    async def replay(
        self, session_id: str, cpu_s: float, wait_s: float, burn_cpu: bool = True
    ) -> ToolOutcome:
        return await self._impl.replay(session_id, cpu_s, wait_s, burn_cpu)

    async def close_session(self, session_id: str) -> None:
        self._impl.close_session(session_id)

    async def snapshot(self) -> ToolPoolSnapshot:
        return self._impl.snapshot()
