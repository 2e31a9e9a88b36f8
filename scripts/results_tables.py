"""Markdown tables for docs/results.md from bench output directories.

    .venv/bin/python scripts/results_tables.py docs/results/swe-h100-llama8b [...]

For each directory: the command that produced it (from ``summary.json``), a compact
matrix (mean JCT in seconds and goodput@3 per policy and load, the best mean JCT
of each load in bold) and the plots. The full per-run figures stay in the
directory's ``summary.json`` and in the ``.txt`` beside it (the bench's own table).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ALPHA = "3"


def _load(run: dict[str, Any]) -> float:
    return float(run.get("load", run["rate_per_s"]))


def matrix(runs: list[dict[str, Any]]) -> str:
    """Rows: loads; columns: policies; cells: mean JCT s (goodput@3)."""
    policies = list(dict.fromkeys(r["policy"] for r in runs))
    loads = sorted({_load(r) for r in runs})
    cell = {(_load(r), r["policy"]): r for r in runs}
    lines = [
        "| load (sessions/s) | " + " | ".join(policies) + " |",
        "|---" * (len(policies) + 1) + "|",
    ]
    for load in loads:
        row = [cell[(load, p)] for p in policies]
        best = min(round(r["mean_jct_s"]) for r in row)  # as printed: ties are ties
        cells = []
        for r in row:
            text = f"{r['mean_jct_s']:,.0f} ({r['goodput'][ALPHA]:.2f})"
            cells.append(f"**{text}**" if round(r["mean_jct_s"]) == best else text)
        rate = row[0]["rate_per_s"]
        lines.append(f"| {load:g}x ({rate:.3g}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(directory: Path) -> str:
    summary = json.loads((directory / "summary.json").read_text())
    command = summary["config"].get("command", "")
    plots = " ".join(
        f"![{p.name}]({directory.name}/{p.name})" for p in sorted(directory.glob("*.png"))
    )
    return f"```\n{command}\n```\n\n{matrix(summary['runs'])}\n\n{plots}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", type=Path)
    for directory in parser.parse_args().directories:
        print(section(directory))


if __name__ == "__main__":
    main()
