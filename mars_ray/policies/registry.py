"""Policies by name: MARS, its ablations, and the baselines (docs/design.md §4, §5).

A policy is a bundle of one strategy per family (scheduler, retention, admission,
placement); :data:`POLICIES` maps names to bundles. ``get_policy("pkg.mod:SPEC")``
loads an out-of-tree :class:`PolicySpec`.
"""

from __future__ import annotations

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
from mars_ray.policies.placement import KvAffinePlacement, PowerOfTwoPlacement
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
    """

    name: str
    summary: str
    make_scheduler: Callable[[PolicyConfig], SchedulerPolicy]
    make_retention: Callable[[PolicyConfig], RetentionPolicy]
    aimd_admission: bool = False
    placement: Literal["kv-affine", "power-of-two"] = "kv-affine"
    admission_scope: Literal["global", "engine"] = "global"
    #: admission settings this policy overrides (an ablation turns a mechanism off)
    admission_overrides: tuple[tuple[str, Any], ...] = ()

    def make_admission(self, config: PolicyConfig, num_gpus: int) -> AdmissionPolicy:
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
        return KvAffinePlacement()


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


_add(
    PolicySpec(
        "mars",
        "MARS: AIMD admission, MLFQ = eviction order, KV held by benefit, "
        "chunk shrinking, KV reserved for running prefills, global view",
        _mars(),
        _benefit,
        aimd_admission=True,
    )
)
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
        "MARS inside each engine behind Ray Serve's power-of-two router, no global view",
        _mars(),
        _benefit,
        aimd_admission=True,
        placement="power-of-two",
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
