"""Fit a profile's step constants (c0_s, c_seq_s, B_eff, F_eff) to measured points.

A measured point is a time in milliseconds and the step shape(s) it averages over:
either one step (from a step log) or a weighted mix of steps (a ``vllm bench serve``
TPOT is the mean step time over a request's decode, some steps of which also carry
other requests' prefills). The model is linear in ``(c0, c_seq, 1/F_eff, 1/B_eff)``
once each step's ``max(compute, weight read)`` branch is fixed, so the fit alternates
branch assignment and a non-negative least-squares solve on relative residuals, with
a weak pull towards the prior profile so constants the points cannot determine keep
their prior values. F_attn is not fitted.

Accepted point files:

- JSON list (or ``{"points": [...]}``) of objects with ``step_ms`` and either
  ``num_seqs, num_tokens, kv_read_tokens[, prefill_attn_units]`` or
  ``decode_contexts`` (list of ints) and/or ``prefills`` (list of ``[chunk, prior]``);
- CSV with columns ``num_seqs, num_tokens, kv_read_tokens, prefill_attn_units,
  step_ms`` (optional ``label``);
- ``vllm bench serve --save-result`` JSON (``mean_tpot_ms``/``median_tpot_ms``,
  ``total_input_tokens``, ``total_output_tokens``, ``completed``, ``max_concurrency``,
  ``mean_ttft_ms``): one TPOT point, plus a TTFT point when concurrency is 1.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mars_ray.engine.costmodel import CostModel, Profile, Provenance
from mars_ray.errors import MarsError

FIT_CONSTANTS = ("engine.c0_s", "engine.c_seq_s", "gpu.f_eff_flops_per_s", "gpu.b_eff_bytes_per_s")
_STEP_FIELDS = ("num_seqs", "num_tokens", "kv_read_tokens", "prefill_attn_units")
_NUM_PARAMS = 4  # c0_s, c_seq_s, 1/F_eff, 1/B_eff


class PointsFileError(MarsError, ValueError):
    """A file of measured points is missing, malformed or not understood."""


class CalibrationError(MarsError, ValueError):
    """The points cannot determine a usable profile."""


class StepShape(NamedTuple):
    """Arguments of :meth:`CostModel.step_time_s` (floats: shapes may be averages)."""

    num_seqs: float
    num_tokens: float
    kv_read_tokens: float
    prefill_attn_units: float


@dataclass(frozen=True)
class MeasuredPoint:
    """A measured time and the steps it averages: ``(weight, shape)`` pairs, weights
    summing to 1 (a single measured step has one pair of weight 1)."""

    label: str
    step_ms: float
    components: tuple[tuple[float, StepShape], ...]

    @classmethod
    def single(cls, label: str, step_ms: float, shape: StepShape) -> MeasuredPoint:
        return cls(label, step_ms, ((1.0, shape),))


def predicted_ms(cost_model: CostModel, point: MeasuredPoint) -> float:
    """What ``cost_model`` predicts for ``point`` (weighted mean of its steps), in ms."""
    return 1e3 * sum(w * cost_model.step_time_s(*shape) for w, shape in point.components)


# --- reading points ------------------------------------------------------------------


def _number(raw: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PointsFileError(f"{where}: {key!r} must be a finite number, got {value!r}")
    if value < 0:
        raise PointsFileError(f"{where}: {key!r} must be >= 0, got {value!r}")
    return float(value)


def _step_point(raw: Any, where: str, label: str) -> MeasuredPoint:
    if not isinstance(raw, dict):
        raise PointsFileError(f"{where}: a point must be an object, got {type(raw).__name__}")
    step_ms = _number(raw, "step_ms", where)
    if "decode_contexts" in raw or "prefills" in raw:
        try:
            decodes = [int(c) for c in raw.get("decode_contexts", [])]
            prefills = [(int(q), int(p)) for q, p in raw.get("prefills", [])]
        except (TypeError, ValueError):
            raise PointsFileError(
                f"{where}: decode_contexts must be ints and prefills [chunk, prior] pairs"
            ) from None
        shape = StepShape(*(float(x) for x in CostModel.step_args(decodes, prefills)))
    else:
        shape = StepShape(
            _number(raw, "num_seqs", where),
            _number(raw, "num_tokens", where),
            _number(raw, "kv_read_tokens", where),
            _number(raw, "prefill_attn_units", where, default=0.0),
        )
    if shape.num_tokens < 1 or step_ms <= 0:
        raise PointsFileError(f"{where}: need num_tokens >= 1 and step_ms > 0")
    return MeasuredPoint.single(str(raw.get("label", label)), step_ms, shape)


def _csv_points(path: Path) -> list[MeasuredPoint]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    points = []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path}: line {i}"
        try:
            raw: dict[str, Any] = {k: float(row[k]) for k in ("step_ms", *_STEP_FIELDS[:3])}
            raw["prefill_attn_units"] = float(row.get("prefill_attn_units") or 0.0)
        except KeyError as exc:
            raise PointsFileError(f"{path}: missing CSV column {exc.args[0]!r}") from None
        except (TypeError, ValueError):
            raise PointsFileError(f"{where}: every column must be a number") from None
        points.append(_step_point(raw, where, row.get("label") or f"{path.name}:{i}"))
    return points


def _is_bench_result(raw: Any) -> bool:
    return isinstance(raw, dict) and ("mean_tpot_ms" in raw or "median_tpot_ms" in raw)


def _bench_concurrency(raw: dict[str, Any], where: str) -> float:
    if raw.get("max_concurrency"):
        return _number(raw, "max_concurrency", where)
    if raw.get("request_throughput") and raw.get("mean_e2el_ms"):
        # Little's law: requests in flight = arrival rate x time in system.
        rate = _number(raw, "request_throughput", where)
        return max(1.0, rate * _number(raw, "mean_e2el_ms", where) / 1e3)
    raise PointsFileError(f"{where}: need max_concurrency (or request_throughput and mean_e2el_ms)")


def bench_points(raw: dict[str, Any], label: str) -> list[MeasuredPoint]:
    """Approximate points from one ``vllm bench serve`` result.

    TPOT at concurrency C with mean input I and output O tokens is the mean step over
    a request's decode: about ``1 + (C-1)(O-1)/O`` sequences decoding at context
    ``I + O/2``, and ``k = (C-1)/O`` other requests' prefills of I tokens per step
    (closed loop: each slot prefills once per O steps). With ``k < 1`` that is a mix of
    steps with one prefill (weight k) and decode-only steps. TTFT at concurrency 1 is
    one prefill step of I tokens (it also holds HTTP and tokenisation time).
    """
    where = label
    completed = _number(raw, "completed", where)
    if completed < 1:
        raise PointsFileError(f"{where}: no completed requests")
    input_tokens = _number(raw, "total_input_tokens", where) / completed
    output_tokens = _number(raw, "total_output_tokens", where) / completed
    concurrency = _bench_concurrency(raw, where)
    tpot_key = "mean_tpot_ms" if raw.get("mean_tpot_ms") else "median_tpot_ms"
    ttft_key = "mean_ttft_ms" if raw.get("mean_ttft_ms") else "median_ttft_ms"
    points = []
    if output_tokens > 1:
        points.append(
            tpot_point(
                f"{label}: tpot@{concurrency:g}",
                _number(raw, tpot_key, where),
                concurrency,
                input_tokens,
                output_tokens,
            )
        )
    if concurrency <= 1 and raw.get(ttft_key):
        shape = StepShape(1.0, input_tokens, 0.0, input_tokens * input_tokens / 2.0)
        points.append(MeasuredPoint.single(f"{label}: ttft", _number(raw, ttft_key, where), shape))
    if not points:
        raise PointsFileError(f"{where}: no usable TPOT or TTFT in this bench result")
    return points


def tpot_point(
    label: str, tpot_ms: float, concurrency: float, input_tokens: float, output_tokens: float
) -> MeasuredPoint:
    """The mean decode step of a closed-loop benchmark (see :func:`bench_points`)."""
    c, i, o = concurrency, input_tokens, output_tokens
    num_decodes = 1.0 + (c - 1.0) * (o - 1.0) / o
    context = i + o / 2.0
    prefills_per_step = (c - 1.0) / o
    attn_units = i * i / 2.0  # prefill_attn_units(i, 0)
    decode_only = StepShape(num_decodes, num_decodes, num_decodes * context, 0.0)

    def with_prefills(k: float) -> StepShape:
        return StepShape(
            num_decodes + k, num_decodes + k * i, num_decodes * context, k * attn_units
        )

    if prefills_per_step <= 0:
        components: tuple[tuple[float, StepShape], ...] = ((1.0, decode_only),)
    elif prefills_per_step < 1:
        k = prefills_per_step
        components = ((k, with_prefills(1.0)), (1.0 - k, decode_only))
    else:
        components = ((1.0, with_prefills(prefills_per_step)),)
    return MeasuredPoint(label, tpot_ms, components)


def load_points(path: str | Path) -> list[MeasuredPoint]:
    """Measured points from one file (format detected; see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise PointsFileError(f"{path}: no such points file")
    if path.suffix.lower() == ".csv":
        points = _csv_points(path)
    else:
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PointsFileError(
                f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})"
            ) from None
        if _is_bench_result(raw):
            points = bench_points(raw, path.name)
        else:
            items = raw.get("points") if isinstance(raw, dict) else raw
            if not isinstance(items, list):
                raise PointsFileError(
                    f"{path}: expected a list of points, {{'points': [...]}} or a vllm bench result"
                )
            points = [
                _step_point(item, f"{path}: point {n}", f"{path.name}#{n}")
                for n, item in enumerate(items)
            ]
    if not points:
        raise PointsFileError(f"{path}: no points")
    return points


