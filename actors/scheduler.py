"""``GlobalScheduler``: the single source of truth for session state.

An async adapter over the pure :class:`~mars_ray.policies.cluster.ClusterScheduler`
(the same object the simulator drives): it turns HTTP-driven events into its calls,
parks a turn until admission and placement say where it runs, and every control
tick polls the GPU workers and tool executors for the signals AIMD admission and
placement read. The global MLFQ is realised by handing each turn its session's
attained service across GPUs; the engines rank by it.

Failures: a worker that does not answer a poll, or whose turn stream breaks, is
marked dead; its sessions' next turns are placed on live engines (KV is lost, so
they recompute from their context) and in-flight turns are retried by the ingress
through :meth:`retry_turn`. Everything here is in memory: if this actor restarts,
the ingress sees a new ``incarnation`` and re-registers sessions on their next turn
(their attained service and tool history restart from zero; stated in the note
and logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from mars_ray.clock import WallClock
from mars_ray.conversation_index import ContinuationKey, PrefixIndex
from mars_ray.engine.costmodel import CostModel, load_profile
from mars_ray.engine.ideal import isolated_turn_s
from mars_ray.errors import MarsError
from mars_ray.policies.base import ClusterSignals, EngineLoad, SessionTicket
from mars_ray.policies.cluster import (
    ClusterScheduler,
    Placement,
    SessionPhase,
    ToolPoolLoad,
    scope_signals,
)
from mars_ray.policies.registry import get_policy
from mars_ray.telemetry import EngineSnapshot, Telemetry, ToolPoolSnapshot
from mars_ray.vllm.bench_runtime import num_kv_blocks

from .config import DeploymentConfig
from .messages import SessionSummary, TurnAsk, TurnGrant, TurnReport
from .responses_api import StoredResponse
from .session_identity import CHAT_TAG, MESSAGE_END
from .turn_channel import PendingGrant, TurnOp, TurnOutcome

log = logging.getLogger(__name__)

RESPONSES_KEPT = 10_000  # Responses API records kept for GET and previous_response_id
SNAPSHOT_TIMEOUT_S = 5.0  # a worker silent this long (wall) is declared dead
TURN_END_GRACE_S = 1.0  # wall seconds a turn waits for its predecessor's end report
#: a KV migration (both sides) taking longer is abandoned: the turn recomputes instead
KV_MOVE_TIMEOUT_S = 30.0
ONE_SHOT_PREFIX = "req-"  # ids the ingress gives requests that name no session


class SessionError(MarsError, ValueError):
    """A session call that cannot be honoured; ``status`` is the HTTP code to answer."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        # returned (not raised) in a batch's outcomes: keep the status across pickling
        return (type(self), (str(self), self.status))


@dataclass(slots=True)
class _Live:
    """What the runtime knows of a session beyond the ClusterScheduler's record."""

    session_id: str
    arrival_s: float
    context_tokens: int = 0
    num_turns: int = 0
    turn_in_flight: int | None = None
    turn_ended_s: float | None = None
    pending_tool_s: float | None = None  # measured by the tool pool, for the next turn
    tool_s: float = 0.0
    longest_tool_s: float = 0.0  # for its idle timeout (IdleTimeout)
    active_s: float = 0.0  # its last sign of life: opened, a turn ended, a tool reported
    inferred: bool = False  # recognised from its conversation (the client sent no id)
    conversation: bytes | None = None  # the running turn's prompt (canonical), if inferred
    claimed_keys: tuple[ContinuationKey, ...] = ()  # the keys its running turn consumed
    ideal_gpu_s: float = 0.0
    engine_id: int | None = None
    attempt: int = 0
    placed: asyncio.Future[Placement] | None = None
    closed: bool = False
    turn_ended: asyncio.Event = field(default_factory=asyncio.Event)


