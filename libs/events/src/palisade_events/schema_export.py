"""The contract as files other systems can code against, in any language.

`export(out_dir)` writes, all generated from the pydantic models:

- `schemas/<Type>.json`: the JSON Schema of the full envelope of each message type,
- `schemas/AuditRecord.json`: the body of every message on `palisade.audit`,
- `asyncapi.yaml`: an AsyncAPI 3.0.0 document whose channels are the routing keys.

The output is deterministic (sorted, fixed example ids and times), so a change to
the contract shows up as a readable diff.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from inspect import cleandoc
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from .audit import AuditRecord, Outcome
from .contract import CONTRACT, METRICS_PORTS
from .messages import Actor, Envelope, Payload, Query, QueryRejected, Registry, Reply, encode, envelope_of, new_envelope
from .topology import AUDIT_EXCHANGE, REPLIES_EXCHANGE

ASYNCAPI_VERSION = "3.0.0"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
AMQP_BINDING_VERSION = "0.3.0"
AUDIT_CHANNEL = "audit"
REPLY_CHANNEL = "replies"
SCHEMA_REF = "#/components/schemas/"

# Fixed values for generated examples: the same contract gives the same document.
EXAMPLE_MESSAGE_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
EXAMPLE_OTHER_ID = uuid.UUID("00000000-0000-4000-8000-000000000002")
EXAMPLE_TIME = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
EXAMPLE_ACTOR = Actor(kind="user", id="u-42")

_MISSING: Any = object()


def _package_version() -> str:
    try:
        return version("palisade-events")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0"


def _doc(cls: type[Any]) -> str | None:
    # Only the class's own docstring: an inherited one describes the base class.
    doc = cls.__dict__.get("__doc__")
    return cleandoc(doc) if doc else None


def _summary(cls: type[Any]) -> str | None:
    doc = _doc(cls)
    return doc.split("\n\n", 1)[0].replace("\n", " ") if doc else None


def _pin_type_and_version(schema: dict[str, Any], cls: type[Payload]) -> dict[str, Any]:
    """The envelope's `type` and `version` are fixed for one message type: say so."""
    props = schema["properties"]
    props["type"] = {**props["type"], "const": cls.type_name()}
    props["version"] = {**props["version"], "const": cls.message_version}
    return schema


def envelope_schema(cls: type[Payload]) -> dict[str, Any]:
    """Standalone JSON Schema (2020-12) of the envelope carrying `cls`."""
    schema = envelope_of(cls).model_json_schema()
    schema = _pin_type_and_version(schema, cls)
    if "description" not in schema and (summary := _summary(cls)):
        schema["description"] = summary
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def audit_schema() -> dict[str, Any]:
    return {"$schema": JSON_SCHEMA_DIALECT, **AuditRecord.model_json_schema()}


# ------------------------------------------------------------------ examples


