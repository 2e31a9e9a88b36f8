"""``mars-ray capacity``: the highest arrival rate each policy serves at a goodput target.

Capacity is the number an operator plans with: the highest session arrival rate
(sessions/s) at which goodput(3), the fraction of sessions with slowdown <= 3
(:func:`mars_ray.metrics.goodput_fraction`), stays at or above a target (default
0.90). It is found per policy by bisection over simulator runs that all use the
*same* sessions with the *same* seeded Poisson arrival pattern, only time-scaled to
each rate (:func:`mars_ray.bench.sessions_at`): every probe is exactly the run
``mars-ray bench --rates RATE`` makes.

Goodput is not strictly monotone in the rate (a few sessions cross the bound back
and forth as arrivals shift), so the search keeps a bracket ``[lo, hi]`` with
goodput(lo) >= target and goodput(hi) < target, found by doubling up (or halving
down) from the estimated saturation rate, and bisects it (geometrically) until
``hi - lo <= tolerance x lo``. The answer is the bracket's ``lo``: a rate that meets
the target with a failing rate within the tolerance above it. Where goodput dips
below the target and recovers, it is one such crossing, not necessarily the highest.

The search itself (:func:`find_capacity`) is pure: it takes a ``run(rate) ->
goodput`` callable, so it is tested on synthetic functions.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

import typer
from rich.console import Console
from rich.table import Table

from mars_ray.config import validated
from mars_ray.errors import ConfigError
from mars_ray.metrics import DEFAULT_ALPHA, goodput_fraction, json_safe

if TYPE_CHECKING:
    from mars_ray.bench import BenchConfig, BenchPlan, SaturationEstimate

DEFAULT_TARGET = 0.90
DEFAULT_TOLERANCE = 0.05
DEFAULT_MAX_RUNS = 20
DEFAULT_NUM_SESSIONS = 100
DEFAULT_POLICIES: tuple[str, ...] = ("fcfs", "mars", "continuum")
DEFAULT_OUT_DIR = Path("results/capacity")
MAX_BRACKET_STEPS = 6
"""Doublings (or halvings) from the start rate before giving up: a factor 64 each way. At
64x the estimated saturation rate a run's sessions arrive nearly at once, so a target
still met there is met by a burst, and capacity needs more sessions to show a limit."""
FCFS = "fcfs"

SearchStatus = Literal["converged", "max_runs", "never_met", "unbounded"]
"""How a search ended: bracket within tolerance; out of runs; below the target at
every rate down to start / 2**steps; at or above it at every rate up to start x 2**steps."""


class Probe(NamedTuple):
    """One run: its arrival rate and the goodput measured there."""

    rate_per_s: float
    goodput: float


@dataclass(frozen=True)
class CapacitySearch:
    """The outcome of :func:`find_capacity`.

    ``lo_per_s`` is the highest rate known to meet the target (None if none did),
    ``hi_per_s`` the lowest rate above it known to miss (None if none did).
    """

    target: float
    tolerance: float
    start_rate_per_s: float
    probes: tuple[Probe, ...]  # in the order they ran
    lo_per_s: float | None
    hi_per_s: float | None
    status: SearchStatus

    @property
    def capacity_per_s(self) -> float | None:
        """The bracket's ``lo``; a lower bound when ``status`` is ``unbounded``."""
        return self.lo_per_s

    @property
    def converged(self) -> bool:
        return self.status == "converged"

    @property
    def num_runs(self) -> int:
        return len(self.probes)

    @property
    def best(self) -> Probe:
        """The probe with the highest goodput (the highest rate among ties)."""
        return max(self.probes, key=lambda p: (p.goodput, p.rate_per_s))

    def describe(self) -> str:
        """One line: the capacity, or why there is none."""
        best = self.best
        best_text = f"best goodput {best.goodput:.0%} at {best.rate_per_s:.4g}/s"
        lo, hi = self.lo_per_s, self.hi_per_s
        if self.status == "converged" and lo is not None and hi is not None:
            return f"{lo:.4g}/s (meets {self.target:.0%}; {hi:.4g}/s misses)"
        if self.status == "unbounded" and lo is not None:
            return (
                f">= {lo:.4g}/s: goodput meets {self.target:.0%} at every rate tried up to "
                f"{lo:.4g}/s (near-simultaneous arrivals); more sessions would bound it"
            )
        if self.status == "never_met":
            lowest = min(p.rate_per_s for p in self.probes)
            return (
                f"none: goodput below {self.target:.0%} at every rate tried down to "
                f"{lowest:.4g}/s; {best_text}"
            )
        if lo is None:
            return f"none within {self.num_runs} runs: below {self.target:.0%} so far; {best_text}"
        bracket = "no miss found above it" if hi is None else f"{hi:.4g}/s misses"
        return f"{lo:.4g}/s, not converged in {self.num_runs} runs ({bracket})"


