"""The deploy manifests, the Dockerfile and the Grafana dashboard agree with the app they deploy.

Fast and offline: parses every YAML/JSON file under deploy/, then checks env names against
`app.settings.Settings`, probe paths against `create_app`'s route table, ports against each other, and
every metric (and label) a dashboard or ServiceMonitor uses against what the app's metrics object registers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.metrics import MetricWrapperBase

from app.main import create_app
from app.observability import PrometheusMetrics
from app.settings import Settings
from tests.deploy.manifests import DEPLOY, REPO_ROOT, load_documents, one, yaml_files

DOCKERFILE = REPO_ROOT / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "modelserve-dashboard.json"
ENV_PREFIX = "MODELSERVE_"
# Environment names the app reads that are not MODELSERVE_<field> (prometheus_client's own variable).
OTHER_APP_ENV = {"PROMETHEUS_MULTIPROC_DIR"}
HEALTH_PATHS = {"/v2/health/live", "/v2/health/ready"}


# ---------------------------------------------------------------------------------------------- loading


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The serving containers of a Deployment or ServingRuntime."""
    if doc["kind"] == "Deployment":
        return list(doc["spec"]["template"]["spec"]["containers"])
    if doc["kind"] == "ServingRuntime":
        return list(doc["spec"]["containers"])
    raise AssertionError(f"no containers in a {doc['kind']}")


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair anywhere in a parsed document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


@pytest.fixture(scope="module")
def served(model_repository: Path) -> Iterator[TestClient]:
    """The app from the factory with its lifespan run (tiny fixture models loaded)."""
    app = create_app(Settings(model_repository=model_repository, access_log=False))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def served_with_api_key(model_repository: Path) -> Iterator[TestClient]:
    """The same app with `MODELSERVE_API_KEY` set, as the manifests' optional Secret would make it."""
    settings = Settings(model_repository=model_repository, access_log=False, api_key="deploy-test-key")
    with TestClient(create_app(settings)) as client:
        yield client


def _answers(client: TestClient, path: str) -> bool:
    """The path is a route that answers GET with 200 (no API key: health and metrics are open)."""
    return client.get(path).status_code == 200


@pytest.fixture(scope="module")
def app_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Every sample name the app's metrics object can expose → (metric type, label names)."""
    metrics = PrometheusMetrics()
    samples: dict[str, tuple[str, frozenset[str]]] = {}
    for attribute in vars(metrics).values():
        if not isinstance(attribute, MetricWrapperBase):
            continue
        labels = frozenset(attribute._labelnames)
        family = next(iter(attribute.describe()))
        suffixes = {
            "histogram": ("_bucket", "_sum", "_count"),
            "counter": ("_total",),
            "gauge": ("",),
            "summary": ("_sum", "_count", ""),
        }[family.type]
        for suffix in suffixes:
            samples[family.name + suffix] = (family.type, labels | ({"le"} if suffix == "_bucket" else set()))
    assert samples, "the metrics object registers nothing"
    return samples


