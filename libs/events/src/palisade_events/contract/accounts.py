"""Integration events about platform accounts, published by the platform's account system.

The MFA worker projects them: it needs an account's email address to send login
codes. A worker never asks another system for data; it keeps what it learned here.
Both carry the account id in the payload and should also carry it in the envelope
(`account_id`), which is what orders one account's messages.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, StringConstraints

from ..messages import Event, Payload
from ..types import AccountId

EmailAddress = Annotated[
    str,
    StringConstraints(
        min_length=3,
        max_length=254,
        # Deliberately simple: one @, no whitespace or header-breaking characters.
        pattern=r"^[^\s@<>,;:\"\\]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$",
    ),
    Field(description="The account owner's email address", examples=["ada@example.com"]),
]


class AccountRegistered(Event):
    """A platform account exists; its owner's email address is known."""

    owner: ClassVar[str] = "platform"

    account_id: AccountId
    email: EmailAddress


class AccountEmailChanged(Event):
    """The owner of an account changed (and confirmed) their email address."""

    owner: ClassVar[str] = "platform"

    account_id: AccountId
    email: EmailAddress


TYPES: tuple[type[Payload], ...] = (AccountRegistered, AccountEmailChanged)