def check_search_args(
    target: float, tolerance: float, max_runs: int, start_rate_per_s: float = 1.0
) -> None:
    """Raise :class:`ConfigError` (one line) for a target, tolerance or budget out of range."""
    if not (0 < target <= 1):
        raise ConfigError(f"--target must be in (0, 1], got {target:g}")
    if not (0 < tolerance < 1):
        raise ConfigError(f"--tolerance must be in (0, 1) (relative), got {tolerance:g}")
    if max_runs < 1:
        raise ConfigError(f"--max-runs must be >= 1, got {max_runs}")
    if not (start_rate_per_s > 0 and math.isfinite(start_rate_per_s)):
        raise ConfigError(f"start rate must be finite and > 0, got {start_rate_per_s:g}")


def find_capacity(
    run: Callable[[float], float],
    *,
    start_rate_per_s: float,
    target: float = DEFAULT_TARGET,
    tolerance: float = DEFAULT_TOLERANCE,
    max_runs: int = DEFAULT_MAX_RUNS,
    max_bracket_steps: int = MAX_BRACKET_STEPS,
    on_probe: Callable[[Probe, float | None, float | None], None] | None = None,
) -> CapacitySearch:
    """Highest rate with ``run(rate) >= target``, by bracketing then geometric bisection.

    The bracket starts at ``start_rate_per_s``: if it meets the target the rate
    doubles until one misses, else it halves until one meets (at most
    ``max_bracket_steps`` times). Bisection then narrows ``[lo, hi]`` until
    ``hi - lo <= tolerance x lo``. ``max_runs`` bounds every call of ``run``.
    ``on_probe(probe, lo, hi)`` is told each result with the bracket after it.
    """
    check_search_args(target, tolerance, max_runs, start_rate_per_s)
    if max_bracket_steps < 0:
        raise ConfigError(f"max_bracket_steps must be >= 0, got {max_bracket_steps}")
    probes: list[Probe] = []
    lo: float | None = None
    hi: float | None = None

    def probe(rate: float) -> None:
        nonlocal lo, hi
        goodput = float(run(rate))
        if not (0.0 <= goodput <= 1.0):
            raise ValueError(f"run({rate:g}) returned goodput {goodput!r}, not in [0, 1]")
        probes.append(Probe(rate, goodput))
        if goodput >= target:
            lo = rate
        else:
            hi = rate
        if on_probe is not None:
            on_probe(probes[-1], lo, hi)

    def result(status: SearchStatus) -> CapacitySearch:
        return CapacitySearch(target, tolerance, start_rate_per_s, tuple(probes), lo, hi, status)

    probe(start_rate_per_s)
    for _ in range(max_bracket_steps):
        if lo is not None and hi is not None:
            break
        if len(probes) >= max_runs:
            return result("max_runs")
        probe(lo * 2.0 if lo is not None else (hi or start_rate_per_s) / 2.0)
    if hi is None:
        return result("unbounded")
    if lo is None:
        return result("never_met")
    while hi - lo > tolerance * lo:
        if len(probes) >= max_runs:
            return result("max_runs")
        probe(math.sqrt(lo * hi))
    return result("converged")


# --------------------------------------------------------------------------- simulator runs


def _bracket(lo: float | None, hi: float | None) -> str:
    def show(x: float | None) -> str:
        return "?" if x is None else f"{x:.4g}"

    return f"[{show(lo)}, {show(hi)}]"