class GlobalSchedulerImpl:
    """The scheduler's logic, Ray-free except for the handles it is given."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config
        self.spec = get_policy(config.policy)
        self.clock = WallClock(config.time_scale)
        self.cost = CostModel(load_profile(config.cluster.gpu, config.cluster.model))
        self.migration = (
            self.spec.make_migration(config.policy_config, self.cost.kv_bytes_per_token)
            if config.migrates_kv
            else None
        )
        self.cluster = ClusterScheduler(
            self.spec, config.policy_config, config.cluster.num_gpus, random.Random(config.seed)
        )
        self.telemetry = Telemetry()
        self.incarnation = uuid.uuid4().hex[:12]
        self.workers: dict[int, Any] = {}
        self.engine_nodes: dict[int, int] = {}
        self.alive: set[int] = set()
        self.loads: dict[int, EngineLoad] = {}
        self.polled_s: dict[int, float] = {}  # when each engine's load was last measured
        engine = config.engine_config
        self.kv_capacity_tokens = num_kv_blocks(self.cost, engine) * engine.block_size
        self.tool_executors: dict[int, Any] = {}
        self.node_ray_ids: dict[int, str] = {}
        self.tool_snapshots: dict[int, ToolPoolSnapshot] = {}
        self.sessions: dict[str, _Live] = {}
        self.summaries: list[SessionSummary] = []
        self.num_turn_retries = 0
        self.num_tool_retries = 0
        self.num_decisions = 0
        self.num_kv_moves = 0
        self.num_kv_moved_blocks = 0
        self.num_kv_move_failures = 0
        self.num_kv_recomputes = 0  # the migration rule chose recompute over a transfer
        self.num_sessions_expired = 0
        self.num_sessions_inferred = 0  # continuations recognised from the conversation
        self.conversations = PrefixIndex()
        # Responses API records, newest last; kept past their session for GET, bounded.
        self.responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self.idle_timeout = config.idle_timeout
        self._tick_task: asyncio.Task[None] | None = None

    # -- registration ------------------------------------------------------------
    def register_workers(
        self,
        workers: dict[int, Any],
        engine_nodes: dict[int, int],
        node_ray_ids: dict[int, str] | None = None,
    ) -> None:
        self.workers.update(workers)
        self.engine_nodes.update(engine_nodes)
        self.node_ray_ids.update(node_ray_ids or {})
        for engine_id in workers:
            self.alive.add(engine_id)
            self.loads[engine_id] = EngineLoad(engine_id, engine_nodes[engine_id], 0.0, 0, 0)

    def register_tool_executors(self, executors: dict[int, Any]) -> None:
        self.tool_executors.update(executors)

    def now_s(self) -> float:
        return self.clock.now_s()

    def _live_loads(self) -> list[EngineLoad]:
        if not self.alive:
            raise SessionError("no GPU worker is alive", status=503)
        return [self.loads[e] for e in sorted(self.alive)]

    # -- sessions -------------------------------------------------------------------
    def open_session(self, session_id: str | None = None) -> str:
        session_id = session_id or f"sess-{uuid.uuid4().hex[:16]}"
        if session_id in self.sessions:
            raise SessionError(f"session {session_id!r} is already open")
        now_s = self.now_s()
        self.sessions[session_id] = _Live(session_id, now_s, active_s=now_s)
        self.telemetry.session_started()
        return session_id

    def _session(self, session_id: str) -> _Live:
        live = self.sessions.get(session_id)
        if live is None or live.closed:
            raise SessionError(f"unknown session {session_id!r}", status=404)
        return live

    async def begin_turn(self, ask: TurnAsk) -> TurnGrant:
        """Wait until the turn may run; returns where. Opens unknown sessions."""
        if ask.conversation is not None:
            ask = self._claim_conversation(ask)
        if ask.session_id not in self.sessions:
            self.open_session(ask.session_id)
            if ask.turn_index > 0:  # a session from before a scheduler restart
                log.warning(
                    "re-registering session %s at turn %d: its attained service and tool "
                    "history were lost with the previous scheduler",
                    ask.session_id,
                    ask.turn_index,
                )
                self.sessions[ask.session_id].num_turns = ask.turn_index
        live = self._session(ask.session_id)
        if ask.conversation is not None:
            live.inferred, live.conversation = True, ask.conversation
        if live.turn_in_flight is not None:
            await self._wait_turn_end(live)
        if ask.turn_index < 0:  # "the next one"
            ask = dataclasses.replace(ask, turn_index=live.num_turns)
        if ask.turn_index != live.num_turns:
            raise SessionError(
                f"session {ask.session_id!r} expects turn {live.num_turns}, got {ask.turn_index}"
            )
        live.turn_in_flight = ask.turn_index
        try:
            placement = await self._place(live, ask)
        except BaseException:
            live.turn_in_flight = None
            live.turn_ended.set()
            state = self.cluster.sessions.get(live.session_id)
            if state is not None and state.phase is SessionPhase.QUEUED:
                self._start_all(
                    self.cluster.on_session_cancelled(
                        live.session_id, self.now_s(), self._live_loads()
                    )
                )
            raise
        self.num_decisions += 1
        return self._grant(live, ask, placement.engine_id)

    def _claim_conversation(self, ask: TurnAsk) -> TurnAsk:
        """A request without a session id: the session whose last turn (prompt + answer)
        its prompt extends, if any, takes it; else it opens a new session under the id
        the ingress proposed. The matched key is consumed (one continuation per turn)."""
        assert ask.conversation is not None
        chat = ask.conversation.startswith(CHAT_TAG)  # keys end at a message's end
        taken = self.conversations.take(ask.conversation, MESSAGE_END if chat else None)
        if taken is None:
            return ask
        session_id, keys = taken
        live = self.sessions.get(session_id)
        if live is None or live.closed:
            return ask
        live.claimed_keys = keys
        self.num_sessions_inferred += 1
        return dataclasses.replace(ask, session_id=session_id)

    async def _wait_turn_end(self, live: _Live) -> None:
        """The ingress reports a turn's end without waiting for the answer, so the next
        turn may overtake it (another replica, a fast client): give it a moment."""
        deadline = time.monotonic() + TURN_END_GRACE_S
        while live.turn_in_flight is not None and time.monotonic() < deadline:
            live.turn_ended.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.turn_ended.wait(), deadline - time.monotonic())
        if live.turn_in_flight is not None:
            raise SessionError(
                f"session {live.session_id!r} already has turn {live.turn_in_flight} running"
            )

    async def _place(self, live: _Live, ask: TurnAsk) -> Placement:
        now_s = self.now_s()
        if live.session_id not in self.cluster.sessions:  # its first turn: admission
            ticket = SessionTicket(live.session_id, live.arrival_s, ask.prompt_tokens)
            loop = asyncio.get_running_loop()
            live.placed = loop.create_future()
            self._start_all(self.cluster.on_session_arrival(ticket, now_s, self._live_loads()))
            return await live.placed
        # A continuation (or a first turn retried after its client left): place it.
        tool_s = ask.tool_s if ask.tool_s is not None else live.pending_tool_s
        if tool_s is None:
            tool_s = now_s - live.turn_ended_s if live.turn_ended_s is not None else 0.0
        live.pending_tool_s = None
        live.tool_s += tool_s
        live.longest_tool_s = max(live.longest_tool_s, tool_s)
        previous = live.engine_id
        placement = self.cluster.on_tool_finished(live.session_id, tool_s, self._live_loads())
        if previous is not None and previous != placement.engine_id:
            await self._move_kv(live.session_id, previous, placement.engine_id)
        return placement

    async def _move_kv(self, session_id: str, src: int, dst: int) -> int:
        """The session's next turn runs on ``dst``: bring its KV from ``src`` over the
        workers' process group (both sides at once) when the migration rule says the
        transfer beats recomputing; otherwise, or without migration, or if the
        transfer fails, drop it on ``src`` (the turn recomputes). Returns blocks moved."""
        if self.migration is None or src not in self.alive or dst not in self.alive:
            self._forget(src, session_id)
            return 0
        same_node = self.engine_nodes[src] == self.engine_nodes[dst]
        num_tokens = self.sessions[session_id].context_tokens  # at most what src holds
        if num_tokens == 0:  # no context yet: nothing to move or to recompute
            self._forget(src, session_id)
            return 0
        decision = self.migration.decide(num_tokens, same_node, self._recompute_s(num_tokens))
        if not decision.move:
            self.num_kv_recomputes += 1
            self.telemetry.kv_migration("recomputed")
            self._forget(src, session_id)
            return 0
        started_s = time.monotonic()
        sent = self.workers[src].send_kv.remote(session_id, dst)
        received = self.workers[dst].receive_kv.remote(session_id, src)
        try:
            _, num_blocks = await asyncio.wait_for(
                asyncio.gather(_await_ref(sent), _await_ref(received)), KV_MOVE_TIMEOUT_S
            )
        except Exception as exc:  # a dead peer, a timeout: recompute instead
            log.warning("KV of session %s not moved %d -> %d: %r", session_id, src, dst, exc)
            self.num_kv_move_failures += 1
            self.telemetry.kv_migration("failed")
            self._forget(src, session_id)
            return 0
        num_blocks = int(num_blocks)
        self.num_kv_moves += 1
        self.num_kv_moved_blocks += num_blocks
        self.telemetry.kv_migration("moved", num_blocks)
        # A simulated device's payload is a sliver of the real KV (cluster/kv_transfer.py),
        # so its copy is not a GPU link's: the turn waits out the modelled link time, as
        # in the simulator.
        link_s = self.migration.transfer_s(
            num_blocks * self.config.engine_config.block_size, same_node
        )
        await asyncio.sleep(
            max(0.0, link_s / self.config.time_scale - (time.monotonic() - started_s))
        )
        return num_blocks

    def _recompute_s(self, num_tokens: int) -> float:
        """Seconds a GPU alone takes to prefill ``num_tokens`` (the migration's rival)."""
        budget = self.config.engine_config.max_num_batched_tokens
        return self.cost.prefill_time_s(num_tokens, chunk_budget=budget)

    async def move_session(self, session_id: str, engine_id: int) -> int:
        """Rebalance: move a session between turns to ``engine_id``, KV included; its
        next turn runs there (unless that engine is overloaded by then). Returns the
        KV blocks moved."""
        live = self._session(session_id)
        if live.turn_in_flight is not None:
            raise SessionError(f"session {session_id!r} has a turn running; move it between turns")
        if engine_id not in self.alive:
            raise SessionError(f"GPU worker {engine_id} is not alive", status=404)
        if session_id not in self.cluster.sessions or self.cluster.per_engine_admission:
            raise SessionError(
                f"session {session_id!r} cannot move (not admitted, or the "
                f"policy {self.config.policy!r} admits per engine)"
            )
        src = live.engine_id
        if src == engine_id:
            return 0
        num_blocks = 0 if src is None else await self._move_kv(session_id, src, engine_id)
        self.cluster.on_kv_moved(session_id, engine_id)
        live.engine_id = engine_id
        return num_blocks

    def _start_all(self, placements: Sequence[Placement]) -> None:
        for placement in placements:
            live = self.sessions[placement.session_id]
            if live.placed is not None and not live.placed.done():
                live.placed.set_result(placement)

    def _grant(self, live: _Live, ask: TurnAsk, engine_id: int) -> TurnGrant:
        state = self.cluster.sessions[live.session_id]
        live.engine_id = engine_id
        return TurnGrant(
            session_id=live.session_id,
            turn_index=ask.turn_index,
            engine_id=engine_id,
            prior_context_tokens=live.context_tokens
            if ask.prompt_tokens >= live.context_tokens
            else 0,
            session_service_tokens=state.service_tokens,
            session_service_s=state.service_s,
            session_arrival_s=live.arrival_s,
            predicted_tool_s=(
                ask.expected_tool_s
                if ask.expected_tool_s is not None
                else self.cluster.predicted_tool_s(live.session_id)
            ),
            attempt=live.attempt,
        )

    def retry_turn(self, ask: TurnAsk, failed_engine_id: int, reason: str) -> TurnGrant:
        """The turn's worker failed mid-turn: mark it dead, re-place the turn."""
        live = self._session(ask.session_id)
        self._mark_dead(failed_engine_id, reason)
        live.attempt += 1
        self.num_turn_retries += 1
        self.telemetry.turn_retried()
        placement = self.cluster.on_engine_lost(live.session_id, self._live_loads())
        return self._grant(live, ask, placement.engine_id)

    def abandon_turn(self, session_id: str, turn_index: int) -> None:
        """A turn's caller went away before it ended: the session may try it again; a
        one-turn session (no session id given) is closed as failed."""
        live = self.sessions.get(session_id)
        if live is None or live.turn_in_flight != turn_index:
            return
        live.turn_in_flight = None
        live.turn_ended.set()
        if live.claimed_keys:  # the client may retry the same continuation
            self.conversations.register(session_id, *live.claimed_keys)
        live.conversation, live.claimed_keys = None, ()
        if session_id.startswith(ONE_SHOT_PREFIX) or (live.inferred and live.num_turns == 0):
            self.close_session(session_id, failed_reason="client went away")

    def end_turn(self, report: TurnReport) -> SessionSummary | None:
        live = self._session(report.session_id)
        if live.turn_in_flight != report.turn_index:
            raise SessionError(f"session {report.session_id!r} has no turn {report.turn_index}")
        live.ideal_gpu_s += self._isolated_turn_s(live, report)
        live.turn_in_flight = None
        live.turn_ended.set()
        live.num_turns += 1
        live.context_tokens = report.context_tokens
        live.turn_ended_s = live.active_s = self.now_s()
        if live.conversation is not None and report.answer is not None:
            keys = ContinuationKey.turn(live.conversation, report.answer)
            self.conversations.register(live.session_id, *keys)
        live.conversation, live.claimed_keys = None, ()
        self.cluster.on_turn_finished(report.session_id, report.service_tokens, report.service_s)
        self.telemetry.turn_finished(report.engine_id, report.ttft_s)
        if report.is_last_turn:
            return self.close_session(report.session_id, after_last_turn=True)
        return None

    def _isolated_turn_s(self, live: _Live, report: TurnReport) -> float:
        """The turn alone on an idle GPU (for the session's ideal time and slowdown)."""
        extends = report.prompt_tokens >= live.context_tokens  # else no prefix to reuse
        return isolated_turn_s(
            self.cost,
            self.config.engine_config,
            max(0, live.context_tokens - 1) if extends else 0,
            report.prompt_tokens,
            report.output_tokens,
        )

    def tool_finished(self, session_id: str, tool_s: float) -> None:
        """A tool run through the pool (or reported by the agent) took ``tool_s``."""
        live = self._session(session_id)
        live.pending_tool_s = (live.pending_tool_s or 0.0) + tool_s
        live.longest_tool_s = max(live.longest_tool_s, tool_s)
        live.active_s = self.now_s()

    def close_session(
        self,
        session_id: str,
        failed_reason: str | None = None,
        *,
        after_last_turn: bool = False,
        expired: bool = False,
    ) -> SessionSummary:
        """Close the session (its summary). ``after_last_turn``: its engine ran the last
        turn knowing it was the last, so its retention already decided what stays (as
        in the simulator) and the engine is not called; a session closed mid-way has
        what its engine keeps for it dropped. ``expired``: ended by the idle timeout;
        it finished when its last turn ended (the idle time is not its job's)."""
        live = self._session(session_id)
        self.conversations.forget(session_id)
        now_s = self.now_s()
        if expired and live.turn_ended_s is not None:
            now_s = live.turn_ended_s
        live.closed = True
        if live.placed is not None and not live.placed.done():
            live.placed.cancel()
        if session_id in self.cluster.sessions:
            self._start_all(
                self.cluster.on_session_cancelled(session_id, now_s, self._live_loads())
            )
        if live.engine_id is not None and not after_last_turn:
            self._forget(live.engine_id, session_id)
        state = self.cluster.sessions.get(session_id)
        jct_s = now_s - live.arrival_s
        summary = SessionSummary(
            session_id=session_id,
            arrival_s=live.arrival_s,
            admitted_s=None if state is None else state.admitted_s,
            finish_s=now_s,
            num_turns=live.num_turns,
            ideal_s=live.ideal_gpu_s + live.tool_s,
            jct_s=jct_s,
            tool_s=live.tool_s,
            failed_reason=failed_reason,
            expired=expired,
        )
        self.summaries.append(summary)
        if expired:
            self.num_sessions_expired += 1
            self.telemetry.session_expired()
            for executor in self.tool_executors.values():  # its sandbox goes too
                executor.close_session.remote(session_id)
        if failed_reason is not None:
            self.telemetry.session_failed()
        elif live.num_turns > 0:  # a session that ran no turn completed nothing
            self.telemetry.session_completed(jct_s, summary.slowdown)
        del self.sessions[session_id]
        return summary

    def expire_idle_sessions(self) -> list[str]:
        """End every session idle past its timeout (stock agents never close theirs):
        its admission slot, held KV and state are released. A turn that arrives later
        for the same id starts a new session. Returns the ids ended."""
        now_s = self.now_s()
        idle = [
            live.session_id
            for live in self.sessions.values()
            if live.turn_in_flight is None
            and not live.closed
            and self.idle_timeout.expired(
                now_s - live.active_s,
                live.longest_tool_s,
                confirmed=not live.inferred or live.num_turns >= 2,
            )
        ]
        for session_id in idle:
            log.info("session %s expired after its idle timeout", session_id)
            self.close_session(session_id, expired=True)
        return idle

    def _forget(self, engine_id: int, session_id: str) -> None:
        if engine_id in self.alive:
            self.workers[engine_id].forget.remote(session_id)

    def _mark_dead(self, engine_id: int, reason: str) -> None:
        if engine_id in self.alive:
            log.warning("GPU worker %d is dead (%s); re-placing its sessions", engine_id, reason)
            self.alive.discard(engine_id)
            if self.alive:  # sessions queued for its window (mars-local) move elsewhere
                self._start_all(
                    self.cluster.on_engine_removed(engine_id, self.now_s(), self._live_loads())
                )

    # -- tools -----------------------------------------------------------------------
    def tool_executor_for(self, session_id: str) -> int:
        """The node whose executor runs the session's tool: the node of its last GPU
        (tool output stays local), else any node with an executor."""
        live = self._session(session_id)
        if not self.tool_executors:
            raise SessionError("no tool executor is running", status=503)
        node = self.engine_nodes.get(live.engine_id or 0, 0)
        if node not in self.tool_executors:
            node = sorted(self.tool_executors)[
                zlib.crc32(session_id.encode()) % len(self.tool_executors)
            ]
        return node

    def tool_executor_failed(self, node: int, reason: str) -> None:
        log.warning("tool executor on node %d failed (%s)", node, reason)
        self.tool_executors.pop(node, None)
        self.tool_snapshots.pop(node, None)
        self.num_tool_retries += 1
        self.telemetry.tool_retried()

    # -- control tick --------------------------------------------------------------------
    def start(self) -> None:
        if self._tick_task is None:
            self._tick_task = asyncio.get_running_loop().create_task(self._tick_loop())

    async def _tick_loop(self) -> None:
        period_s = self.config.policy_config.admission.tick_s / self.config.time_scale
        while True:
            started = time.perf_counter()
            try:
                await self.tick()
            except Exception:  # never let one bad tick stop admission
                log.exception("control tick failed")
            await asyncio.sleep(max(0.0, period_s - (time.perf_counter() - started)))

    async def tick(self) -> None:
        await self._poll_workers()
        await self._poll_tools()
        if not self.alive:
            return
        self.expire_idle_sessions()
        loads = self._live_loads()
        _, placements = self.cluster.on_tick(self._signals(), self.now_s(), loads)
        self._start_all(placements)
        self.telemetry.observe_admission(
            self.cluster.windows(), self.cluster.num_queued(), self.cluster.num_active()
        )

    async def _poll_workers(self) -> None:
        ids = sorted(self.alive)
        refs = [self.workers[e].snapshot.remote() for e in ids]
        results = await asyncio.gather(
            *(asyncio.wait_for(_await_ref(r), SNAPSHOT_TIMEOUT_S) for r in refs),
            return_exceptions=True,
        )
        for engine_id, result in zip(ids, results, strict=True):
            if isinstance(result, EngineSnapshot):
                self.loads[engine_id] = EngineLoad(
                    engine_id,
                    self.engine_nodes[engine_id],
                    result.kv_usage,
                    result.num_running,
                    result.num_waiting,
                    kv_demand=result.kv_demand,
                )
                self.polled_s[engine_id] = self.now_s()
                self.telemetry.observe_engine(result)
            else:
                self._mark_dead(engine_id, repr(result))

    async def _poll_tools(self) -> None:
        nodes = sorted(self.tool_executors)
        refs = [self.tool_executors[n].snapshot.remote() for n in nodes]
        results = await asyncio.gather(
            *(asyncio.wait_for(_await_ref(r), SNAPSHOT_TIMEOUT_S) for r in refs),
            return_exceptions=True,
        )
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, ToolPoolSnapshot):
                self.tool_snapshots[node] = result
                self.telemetry.observe_tool_pool(result)

    def _signals(self) -> list[ClusterSignals]:
        """One signal set per admission scope, as the simulator computes them."""
        if not self.cluster.per_engine_admission:
            return [self._scope_signals(sorted(self.alive), list(self.tool_snapshots.values()))]
        signals = []
        for engine_id in range(self.config.cluster.num_gpus):
            node = self.engine_nodes.get(engine_id, 0)
            tools = [self.tool_snapshots[node]] if node in self.tool_snapshots else []
            engines = [engine_id] if engine_id in self.alive else []
            signals.append(self._scope_signals(engines, tools))
        return signals

    def _scope_signals(
        self, engine_ids: Sequence[int], tools: Sequence[ToolPoolSnapshot]
    ) -> ClusterSignals:
        pools = [ToolPoolLoad(t.num_in_flight, t.num_workers, t.wait_ema_s) for t in tools]
        # the KV working set of each engine, the scope's KV in tokens, and the age of its
        # oldest poll (the stale-signal guard), as the simulator feeds them
        return scope_signals(
            [self.loads[e] for e in engine_ids],
            pools,
            kv_capacity_tokens=self.kv_capacity_tokens * len(engine_ids),
            observed_s=min((self.polled_s.get(e, 0.0) for e in engine_ids), default=None),
        )

    # -- the Responses API -----------------------------------------------------------------
    def store_response(self, stored: StoredResponse) -> None:
        self.responses[stored.response_id] = stored
        self.responses.move_to_end(stored.response_id)
        while len(self.responses) > RESPONSES_KEPT:
            self.responses.popitem(last=False)

    def stored_response(self, response_id: str) -> StoredResponse:
        stored = self.responses.get(response_id)
        if stored is None:
            raise SessionError(f"response {response_id!r} is unknown or expired", status=404)
        return stored

    def chained_response(self, response_id: str) -> StoredResponse:
        """A ``previous_response_id``: its session must still be live (not expired,
        not ended by its last turn), else the chain is broken (404)."""
        stored = self.stored_response(response_id)
        live = self.sessions.get(stored.session_id)
        if live is None or live.closed:
            raise SessionError(
                f"previous_response_id {response_id!r} is unknown or expired: its session "
                f"{stored.session_id!r} has ended",
                status=404,
            )
        return stored

    # -- views -------------------------------------------------------------------------
    def session_info(self, session_id: str) -> dict[str, Any]:
        live = self._session(session_id)
        state = self.cluster.sessions.get(session_id)
        return {
            "session_id": session_id,
            "num_turns": live.num_turns,
            "turn_in_flight": live.turn_in_flight,
            "engine_id": live.engine_id,
            "context_tokens": live.context_tokens,
            "phase": "open" if state is None else state.phase.value,
            "inferred": live.inferred,
            "idle_timeout_s": self.idle_timeout.timeout_s(
                live.longest_tool_s, confirmed=not live.inferred or live.num_turns >= 2
            ),
            "service_tokens": 0 if state is None else state.service_tokens,
            "tool_s": live.tool_s,
        }

    def status(self) -> dict[str, Any]:
        phases = {p.value: 0 for p in SessionPhase}
        for state in self.cluster.sessions.values():
            phases[state.phase.value] += 1
        return {
            "incarnation": self.incarnation,
            "now_s": self.now_s(),
            "alive_engines": sorted(self.alive),
            "num_engines": self.config.cluster.num_gpus,
            "tool_nodes": sorted(self.tool_executors),
            "sessions_open": len(self.sessions),
            "phases": phases,
            "windows": self.cluster.windows(),
            "num_turn_retries": self.num_turn_retries,
            "num_tool_retries": self.num_tool_retries,
            "num_decisions": self.num_decisions,
            "num_kv_moves": self.num_kv_moves,
            "num_kv_moved_blocks": self.num_kv_moved_blocks,
            "num_kv_move_failures": self.num_kv_move_failures,
            "num_kv_recomputes": self.num_kv_recomputes,
            "num_sessions_expired": self.num_sessions_expired,
            "num_sessions_inferred": self.num_sessions_inferred,
            "num_conversation_keys": len(self.conversations),
        }


