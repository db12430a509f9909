"""What every worker's `palisade <worker> ...` commands share: connect, publish a
command and wait for the event that answers it, ask a query, print the outcome.

Exit codes: 0 approved/answered, 1 rejected, 2 no answer in time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import typer
from rich.console import Console

from ..client import PalisadeClient, QueryRejectedError, QueryTimeout
from ..messages import Actor, Envelope, Payload, Query
from ..settings import RuntimeSettings

console = Console(highlight=False)
CLI_ACTOR = Actor(kind="user", id="cli")

# Events whose arrival means "no": besides every `…Rejected`.
NEGATIVE_SUFFIXES = ("Rejected", "Failed", "Halted", "Blocked")


def run_with_client(body: Callable[[PalisadeClient], Awaitable[int]], *, actor: Actor = CLI_ACTOR) -> NoReturn:
    """Connect to the broker of the environment, run `body`, exit with its code."""

    async def main() -> int:
        async with await PalisadeClient.connect(RuntimeSettings().amqp_url, actor=actor) as client:
            return await body(client)

    raise typer.Exit(asyncio.run(main()))


def report(env: Envelope[Any]) -> int:
    """Print an outcome event; 0 for a positive one, 1 for a refusal or failure."""
    reason = getattr(env.payload, "reason", None)
    if env.type.endswith(NEGATIVE_SUFFIXES):
        console.print(f"[red]{env.type}[/red]: {reason}")
        return 1
    detail = env.payload.model_dump(exclude_none=True, mode="json")
    console.print(f"[green]{env.type}[/green] {detail if detail else ''}".rstrip())
    return 0


async def send(
    client: PalisadeClient,
    payload: Payload,
    outcomes: tuple[type[Payload], ...],
    *,
    service_id: str | None = None,
    account_id: str | None = None,
    timeout: float = 10.0,
) -> tuple[int, Envelope[Any] | None]:
    """Publish `payload` and wait for the first of `outcomes` it caused; print it."""
    async with client.watch(*outcomes) as watch:
        env = await client.publish(payload, service_id=service_id, account_id=account_id)
        try:
            answer = await watch.next(lambda e: e.causation_id == env.message_id, timeout)
        except TimeoutError:
            console.print(f"[yellow]no answer to {env.type} within {timeout:g}s[/yellow] (message {env.message_id})")
            return 2, None
    return report(answer), answer


async def ask(
    client: PalisadeClient,
    query: Query,
    *,
    service_id: str | None = None,
    account_id: str | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """Ask a query; (0, reply) or (1 rejected | 2 timed out, None) with the reason printed."""
    try:
        reply = await client.request(query, service_id=service_id, account_id=account_id, timeout=timeout)
    except QueryRejectedError as exc:
        console.print(f"[red]rejected[/red]: {exc.reason}")
        return 1, None
    except QueryTimeout as exc:
        console.print(f"[yellow]{exc}[/yellow]")
        return 2, None
    return 0, reply
