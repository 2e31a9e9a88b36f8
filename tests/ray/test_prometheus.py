"""A real Prometheus server scrapes a running deployment's ``/metrics``.

Debian's ``prometheus`` package (``scripts/install-prometheus.sh``) is started on
loopback with a one-job config pointing at a real Ray Serve deployment (two GPU
workers on the sim engine), after some sessions with turns and tool calls went
through it; the checks go through Prometheus's HTTP query API, so they cover what a
KubeRay ``ServiceMonitor`` / ``PodMonitor`` scrape would see: the target is up with
the API key set (``/metrics`` stays open), the series and their labels survive
ingestion, and nothing outside :data:`mars_ray.telemetry.METRICS` is exported.
"""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mars_ray.actors.config import deployment_config
from mars_ray.cluster.serving import RunningDeployment, running_deployment
from mars_ray.telemetry import exported_series_names

PROMETHEUS = shutil.which("prometheus")
if PROMETHEUS is None:
    pytest.skip(
        "prometheus not installed: run scripts/install-prometheus.sh", allow_module_level=True
    )

KEY = "prom-key"
AUTH = {"authorization": f"Bearer {KEY}"}
TIME_SCALE = 20.0
NUM_GPUS = 2
NUM_SESSIONS = 3
TURNS_PER_SESSION = 2  # every session: turn, traced tool replay, last turn
JOB = "mars"
DEADLINE_S = 30.0  # for each wait on Prometheus (scrape_interval is 1 s)

T = TypeVar("T")


def free_port(avoid: int = 0) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != avoid:
            return port


def words(n: int) -> str:
    return " ".join(["w"] * n)


@dataclass(frozen=True)
class Traffic:
    turns: int
    tool_calls: int
    sessions_closed: int
    exposed_names: frozenset[str]  # mars_ sample names of the deployment's own /metrics


@pytest.fixture(scope="module")
def deployment(port: int) -> Iterator[RunningDeployment]:
    config = deployment_config(
        {
            "cluster": {"num_gpus": NUM_GPUS, "num_nodes": 1},
            "time_scale": TIME_SCALE,
            "api_key": KEY,  # Prometheus scrapes without it: /metrics must stay open
            "tools": {"allow_replay": True},  # every session replays a traced tool call
        }
    )
    with running_deployment(config, port=port) as running:
        yield running