# --- fitting -------------------------------------------------------------------------


class PointResidual(NamedTuple):
    label: str
    measured_ms: float
    predicted_ms: float
    rel_error: float


@dataclass(frozen=True)
class CalibrationResult:
    """Fitted profile, the prior it started from, and how well it fits each point."""

    profile: Profile
    prior: Profile
    residuals: tuple[PointResidual, ...]

    @property
    def mean_abs_rel_error(self) -> float:
        return sum(abs(r.rel_error) for r in self.residuals) / len(self.residuals)

    @property
    def max_abs_rel_error(self) -> float:
        return max(abs(r.rel_error) for r in self.residuals)

    def constants(self, profile: Profile | None = None) -> dict[str, float]:
        """The fitted constants (or ``profile``'s), keyed like the provenance."""
        p = profile or self.profile
        return {
            "engine.c0_s": p.engine.c0_s,
            "engine.c_seq_s": p.engine.c_seq_s,
            "gpu.f_eff_flops_per_s": p.gpu.f_eff_flops_per_s,
            "gpu.b_eff_bytes_per_s": p.gpu.b_eff_bytes_per_s,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.profile.gpu.name,
            "model": self.profile.model.name,
            "constants": self.constants(),
            "prior": self.constants(self.prior),
            "mean_abs_rel_error": self.mean_abs_rel_error,
            "max_abs_rel_error": self.max_abs_rel_error,
            "points": [r._asdict() for r in self.residuals],
        }