def _example_value(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> Any:
    if "$ref" in schema:
        return _example_value(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    for key in ("examples", "enum"):
        if schema.get(key):
            return schema[key][0]
    if "const" in schema:
        return schema["const"]
    if "default" in schema:
        return schema["default"]
    if "anyOf" in schema:
        for option in schema["anyOf"]:
            if option.get("type") != "null" and (value := _example_value(option, defs)) is not _MISSING:
                return value
        return None
    if schema.get("type") == "object" and "properties" in schema:
        required = set(schema.get("required", ()))
        out: dict[str, Any] = {}
        for name, prop in schema["properties"].items():
            if name not in required and "examples" not in prop:
                continue  # optional fields appear in the example only where the model shows one
            value = _example_value(prop, defs)
            if value is _MISSING:
                return _MISSING
            out[name] = value
        return out
    kind = schema.get("type")
    if kind == "string" and schema.get("format") == "uuid":
        return str(EXAMPLE_OTHER_ID)
    if kind == "string" and schema.get("format") == "date-time":
        return EXAMPLE_TIME.isoformat().replace("+00:00", "Z")
    if kind in ("integer", "number"):
        if "exclusiveMinimum" in schema:
            return schema["exclusiveMinimum"] + 1
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    if kind == "array":
        return []
    return _MISSING


def example_payload(cls: type[Payload]) -> dict[str, Any] | None:
    """A payload built from the models' `examples`, or None if they do not add up
    to a valid one (every example we publish is checked against the model)."""
    schema = cls.model_json_schema()
    value = _example_value(schema, schema.get("$defs", {}))
    if not isinstance(value, dict):
        return None
    try:
        cls.model_validate_json(json.dumps(value))
    except ValidationError:
        return None
    return value


def example_envelope(cls: type[Payload]) -> dict[str, Any] | None:
    payload = example_payload(cls)
    if payload is None:
        return None
    model = cls.model_validate_json(json.dumps(payload))
    env: Envelope[Payload] = new_envelope(
        model,
        actor=EXAMPLE_ACTOR,
        service_id=getattr(model, "service_id", None),
        account_id=getattr(model, "account_id", None),
        message_id=EXAMPLE_MESSAGE_ID,
        occurred_at=EXAMPLE_TIME,
    )
    result: dict[str, Any] = json.loads(encode(env))
    return result


# ------------------------------------------------------------------ AsyncAPI


def _rewrite_refs(node: Any, renames: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(SCHEMA_REF):
                name = value[len(SCHEMA_REF) :]
                out[key] = SCHEMA_REF + renames.get(name, name)
            else:
                out[key] = _rewrite_refs(value, renames)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, renames) for v in node]
    return node


def _component_schemas(
    envelopes: Iterable[type[Payload]], bodies: Iterable[type[BaseModel]]
) -> tuple[dict[str, Any], dict[type[BaseModel], str]]:
    """All schemas in one namespace (`$defs` hoisted into components/schemas, shared
    models once), and the component name of each top-level model."""
    envelope_models = {envelope_of(cls): cls for cls in envelopes}
    models: list[type[BaseModel]] = [*envelope_models, *bodies]
    key_map, result = models_json_schema([(m, "validation") for m in models], ref_template=SCHEMA_REF + "{model}")
    defs: dict[str, Any] = result.get("$defs", {})
    names = {model: key_map[(model, "validation")]["$ref"][len(SCHEMA_REF) :] for model in models}
    # pydantic names a generic envelope `Envelope_DomainAdded_`; `DomainAddedEnvelope` reads better.
    renames: dict[str, str] = {}
    for model, payload_cls in envelope_models.items():
        wanted = f"{payload_cls.type_name()}Envelope"
        if wanted not in defs and wanted not in renames.values():
            renames[names[model]] = wanted
    defs = {renames.get(name, name): _rewrite_refs(schema, renames) for name, schema in defs.items()}
    for model, payload_cls in envelope_models.items():
        name = renames.get(names[model], names[model])
        defs[name] = _pin_type_and_version(defs[name], payload_cls)
        names[model] = name
    defs[HEADERS_SCHEMA] = _HEADERS
    return dict(sorted(defs.items())), names


def _exchange_binding(exchange: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {"name": exchange, "type": "topic", "durable": True, "autoDelete": False, "vhost": "/"},
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


HEADERS_SCHEMA = "AmqpHeaders"
_HEADERS: dict[str, Any] = {
    "title": HEADERS_SCHEMA,
    "type": "object",
    "description": "AMQP headers. Other headers may be present and must be ignored.",
    "properties": {
        "traceparent": {"type": "string", "description": "W3C trace context of the publisher"},
        "tracestate": {"type": "string", "description": "W3C trace state"},
    },
}


def _message(cls: type[BaseModel], schema_name: str, *, kind: str, routing: str) -> dict[str, Any]:
    doc = _doc(cls)
    message: dict[str, Any] = {
        "name": cls.__name__,
        "title": cls.__name__,
        **({"summary": summary} if (summary := _summary(cls)) else {}),
        "description": "\n\n".join(p for p in (doc, routing) if p),
        "contentType": "application/json",
        "headers": {"$ref": SCHEMA_REF + HEADERS_SCHEMA},
        "payload": {"$ref": SCHEMA_REF + schema_name},
        "bindings": {"amqp": {"messageType": cls.__name__, "bindingVersion": AMQP_BINDING_VERSION}},
    }
    if issubclass(cls, Payload):
        message["correlationId"] = {
            "description": "Shared by every message of one user action",
            "location": "$message.payload#/correlation_id",
        }
        message["x-palisade-kind"] = kind
        message["x-palisade-owner"] = cls.owner
        message["x-palisade-version"] = cls.message_version
        if (example := example_envelope(cls)) is not None:
            message["examples"] = [{"name": f"{cls.__name__}Example", "payload": example}]
    return message


def _is_external(cls: type[Payload]) -> bool:
    """Published by the rest of the platform, not by a Palisade worker."""
    return cls.owner not in METRICS_PORTS


def _action(cls: type[Payload]) -> str:
    # Operations are written from the side of a system that integrates with Palisade.
    if cls.kind in ("command", "query"):
        return "send"
    return "send" if _is_external(cls) else "receive"


def asyncapi_document(registry: Registry = CONTRACT) -> dict[str, Any]:
    types = list(registry)  # sorted by routing key
    queries = [cls for cls in types if issubclass(cls, Query)]
    reply_types: set[type[Reply]] = {q.reply for q in queries} | {QueryRejected} if queries else set()
    replies = sorted(reply_types, key=lambda c: c.type_name())
    schemas, names = _component_schemas([*types, *replies], [AuditRecord])

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}

    for cls in types:
        rk, exchange, name = cls.routing_key(), cls.exchange(), cls.type_name()
        messages[name] = _message(
            cls,
            names[envelope_of(cls)],
            kind=cls.kind,
            routing=f"Published on exchange `{exchange}` with routing key `{rk}`.",
        )
        channels[rk] = {
            "address": rk,
            "title": name,
            **({"summary": summary} if (summary := _summary(cls)) else {}),
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": _exchange_binding(exchange),
        }
        action = _action(cls)
        operation: dict[str, Any] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{rk}"},
            "messages": [{"$ref": f"#/channels/{rk}/messages/{name}"}],
            "title": f"{action} {name}",
            **({"summary": summary} if summary else {}),
            "bindings": {
                "amqp": (
                    {"deliveryMode": 2, "mandatory": True, "bindingVersion": AMQP_BINDING_VERSION}
                    if action == "send"
                    else {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}
                )
            },
        }
        if issubclass(cls, Query):
            reply_names = sorted({cls.reply.type_name(), QueryRejected.type_name()})
            operation["reply"] = {
                "address": {
                    "description": "The queue named in the request's AMQP `reply_to` property",
                    "location": "$message.header#/reply_to",
                },
                "channel": {"$ref": f"#/channels/{REPLY_CHANNEL}"},
                "messages": [{"$ref": f"#/channels/{REPLY_CHANNEL}/messages/{r}"} for r in reply_names],
            }
        operations[f"{action}{name}"] = operation

    if replies:
        for cls in replies:
            messages[cls.type_name()] = _message(
                cls,
                names[envelope_of(cls)],
                kind="reply",
                routing=f"Published on exchange `{REPLIES_EXCHANGE}` (direct) with the request's `reply_to` as"
                " routing key and the request's message id as `correlation_id`; the caller binds its"
                " reply queue there under the queue's own name.",
            )
        channels[REPLY_CHANNEL] = {
            "address": None,
            "title": "Replies to queries",
            "description": f"A private queue of the caller, named in the request's `reply_to` and bound"
            f" to `{REPLIES_EXCHANGE}` under that name.",
            "messages": {c.type_name(): {"$ref": f"#/components/messages/{c.type_name()}"} for c in replies},
        }

    audit_name = AuditRecord.__name__
    messages[audit_name] = _message(
        AuditRecord,
        names[AuditRecord],
        kind="audit",
        routing=f"Published on exchange `{AUDIT_EXCHANGE}` with routing key `<worker>.<action>.<outcome>`;"
        " the history is kept in the stream queue `palisade.audit.log`.",
    )
    channels[AUDIT_CHANNEL] = {
        "address": "{worker}.{action}.{outcome}",
        "title": "Audit records",
        "summary": "One record per decision of a Palisade worker",
        "parameters": {
            "worker": {"description": "The worker that decided", "examples": sorted(METRICS_PORTS)},
            "action": {
                "description": "The message type decided on",
                "examples": [cls.type_name() for cls in types if cls.kind == "command"][:5]
                or ["ServiceDeleteRequested"],
            },
            "outcome": {"description": "What was decided", "enum": list(get_args(Outcome))},
        },
        "messages": {audit_name: {"$ref": f"#/components/messages/{audit_name}"}},
        "bindings": _exchange_binding(AUDIT_EXCHANGE),
    }
    operations[f"receive{audit_name}"] = {
        "action": "receive",
        "channel": {"$ref": f"#/channels/{AUDIT_CHANNEL}"},
        "messages": [{"$ref": f"#/channels/{AUDIT_CHANNEL}/messages/{audit_name}"}],
        "title": f"receive {audit_name}",
        "summary": "Subscribe to decisions, e.g. with binding key `lifecycle.#` or `*.*.rejected`",
        "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}},
    }

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Palisade",
            "version": _package_version(),
            "description": (
                "Palisade, the security control plane, over RabbitMQ.\n\n"
                "Every message is a JSON envelope (`message_id`, `type`, `version`, `occurred_at`,"
                " `correlation_id`, `causation_id`, `actor`, `service_id`, `account_id`, `payload`)"
                " published persistent and mandatory with publisher confirms. Commands and queries go"
                " to the topic exchange `palisade.commands`, events to `palisade.events`, audit records"
                " to `palisade.audit`; the routing key of a message type is `<owner>.<Type>`.\n\n"
                "Operations are written from the side of a system that integrates with Palisade:"
                " `send` means you publish it (commands, queries and the platform's own events),"
                " `receive` means you subscribe to it (Palisade's events and audit records).\n\n"
                "Generated from the pydantic models by `palisade schema export`; do not edit."
            ),
        },
        "defaultContentType": "application/json",
        "channels": dict(sorted(channels.items())),
        "operations": dict(sorted(operations.items())),
        "components": {
            "schemas": schemas,
            "messages": dict(sorted(messages.items())),
        },
    }


