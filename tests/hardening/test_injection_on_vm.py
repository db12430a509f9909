"""The injection corpus sent as real commands, through the broker, to the running firewall, sshkeys,
ratelimit and tls workers, for a service that lives on a real test VM.

What it proves:

- every hostile command is refused: a handler's rejection (a `...Rejected` event with the same
  reason as the `rejected` audit record, never a reason beside the point such as unknown_service or
  version_conflict) or, for a body the contract refuses, a `rejected` audit record naming the
  payload field plus the message parked with that reason (`x-palisade-error`). The bodies are
  published raw, so the client's own validation does not stop them first. The one exception is a
  firewall value that is a clean one with blanks around it (`"22\\n"`) or in look-alike digits
  (fullwidth or Arabic-Indic "22"): the firewall reads it as the clean value (its ruleset is
  rendered from parsed values, so nothing of the input reaches the file), and then the rule set put
  in force must render to exactly the baseline (the same checksum);
- nothing was written to the VM: every file under the VM's /root/.ssh, /etc/nginx and
  /etc/nftables.d (authorized_keys, the two rate-limit files, the nft ruleset file, the TLS
  server blocks' directory) has the same bytes, inode and mtime as before the hostile batch, the
  kernel's `inet palisade` table is unchanged, and no payload marker or line-breaking character is
  in any of those files;
- the workers still work and the test can see a write: one clean command per VM worker afterwards
  is applied and shows up in the VM's files and ruleset; the tls worker accepts a clean domain (its
  CA and DNS are closed loopback ports: its one VM write, the challenge routes of the certificate
  attempt that opening port 80 starts, is over before the "before" snapshot).

The pure validators get every breaker in every position (test_injection_validators.py); this is a
representative sample: each breaker once per field kind, plus the corpus's payloads, look-alike
digits and overlong values.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncssh
import pytest

from palisade_events import Payload
from palisade_events.client import PalisadeClient
from palisade_events.contract import firewall as fw
from palisade_events.contract import ratelimit as rl
from palisade_events.contract import sshkeys as sk
from palisade_events.contract import tls
from palisade_hostctl.testvm import NamespaceVm
from tests.fixtures import Collector, unique, wait_until
from tests.hardening.fault_vm import APPLIED, VM_WORKERS, VmWorkers, hostctl, parked_messages, vm_state
from tests.hardening.hardening_workers import closed_port, spec_factories
from tests.hardening.injection_corpus import BREAKERS, CONFUSABLE_DIGITS, OVERLONG, PAYLOADS, inserted
from tests.vms import MakeVms, VmSession

pytestmark = pytest.mark.root

REJECTED = {
    "firewall": "FirewallChangeRejected",
    "sshkeys": "SshKeyRejected",
    "ratelimit": "WebPolicyRejected",
    "tls": "DomainRejected",
}
# Refusals that would say nothing about the hostile value (the test aimed at the wrong service or
# version, or repeated itself): none may be the reason a hostile command was refused.
BESIDE_THE_POINT = {
    "unknown_service",
    "version_conflict",
    "firewall_disabled",
    "automation_port_required",
    "duplicate_fingerprint",
    "too_many_keys",
    "domain_already_added",
    "too_many_domains",
}
# What the runtime says of a body the contract refuses (palisade_events.messages.decode).
CONTRACT_REFUSALS = ("invalid ", "not a Palisade envelope")
WATCHED_DIRS = ("/root/.ssh", "/etc/nginx", "/etc/nftables.d")
# Distinctive pieces of the corpus's payloads: none may ever be in a VM file.
MARKERS = ["evil", "include /etc/passwd", "$(id)", "`id`", "${HOME}", "{ return 200; }", "0.0.0.0/0 accept"]
# Line-breaking or invisible characters of the corpus: none may be in a VM file either.
INVISIBLE = ["\r", "\x00", "\u2028", "\u2029", "\u0085", "\u200b", "\u202e", "\ufeff"]

BASE_RULES: list[dict[str, Any]] = [
    {"protocol": "tcp", "ports": "22"},
    {"protocol": "tcp", "ports": "80"},
    {"protocol": "tcp", "ports": "443"},
    {"protocol": "tcp", "ports": "8080", "sources": ["10.0.0.0/8"]},
    {"protocol": "icmp", "icmp_type": "echo-request"},
]


def new_key() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


@dataclass
class Case:
    worker: str
    cls: type[Payload]
    field: str
    value: Any
    payload: dict[str, Any]
    clean: str | None = None  # firewall: the clean value a blank-trimmed hostile one may stand for
    correlation_id: str = ""
    outcome: str = ""  # "rejected: <reason>" or "accepted"


# ------------------------------------------------------------------ the corpus, per field kind


def firewall_cases() -> list[Case]:
    """One hostile rule added to the clean baseline, per field kind. A rule whose value is trimmed
    to the clean one duplicates a baseline rule, so a canonical acceptance changes nothing."""

    def case(field: str, value: Any, rule: dict[str, Any], clean: str) -> Case:
        payload = {"rules": [*BASE_RULES, rule], "expected_version": 0}
        return Case("firewall", fw.FirewallRulesReplaceRequested, field, value, payload, clean)

    out = []
    # Look-alike digits, alone and spelling "22": refused (ports are ASCII digits only).
    confusable_22 = [d[1] * 2 for d in CONFUSABLE_DIGITS if not d[1].isascii()] + ["2\uff12"]
    for v in [*inserted("22", ""), *inserted("", "22"), *PAYLOADS, "1" * 400, *CONFUSABLE_DIGITS, *confusable_22]:
        out.append(case("ports", v, {"protocol": "tcp", "ports": v}, "22"))
    for v in [*inserted("10.0.0.0/8", ""), *PAYLOADS, OVERLONG]:
        out.append(case("sources", v, {"protocol": "tcp", "ports": "8080", "sources": [v]}, "10.0.0.0/8"))
    for v in [*inserted("echo-request", ""), *PAYLOADS]:
        out.append(case("icmp_type", v, {"protocol": "icmp", "icmp_type": v}, "echo-request"))
    for v in [*inserted("tcp", ""), *PAYLOADS[:3]]:
        out.append(case("protocol", v, {"protocol": v, "ports": "22"}, "tcp"))
    return out


def sshkeys_cases() -> list[Case]:
    def case(field: str, value: Any, title: Any, public_key: Any) -> Case:
        return Case("sshkeys", sk.SshKeyAdded, field, value, {"title": title, "public_key": public_key})

    out = []
    # Titles: everything that could end the authorized_keys line or hide in it (printable
    # characters stay one comment by design: test_injection_validators.py), too long, not text.
    line_breaking = [b for b in BREAKERS if not b.isprintable() and b != "\t"]
    for t in [*("laptop" + b + "x" for b in line_breaking), "x" * 101, OVERLONG, ["laptop"], 7]:
        out.append(case("title", t, t, new_key()))
    # Keys: a breaker inside the blob, a second line, options, a NUL, payloads, not text.
    for b in BREAKERS:
        kind, blob = new_key().split()
        k = f"{kind} {blob[:24]}{b}{blob[24:]}"
        out.append(case("public_key", k, "laptop", k))
    lines: list[Any] = [
        *(new_key() + b + "x" for b in ("\n", "\r", "\x00")),
        *(new_key() + b + PAYLOADS[-1] for b in ("\n", "\r\n", "\u2028", "\u0085")),
        'command="id" ' + new_key(),
        'from="*",no-pty ' + new_key(),
        'environment="LD_PRELOAD=/x" ' + new_key(),
        new_key().replace("ssh-ed25519", "ssh-ed25519\x00"),
        *PAYLOADS,
        OVERLONG,
        "",
        {"key": new_key()},
    ]
    for line in lines:
        out.append(case("public_key", line, "laptop", line))
    return out


def ratelimit_cases() -> list[Case]:
    def limit(field: str, value: Any) -> Case:
        payload: dict[str, Any] = {"requests": 150, "per": "minute", "enabled": True, field: value}
        return Case("ratelimit", rl.RateLimitConfigured, field, value, payload)

    def cache(field: str, value: Any) -> Case:
        payload: dict[str, Any] = {"ttl_seconds": 3, "enabled": True, field: value}
        return Case("ratelimit", rl.OutputCacheConfigured, field, value, payload)

    numbers: list[Any] = [OVERLONG, 0, -1, 100_001, 1.5, 2**70, True, None, "150", "1e3", [150]]
    out = [limit("requests", v) for v in [*inserted("150", ""), *PAYLOADS, *CONFUSABLE_DIGITS, *numbers]]
    out += [limit("per", v) for v in [*inserted("minute", ""), *PAYLOADS, "hour", OVERLONG]]
    out += [limit("enabled", v) for v in ["true", 1, "yes\n"]]
    out += [cache("ttl_seconds", v) for v in [*inserted("3", ""), *PAYLOADS[:3], -1, 3601, 3.5, "3"]]
    return out


def tls_cases() -> list[Case]:
    """Domains for nginx's server_name (blanks inside the name: around it they are trimmed)."""
    values: list[Any] = [*inserted("shop", ".example.com"), *inserted("shop.example.", "com"), *PAYLOADS]
    values += [OVERLONG + ".com", "*.x.com", "a" * 64 + ".example.com", ["shop.example.com"]]
    return [Case("tls", tls.DomainAdded, "domain", v, {"domain": v}) for v in values]


