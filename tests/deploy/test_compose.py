"""docker-compose.yml and deploy/otel: no Docker engine in the test suite, so the structure is
checked: every service there, each worker's health check on its /healthz, ports, dependencies,
the files mounted, and that Prometheus, Grafana and the OTel collector are wired to each other."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest

from palisade_events.contract import METRICS_PORTS
from tests.deploy.promql import ROOT, WORKERS, load_yaml

INFRASTRUCTURE = ("rabbitmq", "postgres", "migrate", "prometheus", "grafana", "otel-collector")


def compose() -> Any:
    return load_yaml(ROOT / "docker-compose.yml")


def services() -> Any:
    return compose()["services"]


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Host path (relative to the repository) -> container path."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            out[source] = target
    return out


def test_every_worker_and_the_infrastructure_is_a_service() -> None:
    assert set(services()) >= {*WORKERS, *INFRASTRUCTURE}


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_runs_itself_and_its_health_check_asks_its_healthz(worker: str) -> None:
    service = services()[worker]
    port = METRICS_PORTS[worker]
    assert service["command"] == ["run", worker]
    assert service["image"] == "palisade:dev"
    assert service["build"] == "."
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(test))
    assert urls == [f"http://127.0.0.1:{port}/healthz"]
    assert str(port) in [str(p) for p in service["expose"]]
    env = service["environment"]
    assert env["PALISADE_METRICS_HOST"] == "0.0.0.0"  # reachable by Prometheus, not just the container
    assert urlsplit(env["PALISADE_AMQP_URL"]).hostname == "rabbitmq"
    assert urlsplit(env["PALISADE_DATABASE_URL"]).hostname == "postgres"
    assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert service["restart"] == "unless-stopped"


def test_migrate_waits_for_healthy_servers_and_the_servers_have_health_checks() -> None:
    s = services()
    assert s["migrate"]["command"] == ["migrate"]
    assert s["migrate"]["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    for name in ("rabbitmq", "postgres"):
        assert s[name]["healthcheck"]["test"][0] == "CMD"
    assert s["rabbitmq"]["image"] == "rabbitmq:3.13-management"
    assert {"5672:5672", "15672:15672"} <= set(s["rabbitmq"]["ports"])
    assert "5432:5432" in s["postgres"]["ports"]


def test_every_dependency_and_named_volume_exists_and_every_mounted_file_is_in_the_repository() -> None:
    c = compose()
    for name, service in c["services"].items():
        for dependency in service.get("depends_on", {}):
            assert dependency in c["services"], f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in c["volumes"], f"{name} uses undeclared volume {source}"


def test_the_smtp_relay_listens_where_it_is_published() -> None:
    relay = services()["smtp-relay"]
    host, port = relay["environment"]["PALISADE_SMTP_LISTEN"].rsplit(":", 1)
    assert host == "0.0.0.0"
    assert f"{port}:{port}" in relay["ports"]
    smarthost = relay["environment"]["PALISADE_SMARTHOST"].split(":")[0]
    assert smarthost in services()
    assert smarthost in relay["depends_on"]


def test_keys_come_from_the_shell_with_a_development_fallback() -> None:
    s = services()
    for worker, var in (("mfa", "PALISADE_MFA"), ("tls", "PALISADE_TLS")):
        env = s[worker]["environment"]
        assert env[f"{var}_KEY"] is None  # passed through from the shell when set there
        assert env[f"{var}_ALLOW_DEV_KEY"] == "1"
        assert env[f"{var}_DEV_KEY_FILE"].startswith("/var/lib/palisade/keys/")
        assert "palisade-keys:/var/lib/palisade/keys" in s[worker]["volumes"]


def test_prometheus_gets_the_scrape_configuration_and_the_rules_and_scrapes_compose_services() -> None:
    s = services()
    assert bind_mounts(s["prometheus"]) == {"./deploy/prometheus": "/etc/prometheus"}
    config = load_yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")
    for job in config["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            host, port = target.rsplit(":", 1)
            if job["job_name"] == "prometheus":
                assert target == "localhost:9090"
            elif job["job_name"] == "rabbitmq":
                assert host == "rabbitmq"
                assert port in s["rabbitmq"]["expose"]
            else:
                assert host == job["job_name"]
                assert int(port) == METRICS_PORTS[host]
    assert "9090:9090" in s["prometheus"]["ports"]


def test_grafana_waits_for_prometheus() -> None:
    s = services()
    assert s["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert "3000:3000" in s["grafana"]["ports"]


def test_workers_send_traces_to_the_collector_on_the_port_it_receives_on() -> None:
    s = services()
    collector = s["otel-collector"]
    mounts = bind_mounts(collector)
    assert mounts["./deploy/otel/collector.yaml"] in " ".join(collector["command"])
    config = load_yaml(ROOT / "deploy" / "otel" / "collector.yaml")
    receiver_port = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].rsplit(":", 1)[1]
    for worker in WORKERS:
        env = s[worker]["environment"]
        assert env["PALISADE_OTEL_EXPORTER"] == "otlp"
        url = urlsplit(env["PALISADE_OTEL_ENDPOINT"])
        assert (url.hostname, str(url.port), url.path) == ("otel-collector", receiver_port, "/v1/traces")
        assert "otel-collector" in s[worker]["depends_on"]


def test_the_collector_pipeline_uses_only_components_it_defines() -> None:
    config = load_yaml(ROOT / "deploy" / "otel" / "collector.yaml")
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces"}
    for pipeline in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            for name in pipeline.get(kind, []):
                assert name in config[kind], f"{kind[:-1]} {name} is not defined"
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
    assert {"debug", "file"} <= set(pipelines["traces"]["exporters"])
    assert config["exporters"]["file"]["path"].startswith("/var/lib/otel/")
    assert "otel-data:/var/lib/otel" in services()["otel-collector"]["volumes"]