# ---------------------------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    out = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    """Instructions of the last stage (the default build target)."""
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def _dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in stage:
        if name == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def test_dockerfile_final_stage_is_the_hardened_runtime(served: TestClient) -> None:
    stage = _final_stage()
    names = [name for name, _ in stage]
    args = dict(stage)
    assert "python:3.12-slim" in DOCKERFILE.read_text(), "BASE_IMAGE must default to a standard slim Python"
    assert stage[0][1].startswith("${BASE_IMAGE}"), "the default target builds FROM ${BASE_IMAGE}"
    # Non-root by number, so that Kubernetes runAsNonRoot can check it.
    uid, _, _gid = args["USER"].partition(":")
    assert uid.isdigit()
    assert int(uid) != 0
    # exec form, so that the server is PID 1 and receives SIGTERM itself.
    assert json.loads(args["ENTRYPOINT"]) == ["modelserve"]
    assert json.loads(args["CMD"]) == ["serve"]
    assert args.get("STOPSIGNAL", "SIGTERM") == "SIGTERM"
    assert "HEALTHCHECK" in names
    healthcheck_cmd = json.loads(args["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert healthcheck_cmd[0] == "python3", "the healthcheck needs no curl"
    # The health check probes a route the app has.
    healthcheck_src = (REPO_ROOT / "deploy" / "container" / "healthcheck.py").read_text()
    probed = re.search(r'READY_PATH = "([^"]+)"', healthcheck_src)
    assert probed
    assert probed.group(1) == "/v2/health/ready"
    assert _answers(served, probed.group(1))
    # No torch and no compiler: the runtime stage only copies the builder's venv.
    text = "\n".join(a for _, a in stage)
    assert "torch" not in text
    assert "gcc" not in text
    assert "build-essential" not in text


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _dockerfile_instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def test_dockerfile_env_names_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    served = [stage for stage in _stages() if any(name == "ENTRYPOINT" for name, _ in stage)]
    assert len(served) == 2, "a CPU and a GPU serving stage"
    for stage in served:
        env = _dockerfile_env(stage)
        app_env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        for key in app_env:
            assert key[len(ENV_PREFIX) :].lower() in Settings.model_fields, f"Dockerfile sets unknown {key}"
        assert app_env["MODELSERVE_HOST"] == "0.0.0.0", "inside a container the server binds every interface"
        exposed = {port.split("/")[0] for name, port in stage if name == "EXPOSE"}
        assert app_env["MODELSERVE_PORT"] in exposed
        # The values validate as settings.
        _settings_from_env({k: {"value": v} for k, v in app_env.items()}, monkeypatch)


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "the context is an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for excluded in (".venv", ".git", "tests", "trainer", ".pytest_cache", "bench"):
        assert not any(a == excluded or a.startswith(excluded + "/") for a in allowed), excluded
    # What the Dockerfile copies from the context is allowed.
    for name, args in _dockerfile_instructions():
        if name == "COPY" and not args.startswith("--from"):
            for source in shlex.split(args)[:-1]:
                if not source.startswith("--"):
                    root = source.rstrip("*").rstrip("/")
                    assert any(root == a or root.startswith(a + "/") for a in allowed), source


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses_into_kubernetes_objects(path: Path) -> None:
    docs = load_documents(path)
    assert docs
    for doc in docs:
        assert doc.get("apiVersion")
        assert doc.get("kind")
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"]


def test_every_manifest_is_listed_in_the_kustomization() -> None:
    kustomization = one("Kustomization", "kubernetes")
    listed = set(kustomization["resources"])
    present = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == present


def test_expected_objects_exist() -> None:
    assert one("Deployment", "kubernetes")
    assert one("Service", "kubernetes")
    hpa = one("HorizontalPodAutoscaler", "kubernetes")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert one("PodDisruptionBudget", "kubernetes")["apiVersion"] == "policy/v1"
    assert one("ServiceMonitor", "kubernetes")["apiVersion"] == "monitoring.coreos.com/v1"
    assert one("ServingRuntime", "kserve")["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert one("InferenceService", "kserve")["apiVersion"] == "serving.kserve.io/v1beta1"


# ---------------------------------------------------------------------------------------------- agreement


def _settings_from_env(env: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the container would build them from the manifest's literal env values."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX) or key in OTHER_APP_ENV:
            monkeypatch.delenv(key)
    for name, item in env.items():
        if "value" in item:
            monkeypatch.setenv(name, str(item["value"]))
    return Settings()


@pytest.mark.parametrize(("kind", "directory"), [("Deployment", "kubernetes"), ("ServingRuntime", "kserve")])
def test_env_names_are_settings_and_values_validate(
    kind: str, directory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for container in _containers(one(kind, directory)):
        env = _env(container)
        for name in env:
            if name.startswith(ENV_PREFIX):
                assert name[len(ENV_PREFIX) :].lower() in Settings.model_fields, f"{kind}: unknown {name}"
            else:
                assert name in OTHER_APP_ENV, f"{kind}: {name} is not an app setting"
        settings = _settings_from_env(env, monkeypatch)
        assert settings.host == "0.0.0.0"
        ports = {p["containerPort"] for p in container["ports"]}
        assert ports == {settings.port}, f"{kind}: container port and MODELSERVE_PORT disagree"


def test_inference_service_env_names_are_settings() -> None:
    isvc = one("InferenceService", "kserve")
    for item in isvc["spec"]["predictor"]["model"].get("env", []):
        assert item["name"][len(ENV_PREFIX) :].lower() in Settings.model_fields


def test_deployment_matches_the_image() -> None:
    container = _containers(one("Deployment", "kubernetes"))[0]
    env = _env(container)
    image_env = _dockerfile_env(_final_stage())
    assert env["MODELSERVE_MODEL_REPOSITORY"]["value"] == image_env["MODELSERVE_MODEL_REPOSITORY"]
    assert str(env["MODELSERVE_PORT"]["value"]) == image_env["MODELSERVE_PORT"]
    api_key = env["MODELSERVE_API_KEY"]
    assert "value" not in api_key, "the API key comes from a Secret, never a literal"
    assert api_key["valueFrom"]["secretKeyRef"]["name"]


def _probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in container.items() if k.endswith("Probe")}


@pytest.mark.parametrize(("kind", "directory"), [("Deployment", "kubernetes"), ("ServingRuntime", "kserve")])
def test_probes_hit_health_routes_on_the_serving_port(kind: str, directory: str, served: TestClient) -> None:
    container = _containers(one(kind, directory))[0]
    probes = _probes(container)
    assert probes["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    port_names = {p.get("name"): p["containerPort"] for p in container["ports"]}
    for name, probe in probes.items():
        path = probe["httpGet"]["path"]
        assert _answers(served, path), f"{kind} {name}: {path} does not answer 200"
        assert path in HEALTH_PATHS, "probes use the unauthenticated health endpoints"
        port = probe["httpGet"]["port"]
        assert port in port_names or port in port_names.values(), f"{kind} {name}: unknown port {port}"


def test_metrics_path_serves_every_registered_metric(
    served: TestClient, app_metrics: dict[str, tuple[str, frozenset[str]]]
) -> None:
    monitor = one("ServiceMonitor", "kubernetes")
    runtime = one("ServingRuntime", "kserve")
    paths = [e["path"] for e in monitor["spec"]["endpoints"]]
    paths.append(runtime["metadata"]["annotations"]["prometheus.kserve.io/path"])
    for path in paths:
        response = served.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/plain")
        # What the scrape returns is what the metrics object registers.
        for sample in app_metrics:
            family = re.sub(r"_(bucket|sum|count|total)$", "", sample)
            assert f"# TYPE {family}" in response.text, f"{path} lacks {family}"


@pytest.mark.parametrize(("kind", "directory"), [("Deployment", "kubernetes"), ("ServingRuntime", "kserve")])
def test_hardened_security_context(kind: str, directory: str) -> None:
    doc = one(kind, directory)
    image_uid = int(dict(_final_stage())["USER"].split(":")[0])
    pod = doc["spec"]["template"]["spec"] if kind == "Deployment" else doc["spec"]
    pod_security = pod.get("securityContext", {})
    for container in _containers(doc):
        security = {**pod_security, **container["securityContext"]}
        assert security["runAsNonRoot"] is True
        assert security.get("runAsUser", image_uid) == image_uid
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        # The one writable path is an emptyDir on /tmp.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert container["resources"]["requests"]
        assert container["resources"]["limits"]


def test_service_hpa_pdb_and_monitor_select_the_deployment() -> None:
    deployment = one("Deployment", "kubernetes")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = _containers(deployment)[0]
    port_names = {p["name"] for p in container["ports"]}

    service = one("Service", "kubernetes")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names

    hpa = one("HorizontalPodAutoscaler", "kubernetes")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # Utilization targets need requests to compute against.
    assert container["resources"]["requests"]["cpu"]

    pdb = one("PodDisruptionBudget", "kubernetes")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain must be able to evict a pod"

    monitor = one("ServiceMonitor", "kubernetes")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_port_names


def test_kserve_runtime_speaks_v2_for_onnx() -> None:
    runtime = one("ServingRuntime", "kserve")
    isvc = one("InferenceService", "kserve")
    assert "v2" in runtime["spec"]["protocolVersions"]
    assert "onnx" in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] == "onnx"
    assert model["protocolVersion"] == "v2"
    env = _env(_containers(runtime)[0])
    assert env["MODELSERVE_MODEL_REPOSITORY"]["value"] == "/mnt/models", "KServe downloads models there"


# ---------------------------------------------------------------------------------------------- metrics

_METRIC = re.compile(r"\b(modelserve_[a-z0-9_]+)\b")
_SELECTOR = re.compile(r"\b(modelserve_[a-z0-9_]+)\{([^}]*)\}")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
# Labels Prometheus adds to every scraped series.
_TARGET_LABELS = {"instance", "job", "pod", "namespace", "service", "container", "endpoint"}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [value for key, value in _walk(dashboard["panels"]) if key == "expr"]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
        elif variable.get("type") == "query":
            exprs.append(query)
    return exprs


def test_dashboard_covers_the_design_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"]
    assert dashboard["panels"]
    text = "\n".join(_dashboard_exprs())
    assert "histogram_quantile" in text, "latency percentiles come from the histograms"
    for metric in (
        "modelserve_request_duration_seconds_bucket",
        "modelserve_queue_duration_seconds_bucket",
        "modelserve_inference_duration_seconds_bucket",
        "modelserve_batch_rows_bucket",
        "modelserve_request_failures_total",
        "modelserve_evaluation_score",
        "modelserve_drift_psi",
        "modelserve_prediction_psi",
        "modelserve_live_score",
        "modelserve_card_test_score",
        "modelserve_feedback_total",
        "modelserve_feedback_regression_sum",
    ):
        assert metric in text, f"no panel shows {metric}"


def test_dashboard_metrics_and_labels_exist_in_the_app(
    app_metrics: dict[str, tuple[str, frozenset[str]]],
) -> None:
    exprs = _dashboard_exprs()
    assert exprs
    for expr in exprs:
        used = set(_METRIC.findall(expr))
        assert used, f"expression uses no modelserve metric: {expr}"
        unknown = used - app_metrics.keys()
        assert not unknown, f"{sorted(unknown)} are not exposed by the app (in {expr})"
        known_labels = set().union(*(app_metrics[m][1] for m in used)) | _TARGET_LABELS
        for metric, selector in _SELECTOR.findall(expr):
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", selector):
                assert label in app_metrics[metric][1], f"{metric} has no label {label!r} ({expr})"
        for group in _BY.findall(expr):
            for label in (g.strip() for g in group.split(",") if g.strip()):
                assert label in known_labels, f"label {label!r} is on none of {sorted(used)} ({expr})"


def test_service_monitor_keeps_every_app_metric(app_metrics: dict[str, tuple[str, frozenset[str]]]) -> None:
    monitor = one("ServiceMonitor", "kubernetes")
    for endpoint in monitor["spec"]["endpoints"]:
        for relabel in endpoint.get("metricRelabelings", []):
            if relabel.get("action") == "keep" and relabel.get("sourceLabels") == ["__name__"]:
                pattern = re.compile(relabel["regex"])
                for sample in app_metrics:
                    assert pattern.fullmatch(sample), f"the ServiceMonitor drops {sample}"
    names = {m for _, value in _walk(monitor) if isinstance(value, str) for m in _METRIC.findall(value)}
    assert names <= app_metrics.keys()


def test_probes_and_scrapes_need_no_api_key(served_with_api_key: TestClient) -> None:
    """Kubelet probes and Prometheus scrapes send no Authorization header, even when the Secret is set."""
    paths = {"/metrics"}
    for kind, directory in (("Deployment", "kubernetes"), ("ServingRuntime", "kserve")):
        for container in _containers(one(kind, directory)):
            paths |= {probe["httpGet"]["path"] for probe in _probes(container).values()}
    for path in sorted(paths):
        assert _answers(served_with_api_key, path), f"{path} asks for the API key"
    # ...while the API itself does.
    assert served_with_api_key.get("/models").status_code == 401