# ------------------------------------------------------------------ sending and judging


@dataclass
class Seen:
    """Events and audit records of the four workers, as they crossed the broker, indexed by
    correlation id (parsed once: the workers share this event loop)."""

    events: Collector
    audit: Collector
    _index: dict[str, dict[str, list[dict[str, Any]]]] = dataclasses.field(default_factory=dict)
    _read: dict[str, int] = dataclasses.field(default_factory=dict)

    def _of(self, which: str, correlation_id: str) -> list[dict[str, Any]]:
        collector = self.events if which == "events" else self.audit
        index = self._index.setdefault(which, {})
        start = self._read.get(which, 0)
        new = collector.messages[start:]
        self._read[which] = start + len(new)
        for m in new:
            body = m.json()
            index.setdefault(str(body.get("correlation_id")), []).append(body)
        return index.get(correlation_id, [])

    def events_of(self, correlation_id: str) -> list[dict[str, Any]]:
        return self._of("events", correlation_id)

    def audit_of(self, correlation_id: str) -> list[dict[str, Any]]:
        return self._of("audit", correlation_id)


async def publish_raw(client: PalisadeClient, case: Case, service_id: str) -> None:
    """The command as a raw body: the client's validation never sees it, the worker's does."""
    cid = str(uuid.uuid4())
    body = {
        "message_id": cid,
        "type": case.cls.type_name(),
        "version": case.cls.message_version,
        "occurred_at": datetime.now(UTC).isoformat(),
        "correlation_id": cid,
        "causation_id": None,
        "actor": {"kind": "user", "id": "injection"},
        "service_id": service_id,
        "account_id": "acc-1",
        "payload": case.payload,
    }
    case.correlation_id = cid
    await client.publisher.publish_raw(
        case.cls.exchange(),
        case.cls.routing_key(),
        json.dumps(body).encode(),
        message_id=cid,
        message_type=case.cls.type_name(),
        correlation_id=cid,
    )


