"""`palisade schema export`: JSON Schemas and the AsyncAPI document, generated from the models."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from pydantic import Field

from palisade_events.audit import AuditRecord
from palisade_events.contract import CONTRACT
from palisade_events.messages import Command, Event, Query, Registry, Reply
from palisade_events.schema_export import asyncapi_document, example_envelope, export


def resolve(doc: Any, ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), f"{ref} does not resolve (at {part!r})"
        assert part in node, f"{ref} does not resolve (at {part!r})"
        node = node[part]
    return node


def deref(doc: Any, ref: str) -> Any:
    """Follow a reference, and the references it points to."""
    node = resolve(doc, ref)
    seen = {ref}
    while isinstance(node, dict) and set(node) == {"$ref"}:
        assert node["$ref"] not in seen, f"reference cycle at {ref}"
        seen.add(node["$ref"])
        node = resolve(doc, node["$ref"])
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def load_doc(out: Path) -> dict[str, Any]:
    # libyaml's loader: the pure-Python one takes seconds over the 700 KB document.
    doc = yaml.load((out / "asyncapi.yaml").read_text(), Loader=yaml.CSafeLoader)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export of the contract for the tests that only read it."""
    out = tmp_path_factory.mktemp("contract")
    export(out)
    return out


def test_every_contract_type_gets_an_envelope_schema(exported: Path) -> None:
    names = {cls.type_name() for cls in CONTRACT}
    assert names, "the contract is empty"
    files = {p.stem for p in (exported / "schemas").glob("*.json")}
    assert files == names | {"AuditRecord"}
    for cls in CONTRACT:
        schema = json.loads((exported / "schemas" / f"{cls.type_name()}.json").read_text())
        assert schema["$schema"].startswith("https://json-schema.org/")
        assert schema["properties"]["type"]["const"] == cls.type_name()
        assert schema["properties"]["version"]["const"] == cls.message_version
        assert set(schema["required"]) >= {"message_id", "type", "occurred_at", "correlation_id", "actor", "payload"}
        for ref in refs(schema):
            resolve(schema, ref)
    audit = json.loads((exported / "schemas" / "AuditRecord.json").read_text())
    assert set(audit["properties"]) == set(AuditRecord.model_fields)


def test_asyncapi_document_is_3_0_with_a_channel_per_routing_key(exported: Path) -> None:
    doc = load_doc(exported)
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "Palisade"
    assert doc["info"]["version"]

    routing_keys = {cls.routing_key(): cls for cls in CONTRACT}
    type_channels = {cid: ch for cid, ch in doc["channels"].items() if cid not in ("audit", "replies")}
    assert {ch["address"] for ch in type_channels.values()} == set(routing_keys)
    for ch in type_channels.values():
        cls = routing_keys[ch["address"]]
        exchange = ch["bindings"]["amqp"]["exchange"]
        assert exchange == {"name": cls.exchange(), "type": "topic", "durable": True, "autoDelete": False, "vhost": "/"}
        (message_ref,) = ch["messages"].values()
        message = resolve(doc, message_ref["$ref"])
        assert message["name"] == cls.type_name()
        payload = resolve(doc, message["payload"]["$ref"])
        assert payload["properties"]["type"]["const"] == cls.type_name()

    audit = doc["channels"]["audit"]
    assert audit["address"] == "{worker}.{action}.{outcome}"
    assert set(re.findall(r"{(\w+)}", audit["address"])) == set(audit["parameters"])
    assert audit["parameters"]["outcome"]["enum"] == ["accepted", "rejected", "failed"]
    assert audit["bindings"]["amqp"]["exchange"]["name"] == "palisade.audit"


def test_every_ref_resolves_and_no_defs_are_left(exported: Path) -> None:
    doc = load_doc(exported)
    all_refs = refs(doc)
    assert len(all_refs) > len(CONTRACT)
    for ref in all_refs:
        resolve(doc, ref)
    text = (exported / "asyncapi.yaml").read_text()
    assert "$defs" not in text
    # Every schema the messages use is in components, and every component is a JSON object schema.
    for name, schema in doc["components"]["schemas"].items():
        assert isinstance(schema, dict), name
        assert schema, name


