"""Least privilege on RabbitMQ: deploy/rabbitmq/definitions.json loaded into a vhost of this
test's own, every worker started under its own user, and each forbidden action refused by the
broker with ACCESS_REFUSED."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import asyncssh
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from palisade_events.client import PalisadeClient, QueryRejectedError
from palisade_events.contract import lifecycle as lc
from palisade_events.contract import sshkeys
from palisade_events.messages import new_envelope
from palisade_events.topology import (
    AUDIT_EXCHANGE,
    AUDIT_LOG,
    COMMANDS_EXCHANGE,
    EVENTS_EXCHANGE,
    EVENTS_LOG,
    LADDER_EXCHANGE,
    REPLIES_EXCHANGE,
    dead_queue,
    declare_worker,
    work_queue,
)
from tests.fixtures import unique, wait_until
from tests.hardening.hardening_privilege import (
    DEFINITIONS,
    BrokerUsers,
    load_broker_users,
    remove_broker_users,
)
from tests.hardening.hardening_workers import Sink, closed_port, spec_factories
from tests.provisioning import service_provisioned

WORKERS = ["firewall", "lifecycle", "mfa", "ratelimit", "smtp-relay", "sshkeys", "tls"]


@pytest.fixture(scope="module")
def users() -> Iterator[BrokerUsers]:
    loaded = load_broker_users()
    try:
        yield loaded
    finally:
        remove_broker_users(loaded)


def test_the_definitions_file_is_what_the_generator_writes() -> None:
    import importlib.util

    path = DEFINITIONS.parent / "build_definitions.py"
    spec = importlib.util.spec_from_file_location("palisade_build_definitions", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DEFINITIONS.read_text() == module.render(module.build()), "run: python deploy/rabbitmq/build_definitions.py"
    names = {u["name"] for u in json.loads(DEFINITIONS.read_text())["users"]}
    assert names == {f"palisade-{w}" for w in WORKERS} | {"palisade-publisher", "palisade-auditor"}


# ------------------------------------------------------------------ refused actions


async def refused(url: str, action: Callable[[AbstractChannel], Awaitable[Any]]) -> str:
    """Run `action` on a fresh channel as the user of `url`; return the broker's refusal.

    A refused publish closes the channel asynchronously: the publish waits for its confirm,
    so the close arrives as the publish's error (never mistaken for success)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        try:
            await action(channel)
            # Anything asynchronous (a bind, a consume) has answered once a synchronous call did.
            await channel.declare_exchange(AUDIT_EXCHANGE, aio_pika.ExchangeType.TOPIC, passive=True)
        except aiormq.exceptions.ChannelAccessRefused as exc:
            return str(exc)
        raise AssertionError("the broker allowed it")
    finally:
        await connection.close()


def publish(exchange: str, key: str) -> Callable[[AbstractChannel], Awaitable[Any]]:
    async def act(channel: AbstractChannel) -> Any:
        ex = channel.default_exchange if exchange == "" else await channel.get_exchange(exchange, ensure=False)
        return await ex.publish(aio_pika.Message(b"{}", message_id=str(uuid.uuid4())), key, mandatory=False)

    return act


def consume(queue: str, **arguments: Any) -> Callable[[AbstractChannel], Awaitable[Any]]:
    async def act(channel: AbstractChannel) -> Any:
        await channel.set_qos(prefetch_count=10)
        q = await channel.get_queue(queue, ensure=False)
        return await q.consume(_drop, arguments=arguments or None)

    return act


async def _drop(message: AbstractIncomingMessage) -> None:
    return None


def get(queue: str) -> Callable[[AbstractChannel], Awaitable[Any]]:
    async def act(channel: AbstractChannel) -> Any:
        q = await channel.get_queue(queue, ensure=False)
        return await q.get(fail=False)

    return act


def bind(queue: str, exchange: str, key: str) -> Callable[[AbstractChannel], Awaitable[Any]]:
    async def act(channel: AbstractChannel) -> Any:
        q = await channel.get_queue(queue, ensure=False)
        return await q.bind(exchange, key)

    return act