def decision(seen: Seen, case: Case) -> dict[str, Any] | None:
    """The audit record of the worker's decision on the command (not on the apply it asked for)."""
    for record in seen.audit_of(case.correlation_id):
        if record["worker"] == case.worker and record["action"] == case.cls.type_name():
            return record
    return None


async def the_event(seen: Seen, case: Case, event_type: str, timeout: float) -> dict[str, Any]:
    """The one event of `event_type` the case's command caused. It is published with the audit
    record of the decision but reaches the test through another queue (the events exchange's,
    not the audit exchange's), in either order: once a CI run had the record and not yet the event."""

    def found() -> list[dict[str, Any]]:
        return [e for e in seen.events_of(case.correlation_id) if e["type"] == event_type]

    await wait_until(lambda: bool(found()), timeout=timeout, what=f"{event_type} for {case.field}={case.value!r}")
    [event] = found()
    return event


async def judge(seen: Seen, cases: list[Case], timeout: float = 30) -> None:
    """Wait for every decision; a refusal must carry its reason in the audit record and in the
    rejection event (a handler's decision) or the parked message (the contract's)."""
    await wait_until(lambda: all(decision(seen, c) for c in cases), timeout=timeout, what=f"{len(cases)} decisions")
    parked: dict[str, dict[str, str]] = {}

    async def parked_reason(c: Case) -> str | None:
        if c.worker not in parked:
            parked[c.worker] = {
                str(m.correlation_id): str((m.headers or {}).get("x-palisade-error", ""))
                for m in await parked_messages(c.worker)
            }
        return parked[c.worker].get(c.correlation_id)

    for c in cases:
        record = decision(seen, c)
        assert record is not None
        if record["outcome"] != "rejected":
            c.outcome = record["outcome"]
            continue
        reason = record["reason"]
        assert reason, (c.field, c.value, record)
        if reason.startswith(CONTRACT_REFUSALS):
            # Refused for the hostile field, not for something else of the body.
            assert "payload." in reason, (c.field, c.value, reason)
            assert await parked_reason(c) == reason, (c.field, c.value, reason)
        else:
            assert reason not in BESIDE_THE_POINT, (c.field, c.value, reason)
            event = await the_event(seen, c, REJECTED[c.worker], timeout)
            assert event["payload"]["reason"] == reason, (c.field, c.value, event, record)
        c.outcome = f"rejected: {reason}"


