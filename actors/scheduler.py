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
through :meth:`retry_turn`.

Restarts: every change to a session (its turn begun or ended, its tool time, its
conversation keys), to admission and to the Responses API records is written to
the GCS key-value store (:mod:`.scheduler_store`) before the call that made it is
answered; concurrent calls share one write (group commit). A restarted actor
reads it all back before answering anything, so attained service, tool history,
turn indices, admission window and queue survive; a turn granted before the
restart ends normally, a ``begin`` whose answer was lost is asked again with the
same ``ask_id`` and gets the same grant (never a second turn), and a report
applied twice counts once. A session the store does not know (its deployment
started without one) re-registers at its next turn and is counted in
``num_sessions_reset``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import pickle
import random
import time
import uuid
import zlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from mars_ray.clock import WallClock
from mars_ray.conversation_index import ContinuationKey, PrefixIndex
from mars_ray.engine.costmodel import CostModel, load_profile, num_kv_blocks
from mars_ray.engine.ideal import isolated_turn_s
from mars_ray.errors import MarsError
from mars_ray.policies.base import ClusterSignals, EngineLoad, SessionTicket
from mars_ray.policies.cluster import (
    ClusterScheduler,
    ClusterSnapshot,
    Placement,
    SessionPhase,
    SessionSnapshot,
    ToolPoolLoad,
    scope_signals,
)
from mars_ray.policies.registry import get_policy
from mars_ray.telemetry import EngineSnapshot, Telemetry, ToolPoolSnapshot

from .config import DeploymentConfig
from .messages import SessionSummary, TurnAsk, TurnGrant, TurnReport
from .responses_api import StoredResponse
from .scheduler_store import SchedulerStore
from .session_identity import CHAT_TAG, MESSAGE_END
from .turn_channel import PendingGrant, TurnOp, TurnOutcome

log = logging.getLogger(__name__)

SUMMARIES_KEPT = 100_000  # ended sessions' summaries kept for summaries()
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
    ask_id: str | None = None  # the running turn's ask (a retried ask gets its grant again)
    placed: asyncio.Future[Placement] | None = None
    closed: bool = False
    turn_ended: asyncio.Event = field(default_factory=asyncio.Event)


#: the fields of _Live a restart must keep (the rest is per-call machinery)
_KEPT = (
    "session_id",
    "arrival_s",
    "context_tokens",
    "num_turns",
    "turn_in_flight",
    "turn_ended_s",
    "pending_tool_s",
    "tool_s",
    "longest_tool_s",
    "active_s",
    "inferred",
    "conversation",
    "claimed_keys",
    "ideal_gpu_s",
    "engine_id",
    "attempt",
    "ask_id",
)


@dataclass(frozen=True, slots=True)
class StoredSession:
    """One session as the store keeps it: its runtime fields (``_KEPT``, in order),
    its cluster-scheduler record (None before its first turn asks for admission) and
    its registered conversation keys."""

    live: tuple[Any, ...]
    cluster: SessionSnapshot | None
    keys: tuple[ContinuationKey, ...]


def _session_key(session_id: str) -> bytes:
    return b"s/" + session_id.encode()


def _response_key(response_id: str) -> bytes:
    return b"r/" + response_id.encode()


CORE_KEY = b"core"  # the cluster scheduler's admission state (ClusterSnapshot, no sessions)