def bind_new(exchange: str, key: str) -> Callable[[AbstractChannel], Awaitable[Any]]:
    async def act(channel: AbstractChannel) -> Any:
        q = await channel.declare_queue(exclusive=True, auto_delete=True)
        return await q.bind(exchange, key)

    return act


def declare(queue: str) -> Callable[[AbstractChannel], Awaitable[Any]]:
    async def act(channel: AbstractChannel) -> Any:
        return await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})

    return act


def delete_queue(queue: str) -> Callable[[AbstractChannel], Awaitable[Any]]:
    return lambda channel: channel.queue_delete(queue)


def delete_exchange(exchange: str) -> Callable[[AbstractChannel], Awaitable[Any]]:
    return lambda channel: channel.exchange_delete(exchange)


STREAM: dict[str, Any] = {"x-stream-offset": "first"}

# (user, what it tries, the action): every one must be refused.
FORBIDDEN: list[tuple[str, str, Callable[[AbstractChannel], Awaitable[Any]]]] = [
    # a worker: another worker's commands, events, audit, queues; the shared topology
    ("lifecycle", "publish another worker's command", publish(COMMANDS_EXCHANGE, "firewall.FirewallDisableRequested")),
    ("lifecycle", "publish a command to MFA", publish(COMMANDS_EXCHANGE, "mfa.MfaResetBySupport")),
    ("lifecycle", "publish an event as the firewall", publish(EVENTS_EXCHANGE, "firewall.FirewallApplied")),
    ("lifecycle", "publish an event as the platform", publish(EVENTS_EXCHANGE, "platform.ServiceDeprovisioned")),
    ("lifecycle", "publish an audit record as mfa", publish(AUDIT_EXCHANGE, "mfa.VerifyLoginCode.accepted")),
    ("lifecycle", "consume the firewall's queue", consume(work_queue("firewall"))),
    ("lifecycle", "get from MFA's queue", get(work_queue("mfa"))),
    ("lifecycle", "consume MFA's parked messages", consume("palisade.mfa.dead")),
    ("lifecycle", "read the audit log", consume(AUDIT_LOG, **STREAM)),
    ("lifecycle", "read the events log", consume(EVENTS_LOG, **STREAM)),
    ("lifecycle", "bind its queue to MFA's commands", bind(work_queue("lifecycle"), COMMANDS_EXCHANGE, "mfa.#")),
    ("lifecycle", "bind its queue to every event", bind(work_queue("lifecycle"), EVENTS_EXCHANGE, "#")),
    ("lifecycle", "bind its queue to the audit", bind(work_queue("lifecycle"), AUDIT_EXCHANGE, "#")),
    ("lifecycle", "declare a queue of its own choosing", bind_new(EVENTS_EXCHANGE, "lifecycle.x")),
    ("lifecycle", "declare the firewall's queue", declare(work_queue("firewall"))),
    ("lifecycle", "delete the firewall's dead queue", delete_queue("palisade.firewall.dead")),
    ("lifecycle", "delete the audit log", delete_queue(AUDIT_LOG)),
    ("lifecycle", "delete the events exchange", delete_exchange(EVENTS_EXCHANGE)),
    # ... and no way into another worker's queue: not by name through the default exchange,
    # not through the ladder under another worker's queue name
    ("lifecycle", "publish into the firewall's queue by name", publish("", work_queue("firewall"))),
    ("lifecycle", "publish even into its own queue by name", publish("", work_queue("lifecycle"))),
    (
        "lifecycle",
        "put a command in the firewall's queue via the ladder",
        publish(LADDER_EXCHANGE, work_queue("firewall")),
    ),
    ("lifecycle", "park a message in MFA's dead queue", publish(LADDER_EXCHANGE, dead_queue("mfa"))),
    (
        "lifecycle",
        "bind its queue to the ladder as the firewall's",
        bind(work_queue("lifecycle"), LADDER_EXCHANGE, work_queue("firewall")),
    ),
    ("lifecycle", "bind its queue to the whole ladder", bind(work_queue("lifecycle"), LADDER_EXCHANGE, "#")),
    (
        "lifecycle",
        "declare the ladder exchange",
        lambda ch: ch.declare_exchange(LADDER_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True),
    ),
    ("mfa", "publish a lifecycle command", publish(COMMANDS_EXCHANGE, "lifecycle.ServiceDeleteRequested")),
    ("mfa", "consume the lifecycle's queue", consume(work_queue("lifecycle"))),
    ("smtp-relay", "publish an MFA event", publish(EVENTS_EXCHANGE, "mfa.MfaDisabled")),
    ("tls", "publish as the firewall", publish(EVENTS_EXCHANGE, "firewall.FirewallApplied")),
    # the publisher: commands only
    ("publisher", "read the audit log", consume(AUDIT_LOG, **STREAM)),
    ("publisher", "bind a queue to the audit", bind_new(AUDIT_EXCHANGE, "#")),
    ("publisher", "publish an event", publish(EVENTS_EXCHANGE, "platform.ServiceProvisioned")),
    ("publisher", "publish an audit record", publish(AUDIT_EXCHANGE, "lifecycle.x.accepted")),
    ("publisher", "publish straight into a worker's queue", publish("", work_queue("lifecycle"))),
    ("publisher", "publish into a worker's queue via the ladder", publish(LADDER_EXCHANGE, work_queue("lifecycle"))),
    ("publisher", "answer a query as a worker", publish(REPLIES_EXCHANGE, "amq.gen-someone-elses")),
    ("publisher", "consume a worker's queue", consume(work_queue("mfa"))),
    ("publisher", "get a worker's parked messages", get("palisade.lifecycle.dead")),
    ("publisher", "declare a named queue", declare("palisade.sneaky")),
    ("publisher", "delete a worker's queue", delete_queue(work_queue("lifecycle"))),
    # the auditor: reads the audit log, nothing else
    ("auditor", "publish an audit record", publish(AUDIT_EXCHANGE, "lifecycle.x.accepted")),
    ("auditor", "publish a command", publish(COMMANDS_EXCHANGE, "lifecycle.ServiceDeleteRequested")),
    ("auditor", "publish through the default exchange", publish("", AUDIT_LOG)),
    ("auditor", "read the events log", consume(EVENTS_LOG, **STREAM)),
    ("auditor", "consume a worker's queue", consume(work_queue("lifecycle"))),
    ("auditor", "declare a queue", bind_new(AUDIT_EXCHANGE, "#")),
    ("auditor", "delete the audit log", delete_queue(AUDIT_LOG)),
]


