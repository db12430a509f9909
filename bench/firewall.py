#!/usr/bin/env python
"""Firewall benchmark: a whole ruleset applied atomically through the worker, against the
same rules added one `nft add rule` at a time, on the same test VM over the same SSH
connection.

For each size (10, 100, 500 user rules by default, 22/tcp among them):

(a) worker: `FirewallRulesReplaceRequested` published -> `FirewallApplied` received. The
    whole path: the command through RabbitMQ, the decision and its transaction, the
    apply request through the outbox, then on the VM the ruleset file replaced, `nft -c -f`,
    `nft -f` (one transaction), `nft -j list table` read back and compared, the event
    through the outbox to the collector.
(b) the same apply without the bus: the worker's `put_in_force` called directly (the SSH
    and nft part of (a)).
(c) per rule: the table reset to its fixed head with one `nft -f`, then one
    `nft add rule inet palisade input ...` SSH command per kernel rule, sequentially,
    over the worker's pooled connection to the VM; the kernel is read back and compared
    at the end so both paths reach the same ruleset.

Each size runs --repeat times (the rule sets alternate, so every apply changes the
ruleset); the median is reported, with min-max. Needs root (a test VM is a network
namespace), RabbitMQ and PostgreSQL; a vhost and a database of its own are made and
dropped.

Run from the repository root:  .venv/bin/python bench/firewall.py [--sizes 10,100,500] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
for src in ("libs/events/src", "libs/hostctl/src", "services/firewall/src"):
    if str(REPO / src) not in sys.path:
        sys.path.insert(0, str(REPO / src))

from palisade_events import Envelope, RuntimeSettings, WorkerRuntime  # noqa: E402
from palisade_events.client import PalisadeClient  # noqa: E402
from palisade_events.contract import firewall as fw  # noqa: E402
from palisade_events.contract import platform as pf  # noqa: E402
from palisade_firewall import domain  # noqa: E402
from palisade_firewall.handlers import put_in_force, read_table  # noqa: E402
from palisade_firewall.settings import FirewallSettings  # noqa: E402
from palisade_firewall.worker import spec  # noqa: E402
from palisade_hostctl import Host, HostctlSettings  # noqa: E402
from palisade_hostctl.testvm import NamespaceVm, down, up  # noqa: E402

AMQP_BASE = os.environ.get("PALISADE_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672")
PG_BASE = os.environ.get("PALISADE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")


@dataclass
class Row:
    size: int
    kernel_rules: int
    worker: list[float]
    direct: list[float]
    per_rule: list[float]


def rule_set(size: int, variant: int) -> list[fw.FirewallRule]:
    """`size` rules that do not merge (ports two apart), 22/tcp first; `variant` shifts them."""
    rules = [fw.FirewallRule(protocol="tcp", ports="22")]
    for i in range(size - 1):
        protocol: Literal["tcp", "udp"] = "tcp" if i % 4 else "udp"
        sources = ["203.0.113.0/24", "2001:db8::/32"] if i % 10 == 0 else None
        rules.append(fw.FirewallRule(protocol=protocol, ports=str(10000 + 2 * i + variant), sources=sources))
    return rules


def as_domain(rules: Sequence[fw.FirewallRule]) -> tuple[domain.Rule, ...]:
    decision = domain.judge_rule_set(
        [r.model_dump() for r in rules],
        automation_sources=domain.ANYWHERE,
        port_80_was_open=True,
        tls_domains=0,
        acknowledge_tls_impact=False,
    )
    return decision.rules


async def per_rule(host: Host, rules: tuple[domain.Rule, ...]) -> float:
    """Reset the table to its head, then one `nft add rule` per kernel rule; seconds."""
    started = time.perf_counter()
    await host.run(["nft", "-f", "-"], input=domain.render_nftables(()), operation="bench_reset")
    for kernel_rule in domain.nft_rules(rules):
        text = domain.render_nft_rule(kernel_rule)
        await host.run(["nft", "add", "rule", "inet", "palisade", "input", *text.split()], operation="bench_add")
    elapsed = time.perf_counter() - started
    domain.compare_with_kernel(await read_table(host), True, rules)
    return elapsed


def _ctl(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


async def bench(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("needs root: the test VM is a network namespace", file=sys.stderr)
        return 2
    tag = f"{os.getpid()}"
    vhost, database = f"palisade-bench-firewall-{tag}", f"palisade_bench_firewall_{tag}"
    _ctl("rabbitmqctl", "-q", "add_vhost", vhost)
    _ctl("rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    amqp_url, database_url = f"{AMQP_BASE}/{vhost}", f"{PG_BASE}/{database}"
    vm: NamespaceVm | None = None
    rt: WorkerRuntime[Any] | None = None
    try:
        vm = await up(f"fwbench-{tag}", owner=f"bench-{tag}", foreground=True)
        assert vm.automation_key is not None
        hostctl = HostctlSettings(key_file=vm.automation_key, testvm_root=vm.root)
        settings = RuntimeSettings(amqp_url=amqp_url, database_url=database_url, metrics_port=0)
        rt = WorkerRuntime(spec(FirewallSettings(), hostctl), settings)
        await rt.start()
        client = await PalisadeClient.connect(amqp_url)
        try:
            rows = await measure(args, rt, client, vm)
        finally:
            await client.close()
    finally:
        if rt is not None:
            await rt.stop()
        if vm is not None:
            await down(vm.name, root=vm.root)
        _ctl("rabbitmqctl", "-q", "delete_vhost", vhost)
        _ctl("psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    return report(args, rows)


async def measure(
    args: argparse.Namespace, rt: WorkerRuntime[Any], client: PalisadeClient, vm: NamespaceVm
) -> list[Row]:
    service_id = f"svc-bench-{uuid.uuid4().hex[:8]}"
    host = rt.deps.hosts.host(vm.identity)
    async with client.watch(fw.FirewallApplied, fw.FirewallApplyFailed, fw.FirewallChangeRejected) as watch:
        await client.publish(
            pf.ServiceProvisioned(
                service_id=service_id,
                name="fwbench",
                software="redis",
                account_id="acc-bench",
                hostname="fwbench.vm.example.net",
                private_ip=vm.address,
                ssh=pf.SshEndpoint(host=vm.address, port=vm.port, host_key=vm.host_key),
            ),
            service_id=service_id,
        )
        await watch.next(lambda e: e.service_id == service_id and e.type == "FirewallApplied", 30)
        version = 1
        rows = []
        for size in args.sizes:
            row = Row(size, 0, [], [], [])
            for i in range(args.repeat + 1):  # the first round warms up (connection, caches) and is dropped
                rules = rule_set(size, i % 2)
                started = time.perf_counter()
                env = await client.publish(
                    fw.FirewallRulesReplaceRequested(rules=rules, expected_version=version), service_id=service_id
                )
                outcome = await watch.next(partial(_caused_by, env), 60)
                worker_s = time.perf_counter() - started
                if outcome.type != "FirewallApplied":
                    raise RuntimeError(f"{outcome.type}: {outcome.payload}")
                version = outcome.payload.version
                normalised = as_domain(rules)
                assert outcome.payload.rule_count == size == len(normalised)
                # (b) the same two rule sets, straight through put_in_force (alternating: always a change).
                other = as_domain(rule_set(size, (i + 1) % 2))
                await put_in_force(host, domain.render_nftables(other), True, other)
                started = time.perf_counter()
                await put_in_force(host, domain.render_nftables(normalised), True, normalised)
                direct_s = time.perf_counter() - started
                per_rule_s = await per_rule(host, normalised)
                if i:
                    row.worker.append(worker_s)
                    row.direct.append(direct_s)
                    row.per_rule.append(per_rule_s)
                row.kernel_rules = len(domain.nft_rules(normalised))
            rows.append(row)
            print(
                f"  {size:>4} rules: worker {_ms(row.worker)}, direct {_ms(row.direct)}, per rule {_ms(row.per_rule)}",
                flush=True,
            )
    return rows


def _caused_by(command: Envelope[Any], event: Envelope[Any]) -> bool:
    return event.correlation_id == command.correlation_id


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:8.1f} ms ({min(values) * 1000:.1f}-{max(values) * 1000:.1f})"


def report(args: argparse.Namespace, rows: list[Row]) -> int:
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    print()
    print(f"Firewall apply, median of {args.repeat} (min-max); {platform.node()}, {os.cpu_count()} CPUs, {nft}")
    print(
        f"  {'rules':>5} {'kernel':>6}  {'(a) worker':>12} {'(b) direct':>12} {'(c) per rule':>13}"
        f"  {'(c)/(a)':>8}  {'(c) per rule':>13}  {'(a) per rule':>13}"
    )
    failed = False
    for row in rows:
        a, b, c = (statistics.median(v) for v in (row.worker, row.direct, row.per_rule))
        ratio = c / a
        print(
            f"  {row.size:>5} {row.kernel_rules:>6}  {a * 1000:9.1f} ms {b * 1000:9.1f} ms {c * 1000:10.1f} ms"
            f"  {ratio:7.1f}x  {c / row.kernel_rules * 1000:10.2f} ms  {a / row.size * 1000:10.3f} ms"
        )
        if row.size >= 500 and ratio < 10:
            failed = True
    print()
    print("  (a) command published -> FirewallApplied received, through the worker")
    print("  (b) put_in_force alone: replace file, nft -c -f, nft -f, read back over SSH")
    print("  (c) one nft -f of the table head, then one `nft add rule` SSH command per kernel rule")
    if failed:
        print("FAIL: the atomic path is not 10x faster than per-rule at 500 rules", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10, 100, 500])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    if any(not 1 <= n <= 500 for n in args.sizes):
        p.error("sizes are 1-500 rules")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(bench(parse_args(argv)))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
