"""The metrics Palisade exports, read from the code, and a small PromQL reader, so the alert rules
and the dashboard can be checked against what the workers really serve."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from palisade_events.contract import METRICS_PORTS

ROOT = Path(__file__).resolve().parents[2]
WORKERS = tuple(METRICS_PORTS)

# Where each worker's own metrics live (and the runtime's, and hostctl's, shared by several).
RUNTIME_MODULE = "palisade_events.observability"
HOSTCTL_MODULE = "palisade_hostctl.metrics"
WORKER_MODULES = {
    "lifecycle": "palisade_lifecycle.metrics",
    "smtp-relay": "palisade_smtp_relay.metrics",
    "mfa": "palisade_mfa.metrics",
    "sshkeys": "palisade_sshkeys.metrics",
    "firewall": "palisade_firewall.metrics",
    "tls": "palisade_tls.metrics",
    "ratelimit": "palisade_ratelimit.metrics",
}
VM_FACING = ("sshkeys", "firewall", "tls", "ratelimit")


@dataclass(frozen=True)
class Metric:
    name: str  # as defined (a counter without its _total)
    kind: str  # counter, gauge, histogram, ...
    labels: frozenset[str]

    def series_names(self) -> dict[str, frozenset[str]]:
        """Names of the exposed series and their labels."""
        if self.kind == "counter":
            return {f"{self.name}_total": self.labels}
        if self.kind == "histogram":
            return {
                f"{self.name}_bucket": self.labels | {"le"},
                f"{self.name}_sum": self.labels,
                f"{self.name}_count": self.labels,
            }
        return {self.name: self.labels}


# Metrics of workers whose metrics module is not committed yet: the names of their issue (issue 8:
# the first three) and of the module being written. Once the module exists, the code is the truth
# and this list is not read.
FROM_ISSUES: dict[str, list[Metric]] = {
    "palisade_tls.metrics": [
        Metric("palisade_tls_certificate_expiry_timestamp_seconds", "gauge", frozenset({"service_id"})),
        Metric("palisade_tls_issuances", "counter", frozenset({"outcome"})),
        Metric("palisade_tls_domains", "gauge", frozenset({"state"})),
        Metric("palisade_tls_issuance_seconds", "histogram", frozenset()),
        Metric("palisade_tls_dns_checks", "counter", frozenset({"verdict"})),
        Metric("palisade_tls_domain_rejections", "counter", frozenset({"reason"})),
        Metric("palisade_tls_config_applies", "counter", frozenset({"outcome"})),
    ],
}

# Not Palisade's, but queried: Prometheus' own series and RabbitMQ's (rabbitmq_prometheus plugin,
# /metrics/detailed?family=queue_coarse_metrics, scraped by the job `rabbitmq`).
EXTERNAL: dict[str, frozenset[str]] = {
    "up": frozenset(),
    "ALERTS": frozenset({"alertname", "alertstate", "severity"}),
    "rabbitmq_detailed_queue_messages_ready": frozenset({"vhost", "queue"}),
    "rabbitmq_detailed_queue_messages_unacked": frozenset({"vhost", "queue"}),
    "rabbitmq_detailed_queue_messages": frozenset({"vhost", "queue"}),
}
# Labels Prometheus adds to every scraped series (deploy/prometheus/prometheus.yml).
TARGET_LABELS = frozenset({"job", "instance", "app"})


def module_metrics(module_name: str) -> list[Metric]:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        # the module, or its whole package, not there yet
        if module_name not in FROM_ISSUES or not (module_name == missing or module_name.startswith(missing + ".")):
            raise
        return FROM_ISSUES[module_name]
    found = [
        Metric(m._name, str(m._type), frozenset(m._labelnames))
        for m in vars(module).values()
        if isinstance(m, MetricWrapperBase)
    ]
    assert found, f"{module_name} defines no metrics"
    return found


def own_metrics(worker: str) -> list[Metric]:
    return module_metrics(WORKER_MODULES[worker])


def catalog() -> dict[str, frozenset[str]]:
    """Every series name a Palisade process or the scraped infrastructure exposes -> its labels."""
    names: dict[str, frozenset[str]] = dict(EXTERNAL)
    for module in (RUNTIME_MODULE, HOSTCTL_MODULE, *WORKER_MODULES.values()):
        for metric in module_metrics(module):
            names.update(metric.series_names())
    return names


# ------------------------------------------------------------------ PromQL

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)")
_IDENT = re.compile(r"(?<![A-Za-z0-9_:$.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


@dataclass
class Query:
    metrics: set[str]
    matchers: list[tuple[str, str]]  # (metric, label) for every label matcher
    grouping: set[str]  # labels of by/without/on/ignoring clauses


def parse(expr: str) -> Query:
    """The metric names, label matchers and grouping labels of a PromQL expression (enough of
    PromQL for rules and panels: selectors, functions, aggregations, binary operators)."""
    matchers: list[tuple[str, str]] = []
    metrics: set[str] = set()
    grouping: set[str] = set()
    # label values may hold anything: match selectors before blanking strings inside them
    for m in _SELECTOR.finditer(expr):
        name = m.group(1) or ""
        body = _STRING.sub('""', m.group(2))
        for label, _op in _MATCHER.findall(body):
            if label == "__name__":
                continue
            matchers.append((name, label))
        if name:
            metrics.add(name)
    rest = _SELECTOR.sub(lambda m: f"{m.group(1) or ''} ", expr)
    rest = _STRING.sub(" ", rest)
    for m in _GROUPING.finditer(rest):
        grouping.update(label.strip() for label in m.group(2).split(",") if label.strip())
    rest = _GROUPING.sub(" ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)  # range and subquery durations, $__rate_interval
    for m in _IDENT.finditer(rest):
        ident, call = m.group(1), m.group(2)
        if call or ident in KEYWORDS or ident.startswith("$"):
            continue
        metrics.add(ident)
    return Query(metrics, matchers, grouping)


def problems(expr: str, known: dict[str, frozenset[str]]) -> list[str]:
    """What in `expr` does not exist: unknown metrics, labels no queried metric has."""
    q = parse(expr)
    found: list[str] = []
    if not q.metrics:
        found.append(f"no metric in {expr!r}")
    for name in sorted(q.metrics):
        if name not in known:
            found.append(f"unknown metric {name}")
    for name, label in q.matchers:
        if name in known and label not in known[name] | TARGET_LABELS:
            found.append(f"{name} has no label {label}")
    available = set(TARGET_LABELS)
    for name in q.metrics:
        available |= known.get(name, frozenset())
    for label in sorted(q.grouping - available):
        found.append(f"no queried metric has the label {label} (by/without/on)")
    return found


def load_yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())