@pytest.fixture(scope="module")
async def worker_queues(users: BrokerUsers) -> AsyncIterator[None]:
    """The queues the forbidden actions aim at, declared as the workers would (by the admin)."""
    connection = await aio_pika.connect(users.admin_url)
    channel = await connection.channel()
    for w in WORKERS:
        await declare_worker(channel, w, [], [0.2], declare_shared=False)
    yield
    await connection.close()


@pytest.mark.parametrize(("user", "what", "action"), FORBIDDEN, ids=[f"{u}: {w}" for u, w, _ in FORBIDDEN])
async def test_a_forbidden_action_is_refused(
    users: BrokerUsers, worker_queues: None, user: str, what: str, action: Callable[[AbstractChannel], Awaitable[Any]]
) -> None:
    refusal = await refused(users.url(user), action)
    assert "ACCESS_REFUSED" in refusal, refusal


# ------------------------------------------------------------------ the permitted path


async def read_audit_log(
    url: str, want: Callable[[list[dict[str, Any]]], bool], timeout: float = 20
) -> list[dict[str, Any]]:
    """As the auditor: the audit stream from its start until `want` holds."""
    records: list[dict[str, Any]] = []
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=200)
        queue = await channel.get_queue(AUDIT_LOG, ensure=False)

        async def on(message: AbstractIncomingMessage) -> None:
            records.append(json.loads(message.body))
            await message.ack()

        await queue.consume(on, arguments=STREAM)
        await wait_until(lambda: want(records), timeout=timeout, what="audit records on the stream")
    finally:
        await connection.close()
    return records


