"""deploy/prometheus: the scrape configuration and alert rules, checked by promtool (Debian's
`prometheus` package) and against the metrics the workers really export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.promql import ROOT, WORKERS, catalog, load_yaml, problems

PROMETHEUS = ROOT / "deploy" / "prometheus"
OPERATING = ROOT / "docs" / "operating.md"

# What issue 10 asks the rules to cover -> the alert that does.
REQUIRED = {
    "parked messages": "PalisadeMessagesParked",
    "outbox lag": "PalisadeOutboxLag",
    "a worker down": "PalisadeWorkerDown",
    "certificates expiring in < 7 days": "PalisadeCertificateExpiringSoon",
    "certificate renewal failing": "PalisadeCertificateRenewalFailing",
    "relay services near quota": "PalisadeRelayServiceNearQuota",
    "relay services suspended": "PalisadeRelayServiceSuspended",
    "MFA lockout spikes": "PalisadeMfaLockoutSpike",
    "firewall apply failures": "PalisadeFirewallApplyFailures",
}


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool missing: Debian package prometheus (scripts/apt-packages.txt, `make apt`)"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(PROMETHEUS / "alerts.yml")["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_configuration_and_its_rule_files() -> None:
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_promtool_accepts_the_rules() -> None:
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout + done.stderr


def test_the_rule_unit_tests_pass() -> None:
    done = promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_rule_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """The unit tests pin behaviour: a near-quota alert at 260 instead of 240 no longer fires for
    a service at 250, and promtool says so."""
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path)
    text = (PROMETHEUS / "alerts.yml").read_text()
    changed = text.replace("(palisade_smtp_quota_used) >= 240", "(palisade_smtp_quota_used) >= 260")
    assert changed != text
    (tmp_path / "alerts.yml").write_text(changed)
    done = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert done.returncode != 0
    assert "PalisadeRelayServiceNearQuota" in done.stdout + done.stderr


def test_every_alert_fires_in_a_unit_test_and_stays_quiet_in_another() -> None:
    cases = [
        case for test in load_yaml(PROMETHEUS / "alerts_test.yml")["tests"] for case in test.get("alert_rule_test", [])
    ]
    for rule in rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{rule['alert']} never fires in alerts_test.yml"
        assert any(not c.get("exp_alerts") for c in mine), f"{rule['alert']} has no case where it stays quiet"


def test_the_issue_s_alerts_exist() -> None:
    names = {rule["alert"] for rule in rules()}
    missing = {what: alert for what, alert in REQUIRED.items() if alert not in names}
    assert not missing


def test_rules_query_only_metrics_and_labels_the_workers_export() -> None:
    known = catalog()
    found = {rule["alert"]: problems(rule["expr"], known) for rule in rules()}
    assert {alert: p for alert, p in found.items() if p} == {}


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section() -> None:
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in OPERATING.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        runbook = rule["annotations"]["runbook"]
        page, _, anchor = runbook.partition("#")
        assert page == "docs/operating.md", rule["alert"]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in anchors, f"docs/operating.md has no section {rule['alert']}"


@pytest.mark.parametrize("worker", WORKERS)
def test_each_worker_is_scraped_on_its_port_as_a_job_of_its_own(worker: str) -> None:
    from palisade_events.contract import METRICS_PORTS

    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == worker]
    [static] = job["static_configs"]
    assert static["targets"] == [f"{worker}:{METRICS_PORTS[worker]}"]
    assert static["labels"] == {"app": "palisade"}  # what PalisadeWorkerDown selects on
    assert job.get("metrics_path", "/metrics") == "/metrics"
