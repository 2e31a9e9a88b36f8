"""The global scheduler's logic: session table, admission window(s), placement.

Pure and synchronous: the simulator calls it directly in virtual time, the Ray
``GlobalScheduler`` actor wraps it. Callers pass the current engine loads with each
call and act on the returned :class:`Placement` list (start those turns).
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from mars_ray.policies.base import (
    AdmissionDecision,
    AdmissionPolicy,
    AdmissionSnapshot,
    ClusterSignals,
    EngineLoad,
    PlacementPolicy,
    SessionTicket,
)
from mars_ray.policies.placement import RebalanceRule
from mars_ray.policies.registry import PolicyConfig, PolicySpec
from mars_ray.session import ToolHistory


class SessionPhase(enum.Enum):
    QUEUED = "queued"  # waiting for admission
    ACTIVE = "active"  # admitted: on a GPU or in a tool
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Placement:
    """Start turn ``turn_index`` of ``session_id`` on engine ``engine_id``."""

    session_id: str
    turn_index: int
    engine_id: int


@dataclass(frozen=True, slots=True)
class Move:
    """Rebalancing: the session (in a tool call) now belongs to engine ``to_engine``;
    the runtime moves its KV from ``from_engine`` (or lets the new engine recompute)."""

    session_id: str
    from_engine: int
    to_engine: int


#: work conservation starts a session on an idle GPU only below this KV working set
WORK_CONSERVATION_KV_BELOW = 0.85


@dataclass(slots=True)
class SessionState:
    """The global scheduler's record of one session (the single source of truth)."""

    ticket: SessionTicket
    scope: int  # admission scope: 0 for a global window, else the engine's index
    phase: SessionPhase = SessionPhase.QUEUED
    admitted_s: float | None = None
    next_turn: int = 0
    last_engine_id: int | None = None
    service_tokens: int = 0  # attained service across turns and GPUs
    service_s: float = 0.0
    tools: ToolHistory = field(default_factory=ToolHistory)
    queued_seq: int = 0  # its place in its scope's admission queue (arrival order)

    def snapshot(self) -> SessionSnapshot:
        t = self.ticket
        return SessionSnapshot(
            session_id=t.session_id,
            arrival_s=t.arrival_s,
            expected_work_tokens=t.expected_work_tokens,
            scope=self.scope,
            phase=self.phase,
            admitted_s=self.admitted_s,
            next_turn=self.next_turn,
            last_engine_id=self.last_engine_id,
            service_tokens=self.service_tokens,
            service_s=self.service_s,
            tool_ema_s=self.tools.ema_s,
            tool_samples=self.tools.num_samples,
            queued_seq=self.queued_seq,
        )


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """One session's record in the cluster scheduler, frozen (a restart restores it)."""

    session_id: str
    arrival_s: float
    expected_work_tokens: int
    scope: int
    phase: SessionPhase
    admitted_s: float | None
    next_turn: int
    last_engine_id: int | None
    service_tokens: int
    service_s: float
    tool_ema_s: float | None  # the tool history (its EMA and sample count)
    tool_samples: int
    queued_seq: int


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """What :meth:`ClusterScheduler.restore` needs to go on where a scheduler stopped:
    each scope's admission state, the scopes closed for good and the live sessions
    (queued or active; their queue order is ``queued_seq``). The slot counts are
    derived from the sessions' phases. Placement keeps no state (power-of-two
    choices' random stream starts afresh)."""

    admissions: tuple[AdmissionSnapshot | None, ...]
    closed_scopes: tuple[int, ...]
    sessions: tuple[SessionSnapshot, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolPoolLoad:
    """One node's CPU tool pool as admission sees it."""

    num_in_flight: int
    num_workers: int
    wait_ema_s: float


def scope_signals(
    engines: Sequence[EngineLoad | float],
    pools: Sequence[ToolPoolLoad],
    *,
    kv_capacity_tokens: int = 0,
    observed_s: float | None = None,
) -> ClusterSignals:
    """The signals of one admission scope (the simulator, the vLLM bench and the Ray
    scheduler all build them here): the mean KV working set of its engines
    (:attr:`EngineLoad.kv_working_set`; a bare float is taken as that figure), tool
    load summed over its nodes' pools. ``kv_capacity_tokens`` is the scope's KV in
    tokens (0: unknown), ``observed_s`` when the engines were polled (None: now)."""
    kvs = [e if isinstance(e, float | int) else e.kv_working_set for e in engines]
    # a mixed cluster's mean is weighted by each engine's capacity (its share of the KV)
    weights = [1.0 if isinstance(e, float | int) else e.capacity_weight for e in engines]
    total = sum(weights)
    return ClusterSignals(
        kv_usage=sum(k * w for k, w in zip(kvs, weights, strict=True)) / total if kvs else 0.0,
        num_tools_in_flight=sum(p.num_in_flight for p in pools),
        num_tool_workers=sum(p.num_workers for p in pools),
        tool_wait_ema_s=sum(p.wait_ema_s for p in pools) / len(pools) if pools else 0.0,
        kv_capacity_tokens=kv_capacity_tokens,
        observed_s=observed_s,
    )


class ClusterScheduler:
    """Admission and placement for every session in the cluster."""

    def __init__(
        self,
        spec: PolicySpec,
        config: PolicyConfig,
        num_engines: int,
        rng: random.Random,
        *,
        capacity_weights: Sequence[float] | None = None,
    ) -> None:
        self._spec = spec
        self._placement: PlacementPolicy = spec.make_placement(rng)
        per_engine = spec.admission_scope == "engine"
        self._num_scopes = num_engines if per_engine else 1
        # windows scale with capacity: a GPU counts as its weight (1 on a uniform cluster)
        weights = list(capacity_weights or [1.0] * num_engines)
        if len(weights) != num_engines or min(weights) <= 0:
            raise ValueError(f"need {num_engines} positive capacity weights, got {weights}")
        if not spec.capacity_weighted:
            weights = [1.0] * num_engines
        scope_gpus = weights if per_engine else [sum(weights)]
        self.admissions: list[AdmissionPolicy] = [
            spec.make_admission(config, gpus) for gpus in scope_gpus
        ]
        self._queued: list[dict[str, SessionTicket]] = [{} for _ in range(self._num_scopes)]
        self._num_active = [0] * self._num_scopes
        self._closed_scopes: set[int] = set()  # engines gone for good (per-engine scopes)
        self._tool_prior_s = config.retention.tool_time_prior_s
        self._tool_alpha = config.retention.tool_time_ema_alpha
        self._late_binding = spec.late_binding or per_engine
        self._work_conserving = spec.work_conserving
        self._rebalance = RebalanceRule() if spec.rebalance and not per_engine else None
        self._in_tool: dict[str, None] = {}  # admitted sessions between turns (ordered)
        self.sessions: dict[str, SessionState] = {}
        self._next_seq = 0

    @property
    def per_engine_admission(self) -> bool:
        return self._num_scopes > 1

    # -- sessions -------------------------------------------------------------
    def on_session_arrival(
        self, ticket: SessionTicket, now_s: float, engines: Sequence[EngineLoad]
    ) -> list[Placement]:
        """A session arrived; returns the sessions (this or others) that start now."""
        if ticket.session_id in self.sessions:
            raise ValueError(f"session {ticket.session_id!r} arrived twice")
        scope = 0
        if self.per_engine_admission:  # the local router picks the engine up front
            scope = self._placement.place_new(ticket.session_id, engines)
        state = SessionState(ticket, scope, tools=ToolHistory(self._tool_alpha, self._tool_prior_s))
        if self.per_engine_admission:
            state.last_engine_id = scope
        elif not self._late_binding:  # bound on arrival, started when admitted
            state.last_engine_id = self._placement.place_new(ticket.session_id, engines)
        self.sessions[ticket.session_id] = state
        self._queue(state)
        return self._admit(scope, now_s, list(engines))

    def on_turn_finished(self, session_id: str, service_tokens: int, service_s: float) -> None:
        """A turn ended; record its GPU service (tokens computed, step time scheduled)."""
        state = self.sessions[session_id]
        state.service_tokens += service_tokens
        state.service_s += service_s
        if state.next_turn == 0:
            self.admissions[state.scope].on_first_turn_done(session_id)
        state.next_turn += 1
        self._in_tool[session_id] = None  # until its tool ends or the session does

    def on_tool_finished(
        self, session_id: str, tool_s: float, engines: Sequence[EngineLoad]
    ) -> Placement:
        """The tool after a turn ended: place the session's next turn."""
        state = self.sessions[session_id]
        state.tools.observe(tool_s)
        self._in_tool.pop(session_id, None)
        engine_id = self._placement.place_continuation(session_id, state.last_engine_id, engines)
        state.last_engine_id = engine_id
        return Placement(session_id, state.next_turn, engine_id)

    def on_kv_moved(self, session_id: str, engine_id: int) -> None:
        """The session's KV now lives on ``engine_id`` (the runtime migrated it):
        KV-affine placement brings its next turn there. Not for policies whose
        admission is per engine (the engine is the session's admission scope)."""
        if self.per_engine_admission:
            raise ValueError("sessions do not move under per-engine admission")
        self.sessions[session_id].last_engine_id = engine_id

    def on_engine_lost(self, session_id: str, engines: Sequence[EngineLoad]) -> Placement:
        """The engine running the session's turn failed: place the turn again on one of
        ``engines`` (the live ones) as if the session had no KV anywhere."""
        state = self.sessions[session_id]
        engine_id = self._placement.place_continuation(session_id, None, engines)
        state.last_engine_id = engine_id
        return Placement(session_id, state.next_turn, engine_id)

    def on_engine_removed(
        self, engine_id: int, now_s: float, engines: Sequence[EngineLoad]
    ) -> list[Placement]:
        """Engine ``engine_id`` is gone for good; ``engines`` are the live ones.

        Under a global window nothing changes here (turns on the engine are re-placed
        by :meth:`on_engine_lost`). Under per-engine admission the engine's scope
        admits no one again: the sessions queued there move to live engines' scopes
        (placed as the local router places arrivals, keeping their tickets, so their
        arrival order holds) and start if those windows allow. Its admitted sessions
        keep counting against its closed window until they end."""
        if not self.per_engine_admission or engine_id in self._closed_scopes:
            return []
        self._closed_scopes.add(engine_id)
        stranded, self._queued[engine_id] = self._queued[engine_id], {}
        if stranded and not engines:
            raise ValueError("no live engine to move the queued sessions to")
        scopes = set()
        for session_id in stranded:
            scope = self._placement.place_new(session_id, engines)
            state = self.sessions[session_id]
            state.scope = state.last_engine_id = scope
            self._queue(state)
            scopes.add(scope)
        started: list[Placement] = []
        live = list(engines)
        for scope in sorted(scopes):
            started += self._admit(scope, now_s, live)
        return started

    def on_session_finished(
        self, session_id: str, now_s: float, engines: Sequence[EngineLoad]
    ) -> list[Placement]:
        """The last turn ended: free the admission slot, admit whoever is next."""
        state = self.sessions[session_id]
        if state.phase is not SessionPhase.ACTIVE:
            raise ValueError(f"session {session_id!r} finished while {state.phase.value}")
        state.phase = SessionPhase.DONE
        self._in_tool.pop(session_id, None)
        self._num_active[state.scope] -= 1
        self.admissions[state.scope].on_session_done(session_id)
        return self._admit(state.scope, now_s, list(engines))

    def forget(self, session_id: str) -> None:
        """Drop a finished session's record. A server that runs for days must not keep
        every session it served (the simulator keeps them for its results), and an id
        that comes back after its session ended must arrive anew (admission), not
        continue a finished record. Unknown ids are ignored; a session not yet DONE is
        an error."""
        state = self.sessions.get(session_id)
        if state is None:
            return
        if state.phase is not SessionPhase.DONE:
            raise ValueError(f"session {session_id!r} is {state.phase.value}, not done")
        del self.sessions[session_id]

    def on_session_cancelled(
        self, session_id: str, now_s: float, engines: Sequence[EngineLoad]
    ) -> list[Placement]:
        """A session left before finishing (client gone, closed early, failed): drop
        it from the queue or free its slot; returns the sessions that start now."""
        state = self.sessions[session_id]
        if state.phase is SessionPhase.QUEUED:
            del self._queued[state.scope][session_id]
            state.phase = SessionPhase.DONE
            return []
        if state.phase is SessionPhase.ACTIVE:
            return self.on_session_finished(session_id, now_s, engines)
        return []

    def predicted_tool_s(self, session_id: str) -> float:
        return self.sessions[session_id].tools.predict_s()

    # -- admission ------------------------------------------------------------
    def on_tick(
        self,
        signals: Sequence[ClusterSignals],
        now_s: float,
        engines: Sequence[EngineLoad],
    ) -> tuple[list[AdmissionDecision], list[Placement]]:
        """Control tick: one signal set per admission scope; returns decisions and starts."""
        decisions = [a.on_tick(s, now_s) for a, s in zip(self.admissions, signals, strict=True)]
        started: list[Placement] = []
        live = list(engines)  # updated as sessions are placed on them below
        for scope in range(self._num_scopes):
            started += self._admit(scope, now_s, live)
            if self._work_conserving:
                started += self._conserve_work(scope, now_s, live)
        return decisions, started

    def _admit(self, scope: int, now_s: float, engines: list[EngineLoad]) -> list[Placement]:
        """Start the sessions this scope's window lets in; ``engines`` (a private copy)
        is updated as they are placed."""
        queued = self._queued[scope]
        if not queued or scope in self._closed_scopes:
            return []
        window = self.admissions[scope].window()
        free = len(queued) if window is None else window - self._num_active[scope]
        if free <= 0:
            return []
        started = []
        for ticket in self.admissions[scope].select(list(queued.values()), free):
            del queued[ticket.session_id]
            started.append(self._start(ticket.session_id, now_s, engines))
        return started

    def _conserve_work(
        self, scope: int, now_s: float, engines: list[EngineLoad]
    ) -> list[Placement]:
        """Work conservation: while sessions wait in this scope's queue, a GPU with
        nothing running or waiting takes one of them beyond the window, unless that
        would thrash: admission reports an overload (KV or CPU) or stale signals, or
        the GPU's KV working set is at or above ``WORK_CONSERVATION_KV_BELOW``. The
        admission's own gates (long prefills, KV fit) still apply."""
        queued = self._queued[scope]
        if not queued or scope in self._closed_scopes:
            return []
        admission = self.admissions[scope]
        if not admission.may_exceed_window():
            return []
        idle = [
            e
            for e in engines
            if e.num_running == 0
            and e.num_waiting == 0
            and e.kv_working_set < WORK_CONSERVATION_KV_BELOW
            and (not self.per_engine_admission or e.engine_id == scope)
        ]
        if not idle:
            return []
        idle.sort(key=lambda e: (e.load_score, e.engine_id))
        started = []
        selected = admission.select(list(queued.values()), len(idle))
        for ticket, engine in zip(selected, idle, strict=False):
            del queued[ticket.session_id]
            state = self.sessions[ticket.session_id]
            if state.last_engine_id is None:
                state.last_engine_id = engine.engine_id
            started.append(self._start(ticket.session_id, now_s, engines))
        return started

    def _start(self, session_id: str, now_s: float, engines: list[EngineLoad]) -> Placement:
        """Admit a queued session and bind it to an engine (late binding: the one with
        room now). ``engines`` is updated in place to count the new turn as waiting on
        its engine, so sessions admitted together spread over the GPUs."""
        state = self.sessions[session_id]
        state.phase = SessionPhase.ACTIVE
        state.admitted_s = now_s
        self._num_active[state.scope] += 1
        if state.last_engine_id is None:
            state.last_engine_id = self._placement.place_new(session_id, engines)
        for i, e in enumerate(engines):
            if e.engine_id == state.last_engine_id:
                engines[i] = dataclasses.replace(e, num_waiting=e.num_waiting + 1)
                break
        return Placement(session_id, 0, state.last_engine_id)

    # -- rebalancing --------------------------------------------------------------
    def rebalance(self, engines: Sequence[EngineLoad]) -> list[Move]:
        """Rebalancing (policies with ``rebalance``): sessions in a tool call that move
        off engines far more loaded than the others (:class:`RebalanceRule`), longest
        predicted tool first, each at most once per tool call. Their next turn is
        placed on the new engine; the caller moves their KV (when the migration rule
        says the copy beats recomputing)."""
        if self._rebalance is None or not self._in_tool:
            return []
        in_tool: dict[int, list[str]] = {}
        for session_id in self._in_tool:
            engine_id = self.sessions[session_id].last_engine_id
            if engine_id is not None:
                in_tool.setdefault(engine_id, []).append(session_id)
        for sessions in in_tool.values():
            sessions.sort(key=lambda s: -self.sessions[s].tools.predict_s())
        moves = []
        for session_id, src, dst in self._rebalance.plan(engines, in_tool):
            self.sessions[session_id].last_engine_id = dst
            del self._in_tool[session_id]  # one move per tool call
            moves.append(Move(session_id, src, dst))
        return moves

    def _queue(self, state: SessionState) -> None:
        state.queued_seq = self._next_seq
        self._next_seq += 1
        self._queued[state.scope][state.ticket.session_id] = state.ticket

    # -- snapshot and restore ----------------------------------------------------------
    def snapshot(self, *, sessions: bool = True) -> ClusterSnapshot:
        """The scheduler's state as a frozen value; ``sessions=False`` leaves the
        session records out (a caller that keeps them one by one,
        :meth:`session_snapshot`)."""
        records = tuple(
            s.snapshot() for s in self.sessions.values() if s.phase is not SessionPhase.DONE
        )
        return ClusterSnapshot(
            admissions=tuple(a.snapshot() for a in self.admissions),
            closed_scopes=tuple(sorted(self._closed_scopes)),
            sessions=records if sessions else (),
        )

    def session_snapshot(self, session_id: str) -> SessionSnapshot | None:
        """One live session's record (None: unknown or done)."""
        state = self.sessions.get(session_id)
        if state is None or state.phase is SessionPhase.DONE:
            return None
        return state.snapshot()

    def restore(
        self, snapshot: ClusterSnapshot, sessions: Sequence[SessionSnapshot] | None = None
    ) -> None:
        """Replace this (fresh) scheduler's state with ``snapshot``'s; ``sessions``, if
        given, instead of the snapshot's own records. Queues are rebuilt in their
        original order, slot counts from the phases."""
        records = snapshot.sessions if sessions is None else sessions
        if len(snapshot.admissions) != self._num_scopes:
            raise ValueError(
                f"snapshot has {len(snapshot.admissions)} admission scopes, "
                f"this scheduler {self._num_scopes}"
            )
        for admission, saved in zip(self.admissions, snapshot.admissions, strict=True):
            admission.restore(saved)
        self._closed_scopes = set(snapshot.closed_scopes)
        self._queued = [{} for _ in range(self._num_scopes)]
        self._num_active = [0] * self._num_scopes
        self.sessions = {}
        for r in sorted(records, key=lambda r: r.queued_seq):
            if r.phase is SessionPhase.DONE:
                continue
            if not 0 <= r.scope < self._num_scopes:
                raise ValueError(f"session {r.session_id!r} has scope {r.scope} out of range")
            tools = ToolHistory(self._tool_alpha, self._tool_prior_s, r.tool_ema_s, r.tool_samples)
            ticket = SessionTicket(r.session_id, r.arrival_s, r.expected_work_tokens)
            state = SessionState(
                ticket,
                r.scope,
                phase=r.phase,
                admitted_s=r.admitted_s,
                next_turn=r.next_turn,
                last_engine_id=r.last_engine_id,
                service_tokens=r.service_tokens,
                service_s=r.service_s,
                tools=tools,
                queued_seq=r.queued_seq,
            )
            self.sessions[r.session_id] = state
            if r.phase is SessionPhase.QUEUED:
                self._queued[r.scope][r.session_id] = ticket
            else:
                self._num_active[r.scope] += 1
        self._next_seq = 1 + max((r.queued_seq for r in records), default=-1)

    def num_queued(self) -> int:
        return sum(len(q) for q in self._queued)

    def num_active(self) -> int:
        return sum(self._num_active)

    def windows(self) -> list[int | None]:
        return [a.window() for a in self.admissions]

    def check_invariants(self) -> None:
        """Every session is in exactly one phase and slot counts match the table."""
        for scope in range(self._num_scopes):
            active = sum(
                1
                for s in self.sessions.values()
                if s.scope == scope and s.phase is SessionPhase.ACTIVE
            )
            queued = sum(
                1
                for s in self.sessions.values()
                if s.scope == scope and s.phase is SessionPhase.QUEUED
            )
            assert active == self._num_active[scope], (scope, active, self._num_active[scope])
            assert queued == len(self._queued[scope]), (scope, queued)
