"""Hostile input through the real broker: hypothesis builds message bodies for every type a worker
handles (the contract's examples with one field replaced by something hostile, fields dropped or
added, the payload of the wrong JSON type, a broken envelope, random bytes), publishes them all to
the seven running workers, and checks that every (message, worker) pair ends either handled (its
id in the worker's inbox) or parked with a reason, and that every worker still answers afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from palisade_events import Payload, WorkerRuntime
from palisade_events.client import PalisadeClient, QueryRejectedError
from palisade_events.contract import accounts, firewall, lifecycle, mfa, platform, ratelimit, smtp, sshkeys, tls
from palisade_events.db import schema_name
from palisade_events.schema_export import example_payload
from palisade_events.topology import dead_queue
from tests.fixtures import AMQP_URL, DATABASE_URL, unique, wait_until
from tests.hardening.hardening_workers import Sink, closed_port, spec_factories
from tests.provisioning import service_provisioned

CASES = 1500  # bodies published; each reaches every worker bound to its routing key

HOSTILE_STRINGS = [
    "",
    " ",
    "a\nb",
    "a\r\nInjected: yes",
    "a\x00b",
    "x; drop table inbox; --",
    "}{",
    "${jndi:ldap://x}",
    "`id`",
    "$(id)",
    "'\"",
    "\u0455hop.example.com",  # a Cyrillic s
    "\u202egnp.exe",
    "\ud800",  # a lone surrogate: not valid UTF-8 once encoded with surrogatepass
    "x" * 100_000,
    "🙂" * 1000,
    "../../etc/passwd",
    "0",
    "-1",
    "1e309",
]
HOSTILE = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=40),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.text(max_size=8), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
    st.just(["10.0.0.0/8"] * 1000),
    st.just([{"protocol": "tcp", "ports": "22"}] * 600),
)


MODES = ["valid", "field", "field", "field", "drop", "extra", "payload", "envelope", "bytes"]


# What the runtime's decode says (palisade_events.messages.decode): refused by the contract.
DECODE_REASON = re.compile(r"not a Palisade envelope|unknown message type|invalid |\w+ version \d+ is not supported")
VM_UNREACHABLE = "TransientError: cannot reach 127.0.0.1"


@dataclass(frozen=True)
class Target:
    cls: type[Payload]
    workers: tuple[str, ...]


@dataclass
class Case:
    message_id: str
    exchange: str
    routing_key: str
    body: bytes
    workers: tuple[str, ...]
    how: str


def targets(specs: dict[str, Any]) -> list[Target]:
    by_cls: dict[type[Payload], list[str]] = {}
    for name, spec in specs.items():
        for cls in spec.handlers:
            by_cls.setdefault(cls, []).append(name)
    return [Target(cls, tuple(sorted(w))) for cls, w in sorted(by_cls.items(), key=lambda kv: kv[0].routing_key())]


def baseline(cls: type[Payload], service_id: str, account_id: str) -> dict[str, Any]:
    """A valid payload for the type, aimed at the known service/account, SSH only to loopback."""
    payload = copy.deepcopy(example_payload(cls) or {})
    if "service_id" in payload:
        payload["service_id"] = service_id
    if "account_id" in payload:
        payload["account_id"] = account_id
    if cls is firewall.FirewallRulesReplaceRequested:
        payload["rules"] = [{"protocol": "tcp", "ports": "8000-8100", "sources": ["10.0.0.0/8"]}]
    return payload


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            out += [(*prefix, k), *paths(v, (*prefix, k))]
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += [(*prefix, i), *paths(v, (*prefix, i))]
    return out


def set_at(node: Any, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def drop_at(node: Any, path: tuple[Any, ...]) -> None:
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]


def loopback_only(cls: type[Payload], payload: Any, ssh_port: int) -> Any:
    """Whatever the fuzzer made of a ServiceProvisioned, its SSH host stays a closed loopback port:
    the tests never send traffic off the machine."""
    if cls is platform.ServiceProvisioned and isinstance(payload, dict) and isinstance(payload.get("ssh"), dict):
        payload["ssh"]["host"] = "127.0.0.1"
        payload["ssh"]["port"] = ssh_port
    return payload


def case_strategy(all_targets: list[Target], service_ids: list[str], account_ids: list[str], ssh_port: int) -> Any:
    @st.composite
    def build(draw: Any) -> Case:
        target = draw(st.sampled_from(all_targets))
        cls = target.cls
        mid = str(uuid.uuid4())
        service_id = draw(st.sampled_from([*service_ids, unique("svc")]))
        account_id = draw(st.sampled_from([*account_ids, unique("acc")]))
        payload: Any = baseline(cls, service_id, account_id)
        envelope: dict[str, Any] = {
            "message_id": mid,
            "type": cls.type_name(),
            "version": cls.message_version,
            "occurred_at": datetime.now(UTC).isoformat(),
            "correlation_id": mid,
            "causation_id": None,
            "actor": {"kind": "user", "id": "fuzz"},
            "service_id": service_id,
            "account_id": account_id,
        }
        how = draw(
            st.sampled_from(["valid", "field", "field", "field", "drop", "extra", "payload", "envelope", "bytes"])
        )
        where = paths(payload)
        if how == "field" and where:
            path = draw(st.sampled_from(where))
            set_at(payload, path, draw(HOSTILE))
            how = f"field {'.'.join(map(str, path))}"
        elif how == "drop" and where:
            path = draw(st.sampled_from(where))
            drop_at(payload, path)
            how = f"drop {'.'.join(map(str, path))}"
        elif how == "extra" or how in ("field", "drop"):
            payload[draw(st.text(min_size=1, max_size=12))] = draw(HOSTILE)
        elif how == "payload":
            payload = draw(HOSTILE)
        elif how == "envelope":
            key = draw(st.sampled_from(sorted(envelope)))
            envelope[key] = draw(st.one_of(HOSTILE, st.just("FirewallRule"), st.just(2)))
            how = f"envelope {key}"
        envelope["payload"] = loopback_only(cls, payload, ssh_port)
        if how == "bytes":
            body = draw(st.one_of(st.binary(max_size=300), st.just(b""), st.just(b"\xff\xfe{"), st.just(b"[]")))
        else:
            body = json.dumps(envelope, allow_nan=True).encode("utf-8", "surrogatepass")
        return Case(mid, cls.exchange(), cls.routing_key(), body, target.workers, how)

    return build()


def generate(strategy: Any, count: int) -> list[Case]:
    """`count` cases from hypothesis, without shrinking: they are judged after publishing."""
    out: list[Case] = []

    @settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(case: Case) -> None:
        out.append(case)

    collect()
    return out


@pytest.fixture
async def workers(run_worker: Any, tmp_path: Path) -> AsyncIterator[dict[str, WorkerRuntime[Any]]]:
    sink = await Sink().start()
    factories = spec_factories(tmp_path, sink.port)
    running = {}
    for name, make in factories.items():
        running[name] = await run_worker(make(), db_pool_size=20)
    yield running
    await sink.stop()


async def parked_ids(channel: aio_pika.abc.AbstractChannel, worker: str, into: dict[tuple[str, str], str]) -> None:
    queue = await channel.get_queue(dead_queue(worker), ensure=False)
    while (m := await queue.get(fail=False, no_ack=True)) is not None:
        into[(m.message_id or "", worker)] = str((m.headers or {}).get("x-palisade-error") or "")


async def handled_ids(conn: asyncpg.Connection, worker: str, ids: list[str]) -> set[str]:
    valid = [i for i in ids if _is_uuid(i)]
    rows = await conn.fetch(
        f'SELECT message_id::text AS id FROM "{schema_name(worker)}".inbox WHERE message_id = ANY($1::uuid[])', valid
    )
    return {r["id"] for r in rows}


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


LIVENESS: dict[str, Any] = {  # worker -> a query class taking service_id
    "lifecycle": lifecycle.LifecycleStatus,
    "firewall": firewall.GetFirewall,
    "sshkeys": sshkeys.ListSshKeys,
    "ratelimit": ratelimit.GetWebPolicy,
    "smtp-relay": smtp.RelayStatus,
    "tls": tls.GetDomains,
}


async def test_every_fuzzed_message_is_handled_or_parked_and_no_worker_stops(
    workers: dict[str, WorkerRuntime[Any]], client: PalisadeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    ssh_port = closed_port()
    # Some known services and accounts, so that valid-looking commands reach the handlers' rules.
    service_ids, account_ids = [unique("svc") for _ in range(3)], [unique("acc") for _ in range(2)]
    for sid in service_ids:
        slug = sid.lower()[:30]
        await client.publish(
            service_provisioned(
                sid,
                slug,
                software="wordpress",
                account_id=account_ids[0],
                ipv4="127.0.0.1",
                private_ip="127.0.0.2",
                ssh_host="127.0.0.1",
                ssh_port=ssh_port,
            ),
            service_id=sid,
        )
    for aid in account_ids:
        await client.publish(accounts.AccountRegistered(account_id=aid, email=f"{aid}@example.com"), account_id=aid)

    all_targets = targets({n: rt.spec for n, rt in workers.items()})
    cases = generate(case_strategy(all_targets, service_ids, account_ids, ssh_port), CASES)
    generated = time.monotonic()

    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchanges = {name: await channel.get_exchange(name, ensure=False) for name in {c.exchange for c in cases}}
    for i in range(0, len(cases), 50):
        await asyncio.gather(
            *(
                exchanges[c.exchange].publish(aio_pika.Message(c.body, message_id=c.message_id), c.routing_key)
                for c in cases[i : i + 50]
            )
        )
    published = time.monotonic()

    expected = {(c.message_id, w) for c in cases for w in c.workers}
    handled: set[tuple[str, str]] = set()
    parked: dict[tuple[str, str], str] = {}
    ids = [c.message_id for c in cases]
    db = await asyncpg.connect(DATABASE_URL)
    try:

        async def accounted() -> bool:
            for w in workers:
                await parked_ids(channel, w, parked)
                handled.update((i, w) for i in await handled_ids(db, w, ids))
            return expected <= handled | set(parked)

        try:
            await wait_until(accounted, timeout=40, interval=0.3, what="every fuzzed message handled or parked")
        except AssertionError:
            by_id = {c.message_id: c for c in cases}
            missing = sorted(expected - handled - set(parked))
            detail = [(w, by_id[i].routing_key, by_id[i].how, by_id[i].body[:200]) for i, w in missing[:10]]
            raise AssertionError(f"{len(missing)} of {len(expected)} not accounted for: {detail}") from None
    finally:
        await db.close()
        await connection.close()
    settled = time.monotonic()

    ours = {k: v for k, v in parked.items() if k in expected}
    assert all(ours.values()), [k for k, v in ours.items() if not v]  # a reason on every parked one
    # Parked after the retry ladder (not refused by the contract): only VM work, which cannot reach
    # its loopback host here. A handler's own exception on hostile input would be a finding.
    unexpected = sorted({v for v in ours.values() if not DECODE_REASON.match(v) and not v.startswith(VM_UNREACHABLE)})
    assert not unexpected, unexpected

    # Still consuming: every worker answers a query after the storm.
    for query in LIVENESS.values():
        with contextlib.suppress(QueryRejectedError):  # a rejection is an answer all the same
            await client.request(query(service_id=service_ids[0]), timeout=10)
    await client.request(mfa.MfaStatus(), account_id=account_ids[0], timeout=10)
    for name, rt in workers.items():
        assert await rt.ready(), name

    # No handler blew up unexpectedly: the only errors are the parking decisions themselves.
    crashes = [
        f"{r.name}: {r.getMessage()[:300]}"
        for r in caplog.records
        if r.exc_info is not None or (r.levelno >= logging.ERROR and " parked after " not in r.getMessage())
    ]
    assert not crashes, crashes

    kinds: dict[str, int] = {}
    for c in cases:
        k = c.how.split(" ")[0]
        kinds[k] = kinds.get(k, 0) + 1
    print(
        f"\nfuzz: {len(cases)} bodies ({kinds}) -> {len(expected)} deliveries to {len(workers)} workers:"
        f" {len(expected & handled)} handled, {len(ours)} parked;"
        f" generate {generated - started:.1f}s, publish {published - generated:.1f}s, settle {settled - published:.1f}s"
    )
