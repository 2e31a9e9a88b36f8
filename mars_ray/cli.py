"""The ``mars-ray`` command.

Each feature module registers its own subcommands (``register(app)``), so this file
stays a table of contents. User errors (:class:`MarsError`) print one line and exit 2.
"""

from __future__ import annotations

import sys

import typer

from mars_ray.errors import MarsError

app = typer.Typer(
    name="mars-ray",
    help="Agent-aware LLM serving on Ray and vLLM (MARS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_all() -> None:
    from mars_ray import bench, capacity, perf
    from mars_ray.cluster import cli as cluster_cli
    from mars_ray.engine import cli as engine_cli
    from mars_ray.workloads import cli as workloads_cli

    engine_cli.register(app)
    workloads_cli.register(app)
    bench.register(app)
    capacity.register(app)
    perf.register(app)
    cluster_cli.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _register_all()
    try:
        app(args=argv, standalone_mode=False)
    except MarsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(130) from None
    except Exception as exc:  # click usage errors carry their own exit code
        # typer >= 0.29 vendors its own click: match the exception by its interface,
        # not by click's class, so both kinds print one line instead of a traceback.
        show, exit_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):
            show()
            raise SystemExit(exit_code) from None
        raise
