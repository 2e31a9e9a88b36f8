"""Offline validation of the KubeRay manifests under k8s/ (no API server can run here).

Each kustomization is rendered with ``kubectl kustomize`` (or ``kustomize build``), then:

* every ``ray.io/v1`` object is validated against the ``openAPIV3Schema`` of its CRD,
  read from ``$MARS_KUBERAY_CRDS`` (``.ci/run`` points it at ``../shared/kuberay-crds``);
  objects with ``properties`` are closed (``additionalProperties: false``) unless the
  schema preserves unknown fields, because ``kubectl apply`` rejects unknown fields
  (strict field validation) where the API server would otherwise drop them silently.
  The CRDs' CEL rules (``x-kubernetes-validations``) are not evaluated;
* every core object (ConfigMap, Secret) is validated with ``kubernetes-validate``
  (strict) for the oldest and the newest Kubernetes version it knows;
* ``monitoring.coreos.com`` objects are validated against the Prometheus Operator CRDs
  when that directory has them, and otherwise checked by hand (required fields, and
  that their selectors and ports match what KubeRay creates);
* the RayService's ``serveConfigV2`` is valid Ray Serve config (``ServeDeploySchema``),
  its import path resolves to ``mars_ray.actors.app:build_app``, its ``args`` are a valid
  ``DeploymentConfig`` with the policy ConfigMap mounted where they say, and
  ``build_app(args)`` returns a Serve application without starting Ray;
* a malformed MARS ConfigMap (unknown key, out-of-range value) makes the application
  refuse to start with a message naming the key;
* the cluster shape in the serve config matches the worker group, images match
  ``rayVersion`` and the ``ray[llm]`` pin, and the RayJob's entrypoint is a valid
  ``mars-ray bench`` command line;
* GCS fault tolerance (``k8s/components/gcs-ft``, in both overlays): the RayService's
  ``gcsFaultToleranceOptions`` name the Redis Service and port of the rendered Redis,
  its password comes from the same Secret as the Redis server's (never a literal), the
  rules KubeRay's operator enforces on top of the CRD hold, and Redis keeps its data on
  a PersistentVolumeClaim without evicting it.
"""

from __future__ import annotations

import base64
import copy
import functools
import importlib
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from mars_ray.actors.config import deployment_config, load_policy_config
from mars_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRDS_ENV = "MARS_KUBERAY_CRDS"
KUSTOMIZATIONS = {
    # Service + StatefulSet: the Redis of GCS fault tolerance (k8s/components/gcs-ft)
    "overlays/gpu": {"ConfigMap", "RayService", "Service", "StatefulSet"},
    "overlays/cpu-sim": {"ConfigMap", "Secret", "RayService", "Service", "StatefulSet"},
    "rayjob": {"RayJob"},
    "monitoring": {"ConfigMap", "PodMonitor", "ServiceMonitor"},
}
OVERLAYS = ("overlays/gpu", "overlays/cpu-sim")
IMPORT_PATH = "mars_ray.actors.app:build_app"
OLDEST_KUBERNETES = "1.28"
MONITORING_GROUP = "monitoring.coreos.com"
# Labels KubeRay puts on the head Service of a RayService (ray-operator common/service.go).
HEAD_SERVICE_LABELS = ("ray.io/originated-from-crd", "ray.io/originated-from-cr-name")


# -- rendering and schemas -------------------------------------------------------------


@functools.cache
def _render(kustomization: str) -> tuple[dict[str, Any], ...]:
    if kubectl := shutil.which("kubectl"):
        command = [kubectl, "kustomize", str(K8S / kustomization)]
    elif kustomize := shutil.which("kustomize"):
        command = [kustomize, "build", str(K8S / kustomization)]
    else:
        pytest.skip("neither kubectl nor kustomize is on PATH: cannot render k8s/")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def _objects(kustomization: str, kind: str) -> list[dict[str, Any]]:
    return [o for o in _render(kustomization) if o["kind"] == kind]


