"""Policies by name: MARS, its ablations, and the baselines (docs/design.md §4, §5).

A policy is a bundle of one strategy per family (scheduler, retention, admission,
placement); :data:`POLICIES` maps names to bundles. ``get_policy("pkg.mod:SPEC")``
loads an out-of-tree :class:`PolicySpec`.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from mars_ray.config import (
    AdmissionConfig,
    FrozenConfig,
    MigrationConfig,
    MlfqConfig,
    RetentionConfig,
)
from mars_ray.policies.admission import AimdAdmission, UnlimitedAdmission
from mars_ray.policies.base import (
    AdmissionPolicy,
    PlacementPolicy,
    RetentionPolicy,
    SchedulerPolicy,
)
from mars_ray.policies.baselines import FcfsScheduler, PlasScheduler, ProgramFcfsScheduler
from mars_ray.policies.migration import KvMigrationRule
from mars_ray.policies.mlfq import MlfqScheduler
from mars_ray.policies.placement import (
    KvAffinePlacement,
    PowerOfTwoPlacement,
    SessionAffinePlacement,
)
from mars_ray.policies.retention import (
    BenefitRetention,
    LruRetention,
    MinWasteRetention,
    TtlPinRetention,
)
from mars_ray.registry import Registry


class PolicyConfig(FrozenConfig):
    """Tunables of every policy family."""

    mlfq: MlfqConfig = Field(default_factory=MlfqConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    migration: MigrationConfig = Field(default_factory=MigrationConfig)


@dataclass(frozen=True)
class PolicySpec:
    """One named policy: a strategy per family.

    ``admission_scope`` is ``"global"`` (one window over the cluster, held by the
    global scheduler) or ``"engine"`` (a window per engine over its own signals).

    The global scheduler's mechanisms (docs/design.md §9), each a switch:
    ``late_binding`` (a queued session binds to a GPU when admitted, not on arrival),
    ``work_conserving`` (an idle GPU takes a queued session beyond the window unless
    that would thrash), ``cpu_aware`` (new sessions go where their node's tool pool
    has room) and ``rebalance`` (sessions in a tool call move, KV and all, off a GPU
    whose load is far above the others).
    """

    name: str
    summary: str
    make_scheduler: Callable[[PolicyConfig], SchedulerPolicy]
    make_retention: Callable[[PolicyConfig], RetentionPolicy]
    aimd_admission: bool = False
    placement: Literal["kv-affine", "session-affine", "power-of-two"] = "kv-affine"
    admission_scope: Literal["global", "engine"] = "global"
    #: admission settings this policy overrides (an ablation turns a mechanism off)
    admission_overrides: tuple[tuple[str, Any], ...] = ()
    late_binding: bool = True
    #: engines' capacity weights (KV capacity relative to the smallest GPU's) weigh
    #: placement scores and admission windows; off: every GPU counts as one
    capacity_weighted: bool = True
    work_conserving: bool = False
    cpu_aware: bool = False
    rebalance: bool = False

    def make_admission(self, config: PolicyConfig, num_gpus: float) -> AdmissionPolicy:
        if not self.aimd_admission:
            return UnlimitedAdmission()
        admission = config.admission
        if self.admission_overrides:
            values = admission.model_dump() | dict(self.admission_overrides)
            admission = AdmissionConfig.model_validate(values)
        return AimdAdmission(admission, num_gpus)

    def make_migration(
        self, config: PolicyConfig, kv_bytes_per_token: int
    ) -> KvMigrationRule | None:
        """The KV migration rule, or None when this policy's sessions never take their
        KV along: migration off, or a local router that does not know where KV is."""
        if not config.migration.enabled or self.placement != "kv-affine":
            return None
        return KvMigrationRule(config.migration, kv_bytes_per_token)

    def make_placement(self, rng: random.Random) -> PlacementPolicy:
        if self.placement == "power-of-two":
            return PowerOfTwoPlacement(rng)
        if self.placement == "session-affine":
            return SessionAffinePlacement()
        return KvAffinePlacement(cpu_aware=self.cpu_aware)


POLICIES: Registry[PolicySpec] = Registry("policy")


def _add(spec: PolicySpec) -> None:
    POLICIES.add(spec.name, spec)


def _mars(
    shrink: bool = True, unified: bool = True, reserve: bool = True
) -> Callable[[PolicyConfig], SchedulerPolicy]:
    return lambda c: MlfqScheduler(
        c.mlfq, shrink_chunks=shrink, unified_eviction=unified, reserve_prefill_kv=reserve
    )


def _lru(_: PolicyConfig) -> RetentionPolicy:
    return LruRetention()


def _benefit(c: PolicyConfig) -> RetentionPolicy:
    return BenefitRetention(c.retention)


_MARS = PolicySpec(
    "mars",
    "MARS: AIMD admission, MLFQ = eviction order, KV held by benefit, "
    "chunk shrinking, KV reserved for running prefills, global view "
    "(late binding, work conservation, CPU-aware placement, rebalancing)",
    _mars(),
    _benefit,
    aimd_admission=True,
    work_conserving=True,
    cpu_aware=True,
    rebalance=True,
)
_add(_MARS)
# The global scheduler's mechanisms, one off at a time (docs/design.md §9).
for _name, _summary, _switch in (
    (
        "mars-early-bind",
        "MARS with each session bound to a GPU when it arrives (the global queue "
        "kept): no late binding",
        "late_binding",
    ),
    (
        "mars-no-work-conservation",
        "MARS leaving GPUs idle while sessions wait for the window",
        "work_conserving",
    ),
    (
        "mars-no-cpu-aware",
        "MARS placing new sessions by GPU load alone, blind to the nodes' tool pools",
        "cpu_aware",
    ),
    ("mars-no-rebalance", "MARS never moving sessions during their tool calls", "rebalance"),
    (
        "mars-no-capacity-weight",
        "MARS counting every GPU as one in placement and the window (mixed clusters)",
        "capacity_weighted",
    ),
):
    _off: dict[str, Any] = {_switch: False}
    _add(dataclasses.replace(_MARS, name=_name, summary=_summary, **_off))
_add(PolicySpec("mars-no-admission", "MARS without the admission window", _mars(), _benefit))
_add(
    PolicySpec(
        "mars-no-shrink",
        "MARS without chunk shrinking",
        _mars(shrink=False),
        _benefit,
        aimd_admission=True,
    )
)
_add(
    PolicySpec(
        "mars-no-unified-eviction",
        "MARS with vLLM's victim and LRU retention",
        _mars(unified=False),
        _lru,
        aimd_admission=True,
    )
)
_add(
    PolicySpec(
        "mars-no-reserve",
        "MARS starting prefills on vLLM's gate alone (no KV reserved for running prefills)",
        _mars(reserve=False),
        _benefit,
        aimd_admission=True,
    )
)
for _name, _summary, _overrides in (
    (
        "mars-no-hysteresis",
        "MARS with overload read afresh each tick (no hysteresis)",
        (("hysteresis", False),),
    ),
    ("mars-no-long-gate", "MARS without the long-prefill gate", (("long_prefill_tokens", 0),)),
    (
        "mars-no-kv-fit",
        "MARS admitting without packing first prompts into free KV",
        (("kv_fit", False),),
    ),
    (
        "mars-no-stale-guard",
        "MARS trusting signals of any age",
        (("stale_signal_after_s", math.inf),),
    ),
):
    _add(
        PolicySpec(
            _name, _summary, _mars(), _benefit, aimd_admission=True, admission_overrides=_overrides
        )
    )
_add(
    PolicySpec(
        "mars-local",
        "MARS inside each engine behind Ray Serve's default power-of-two router "
        "(no session affinity, no global view): the naive deployment",
        _mars(),
        _benefit,
        aimd_admission=True,
        placement="power-of-two",
        admission_scope="engine",
    )
)
_add(
    PolicySpec(
        "mars-local-affine",
        "MARS inside each engine, its own window over its own signals, behind a "
        "session-affine load-aware router (new sessions to the least-loaded GPU on "
        "arrival, continuations to their GPU; no KV migration, no global queue): "
        "the strongest per-GPU deployment",
        _mars(),
        _benefit,
        aimd_admission=True,
        placement="session-affine",
        admission_scope="engine",
    )
)
_add(
    PolicySpec(
        "fcfs",
        "vLLM default: FCFS, chunked prefill, preempt newest, LRU prefix cache",
        lambda c: FcfsScheduler(),
        _lru,
    )
)
_add(
    PolicySpec(
        "autellix",
        "Autellix PLAS: priority by session attained service",
        lambda c: PlasScheduler(),
        _lru,
    )
)
_add(
    PolicySpec(
        "continuum",
        "Continuum: TTL-pinned KV across short tools, program-level FCFS",
        lambda c: ProgramFcfsScheduler(),
        lambda c: TtlPinRetention(c.retention),
    )
)
_add(
    PolicySpec(
        "infercept",
        "InferCept: preserve / discard / swap by minimum waste",
        lambda c: FcfsScheduler(),
        lambda c: MinWasteRetention(),
    )
)


def get_policy(name: str) -> PolicySpec:
    """The policy named ``name`` (or an import path); unknown names list the known ones."""
    return POLICIES.get(name)