async def firewall_one_by_one(
    workers: VmWorkers, seen: Seen, client: PalisadeClient, cases: list[Case], service_id: str, checksum: str
) -> None:
    """Each firewall case on its own, at the current version: a trimmed value that is accepted bumps
    the version, and a batch would then hide the other cases behind version_conflict."""
    version = await workers.firewall_version(service_id)
    for c in cases:
        c.payload["expected_version"] = version
        await publish_raw(client, c, service_id)
        await judge(seen, [c], timeout=15)
        if c.outcome.startswith("rejected"):
            assert "version_conflict" not in c.outcome, (c.field, c.value)
            continue
        # Accepted: only a value that is the clean one with blanks around it, and what it puts in
        # force renders to exactly the baseline.
        assert isinstance(c.value, str), f"accepted {c.field}={c.value!r}"
        assert c.value.strip() == c.clean, f"accepted {c.field}={c.value!r}"
        replaced = await the_event(seen, c, "FirewallRulesReplaced", timeout=15)
        version = replaced["payload"]["version"]
        applied = await workers.outcome("firewall", SimpleNamespace(correlation_id=c.correlation_id), timeout=15)
        assert applied["type"] == APPLIED["firewall"], applied
        assert applied["payload"]["checksum"] == checksum, (c.field, c.value, applied)


# ------------------------------------------------------------------ what the VM holds


def snapshot(vm: NamespaceVm) -> dict[str, tuple[str, int, int]]:
    """Every file the VM workers could reach: sha256, inode and mtime (a rewrite, even with the same
    bytes, changes the inode: hostctl replaces files by rename)."""
    out = {}
    for top in WATCHED_DIRS:
        for p in sorted(vm.path(top).rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns)
    return out


def watched_files(vm: NamespaceVm) -> dict[str, bytes]:
    files = {
        "authorized_keys": vm.path("/root/.ssh/authorized_keys"),
        "nginx http": vm.path(rl.NGINX_HTTP_CONF),
        "nginx snippet": vm.path(rl.NGINX_SERVER_SNIPPET),
        "nft ruleset": vm.path("/etc/nftables.d/palisade.nft"),
    }
    return {name: Path(p).read_bytes() for name, p in files.items()}


async def kernel_ruleset(vm: NamespaceVm) -> bytes:
    _, out, _ = await vm.exec("nft", "list", "table", "inet", "palisade")
    return out


def no_breaker_in(vm: NamespaceVm) -> None:
    for path in snapshot(vm):
        text = Path(path).read_bytes().decode("utf-8", "replace")
        found = [m for m in [*MARKERS, *INVISIBLE] if m in text]
        assert not found, f"{path} holds {found!r}"


# ------------------------------------------------------------------ the test


ALL_WORKERS = (*VM_WORKERS, "tls")


@pytest.fixture
async def workers(run_worker: Any, client: PalisadeClient, collect: Any, testvms: VmSession) -> VmWorkers:
    return await VmWorkers.start(run_worker, client, collect, hostctl(testvms), db_pool_size=20)


@pytest.fixture
async def seen(workers: VmWorkers, run_worker: Any, collect: Any, testvms: VmSession, tmp_path: Path) -> Seen:
    """The TLS worker too (its CA and DNS on closed loopback ports: a certificate attempt writes
    its challenge routes to the VM and fails at the CA; it judges the domains), and what all four say."""
    await run_worker(spec_factories(tmp_path, closed_port(), hostctl(testvms))["tls"]())
    events = await collect("palisade.events", *(f"{w}.#" for w in ALL_WORKERS))
    audit = await collect("palisade.audit", *(f"{w}.#" for w in ALL_WORKERS))
    return Seen(events, audit)


