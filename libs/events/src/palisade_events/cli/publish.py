"""`palisade publish`: validate a payload locally against the contract, then publish
it in an envelope with confirms. Every failure is a `CliError` with one readable line."""

from __future__ import annotations

import difflib
import json
import uuid
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from ..amqp import Publisher, connect
from ..messages import Actor, Envelope, Payload, Registry, new_envelope, validation_summary


class CliError(Exception):
    """A failure the user can fix; printed as one line, exit code 1."""


def message_type(registry: Registry, type_name: str) -> type[Payload]:
    cls = registry.get(type_name)
    if cls is None:
        known = sorted(c.type_name() for c in registry)
        close = difflib.get_close_matches(type_name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f" (the contract has {len(known)} types)"
        raise CliError(f"unknown message type {type_name!r}{hint}")
    return cls


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise CliError(f"--set {dotted}: {part} is not an object")
        node = child
    node[leaf] = value


def payload_json(payload_text: str | None, assignments: Iterable[str] = ()) -> str:
    """The payload as JSON text: `payload_text` (a JSON object), with `field=value`
    assignments applied on top (`ssh.port=22`; a value that parses as JSON is taken
    as JSON, anything else as a string)."""
    assignments = list(assignments)
    if not assignments:
        return payload_text if payload_text is not None else "{}"
    try:
        data = json.loads(payload_text) if payload_text is not None else {}
    except json.JSONDecodeError as exc:
        raise CliError(f"the payload is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CliError("the payload must be a JSON object")
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CliError(f"--set {item!r}: expected field=value")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        _set_path(data, key, value)
    return json.dumps(data)


def parse_payload(registry: Registry, type_name: str, text: str) -> Payload:
    """Strict validation of the payload's JSON against its model (the same rules the
    workers apply); the error lists fields and reasons, never the input values."""
    cls = message_type(registry, type_name)
    try:
        return cls.model_validate_json(text)
    except ValidationError as exc:
        raise CliError(f"invalid {type_name} payload: {validation_summary(exc)}") from None


def parse_actor(text: str) -> Actor:
    kind, sep, ident = text.partition(":")
    if not sep:
        raise CliError(f"--actor {text!r}: expected kind:id, e.g. support:alice")
    try:
        return Actor.model_validate({"kind": kind, "id": ident})
    except ValidationError as exc:
        raise CliError(f"--actor {text!r}: {validation_summary(exc)}") from None


def build_envelope(
    payload: Payload,
    *,
    actor: Actor,
    service_id: str | None = None,
    account_id: str | None = None,
    correlation_id: uuid.UUID | None = None,
) -> Envelope[Any]:
    """The envelope around `payload`; service and account default to the payload's
    own `service_id`/`account_id` fields, which is what workers order and audit by."""
    if service_id is None:
        service_id = getattr(payload, "service_id", None)
    if account_id is None:
        account_id = getattr(payload, "account_id", None)
    try:
        return new_envelope(
            payload, actor=actor, service_id=service_id, account_id=account_id, correlation_id=correlation_id
        )
    except ValidationError as exc:
        raise CliError(f"invalid envelope: {validation_summary(exc)}") from None


async def publish_command(
    registry: Registry,
    type_name: str,
    payload_text: str,
    *,
    amqp_url: str,
    actor: Actor,
    service_id: str | None = None,
    account_id: str | None = None,
    correlation_id: uuid.UUID | None = None,
) -> Envelope[Any]:
    """Validate, wrap and publish one message of any kind (command, query or event).

    Raises CliError for input errors (before connecting) and `amqp.PublishError` when
    the broker does not take the message (e.g. no queue bound for its routing key)."""
    payload = parse_payload(registry, type_name, payload_text)
    env = build_envelope(
        payload, actor=actor, service_id=service_id, account_id=account_id, correlation_id=correlation_id
    )
    connection = await connect(amqp_url)
    try:
        publisher = await Publisher.open(connection)
        await publisher.publish(env)
    finally:
        await connection.close()
    return env


__all__ = [
    "CliError",
    "build_envelope",
    "message_type",
    "parse_actor",
    "parse_payload",
    "payload_json",
    "publish_command",
]
