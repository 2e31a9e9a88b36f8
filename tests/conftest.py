"""Suite-wide rule: with ``MARS_REQUIRE_ALL=1`` (set by ``.ci/run``) a skipped test fails
the run. Tests skip, with a printed reason, when a tool they need is missing (vLLM,
kubectl, prometheus); in CI every one of those is installed, so a skip there means
something silently stopped being tested."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from mars_ray.workloads.cli import register

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("MARS_REQUIRE_ALL") == "1" and _skipped and exitstatus == 0:
        shown = ", ".join(_skipped[:5]) + (" ..." if len(_skipped) > 5 else "")
        print(f"\nerror: MARS_REQUIRE_ALL=1 but {len(_skipped)} test(s) skipped: {shown}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def trace_cli() -> Callable[..., Any]:
    """``mars-ray trace ...`` through typer's runner (workloads and importers tests)."""
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, ["trace", *args])

    return invoke