@pytest.mark.timeout(180)
async def test_hostile_commands_are_refused_before_anything_reaches_the_vm(
    workers: VmWorkers, seen: Seen, client: PalisadeClient, make_vms: MakeVms, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.perf_counter()
    [vm] = await make_vms(1)
    service_id = await workers.provision(vm)
    await wait_until(
        lambda: any(
            (b := m.json())["type"] == "DomainAccepted" and b["service_id"] == service_id for m in seen.events.messages
        ),
        what="tls knows the service",
    )

    # ---- the clean baseline: a rule set using every field kind, one user key, the default policy
    rules = [fw.FirewallRule(**r) for r in BASE_RULES]
    version = await workers.firewall_version(service_id)
    base = {
        "firewall": await client.publish(
            fw.FirewallRulesReplaceRequested(rules=rules, expected_version=version), service_id=service_id
        ),
        "sshkeys": await client.publish(sk.SshKeyAdded(title="baseline", public_key=new_key()), service_id=service_id),
    }
    outcomes = {w: await workers.outcome(w, env) for w, env in base.items()}
    assert {w: o["type"] for w, o in outcomes.items()} == {w: APPLIED[w] for w in base}, outcomes
    baseline_checksum = outcomes["firewall"]["payload"]["checksum"]
    # The baseline opens port 80, so the tls worker tries to issue the service's certificate: it
    # writes the ACME challenge routes to the VM, then finds its CA closed. Its VM write must be
    # over before the snapshot (once, the snapshot caught its temporary file mid-rename).
    await wait_until(
        lambda: any(
            (b := m.json())["type"] == "CertificateIssuanceFailed" and b["service_id"] == service_id
            for m in seen.events.messages
        ),
        what="tls's certificate attempt after port 80 opened is over",
    )
    before, before_files, before_kernel = snapshot(vm), watched_files(vm), await kernel_ruleset(vm)
    no_breaker_in(vm)
    ready = time.perf_counter()

    # ---- the hostile batch: sshkeys, ratelimit and tls all at once, the firewall one by one
    fw_cases, key_cases, rl_cases, tls_batch = firewall_cases(), sshkeys_cases(), ratelimit_cases(), tls_cases()

    async def batch(cases: list[Case]) -> None:
        for c in cases:
            await publish_raw(client, c, service_id)
        await judge(seen, cases)

    await asyncio.gather(
        firewall_one_by_one(workers, seen, client, fw_cases, service_id, baseline_checksum),
        batch(key_cases),
        batch(rl_cases),
        batch(tls_batch),
    )
    hostile = time.perf_counter()

    everyone_else = key_cases + rl_cases + tls_batch
    accepted = [(c.worker, c.field, c.value) for c in everyone_else if not c.outcome.startswith("rejected")]
    assert not accepted, f"hostile commands accepted: {accepted}"
    assert all(c.outcome for c in fw_cases)

    # ---- nothing reached the VM
    after_files = watched_files(vm)
    changed = [name for name in before_files if after_files[name] != before_files[name]]
    assert not changed, {name: after_files[name] for name in changed}
    assert snapshot(vm) == before, "a file on the VM was written"
    assert await kernel_ruleset(vm) == before_kernel, "the kernel's ruleset changed"
    no_breaker_in(vm)

    # ---- the workers still apply a clean command, and the test sees it
    change = await workers.change(service_id, 5005, 37)
    clean = {w: await workers.outcome(w, change.envs[w]) for w in VM_WORKERS}
    assert {w: o["type"] for w, o in clean.items()} == APPLIED, clean
    assert await vm_state(vm, change) == dict.fromkeys(VM_WORKERS, True)
    final_files = watched_files(vm)
    assert final_files["authorized_keys"] != before_files["authorized_keys"]
    assert final_files["nginx http"] != before_files["nginx http"]
    assert final_files["nft ruleset"] != before_files["nft ruleset"]
    assert await kernel_ruleset(vm) != before_kernel
    lines = final_files["authorized_keys"].decode().splitlines()
    assert len(lines) == 4, lines
    assert all(line.startswith("ssh-ed25519 AAAA") for line in lines[1:]), lines
    no_breaker_in(vm)
    added = await client.publish(tls.DomainAdded(domain=f"{unique('shop')}.example.com"), service_id=service_id)
    await wait_until(
        lambda: any(e["type"] == "DomainAccepted" for e in seen.events_of(str(added.correlation_id))),
        what="tls accepts a clean domain",
    )
    done = time.perf_counter()

    by_reason: dict[str, int] = {}
    for c in fw_cases + key_cases + rl_cases + tls_batch:
        key = f"{c.worker}:{c.outcome.split(':')[0]}"
        by_reason[key] = by_reason.get(key, 0) + 1
    trimmed = sorted({f"{c.field}={c.value!r}" for c in fw_cases if not c.outcome.startswith("rejected")})
    with capsys.disabled():
        print(
            f"\n[injection] {len(fw_cases)} firewall + {len(key_cases)} sshkeys + {len(rl_cases)} ratelimit"
            f" + {len(tls_batch)} tls hostile"
            f" commands: {by_reason}; firewall values trimmed to the baseline (same checksum): {trimmed};"
            f" VM files and kernel ruleset unchanged; setup {ready - started:.1f}s,"
            f" hostile {hostile - ready:.1f}s, clean {done - hostile:.1f}s"
        )