@pytest.fixture(scope="module")
def traffic(deployment: RunningDeployment) -> Traffic:
    """Sessions of two turns around a traced tool call, each closed by its last turn."""
    with httpx.Client(base_url=deployment.url, headers=AUTH, timeout=60) as http:
        for i in range(NUM_SESSIONS):
            sid = http.post("/v1/sessions", json={"session_id": f"prom-{i}"}).json()["session_id"]
            head = {"x-session-id": sid}
            messages: list[dict[str, str]] = [{"role": "user", "content": words(300)}]
            first = http.post(
                "/v1/chat/completions",
                headers=head,
                json={"messages": messages, "max_tokens": 8, "mars": {"expected_tool_s": 1.0}},
            )
            assert first.status_code == 200, first.text
            replay = http.post(
                f"/v1/sessions/{sid}/tools", json={"replay": {"cpu_s": 0.5, "wait_s": 0.5}}
            )
            assert replay.status_code == 200, replay.text
            messages += [
                {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
                {"role": "user", "content": words(40)},
            ]
            last = http.post(
                "/v1/chat/completions",
                headers=head,
                json={"messages": messages, "max_tokens": 4, "mars": {"last_turn": True}},
            )
            assert last.status_code == 200, last.text
            assert http.get(f"/v1/sessions/{sid}").status_code == 404, "the last turn closed it"
        text = http.get("/metrics").text
    names = {
        sample.name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("mars_")
    }
    return Traffic(
        turns=NUM_SESSIONS * TURNS_PER_SESSION,
        tool_calls=NUM_SESSIONS,
        sessions_closed=NUM_SESSIONS,
        exposed_names=frozenset(names),
    )


class Prometheus:
    """A ``prometheus`` subprocess on loopback and a client of its HTTP API."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log
        self.http = httpx.Client(base_url=url, timeout=10, trust_env=False)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text[-lines:])

    def fail(self, message: str) -> AssertionError:
        state = "running" if self.process.poll() is None else f"exited {self.process.returncode}"
        return AssertionError(
            f"{message}\n--- prometheus ({state}), last lines of {self.log} ---\n{self.log_tail()}"
        )

    def api(self, path: str, **params: str) -> Any:
        response = self.http.get(path, params=params)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise self.fail(f"GET {path} {params}: HTTP {response.status_code} {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's vector: ``[{"metric": {labels}, "value": [ts, "str"]}, ...]``."""
        data = self.api("/api/v1/query", query=promql)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def wait_for(self, what: str, probe: Callable[[], T], ok: Callable[[T], bool]) -> T:
        """Poll ``probe`` until ``ok`` holds; fail with the last value and the server's log."""
        deadline = time.monotonic() + DEADLINE_S
        last: T | str = "never probed"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                value = probe()
            except (httpx.HTTPError, ValueError) as exc:  # not listening yet, or not JSON
                last = repr(exc)
            else:
                if ok(value):
                    return value
                last = value
            time.sleep(0.25)
        raise self.fail(f"{what}: not within {DEADLINE_S:.0f} s; last: {last}")

    def wait_value(self, promql: str, ok: Callable[[list[float]], bool]) -> list[dict[str, Any]]:
        """Poll an instant query until ``ok`` holds for its values."""
        return self.wait_for(promql, lambda: self.query(promql), lambda r: ok(values(r)))

    def close(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def values(result: list[dict[str, Any]]) -> list[float]:
    return [float(r["value"][1]) for r in result]


@pytest.fixture(scope="module")
def prometheus(
    deployment: RunningDeployment,
    traffic: Traffic,
    port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Prometheus]:
    assert PROMETHEUS is not None
    root = tmp_path_factory.mktemp("prometheus")
    target = deployment.url.removeprefix("http://")
    config = root / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: {JOB}\n"
        "    honor_labels: true\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    prom_port = free_port(avoid=port)
    log = root / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    server = Prometheus(f"http://127.0.0.1:{prom_port}", process, log)
    try:
        server.wait_for("/-/ready", lambda: server.http.get("/-/ready").status_code, (200).__eq__)
        server.wait_for(
            f"the {JOB} target is up",
            lambda: server.api("/api/v1/targets", state="active")["activeTargets"],
            lambda ts: [t["labels"]["job"] for t in ts if t["health"] == "up"] == [JOB],
        )
        yield server
    finally:
        server.close()


def test_the_target_is_up_and_scraped_without_the_api_key(prometheus: Prometheus) -> None:
    [target] = prometheus.api("/api/v1/targets", state="active")["activeTargets"]
    assert target["health"] == "up", target
    assert target["scrapeUrl"].endswith("/metrics"), target
    assert target["lastError"] == "", target
    up = prometheus.wait_value(f'up{{job="{JOB}"}} == 1', lambda v: v == [1.0])
    assert up[0]["metric"]["job"] == JOB


def test_turns_and_tool_calls_are_counted(prometheus: Prometheus, traffic: Traffic) -> None:
    prometheus.wait_value("sum(mars_turns_total)", lambda v: v != [] and v[0] >= traffic.turns)
    per_engine = prometheus.query("mars_turns_total")
    assert {r["metric"]["engine"] for r in per_engine} <= {str(e) for e in range(NUM_GPUS)}
    assert all(r["metric"]["job"] == JOB for r in per_engine)
    prometheus.wait_value(
        "sum(mars_tool_calls_total)", lambda v: v != [] and v[0] >= traffic.tool_calls
    )
    assert {r["metric"]["node"] for r in prometheus.query("mars_tool_calls_total")} == {"0"}


def test_kv_usage_has_one_series_per_engine(prometheus: Prometheus) -> None:
    result = prometheus.wait_value("mars_kv_usage_ratio", lambda v: len(v) == NUM_GPUS)
    assert sorted(r["metric"]["engine"] for r in result) == [str(e) for e in range(NUM_GPUS)]
    assert all(0.0 <= v <= 1.0 for v in values(result))


def test_admission_window_is_exported(prometheus: Prometheus) -> None:
    result = prometheus.wait_value(
        "mars_admission_window_sessions", lambda v: v != [] and all(w >= 1 for w in v)
    )
    assert {r["metric"]["scope"] for r in result} >= {"0"}


def test_closed_sessions_reach_the_jct_histogram(prometheus: Prometheus, traffic: Traffic) -> None:
    prometheus.wait_value(
        "sum(mars_session_jct_seconds_count)",
        lambda v: v != [] and v[0] >= traffic.sessions_closed,
    )
    prometheus.wait_value(
        "sum(mars_sessions_completed_total)",
        lambda v: v != [] and v[0] >= traffic.sessions_closed,
    )
    [median] = prometheus.query(
        "histogram_quantile(0.5, sum by (le) (mars_session_jct_seconds_bucket))"
    )
    jct = float(median["value"][1])
    assert math.isfinite(jct) and jct > 0, median


def test_every_exposed_series_is_ingested_and_nothing_undeclared(
    prometheus: Prometheus, traffic: Traffic
) -> None:
    declared = exported_series_names()
    assert traffic.exposed_names <= declared, "the deployment itself exposes undeclared series"
    names = prometheus.wait_for(
        "every mars_ series of /metrics in Prometheus",
        lambda: {
            n for n in prometheus.api("/api/v1/label/__name__/values") if n.startswith("mars_")
        },
        lambda got: traffic.exposed_names <= got,
    )
    undeclared = sorted(names - declared)
    assert not undeclared, (
        f"Prometheus has mars_ series that METRICS does not declare: {undeclared}"
    )
    # what the traffic above must have touched, whatever else is exposed
    assert {
        "mars_kv_usage_ratio",
        "mars_kv_demand_ratio",
        "mars_engine_running_requests",
        "mars_turns_total",
        "mars_turn_ttft_seconds_bucket",
        "mars_session_jct_seconds_count",
        "mars_sessions_completed_total",
        "mars_tool_calls_total",
        "mars_tool_workers",
        "mars_admission_window_sessions",
    } <= names
