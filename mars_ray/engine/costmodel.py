"""GPU step-time cost model of the simulated engine (docs/design.md §6).

One continuous-batching step with ``N`` scheduled tokens over ``n`` sequences, decode
contexts ``c_i`` and prefill chunks ``q_j`` on prior contexts ``p_j`` takes::

    T = c0 + c_seq*n
      + max(2*P*N / F_eff, W(N) / B_eff)                 dense layers: compute vs weight read
      + (sum c_i + sum p_j) * kv_bytes_per_token / B_eff  attention KV reads
      + sum_j 4*L*d_attn*q_j*(p_j + q_j/2) / F_attn       causal prefill attention FLOPs

``P`` is the active parameter count, ``L`` the layer count and ``d_attn`` the query
heads x head dim. ``W(N)`` is the weight bytes one step reads: all of a dense model;
for a mixture-of-experts model the shared bytes plus the routed-expert bytes times the
expected fraction of distinct experts that ``N`` tokens touch, ``1 - (1 - k/E)**N``.

Constants come from a :class:`Profile`, one JSON data file per (GPU, model) pair under
``profiles/``, each constant with its provenance (see ``docs/costmodel.md``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mars_ray.config import EngineConfig
from mars_ray.errors import ConfigError, UnknownNameError

PROFILES_DIR = Path(__file__).parent / "profiles"
_PAIR_SEP = "__"

ProvenanceKind = Literal["datasheet", "measured", "fit", "config", "derived", "estimate"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Provenance(_Frozen):
    """How one constant was obtained: the kind of source and the specifics."""

    kind: ProvenanceKind
    detail: str = Field(min_length=1)


class GpuSpec(_Frozen):
    """Facts of one GPU, as the cost model uses them."""

    name: str = Field(min_length=1)
    description: str = ""
    hbm_bytes: int = Field(gt=0, description="total device memory")
    b_eff_bytes_per_s: float = Field(gt=0, description="achieved HBM read bandwidth")
    f_eff_flops_per_s: float = Field(gt=0, description="achieved dense-layer bf16 FLOP rate")
    f_attn_flops_per_s: float = Field(gt=0, description="achieved prefill attention FLOP rate")
    pcie_bytes_per_s: float = Field(gt=0, description="achieved host<->device copy rate")


class ModelSpec(_Frozen):
    """Shape of one model (from its config.json) and its bf16 weights."""

    name: str = Field(min_length=1)
    hf_id: str = ""
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_q_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(ge=0)
    moe_intermediate_size: int = Field(ge=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool
    num_experts: int = Field(ge=1, description="routed experts per layer; 1 for dense")
    experts_per_token: int = Field(ge=1)
    max_model_len_tokens: int = Field(gt=0)
    total_params: int = Field(gt=0)
    active_params: int = Field(gt=0, description="parameters one token computes with")
    weight_bytes: int = Field(gt=0, description="resident weight bytes")
    expert_weight_fraction: float = Field(ge=0, lt=1, description="routed-expert share of bytes")
    kv_dtype_bytes: int = Field(gt=0)

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.experts_per_token > self.num_experts:
            raise ValueError("experts_per_token must not exceed num_experts")
        if self.num_experts == 1 and self.expert_weight_fraction != 0:
            raise ValueError("a dense model (num_experts 1) has expert_weight_fraction 0")
        if self.active_params > self.total_params:
            raise ValueError("active_params must not exceed total_params")
        return self


class EngineSpec(_Frozen):
    """Per-(GPU, model) constants of a vLLM engine: step overheads and memory reserve."""

    c0_s: float = Field(ge=0, description="fixed cost of one step")
    c_seq_s: float = Field(ge=0, description="cost per scheduled sequence")
    reserve_bytes: int = Field(ge=0, description="activations, CUDA graphs, non-torch memory")


_UNTRACKED_FIELDS = frozenset({"gpu.name", "gpu.description", "model.name", "model.hf_id"})


class Profile(_Frozen):
    """One (GPU, model) pair: GPU facts, model shape, engine constants, provenance.

    ``provenance`` maps every constant, as ``section.field``, to how it was obtained;
    a profile missing one (or naming a field that does not exist) is rejected.
    """

    schema_version: Literal[1] = 1
    gpu: GpuSpec
    model: ModelSpec
    engine: EngineSpec
    provenance: dict[str, Provenance]

    @model_validator(mode="after")
    def _check_provenance(self) -> Profile:
        fields = {
            f"{section}.{name}"
            for section, spec in (("gpu", self.gpu), ("model", self.model), ("engine", self.engine))
            for name in type(spec).model_fields
        }
        missing = sorted(fields - _UNTRACKED_FIELDS - self.provenance.keys())
        if missing:
            raise ValueError(f"no provenance for {', '.join(missing)}")
        unknown = sorted(self.provenance.keys() - fields)
        if unknown:
            raise ValueError(f"provenance names unknown constants {', '.join(unknown)}")
        return self

    @property
    def name(self) -> str:
        return f"{self.gpu.name}{_PAIR_SEP}{self.model.name}"

    @property
    def kv_bytes_per_token(self) -> int:
        """Layers x (K and V) x KV heads x head dim x dtype bytes."""
        m = self.model
        return m.num_layers * 2 * m.num_kv_heads * m.head_dim * m.kv_dtype_bytes

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


# --- loading -------------------------------------------------------------------------


def _pairs() -> list[tuple[str, str]]:
    pairs = []
    for path in sorted(PROFILES_DIR.glob(f"*{_PAIR_SEP}*.json")):
        gpu, _, model = path.stem.partition(_PAIR_SEP)
        pairs.append((gpu, model))
    return pairs


def known_gpus() -> list[str]:
    """GPU names with at least one bundled profile."""
    return sorted({gpu for gpu, _ in _pairs()})


def known_models() -> list[str]:
    """Model names with at least one bundled profile."""
    return sorted({model for _, model in _pairs()})


def known_profiles() -> list[str]:
    """Bundled ``gpu__model`` pairs."""
    return [f"{gpu}{_PAIR_SEP}{model}" for gpu, model in _pairs()]


def _format_loc(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def load_profile_file(path: str | Path) -> Profile:
    """Load and validate one profile JSON file.

    Raises :class:`ConfigError` naming the file and the offending key.
    """
    path = Path(path)
    try:
        raw: Any = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read profile: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    try:
        return Profile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"{path}: {_format_loc(first['loc'])}: {first['msg']}") from None


def load_profile(gpu: str | Path, model: str | None = None) -> Profile:
    """The bundled profile of ``(gpu, model)``, or the profile file at path ``gpu``.

    ``gpu`` is read as a path when it is a :class:`Path` or ends in ``.json``; ``model``
    is then optional and, when given, must match the file's model. An unknown GPU,
    model or pair raises :class:`UnknownNameError` listing the known ones.
    """
    if isinstance(gpu, Path) or gpu.endswith(".json"):
        profile = load_profile_file(gpu)
        if model is not None and model != profile.model.name:
            raise ConfigError(f"{gpu}: profile is for model {profile.model.name!r}, not {model!r}")
        return profile
    if model is None:
        raise ConfigError("load_profile needs a model name unless given a profile file")
    if gpu not in known_gpus():
        raise UnknownNameError(f"unknown gpu {gpu!r}; known: {', '.join(known_gpus())}")
    if model not in known_models():
        raise UnknownNameError(f"unknown model {model!r}; known: {', '.join(known_models())}")
    path = PROFILES_DIR / f"{gpu}{_PAIR_SEP}{model}.json"
    if not path.exists():
        known = ", ".join(known_profiles())
        raise UnknownNameError(f"no profile for gpu {gpu!r} with model {model!r}; known: {known}")
    return load_profile_file(path)


def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write ``profile`` as JSON to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.to_json())
    return path


# --- the cost model ------------------------------------------------------------------


class StepBreakdown(NamedTuple):
    """Where the time of one step goes (seconds); ``total_s`` is their sum."""

    overhead_s: float
    dense_s: float
    compute_bound: bool
    kv_read_s: float
    prefill_attn_s: float
    total_s: float


class CostModel:
    """Step times of one simulated GPU serving one model (docs/design.md §6).

    :meth:`step_time_s` is the hot path (the simulator calls it millions of times): plain
    float arithmetic on constants precomputed here. Everything else is convenience.
    """

    __slots__ = (
        "_attn_s_per_unit",
        "_c0_s",
        "_c_seq_s",
        "_compute_s_per_token",
        "_dense_read_s",
        "_expert_miss_prob",
        "_expert_read_s",
        "kv_bytes_per_token",
        "kv_read_s_per_token",
        "profile",
    )

    def __init__(self, profile: Profile) -> None:
        gpu, model, engine = profile.gpu, profile.model, profile.engine
        expert_bytes = model.weight_bytes * model.expert_weight_fraction
        self.profile = profile
        self.kv_bytes_per_token: int = profile.kv_bytes_per_token
        #: seconds of HBM read per token of KV context; lets an engine fast-forward
        #: decode-only steps in closed form.
        self.kv_read_s_per_token: float = self.kv_bytes_per_token / gpu.b_eff_bytes_per_s
        self._c0_s = engine.c0_s
        self._c_seq_s = engine.c_seq_s
        self._compute_s_per_token = 2.0 * model.active_params / gpu.f_eff_flops_per_s
        self._dense_read_s = (model.weight_bytes - expert_bytes) / gpu.b_eff_bytes_per_s
        self._expert_read_s = expert_bytes / gpu.b_eff_bytes_per_s
        # Probability that one token's routing leaves a given expert untouched.
        self._expert_miss_prob = 1.0 - model.experts_per_token / model.num_experts
        d_attn = model.num_q_heads * model.head_dim
        self._attn_s_per_unit = 4.0 * model.num_layers * d_attn / gpu.f_attn_flops_per_s

    @classmethod
    def from_names(cls, gpu: str, model: str) -> CostModel:
        """The cost model of a bundled profile."""
        return cls(load_profile(gpu, model))

    def step_time_s(
        self, num_seqs: float, num_tokens: float, kv_read_tokens: float, prefill_attn_units: float
    ) -> float:
        """Seconds one step takes.

        ``num_seqs`` sequences scheduled, ``num_tokens`` (>= 1) tokens computed,
        ``kv_read_tokens`` = sum of decode contexts + sum of prefill prior contexts,
        ``prefill_attn_units`` = sum over prefill chunks of :meth:`prefill_attn_units`.
        The counts are ints for a real step; floats (averages) are accepted.
        """
        compute_s = num_tokens * self._compute_s_per_token
        weights_s = self._dense_read_s
        if self._expert_read_s:  # MoE: expected share of distinct experts N tokens touch
            weights_s += self._expert_read_s * (1.0 - self._expert_miss_prob**num_tokens)
        return (
            self._c0_s
            + self._c_seq_s * num_seqs
            + (compute_s if compute_s > weights_s else weights_s)
            + kv_read_tokens * self.kv_read_s_per_token
            + prefill_attn_units * self._attn_s_per_unit
        )

    @staticmethod
    def prefill_attn_units(chunk_tokens: int, prior_tokens: int) -> float:
        """Causal (query, key) pairs of a prefill chunk: ``q * (p + q/2)``."""
        return chunk_tokens * (prior_tokens + chunk_tokens / 2.0)

    def weight_read_bytes(self, num_tokens: float) -> float:
        """Weight bytes one step of ``num_tokens`` tokens reads, W(N)."""
        expected_read_s = self._dense_read_s + self._expert_read_s * (
            1.0 - self._expert_miss_prob**num_tokens
        )
        return expected_read_s * self.profile.gpu.b_eff_bytes_per_s

    def step_ms(
        self, decode_contexts: Sequence[int], prefills: Sequence[tuple[int, int]] = ()
    ) -> float:
        """Milliseconds of one step: decodes at the given contexts plus prefill chunks
        given as ``(chunk_tokens, prior_tokens)``."""
        return 1e3 * self.step_time_s(*self.step_args(decode_contexts, prefills))

    @staticmethod
    def step_args(
        decode_contexts: Sequence[int], prefills: Sequence[tuple[int, int]] = ()
    ) -> tuple[int, int, int, float]:
        """The ``step_time_s`` arguments of a batch described sequence by sequence."""
        num_seqs = len(decode_contexts) + len(prefills)
        num_tokens = len(decode_contexts) + sum(q for q, _ in prefills)
        kv_read_tokens = sum(decode_contexts) + sum(p for _, p in prefills)
        units = sum(CostModel.prefill_attn_units(q, p) for q, p in prefills)
        return num_seqs, num_tokens, kv_read_tokens, units

    def breakdown(
        self, num_seqs: int, num_tokens: int, kv_read_tokens: int, prefill_attn_units: float
    ) -> StepBreakdown:
        """:meth:`step_time_s` split into its terms."""
        compute_s = num_tokens * self._compute_s_per_token
        weights_s = self.weight_read_bytes(num_tokens) / self.profile.gpu.b_eff_bytes_per_s
        overhead_s = self._c0_s + self._c_seq_s * num_seqs
        kv_read_s = kv_read_tokens * self.kv_read_s_per_token
        attn_s = prefill_attn_units * self._attn_s_per_unit
        dense_s = max(compute_s, weights_s)
        total_s = overhead_s + dense_s + kv_read_s + attn_s
        return StepBreakdown(overhead_s, dense_s, compute_s > weights_s, kv_read_s, attn_s, total_s)

    def prefill_time_s(
        self, num_tokens: int, prior_tokens: int = 0, chunk_budget: int = 8192
    ) -> float:
        """Seconds to prefill ``num_tokens`` on top of ``prior_tokens`` of cached context,
        alone on the GPU, in chunks of at most ``chunk_budget`` tokens."""
        if chunk_budget < 1:
            raise ConfigError(f"chunk_budget must be >= 1, got {chunk_budget}")
        total_s, done = 0.0, 0
        while done < num_tokens:
            chunk = min(chunk_budget, num_tokens - done)
            prior = prior_tokens + done
            total_s += self.step_time_s(1, chunk, prior, self.prefill_attn_units(chunk, prior))
            done += chunk
        return total_s

    def decode_time_s(self, num_steps: int, context_tokens: int) -> float:
        """Seconds for one sequence alone to decode ``num_steps`` tokens, starting at
        ``context_tokens`` of context (closed form: the context grows by one per step)."""
        per_step_s = self.step_time_s(1, 1, 0, 0.0)
        context_sum = num_steps * context_tokens + num_steps * (num_steps - 1) // 2
        return num_steps * per_step_s + context_sum * self.kv_read_s_per_token

    def swap_time_s(self, num_tokens: int) -> float:
        """Seconds to copy the KV of ``num_tokens`` tokens one way over PCIe."""
        return num_tokens * self.kv_bytes_per_token / self.profile.gpu.pcie_bytes_per_s

    def num_gpu_blocks(self, block_size: int, gpu_memory_utilization: float) -> int:
        """KV blocks that fit: ``(hbm * util - weights - reserve) // (kv_bytes * block_size)``.

        Raises :class:`ConfigError` when nothing is left for the KV cache.
        """
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}"
            )
        gpu, model, engine = self.profile.gpu, self.profile.model, self.profile.engine
        budget_bytes = gpu.hbm_bytes * gpu_memory_utilization
        free_bytes = budget_bytes - model.weight_bytes - engine.reserve_bytes
        num_blocks = int(free_bytes // (self.kv_bytes_per_token * block_size))
        if num_blocks <= 0:
            raise ConfigError(
                f"{model.name} on {gpu.name}: weights ({model.weight_bytes / 1e9:.1f} GB) + "
                f"reserve ({engine.reserve_bytes / 1e9:.1f} GB) leave no KV cache room in "
                f"{gpu_memory_utilization:.2f} x {gpu.hbm_bytes / 1e9:.1f} GB"
            )
        return num_blocks


def num_kv_blocks(cost: CostModel, engine: EngineConfig) -> int:
    """KV blocks of one engine: the configured override, else what the GPU's memory
    left after the weights holds (every runtime sizes engines with this)."""
    return engine.num_gpu_blocks_override or cost.num_gpu_blocks(
        engine.block_size, engine.gpu_memory_utilization
    )
