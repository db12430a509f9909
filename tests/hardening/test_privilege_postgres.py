"""Least privilege on PostgreSQL: deploy/postgres/roles.sql applied to a database of this test's
own, every worker run (migrations included) as its role, and each role refused everything that
is not its own schema."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from palisade_events import WorkerRuntime
from palisade_events.client import PalisadeClient, QueryRejectedError
from palisade_events.contract import lifecycle as lc
from palisade_events.db import schema_name
from tests.fixtures import settings_for_test, unique, wait_until
from tests.hardening.hardening_privilege import ROLES_SQL, DatabaseRoles, load_database_roles, remove_database_roles
from tests.hardening.hardening_workers import Sink, closed_port, spec_factories
from tests.provisioning import service_provisioned

WORKERS = ["firewall", "lifecycle", "mfa", "ratelimit", "smtp-relay", "sshkeys", "tls"]


@pytest.fixture(scope="module")
def roles() -> Iterator[DatabaseRoles]:
    loaded = load_database_roles(WORKERS)
    try:
        yield loaded
    finally:
        remove_database_roles(loaded)


def test_the_roles_file_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("palisade_build_roles", ROLES_SQL.parent / "build_roles.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert ROLES_SQL.read_text() == module.render(), "run: python deploy/postgres/build_roles.py"
    for worker in WORKERS:
        assert f"CREATE SCHEMA IF NOT EXISTS {schema_name(worker)} AUTHORIZATION palisade_" in ROLES_SQL.read_text()


@pytest.fixture(scope="module")
async def migrated(roles: DatabaseRoles, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every worker's migrations applied by the worker itself, as its role."""
    factories = spec_factories(tmp_path_factory.mktemp("pgpriv"), closed_port())
    applied: dict[str, Any] = {}
    for name in WORKERS:
        rt: WorkerRuntime[Any] = WorkerRuntime(factories[name](), settings_for_test(database_url=roles.url(name)))
        applied[name] = await rt.migrate()
    return applied


async def test_each_worker_migrates_its_own_schema_as_its_role(roles: DatabaseRoles, migrated: dict[str, Any]) -> None:
    conn = await asyncpg.connect(roles.admin_url)
    try:
        for name in WORKERS:
            assert migrated[name], f"{name}: no migration applied"
            owners = {
                r["tableowner"]
                for r in await conn.fetch("SELECT tableowner FROM pg_tables WHERE schemaname = $1", schema_name(name))
            }
            assert owners == {roles.role(name)}, (name, owners)
    finally:
        await conn.close()


@pytest.mark.parametrize("worker", WORKERS)
async def test_a_role_cannot_touch_another_workers_schema(
    roles: DatabaseRoles, migrated: dict[str, Any], worker: str
) -> None:
    others = [w for w in WORKERS if w != worker]
    conn = await asyncpg.connect(roles.url(worker))
    try:
        # Its own tables: yes.
        await conn.fetchval(f"SELECT count(*) FROM {schema_name(worker)}.inbox")
        for other in others:
            theirs = schema_name(other)
            for sql in (
                f"SELECT * FROM {theirs}.outbox LIMIT 1",
                f"SELECT * FROM {theirs}.inbox LIMIT 1",
                f"INSERT INTO {theirs}.inbox (message_id, type) VALUES (gen_random_uuid(), 'x')",
                f"DELETE FROM {theirs}.schema_migrations",
                f"CREATE TABLE {theirs}.planted (x int)",
                f"DROP TABLE {theirs}.outbox",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
        for sql in (
            "CREATE SCHEMA planted",
            "CREATE TABLE public.planted (x int)",
            f"ALTER SCHEMA {schema_name(others[0])} OWNER TO {roles.role(worker)}",
            f"GRANT {roles.role(others[0])} TO {roles.role(worker)}",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
    finally:
        await conn.close()


async def test_a_worker_handles_messages_as_its_role(
    roles: DatabaseRoles, migrated: dict[str, Any], run_worker: Any, client: PalisadeClient, tmp_path: Path
) -> None:
    sink = await Sink().start()
    try:
        for name in ("lifecycle", "smtp-relay"):
            await run_worker(spec_factories(tmp_path, sink.port)[name](), database_url=roles.url(name))
        service_id, name = unique("svc"), unique("redis").lower()[:30]
        await client.publish(
            service_provisioned(service_id, name, ipv4="127.0.0.1", private_ip="127.0.0.1", ssh_port=closed_port()),
            service_id=service_id,
        )
        await client.publish(lc.TerminationProtectionEnableRequested(), service_id=service_id)

        async def protected() -> bool:
            try:
                reply = await client.request(lc.LifecycleStatus(service_id=service_id), timeout=5)
            except QueryRejectedError:
                return False
            return bool(reply.protection)

        await wait_until(protected, timeout=20, what="protection enabled by the lifecycle worker as its role")
    finally:
        await sink.stop()