async def _await_ref(ref: Any) -> Any:
    return await ref


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=100_000)  # type: ignore[call-overload]  # Ray stubs lack actor options
class GlobalScheduler:
    """The Ray actor around :class:`GlobalSchedulerImpl` (one per deployment)."""

    def __init__(self, config: DeploymentConfig) -> None:
        self._impl = GlobalSchedulerImpl(config)
        self._booted = False
        self._restarting: set[int] = set()  # nodes whose tool executor is being replaced
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending_grants: dict[int, asyncio.Task[TurnGrant]] = {}
        self._grant_keys = itertools.count()

    async def _boot(self) -> None:
        """Start the control tick; after a restart, find the live runtime by name (the
        session table is gone: sessions re-register on their next turn)."""
        if self._booted:
            return
        self._booted = True
        if not self._impl.workers:
            from mars_ray.cluster.launch import find_runtime

            found = await asyncio.to_thread(find_runtime, self._impl.config)
            if found is not None:
                log.warning("scheduler restarted: found %d GPU workers", len(found.workers))
                self._impl.register_workers(found.workers, found.engine_nodes, found.node_ray_ids)
                self._impl.register_tool_executors(found.executors)
        self._impl.start()

    async def ready(self) -> str:
        await self._boot()
        return self._impl.incarnation

    async def register_workers(
        self, workers: dict[int, Any], engine_nodes: dict[int, int], node_ray_ids: dict[int, str]
    ) -> None:
        self._booted = True  # registered by the launcher: nothing to discover
        self._impl.register_workers(workers, engine_nodes, node_ray_ids)
        self._impl.start()

    async def register_tool_executors(self, executors: dict[int, Any]) -> None:
        self._impl.register_tool_executors(executors)

    async def open_session(self, session_id: str | None = None) -> str:
        return self._impl.open_session(session_id)

    async def begin_turn(self, ask: TurnAsk) -> TurnGrant:
        await self._boot()
        return await self._impl.begin_turn(ask)

    async def turns(self, ops: list[TurnOp]) -> list[TurnOutcome]:
        """A batch of turn messages from a :class:`TurnChannel`, applied in order: a
        report ends its turn, an ask is granted now or answered ``PendingGrant``
        (it waits for admission; ``await_grant`` returns it). Errors are per message."""
        await self._boot()
        impl = self._impl
        outcomes: list[TurnOutcome] = [None] * len(ops)
        asks: dict[int, asyncio.Task[TurnGrant]] = {}
        loop = asyncio.get_running_loop()
        for i, op in enumerate(ops):
            if isinstance(op, TurnReport):
                try:
                    outcomes[i] = impl.end_turn(op)
                except Exception as exc:
                    outcomes[i] = exc
            else:
                asks[i] = loop.create_task(impl.begin_turn(op))
        if asks:
            # A grant decided at once completes in its task's first step (nothing in
            # begin_turn awaits an unfinished future then): one loop turn runs them all.
            await asyncio.sleep(0)
        for i, task in asks.items():
            if task.done():
                outcomes[i] = task.exception() or task.result()
            else:
                key = next(self._grant_keys)
                self._pending_grants[key] = task
                outcomes[i] = PendingGrant(key)
        return outcomes

    async def await_grant(self, key: int) -> TurnGrant:
        """The grant of an ask ``turns`` answered with ``PendingGrant(key)``."""
        task = self._pending_grants.pop(key, None)
        if task is None:
            raise SessionError(f"no pending turn {key} (already fetched, or a restart lost it)")
        return await task

    async def retry_turn(self, ask: TurnAsk, failed_engine_id: int, reason: str) -> TurnGrant:
        return self._impl.retry_turn(ask, failed_engine_id, reason)

    async def abandon_turn(self, session_id: str, turn_index: int) -> None:
        self._impl.abandon_turn(session_id, turn_index)

    async def end_turn(self, report: TurnReport) -> SessionSummary | None:
        return self._impl.end_turn(report)

    async def tool_finished(self, session_id: str, tool_s: float) -> None:
        self._impl.tool_finished(session_id, tool_s)

    async def tool_executor_for(self, session_id: str) -> int:
        deadline = time.monotonic() + 30.0
        while not self._impl.tool_executors and self._restarting:
            if time.monotonic() > deadline:  # every executor is being replaced: wait a bit
                break
            await asyncio.sleep(0.1)
        return self._impl.tool_executor_for(session_id)

    async def tool_executor_failed(self, node: int, reason: str) -> None:
        """Drop the dead executor and start a new one on its node if the node lives."""
        from mars_ray.cluster.launch import ensure_tool_executors

        impl = self._impl
        impl.tool_executor_failed(node, reason)
        ray_id = impl.node_ray_ids.get(node)
        if ray_id is None or node in self._restarting:
            return
        gpus = sum(1 for n in impl.engine_nodes.values() if n == node)

        async def restart() -> None:
            # In the background: the caller retries on another node meanwhile.
            try:
                fresh = await asyncio.to_thread(
                    ensure_tool_executors, impl.config, {node: ray_id}, {node: gpus}
                )
            except Exception as exc:  # the node itself is gone: other nodes take its tools
                log.warning("could not restart the tool executor of node %d: %r", node, exc)
                return
            finally:
                self._restarting.discard(node)
            impl.register_tool_executors(fresh)

        self._restarting.add(node)
        task = asyncio.get_running_loop().create_task(restart())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close_session(
        self, session_id: str, failed_reason: str | None = None
    ) -> SessionSummary:
        return self._impl.close_session(session_id, failed_reason)

    async def session_info(self, session_id: str) -> dict[str, Any]:
        return self._impl.session_info(session_id)

    async def store_response(self, stored: StoredResponse) -> None:
        self._impl.store_response(stored)

    async def stored_response(self, response_id: str) -> StoredResponse:
        return self._impl.stored_response(response_id)

    async def chained_response(self, response_id: str) -> StoredResponse:
        return self._impl.chained_response(response_id)

    async def summaries(self) -> list[SessionSummary]:
        return list(self._impl.summaries)

    async def metrics_text(self) -> bytes:
        return self._impl.telemetry.render()

    async def status(self) -> dict[str, Any]:
        await self._boot()
        return self._impl.status()

    async def move_session(self, session_id: str, engine_id: int) -> int:
        return await self._impl.move_session(session_id, engine_id)
