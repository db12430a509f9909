"""The audit record: one per decision, published on `palisade.audit`."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from .messages import Actor
from .types import AccountId, ServiceId

Outcome = Literal["accepted", "rejected", "failed"]
DetailValue = Annotated[str, StringConstraints(max_length=500)] | int | bool | None


class AuditRecord(BaseModel):
    """Body of every message on `palisade.audit`, routing key `<worker>.<action>.<outcome>`."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    audit_id: uuid.UUID = Field(description="Unique id of this record")
    occurred_at: AwareDatetime
    worker: str = Field(max_length=40, examples=["lifecycle"])
    action: str = Field(max_length=100, description="The message type decided on", examples=["ServiceDeleteRequested"])
    outcome: Outcome
    reason: str | None = Field(None, max_length=2000, description="Why, for rejected and failed")
    message_id: uuid.UUID | None = Field(None, description="The command (or message) decided on")
    correlation_id: uuid.UUID | None = None
    actor: Actor | None = None
    service_id: ServiceId | None = None
    account_id: AccountId | None = None
    detail: dict[Annotated[str, StringConstraints(max_length=64)], DetailValue] = Field(
        default_factory=dict, max_length=32, description="Small non-secret facts about the decision"
    )

    def routing_key(self) -> str:
        return f"{self.worker}.{self.action}.{self.outcome}"
