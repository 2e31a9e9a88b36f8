"""``mars-ray serve``: run the deployment in the foreground until SIGINT / SIGTERM."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from mars_ray.errors import ConfigError


def serve_command(
    gpus: Annotated[int, typer.Option("--gpus", help="GPU workers (logical GPUs when local)")] = 1,
    nodes: Annotated[int, typer.Option("--nodes", help="emulated nodes (local Ray only)")] = 1,
    engine: Annotated[
        str, typer.Option("--engine", help="sim (SimEngine) or vllm (AsyncLLM + MarsScheduler)")
    ] = "sim",
    vllm_model: Annotated[
        str | None,
        typer.Option(
            "--vllm-model",
            help="engine=vllm: model directory or id to load on each GPU "
            "(default: a simulated device, vLLM's scheduler and KV cache on CPU)",
        ),
    ] = None,
    port: Annotated[int, typer.Option("--port", help="HTTP port")] = 8000,
    host: Annotated[str, typer.Option("--host", help="HTTP bind address")] = "127.0.0.1",
    address: Annotated[
        str | None, typer.Option("--address", help="join this Ray cluster (e.g. auto)")
    ] = None,
    policy: Annotated[str, typer.Option("--policy", help="scheduling policy")] = "mars",
    gpu: Annotated[str, typer.Option("--gpu", help="GPU profile")] = "h100-80gb",
    model: Annotated[str, typer.Option("--model", help="model profile")] = "llama-3.1-8b",
    time_scale: Annotated[
        float, typer.Option("--time-scale", help="simulated seconds per wall second")
    ] = 1.0,
    policy_config: Annotated[
        Path | None, typer.Option("--policy-config", help="MARS tunables (YAML or JSON)")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="MARS_API_KEY", help="require this bearer token"),
    ] = None,
    spread: Annotated[
        bool, typer.Option("--spread", help="spread GPU workers across nodes")
    ] = False,
    ingress_replicas: Annotated[
        int,
        typer.Option("--ingress-replicas", min=1, max=64, help="HTTP ingress replicas"),
    ] = 1,
    session_idle_timeout_s: Annotated[
        float,
        typer.Option(
            "--session-idle-timeout-s",
            help="end a session with no turn for this long (seconds of the deployment's "
            "clock; longer for sessions with long tool calls): frees its admission slot "
            "and KV. Stock agents never close their sessions (docs/agents.md)",
        ),
    ] = 600.0,
    allow_tool_replay: Annotated[
        bool,
        typer.Option(
            "--allow-tool-replay",
            help="serve tool replay (POST /v1/sessions/{id}/tools with 'replay': CPU burn "
            "and waiting for a traced call), a benchmarking feature any client could use "
            "to occupy the tool pool; off by default (docs/security.md)",
        ),
    ] = False,
    session_id_header: Annotated[
        list[str] | None,
        typer.Option(
            "--session-id-header",
            help="another request header that carries a session id (repeatable)",
        ),
    ] = None,
) -> None:
    """Serve the OpenAI-compatible API with MARS scheduling (foreground; Ctrl-C stops)."""
    from mars_ray.actors.config import deployment_config
    from mars_ray.cluster.serving import running_deployment

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    args: dict[str, Any] = {
        "engine": engine,
        "policy": policy,
        "cluster": {"num_gpus": gpus, "num_nodes": nodes, "gpu": gpu, "model": model},
        "time_scale": time_scale,
        "vllm_model": vllm_model,
        "api_key": api_key,
        "placement_strategy": "SPREAD" if spread else "PACK",
        "ingress_replicas": ingress_replicas,
        "session_idle_timeout_s": session_idle_timeout_s,
        "session_idle_timeout_max_s": max(2400.0, session_idle_timeout_s),
        "session_id_headers": tuple(session_id_header or ()),
        "tools": {"allow_replay": allow_tool_replay},
    }
    if vllm_model is not None:
        args["model_name"] = vllm_model
    if policy_config is not None:
        args["policy_config_path"] = str(policy_config)
    config = deployment_config(args)
    stop = threading.Event()
    _stop_on_signals(stop)
    with running_deployment(
        config, address=address, num_nodes=nodes if address is None else 1, host=host, port=port
    ) as deployment:
        print(
            f"mars-ray serving {config.model_name} on {deployment.url} "
            f"({gpus} GPU worker(s), engine={engine}, policy={policy}); Ctrl-C to stop",
            flush=True,
        )
        stop.wait()
        print("mars-ray: shutting down", flush=True)
    print("mars-ray: stopped", flush=True)


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM set ``stop``: the deployment then shuts down in order."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
