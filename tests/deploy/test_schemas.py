"""The deploy manifests are objects that the API servers receiving them accept.

Kubernetes' own kinds (Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget) are validated by
`kubernetes-validate` against the OpenAPI schemas of Kubernetes 1.37 in their strict form: a field that the
API does not define is an error (as with `kubectl apply --validate=strict`), and so is a value of the wrong
type.

Custom resources are validated against the trimmed CRD schemas in tests/deploy/schemas/ (sources and versions
in its README): ServiceMonitor (prometheus-operator v0.84.1), ServingRuntime and InferenceService (KServe
v0.21.0). They name every field on the paths the manifests use, with types, enums and patterns, and resolve
the embedded Kubernetes types (containers, probes, volumes, selectors, object metadata) strictly against the
same Kubernetes 1.37 schemas. Not checked: the operators' nested objects that the manifests do not use
(authorization and TLS settings, KServe's batcher, logger and other model frameworks), which need only be
objects, and rules that only the operators' admission webhooks enforce (a scrapeTimeout not above its
interval, one model framework per predictor).

`kubectl apply -k deploy/kubernetes` sends what kustomize renders: where `kubectl` is installed, its kustomize
render is validated (kustomize also refuses unknown fields in kustomization.yaml); elsewhere, the documents of
the files kustomization.yaml lists.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from referencing import Registry, Resource

from tests.deploy.manifests import DEPLOY, documents, load_documents, one, parse_documents

# Kubernetes minor version whose API schemas the manifests must satisfy (kubernetes-validate ships it).
KUBERNETES_VERSION = "1.37"
KUBERNETES_DEFINITIONS_URI = "https://kubernetes.io/api/_definitions.json"
KUSTOMIZE_DIR = DEPLOY / "kubernetes"
SCHEMAS = Path(__file__).parent / "schemas"
CUSTOM_RESOURCE_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime-serving-v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving-v1beta1.json",
}


# ---------------------------------------------------------------------------------------------- validation


@cache
def _kubernetes_registry() -> Registry:
    """Kubernetes' strict type definitions of the pinned version, for the `$ref`s of the CRD schemas."""
    schema_dir = (
        files("kubernetes_validate") / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}.0-local-strict"
    )
    definitions = json.loads((schema_dir / "_definitions.json").read_text())
    assert definitions["$id"] == KUBERNETES_DEFINITIONS_URI
    return Registry().with_resource(KUBERNETES_DEFINITIONS_URI, Resource.from_contents(definitions))


@cache
def _custom_resource_validator(schema_file: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / schema_file).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=_kubernetes_registry())


def _describe(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(part) for part in error.absolute_path) or "(top level)"
    return f"{path}: {error.message}"


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    """Every way the document breaks its kind's schema, as `path: message` lines; empty when it is valid."""
    schema_file = CUSTOM_RESOURCE_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema_file is not None:
        return [_describe(e) for e in _custom_resource_validator(schema_file).iter_errors(doc)]
    try:
        checked_against = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as missing:
        raise AssertionError(f"no schema for {doc['kind']} {doc['apiVersion']}: {missing.message}") from None
    except kubernetes_validate.ValidationError as error:
        return [_describe(error)]
    # kubernetes-validate falls back to an older version it ships without saying so: insist on the pinned one.
    assert checked_against == KUBERNETES_VERSION
    return []


def _api_objects() -> list[Any]:
    """Every document under deploy/ that is sent to an API server (the Kustomization is kustomize's input)."""
    return [
        pytest.param(doc, id=f"{path.relative_to(DEPLOY)}:{doc['kind']}")
        for path, doc in documents()
        if doc["kind"] != "Kustomization"
    ]


@pytest.mark.parametrize("doc", _api_objects())
def test_manifest_matches_its_api_schema(doc: dict[str, Any]) -> None:
    assert _schema_errors(doc) == []


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


