"""PNG plots of a bench (docs/design.md §8): goodput vs load, JCT CDFs, system state over time.

matplotlib is imported inside the functions, with the non-interactive Agg backend, so
importing this module costs nothing and works without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mars_ray.metrics import DEFAULT_ALPHA, goodput_fraction
from mars_ray.results import RunResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

KV_SMOOTHING_S = 30.0
"""KV usage swings step to step; the plot shows its moving average over this window."""

TIMESERIES_PANELS: tuple[tuple[str, str], ...] = (
    ("kv_usage", f"KV cache usage\n(fraction of blocks, {KV_SMOOTHING_S:g} s mean)"),
    ("num_evicted_blocks", "evicted KV blocks\n(cumulative)"),
    ("admission_window", "admission window\n(sessions; AIMD policies)"),
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _policies(results: Sequence[RunResult]) -> list[str]:
    return list(dict.fromkeys(r.policy for r in results))


def _rates(results: Sequence[RunResult]) -> list[float | None]:
    return list(dict.fromkeys(r.rate_per_s for r in results))


def _rate_title(rate_per_s: float | None, load: float | None) -> str:
    if rate_per_s is None:
        return "trace arrivals"
    per_min = f"{rate_per_s * 60:.3g} sessions/min"
    return per_min if load is None else f"load {load:g} ({per_min})"


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _x_value(run: RunResult, load: float | None, use_load: bool) -> float:
    if use_load and load is not None:
        return load
    return (run.rate_per_s or 0.0) * 60


def plot_goodput_vs_load(
    path: Path,
    results: Sequence[RunResult],
    loads: Sequence[float | None],
    *,
    alpha: float = DEFAULT_ALPHA,
) -> Path:
    """Goodput(alpha) per policy against load (or arrival rate when no loads were given)."""
    plt = _pyplot()
    use_load = all(load is not None for load in loads)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for policy in _policies(results):
        points = sorted(
            (_x_value(r, load, use_load), goodput_fraction(r.sessions, alpha))
            for r, load in zip(results, loads, strict=True)
            if r.policy == policy
        )
        ys = [np.nan if y is None else 100 * y for _, y in points]
        ax.plot([x for x, _ in points], ys, marker="o", label=policy)
    x_label = "load (fraction of estimated saturation rate)"
    ax.set_xlabel(x_label if use_load else "arrival rate (sessions/min)")
    ax.set_ylabel(f"goodput (% of sessions with slowdown <= {alpha:g})")
    ax.set_ylim(-2, 102)
    ax.set_title(f"Goodput at alpha = {alpha:g} vs load")
    ax.grid(alpha=0.3)
    ax.legend(title="policy")
    return _save(fig, path)


def _jct_cdf(ax: Axes, results: Sequence[RunResult]) -> None:
    for r in results:
        jcts_s = np.sort([s.jct_s for s in r.sessions if s.completed and s.jct_s is not None])
        if not len(jcts_s):
            continue
        # Fraction of *all* sessions: unfinished ones keep the curve below 1.
        fractions = np.arange(1, len(jcts_s) + 1) / len(r.sessions)
        ax.step(jcts_s / 60, fractions, where="post", label=r.policy)
    ax.set_xlabel("session JCT (min)")
    ax.set_ylabel("fraction of sessions completed")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)


def plot_jct_cdf(path: Path, results: Sequence[RunResult], loads: Sequence[float | None]) -> Path:
    """CDF of session JCT per policy, one panel per arrival rate."""
    plt = _pyplot()
    rates = _rates(results)
    fig, axes = plt.subplots(
        1, len(rates), figsize=(5.2 * len(rates), 4.2), squeeze=False, sharey=True
    )
    load_of = {r.rate_per_s: load for r, load in zip(results, loads, strict=True)}
    for ax, rate in zip(axes[0], rates, strict=True):
        _jct_cdf(ax, [r for r in results if r.rate_per_s == rate])
        ax.set_title(f"JCT CDF, {_rate_title(rate, load_of[rate])}")
        ax.legend(title="policy", loc="lower right")
    return _save(fig, path)


def _moving_average(t_s: np.ndarray, values: np.ndarray, window_s: float) -> np.ndarray:
    """Trailing mean over ``window_s`` of evenly sampled ``values`` (NaNs stay NaN)."""
    if len(t_s) < 2:
        return values
    period_s = float(np.median(np.diff(t_s)))
    width = int(max(1, round(window_s / period_s))) if period_s > 0 else 1
    kernel = np.ones(width) / width
    # 'full' then trim: the first points average over what exists so far.
    smoothed = np.convolve(values, kernel, mode="full")[: len(values)]
    counts = np.minimum(np.arange(1, len(values) + 1), width)
    return np.asarray(smoothed * width / counts)


def _highest_rate_runs(results: Sequence[RunResult]) -> list[RunResult]:
    rates = [r for r in _rates(results) if r is not None]
    top = max(rates) if rates else None
    return [r for r in results if r.rate_per_s == top]


def plot_timeseries(
    path: Path, results: Sequence[RunResult], loads: Sequence[float | None]
) -> Path:
    """KV usage, cumulative evicted blocks and admission window over time, per policy,
    at the highest arrival rate. A policy without an admission limit has no window line."""
    plt = _pyplot()
    runs = _highest_rate_runs(results)
    fig, axes = plt.subplots(len(TIMESERIES_PANELS), 1, figsize=(8, 8.4), sharex=True)
    for ax, (column, label) in zip(axes, TIMESERIES_PANELS, strict=True):
        for r in runs:
            values = r.timeseries.columns.get(column)
            if values is None or not len(values):
                continue
            t_s = np.asarray(r.timeseries.t_s, dtype=float)
            y = np.asarray(values, dtype=float)
            if column == "kv_usage":
                y = _moving_average(t_s, y, KV_SMOOTHING_S)
            ax.plot(t_s / 60, y, label=r.policy, lw=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.05)
    axes[-1].set_xlabel("simulated time (min)")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, title="policy", loc="upper right", fontsize="small")
    load_of = {r.rate_per_s: load for r, load in zip(results, loads, strict=True)}
    top = runs[0].rate_per_s if runs else None
    fig.suptitle(f"System state over time, {_rate_title(top, load_of.get(top))}")
    return _save(fig, path)


def write_plots(
    out_dir: Path,
    results: Sequence[RunResult],
    loads: Sequence[float | None],
    *,
    alpha: float = DEFAULT_ALPHA,
) -> list[Path]:
    """All bench plots into ``out_dir``; ``loads[i]`` is ``results[i]``'s load (or None)."""
    if not results:
        return []
    return [
        plot_goodput_vs_load(out_dir / "goodput_vs_load.png", results, loads, alpha=alpha),
        plot_jct_cdf(out_dir / "jct_cdf.png", results, loads),
        plot_timeseries(out_dir / "timeseries.png", results, loads),
    ]
