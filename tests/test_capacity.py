"""``mars-ray capacity``: the bisection on synthetic goodput curves (monotone, dipping,
never met, always met, out of runs), bad input through the real CLI, one small real
search through the simulator; and the workload additions it is meant to be run with
(gamma arrivals, heavy-tailed contexts)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mars_ray import cli
from mars_ray.bench import BenchConfig, run_bench
from mars_ray.capacity import (
    DEFAULT_MAX_RUNS,
    MAX_BRACKET_STEPS,
    CapacitySearch,
    Probe,
    find_capacity,
)
from mars_ray.config import validated
from mars_ray.errors import ConfigError
from mars_ray.workloads import WORKLOADS, poisson_arrivals
from mars_ray.workloads.arrivals import gamma_arrivals
from mars_ray.workloads.generators import Pareto, heavy_tailed_contexts


def step(capacity: float, above: float = 0.5) -> Callable[[float], float]:
    """Goodput 1.0 up to ``capacity``, ``above`` beyond it."""
    return lambda rate: 1.0 if rate <= capacity else above


def smooth(rate: float) -> float:
    """A monotone decreasing goodput curve crossing 0.9 at rate 0.9."""
    return 1.0 / (1.0 + (rate / 2.7) ** 2 * 1.0)  # 1 / (1 + 1/9) = 0.9 at rate 0.9


def check_bracket(search: CapacitySearch, true_capacity: float) -> None:
    lo, hi = search.lo_per_s, search.hi_per_s
    assert search.status == "converged" and search.converged
    assert lo is not None and hi is not None
    assert lo <= true_capacity < hi
    assert hi - lo <= search.tolerance * lo
    assert search.capacity_per_s == lo


# --------------------------------------------------------------------------- bisection


@pytest.mark.parametrize("start", [0.02, 0.3, 1.0, 7.0, 60.0])  # within 2**6 of 1
def test_step_function_from_any_start(start: float) -> None:
    search = find_capacity(step(1.0), start_rate_per_s=start, target=0.9, tolerance=0.01)
    check_bracket(search, 1.0)
    # Bracketing: one run per factor of 2 between start and capacity, plus one; then
    # bisection halves log2(hi / lo) = 1 until it is below log2(1.01): 7 runs.
    bracket_runs = 1 + math.ceil(abs(math.log2(start))) + 1
    assert search.num_runs <= bracket_runs + 7


def test_smooth_monotone_curve() -> None:
    search = find_capacity(smooth, start_rate_per_s=0.5, tolerance=0.02)
    check_bracket(search, 0.9)
    assert all((p.goodput >= 0.9) == (p.rate_per_s <= 0.9 + 1e-12) for p in search.probes)


def test_goodput_exactly_at_target_meets() -> None:
    search = find_capacity(lambda r: 0.9 if r <= 2.0 else 0.0, start_rate_per_s=1.0)
    check_bracket(search, 2.0)


def test_non_monotone_curve_gives_a_crossing_lo_meets_hi_misses() -> None:
    # Meets below 1, dips in (1, 2), meets again in [2, 3], misses above 3.
    def dip(rate: float) -> float:
        return 0.95 if rate <= 1.0 or 2.0 <= rate <= 3.0 else 0.5

    from_above = find_capacity(dip, start_rate_per_s=2.5, tolerance=0.01)
    check_bracket(from_above, 3.0)  # doubling up from a meeting rate finds the top crossing
    from_dip = find_capacity(dip, start_rate_per_s=1.5, tolerance=0.01)
    check_bracket(from_dip, 1.0)  # halving from a dip finds the crossing below it
    for search in (from_above, from_dip):
        assert dip(search.lo_per_s or 0) >= 0.9 and dip(search.hi_per_s or 0) < 0.9


def test_target_met_at_every_rate_is_unbounded_lower_bound() -> None:
    search = find_capacity(lambda r: 1.0, start_rate_per_s=0.1)
    assert search.status == "unbounded" and not search.converged
    assert search.hi_per_s is None
    assert search.capacity_per_s == pytest.approx(0.1 * 2**MAX_BRACKET_STEPS)
    assert search.num_runs == MAX_BRACKET_STEPS + 1
    assert search.describe().startswith(">= ")


def test_target_never_met_names_the_best_rate() -> None:
    # Goodput rises as the rate falls but never reaches the target.
    search = find_capacity(lambda r: 0.8 - 0.1 * r, start_rate_per_s=1.0, max_bracket_steps=4)
    assert search.status == "never_met"
    assert search.capacity_per_s is None and search.lo_per_s is None
    assert search.best.rate_per_s == 1.0 / 16
    assert search.best.goodput == pytest.approx(0.8 - 0.1 / 16)
    assert [p.rate_per_s for p in search.probes] == [1.0, 0.5, 0.25, 0.125, 0.0625]
    message = search.describe()
    assert "none" in message and "best goodput 79% at 0.0625/s" in message


def test_out_of_runs_keeps_the_bracket() -> None:
    search = find_capacity(step(1.0), start_rate_per_s=0.3, tolerance=1e-6, max_runs=5)
    assert search.status == "max_runs" and search.num_runs == 5
    assert search.lo_per_s is not None and search.hi_per_s is not None
    assert search.lo_per_s <= 1.0 < search.hi_per_s
    assert "not converged in 5 runs" in search.describe()
    only_misses = find_capacity(lambda r: 0.0, start_rate_per_s=1.0, max_runs=2)
    assert only_misses.status == "max_runs" and only_misses.capacity_per_s is None
    one_run = find_capacity(step(1.0), start_rate_per_s=0.5, max_runs=1)
    assert one_run.status == "max_runs" and one_run.lo_per_s == 0.5 and one_run.hi_per_s is None


def test_on_probe_sees_each_run_and_the_bracket() -> None:
    seen: list[tuple[Probe, float | None, float | None]] = []
    search = find_capacity(
        step(1.0), start_rate_per_s=4.0, tolerance=0.2, on_probe=lambda *a: seen.append(a)
    )
    assert [p for p, _, _ in seen] == list(search.probes)
    assert seen[0] == (Probe(4.0, 0.5), None, 4.0)
    assert seen[-1][1:] == (search.lo_per_s, search.hi_per_s)
    assert search.num_runs <= DEFAULT_MAX_RUNS


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": 0.0}, "--target must be in (0, 1]"),
        ({"target": 1.5}, "--target must be in (0, 1]"),
        ({"target": math.nan}, "--target must be in (0, 1]"),
        ({"tolerance": 0.0}, "--tolerance must be in (0, 1)"),
        ({"tolerance": 1.0}, "--tolerance must be in (0, 1)"),
        ({"max_runs": 0}, "--max-runs must be >= 1"),
        ({"start_rate_per_s": 0.0}, "start rate must be finite and > 0"),
        ({"start_rate_per_s": math.inf}, "start rate must be finite and > 0"),
    ],
)
def test_bad_search_arguments(kwargs: dict[str, float], message: str) -> None:
    args: dict[str, float] = {"start_rate_per_s": 1.0} | kwargs
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        find_capacity(step(1.0), **args)  # type: ignore[arg-type]


def test_target_one_is_allowed() -> None:
    check_bracket(find_capacity(step(2.0), start_rate_per_s=1.0, target=1.0), 2.0)


def test_run_returning_nonsense_is_an_error() -> None:
    with pytest.raises(ValueError, match="not in \\[0, 1\\]"):
        find_capacity(lambda r: 1.2, start_rate_per_s=1.0)


# --------------------------------------------------------------------------- the CLI


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code: int | str | None = 0
    try:
        cli.main(["capacity", *args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return (code if isinstance(code, int) else 1), out, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "0"], "--target must be in (0, 1]"),
        (["--target", "1.1"], "--target must be in (0, 1]"),
        (["--tolerance", "-0.1"], "--tolerance must be in (0, 1)"),
        (["--max-runs", "0"], "--max-runs must be >= 1"),
        (["--policies", "mars,nope"], "nope"),
        (["--workload", "nope"], "nope"),
        (["--gpus", "3", "--nodes", "2"], "must be a multiple of --nodes"),
        (["--sessions", "0"], "--sessions must be >= 1"),
        (["--workload", "swe", "--trace", "t.parquet"], "either --workload or --trace"),
        (["--trace", "/nonexistent/t.parquet"], "t.parquet"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run_cli([*args, "--out", str(tmp_path / "out")], capsys)
    assert code == 2, (out, err)
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_real_search_in_the_simulator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One GPU, 12 long-context sessions, two policies: seconds, and each probe is the run
    `mars-ray bench --rates RATE` makes."""
    out = tmp_path / "cap"
    args = ["--workload", "longctx", "--sessions", "12", "--policies", "fcfs,mars"]
    args += ["--tolerance", "0.25", "--max-runs", "6", "--out", str(out), "--json"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert (out / "capacity.png").stat().st_size > 10_000
    assert "estimated saturation" in err  # the console goes to stderr with --json
    saturation = summary["saturation"]
    rows = {row["policy"]: row for row in summary["policies"]}
    assert list(rows) == ["fcfs", "mars"]
    for row in rows.values():
        assert row["status"] == "converged"
        lo, hi = row["lo_per_s"], row["hi_per_s"]
        assert row["capacity_per_s"] == lo and hi - lo <= 0.25 * lo
        assert row["fraction_of_gpu_bound"] == pytest.approx(lo / saturation["gpu_rate_per_s"])
        assert row["probes"][0]["rate_per_s"] == pytest.approx(saturation["rate_per_s"])
        meets = [p for p in row["probes"] if p["goodput"] >= 0.9]
        assert max(p["rate_per_s"] for p in meets) == lo
    assert rows["fcfs"]["vs_fcfs"] == 1.0
    assert rows["mars"]["vs_fcfs"] == pytest.approx(
        rows["mars"]["capacity_per_s"] / rows["fcfs"]["capacity_per_s"]
    )
    assert len(summary["runs"]) == sum(row["num_runs"] for row in rows.values())
    assert summary["config"]["command"].startswith("mars-ray capacity --workload longctx")

    # The same run through bench, at the capacity rate: the same goodput.
    probe = rows["mars"]["probes"][-1]
    config = validated(
        BenchConfig,
        workload="longctx",
        num_sessions=12,
        policies=("mars",),
        rates_per_s=(probe["rate_per_s"],),
        out_dir=tmp_path / "bench",
    )
    bench_summary = run_bench(config, progress=False, show_table=False)
    assert bench_summary["runs"][0]["goodput"]["3"] == pytest.approx(probe["goodput"])


def test_cli_exit_1_when_a_policy_never_meets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Out of runs while still below the target: no capacity, a clear line, exit 1.
    args = ["--workload", "longctx", "--sessions", "12", "--policies", "fcfs"]
    args += ["--max-runs", "1", "--out", str(tmp_path / "cap")]
    code, out, err = run_cli(args, capsys)
    assert code == 1, err
    assert "fcfs: none within 1 runs" in out and "best goodput" in out


# --------------------------------------------------------------------------- workloads


def test_gamma_arrivals_mean_rate_and_burstiness() -> None:
    n, rate = 20_000, 0.5
    poisson_like = gamma_arrivals(n, rate, np.random.default_rng(1), burstiness=1.0)
    bursty = gamma_arrivals(n, rate, np.random.default_rng(1), burstiness=0.25)
    for times in (poisson_like, bursty):
        assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
        assert times[-1] / (n - 1) == pytest.approx(1 / rate, rel=0.05)
    cv = lambda t: float(np.std(np.diff(t)) / np.mean(np.diff(t)))  # noqa: E731
    assert cv(poisson_like) == pytest.approx(1.0, rel=0.05)
    assert cv(bursty) == pytest.approx(2.0, rel=0.1)
    # burstiness 1 is the Poisson process's distribution (not its exact draws).
    poisson = poisson_arrivals(n, rate, np.random.default_rng(2))
    assert cv(poisson) == pytest.approx(cv(poisson_like), rel=0.05)
    assert len(gamma_arrivals(0, rate, np.random.default_rng(0))) == 0
    for rate_per_s, burstiness in ((0.0, 1.0), (1.0, 0.0), (1.0, math.inf)):
        with pytest.raises(ConfigError):
            gamma_arrivals(3, rate_per_s, np.random.default_rng(0), burstiness)


def test_pareto_tail() -> None:
    draws = Pareto(1.0, 1.1, 1e9).sample(np.random.default_rng(0), 200_000)
    assert draws.min() >= 1.0
    assert np.mean(draws > 10) == pytest.approx(10**-1.1, rel=0.05)
    assert Pareto(1.0, 1.1, 64.0).sample(np.random.default_rng(0), 10_000).max() <= 64.0


def test_heavy_tailed_contexts() -> None:
    window = 131_072
    swe = WORKLOADS.get("swe")
    base = swe(400, np.random.default_rng(3), window)
    heavy_gen = heavy_tailed_contexts(swe)
    heavy = heavy_gen(400, np.random.default_rng(3), window)
    again = heavy_gen(400, np.random.default_rng(3), window)
    assert heavy == again  # one seed, one workload
    assert [s.session_id for s in heavy] == [s.session_id for s in base]
    assert all(s.max_context_tokens <= window for s in heavy)
    assert all(s.turns[-1].tool_s == 0 for s in heavy)
    first = np.array([s.turns[0].new_tokens for s in heavy])
    base_first = np.array([s.turns[0].new_tokens for s in base])
    assert np.all(first >= base_first)
    ratio = first / base_first
    assert 0.04 < np.mean(ratio >= 10) < 0.14  # P(factor >= 10) = 10**-1.1 = 8%
    assert np.median(ratio) < 2.0  # most sessions barely change
    # The tail: p95 of the factor is 0.05 ** (-1 / 1.1) = 15 (swe's own first prompts
    # are 4-10k; its totals already reach the window by accumulation).
    assert np.percentile(first, 95) > 5 * np.percentile(base_first, 95)
    # Turns cut to the window keep their order and values; only the first prompt moves.
    for h, b in zip(heavy, base, strict=True):
        assert h.turns[1:-1] == b.turns[1 : len(h.turns) - 1]
    with pytest.raises(ConfigError, match="tail index"):
        heavy_tailed_contexts(swe, tail_index=0.0)
    with pytest.raises(ConfigError, match="max factor"):
        heavy_tailed_contexts(swe, max_factor=0.5)