@pytest.mark.parametrize("schema_file", sorted(CUSTOM_RESOURCE_SCHEMAS.values()))
def test_crd_schema_references_resolve(schema_file: str) -> None:
    """A `$ref` is followed only when a manifest uses its field: each must name a real Kubernetes type."""
    refs = _refs(json.loads((SCHEMAS / schema_file).read_text()))
    assert refs
    resolver = _kubernetes_registry().resolver()
    for ref in refs:
        assert ref.startswith(KUBERNETES_DEFINITIONS_URI + "#/$defs/"), ref
        assert resolver.lookup(ref).contents, ref


# ---------------------------------------------------------------------------------------------- refusals

# (kind, path to an object in the manifest, key set there, value): a misspelt field or a wrong value.
BROKEN_COPIES = [
    pytest.param(
        "Deployment",
        ("spec", "template", "spec", "containers", 0),
        "imagePullPolcy",
        "Always",
        id="deployment-field",
    ),
    pytest.param("Deployment", ("spec",), "replicas", "two", id="deployment-type"),
    pytest.param("Service", ("spec", "ports", 0), "port", "eighty", id="service-type"),
    pytest.param("HorizontalPodAutoscaler", ("spec",), "minReplica", 2, id="hpa-field"),
    pytest.param("PodDisruptionBudget", ("spec",), "minAvailable", [1], id="pdb-type"),
    pytest.param("ServiceMonitor", ("spec", "endpoints", 0), "intervall", "15s", id="servicemonitor-field"),
    pytest.param(
        "ServiceMonitor", ("spec", "endpoints", 0), "interval", "15 seconds", id="servicemonitor-pattern"
    ),
    pytest.param(
        "ServiceMonitor",
        ("spec", "endpoints", 0, "metricRelabelings", 0),
        "action",
        "retain",
        id="servicemonitor-enum",
    ),
    pytest.param("ServingRuntime", ("spec",), "protocolVersion", "v2", id="servingruntime-field"),
    pytest.param(
        "ServingRuntime",
        ("spec", "containers", 0, "readinessProbe", "httpGet"),
        "paht",
        "/v2/health/ready",
        id="servingruntime-container-field",
    ),
    pytest.param(
        "ServingRuntime",
        ("spec", "containers", 0),
        "ports",
        {"containerPort": 8080},
        id="servingruntime-type",
    ),
    pytest.param(
        "InferenceService", ("spec", "predictor", "model"), "storageURI", "s3://b/m", id="isvc-field"
    ),
    pytest.param("InferenceService", ("spec", "predictor"), "minReplicas", "one", id="isvc-type"),
    pytest.param("InferenceService", ("metadata",), "label", {"a": "b"}, id="isvc-metadata-field"),
]


@pytest.mark.parametrize(("kind", "path", "key", "value"), BROKEN_COPIES)
def test_a_broken_copy_is_refused(kind: str, path: tuple[str | int, ...], key: str, value: Any) -> None:
    original = one(kind)
    assert _schema_errors(original) == [], "the manifest itself must be valid for this test to mean anything"
    broken = copy.deepcopy(original)
    target = broken
    for part in path:
        target = target[part]
    target[key] = value
    errors = _schema_errors(broken)
    assert errors, f"{kind}: {key}={value!r} at {'.'.join(map(str, path))} was accepted"
    assert any(key in error for error in errors), errors


# ---------------------------------------------------------------------------------------------- kustomize


def _listed_documents() -> list[dict[str, Any]]:
    kustomization = one("Kustomization", "kubernetes")
    return [doc for name in kustomization["resources"] for doc in load_documents(KUSTOMIZE_DIR / name)]


def _kustomize_render() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes` sends: kubectl's kustomize render, or the listed files."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return _listed_documents()
    rendered = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZE_DIR)], capture_output=True, text=True, timeout=120, check=False
    )
    assert rendered.returncode == 0, rendered.stderr
    return parse_documents(rendered.stdout)


def test_kustomization_renders_every_listed_resource_valid() -> None:
    rendered = _kustomize_render()

    def names(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return sorted((doc["kind"], doc["metadata"]["name"]) for doc in docs)

    assert names(rendered) == names(_listed_documents())
    for doc in rendered:
        assert _schema_errors(doc) == [], f"{doc['kind']} {doc['metadata']['name']}"
