"""``mars-ray trace``: generate or import a workload trace, or summarise one.

``mars-ray trace generate --workload swe --sessions 100 --rate 0.1 --out t.parquet``
writes a Parquet trace (docs/design.md §7); ``mars-ray trace import --format swe-agent
runs/*.traj --out t.parquet`` converts public agent trajectories (``importers.py``);
``mars-ray trace inspect t.parquet [--json]`` prints its shape. One ``--seed`` drives
two independent random streams, one for the sessions and one for their arrivals, so a
load sweep over ``--rate`` replays the same sessions at every rate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from mars_ray.errors import ConfigError
from mars_ray.session import SessionSpec

from .arrivals import assign_arrivals, burst_arrivals, poisson_arrivals
from .generators import WORKLOADS
from .importers import (
    DEFAULT_CHARS_PER_TOKEN,
    DEFAULT_CPU_FRACTION,
    IMPORTERS,
    Fit,
    ImportedTrace,
    ImportOptions,
)
from .schema import read_trace, write_trace

trace_app = typer.Typer(
    help="Generate, import and inspect Parquet workload traces.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Add the ``trace`` command group to ``app``."""
    app.add_typer(trace_app, name="trace")


class ArrivalProcess(StrEnum):
    """How sessions arrive: a Poisson process at ``--rate``, or all at once."""

    poisson = "poisson"
    burst = "burst"


class ImportArrival(StrEnum):
    """Arrivals of imported sessions: the trace's own times, Poisson, all at once, or
    ``auto`` (the trace's times where it has them, else Poisson at ``--rate``)."""

    auto = "auto"
    trace = "trace"
    poisson = "poisson"
    burst = "burst"


# --------------------------------------------------------------------------- generate


@trace_app.command("generate")
def generate_command(
    workload: Annotated[str, typer.Option(help=f"One of {', '.join(WORKLOADS)}.")] = "swe",
    sessions: Annotated[int, typer.Option(help="Number of sessions.")] = 100,
    rate: Annotated[float, typer.Option(help="Poisson arrival rate, sessions/s.")] = 0.1,
    arrival: Annotated[
        ArrivalProcess, typer.Option(help="poisson at --rate, or burst (all at t=0).")
    ] = ArrivalProcess.poisson,
    seed: Annotated[int, typer.Option(help="Seed of sessions and arrivals.")] = 0,
    max_context: Annotated[
        int, typer.Option(help="Context window of the served model, tokens.")
    ] = 131_072,
    out: Annotated[Path, typer.Option(help="Parquet file to write.")] = Path("trace.parquet"),
) -> None:
    """Generate a seeded workload and write it as a Parquet trace."""
    generator = WORKLOADS.get(workload)
    if sessions < 1:
        raise ConfigError(f"--sessions must be >= 1, got {sessions}")
    session_seed, arrival_seed = np.random.SeedSequence(seed).spawn(2)
    specs = generator(sessions, np.random.default_rng(session_seed), max_context)
    if arrival is ArrivalProcess.poisson:
        times_s = poisson_arrivals(sessions, rate, np.random.default_rng(arrival_seed))
    else:
        times_s = burst_arrivals(sessions)
    specs = assign_arrivals(specs, times_s)
    write_trace(specs, out)
    num_turns = sum(spec.num_turns for spec in specs)
    typer.echo(f"wrote {len(specs)} {workload} sessions ({num_turns} turns) to {out}")


# --------------------------------------------------------------------------- import


def _stamp_imported_arrivals(
    imported: ImportedTrace, arrival: ImportArrival, rate: float, seed: int
) -> tuple[list[SessionSpec], str]:
    """The imported sessions with their arrivals, and a phrase saying which arrivals."""
    sessions = imported.sessions
    if arrival is ImportArrival.auto:
        arrival = ImportArrival.trace if imported.has_arrival_times else ImportArrival.poisson
    if arrival is ImportArrival.trace:
        if not imported.has_arrival_times:
            raise ConfigError(
                "--arrival trace: these inputs carry no session start times;"
                " use --arrival poisson --rate R, or --arrival burst"
            )
        return sessions, "the trace's own times"
    if arrival is ImportArrival.poisson:
        rng = np.random.default_rng(np.random.SeedSequence(seed))
        times_s = poisson_arrivals(len(sessions), rate, rng)
        return assign_arrivals(sessions, times_s), f"Poisson at {rate:g} sessions/s"
    return assign_arrivals(sessions, burst_arrivals(len(sessions))), "all at t=0"


