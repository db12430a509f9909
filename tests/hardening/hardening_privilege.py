"""Loading deploy/rabbitmq/definitions.json and deploy/postgres/roles.sql into the machine's
broker and database under names of this test session alone (the broker and the cluster are
shared with other sessions), and removing them afterwards."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFINITIONS = REPO / "deploy" / "rabbitmq" / "definitions.json"
ROLES_SQL = REPO / "deploy" / "postgres" / "roles.sql"
FILE_USER_PREFIX = "palisade-"
FILE_ROLE_PREFIX = "palisade_"


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=120)


def psql(database: str, sql: str) -> None:
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", database, "-v", "ON_ERROR_STOP=1", "-qc", sql],
        check=True,
        capture_output=True,
        timeout=60,
    )


@dataclass
class BrokerUsers:
    """The definitions file loaded into a vhost of its own, its users renamed `<prefix><name>`."""

    vhost: str
    prefix: str
    password: str
    names: list[str] = field(default_factory=list)  # as in the file, without its prefix

    def user(self, name: str) -> str:
        return self.prefix + name

    def url(self, name: str) -> str:
        return f"amqp://{self.user(name)}:{self.password}@127.0.0.1:5672/{self.vhost}"

    @property
    def admin_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"


def renamed_definitions(vhost: str, prefix: str) -> dict[str, Any]:
    """The committed file with its vhost and user names replaced; permissions untouched."""
    data: dict[str, Any] = json.loads(DEFINITIONS.read_text())

    def rename(user: str) -> str:
        assert user.startswith(FILE_USER_PREFIX), user
        return prefix + user.removeprefix(FILE_USER_PREFIX)

    data["vhosts"] = [{"name": vhost}]
    for u in data["users"]:
        u["name"] = rename(u["name"])
    for section in ("permissions", "topic_permissions"):
        for p in data[section]:
            p["user"] = rename(p["user"])
            p["vhost"] = vhost
    for section in ("exchanges", "queues", "bindings"):
        for item in data[section]:
            item["vhost"] = vhost
    return data


def rabbit_password_hash(password: str) -> str:
    """`password_hash` of a definitions file for rabbit_password_hashing_sha256: base64 of a
    4-byte salt followed by SHA-256(salt + password) (rabbitmq.com/docs/passwords)."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def load_broker_users() -> BrokerUsers:
    tag = uuid.uuid4().hex[:8]
    users = BrokerUsers(vhost=f"palisade-priv-{tag}", prefix=f"priv{tag}-", password=uuid.uuid4().hex)
    data = renamed_definitions(users.vhost, users.prefix)
    users.names = [u["name"].removeprefix(users.prefix) for u in data["users"]]
    # The file has no passwords (an operator sets them). The test's own go in with the import,
    # and so does guest's access to the vhost: each rabbitmqctl call boots an Erlang VM (about a
    # second here), and one per user was most of this module's time.
    for u in data["users"]:
        assert u["hashing_algorithm"] == "rabbit_password_hashing_sha256", u
        u["password_hash"] = rabbit_password_hash(users.password)
    data["permissions"].append({"user": "guest", "vhost": users.vhost, "configure": ".*", "write": ".*", "read": ".*"})
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(data, f)
        f.flush()
        os.chmod(f.name, 0o644)  # the broker's node reads it, as its own user
        rabbitmqctl("import_definitions", f.name)
    # The import finishes asynchronously on the node.
    deadline = time.monotonic() + 60
    while not {users.user(n) for n in users.names} <= set(
        rabbitmqctl("list_users", "--no-table-headers").stdout.split()
    ):
        assert time.monotonic() < deadline, "definitions not imported within 60 s"
        time.sleep(0.2)
    return users


def remove_broker_users(users: BrokerUsers) -> None:
    # All at once: each call is mostly its own Erlang VM starting.
    calls = [
        subprocess.Popen(["rabbitmqctl", "-q", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for args in [("delete_user", users.user(name)) for name in users.names] + [("delete_vhost", users.vhost)]
    ]
    for call in calls:
        call.wait(timeout=120)


@dataclass
class DatabaseRoles:
    """roles.sql applied to a database of its own, its roles renamed `<prefix><worker>`."""

    database: str
    prefix: str
    workers: list[str]

    def role(self, worker: str) -> str:
        return self.prefix + worker.replace("-", "_")

    def url(self, worker: str) -> str:
        return f"postgresql://{self.role(worker)}@127.0.0.1:5432/{self.database}"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:5432/{self.database}"


def load_database_roles(workers: list[str]) -> DatabaseRoles:
    tag = uuid.uuid4().hex[:8]
    roles = DatabaseRoles(database=f"palisade_priv_{tag}", prefix=f"priv{tag}_", workers=workers)
    sql = ROLES_SQL.read_text()
    for worker in workers:
        file_role = FILE_ROLE_PREFIX + worker.replace("-", "_")
        # Role names only: in `CREATE ROLE x` and `AUTHORIZATION x` / `OWNER TO x`, never the schema.
        for before in ("CREATE ROLE ", "AUTHORIZATION ", "OWNER TO "):
            sql = sql.replace(f"{before}{file_role} ", f"{before}{roles.role(worker)} ")
            sql = sql.replace(f"{before}{file_role};", f"{before}{roles.role(worker)};")
    for worker in workers:
        assert f"CREATE ROLE {roles.role(worker)} " in sql, worker
    psql("postgres", f'CREATE DATABASE "{roles.database}"')
    psql(roles.database, sql)
    return roles


def remove_database_roles(roles: DatabaseRoles) -> None:
    psql("postgres", f'DROP DATABASE IF EXISTS "{roles.database}" WITH (FORCE)')
    for worker in roles.workers:
        psql("postgres", f'DROP ROLE IF EXISTS "{roles.role(worker)}"')
