"""Writes deploy/rabbitmq/definitions.json: one RabbitMQ user per worker, a `publisher` for the
systems that send commands and an `auditor` that may only read the audit log, with the least
permissions each needs, plus the shared topology (exchanges, logs), so workers never need to
configure anything but their own queues.

    python deploy/rabbitmq/build_definitions.py        # after adding a worker or a message type
    rabbitmqctl import_definitions deploy/rabbitmq/definitions.json
    rabbitmqctl change_password palisade-<worker> ...  # users are written without passwords

Each worker's user may
- configure (declare) only `palisade.<w>`, `palisade.<w>.retry.<n>ms` and `palisade.<w>.dead`;
- read only those queues, and bind its queue only with the routing keys its handlers take
  (topic read permissions on palisade.commands and palisade.events);
- write only `<w>.*` on palisade.events, palisade.audit and palisade.commands (a worker schedules
  its own follow-up commands, e.g. firewall.FirewallApplyRequested, never another worker's);
- reach its own queues through `palisade.ladder` (retries, parking, the retry queues'
  dead-lettering back) with routing keys naming its own queues only, and answer queries on
  `palisade.replies`.

No user writes to the default exchange (`amq.default`): RabbitMQ cannot limit it by routing key,
so write on it would let a compromised worker put a message straight into any queue by name.
tests/hardening/test_privilege_rabbitmq.py loads this file into a vhost of its own and proves
every permitted and forbidden action against a running worker.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
OUTPUT = HERE / "definitions.json"
VHOST = "/"
USER_PREFIX = "palisade-"
COMMANDS, EVENTS, AUDIT = "palisade.commands", "palisade.events", "palisade.audit"
EVENTS_LOG, AUDIT_LOG = "palisade.events.log", "palisade.audit.log"
LADDER, REPLIES = "palisade.ladder", "palisade.replies"
EXCHANGES = [(COMMANDS, "topic"), (EVENTS, "topic"), (AUDIT, "topic"), (LADDER, "topic"), (REPLIES, "direct")]
NOTHING = "^$"


def _lit(name: str) -> str:
    """A literal for RabbitMQ's (PCRE) permission patterns."""
    return name.replace(".", r"\.")


def _one_of(names: list[str]) -> str:
    return "^(" + "|".join(_lit(n) for n in sorted(set(names))) + ")$" if names else NOTHING


def worker_bindings() -> dict[str, dict[str, list[str]]]:
    """worker -> exchange -> the routing keys its queue is bound with (from its WorkerSpec)."""
    from palisade_events.workers import installed_workers, load_worker

    out: dict[str, dict[str, list[str]]] = {}
    for name in installed_workers():
        keys: dict[str, list[str]] = {COMMANDS: [], EVENTS: []}
        for b in load_worker(name).bindings():
            keys[b.exchange].append(b.routing_key)
        out[name] = keys
    return out


def _worker_entries(vhost: str, user: str, worker: str, keys: dict[str, list[str]]) -> tuple[dict[str, Any], list[Any]]:
    own = rf"palisade\.{_lit(worker)}(\.dead|\.retry\.[0-9]+ms)?"
    permission = {
        "user": user,
        "vhost": vhost,
        "configure": f"^{own}$",
        "write": rf"^({own}|palisade\.events|palisade\.audit|palisade\.commands|palisade\.ladder|palisade\.replies)$",
        "read": rf"^({own}|palisade\.events|palisade\.commands|palisade\.ladder)$",
    }
    mine = rf"^{_lit(worker)}\."
    topics = [
        {"user": user, "vhost": vhost, "exchange": COMMANDS, "write": mine, "read": _one_of(keys[COMMANDS])},
        {"user": user, "vhost": vhost, "exchange": EVENTS, "write": mine, "read": _one_of(keys[EVENTS])},
        {"user": user, "vhost": vhost, "exchange": AUDIT, "write": mine, "read": NOTHING},
        # Its own queues' names only: publishing a retry or a parked message, binding the queues.
        {"user": user, "vhost": vhost, "exchange": LADDER, "write": f"^{own}$", "read": f"^{own}$"},
    ]
    return permission, topics


def build(
    vhost: str = VHOST, prefix: str = USER_PREFIX, bindings: dict[str, dict[str, list[str]]] | None = None
) -> dict[str, Any]:
    workers = bindings if bindings is not None else worker_bindings()
    users: list[dict[str, Any]] = []
    permissions: list[dict[str, Any]] = []
    topic_permissions: list[dict[str, Any]] = []

    def user(name: str) -> str:
        # No password in the file: an empty hash cannot log in until `rabbitmqctl change_password`.
        users.append(
            {
                "name": prefix + name,
                "password_hash": "",
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
        )
        return prefix + name

    for worker, keys in sorted(workers.items()):
        perm, topics = _worker_entries(vhost, user(worker), worker, keys)
        permissions.append(perm)
        topic_permissions.extend(topics)

    # Other systems: publish commands, ask queries (a server-named reply queue), watch events.
    publisher = user("publisher")
    # Exclusive reply/watch queues: named by the broker (amq.gen-…) or by aio-pika (amq_<hex>).
    reply_queue = r"(amq\.gen-[A-Za-z0-9_-]+|amq_[0-9a-f]+)"
    permissions.append(
        {
            "user": publisher,
            "vhost": vhost,
            "configure": f"^{reply_queue}$",
            "write": rf"^(palisade\.commands|{reply_queue})$",
            "read": rf"^({reply_queue}|palisade\.events|palisade\.replies)$",
        }
    )
    topic_permissions.append({"user": publisher, "vhost": vhost, "exchange": COMMANDS, "write": ".*", "read": NOTHING})
    topic_permissions.append({"user": publisher, "vhost": vhost, "exchange": EVENTS, "write": NOTHING, "read": ".*"})

    # The audit trail's reader: consumes the audit log (a stream) and nothing else.
    auditor = user("auditor")
    permissions.append(
        {"user": auditor, "vhost": vhost, "configure": NOTHING, "write": NOTHING, "read": f"^{_lit(AUDIT_LOG)}$"}
    )

    stream_args = {
        "x-queue-type": "stream",
        "x-max-age": "7D",
        "x-max-length-bytes": 2_000_000_000,
        "x-stream-max-segment-size-bytes": 50_000_000,
    }
    return {
        "vhosts": [{"name": vhost}],
        "users": users,
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "exchanges": [
            {
                "name": ex,
                "vhost": vhost,
                "type": kind,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for ex, kind in EXCHANGES
        ],
        "queues": [
            {"name": q, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": stream_args}
            for q in (EVENTS_LOG, AUDIT_LOG)
        ],
        "bindings": [
            {
                "source": ex,
                "vhost": vhost,
                "destination": q,
                "destination_type": "queue",
                "routing_key": "#",
                "arguments": {},
            }
            for ex, q in ((EVENTS, EVENTS_LOG), (AUDIT, AUDIT_LOG))
        ],
    }


def render(definitions: dict[str, Any]) -> str:
    return json.dumps(definitions, indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render(build()))
    print(f"wrote {OUTPUT}", file=sys.stderr)