def capacity_runs(
    plan: BenchPlan,
    config: BenchConfig,
    *,
    target: float,
    tolerance: float,
    max_runs: int,
    console: Console,
    progress: bool = True,
) -> tuple[dict[str, CapacitySearch], dict[str, list[dict[str, Any]]]]:
    """One search per policy through the simulator; returns the searches and each probe's
    summary entry (:func:`mars_ray.metrics.summarize_run`), in run order."""
    from mars_ray import bench
    from mars_ray.metrics import summarize_run

    saturation_per_s = plan.saturation.rate_per_s
    searches: dict[str, CapacitySearch] = {}
    entries: dict[str, list[dict[str, Any]]] = {}
    with bench.sessions_progress(console, progress) as bar:
        task = bar.add_task("capacity", total=len(plan.sessions))
        for policy in plan.policies:
            entries[policy] = []

            def run(rate: float, policy: str = policy) -> float:
                point = bench.SweepPoint(rate, rate / saturation_per_s)
                number = len(entries[policy]) + 1
                bar.update(task, description=f"{policy} run {number} @ {rate:.4g}/s", completed=0)

                def on_progress(num_finished: int, num_sessions: int) -> None:
                    bar.update(task, completed=num_finished)

                # bench's private runner, on purpose: a probe is then exactly the run that
                # `mars-ray bench --rates RATE` makes (same sessions, arrivals, engine).
                result = bench._run_one(plan, config, policy, point, on_progress)
                entries[policy].append(summarize_run(result, load=point.load))
                return goodput_fraction(result.sessions, DEFAULT_ALPHA) or 0.0

            def on_probe(
                p: Probe, lo: float | None, hi: float | None, policy: str = policy
            ) -> None:
                verdict = "meets " if p.goodput >= target else "misses"
                bar.console.print(
                    f"  {policy:<10} {p.rate_per_s:.4g}/s ({p.rate_per_s / saturation_per_s:.3g}x"
                    f" est.) goodput {p.goodput:4.0%} {verdict} -> {_bracket(lo, hi)}",
                    highlight=False,
                    overflow="ignore",
                    crop=False,
                )

            searches[policy] = find_capacity(
                run,
                start_rate_per_s=saturation_per_s,
                target=target,
                tolerance=tolerance,
                max_runs=max_runs,
                on_probe=on_probe,
            )
    return searches, entries


# --------------------------------------------------------------------------- outputs


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def policy_entries(
    searches: Mapping[str, CapacitySearch], saturation: SaturationEstimate
) -> list[dict[str, Any]]:
    """Per policy: capacity, its ratio to FCFS's, its fraction of the GPU bound, the probes."""
    fcfs = searches.get(FCFS)
    fcfs_capacity = fcfs.capacity_per_s if fcfs is not None else None
    rows = []
    for policy, search in searches.items():
        capacity = search.capacity_per_s
        best = search.best
        rows.append(
            {
                "policy": policy,
                "capacity_per_s": capacity,
                "capacity_per_min": None if capacity is None else capacity * 60,
                "status": search.status,
                "converged": search.converged,
                "lo_per_s": search.lo_per_s,
                "hi_per_s": search.hi_per_s,
                "vs_fcfs": _ratio(capacity, fcfs_capacity),
                "fraction_of_gpu_bound": _ratio(capacity, saturation.gpu_rate_per_s),
                "fraction_of_saturation_estimate": _ratio(capacity, saturation.rate_per_s),
                "num_runs": search.num_runs,
                "best": {"rate_per_s": best.rate_per_s, "goodput": best.goodput},
                "message": search.describe(),
                "probes": [p._asdict() for p in search.probes],
            }
        )
    return rows


def capacity_command_line(
    config: BenchConfig, target: float, tolerance: float, max_runs: int
) -> str:
    """The ``mars-ray capacity`` command that reruns a search."""
    args = ["mars-ray", "capacity"]
    args += ["--trace", str(config.trace)] if config.trace else ["--workload", str(config.workload)]
    args += ["--policies", ",".join(config.policies), "--gpus", str(config.num_gpus)]
    args += ["--nodes", str(config.num_nodes), "--gpu", config.gpu, "--model", config.model]
    if config.num_sessions is not None:
        args += ["--sessions", str(config.num_sessions)]
    args += ["--target", f"{target:g}", "--tolerance", f"{tolerance:g}"]
    args += ["--max-runs", str(max_runs), "--seed", str(config.seed), "--out", str(config.out_dir)]
    return shlex.join(args)


