"""Writes deploy/grafana/dashboards/palisade.json, the provisioned Grafana dashboard.

    python deploy/grafana/build_dashboard.py      # after changing a worker's metrics

One row per worker: messages by outcome, handler latency p99, outbox pending and lag, parked
messages and the queues' depth (RabbitMQ's own metrics), then that worker's own metrics.
tests/deploy/test_grafana.py checks that the committed JSON is what this script writes and that
every metric a panel queries exists in the code (or, for a worker not written yet, in its issue).

Queries select a worker by the runtime's `worker` label; metrics without one (each worker's own,
hostctl's) by the scrape job, which deploy/prometheus/prometheus.yml names after the worker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards" / "palisade.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
WIDTH = 24
HEIGHT = 8

# (title, unit, [(expr, legend)]) per panel
Panel = tuple[str, str, list[tuple[str, str]]]


def rate(expr: str) -> str:
    return f"rate({expr}[$__rate_interval])"


def p99(metric: str, selector: str, by: str = "") -> str:
    groups = f"le, {by}" if by else "le"
    return f"histogram_quantile(0.99, sum by ({groups}) ({rate(f'{metric}_bucket{{{selector}}}')}))"


def runtime_panels(worker: str) -> list[Panel]:
    w = f'worker="{worker}"'
    return [
        (
            "Messages by outcome",
            "ops",
            [(f"sum by (outcome) ({rate(f'palisade_messages_total{{{w}}}')})", "{{outcome}}")],
        ),
        ("Handler latency p99", "s", [(p99("palisade_handler_seconds", w, "type"), "{{type}}")]),
        (
            "Outbox",
            "short",
            [
                (f"sum(palisade_outbox_pending{{{w}}})", "pending rows"),
                (f"max(palisade_outbox_oldest_pending_seconds{{{w}}})", "oldest pending (s)"),
            ],
        ),
        (
            "Parked messages",
            "short",
            [
                (f"sum(increase(palisade_dead_letters_total{{{w}}}[$__rate_interval]))", "parked"),
                (f'sum(rabbitmq_detailed_queue_messages{{queue="palisade.{worker}.dead"}})', "in dead queue"),
            ],
        ),
        (
            "Queue depth and replicas",
            "short",
            [
                (f'sum(rabbitmq_detailed_queue_messages_ready{{queue="palisade.{worker}"}})', "ready"),
                (f'sum(rabbitmq_detailed_queue_messages_unacked{{queue="palisade.{worker}"}})', "unacked"),
                (f"sum(palisade_worker_ready{{{w}}})", "ready replicas"),
            ],
        ),
    ]


def hostctl_panels(job: str) -> list[Panel]:
    j = f'job="{job}"'
    return [
        (
            "SSH connects by outcome",
            "ops",
            [(f"sum by (outcome) ({rate(f'palisade_hostctl_connects_total{{{j}}}')})", "{{outcome}}")],
        ),
        (
            "SSH commands",
            "s",
            [
                (p99("palisade_hostctl_command_seconds", j), "p99"),
                (f"sum(palisade_hostctl_sessions_in_use{{{j}}})", "sessions in use"),
            ],
        ),
    ]


def apply_panels(job: str, prefix: str, what: str) -> list[Panel]:
    j = f'job="{job}"'
    return [
        (
            f"{what} by outcome",
            "ops",
            [(f"sum by (outcome) ({rate(f'{prefix}_applies_total{{{j}}}')})", "{{outcome}}")],
        ),
        (f"{what} time p99", "s", [(p99(f"{prefix}_apply_seconds", j), "p99")]),
    ]


def by_label(title: str, metric: str, job: str, label: str, *, counter: bool = True) -> Panel:
    sel = f'{metric}{{job="{job}"}}'
    # gauges read from the database report the whole fleet from every replica: max, not sum
    expr = f"sum by ({label}) ({rate(sel)})" if counter else f"max by ({label}) ({sel})"
    return (title, "ops" if counter else "short", [(expr, f"{{{{{label}}}}}")])


def own_panels(worker: str) -> list[Panel]:
    j = f'job="{worker}"'
    if worker == "lifecycle":
        return [
            (
                "Protected services and retained backups",
                "short",
                [
                    (f"max(palisade_lifecycle_protected_services{{{j}}})", "protected"),
                    (f"max(palisade_lifecycle_backups_retained{{{j}}})", "backups retained"),
                ],
            ),
            by_label("Rejections by reason", "palisade_lifecycle_rejections_total", worker, "reason"),
            by_label("Backup purges by reason", "palisade_lifecycle_purges_total", worker, "reason"),
        ]
    if worker == "smtp-relay":
        return [
            by_label("Emails by outcome", "palisade_smtp_emails_total", worker, "outcome"),
            by_label("Refusals by reason", "palisade_smtp_rejections_total", worker, "reason"),
            (
                "Quota used, top 10 services (of 300/h)",
                "short",
                [(f"topk(10, max by (service_id) (palisade_smtp_quota_used{{{j}}}))", "{{service_id}}")],
            ),
            (
                "Suspensions",
                "short",
                [(f"sum(increase(palisade_smtp_suspensions_total{{{j}}}[$__rate_interval]))", "suspended")],
            ),
            (
                "Session and upstream p99",
                "s",
                [
                    (p99("palisade_smtp_session_seconds", j), "client session"),
                    (p99("palisade_smtp_upstream_seconds", j), "smarthost hand-off"),
                ],
            ),
            (
                "Quota reservations per database statement (mean)",
                "short",
                [
                    (
                        f"sum({rate(f'palisade_smtp_reservations_per_statement_sum{{{j}}}')})"
                        f" / sum({rate(f'palisade_smtp_reservations_per_statement_count{{{j}}}')})",
                        "reservations per statement",
                    )
                ],
            ),
        ]
    if worker == "mfa":
        return [
            (
                "Verifications by mode and result",
                "ops",
                [
                    (
                        f"sum by (mode, result) ({rate(f'palisade_mfa_verifications_total{{{j}}}')})",
                        "{{mode}} {{result}}",
                    )
                ],
            ),
            ("Lockouts", "short", [(f"sum(increase(palisade_mfa_lockouts_total{{{j}}}[$__rate_interval]))", "locked")]),
            by_label("Accounts by mode", "palisade_mfa_accounts", worker, "mode", counter=False),
            (
                "Code emails",
                "ops",
                [
                    (
                        f"sum by (purpose, outcome) ({rate(f'palisade_mfa_email_codes_total{{{j}}}')})",
                        "{{purpose}} {{outcome}}",
                    )
                ],
            ),
            (
                "Stored secrets by key (rotation)",
                "short",
                [(f"max by (kind, key_id) (palisade_mfa_stored_secrets{{{j}}})", "{{kind}} {{key_id}}")],
            ),
        ]
    if worker == "sshkeys":
        return [
            *apply_panels(worker, "palisade_ssh", "authorized_keys writes"),
            by_label("Refused key changes by reason", "palisade_sshkeys_rejections_total", worker, "reason"),
            *hostctl_panels(worker),
        ]
    if worker == "firewall":
        return [
            *apply_panels(worker, "palisade_firewall", "Ruleset applies"),
            (
                "Rules per applied ruleset",
                "short",
                [
                    (f"histogram_quantile(0.5, sum by (le) ({rate(f'palisade_firewall_rules_bucket{{{j}}}')}))", "p50"),
                    (
                        f"histogram_quantile(0.99, sum by (le) ({rate(f'palisade_firewall_rules_bucket{{{j}}}')}))",
                        "p99",
                    ),
                ],
            ),
            by_label("Refused changes by reason", "palisade_firewall_rejections_total", worker, "reason"),
            *hostctl_panels(worker),
        ]
    if worker == "tls":
        return [
            (
                "Soonest certificate expiry",
                "s",
                [(f"min(palisade_tls_certificate_expiry_timestamp_seconds{{{j}}}) - time()", "time left")],
            ),
            (
                "10 certificates expiring first",
                "s",
                [(f"bottomk(10, palisade_tls_certificate_expiry_timestamp_seconds{{{j}}} - time())", "{{service_id}}")],
            ),
            by_label("Certificate orders by outcome", "palisade_tls_issuances_total", worker, "outcome"),
            ("Certificate order time p99", "s", [(p99("palisade_tls_issuance_seconds", j), "p99")]),
            by_label("Domains by state", "palisade_tls_domains", worker, "state", counter=False),
            by_label("DNS checks by verdict", "palisade_tls_dns_checks_total", worker, "verdict"),
            by_label("Refused domains by reason", "palisade_tls_domain_rejections_total", worker, "reason"),
            by_label("Server block and certificate writes", "palisade_tls_config_applies_total", worker, "outcome"),
            (
                "Stored keys by key (rotation)",
                "short",
                [(f"max by (kind, key_id) (palisade_tls_stored_secrets{{{j}}})", "{{kind}} {{key_id}}")],
            ),
            (
                "CA bad-nonce rejections (retried)",
                "short",
                [(f"sum(increase(palisade_tls_acme_bad_nonces_total{{{j}}}[$__rate_interval]))", "badNonce")],
            ),
            *hostctl_panels(worker),
        ]
    if worker == "ratelimit":
        return [*apply_panels(worker, "palisade_webpolicy", "Web policy applies"), *hostctl_panels(worker)]
    raise ValueError(f"no panels for worker {worker!r}")


WORKERS = ("lifecycle", "smtp-relay", "mfa", "sshkeys", "firewall", "tls", "ratelimit")


class Layout:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self.panels.append(
            {
                "type": "row",
                "id": self._id(),
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def graphs(self, panels: list[Panel], per_line: int = 4, prefix: str = "") -> None:
        width = WIDTH // per_line
        for i, (title, unit, targets) in enumerate(panels):
            if i and i % per_line == 0:
                self.y += HEIGHT
            self.panels.append(
                {
                    "type": "timeseries",
                    "id": self._id(),
                    "title": f"{prefix}{title}",
                    "datasource": DATASOURCE,
                    "gridPos": {"h": HEIGHT, "w": width, "x": (i % per_line) * width, "y": self.y},
                    "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                    "targets": [
                        {"refId": chr(ord("A") + k), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                        for k, (expr, legend) in enumerate(targets)
                    ],
                }
            )
        self.y += HEIGHT


def dashboard() -> dict[str, Any]:
    layout = Layout()
    layout.row("Overview")
    layout.graphs(
        [
            ("Ready replicas by worker", "short", [("sum by (worker) (palisade_worker_ready)", "{{worker}}")]),
            (
                "Messages handled by worker",
                "ops",
                [(f"sum by (worker) ({rate('palisade_messages_total')})", "{{worker}}")],
            ),
            (
                "Parked messages by worker",
                "short",
                [("sum by (worker) (increase(palisade_dead_letters_total[$__rate_interval]))", "{{worker}}")],
            ),
            ("Alerts firing", "short", [('sum by (alertname) (ALERTS{alertstate="firing"})', "{{alertname}}")]),
        ]
    )
    for worker in WORKERS:
        layout.row(worker)
        layout.graphs(runtime_panels(worker) + own_panels(worker), prefix=f"{worker}: ")
    return {
        "uid": "palisade-workers",
        "title": "Palisade workers",
        "description": "One row per worker: messages, latency, outbox, parked messages, queue depth, its own metrics."
        " Generated by deploy/grafana/build_dashboard.py.",
        "tags": ["palisade"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "links": [],
        "panels": layout.panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