class GlobalSchedulerImpl:
    """The scheduler's logic, Ray-free except for the handles it is given."""

    def __init__(self, config: DeploymentConfig, store: SchedulerStore | None = None) -> None:
        self.config = config
        self.store = store
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
        # the newest ended sessions' summaries (benches read them), bounded for servers
        # that run for days
        self.summaries: deque[SessionSummary] = deque(maxlen=SUMMARIES_KEPT)
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
        # write-behind-the-call persistence (persist()): what changed since the last write
        self.num_sessions_reset = 0  # re-registered at turn > 0 with nothing in the store
        self.num_sessions_restored = 0
        self.num_store_writes = 0
        self.num_store_errors = 0
        self._asks: dict[str, str] = {}  # ask id of a running turn -> its session
        self._dirty: set[str] = set()
        self._dirty_responses: set[str] = set()
        self._gone_responses: set[str] = set()
        self._core_dirty = False
        self._changes = 0  # bumped by every change; _durable: the last one written
        self._durable = 0
        self._written: asyncio.Condition | None = None
        self._writer: asyncio.Task[None] | None = None

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
        self.touch(session_id)
        return session_id

    def _session(self, session_id: str) -> _Live:
        live = self.sessions.get(session_id)
        if live is None or live.closed:
            raise SessionError(f"unknown session {session_id!r}", status=404)
        return live

    async def begin_turn(self, ask: TurnAsk) -> TurnGrant:
        """Wait until the turn may run; returns where. Opens unknown sessions."""
        if ask.ask_id is not None and ask.ask_id in self._asks:
            live = self.sessions.get(self._asks[ask.ask_id])
            if live is not None and not live.closed and live.ask_id == ask.ask_id:
                return await self._regrant(live, ask)  # asked again: its answer was lost
        if ask.conversation is not None:
            ask = self._claim_conversation(ask)
        if ask.session_id not in self.sessions:
            self.open_session(ask.session_id)
            if ask.turn_index > 0:  # a session the store did not know
                self.num_sessions_reset += 1
                self.telemetry.session_reset()
                log.warning(
                    "re-registering session %s at turn %d: its attained service and tool "
                    "history are not known to this scheduler",
                    ask.session_id,
                    ask.turn_index,
                )
                self.sessions[ask.session_id].num_turns = ask.turn_index
        live = self._session(ask.session_id)
        self.touch(live.session_id)
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
        self._set_ask(live, ask.ask_id)
        try:
            placement = await self._place(live, ask)
        except BaseException:
            live.turn_in_flight = None
            self._set_ask(live, None)
            live.turn_ended.set()
            self.touch(live.session_id)
            state = self.cluster.sessions.get(live.session_id)
            if state is not None and state.phase is SessionPhase.QUEUED:
                self._start_all(
                    self.cluster.on_session_cancelled(
                        live.session_id, self.now_s(), self._live_loads()
                    )
                )
            raise
        self.num_decisions += 1
        self.touch(live.session_id)
        return self._grant(live, ask, placement.engine_id)

    async def _regrant(self, live: _Live, ask: TurnAsk) -> TurnGrant:
        """The grant of a turn already begun (its ask came again: the scheduler
        restarted before its answer got back). Waits for admission if it still does."""
        assert live.turn_in_flight is not None
        ask = dataclasses.replace(ask, session_id=live.session_id, turn_index=live.turn_in_flight)
        state = self.cluster.sessions.get(live.session_id)
        if state is not None and state.phase is SessionPhase.QUEUED:
            if live.placed is None or live.placed.done():
                live.placed = asyncio.get_running_loop().create_future()
            placement = await live.placed
            self.touch(live.session_id)
            return self._grant(live, ask, placement.engine_id)
        if state is None:  # it never reached admission: ask afresh
            live.turn_in_flight = None
            self._set_ask(live, None)
            return await self.begin_turn(dataclasses.replace(ask, ask_id=None))
        # where placement put it (its grant may not have been made before the restart)
        engine_id = state.last_engine_id if state.last_engine_id is not None else live.engine_id
        if engine_id is None or engine_id not in self.alive:
            engine_id = self.cluster.on_engine_lost(live.session_id, self._live_loads()).engine_id
        self.touch(live.session_id)
        return self._grant(live, ask, engine_id)

    def _set_ask(self, live: _Live, ask_id: str | None) -> None:
        if live.ask_id is not None:
            self._asks.pop(live.ask_id, None)
        live.ask_id = ask_id
        if ask_id is not None:
            self._asks[ask_id] = live.session_id

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
        state = self.cluster.sessions.get(live.session_id)
        if state is not None and state.phase is SessionPhase.QUEUED:  # restored, waiting
            live.placed = asyncio.get_running_loop().create_future()
            return await live.placed
        if state is None:  # its first turn: admission
            ticket = SessionTicket(live.session_id, live.arrival_s, ask.prompt_tokens)
            loop = asyncio.get_running_loop()
            live.placed = loop.create_future()
            self._start_all(self.cluster.on_session_arrival(ticket, now_s, self._live_loads()))
            self.touch(live.session_id, core=True)
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
        self.touch(live.session_id)
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
        self.touch(session_id)
        return num_blocks

    def _start_all(self, placements: Sequence[Placement]) -> None:
        for placement in placements:
            live = self.sessions[placement.session_id]
            if live.placed is not None and not live.placed.done():
                live.placed.set_result(placement)
            self.touch(placement.session_id, core=True)

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
        self.touch(live.session_id)
        return self._grant(live, ask, placement.engine_id)

    def abandon_turn(self, session_id: str, turn_index: int) -> None:
        """A turn's caller went away before it ended: the session may try it again; a
        one-turn session (no session id given) is closed as failed."""
        live = self.sessions.get(session_id)
        if live is None or live.turn_in_flight != turn_index:
            return
        live.turn_in_flight = None
        self._set_ask(live, None)
        live.turn_ended.set()
        if live.claimed_keys:  # the client may retry the same continuation
            self.conversations.register(session_id, *live.claimed_keys)
        live.conversation, live.claimed_keys = None, ()
        self.touch(session_id)
        if session_id.startswith(ONE_SHOT_PREFIX) or (live.inferred and live.num_turns == 0):
            self.close_session(session_id, failed_reason="client went away")

    def end_turn(self, report: TurnReport) -> SessionSummary | None:
        live = self._session(report.session_id)
        if live.turn_in_flight != report.turn_index:
            if live.turn_in_flight is None and report.turn_index < live.num_turns:
                return None  # reported again (its first answer was lost in a restart)
            raise SessionError(f"session {report.session_id!r} has no turn {report.turn_index}")
        live.ideal_gpu_s += self._isolated_turn_s(live, report)
        live.turn_in_flight = None
        self._set_ask(live, None)
        live.turn_ended.set()
        live.num_turns += 1
        live.context_tokens = report.context_tokens
        live.turn_ended_s = live.active_s = self.now_s()
        if live.conversation is not None and report.answer is not None:
            keys = ContinuationKey.turn(live.conversation, report.answer)
            self.conversations.register(live.session_id, *keys)
        live.conversation, live.claimed_keys = None, ()
        self.cluster.on_turn_finished(report.session_id, report.service_tokens, report.service_s)
        self.touch(report.session_id, core=live.num_turns == 1)  # first turn: admission
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
        self.touch(session_id)

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
        self._set_ask(live, None)
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
        self.cluster.forget(session_id)  # a returning id is admitted anew; memory bounded
        self.touch(session_id, core=True)  # gone: its record is deleted
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
                for session_id in self.sessions:  # queues may have moved: rare, write all
                    self.touch(session_id, core=True)

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
                await self.persist()
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
        self._core_dirty = True  # the window moved (at most one tick of it can be lost)
        self._changes += 1
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
        self._dirty_responses.add(stored.response_id)
        while len(self.responses) > RESPONSES_KEPT:
            old, _ = self.responses.popitem(last=False)
            self._dirty_responses.discard(old)
            self._gone_responses.add(old)
        self._changes += 1

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
            "num_sessions_reset": self.num_sessions_reset,
            "num_sessions_restored": self.num_sessions_restored,
            "num_store_writes": self.num_store_writes,
            "num_store_errors": self.num_store_errors,
        }

    # -- persistence -------------------------------------------------------------------
    def touch(self, session_id: str, *, core: bool = False) -> None:
        """The session's record changed (or it is gone): write it with the next round."""
        self._dirty.add(session_id)
        self._core_dirty = self._core_dirty or core
        self._changes += 1

    async def persist(self) -> None:
        """Return once every change made so far is in the store (group commit: one
        writer; calls that arrive while a round is being written share the next)."""
        if self.store is None or self._durable >= self._changes:
            return
        target = self._changes
        if self._written is None:
            self._written = asyncio.Condition()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_rounds())
        async with self._written:
            await self._written.wait_for(lambda: self._durable >= target)

    async def _write_rounds(self) -> None:
        assert self.store is not None and self._written is not None
        while self._durable < self._changes:
            upto = self._changes
            puts, deletes = self._collect()  # the state as of now, in one synchronous step
            try:
                await self.store.write(puts, deletes)
                self.num_store_writes += 1
            except Exception:  # keep serving; this round's changes are not durable
                self.num_store_errors += 1
                log.exception("could not write the scheduler's state to the store")
            async with self._written:
                self._durable = upto
                self._written.notify_all()

    def _collect(self) -> tuple[dict[bytes, bytes], list[bytes]]:
        puts: dict[bytes, bytes] = {}
        deletes: list[bytes] = []
        dirty, self._dirty = self._dirty, set()
        for session_id in dirty:
            live = self.sessions.get(session_id)
            if live is None or live.closed:
                deletes.append(_session_key(session_id))
                continue
            record = StoredSession(
                live=tuple(getattr(live, f) for f in _KEPT),
                cluster=self.cluster.session_snapshot(session_id),
                keys=self.conversations.keys_of(session_id),
            )
            puts[_session_key(session_id)] = pickle.dumps(record, pickle.HIGHEST_PROTOCOL)
        if self._core_dirty:
            self._core_dirty = False
            core = self.cluster.snapshot(sessions=False)
            puts[CORE_KEY] = pickle.dumps(core, pickle.HIGHEST_PROTOCOL)
        for response_id in self._dirty_responses:
            stored = self.responses.get(response_id)
            if stored is not None:
                puts[_response_key(response_id)] = pickle.dumps(stored, pickle.HIGHEST_PROTOCOL)
        deletes += [_response_key(r) for r in self._gone_responses]
        self._dirty_responses, self._gone_responses = set(), set()
        return puts, deletes

    def restore(self) -> int:
        """Read the store back (a restarted actor, before it answers anything); returns
        the sessions restored."""
        if self.store is None:
            return 0
        data = self.store.load()
        core = data.pop(CORE_KEY, None)
        records: list[StoredSession] = []
        responses: list[StoredResponse] = []
        for key, value in data.items():
            if key.startswith(b"s/"):
                records.append(pickle.loads(value))
            elif key.startswith(b"r/"):
                responses.append(pickle.loads(value))
        snapshot = (
            pickle.loads(core)
            if core is not None
            else ClusterSnapshot(tuple(a.snapshot() for a in self.cluster.admissions), ())
        )
        self.cluster.restore(snapshot, [r.cluster for r in records if r.cluster is not None])
        for record in records:
            live = _Live(**dict(zip(_KEPT, record.live, strict=True)))
            if live.turn_in_flight is None:
                live.turn_ended.set()
            if live.ask_id is not None:
                self._asks[live.ask_id] = live.session_id
            self.sessions[live.session_id] = live
            if record.keys:
                self.conversations.register(live.session_id, *record.keys)
        for stored in sorted(responses, key=lambda r: r.body.get("created_at", 0)):
            self.responses[stored.response_id] = stored
        self.num_sessions_restored = len(records)
        return len(records)