def build_summary(
    config: BenchConfig,
    plan: BenchPlan,
    searches: Mapping[str, CapacitySearch],
    entries: Mapping[str, Sequence[dict[str, Any]]],
    *,
    target: float,
    tolerance: float,
    max_runs: int,
) -> dict[str, Any]:
    """``summary.json``: ``{"config", "saturation", "policies", "runs"}``, JSON-safe."""
    saturation = plan.saturation
    summary = {
        "config": {
            "command": capacity_command_line(config, target, tolerance, max_runs),
            "argv": list(sys.argv),
            "workload": config.workload,
            "trace": None if config.trace is None else str(config.trace),
            "policies": list(config.policies),
            "gpus": config.num_gpus,
            "nodes": config.num_nodes,
            "gpu": config.gpu,
            "model": config.model,
            "num_sessions_run": len(plan.sessions),
            "seed": config.seed,
            "alpha": DEFAULT_ALPHA,
            "target": target,
            "tolerance": tolerance,
            "max_runs": max_runs,
            "engine": plan.engine.model_dump(mode="json"),
        },
        "saturation": saturation._asdict()
        | {"rate_per_s": saturation.rate_per_s, "bottleneck": saturation.bottleneck},
        "policies": policy_entries(searches, saturation),
        "runs": [entry for policy in entries for entry in entries[policy]],
    }
    result: dict[str, Any] = json_safe(summary)
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def capacity_table(summary: Mapping[str, Any]) -> Table:
    """Policy: capacity, x FCFS, fraction of the GPU bound and of the saturation estimate."""
    config, saturation = summary["config"], summary["saturation"]
    table = Table(
        title=(
            f"capacity: highest rate with goodput@{DEFAULT_ALPHA:g} >= {config['target']:.0%} "
            f"(GPU bound {saturation['gpu_rate_per_s']:.4g}/s, est. saturation "
            f"{saturation['rate_per_s']:.4g}/s, {saturation['bottleneck']}-bound)"
        )
    )
    headers = ("policy", "capacity/s", "/min", "x FCFS", "/GPU bound", "/est. sat.", "runs",
               "status")  # fmt: skip
    for header in headers:
        left = header in ("policy", "status")
        table.add_column(header, justify="left" if left else "right", no_wrap=left)
    for row in summary["policies"]:
        capacity = row["capacity_per_s"]
        at_least = ">=" if row["status"] == "unbounded" else ""
        vs_fcfs = row["vs_fcfs"]
        table.add_row(
            row["policy"],
            "-" if capacity is None else f"{at_least}{capacity:.4g}",
            "-" if capacity is None else f"{at_least}{capacity * 60:.3g}",
            "-" if vs_fcfs is None else f"{vs_fcfs:.2f}x",
            at_least + _fmt(row["fraction_of_gpu_bound"], ".2f"),
            at_least + _fmt(row["fraction_of_saturation_estimate"], ".2f"),
            str(row["num_runs"]),
            "converged" if row["status"] == "converged" else row["status"],
        )
    return table


