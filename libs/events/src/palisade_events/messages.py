"""Message base classes, the envelope, and the registry type -> routing key.

A message type is a pydantic model of its payload. Its class says who owns it
(`owner`, the routing-key prefix) and what kind it is (command, event, query,
reply). The envelope carries the identity, causality and actor around it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from functools import cache
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from .types import AccountId, ServiceId, ShortText

Kind = Literal["command", "event", "query", "reply"]


class StrictModel(BaseModel):
    """Strict, closed, immutable: the configuration of every contract model."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Payload(StrictModel):
    """Base of every message payload."""

    owner: ClassVar[str]
    kind: ClassVar[Kind]
    # The envelope `version` of this type; an incompatible change is a new version.
    message_version: ClassVar[int] = 1

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__

    @classmethod
    def routing_key(cls) -> str:
        return f"{cls.owner}.{cls.type_name()}"

    @classmethod
    def exchange(cls) -> str:
        from .topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE

        return COMMANDS_EXCHANGE if cls.kind in ("command", "query") else EVENTS_EXCHANGE


class Command(Payload):
    kind: ClassVar[Kind] = "command"


class Event(Payload):
    kind: ClassVar[Kind] = "event"


class Query(Payload):
    """A request answered by request/reply (`reply_to` + `correlation_id`)."""

    kind: ClassVar[Kind] = "query"
    reply: ClassVar[type[Reply]]


class Reply(Payload):
    kind: ClassVar[Kind] = "reply"
    owner: ClassVar[str] = "reply"


class QueryRejected(Reply):
    """The reply to a query its handler rejected (e.g. unknown service)."""

    reason: str


class Actor(StrictModel):
    kind: Literal["user", "system", "support"] = Field(description="Who acted")
    id: ShortText = Field(description="User id, system name or support operator", examples=["u-42"])


SYSTEM = Actor(kind="system", id="palisade")

P = TypeVar("P", bound=Payload)


class EnvelopeHead(StrictModel):
    """The envelope without its payload: enough to route and decode a body."""

    message_id: uuid.UUID = Field(description="Unique per message; consumers dedupe on it")
    type: str = Field(max_length=100, description="Message type name", examples=["DomainAdded"])
    version: int = Field(1, ge=1, le=1000)
    occurred_at: AwareDatetime
    correlation_id: uuid.UUID = Field(description="Shared by every message of one user action")
    causation_id: uuid.UUID | None = Field(None, description="The message this one was caused by")
    actor: Actor
    service_id: ServiceId | None = None
    account_id: AccountId | None = None


class Envelope(EnvelopeHead, Generic[P]):
    payload: P


class _LooseHead(BaseModel):
    """Only to read `type` out of a body before the strict decode."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(max_length=100)


def new_envelope(
    payload: P,
    *,
    actor: Actor = SYSTEM,
    service_id: str | None = None,
    account_id: str | None = None,
    correlation_id: uuid.UUID | None = None,
    causation_id: uuid.UUID | None = None,
    occurred_at: datetime | None = None,
    message_id: uuid.UUID | None = None,
) -> Envelope[P]:
    mid = message_id or uuid.uuid4()
    env_cls: type[Envelope[P]] = envelope_of(type(payload))
    return env_cls(
        message_id=mid,
        type=payload.type_name(),
        version=payload.message_version,
        occurred_at=occurred_at or datetime.now(UTC),
        correlation_id=correlation_id or mid,
        causation_id=causation_id,
        actor=actor,
        service_id=service_id,
        account_id=account_id,
        payload=payload,
    )


class DecodeError(ValueError):
    """A body that is not a valid message of a known type; parked with this text."""


class Registry:
    """Message types by name. The contract's registry is `palisade_events.contract.CONTRACT`."""

    def __init__(self, types: Iterable[type[Payload]] = ()) -> None:
        self._by_name: dict[str, type[Payload]] = {}
        for t in types:
            self.register(t)

    def register(self, cls: type[P]) -> type[P]:
        name = cls.type_name()
        existing = self._by_name.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"message type {name} registered twice")
        self._by_name[name] = cls
        return cls

    def get(self, name: str) -> type[Payload] | None:
        return self._by_name.get(name)

    def __getitem__(self, name: str) -> type[Payload]:
        cls = self._by_name.get(name)
        if cls is None:
            raise KeyError(f"unknown message type {name!r}")
        return cls

    def __iter__(self) -> Iterator[type[Payload]]:
        return iter(sorted(self._by_name.values(), key=lambda c: c.routing_key()))

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def decode(self, body: bytes) -> Envelope[Payload]:
        return decode(body, self._by_name)


@cache
def envelope_of(cls: type[P]) -> type[Envelope[P]]:
    return Envelope[cls]  # type: ignore[valid-type]


def decode(body: bytes, types: dict[str, type[Payload]]) -> Envelope[Payload]:
    """Validate a body strictly against the model of its type.

    Raises DecodeError with a readable reason: not JSON, unknown type, or the
    pydantic validation errors (without input values, which may hold secrets).
    """
    try:
        head = _LooseHead.model_validate_json(body)
    except ValidationError as exc:
        raise DecodeError(f"not a Palisade envelope: {validation_summary(exc)}") from None
    cls = types.get(head.type)
    if cls is None:
        raise DecodeError(f"unknown message type {head.type!r}")
    try:
        env = envelope_of(cls).model_validate_json(body)
    except ValidationError as exc:
        raise DecodeError(f"invalid {head.type}: {validation_summary(exc)}") from None
    if env.version != cls.message_version:
        raise DecodeError(f"{head.type} version {env.version} is not supported (expected {cls.message_version})")
    return env


def validation_summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:10]:
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def encode(env: Envelope[Any]) -> bytes:
    return env.model_dump_json().encode()
