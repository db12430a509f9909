"""deploy/k8s: the core resources against the Kubernetes schemas (kubernetes-validate, strict: an
unknown field is an error), and the custom resources (RabbitMQ operator, KEDA) against what
docs/operating.md promises."""

from __future__ import annotations

import copy
import importlib.util
import ipaddress
import re
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml

from palisade_events.contract import METRICS_PORTS
from tests.deploy.promql import ROOT, VM_FACING, WORKERS

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are for
CORE_API_VERSIONS = {"v1", "apps/v1", "policy/v1", "networking.k8s.io/v1"}
CUSTOM = {
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
}


@cache
def builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_manifests", K8S / "build_manifests.py")
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    return sorted(p for p in [*K8S.glob("*.yaml"), *K8S.glob("workers/*.yaml")] if p.name != "kustomization.yaml")


@cache
def applied() -> list[dict[str, Any]]:
    """Everything `kubectl apply -k deploy/k8s` creates (parsed once: tests copy before changing)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [d for resource in kustomization["resources"] for d in documents(K8S / resource)]


def of_kind(kind: str, docs: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in (applied() if docs is None else docs) if d["kind"] == kind}


@cache
def secrets() -> dict[str, dict[str, Any]]:
    return of_kind("Secret", documents(K8S / "secrets.example.yaml"))


@cache
def scaling_table() -> dict[str, tuple[str, int, int, int]]:
    """docs/operating.md's "Scaling each worker" table: worker -> (queue, min, max, messages per replica)."""
    text = (ROOT / "docs" / "operating.md").read_text()
    section = text.split("## Scaling each worker", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z-]+)` \| `([a-z.-]+)` \| (\d+) \| (\d+) \| (\d+) \|", section, re.M)
    return {w: (q, int(lo), int(hi), int(per)) for w, q, lo, hi, per in rows}


def container(deployment: dict[str, Any]) -> Any:
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    return c


# ------------------------------------------------------------------ files


def test_the_committed_worker_manifests_are_what_the_builder_writes() -> None:
    b = builder()
    assert [w.name for w in b.WORKERS] == list(WORKERS)
    for w in b.WORKERS:
        path = K8S / "workers" / f"{w.name}.yaml"
        assert path.read_text() == b.render(w), "run: python deploy/k8s/build_manifests.py"


def test_the_kustomization_applies_every_manifest_but_the_secrets_template() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = {K8S / r for r in kustomization["resources"]}
    assert listed == {p for p in manifest_files() if p.name != "secrets.example.yaml"}
    assert kustomization["namespace"] == "palisade"
    assert [i["name"] for i in kustomization["images"]] == ["palisade"]
    for d in applied():
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "palisade", d["metadata"]["name"]


# ------------------------------------------------------------------ Kubernetes schemas


def core_resources() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in manifest_files():
        for d in documents(path):
            if (d["apiVersion"], d["kind"]) in CUSTOM:
                continue
            assert d["apiVersion"] in CORE_API_VERSIONS, f"{path.name}: unexpected {d['apiVersion']} {d['kind']}"
            out.append((f"{path.relative_to(K8S)}:{d['kind']}/{d['metadata']['name']}", d))
    return out


@pytest.mark.parametrize(("where", "resource"), core_resources(), ids=lambda v: v if isinstance(v, str) else "")
def test_core_resource_is_valid_kubernetes(where: str, resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_catches_a_misspelt_field_and_a_wrong_type() -> None:
    deployment = of_kind("Deployment")["palisade-lifecycle"]
    misspelt = copy.deepcopy(deployment)
    c = container(misspelt)
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)


# ------------------------------------------------------------------ workers


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_deployment_probes_resources_and_settings(worker: str) -> None:
    deployment = of_kind("Deployment")[f"palisade-{worker}"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    c = container(deployment)
    assert c["args"] == ["run", worker]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == METRICS_PORTS[worker]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    # liveness gives the runtime's own reconnection time before a restart
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 120
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORTS[worker])
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert "memory" in c["resources"]["limits"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["terminationGracePeriodSeconds"] > 20  # the runtime's shutdown grace

    env = {e["name"]: e for e in c["env"]}
    secret_refs = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e}
    assert {"PALISADE_AMQP_URL", "PALISADE_DATABASE_URL"} <= set(secret_refs)
    if worker == "mfa":
        assert secret_refs["PALISADE_MFA_KEY"]["name"] == "palisade-mfa-key"
        assert "optional" not in secret_refs["PALISADE_MFA_KEY"]  # the worker refuses to start without it
    if worker == "tls":
        assert secret_refs["PALISADE_TLS_KEY"]["name"] == "palisade-tls-key"
    assert not {n for n in env if n.endswith(("_KEY", "_PASSWORD", "_URL")) and n not in secret_refs}, (
        "secrets only from Secrets"
    )
    # every Secret and ConfigMap referenced exists (Secrets: in the template)
    for ref in secret_refs.values():
        assert ref["key"] in secrets()[ref["name"]]["stringData"], ref
    config_maps = of_kind("ConfigMap")
    for source in c["envFrom"]:
        assert source["configMapRef"]["name"] in config_maps
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    if worker in VM_FACING:
        key = volumes["automation-key"]["secret"]
        assert key["secretName"] == "palisade-automation-key"
        assert key["defaultMode"] == 0o400
        assert key["items"][0]["key"] in secrets()["palisade-automation-key"]["stringData"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert f"{mounts['automation-key']}/{key['items'][0]['path']}" == "/etc/palisade/automation_ed25519"
    else:
        assert "automation-key" not in volumes


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_has_a_disruption_budget_over_its_pods(worker: str) -> None:
    deployment = of_kind("Deployment")[f"palisade-{worker}"]
    pdb = of_kind("PodDisruptionBudget")[f"palisade-{worker}"]
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_scales_on_its_queue_within_the_bounds_the_docs_promise(worker: str) -> None:
    scaled = of_kind("ScaledObject")[f"palisade-{worker}"]
    queue, low, high, per_replica = scaling_table()[worker]
    spec = scaled["spec"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"palisade-{worker}"}
    assert f"palisade-{worker}" in of_kind("Deployment")
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (low, high)
    assert 2 <= low <= high  # with the PDB's maxUnavailable 1, a drain never stops the worker
    assert of_kind("Deployment")[f"palisade-{worker}"]["spec"]["replicas"] == low
    [rabbitmq] = [t for t in spec["triggers"] if t["type"] == "rabbitmq"]
    assert queue == f"palisade.{worker}"
    assert rabbitmq["metadata"] == {
        "protocol": "amqp",
        "queueName": queue,
        "mode": "QueueLength",
        "value": str(per_replica),
    }
    assert rabbitmq["authenticationRef"]["name"] in of_kind("TriggerAuthentication")


def test_the_docs_table_has_every_worker() -> None:
    assert list(scaling_table()) == list(WORKERS)


def test_keda_reads_the_queues_with_the_workers_amqp_url() -> None:
    [auth] = of_kind("TriggerAuthentication").values()
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "host", "name": "palisade-connections", "key": "amqp-url"}]
    assert "amqp-url" in secrets()["palisade-connections"]["stringData"]


# ------------------------------------------------------------------ RabbitMQ


def test_rabbitmq_is_a_three_node_operator_cluster_that_may_lose_one_node() -> None:
    [cluster] = of_kind("RabbitmqCluster").values()
    assert cluster["apiVersion"] == "rabbitmq.com/v1beta1"
    assert cluster["spec"]["replicas"] == 3
    assert "pause_minority" in cluster["spec"]["rabbitmq"]["additionalConfig"]
    anti = cluster["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    name = cluster["metadata"]["name"]
    assert anti[0]["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": name}
    pdb = of_kind("PodDisruptionBudget")[name]
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": name}}}
    host = re.search(r"@([^:/]+)", secrets()["palisade-connections"]["stringData"]["amqp-url"])
    assert host
    assert host.group(1).startswith(f"{name}.")


# ------------------------------------------------------------------ the SMTP relay


def test_the_relay_is_on_port_25_for_the_private_network_only() -> None:
    relay = of_kind("Deployment")["palisade-smtp-relay"]
    c = container(relay)
    smtp_port = {p["name"]: p["containerPort"] for p in c["ports"]}["smtp"]
    config = of_kind("ConfigMap")["palisade-smtp-relay-config"]["data"]
    assert config["PALISADE_SMTP_LISTEN"] == f"0.0.0.0:{smtp_port}"
    private = ipaddress.ip_network(config["PALISADE_PRIVATE_NETWORK"])
    assert private.is_private

    service = of_kind("Service")["palisade-smtp-relay"]
    assert service["spec"]["selector"] == relay["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"name": "smtp", "port": 25, "targetPort": "smtp", "protocol": "TCP"}]
    assert service["spec"]["externalTrafficPolicy"] == "Local"  # the relay needs the VMs' own addresses
    assert service["spec"]["loadBalancerSourceRanges"] == [str(private)]

    policy = of_kind("NetworkPolicy")["palisade-smtp-relay"]
    assert policy["spec"]["podSelector"]["matchLabels"] == relay["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    smtp_rules = [r for r in policy["spec"]["ingress"] if {"protocol": "TCP", "port": smtp_port} in r["ports"]]
    assert smtp_rules == [{"from": [{"ipBlock": {"cidr": str(private)}}], "ports": [{"protocol": "TCP", "port": 2525}]}]
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "no rule may admit every source"
        assert rule.get("ports"), "no rule may open every port"
    # and metrics stay reachable for Prometheus
    assert any(
        {"protocol": "TCP", "port": METRICS_PORTS["smtp-relay"]} in r["ports"] for r in policy["spec"]["ingress"]
    )