@trace_app.command("import")
def import_command(
    inputs: Annotated[
        list[Path], typer.Argument(help="Trajectory files, or directories to search for them.")
    ],
    trace_format: Annotated[
        str, typer.Option("--format", help=f"Input format: {', '.join(IMPORTERS)}.")
    ],
    out: Annotated[Path, typer.Option(help="Parquet file to write.")],
    chars_per_token: Annotated[
        float, typer.Option(help="Characters per token when counting text (swe-agent).")
    ] = DEFAULT_CHARS_PER_TOKEN,
    max_context_tokens: Annotated[
        int, typer.Option(help="Context window of the served model, tokens; 0 keeps all.")
    ] = 131_072,
    fit: Annotated[
        Fit, typer.Option(help="Make longer sessions fit: scale all tokens, or clip turns.")
    ] = Fit.scale,
    tool_cpu_fraction: Annotated[
        float, typer.Option(help="CPU share of a tool call that does not run code.")
    ] = DEFAULT_CPU_FRACTION,
    arrival: Annotated[
        ImportArrival,
        typer.Option(help="auto: the trace's times if it has them, else poisson at --rate."),
    ] = ImportArrival.auto,
    rate: Annotated[float, typer.Option(help="Poisson arrival rate, sessions/s.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of Poisson arrivals.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Import agent trajectories (SWE-agent .traj, TraceLab JSONL) as a Parquet trace."""
    importer = IMPORTERS.get(trace_format)
    options = ImportOptions(
        chars_per_token=chars_per_token,
        max_context_tokens=max_context_tokens or None,
        fit=fit,
        cpu_fraction=tool_cpu_fraction,
    )
    imported = importer(inputs, options)
    sessions, arrivals_text = _stamp_imported_arrivals(imported, arrival, rate, seed)
    write_trace(sessions, out)
    summary = summarize_trace(sessions)
    if as_json:
        extra = {"path": str(out), "format": trace_format, "num_fitted": imported.num_fitted}
        typer.echo(json.dumps({**extra, "arrivals": arrivals_text, **summary}, indent=2))
        return
    num_turns = sum(session.num_turns for session in sessions)
    typer.echo(
        f"wrote {len(sessions)} {trace_format} sessions ({num_turns} turns) to {out};"
        f" arrivals: {arrivals_text}"
    )
    if imported.num_fitted:
        sessions_text = "session" if imported.num_fitted == 1 else "sessions"
        verb = "scaled" if fit is Fit.scale else "clipped"
        typer.echo(
            f"{imported.num_fitted} {sessions_text} {verb} to the"
            f" {max_context_tokens:,}-token window"
        )
    _print_summary(out, summary)


# --------------------------------------------------------------------------- inspect


def summarize_trace(sessions: Sequence[SessionSpec]) -> dict[str, float | int | None]:
    """The shape of a trace: turns, tokens, context, tool time and arrivals.

    Token figures are per turn, context per session (its final length), tool
    times per tool call (every turn but a session's last). ``arrival_rate_per_s``
    is ``None`` when all sessions arrive at once.
    """
    turns = [turn for session in sessions for turn in session.turns]
    tool_calls = [turn for session in sessions for turn in session.turns[:-1]]
    num_turns = [session.num_turns for session in sessions]
    new_tokens = [turn.new_tokens for turn in turns]
    output_tokens = [turn.output_tokens for turn in turns]
    context_tokens = [session.max_context_tokens for session in sessions]
    tool_s = [turn.tool_s for turn in tool_calls]
    total_tool_s = sum(tool_s)
    arrivals_s = [session.arrival_s for session in sessions]
    span_s = max(arrivals_s) - min(arrivals_s) if arrivals_s else 0.0
    summary: dict[str, float | int | None] = {
        "num_sessions": len(sessions),
        "num_turns": len(turns),
        "num_tool_calls": len(tool_calls),
    }
    for name, values, stats in (
        ("turns_per_session", num_turns, ("p50", "p90", "max")),
        ("new_tokens", new_tokens, ("p50", "p90", "mean")),
        ("output_tokens", output_tokens, ("p50", "p90", "mean")),
        ("context_tokens", context_tokens, ("p50", "p90", "max")),
        ("tool_s", tool_s, ("p50", "p90", "p99")),
    ):
        summary.update(_stats(name, values, stats))
    summary["tool_cpu_share"] = (
        sum(turn.tool_cpu_s for turn in tool_calls) / total_tool_s if total_tool_s > 0 else 0.0
    )
    summary["arrival_span_s"] = span_s
    summary["arrival_rate_per_s"] = (len(sessions) - 1) / span_s if span_s > 0 else None
    return summary


def _stats(name: str, values: Sequence[float], stats: Sequence[str]) -> dict[str, float]:
    """``{name}_{stat}`` for each stat among mean, max and percentiles like p90 (0 if empty)."""
    array = np.asarray(values, dtype=np.float64)

    def one(stat: str) -> float:
        if array.size == 0:
            return 0.0
        if stat == "mean":
            return float(array.mean())
        if stat == "max":
            return float(array.max())
        return float(np.percentile(array, float(stat.removeprefix("p"))))

    return {f"{name}_{stat}": one(stat) for stat in stats}


def _number(value: float | int | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _row(summary: dict[str, float | int | None], name: str, stats: Sequence[str]) -> str:
    return "  ".join(f"{stat} {_number(summary[f'{name}_{stat}'])}" for stat in stats)


def _print_summary(path: Path, summary: dict[str, float | int | None]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(path), show_header=False)
    table.add_column("quantity", style="bold")
    table.add_column("value")
    table.add_row("sessions", f"{summary['num_sessions']:,}")
    table.add_row("turns", f"{summary['num_turns']:,} ({summary['num_tool_calls']:,} tool calls)")
    table.add_row("turns / session", _row(summary, "turns_per_session", ("p50", "p90", "max")))
    table.add_row("appended tokens / turn", _row(summary, "new_tokens", ("p50", "p90", "mean")))
    table.add_row("output tokens / turn", _row(summary, "output_tokens", ("p50", "p90", "mean")))
    table.add_row(
        "context tokens / session", _row(summary, "context_tokens", ("p50", "p90", "max"))
    )
    table.add_row("tool time / call (s)", _row(summary, "tool_s", ("p50", "p90", "p99")))
    table.add_row("tool CPU share", f"{summary['tool_cpu_share']:.0%}")
    rate = summary["arrival_rate_per_s"]
    rate_text = "all at once" if rate is None else f"{rate:.4g} sessions/s"
    table.add_row("arrivals", f"span {_number(summary['arrival_span_s'])} s, {rate_text}")
    Console().print(table)


@trace_app.command("inspect")
def inspect_command(
    path: Annotated[Path, typer.Argument(help="Parquet trace to summarise.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Summarise a trace: turns, tokens, context, tool time and arrivals."""
    summary = summarize_trace(read_trace(path))
    if as_json:
        typer.echo(json.dumps({"path": str(path), **summary}, indent=2))
    else:
        _print_summary(path, summary)