def _theta(profile: Profile) -> np.ndarray:
    return np.array(
        [
            profile.engine.c0_s,
            profile.engine.c_seq_s,
            1.0 / profile.gpu.f_eff_flops_per_s,
            1.0 / profile.gpu.b_eff_bytes_per_s,
        ]
    )


def _with_theta(profile: Profile, theta: np.ndarray, provenance: Provenance) -> Profile:
    c0_s, c_seq_s, s_per_flop, s_per_byte = (float(x) for x in theta)
    if s_per_flop <= 0 or s_per_byte <= 0:
        raise CalibrationError("the fit drove F_eff or B_eff to infinity: points are inconsistent")
    engine = profile.engine.model_copy(update={"c0_s": c0_s, "c_seq_s": c_seq_s})
    gpu = profile.gpu.model_copy(
        update={"f_eff_flops_per_s": 1.0 / s_per_flop, "b_eff_bytes_per_s": 1.0 / s_per_byte}
    )
    prov = dict(profile.provenance)
    prov.update(dict.fromkeys(FIT_CONSTANTS, provenance))
    return Profile.model_validate(
        {**profile.model_dump(), "gpu": gpu, "engine": engine, "provenance": prov}
    )


class _Features(NamedTuple):
    """Per step: coefficients of (c0, c_seq, 1/F, 1/B) on each branch, fixed seconds."""

    seqs: float
    flops: float
    weight_bytes: float
    kv_bytes: float
    attn_s: float


def _features(cost_model: CostModel, shape: StepShape) -> _Features:
    profile = cost_model.profile
    model = profile.model
    attn_s = shape.prefill_attn_units * 4.0 * model.num_layers * model.num_q_heads * model.head_dim
    return _Features(
        seqs=shape.num_seqs,
        flops=2.0 * model.active_params * shape.num_tokens,
        weight_bytes=cost_model.weight_read_bytes(shape.num_tokens),
        kv_bytes=shape.kv_read_tokens * cost_model.kv_bytes_per_token,
        attn_s=attn_s / profile.gpu.f_attn_flops_per_s,
    )


