"""Writes the per-worker manifests of deploy/k8s/ (workers/<worker>.yaml) from one table.

    python deploy/k8s/build_manifests.py      # after changing WORKERS below

Each worker gets a Deployment (readiness and liveness on /healthz, resources, settings from
ConfigMaps, keys from Secrets, non-root, read-only root file system), a PodDisruptionBudget and a
KEDA ScaledObject scaling it on the length of its queue `palisade.<worker>`; the SMTP relay also a
Service on port 25 and a NetworkPolicy that lets only the private network reach it. The shared
resources (namespace, RabbitMQ cluster, settings, KEDA authentication) are written by hand beside
this script. tests/deploy/test_k8s.py checks that the committed files are what this writes,
validates them against the Kubernetes schemas, and checks the scaling table of docs/operating.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
NAMESPACE = "palisade"
IMAGE = "palisade:0.1.0"  # kustomization.yaml's `images:` sets the registry and tag
RUN_AS = 10001
PRIVATE_NETWORK = "10.0.0.0/8"  # the VMs' private network: keep in step with PALISADE_PRIVATE_NETWORK
MONITORING_NAMESPACE = "monitoring"
AUTOMATION_KEY_SECRET = "palisade-automation-key"
CONNECTIONS_SECRET = "palisade-connections"


@dataclass(frozen=True)
class Worker:
    name: str
    port: int
    min_replicas: int
    max_replicas: int
    queue_length: int  # ready messages per replica KEDA aims at
    cpu: str = "100m"
    memory: str = "256Mi"
    memory_limit: str = "512Mi"
    vm_facing: bool = False  # SSHes to VMs: needs the automation key
    config: dict[str, str] = field(default_factory=dict)  # its own ConfigMap
    secrets: tuple[tuple[str, str, str, bool], ...] = ()  # (env, secret, key, optional)
    why: str = ""


WORKERS: tuple[Worker, ...] = (
    Worker("lifecycle", 9401, 2, 6, 100, why="light database work per message"),
    Worker(
        "smtp-relay",
        9402,
        2,
        10,
        100,
        cpu="250m",
        config={
            "PALISADE_SMTP_LISTEN": "0.0.0.0:2525",
            "PALISADE_PRIVATE_NETWORK": PRIVATE_NETWORK,
            "PALISADE_SENDER_DOMAIN": "vm.example.app",
            "PALISADE_SMARTHOST": "smtp.example.net:587",
            "PALISADE_SMARTHOST_STARTTLS": "true",
        },
        secrets=(
            ("PALISADE_SMARTHOST_USERNAME", "palisade-smarthost", "username", True),
            ("PALISADE_SMARTHOST_PASSWORD", "palisade-smarthost", "password", True),
        ),
        why="its load is SMTP sessions, not its queue: also scaled on CPU",
    ),
    Worker(
        "mfa",
        9403,
        2,
        10,
        50,
        config={"PALISADE_MFA_MAIL_FROM": "Palisade <no-reply@example.app>", "PALISADE_MFA_ISSUER": "Palisade"},
        secrets=(
            ("PALISADE_MFA_KEY", "palisade-mfa-key", "current", False),
            ("PALISADE_MFA_OLD_KEYS", "palisade-mfa-key", "old", True),
            ("PALISADE_PLATFORM_SMTP", "palisade-platform-smtp", "url", False),
        ),
        why="logins wait on it: a short queue per replica",
    ),
    Worker("sshkeys", 9404, 2, 6, 50, vm_facing=True, why="SSH to VMs; hostctl bounds sessions per host per replica"),
    Worker(
        "firewall",
        9405,
        2,
        6,
        50,
        vm_facing=True,
        config={"PALISADE_FIREWALL_AUTOMATION_SOURCES": PRIVATE_NETWORK},
        why="SSH to VMs; hostctl bounds sessions per host per replica",
    ),
    Worker(
        "tls",
        9406,
        2,
        4,
        20,
        memory="384Mi",
        memory_limit="768Mi",
        vm_facing=True,
        config={
            "PALISADE_ACME_DIRECTORY": "https://acme-v02.api.letsencrypt.org/directory",
            "PALISADE_TLS_ACME_CONTACT_EMAIL": "ops@example.app",
            "PALISADE_TLS_PLATFORM_DOMAINS": '["vm.example.app"]',
        },
        secrets=(
            ("PALISADE_TLS_KEY", "palisade-tls-key", "current", False),
            ("PALISADE_TLS_OLD_KEYS", "palisade-tls-key", "old", True),
        ),
        why="ACME orders are slow and rate-limited by the CA: few replicas",
    ),
    Worker("ratelimit", 9407, 2, 6, 50, vm_facing=True, why="SSH to VMs; hostctl bounds sessions per host per replica"),
)


def labels(worker: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "palisade", "app.kubernetes.io/component": worker}


def meta(name: str, worker: str) -> dict[str, Any]:
    return {"name": name, "namespace": NAMESPACE, "labels": {**labels(worker), "app.kubernetes.io/part-of": "palisade"}}


def probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "metrics"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def deployment(w: Worker) -> dict[str, Any]:
    name = f"palisade-{w.name}"
    env: list[dict[str, Any]] = [
        {"name": "PALISADE_AMQP_URL", "valueFrom": {"secretKeyRef": {"name": CONNECTIONS_SECRET, "key": "amqp-url"}}},
        {
            "name": "PALISADE_DATABASE_URL",
            "valueFrom": {"secretKeyRef": {"name": CONNECTIONS_SECRET, "key": "database-url"}},
        },
    ]
    for var, secret, key, optional in w.secrets:
        ref: dict[str, Any] = {"name": secret, "key": key}
        if optional:
            ref["optional"] = True
        env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    env_from: list[dict[str, Any]] = [{"configMapRef": {"name": "palisade-config"}}]
    if w.config:
        env_from.append({"configMapRef": {"name": f"{name}-config"}})
    ports: list[dict[str, Any]] = [{"name": "metrics", "containerPort": w.port, "protocol": "TCP"}]
    if w.name == "smtp-relay":
        ports.append({"name": "smtp", "containerPort": 2525, "protocol": "TCP"})
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    if w.vm_facing:
        # hostctl's default PALISADE_HOSTCTL_KEY_FILE is /etc/palisade/automation_ed25519
        mounts.append({"name": "automation-key", "mountPath": "/etc/palisade", "readOnly": True})
        volumes.append(
            {
                "name": "automation-key",
                "secret": {
                    "secretName": AUTOMATION_KEY_SECRET,
                    "defaultMode": 0o400,
                    "items": [{"key": "automation_ed25519", "path": "automation_ed25519"}],
                },
            }
        )
    container: dict[str, Any] = {
        "name": w.name,
        "image": IMAGE,
        "args": ["run", w.name],
        "ports": ports,
        "env": env,
        "envFrom": env_from,
        # Ready: connected to RabbitMQ and PostgreSQL (503 otherwise), so no traffic and no PDB credit before.
        "readinessProbe": probe("/healthz", 5, 2),
        # The runtime reconnects by itself; a replica that has not been ready for 2 minutes is restarted.
        "livenessProbe": probe("/healthz", 20, 6),
        "startupProbe": probe("/healthz", 5, 24),
        "resources": {
            "requests": {"cpu": w.cpu, "memory": w.memory},
            "limits": {"memory": w.memory_limit},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(name, w.name),
        "spec": {
            "replicas": w.min_replicas,  # KEDA owns the count once its ScaledObject is in place
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": labels(w.name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels(w.name),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(w.port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    # the runtime's shutdown grace is 20 s: finish in-flight messages, flush the outbox
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS,
                        "runAsGroup": RUN_AS,
                        "fsGroup": RUN_AS,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": key,
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": labels(w.name)},
                        }
                        for key in ("topology.kubernetes.io/zone", "kubernetes.io/hostname")
                    ],
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def pdb(w: Worker) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(f"palisade-{w.name}", w.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(w.name)}},
    }


def scaled_object(w: Worker) -> dict[str, Any]:
    triggers: list[dict[str, Any]] = [
        {
            "type": "rabbitmq",
            "metadata": {
                "protocol": "amqp",
                "queueName": f"palisade.{w.name}",
                "mode": "QueueLength",
                "value": str(w.queue_length),
            },
            "authenticationRef": {"name": "palisade-rabbitmq"},
        }
    ]
    if w.name == "smtp-relay":
        triggers.append({"type": "cpu", "metricType": "Utilization", "metadata": {"value": "70"}})
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": meta(f"palisade-{w.name}", w.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"palisade-{w.name}"},
            "minReplicaCount": w.min_replicas,
            "maxReplicaCount": w.max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
                }
            },
            "triggers": triggers,
        },
    }


def config_map(w: Worker) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(f"palisade-{w.name}-config", w.name),
        "data": dict(w.config),
    }


def relay_service(w: Worker) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        # Make it an internal load balancer with your provider's annotation (a kustomize patch), e.g.
        # networking.gke.io/load-balancer-type: Internal,
        # or service.beta.kubernetes.io/aws-load-balancer-scheme: internal
        "metadata": meta("palisade-smtp-relay", w.name),
        "spec": {
            "type": "LoadBalancer",
            # The relay knows a service by the private address it connects from: keep client addresses.
            "externalTrafficPolicy": "Local",
            "loadBalancerSourceRanges": [PRIVATE_NETWORK],
            "selector": labels(w.name),
            "ports": [{"name": "smtp", "port": 25, "targetPort": "smtp", "protocol": "TCP"}],
        },
    }


def relay_network_policy(w: Worker) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta("palisade-smtp-relay", w.name),
        "spec": {
            "podSelector": {"matchLabels": labels(w.name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                # SMTP from the VMs' private network only
                {"from": [{"ipBlock": {"cidr": PRIVATE_NETWORK}}], "ports": [{"protocol": "TCP", "port": 2525}]},
                # /metrics and /healthz for Prometheus
                {
                    "from": [
                        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}}}
                    ],
                    "ports": [{"protocol": "TCP", "port": w.port}],
                },
            ],
        },
    }


def documents(w: Worker) -> list[dict[str, Any]]:
    docs = [deployment(w), pdb(w), scaled_object(w)]
    if w.config:
        docs.append(config_map(w))
    if w.name == "smtp-relay":
        docs += [relay_service(w), relay_network_policy(w)]
    return docs


def render(w: Worker) -> str:
    header = (
        f"# palisade {w.name}: generated by deploy/k8s/build_manifests.py, do not edit.\n"
        f"# Scales {w.min_replicas}-{w.max_replicas} replicas on palisade.{w.name}"
        f" ({w.queue_length} ready messages per replica): {w.why}.\n"
    )
    return header + "---\n".join(yaml.safe_dump(d, sort_keys=False, width=120) for d in documents(w))


def write() -> list[Path]:
    out = HERE / "workers"
    out.mkdir(exist_ok=True)
    written = []
    for w in WORKERS:
        path = out / f"{w.name}.yaml"
        path.write_text(render(w))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write():
        print(f"wrote {p}")
