"""deploy/grafana: the provisioned dashboard has a row per worker, and every panel queries metrics
(and labels) the workers really export."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType
from typing import Any

import pytest

from tests.deploy.promql import ROOT, VM_FACING, WORKERS, catalog, load_yaml, own_metrics, parse, problems

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "palisade.json"
RUNTIME_SERIES = {
    "palisade_messages_total",
    "palisade_handler_seconds_bucket",
    "palisade_outbox_pending",
    "palisade_outbox_oldest_pending_seconds",
    "palisade_dead_letters_total",
    "palisade_worker_ready",
}
HOSTCTL_SERIES = {"palisade_hostctl_connects_total", "palisade_hostctl_command_seconds_bucket"}


def builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard() -> Any:
    return json.loads(DASHBOARD.read_text())


def rows() -> dict[str, list[dict[str, Any]]]:
    """Row title -> the panels under it (rows are not collapsed: their panels follow them)."""
    out: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] | None = None
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            assert not panel["collapsed"]
            assert panel["panels"] == []
            current = out.setdefault(panel["title"], [])
        else:
            assert current is not None, f"panel {panel['title']!r} before the first row"
            current.append(panel)
    return out


def exprs(panels: list[dict[str, Any]]) -> list[str]:
    return [t["expr"] for p in panels for t in p["targets"]]


def test_the_committed_dashboard_is_what_the_builder_writes() -> None:
    assert DASHBOARD.read_text() == builder().render(), "run: python deploy/grafana/build_dashboard.py"


def test_there_is_a_row_per_worker() -> None:
    assert list(rows()) == ["Overview", *WORKERS]
    assert tuple(builder().WORKERS) == WORKERS


def test_every_panel_queries_metrics_and_labels_that_exist() -> None:
    known = catalog()
    found = {
        f"{panel['title']} [{target['refId']}]": problems(target["expr"], known)
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    }
    assert {title: p for title, p in found.items() if p} == {}


def test_panels_are_well_formed() -> None:
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert [t["refId"] for t in panel["targets"]] == [chr(ord("A") + i) for i in range(len(panel["targets"]))]


@pytest.mark.parametrize("worker", WORKERS)
def test_a_worker_s_row_shows_its_runtime_metrics_and_every_metric_of_its_own(worker: str) -> None:
    panels = rows()[worker]
    queried = set().union(*(parse(e).metrics for e in exprs(panels)))
    assert queried >= RUNTIME_SERIES
    assert queried >= {"rabbitmq_detailed_queue_messages_ready"}
    for metric in own_metrics(worker):
        names = set(metric.series_names())
        assert names & queried, f"the {worker} row does not show {metric.name}"
    if worker in VM_FACING:
        assert queried >= HOSTCTL_SERIES
    # and only that worker's series: selected by its worker label, scrape job or queue
    for expr in exprs(panels):
        assert f'worker="{worker}"' in expr or f'job="{worker}"' in expr or f'queue="palisade.{worker}' in expr, expr


def test_provisioning_points_grafana_at_prometheus_and_the_dashboard_directory() -> None:
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert [(d["type"], d["url"], d["isDefault"]) for d in datasource] == [
        ("prometheus", "http://prometheus:9090", True)
    ]
    [provider] = load_yaml(GRAFANA / "provisioning" / "dashboards" / "palisade.yml")["providers"]
    assert provider["type"] == "file"
    compose = load_yaml(ROOT / "docker-compose.yml")["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