def _design(
    features: list[list[tuple[float, _Features]]], measured_s: np.ndarray, theta: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows (relative residuals) of the linear system under the branches ``theta`` picks."""
    rows = np.zeros((len(features), _NUM_PARAMS))
    target = measured_s.copy()
    for r, point in enumerate(features):
        for w, f in point:
            compute_bound = f.flops * theta[2] > f.weight_bytes * theta[3]
            flops = f.flops if compute_bound else 0.0
            read_bytes = f.kv_bytes + (0.0 if compute_bound else f.weight_bytes)
            rows[r] += w * np.array([1.0, f.seqs, flops, read_bytes])
            target[r] -= w * f.attn_s
    return rows / measured_s[:, None], target / measured_s


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a handful of unknowns: the optimum is the best
    feasible unconstrained solution over the subsets of free variables."""
    n = a.shape[1]
    best_x, best_sse = np.zeros(n), float(b @ b)
    for mask in range(1, 1 << n):
        cols = [k for k in range(n) if mask >> k & 1]
        sol = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
        if (sol < 0).any():
            continue
        x = np.zeros(n)
        x[cols] = sol
        sse = float(np.sum((a @ x - b) ** 2))
        if sse < best_sse:
            best_x, best_sse = x, sse
    return best_x


def _solve(
    features: list[list[tuple[float, _Features]]],
    measured_s: np.ndarray,
    theta: np.ndarray,
    theta_prior: np.ndarray,
    prior_weight: float,
) -> np.ndarray:
    rows, target = _design(features, measured_s, theta)
    # Unknowns scaled to the prior (u = theta / prior) so the columns are comparable.
    a = np.vstack([rows * theta_prior, prior_weight * np.eye(_NUM_PARAMS)])
    b = np.concatenate([target, prior_weight * np.ones(_NUM_PARAMS)])
    return _nnls(a, b) * theta_prior


def _predict_s(point: list[tuple[float, _Features]], theta: np.ndarray) -> float:
    """The cost model's formula on precomputed features, for any constants ``theta``."""
    c0_s, c_seq_s, s_per_flop, s_per_byte = theta
    return sum(
        w
        * (
            c0_s
            + c_seq_s * f.seqs
            + max(f.flops * s_per_flop, f.weight_bytes * s_per_byte)
            + f.kv_bytes * s_per_byte
            + f.attn_s
        )
        for w, f in point
    )


def _sse(
    features: list[list[tuple[float, _Features]]], measured_s: np.ndarray, theta: np.ndarray
) -> float:
    predicted_s = np.array([_predict_s(point, theta) for point in features])
    return float(np.sum(((predicted_s - measured_s) / measured_s) ** 2))


def fit_profile(
    prior: Profile,
    points: Sequence[MeasuredPoint],
    *,
    sources: Iterable[str] = (),
    date: dt.date | None = None,
    prior_weight: float = 1e-3,
    max_iterations: int = 50,
) -> CalibrationResult:
    """Fit ``prior``'s (c0_s, c_seq_s, B_eff, F_eff) to ``points``.

    Minimises the sum of squared relative errors plus ``prior_weight**2`` times the
    squared relative change of each constant, with every constant non-negative. The
    fitted profile's provenance for the four constants says which ``sources`` and
    ``date`` (default today) it was fitted to.
    """
    if not points:
        raise CalibrationError("no points to fit")
    cost_model = CostModel(prior)
    features = [[(w, _features(cost_model, s)) for w, s in p.components] for p in points]
    measured_s = np.array([p.step_ms / 1e3 for p in points])
    theta_prior = _theta(prior)
    theta = best = theta_prior
    best_sse = _sse(features, measured_s, theta)
    for _ in range(max_iterations):
        next_theta = _solve(features, measured_s, theta, theta_prior, prior_weight)
        sse = _sse(features, measured_s, next_theta)
        if sse < best_sse:
            best, best_sse = next_theta, sse
        if np.allclose(next_theta, theta, rtol=1e-12, atol=0):
            break
        theta = next_theta
    names = ", ".join(sources) or f"{len(points)} points"
    when = (date or dt.date.today()).isoformat()
    provenance = Provenance(kind="fit", detail=f"fitted by mars-ray calibrate to {names} on {when}")
    fitted = _with_theta(prior, best, provenance)
    fitted_model = CostModel(fitted)
    residuals = tuple(_residual(fitted_model, p) for p in points)
    return CalibrationResult(profile=fitted, prior=prior, residuals=residuals)


def _residual(cost_model: CostModel, point: MeasuredPoint) -> PointResidual:
    predicted = predicted_ms(cost_model, point)
    return PointResidual(
        point.label, point.step_ms, predicted, (predicted - point.step_ms) / point.step_ms
    )


def calibrate_files(
    prior: Profile, paths: Sequence[str | Path], *, date: dt.date | None = None
) -> CalibrationResult:
    """Load every points file and fit ``prior`` to all of them."""
    points = [point for path in paths for point in load_points(path)]
    return fit_profile(prior, points, sources=[str(p) for p in paths], date=date)
