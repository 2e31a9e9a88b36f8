"""Frozen, validated configuration: one model per concern.

Every model rejects unknown keys and out-of-range values at construction (pydantic
raises; :func:`validated` turns that into a one-line :class:`ConfigError`), and is
never mutated afterwards. Defaults are the MARS paper's released-code values
(docs/design.md §4.8) and vLLM's engine defaults.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mars_ray.errors import ConfigError


class FrozenConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


C = TypeVar("C", bound=FrozenConfig)


def validated(cls: type[C], **values: Any) -> C:
    """Build ``cls(**values)``, turning validation errors into one-line ConfigErrors."""
    try:
        return cls(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or cls.__name__
        raise ConfigError(f"{cls.__name__}.{where}: {first['msg']}") from None


class MlfqConfig(FrozenConfig):
    """Multi-level feedback queue (docs/design.md §4.3)."""

    quanta_tokens: tuple[int, ...] = Field(
        (2048, 1024, 512, 256), description="per-step prefill token quantum of each level"
    )
    prefill_bucket_tokens: tuple[int, ...] = Field(
        (2048, 8192, 32768),
        description="remaining-prefill bounds of levels 0..n-2; larger: last level",
    )
    aging_s: float = Field(30.0, gt=0, description="promote one level per this long unserved")

    @model_validator(mode="after")
    def _check(self) -> MlfqConfig:
        if len(self.quanta_tokens) < 1 or any(q <= 0 for q in self.quanta_tokens):
            raise ValueError("quanta_tokens must be positive")
        if len(self.prefill_bucket_tokens) != len(self.quanta_tokens) - 1:
            raise ValueError("prefill_bucket_tokens needs one bound fewer than quanta_tokens")
        if list(self.prefill_bucket_tokens) != sorted(self.prefill_bucket_tokens):
            raise ValueError("prefill_bucket_tokens must increase")
        return self

    @property
    def num_levels(self) -> int:
        return len(self.quanta_tokens)


class AdmissionConfig(FrozenConfig):
    """AIMD admission window over KV and CPU signals (docs/design.md §4.2).

    Window bounds are per GPU; the cluster window scales them by the GPU count.
    """

    tick_s: float = Field(0.2, gt=0, description="control period")
    window_init_per_gpu: int = Field(30, ge=1)
    window_min_per_gpu: int = Field(4, ge=1)
    window_max_per_gpu: int = Field(30, ge=1)
    additive_increase: float = Field(1.0, gt=0)
    multiplicative_decrease: float = Field(0.7, gt=0, lt=1)
    kv_increase_below: float = Field(0.85, gt=0, le=1, description="grow only at or below")
    kv_decrease_above: float = Field(0.90, gt=0, le=1, description="shrink at or above")
    cpu_healthy_ratio: float = Field(1.0, gt=0, description="tools in flight / workers")
    cpu_overload_ratio: float = Field(2.0, gt=0)
    tool_wait_healthy_s: float = Field(2.0, ge=0)
    tool_wait_overload_s: float = Field(5.0, ge=0)
    tool_wait_ema_alpha: float = Field(0.2, gt=0, le=1)
    tool_worker_cap_factor: float = Field(1.5, gt=0, description="W <= ceil(f * tool workers)")
    # Mechanisms of the authors' released admission controller (MARS_preview,
    # experiments/openhands/run_task_workload.py; docs/design.md §4.2).
    hysteresis: bool = Field(
        True,
        description="overload flags: set at the high marks (kv_decrease_above, "
        "cpu_overload_ratio / tool_wait_overload_s), cleared only at the low marks",
    )
    long_prefill_tokens: int = Field(
        50_000, ge=0, description="a session whose first prompt exceeds this is long; 0: off"
    )
    long_max_in_flight_per_gpu: int = Field(
        1, ge=0, description="long sessions admitted and still in their first turn"
    )
    tail_long_max_in_flight_per_gpu: int = Field(
        3, ge=0, description="the same when only long sessions are queued (tail mode)"
    )
    kv_fit: bool = Field(
        True,
        description="admit only sessions whose first prompt fits the KV left below "
        "kv_decrease_above (less what admitted first turns will still take)",
    )
    tail_kv_budget_frac: float = Field(
        1.0, gt=0, le=1, description="KV fraction long sessions may fill in tail mode"
    )
    stale_signal_after_s: float = Field(
        2.0, gt=0, description="signals older than this are stale: a small fixed window"
    )
    stale_window_per_gpu: int = Field(2, ge=1, description="the window while signals are stale")

    @model_validator(mode="after")
    def _check(self) -> AdmissionConfig:
        if not self.window_min_per_gpu <= self.window_init_per_gpu <= self.window_max_per_gpu:
            raise ValueError("need window_min_per_gpu <= window_init_per_gpu <= window_max_per_gpu")
        if self.kv_increase_below > self.kv_decrease_above:
            raise ValueError("kv_increase_below must not exceed kv_decrease_above")
        if self.cpu_healthy_ratio > self.cpu_overload_ratio:
            raise ValueError("cpu_healthy_ratio must not exceed cpu_overload_ratio")
        if self.tool_wait_healthy_s > self.tool_wait_overload_s:
            raise ValueError("tool_wait_healthy_s must not exceed tool_wait_overload_s")
        return self


class RetentionConfig(FrozenConfig):
    """KV retention across tool calls (MARS, Continuum, InferCept)."""

    tool_time_prior_s: float = Field(1.0, ge=0, description="predicted tool time with no history")
    tool_time_ema_alpha: float = Field(0.5, gt=0, le=1)
    continuum_pin_below_s: float = Field(2.0, ge=0, description="pin KV when predicted tool < this")
    continuum_ttl_factor: float = Field(1.5, gt=0, description="TTL = factor * predicted tool time")
    mars_hold_ttl_factor: float = Field(
        1.5, gt=0, description="MARS holds KV it keeps for factor * predicted tool time"
    )


class MigrationConfig(FrozenConfig):
    """Moving a session's KV between GPUs when placement sends its next turn to
    another one (the global scheduler's placement only; a local router knows no KV).

    The link figures are effective point-to-point rates for one transfer, not the
    links' peaks: NVLink 4 on an H100 node peaks at 450 GB/s per direction and NCCL
    send/recv reaches well under that for one pair; a 200 Gb/s RDMA NIC is 25 GB/s.
    """

    enabled: bool = True
    intra_node_gb_per_s: float = Field(
        300.0, gt=0, description="GPU to GPU on one node (NVLink), GB/s"
    )
    inter_node_gb_per_s: float = Field(
        25.0, gt=0, description="GPU to GPU across nodes (RDMA NIC), GB/s"
    )
    setup_ms: float = Field(
        2.0, ge=0, description="fixed cost of one transfer (rendezvous, launch), ms"
    )


class EngineConfig(FrozenConfig):
    """One simulated (or vLLM) engine: vLLM V1's defaults for an online server."""

    block_size: int = Field(16, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=16, description="token budget per step")
    max_num_seqs: int = Field(256, ge=1)
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    enable_prefix_caching: bool = True
    reserve_full_prompt: bool = Field(
        True,
        description="start a waiting request only if free KV holds its whole prompt "
        "(vLLM 0.29's scheduler_reserve_full_isl, on by default there)",
    )
    cpu_offload_gb: float = Field(
        0.0, ge=0, description="CPU KV tier size; 0 disables offload (policies then discard)"
    )
    num_gpu_blocks_override: int | None = Field(None, ge=1, description="for tests")


class ClusterConfig(FrozenConfig):
    """GPUs, nodes and the CPU tool pool."""

    num_gpus: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    gpu: str = "h100-80gb"
    model: str = "llama-3.1-8b"
    cpu_cores_per_gpu: int = Field(16, ge=1, description="tool-pool cores per GPU on a node")
    node_gpus: tuple[str, ...] | None = Field(
        None, description="GPU name of each node (a mixed cluster); None: every node has gpu"
    )
    node_cpu_cores: tuple[int, ...] | None = Field(
        None,
        description="tool-pool cores of each node; None: cpu_cores_per_gpu x GPUs per node",
    )

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if self.num_gpus % self.num_nodes:
            raise ValueError(
                f"num_gpus ({self.num_gpus}) must be a multiple of num_nodes ({self.num_nodes})"
            )
        for name, values in (
            ("node_gpus", self.node_gpus),
            ("node_cpu_cores", self.node_cpu_cores),
        ):
            if values is not None and len(values) != self.num_nodes:
                raise ValueError(
                    f"{name} needs one value per node ({self.num_nodes}), got {len(values)}"
                )
        if self.node_cpu_cores is not None and min(self.node_cpu_cores) < 1:
            raise ValueError("node_cpu_cores must be >= 1")
        return self

    def node_gpu(self, node_id: int) -> str:
        """The GPU name of node ``node_id``."""
        return self.gpu if self.node_gpus is None else self.node_gpus[node_id]

    def node_cores(self, node_id: int) -> int:
        """The tool-pool cores of node ``node_id``."""
        if self.node_cpu_cores is not None:
            return self.node_cpu_cores[node_id]
        return self.cpu_cores_per_node

    @property
    def gpu_names(self) -> tuple[str, ...]:
        """Every GPU's name, in engine order."""
        return tuple(self.node_gpu(i // self.gpus_per_node) for i in range(self.num_gpus))

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    @property
    def cpu_cores_per_node(self) -> int:
        return self.cpu_cores_per_gpu * self.gpus_per_node
