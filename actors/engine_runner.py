"""Steps a SimEngine in wall-clock time under asyncio, streaming each turn's tokens.

No Ray here: the ``GPUWorker`` actor wraps one runner, and the latency benchmark
calls a runner directly to measure what the ingress and scheduler add.

Time: the engine's clock is a :class:`~mars_ray.clock.WallClock` sped up by
``time_scale`` (simulated seconds per wall second). A step planned at engine time
``t`` completes at exactly ``plan.end_s`` (the cost model's time); the runner sleeps
until the wall clock reaches it. Multi-step decode runs are cut (``interrupt``) when
a turn arrives, and every ``stream_interval_s`` of wall time so tokens stream
smoothly; cutting a run never changes its timing (SimEngine guarantees it).
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from mars_ray.clock import WallClock
from mars_ray.engine.request import EngineRequest
from mars_ray.engine.sim_engine import SimEngine
from mars_ray.policies.base import RetentionPolicy
from mars_ray.telemetry import EngineSnapshot

from .messages import TokenChunk, TurnDone, TurnWork

VOCAB_SIZE = 32000


def sim_token_id(session_id: str, turn_index: int, index: int) -> int:
    """The deterministic token a simulated model samples (the same on every retry)."""
    return zlib.crc32(f"{session_id}:{turn_index}:{index}".encode()) % VOCAB_SIZE


@dataclass(slots=True)
class _Stream:
    request: EngineRequest
    work: TurnWork
    queue: asyncio.Queue[TokenChunk | TurnDone] = field(default_factory=asyncio.Queue)
    num_published: int = 0


class SimEngineRunner:
    """One simulated GPU serving turns in (scaled) real time."""

    def __init__(
        self,
        engine: SimEngine,
        retention: RetentionPolicy,
        *,
        time_scale: float = 1.0,
        stream_interval_s: float = 0.05,
    ) -> None:
        self.engine = engine
        self.retention = retention
        self.clock = WallClock(time_scale)
        self.time_scale = time_scale
        self.stream_interval_s = stream_interval_s
        self.incarnation = 0
        self._streams: dict[str, _Stream] = {}
        self._aborted: list[EngineRequest] = []
        self._forgotten: list[str] = []
        self._adopted: list[tuple[str, int, asyncio.Future[int]]] = []
        self._wake = asyncio.Event()
        self._engine_now_s = 0.0
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())
            self._task.add_done_callback(self._on_loop_done)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _on_loop_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._error = task.exception()

    # -- turns ---------------------------------------------------------------------
    async def generate(self, work: TurnWork) -> AsyncIterator[TokenChunk | TurnDone]:
        """Run one turn; yields token chunks as steps complete, then its TurnDone."""
        if self._error is not None:
            raise RuntimeError(f"engine {self.engine.engine_id} loop died: {self._error!r}")
        self.start()
        now_s = self._now_s()
        request = EngineRequest(
            work.session_id,
            work.turn_index,
            now_s,
            work.prompt_tokens,
            work.max_output_tokens,
            session_arrival_s=work.session_arrival_s,
            prior_computed_tokens=max(0, work.prior_context_tokens - 1),
            session_service_tokens=work.session_service_tokens,
            session_service_s=work.session_service_s,
            is_last_turn=work.is_last_turn,
        )
        request.request_id = work.request_id
        self.engine.add_request(request, now_s)  # raises InfeasibleError if it can never fit
        stream = _Stream(request, work)
        self._streams[request.request_id] = stream
        self._wake.set()
        done = False
        try:
            while not done:
                item = await stream.queue.get()
                done = isinstance(item, TurnDone)
                yield item
        finally:
            if self._streams.pop(request.request_id, None) is not None and not done:
                self._aborted.append(request)  # the caller went away: free its KV
                self._wake.set()

    def forget(self, session_id: str) -> None:
        """The session's next turn runs elsewhere (or it ended): drop what is kept."""
        self._forgotten.append(session_id)
        self._wake.set()

    def export_kv(self, session_id: str) -> int:
        """The session moves to another engine with its KV: how many leading blocks
        are cached here to send (then forgotten here, like any session that moved)."""
        num_blocks = self.engine.cached_prefix_blocks(session_id)
        self.forget(session_id)
        return num_blocks

    async def adopt_kv(self, session_id: str, num_blocks: int) -> int:
        """Take in a session's KV received from another engine (between steps);
        returns the blocks adopted."""
        adopted: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._adopted.append((session_id, num_blocks, adopted))
        self.start()
        self._wake.set()
        return await adopted

    def snapshot(self) -> EngineSnapshot:
        engine = self.engine
        levels: dict[int, int] = {}
        for request in [*engine.running, *engine.waiting]:
            level = getattr(request.policy_state, "level", 0)
            levels[level] = levels.get(level, 0) + 1
        num_levels = max(levels, default=-1) + 1
        return EngineSnapshot(
            engine_id=engine.engine_id,
            node_id=engine.node_id,
            kv_usage=engine.pool.usage,
            kv_demand=engine.kv_demand,
            num_running=len(engine.running),
            num_waiting=len(engine.waiting),
            level_populations=tuple(levels.get(i, 0) for i in range(num_levels)),
            num_evicted_blocks=engine.pool.num_evicted_blocks,
            num_preemptions=engine.stats.num_preemptions,
            num_recomputed_tokens=engine.stats.num_recomputed_tokens,
            busy_s=engine.stats.busy_s,
            incarnation=self.incarnation,
        )

    # -- the step loop -------------------------------------------------------------
    def _now_s(self) -> float:
        # Invariant: engine time never goes back, even if a step ended "in the future".
        return max(self._engine_now_s, self.clock.now_s())

    async def _loop(self) -> None:
        engine = self.engine
        while True:
            self._housekeeping()
            if engine.plan is None and engine.plan_step(self._now_s()) is None:
                await self._sleep_until(engine.next_wakeup_s() if engine.has_work else None)
                continue
            plan = engine.plan
            assert plan is not None
            wall_left_s = (plan.end_s - self.clock.now_s()) / self.time_scale
            if wall_left_s > 0:
                woken = await self._wait(min(wall_left_s, self.stream_interval_s))
                if woken or wall_left_s > self.stream_interval_s:
                    engine.interrupt(self.clock.now_s())  # newcomer, or time to stream
                continue  # the plan's end may have moved: re-check
            end_s = plan.end_s
            finished = engine.complete_step(end_s)
            self._engine_now_s = end_s
            self._publish(finished, end_s)

    def _housekeeping(self) -> None:
        """Aborts and forgets, applied between steps only."""
        while self._aborted:
            self.engine.abort(self._aborted.pop())
        while self._forgotten:
            self.engine.forget(self._forgotten.pop())
        while self._adopted and self.engine.plan is None:  # the pool changes: no step planned
            session_id, num_blocks, adopted = self._adopted.pop()
            num_adopted = self.engine.adopt_kv(session_id, num_blocks)
            if not adopted.done():  # its caller may have given up
                adopted.set_result(num_adopted)

    async def _wait(self, timeout_s: float | None) -> bool:
        """Sleep up to ``timeout_s`` wall seconds; True if woken by new work."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout_s)
        except TimeoutError:
            return False
        self._wake.clear()
        return True

    async def _sleep_until(self, engine_s: float | None) -> None:
        timeout_s = None
        if engine_s is not None:
            timeout_s = max(0.0, (engine_s - self.clock.now_s()) / self.time_scale)
        await self._wait(timeout_s)

    def _publish(self, finished: list[EngineRequest], now_s: float) -> None:
        for stream in self._streams.values():
            self._push_tokens(stream)
        for request in finished:
            waiting = self._streams.get(request.request_id)
            predicted_tool_s = 0.0 if waiting is None else waiting.work.predicted_tool_s
            self.engine.end_turn(request, self.retention, predicted_tool_s, now_s)
            if waiting is not None:
                waiting.queue.put_nowait(self._done(request, now_s))

    def _push_tokens(self, stream: _Stream) -> None:
        request = stream.request
        n = request.num_output_tokens
        if n > stream.num_published:
            ids = tuple(
                sim_token_id(request.session_id, request.turn_index, i)
                for i in range(stream.num_published, n)
            )
            stream.queue.put_nowait(TokenChunk(stream.num_published, ids))
            stream.num_published = n

    def _done(self, request: EngineRequest, now_s: float) -> TurnDone:
        first_s = request.first_token_s if request.first_token_s is not None else now_s
        return TurnDone(
            session_id=request.session_id,
            turn_index=request.turn_index,
            engine_id=self.engine.engine_id,
            prompt_tokens=request.num_prompt_tokens,
            output_tokens=request.num_output_tokens,
            cached_tokens=request.cached_tokens,
            recomputed_tokens=request.recomputed_tokens,
            num_preemptions=request.num_preemptions,
            service_tokens=request.service_tokens,
            service_s=request.service_s,
            ttft_s=first_s - request.arrival_s,
            e2e_s=now_s - request.arrival_s,
        )