def plot_capacity(path: Path, summary: Mapping[str, Any]) -> Path:
    """Goodput vs arrival rate per policy (every probe), the target line, each capacity."""
    from mars_ray import plots

    plt = plots._pyplot()  # the Agg backend, as every bench plot
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    target = summary["config"]["target"]
    rates = []
    for index, row in enumerate(summary["policies"]):
        color = f"C{index}"
        points = sorted((p["rate_per_s"] * 60, 100 * p["goodput"]) for p in row["probes"])
        rates += [x for x, _ in points]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", color=color,
                label=row["policy"], lw=1.2, ms=4)  # fmt: skip
        if row["capacity_per_s"] is not None:
            x = row["capacity_per_s"] * 60
            ax.axvline(x, color=color, ls="--", lw=1.0)
            ax.annotate(f"{x:.3g}/min", (x, 100 * target), xytext=(4, -14 - 11 * index),
                        textcoords="offset points", color=color, fontsize="small")  # fmt: skip
    gpu_bound = summary["saturation"]["gpu_rate_per_s"]
    if gpu_bound is not None:
        ax.axvline(gpu_bound * 60, color="grey", ls=":", lw=1.2, label="est. GPU bound")
    saturation = summary["saturation"]
    if saturation["rate_per_s"] is not None and saturation["rate_per_s"] != gpu_bound:
        ax.axvline(saturation["rate_per_s"] * 60, color="grey", ls="-.", lw=1.0,
                   label=f"est. saturation ({saturation['bottleneck']})")  # fmt: skip
    ax.axhline(100 * target, color="black", lw=0.8, label=f"target {target:.0%}")
    if rates and max(rates) / min(rates) > 8:
        ax.set_xscale("log")
    ax.set_xlabel("arrival rate (sessions/min)")
    ax.set_ylabel(f"goodput (% of sessions with slowdown <= {DEFAULT_ALPHA:g})")
    ax.set_ylim(-2, 102)
    ax.set_title(f"Capacity at goodput@{DEFAULT_ALPHA:g} >= {target:.0%} (dashed: each policy's)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return plots._save(fig, path)


def write_outputs(out_dir: Path, summary: Mapping[str, Any]) -> list[Path]:
    """``summary.json`` and ``capacity.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return [summary_path, plot_capacity(out_dir / "capacity.png", summary)]


def run_capacity(
    config: BenchConfig,
    *,
    target: float = DEFAULT_TARGET,
    tolerance: float = DEFAULT_TOLERANCE,
    max_runs: int = DEFAULT_MAX_RUNS,
    console: Console | None = None,
    progress: bool = True,
    show_table: bool = True,
) -> dict[str, Any]:
    """Search every policy's capacity, write ``config.out_dir``, print the table."""
    from mars_ray import bench

    check_search_args(target, tolerance, max_runs)
    console = console or Console()
    plan = bench.plan_bench(config)
    console.print(bench.describe_saturation(plan.saturation), highlight=False)
    started_s = time.perf_counter()
    searches, entries = capacity_runs(
        plan, config, target=target, tolerance=tolerance, max_runs=max_runs,
        console=console, progress=progress,
    )  # fmt: skip
    summary = build_summary(
        config, plan, searches, entries, target=target, tolerance=tolerance, max_runs=max_runs
    )
    summary["config"]["wall_s"] = time.perf_counter() - started_s
    written = write_outputs(config.out_dir, summary)
    if show_table:
        console.print(capacity_table(summary))
    for row in summary["policies"]:  # also in --json mode (then on stderr)
        if row["status"] != "converged":
            console.print(f"{row['policy']}: {row['message']}", highlight=False)
    console.print(f"wrote {len(written)} files to {config.out_dir}", highlight=False)
    return summary


# --------------------------------------------------------------------------- CLI


def capacity_command(
    workload: Annotated[
        str | None, typer.Option("--workload", help="workload generator", show_default="swe")
    ] = None,
    trace: Annotated[
        Path | None,
        typer.Option("--trace", help="Parquet trace instead (its sessions, Poisson arrivals)"),
    ] = None,
    policies: Annotated[
        str, typer.Option("--policies", help="comma-separated policy names")
    ] = ",".join(DEFAULT_POLICIES),
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs in the cluster")] = 1,
    nodes: Annotated[int, typer.Option("--nodes", help="nodes (GPUs split evenly)")] = 1,
    gpu: Annotated[
        str | None, typer.Option("--gpu", help="GPU name", show_default="h100-80gb")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="model name", show_default="llama-3.1-8b")
    ] = None,
    sessions: Annotated[
        int | None,
        typer.Option(
            "--sessions",
            help="sessions per run",
            show_default=f"{DEFAULT_NUM_SESSIONS}, or all of a trace",
        ),
    ] = None,
    target: Annotated[
        float, typer.Option("--target", help="goodput@3 to meet, in (0, 1]")
    ] = DEFAULT_TARGET,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="stop when (hi - lo) <= tolerance x lo")
    ] = DEFAULT_TOLERANCE,
    max_runs: Annotated[
        int, typer.Option("--max-runs", help="simulator runs per policy, at most")
    ] = DEFAULT_MAX_RUNS,
    seed: Annotated[int, typer.Option("--seed", help="seed of workload and arrivals")] = 0,
    out: Annotated[Path, typer.Option("--out", help="output directory")] = DEFAULT_OUT_DIR,
    as_json: Annotated[
        bool, typer.Option("--json", help="print summary JSON, not the table")
    ] = False,
) -> None:
    """Per policy, the highest arrival rate at which goodput@3 >= --target (simulator).

    Exit code 1 when some policy never met the target in the rates tried; 2 for bad input.
    """
    from mars_ray import bench

    check_search_args(target, tolerance, max_runs)
    if workload is None and trace is None:
        workload = bench.DEFAULT_WORKLOAD
    if sessions is None and trace is None:
        sessions = DEFAULT_NUM_SESSIONS
    names = [part.strip() for part in policies.split(",") if part.strip()]
    overrides = {"gpu": gpu, "model": model}
    config = validated(
        bench.BenchConfig,
        workload=workload,
        trace=trace,
        policies=tuple(names),
        loads=(1.0,),  # unused: capacity picks its own rates
        num_gpus=gpus,
        num_nodes=nodes,
        num_sessions=sessions,
        seed=seed,
        out_dir=out,
        runtime="sim",
        **{key: value for key, value in overrides.items() if value is not None},
    )
    console = Console(stderr=True) if as_json else Console()
    summary = run_capacity(
        config, target=target, tolerance=tolerance, max_runs=max_runs,
        console=console, show_table=not as_json,
    )  # fmt: skip
    if as_json:
        print(json.dumps(summary, indent=2, allow_nan=False))
    if any(row["capacity_per_s"] is None for row in summary["policies"]):
        # SystemExit, not typer.Exit: click returns typer.Exit's code when not standalone.
        raise SystemExit(1)


def register(app: typer.Typer) -> None:
    """Add the ``capacity`` command to ``app``."""
    app.command("capacity")(capacity_command)