# ------------------------------------------------------------------ files


class _Dumper(yaml.CSafeDumper):
    """Multi-line text (descriptions) as literal blocks, which diff line by line; no
    anchors, so every part of the document reads on its own. libyaml's emitter (PyYAML's
    wheels carry it) writes the same text as the pure-Python one, five times faster: the
    document is 700 KB."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: _Dumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def export(out_dir: Path, registry: Registry = CONTRACT) -> list[Path]:
    """Write the contract into `out_dir`; returns the files written. Schema files of
    types no longer in the contract are removed, so the directory is the contract."""
    schema_dir = out_dir / "schemas"
    schema_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for cls in registry:
        path = schema_dir / f"{cls.type_name()}.json"
        _write_if_changed(path, _json(envelope_schema(cls)))
        written.append(path)
    audit_path = schema_dir / f"{AuditRecord.__name__}.json"
    _write_if_changed(audit_path, _json(audit_schema()))
    written.append(audit_path)
    for stale in sorted(set(schema_dir.glob("*.json")) - set(written)):
        stale.unlink()
    doc_path = out_dir / "asyncapi.yaml"
    text = "# Generated by `palisade schema export` from the pydantic models; do not edit.\n" + yaml.dump(
        asyncapi_document(registry), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100
    )
    _write_if_changed(doc_path, text)
    written.append(doc_path)
    return written


__all__ = [
    "asyncapi_document",
    "audit_schema",
    "envelope_schema",
    "example_envelope",
    "example_payload",
    "export",
]