def _one(kustomization: str, kind: str) -> dict[str, Any]:
    found = _objects(kustomization, kind)
    assert len(found) == 1, f"{kustomization}: expected one {kind}, got {len(found)}"
    return found[0]


def _closed(schema: Any) -> Any:
    """``schema`` with unknown fields rejected wherever Kubernetes would reject them."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="session")
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> closed openAPIV3Schema of every served CRD version."""
    root = os.environ.get(CRDS_ENV)
    if not root:
        pytest.skip(
            f"{CRDS_ENV} is not set, so ray.io/v1 objects were NOT validated against the "
            f"KubeRay CRDs (set it to the CRD directory, e.g. ../shared/kuberay-crds)"
        )
    path = Path(root)
    assert path.is_dir(), f"{CRDS_ENV}={root} is not a directory"
    schemas = {}
    for file in sorted(path.glob("*.y*ml")):
        for doc in yaml.safe_load_all(file.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                if version.get("served"):
                    schema = version["schema"]["openAPIV3Schema"]
                    schemas[(f"{group}/{version['name']}", kind)] = _closed(schema)
    assert schemas, f"no CustomResourceDefinition in {path}"
    return schemas


def _schema_errors(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    ]


def _group(obj: dict[str, Any]) -> str:
    api_version = obj["apiVersion"]
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def _is_core(obj: dict[str, Any]) -> bool:
    group = _group(obj)
    return "." not in group or group.endswith(".k8s.io")


# -- RayService / RayJob helpers ------------------------------------------------------


def _cluster_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["rayClusterConfig" if obj["kind"] == "RayService" else "rayClusterSpec"]


def _ray_object(kustomization: str) -> dict[str, Any]:
    kind = "RayJob" if kustomization == "rayjob" else "RayService"
    return _one(kustomization, kind)


def _groups(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """("head" | "worker", group spec) of every node group."""
    spec = _cluster_spec(obj)
    return [("head", spec["headGroupSpec"])] + [
        ("worker", group) for group in spec.get("workerGroupSpecs", [])
    ]


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the first container


def _quantity(value: str | int | float) -> float:
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def _gpus_per_pod(group: dict[str, Any]) -> int:
    """GPUs Ray sees on one pod: `num-gpus` if set, else the nvidia.com/gpu limit."""
    resources = _ray_container(group).get("resources", {})
    physical = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
    logical = group.get("rayStartParams", {}).get("num-gpus")
    if logical is not None and physical:
        assert int(logical) == physical, "num-gpus disagrees with the nvidia.com/gpu limit"
    return int(logical) if logical is not None else physical


def _serve_config(kustomization: str) -> dict[str, Any]:
    text = _one(kustomization, "RayService")["spec"].get("serveConfigV2")
    assert text, f"{kustomization}: the RayService has no serveConfigV2"
    config = yaml.safe_load(text)
    assert isinstance(config, dict), "serveConfigV2 must be a YAML mapping"
    return config


def _app(kustomization: str) -> dict[str, Any]:
    apps = _serve_config(kustomization)["applications"]
    assert len(apps) == 1, "one Serve application: mars"
    return apps[0]


def _policy_file(kustomization: str) -> tuple[str, str]:
    """(path inside the pods, file content) of the MARS policy ConfigMap, checking that
    every Ray pod mounts it where the serve config's ``policy_config_path`` says."""
    path = _app(kustomization)["args"]["policy_config_path"]
    sources = set()
    for _, group in _groups(_one(kustomization, "RayService")):
        volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
        mounts = [
            m
            for m in _ray_container(group).get("volumeMounts", [])
            if path.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        assert len(mounts) == 1, f"{path} is not mounted in group {group.get('groupName')}"
        key = path[len(mounts[0]["mountPath"].rstrip("/")) + 1 :]
        sources.add((volumes[mounts[0]["name"]]["configMap"]["name"], key))
    assert len(sources) == 1, f"the Ray pods mount different policy files: {sources}"
    name, key = sources.pop()
    configmaps = {c["metadata"]["name"]: c for c in _objects(kustomization, "ConfigMap")}
    assert key in configmaps[name]["data"], f"ConfigMap {name} has no {key}"
    return path, configmaps[name]["data"][key]


def _args_with_policy_file(kustomization: str, tmp_path: Path, text: str | None = None):
    """The application args, with the mounted policy file replaced by a local copy."""
    _, content = _policy_file(kustomization)
    local = tmp_path / "policy.yaml"
    local.write_text(content if text is None else text)
    args = copy.deepcopy(_app(kustomization)["args"])
    args["policy_config_path"] = str(local)
    return args


def _ray_pin() -> str:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for requirement in pyproject["project"]["optional-dependencies"]["vllm"]:
        if m := re.fullmatch(r"ray\[[^\]]*\]==(\S+)", requirement.replace(" ", "")):
            return m.group(1)
    raise AssertionError("no ray[...]==X pin in the vllm extra")


# -- rendering and schema validation -----------------------------------------------------


@pytest.mark.parametrize("kustomization", sorted(KUSTOMIZATIONS))
def test_kustomization_renders_the_expected_objects(kustomization: str) -> None:
    kinds = [o["kind"] for o in _render(kustomization)]
    assert set(kinds) == KUSTOMIZATIONS[kustomization]
    names = [(o["kind"], o["metadata"]["name"]) for o in _render(kustomization)]
    assert len(names) == len(set(names)), "duplicate objects"
    for obj in _render(kustomization):
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", obj["metadata"]["name"])
        assert "namespace" not in obj["metadata"], "leave the namespace to `kubectl -n`"


@pytest.mark.parametrize("kustomization", sorted(KUSTOMIZATIONS))
def test_custom_resources_match_their_crds(
    kustomization: str, crd_schemas: dict[tuple[str, str], dict[str, Any]]
) -> None:
    for obj in _render(kustomization):
        key = (obj["apiVersion"], obj["kind"])
        if _is_core(obj) or (_group(obj) == MONITORING_GROUP and key not in crd_schemas):
            continue  # kubernetes-validate / checked by hand below
        assert key in crd_schemas, f"no CRD for {key} in ${CRDS_ENV}"
        errors = _schema_errors(obj, crd_schemas[key])
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']}:\n" + "\n".join(errors)


def test_the_crds_reject_a_misspelled_field(
    crd_schemas: dict[tuple[str, str], dict[str, Any]],
) -> None:
    obj = copy.deepcopy(_one("overlays/gpu", "RayService"))
    worker = obj["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    worker["rayStartParam"] = worker.pop("rayStartParams")
    worker["replicas"] = "2"
    errors = _schema_errors(obj, crd_schemas[("ray.io/v1", "RayService")])
    assert any("'rayStartParam' was unexpected" in e for e in errors), errors
    assert any("replicas: '2' is not of type 'integer'" in e for e in errors), errors


@pytest.mark.parametrize("kustomization", sorted(KUSTOMIZATIONS))
@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
def test_core_objects_match_the_kubernetes_schemas(kustomization: str, version: str) -> None:
    core = [o for o in _render(kustomization) if _is_core(o)]
    for obj in core:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {exc}")


def test_monitors_have_their_required_fields_and_match_kuberay() -> None:
    """By hand, as no Prometheus Operator CRD ships beside the KubeRay ones (if the CRD
    directory gets them, the CRD test above validates these objects too)."""
    service = _one("overlays/gpu", "RayService")
    head, worker = _groups(service)[0][1], _groups(service)[1][1]
    head_ports = {p["name"] for p in _ray_container(head)["ports"]}
    worker_ports = {p["name"] for p in _ray_container(worker)["ports"]}

    monitor = _one("monitoring", "ServiceMonitor")
    assert monitor["apiVersion"] == f"{MONITORING_GROUP}/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector == {
        "ray.io/originated-from-crd": "RayService",
        "ray.io/originated-from-cr-name": service["metadata"]["name"],
        "ray.io/node-type": "head",
    }
    endpoints = {e["port"]: e for e in monitor["spec"]["endpoints"]}
    assert set(endpoints) == {"serve", "metrics"} <= head_ports
    assert endpoints["serve"]["path"] == "/metrics"  # mars_* from the ingress
    for endpoint in endpoints.values():
        assert set(endpoint) <= {"port", "path", "interval", "relabelings", "scheme"}
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])

    pod_monitor = _one("monitoring", "PodMonitor")
    assert pod_monitor["apiVersion"] == f"{MONITORING_GROUP}/v1"
    pod_selector = pod_monitor["spec"]["selector"]["matchLabels"]
    worker_labels = dict(worker["template"]["metadata"]["labels"], **{"ray.io/node-type": "worker"})
    assert pod_selector.items() <= worker_labels.items()
    for endpoint in pod_monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in worker_ports and endpoint["path"].startswith("/")
        assert set(endpoint) <= {"port", "path", "interval", "relabelings", "scheme"}
    for obj in (monitor, pod_monitor):
        assert set(obj["spec"]) == {"selector", "endpoints"} or set(obj["spec"]) == {
            "selector",
            "podMetricsEndpoints",
        }


def test_the_dashboard_configmap_is_the_dashboard_file() -> None:
    configmap = _one("monitoring", "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = (K8S / "monitoring" / "mars-dashboard.json").read_text()
    assert configmap["data"] == {"mars-dashboard.json": dashboard}


# -- the Serve application -------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_is_valid_ray_serve_config(overlay: str) -> None:
    schema = pytest.importorskip(
        "ray.serve.schema", reason="Ray Serve is not installed: serveConfigV2 schema not checked"
    )
    config = _serve_config(overlay)
    schema.ServeDeploySchema.model_validate(config)
    # Serve ignores unknown keys; a misspelled one would silently do nothing.
    assert set(config) <= set(schema.ServeDeploySchema.model_fields)
    app = _app(overlay)
    assert set(app) <= set(schema.ServeApplicationSchema.model_fields)
    assert app["import_path"] == IMPORT_PATH
    assert app["route_prefix"] == "/"
    assert "host" not in app and "port" not in app, "KubeRay owns the HTTP port (8000)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_import_path_resolves_to_the_application_builder(overlay: str) -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
    module_name, _, attr = _app(overlay)["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attr)
    assert callable(builder)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_args_are_a_valid_deployment_config(overlay: str, tmp_path: Path) -> None:
    args = _args_with_policy_file(overlay, tmp_path)
    assert "api_key" not in args, "the API key comes from the Secret ($MARS_API_KEY)"
    config = deployment_config(args)
    assert config.engine == {"overlays/gpu": "vllm", "overlays/cpu-sim": "sim"}[overlay]
    # on GPUs a real model, served under its own name; on CPU the simulated one
    assert config.simulated_device == (overlay == "overlays/cpu-sim")
    if not config.simulated_device:
        assert config.model_name == config.vllm_model
    assert config.policy == "mars"
    assert not config.tools.allow_replay, "tool replay is a benchmarking feature (docs/security.md)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_build_app_returns_an_application_without_starting_ray(
    overlay: str, tmp_path: Path
) -> None:
    serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
    import ray

    module_name, _, attr = IMPORT_PATH.partition(":")
    build_app = getattr(importlib.import_module(module_name), attr)
    was_running = ray.is_initialized()
    app = build_app(_args_with_policy_file(overlay, tmp_path))
    assert isinstance(app, serve.Application)
    assert ray.is_initialized() == was_running, "build_app must not start or join Ray"


# -- the MARS ConfigMap ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_policy_configmap_loads(overlay: str, tmp_path: Path) -> None:
    path, content = _policy_file(overlay)
    assert path == "/etc/mars/policy.yaml"
    local = tmp_path / "policy.yaml"
    local.write_text(content)
    config = load_policy_config(local)
    assert config.admission.window_max_per_gpu >= config.admission.window_min_per_gpu


def _mutated_policy(change: dict[str, Any]) -> str:
    _, content = _policy_file("overlays/cpu-sim")
    data = yaml.safe_load(content)
    for dotted, value in change.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return yaml.safe_dump(data)


BAD_POLICIES = [
    pytest.param({"admission.window_max_per_gpux": 30}, "admission.window_max_per_gpux", id="typo"),
    pytest.param({"mlfqq": {}}, "mlfqq", id="unknown-section"),
    pytest.param(
        {"admission.multiplicative_decrease": 1.5},
        "admission.multiplicative_decrease",
        id="out-of-range",
    ),
    pytest.param({"mlfq.aging_s": -1}, "mlfq.aging_s", id="negative"),
    pytest.param(
        {"retention.tool_time_ema_alpha": "fast"}, "tool_time_ema_alpha", id="not-a-number"
    ),
]


@pytest.mark.parametrize(("change", "key"), BAD_POLICIES)
def test_a_malformed_policy_configmap_is_refused_naming_the_key(
    change: dict[str, Any], key: str, tmp_path: Path
) -> None:
    args = _args_with_policy_file("overlays/cpu-sim", tmp_path, _mutated_policy(change))
    with pytest.raises(ConfigError, match=re.escape(key)):
        deployment_config(args)


@pytest.mark.parametrize(("change", "key"), BAD_POLICIES[:3])
def test_the_application_refuses_to_start_on_a_malformed_policy(
    change: dict[str, Any], key: str, tmp_path: Path
) -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
    module_name, _, attr = IMPORT_PATH.partition(":")
    build_app = getattr(importlib.import_module(module_name), attr)
    args = _args_with_policy_file("overlays/cpu-sim", tmp_path, _mutated_policy(change))
    with pytest.raises(ConfigError, match=re.escape(key)):
        build_app(args)


# -- cluster shape and KubeRay conventions ----------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_serve_config_cluster_matches_the_worker_group(overlay: str) -> None:
    args = _app(overlay)["args"]
    cluster, workers = args["cluster"], _groups(_one(overlay, "RayService"))[1:]
    assert len(workers) == 1
    group = workers[0][1]
    replicas = group["replicas"]
    assert group["minReplicas"] == replicas == group["maxReplicas"], "a fixed GPU count"
    assert cluster["num_nodes"] == replicas
    assert cluster["num_gpus"] == replicas * _gpus_per_pod(group)
    cpus = _quantity(_ray_container(group)["resources"]["limits"]["cpu"])
    tool_cores = cluster.get("cpu_cores_per_gpu", 16) * _gpus_per_pod(group)
    assert tool_cores <= cpus, "the tool pool needs its CPUs on the worker pod"
    assert args["tools"]["slots_per_node"] <= cpus


def test_the_rayjob_bench_matches_its_cluster_and_the_cli() -> None:
    job = _one("rayjob", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["mars-ray", "bench"]
    assert argv[argv.index("--runtime") + 1] == "ray"
    assert argv[argv.index("--address") + 1] == "auto"
    workers = _groups(job)[1:]
    assert int(argv[argv.index("--nodes") + 1]) == sum(g["replicas"] for _, g in workers)
    gpus = sum(g["replicas"] * _gpus_per_pod(g) for _, g in workers)
    assert int(argv[argv.index("--gpus") + 1]) == gpus

    import typer

    from mars_ray import cli

    cli._register_all()
    bench = typer.main.get_command(cli.app).commands["bench"]  # type: ignore[attr-defined]
    try:  # parse and type-check the options without running the bench
        bench.make_context("bench", argv[2:])
    except Exception as exc:  # typer vendors click: its UsageError is not click's
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        pytest.fail(f"the RayJob entrypoint is not a valid `mars-ray bench` call: {message}")


@pytest.mark.parametrize("kustomization", [*OVERLAYS, "rayjob"])
def test_ray_pods_follow_kuberay_conventions(kustomization: str) -> None:
    obj = _ray_object(kustomization)
    ray_version = _cluster_spec(obj)["rayVersion"]
    assert ray_version == _ray_pin(), "rayVersion must be the Ray that mars-ray pins"
    images = set()
    for role, group in _groups(obj):
        container = _ray_container(group)
        images.add(container["image"])
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert ports.get("metrics") == 8080
        if role == "head":
            assert group["rayStartParams"].get("num-cpus") == "0", "keep MARS actors off the head"
            expected = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
            assert expected.items() <= ports.items()
            if obj["kind"] == "RayService":
                assert ports.get("serve") == 8000
        # KubeRay injects probes (on RayService workers, a Serve-proxy readiness check);
        # probes written in the template would replace them.
        assert "livenessProbe" not in container and "readinessProbe" not in container
        resources = container["resources"]
        for key in ("cpu", "memory"):
            assert key in resources["requests"] and key in resources["limits"]
        assert resources["requests"]["memory"] == resources["limits"]["memory"]
    assert len(images) == 1, f"head and workers must run one image: {images}"
    image = images.pop()
    assert f":0.1.0-ray{ray_version}-py3" in image, image


def test_gpu_workers_request_whole_gpus_with_guaranteed_resources() -> None:
    obj = _one("overlays/gpu", "RayService")
    for role, group in _groups(obj):
        resources = _ray_container(group)["resources"]
        assert resources["requests"] == resources["limits"], f"{role}: Guaranteed QoS"
        if role == "worker":
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
            assert "num-gpus" not in group["rayStartParams"], "Ray reads the GPU limit"
            tolerations = group["template"]["spec"]["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


@pytest.mark.parametrize("kustomization", ["overlays/cpu-sim", "rayjob"])
def test_cpu_variants_use_logical_gpus_only(kustomization: str) -> None:
    assert "nvidia.com/gpu" not in yaml.safe_dump(list(_render(kustomization)))
    for role, group in _groups(_ray_object(kustomization)):
        if role == "worker":
            assert int(group["rayStartParams"]["num-gpus"]) >= 1
        assert _ray_container(group)["image"].endswith("-cpu")
    if kustomization != "rayjob":
        assert _app(kustomization)["args"]["engine"] == "sim"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_pod_gets_the_api_key_secret_and_the_policy(overlay: str) -> None:
    secrets = {s["metadata"]["name"] for s in _objects(overlay, "Secret")}
    for _, group in _groups(_one(overlay, "RayService")):
        env = {e["name"]: e for e in _ray_container(group)["env"]}
        ref = env["MARS_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == "api-key" and not ref.get("optional")
        # gpu: created by the operator (docs/deploy.md); cpu-sim: generated (hashed name).
        assert ref["name"] in secrets or (not secrets and ref["name"] == "mars-ray-api-key")
    _policy_file(overlay)  # mounted on every Ray pod at the path the args name


_BASE_IMAGE = re.compile(r"^ARG BASE_IMAGE=rayproject/ray-llm:(\S+)-py(\d)(\d+)-(cu\d+)$", re.M)


def _base_image() -> tuple[str, str, str]:
    """(Ray version, Python "3.12", CUDA "cu130") of the Dockerfile's default base."""
    m = _BASE_IMAGE.search((K8S / "image" / "Dockerfile").read_text())
    assert m, "the default base image must be rayproject/ray-llm:<ray>-py<ver>-cu<ver>"
    return m.group(1), f"{m.group(2)}.{m.group(3)}", m.group(4)


def test_the_image_is_built_on_the_ray_llm_image_of_the_pinned_ray() -> None:
    ray_version, python, cuda = _base_image()
    assert ray_version == _ray_pin()
    tag = f"0.1.0-ray{ray_version}-py{python.replace('.', '')}"
    head = _groups(_one("overlays/gpu", "RayService"))[0][1]
    assert _ray_container(head)["image"].endswith(f":{tag}-{cuda}")
    for kustomization in ("overlays/cpu-sim", "rayjob"):
        image = _ray_container(_groups(_ray_object(kustomization))[0][1])["image"]
        assert image.endswith(f":{tag}-cpu"), image
    assert (K8S / "image" / "Dockerfile.dockerignore").is_file()


def test_mars_ray_installs_on_the_python_of_the_image() -> None:
    _, python, _ = _base_image()
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f"{python}.0" in SpecifierSet(requires), (
        f"the ray-llm image runs Python {python}, but pyproject.toml says "
        f"requires-python = {requires!r}: pip would refuse to install mars-ray in the image"
    )


# -- GCS fault tolerance ---------------------------------------------------------------

# What KubeRay's operator sets itself once gcsFaultToleranceOptions is there, and refuses
# to find set by hand (ray-operator ValidateRayClusterSpec): in rayStartParams, in the
# head container's env, and as annotations.
KUBERAY_OWNED_REDIS_PARAMS = ("redis-password", "redis-username")
KUBERAY_OWNED_REDIS_ENV = ("REDIS_PASSWORD", "RAY_REDIS_ADDRESS", "REDIS_USERNAME")
KUBERAY_FT_ANNOTATIONS = ("ray.io/ft-enabled", "ray.io/external-storage-namespace")


def _gcs_ft(overlay: str) -> dict[str, Any]:
    spec = _cluster_spec(_one(overlay, "RayService"))
    assert "gcsFaultToleranceOptions" in spec, f"{overlay}: no GCS fault tolerance"
    return spec["gcsFaultToleranceOptions"]


def _redis_container(overlay: str) -> dict[str, Any]:
    containers = _one(overlay, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container: redis"
    return containers[0]


def _redis_conf(overlay: str) -> dict[str, str]:
    """The directives of the redis.conf that the Redis command line loads."""
    statefulset = _one(overlay, "StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    command = " ".join(_redis_container(overlay)["command"])
    m = re.search(r"redis-server (\S+\.conf)\b", command)
    assert m, f"redis-server is not started with a config file: {command}"
    path = m.group(1)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in _redis_container(overlay)["volumeMounts"]:
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            name = volumes[mount["name"]]["configMap"]["name"]
            key = path[len(mount["mountPath"].rstrip("/")) + 1 :]
            configmaps = {c["metadata"]["name"]: c for c in _objects(overlay, "ConfigMap")}
            text = configmaps[name]["data"][key]
            break
    else:
        raise AssertionError(f"{path} is not mounted from a ConfigMap")
    directives = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.strip().partition(" ")
            directives[name.lower()] = value.strip()
    return directives


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gcs_fault_tolerance_points_at_the_redis_service(overlay: str) -> None:
    options = _gcs_ft(overlay)
    assert options.get("backend", "redis") == "redis"
    # KubeRay names the storage namespace after each RayCluster's UID, so the old and
    # the new cluster of a NewCluster upgrade never share GCS keys.
    assert "externalStorageNamespace" not in options
    assert "storage" not in options, "a RocksDB option: KubeRay refuses it with Redis"

    host, _, port = options["redisAddress"].rpartition(":")
    services = {s["metadata"]["name"]: s for s in _objects(overlay, "Service")}
    assert host in services, f"redisAddress {host!r} is not a Service of {overlay}"
    service = services[host]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]

    statefulset = _one(overlay, "StatefulSet")
    template = statefulset["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "the Service misses Redis"
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert statefulset["spec"]["serviceName"] == host
    assert statefulset["spec"]["replicas"] == 1, "one standalone Redis (one shard)"
    ports = {p["name"]: p["containerPort"] for p in _redis_container(overlay)["ports"]}
    target = service_port.get("targetPort", service_port["port"])
    assert (ports.get(target) if isinstance(target, str) else target) in ports.values()
    assert int(_redis_conf(overlay)["port"]) == ports.get(target, target)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_redis_password_comes_from_a_secret(overlay: str) -> None:
    password = _gcs_ft(overlay)["redisPassword"]
    assert set(password) == {"valueFrom"}, "no plaintext password in the RayService"
    assert set(password["valueFrom"]) == {"secretKeyRef"}
    ref = password["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional"), "without the password the head cannot reach Redis"

    # The Redis server takes its password from the same Secret and key.
    container = _redis_container(overlay)
    env = {e["name"]: e for e in container["env"]}
    assert "value" not in env["REDIS_PASSWORD"]
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    assert '--requirepass "$REDIS_PASSWORD"' in " ".join(container["command"])
    assert "requirepass" not in _redis_conf(overlay), "the password belongs in the Secret"

    secrets = {s["metadata"]["name"]: s for s in _objects(overlay, "Secret")}
    if overlay == "overlays/gpu":  # created by the operator of the cluster (docs/deploy.md)
        assert ref["name"] == "mars-ray-redis" and ref["name"] not in secrets
        return
    # cpu-sim generates a demo one: its value appears nowhere but in the Secret.
    assert ref["name"] in secrets, f"{ref['name']} is neither generated nor documented"
    secret = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
    others = [o for o in _render(overlay) if o["kind"] != "Secret"]
    assert secret and secret not in yaml.safe_dump(others)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gcs_fault_tolerance_passes_kuberay_admission(overlay: str) -> None:
    """What KubeRay's operator checks beyond the CRD schema when GCS FT is on."""
    service = _one(overlay, "RayService")
    annotations = service["metadata"].get("annotations", {})
    assert not set(annotations) & set(KUBERAY_FT_ANNOTATIONS), "use gcsFaultToleranceOptions"
    for role, group in _groups(service):
        params = group.get("rayStartParams", {})
        assert not set(params) & set(KUBERAY_OWNED_REDIS_PARAMS), f"{role}: {params}"
        env = {e["name"] for e in _ray_container(group).get("env", [])}
        assert not env & set(KUBERAY_OWNED_REDIS_ENV), f"{role}: KubeRay sets {env}"
        # KubeRay gives the workers a longer GCS reconnect timeout (600 s) than the head
        # (60 s), so that they outlive a head restart; a value set here would override it.
        assert "RAY_gcs_rpc_server_reconnect_timeout_s" not in env
    head = _groups(service)[0][1]
    # The Serve controller, the mars ingress and the global scheduler go to the head by
    # its `node:__internal_head__` resource and need no CPU; nothing else should land there.
    assert head["rayStartParams"].get("num-cpus") == "0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_keeps_the_gcs_state_on_a_volume(overlay: str) -> None:
    conf = _redis_conf(overlay)
    assert conf["appendonly"] == "yes" and conf.get("appendfsync", "everysec") != "no"
    assert "save" in conf, "snapshots as well as the append-only file"
    assert conf.get("maxmemory-policy", "noeviction") == "noeviction", "never evict GCS keys"

    statefulset = _one(overlay, "StatefulSet")
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    container = _redis_container(overlay)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == conf["dir"], "Redis writes to the PVC"

    resources = container["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    limit_mib = _quantity(resources["limits"]["memory"].removesuffix("Mi"))
    maxmemory = conf["maxmemory"].lower()
    assert maxmemory.endswith("mb") and float(maxmemory[:-2]) < limit_mib, (
        "maxmemory must stay below the memory limit, or Redis is OOM-killed first"
    )


def test_the_crds_reject_a_misspelled_gcs_option(
    crd_schemas: dict[tuple[str, str], dict[str, Any]],
) -> None:
    obj = copy.deepcopy(_one("overlays/gpu", "RayService"))
    options = obj["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    options["redisPasword"] = options.pop("redisPassword")
    errors = _schema_errors(obj, crd_schemas[("ray.io/v1", "RayService")])
    assert any("'redisPasword' was unexpected" in e for e in errors), errors
    options["redisPassword"] = {"valueFrom": {"secretKeyRef": {"name": "mars-ray-redis"}}}
    errors = _schema_errors(obj, crd_schemas[("ray.io/v1", "RayService")])
    assert any("'key' is a required property" in e for e in errors), errors