async def _await_ref(ref: Any) -> Any:
    return await ref


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=100_000)  # type: ignore[call-overload]  # Ray stubs lack actor options
class GlobalScheduler:
    """The Ray actor around :class:`GlobalSchedulerImpl` (one per deployment)."""

    def __init__(self, config: DeploymentConfig, run_id: str | None = None) -> None:
        from .scheduler_store import GcsStore

        # run_id: the deployment's key prefix in the store (the launcher makes one per
        # deployment; a restarted actor is constructed with the same arguments)
        self._impl = GlobalSchedulerImpl(config, GcsStore(run_id) if run_id else None)
        self._booted = False
        self._boot_lock = asyncio.Lock()
        self._restarting: set[int] = set()  # nodes whose tool executor is being replaced
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending_grants: dict[int, asyncio.Task[TurnGrant]] = {}
        self._grant_keys = itertools.count()

    async def _boot(self) -> None:
        """Start the control tick; after a restart, read the state back from the store
        and find the live runtime by name, before any call is answered."""
        if self._booted:
            return
        async with self._boot_lock:
            if self._booted:
                return
            if not self._impl.workers:
                from mars_ray.cluster.launch import find_runtime

                found = await asyncio.to_thread(find_runtime, self._impl.config)
                if found is not None:
                    log.warning("scheduler restarted: found %d GPU workers", len(found.workers))
                    self._impl.register_workers(
                        found.workers, found.engine_nodes, found.node_ray_ids
                    )
                    self._impl.register_tool_executors(found.executors)
                    restored = await asyncio.to_thread(self._impl.restore)
                    log.warning("scheduler restarted: restored %d sessions", restored)
            self._booted = True
            self._impl.start()

    async def ready(self) -> str:
        await self._boot()
        return self._impl.incarnation

    async def register_workers(
        self, workers: dict[int, Any], engine_nodes: dict[int, int], node_ray_ids: dict[int, str]
    ) -> None:
        self._booted = True  # registered by the launcher: nothing to discover or restore
        self._impl.register_workers(workers, engine_nodes, node_ray_ids)
        self._impl.start()

    async def register_tool_executors(self, executors: dict[int, Any]) -> None:
        self._impl.register_tool_executors(executors)

    async def open_session(self, session_id: str | None = None) -> str:
        await self._boot()
        session_id = self._impl.open_session(session_id)
        await self._impl.persist()
        return session_id

    async def begin_turn(self, ask: TurnAsk) -> TurnGrant:
        await self._boot()
        grant = await self._impl.begin_turn(ask)
        await self._impl.persist()
        return grant

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
        await impl.persist()  # every change of the batch is stored before it is answered
        return outcomes

    async def await_grant(self, key: int, ask: TurnAsk | None = None) -> TurnGrant:
        """The grant of an ask ``turns`` answered with ``PendingGrant(key)``. A key this
        incarnation does not know (the actor restarted since) is asked again as
        ``ask``: a restored session waiting for admission waits here again."""
        await self._boot()
        task = self._pending_grants.pop(key, None)
        if task is None:
            if ask is None:
                raise SessionError(f"no pending turn {key} (already fetched, or a restart lost it)")
            grant = await self._impl.begin_turn(ask)
        else:
            grant = await task
        await self._impl.persist()
        return grant

    async def retry_turn(self, ask: TurnAsk, failed_engine_id: int, reason: str) -> TurnGrant:
        await self._boot()
        grant = self._impl.retry_turn(ask, failed_engine_id, reason)
        await self._impl.persist()
        return grant

    async def abandon_turn(self, session_id: str, turn_index: int) -> None:
        await self._boot()
        self._impl.abandon_turn(session_id, turn_index)
        await self._impl.persist()

    async def end_turn(self, report: TurnReport) -> SessionSummary | None:
        await self._boot()
        summary = self._impl.end_turn(report)
        await self._impl.persist()
        return summary

    async def tool_finished(self, session_id: str, tool_s: float) -> None:
        await self._boot()
        self._impl.tool_finished(session_id, tool_s)
        await self._impl.persist()

    async def tool_executor_for(self, session_id: str) -> int:
        await self._boot()
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
        await self._boot()
        summary = self._impl.close_session(session_id, failed_reason)
        await self._impl.persist()
        return summary

    async def session_info(self, session_id: str) -> dict[str, Any]:
        await self._boot()
        return self._impl.session_info(session_id)

    async def store_response(self, stored: StoredResponse) -> None:
        await self._boot()
        self._impl.store_response(stored)
        await self._impl.persist()

    async def stored_response(self, response_id: str) -> StoredResponse:
        await self._boot()
        return self._impl.stored_response(response_id)

    async def chained_response(self, response_id: str) -> StoredResponse:
        await self._boot()
        return self._impl.chained_response(response_id)

    async def drop_store(self) -> None:
        """Delete this deployment's stored state (it is being shut down)."""
        if self._impl.store is not None:
            await asyncio.to_thread(self._impl.store.drop)

    async def summaries(self) -> list[SessionSummary]:
        return list(self._impl.summaries)

    async def metrics_text(self) -> bytes:
        return self._impl.telemetry.render()

    async def status(self) -> dict[str, Any]:
        await self._boot()
        return self._impl.status()

    async def move_session(self, session_id: str, engine_id: int) -> int:
        await self._boot()
        moved = await self._impl.move_session(session_id, engine_id)
        await self._impl.persist()
        return moved