async def test_every_worker_runs_under_its_own_user_and_the_platform_talks_to_it(
    users: BrokerUsers, run_worker: Any, tmp_path: Path
) -> None:
    sink = await Sink().start()
    factories = spec_factories(tmp_path, sink.port)
    try:
        # Each worker declares its own queues and binds them with its routing keys, under its user.
        for name in WORKERS:
            await run_worker(factories[name](), amqp_url=users.url(name))

        # The platform's integration event (the orchestrator's own user is outside Palisade's file).
        service_id, name = unique("svc"), unique("redis").lower()[:30]
        admin = await PalisadeClient.connect(users.admin_url)
        try:
            await admin.publish(
                service_provisioned(service_id, name, ipv4="127.0.0.1", private_ip="127.0.0.1", ssh_port=closed_port()),
                service_id=service_id,
            )
        finally:
            await admin.close()

        async with await PalisadeClient.connect(users.url("publisher")) as dashboard:
            # A query: the publisher's reply queue bound to palisade.replies, the worker's reply there.
            async def known() -> bool:
                try:
                    await dashboard.request(lc.LifecycleStatus(service_id=service_id), timeout=5)
                except QueryRejectedError:  # not projected yet
                    return False
                return True

            await wait_until(known, timeout=20, what="the lifecycle worker knows the service")
            enable = await dashboard.publish(lc.TerminationProtectionEnableRequested(), service_id=service_id)

            async def protected() -> bool:
                reply = await dashboard.request(lc.LifecycleStatus(service_id=service_id), timeout=5)
                return bool(reply.protection)

            await wait_until(protected, what="protection enabled")

            # An invalid body: parked through palisade.ladder under the worker's own dead queue.
            bad = str(uuid.uuid4())
            await dashboard.publisher.publish_raw(
                COMMANDS_EXCHANGE,
                "lifecycle.ServiceRebootRequested",
                b'{"type": "ServiceRebootRequested"}',
                message_id=bad,
            )

            # A VM change that cannot reach its host: own command (sshkeys.SshKeysApplyRequested)
            # through palisade.commands, the retry ladder (its retry queues dead-letter back
            # through palisade.ladder), then the parking queue.
            key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
            add = await dashboard.publish(sshkeys.SshKeyAdded(title="ops", public_key=key), service_id=service_id)

        records = await read_audit_log(
            users.url("auditor"),
            lambda rs: (
                {
                    ("lifecycle", "accepted", str(enable.message_id)),
                    ("lifecycle", "rejected", bad),
                    ("sshkeys", "accepted", str(add.message_id)),
                }
                <= {(r["worker"], r["outcome"], r["message_id"]) for r in rs}
                and any(r["worker"] == "sshkeys" and r["outcome"] == "failed" for r in rs)
            ),
        )
        failed = [r for r in records if r["worker"] == "sshkeys" and r["outcome"] == "failed"]
        assert failed[0]["detail"]["attempts"] == 4, failed  # the three retries of the test ladder, then parked

        connection = await aio_pika.connect(users.admin_url)
        try:
            channel = await connection.channel()
            parked = []
            for queue in ("palisade.lifecycle.dead", "palisade.sshkeys.dead"):
                q = await channel.get_queue(queue, ensure=False)
                while (m := await q.get(fail=False, no_ack=True)) is not None:
                    parked.append((queue, m.message_id, (m.headers or {}).get("x-palisade-error")))
        finally:
            await connection.close()
        assert any(q == "palisade.lifecycle.dead" and mid == bad and err for q, mid, err in parked), parked
        assert any(q == "palisade.sshkeys.dead" and err for q, _, err in parked), parked
    finally:
        await sink.stop()


async def test_envelope_of_a_worker_cannot_reach_another_worker_even_if_well_formed(users: BrokerUsers) -> None:
    """The command a compromised firewall worker would send to delete a service: refused."""
    env = new_envelope(lc.ServiceDeleteRequested(confirm_name="x"), service_id="svc-1")

    async def act(channel: AbstractChannel) -> Any:
        ex = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
        return await ex.publish(
            aio_pika.Message(env.model_dump_json().encode()), lc.ServiceDeleteRequested.routing_key()
        )

    assert "ACCESS_REFUSED" in await refused(users.url("firewall"), act)