def test_operations_say_who_publishes(tmp_path: Path) -> None:
    doc = asyncapi_document()
    by_channel = {op["channel"]["$ref"].removeprefix("#/channels/"): op for op in doc["operations"].values()}
    for cls in CONTRACT:
        op = by_channel[cls.routing_key()]
        if cls.kind in ("command", "query"):
            assert op["action"] == "send", cls
        elif cls.owner in ("platform", "backup"):
            assert op["action"] == "send", cls  # the platform's own events: other systems publish them
        else:
            assert op["action"] == "receive", cls
        assert [deref(doc, m["$ref"])["name"] for m in op["messages"]] == [cls.type_name()]
    assert by_channel["audit"]["action"] == "receive"


def test_examples_are_valid_messages() -> None:
    doc = asyncapi_document()
    checked = 0
    for cls in CONTRACT:
        message = doc["components"]["messages"][cls.type_name()]
        for example in message.get("examples", []):
            env = CONTRACT.decode(json.dumps(example["payload"]).encode())
            assert type(env.payload) is cls
            checked += 1
    assert checked >= len(CONTRACT) // 2, "most types should carry an example"


def test_export_is_deterministic_and_drops_removed_types(exported: Path, tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir(parents=True)
    (tmp_path / "schemas" / "RemovedType.json").write_text("{}")
    export(tmp_path)
    first = sorted(p.relative_to(exported) for p in exported.rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == first
    for path in first:
        assert (exported / path).read_bytes() == (tmp_path / path).read_bytes(), path
    assert not (tmp_path / "schemas" / "RemovedType.json").exists()


class DoorOpen(Command):
    """Open the door of a service."""

    owner: ClassVar[str] = "doors"
    door: str = Field(max_length=10, description="Which door", examples=["front"])


class DoorOpened(Event):
    """The door is open."""

    owner: ClassVar[str] = "doors"
    door: str = Field(max_length=10, examples=["front"])


class DoorWatched(Event):
    """A Palisade worker's event: other systems subscribe to it."""

    owner: ClassVar[str] = "firewall"
    door: str = Field(max_length=10, examples=["front"])


class DoorStateReply(Reply):
    open: bool


class DoorState(Query):
    """Is the door open?"""

    owner: ClassVar[str] = "doors"
    reply: ClassVar[type[Reply]] = DoorStateReply
    door: str = Field(max_length=10, examples=["front"])


def test_queries_get_a_reply_channel_and_field_docs_travel(tmp_path: Path) -> None:
    registry = Registry([DoorOpen, DoorOpened, DoorState, DoorWatched])
    export(tmp_path, registry)
    doc = load_doc(tmp_path)
    for ref in refs(doc):
        resolve(doc, ref)
    assert set(doc["channels"]) == {
        "doors.DoorOpen",
        "doors.DoorOpened",
        "doors.DoorState",
        "firewall.DoorWatched",
        "audit",
        "replies",
    }
    assert set(doc["channels"]["replies"]["messages"]) == {"DoorStateReply", "QueryRejected"}
    query_op = doc["operations"]["sendDoorState"]
    assert [deref(doc, m["$ref"])["name"] for m in query_op["reply"]["messages"]] == [
        "DoorStateReply",
        "QueryRejected",
    ]
    assert doc["operations"]["sendDoorOpen"]["action"] == "send"
    assert doc["operations"]["sendDoorOpened"]["action"] == "send"  # "doors" is not a Palisade worker
    assert doc["operations"]["receiveDoorWatched"]["action"] == "receive"
    message = doc["components"]["messages"]["DoorOpen"]
    assert message["summary"] == "Open the door of a service."
    door = doc["components"]["schemas"]["DoorOpen"]["properties"]["door"]
    assert door["description"] == "Which door"
    assert door["examples"] == ["front"]
    assert example_envelope(DoorOpen) is not None
    assert message["examples"][0]["payload"]["payload"] == {"door": "front"}
