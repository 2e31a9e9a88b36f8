"""Run a mars-ray deployment from Python: Ray (embedded or joined), Ray Serve on a
port, the runtime's actors, and a clean shutdown. ``mars-ray serve`` and
``mars-ray bench --runtime ray`` both use :func:`running_deployment`.
"""

from __future__ import annotations

import logging
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mars_ray.actors.config import DeploymentConfig
from mars_ray.errors import MarsError

from .launch import LocalRay, connect, teardown_runtime

log = logging.getLogger(__name__)

APP_NAME = "mars"
READY_TIMEOUT_S = 180.0


@dataclass
class RunningDeployment:
    url: str  # http://host:port
    ray: LocalRay
    config: DeploymentConfig


@contextmanager
def running_deployment(
    config: DeploymentConfig,
    *,
    address: str | None = None,
    num_nodes: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> Iterator[RunningDeployment]:
    """Start (or join) Ray, deploy the app, wait until ``/readyz`` answers, and on exit
    delete it, remove its actors and stop whatever Ray this call started."""
    from ray import serve

    from mars_ray.actors.app import bind

    on_sigterm = signal.getsignal(signal.SIGTERM)
    local = connect(address, num_gpus=config.cluster.num_gpus, num_nodes=num_nodes)
    if callable(on_sigterm):  # ray.init replaced the caller's handler (with an exit)
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        serve.start(http_options={"host": host, "port": port}, detached=False)
        serve.run(bind(config), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        wait_ready(url, READY_TIMEOUT_S, api_key=config.api_key)
        yield RunningDeployment(url, local, config)
    finally:
        _shutdown(config, local)


def _shutdown(config: DeploymentConfig, local: LocalRay) -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        serve.delete(APP_NAME)
    except Exception:  # already gone
        log.debug("serve.delete failed", exc_info=True)
    teardown_runtime(config.cluster.num_gpus)
    if local.started:
        serve.shutdown()
    local.shutdown()


def wait_ready(url: str, timeout_s: float, api_key: str | None = None) -> None:
    """Poll ``/readyz`` until it answers 200 (raises MarsError after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise MarsError(f"the deployment at {url} was not ready within {timeout_s:.0f} s ({last})")
