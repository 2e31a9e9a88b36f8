"""Interfaces of the policy core.

The policy core is pure and synchronous (no Ray, asyncio, torch or vLLM): engines,
the simulator, the Ray actors and vLLM's scheduler are adapters that feed it events
and act on the data it returns. Four narrow families:

* :class:`SchedulerPolicy` - inside one engine: the waiting-queue order, prefill
  chunk quanta, feedback after each step, and the preemption victim.
* :class:`RetentionPolicy` - when a turn ends: what happens to the session's KV
  while its tool runs (the unified eviction order).
* :class:`AdmissionPolicy` - which waiting sessions may start (the AIMD window).
* :class:`PlacementPolicy` - which engine serves a turn.

Times are seconds on an injected clock (``now_s`` arguments); randomness comes
from a seeded ``random.Random`` handed to constructors.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar


class SchedulableRequest(Protocol):
    """What a scheduler policy may read of an engine's request (one turn of a session).

    Engines own the object; policies read these attributes (read-only properties
    here, so an engine may compute them, as vLLM's adapter does) and keep their own
    per-request state in ``policy_state`` (set by :meth:`SchedulerPolicy.on_added`).
    """

    @property
    def request_id(self) -> str: ...
    @property
    def session_id(self) -> str: ...
    @property
    def turn_index(self) -> int: ...
    @property
    def arrival_s(self) -> float: ...  # when this turn reached the engine
    @property
    def session_arrival_s(self) -> float: ...  # when the session arrived in the system
    @property
    def session_context_tokens(self) -> int: ...  # of the prompt: the session's earlier
    # turns, already computed once (0 for a first turn); the rest is the turn's own
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...  # prompt + generated so far: what the KV must cover
    @property
    def num_computed_tokens(self) -> int: ...  # tokens whose KV is computed
    @property
    def num_output_tokens(self) -> int: ...  # generated so far in this turn

    session_service_tokens: int  # attained service (tokens) of the session before this turn
    session_service_s: float  # GPU time the session has been scheduled in so far
    policy_state: Any

    @property
    def num_blocks(self) -> int: ...

    @property
    def is_prefilling(self) -> bool:
        """More than one token left to compute (a decode step computes exactly one)."""
        ...


R = TypeVar("R", bound=SchedulableRequest)


class WaitingQueue(ABC):
    """The engine's waiting queue, in the policy's priority order (head first).

    Mirrors vLLM's ``RequestQueue`` so the same object can back vLLM's scheduler.
    """

    @abstractmethod
    def add(self, request: SchedulableRequest, now_s: float) -> None:
        """Enqueue a new or resumed request."""

    @abstractmethod
    def prepend(self, request: SchedulableRequest, now_s: float) -> None:
        """Put a request back at the head of its class (preempted, or not scheduled)."""

    @abstractmethod
    def peek(self) -> SchedulableRequest | None:
        """The highest-priority request, or None when empty."""

    @abstractmethod
    def pop(self) -> SchedulableRequest:
        """Remove and return the highest-priority request (the queue must not be empty)."""

    @abstractmethod
    def remove(self, request: SchedulableRequest) -> None:
        """Remove a request wherever it is (aborted)."""

    def refresh(self, now_s: float) -> None:  # noqa: B027 - optional hook
        """Apply time-driven changes (aging) before a scheduling pass."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[SchedulableRequest]:
        """Requests in priority order (for inspection; may be O(n log n))."""


class SchedulerPolicy(ABC):
    """Scheduling inside one engine (vLLM-style continuous batching).

    Contract with the engine, per step:
    1. ``waiting.refresh(now)``; running decodes are scheduled first, then running
       prefills in :meth:`order_running_prefills` order, then waiting requests in
       queue order, each prefill chunk capped by :meth:`chunk_quantum_tokens`.
       Budget left over afterwards is handed out again in the same order without
       the cap (work conservation: a request alone is never slowed by quanta).
    2. A waiting request starts only if free KV holds its whole prompt (vLLM's
       admission gate) and, when :attr:`reserves_prefill_kv` is set, also what the
       running prefills still need to finish. When KV allocation fails for a
       running prefill's chunk and :attr:`shrink_chunks` is set, the engine halves
       the chunk down to one block before preempting.
    3. Otherwise it preempts :meth:`choose_victim` among the running requests
       (the largest :meth:`victim_rank`), calls :meth:`on_preempted` and re-queues
       the victim with ``prepend``.
    4. After the step is planned, :meth:`on_scheduled` gets the tokens of each
       request scheduled, except steady decodes (one token for a request that has
       sampled before: it changes nothing a policy ranks by, and skipping it saves a
       call per running request per step). The step that samples a turn's first
       token is reported, so a request leaves prefill state through the hook.
    """

    #: halve prefill chunks on allocation failure before preempting anyone
    shrink_chunks: bool = False
    #: start a waiting request only if the KV the running prefills still need to
    #: finish stays free as well (not only its own prompt, vLLM's gate)
    reserves_prefill_kv: bool = False
    #: :meth:`victim_rank` is not the default newest-first order. An engine whose own
    #: preemption already takes the newest running request (vLLM's) need only apply
    #: the rank when this is set.
    custom_victim_order: bool = False

    @abstractmethod
    def make_waiting_queue(self) -> WaitingQueue:
        """A fresh, empty waiting queue ordered by this policy."""

    def on_added(self, request: SchedulableRequest, now_s: float) -> None:  # noqa: B027
        """A turn reached the engine; initialise ``request.policy_state``."""

    def chunk_quantum_tokens(self, request: SchedulableRequest) -> int | None:
        """Cap on this step's prefill chunk in the first pass; None means no cap."""
        return None

    def order_running_prefills(self, requests: list[R]) -> list[R]:
        """Running requests still prefilling, in the order they get budget."""
        return requests

    def on_scheduled(  # noqa: B027 - optional hook
        self, request: SchedulableRequest, num_tokens: int, now_s: float
    ) -> None:
        """``num_tokens`` of ``request`` were scheduled in this step (the request's
        counts are still the pre-step ones; not called for steady decodes)."""

    def victim_rank(self, request: SchedulableRequest, now_s: float) -> tuple[Any, ...]:
        """Preemption order of a running request: the largest rank is preempted first.

        Ranks of the requests running at ``now_s`` are compared with each other
        only. Default: ``(arrival_s,)``, the newest turn first (vLLM's FCFS victim).
        Engines may sort by it once per step instead of calling :meth:`choose_victim`
        per preemption, so it must not change while a step is planned.
        """
        return (request.arrival_s,)

    def choose_victim(self, running: Sequence[R], now_s: float) -> R:
        """The running request to preempt when KV runs out (``running`` is non-empty):
        the first with the largest :meth:`victim_rank`."""
        return max(running, key=lambda r: self.victim_rank(r, now_s))

    def on_preempted(self, request: SchedulableRequest, now_s: float) -> None:  # noqa: B027
        """``request`` lost its KV and goes back to the waiting queue."""


class RetentionAction(enum.Enum):
    """What happens to a session's KV blocks when its turn ends and a tool starts."""

    #: free to the tail of the free queue (vLLM's LRU prefix cache: evicted last)
    KEEP_LRU = "keep_lru"
    #: free to the head of the free queue: reused (evicted) first
    EVICT_FIRST = "evict_first"
    #: keep the blocks allocated (not evictable) until ``ttl_s`` passes or the session returns
    PIN = "pin"
    #: copy to the CPU tier over PCIe, then free on the GPU to the evict-first end
    OFFLOAD = "offload"


@dataclass(frozen=True, slots=True)
class RetentionDecision:
    action: RetentionAction
    ttl_s: float = 0.0  # only for PIN
    reason: str = ""


@dataclass(frozen=True, slots=True)
class TurnEndContext:
    """Everything a retention policy may weigh when a turn ends."""

    session_id: str
    num_blocks: int  # blocks the session's context occupies on this GPU
    context_tokens: int
    predicted_tool_s: float  # from the session's tool history
    recompute_s: float  # time to re-prefill the context if evicted
    reload_s: float  # time to bring it back from the CPU tier (swap in)
    num_total_blocks: int
    num_used_blocks: int  # blocks held by running or pinned requests
    can_offload: bool  # a CPU tier exists and has room
    is_last_turn: bool = False  # known from session hints: nothing will come back


class RetentionPolicy(ABC):
    """Decides the fate of a session's KV across a tool call."""

    @abstractmethod
    def on_turn_end(self, ctx: TurnEndContext) -> RetentionDecision: ...


@dataclass(frozen=True, slots=True)
class ClusterSignals:
    """Cluster-wide observations fed to admission control each tick."""

    kv_usage: float  # KV working set / capacity, mean over the engines in scope (may exceed 1)
    num_tools_in_flight: int  # running + queued tool calls
    num_tool_workers: int  # CPU cores of the tool pool
    tool_wait_ema_s: float  # EMA of tool delay beyond its uncontended time
    cpu_utilization: float = 0.0
    #: KV capacity of the scope's engines, tokens (0: unknown; admission then packs
    #: no session by its KV, as the authors' controller without block statistics)
    kv_capacity_tokens: int = 0
    #: when the engines' figures were measured, on the policy clock (None: now)
    observed_s: float | None = None

    @property
    def tool_load_ratio(self) -> float:
        return self.num_tools_in_flight / max(1, self.num_tool_workers)


class Pressure(enum.Enum):
    NONE = "none"
    KV = "kv"
    CPU = "cpu"


@dataclass(frozen=True, slots=True)
class AdmissionDecision:
    """The window after a control tick and why it moved."""

    window: int | None  # None: unlimited
    pressure: Pressure
    reason: str


@dataclass(frozen=True, slots=True)
class SessionTicket:
    """A session waiting for admission, as admission control sees it."""

    session_id: str
    arrival_s: float
    expected_work_tokens: int  # what the system knows up front: the first prompt


class AdmissionPolicy(ABC):
    """Admission control: how many sessions may be in flight, and which start next."""

    @abstractmethod
    def window(self) -> int | None:
        """Current window (sessions admitted at once); None means unlimited."""

    @abstractmethod
    def on_tick(self, signals: ClusterSignals, now_s: float) -> AdmissionDecision:
        """Control tick: update the window from the signals."""

    @abstractmethod
    def order(self, waiting: Sequence[SessionTicket]) -> list[SessionTicket]:
        """Waiting sessions in the order they should be admitted."""

    def select(self, waiting: Sequence[SessionTicket], free_slots: int) -> list[SessionTicket]:
        """The sessions to admit now, given ``free_slots`` open in the window (at most
        that many). Default: the first ``free_slots`` in :meth:`order`."""
        return self.order(waiting)[: max(0, free_slots)]

    def may_exceed_window(self) -> bool:
        """Whether work conservation may start a queued session beyond the window on an
        idle GPU now (no overload that one more session would worsen). Default: no."""
        return False

    def on_first_turn_done(self, session_id: str) -> None:  # noqa: B027 - optional hook
        """The admitted session's first turn ended: its first prompt's KV is in the
        engines' own figures now."""

    def on_session_done(self, session_id: str) -> None:  # noqa: B027 - optional hook
        """The admitted session finished or was cancelled."""

    def snapshot(self) -> AdmissionSnapshot | None:
        """The state a restarted scheduler needs to go on where this one stopped (a
        frozen value); None: stateless."""
        return None

    def restore(self, snapshot: AdmissionSnapshot | None) -> None:
        """Take up the state of :meth:`snapshot` (of the same kind of policy)."""
        if snapshot is not None:
            raise ValueError(f"{type(self).__name__} has no state to restore")


@dataclass(frozen=True, slots=True)
class AdmissionSnapshot:
    """An admission window's state (:meth:`AdmissionPolicy.snapshot`): the window, the
    overload flags and pressure of the last tick, its signals, and the admitted
    sessions still in their first turn (``(session id, first prompt tokens, long)``)."""

    window: float
    pressure: Pressure
    cpu_overloaded: bool
    kv_overloaded: bool
    stale: bool
    signals: ClusterSignals | None
    first_turns: tuple[tuple[str, int, bool], ...]


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One engine as placement sees it."""

    engine_id: int
    node_id: int
    kv_usage: float
    num_running: int
    num_waiting: int
    capacity_weight: float = 1.0  # relative speed (an H200 beside an H100 > 1)
    kv_demand: float = 0.0  # working set incl. KV kept for sessions in tools (may exceed 1)
    #: the CPU tool pool of the engine's node: tools in flight per core (0: unknown).
    #: A session's tools run on its GPU's node; CPU-aware placement reads this.
    node_tool_load: float = 0.0
    #: lower is better: queue depth and KV working set, scaled by capacity. Derived
    #: once here: placement compares every engine's score at every decision.
    load_score: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kv = self.kv_working_set
        score = (self.num_running + 2.0 * self.num_waiting + 64.0 * kv) / (self.capacity_weight)
        object.__setattr__(self, "load_score", score)  # frozen: the dataclass idiom

    @property
    def kv_working_set(self) -> float:
        """The KV signal admission and placement read (docs/design.md §4.1): the
        working set where the engine reports one, never below plain usage (an engine
        that reports no working set, vLLM's, gives its usage with pins counted)."""
        return max(self.kv_usage, self.kv_demand)


class PlacementPolicy(ABC):
    """Chooses the engine for each turn."""

    @abstractmethod
    def place_new(self, session_id: str, engines: Sequence[EngineLoad]) -> int:
        """Engine id for a session's first turn."""

    @abstractmethod
    def place_continuation(
        self, session_id: str, last_engine_id: int | None, engines: Sequence[EngineLoad]
    ) -> int:
        """Engine id for a later turn; ``last_engine_id`` holds the session's KV, if any."""
