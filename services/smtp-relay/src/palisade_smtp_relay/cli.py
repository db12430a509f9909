"""`palisade smtp ...`: a service's relay status, and lifting a suspension.

Exit codes: 0 done, 1 rejected, 2 no answer in time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import typer
from rich.console import Console

from palisade_events import Actor, RuntimeSettings
from palisade_events.amqp import PublishError
from palisade_events.client import PalisadeClient, QueryRejectedError, QueryTimeout
from palisade_events.contract import smtp as contract

app = typer.Typer(help="The SMTP relay: quota and suspension of a service.", no_args_is_help=True)
console = Console()
ACTOR = Actor(kind="support", id="cli")


def _run(body: Callable[[PalisadeClient], Awaitable[int]]) -> None:
    async def main() -> int:
        async with await PalisadeClient.connect(RuntimeSettings().amqp_url, actor=ACTOR) as client:
            try:
                return await body(client)
            except PublishError as exc:  # e.g. no smtp-relay has declared its queue yet
                console.print(f"[red]not sent[/red]: {exc}")
                return 1

    raise typer.Exit(asyncio.run(main()))


@app.command()
def status(service_id: str, timeout: float = typer.Option(10.0, help="Seconds to wait for the answer")) -> None:
    """Show the service's sender address, suspension and quota use."""

    async def body(client: PalisadeClient) -> int:
        try:
            reply: contract.RelayStatusReply = await client.request(
                contract.RelayStatus(service_id=service_id), service_id=service_id, timeout=timeout
            )
        except QueryRejectedError as exc:
            console.print(f"[red]rejected[/red]: {exc.reason}")
            return 1
        except QueryTimeout as exc:
            console.print(f"[yellow]{exc}[/yellow]")
            return 2
        state = "[red]suspended[/red]" if reply.suspended else "[green]active[/green]"
        console.print(f"[bold]{reply.service_id}[/bold] sends as {reply.sender} from {reply.private_ip}: {state}")
        wait = f", next slot in {reply.next_slot_seconds}s" if reply.next_slot_seconds is not None else ""
        console.print(
            f"quota {reply.quota_used}/{reply.quota_limit} in the last {reply.window_seconds}s{wait};"
            f" marketing violations in 24 h: {reply.violations_24h}"
        )
        return 0

    _run(body)


@app.command()
def lift(
    service_id: str,
    note: str | None = typer.Option(None, help="Why (e.g. the support ticket)"),
    timeout: float = typer.Option(10.0, help="Seconds to wait for the outcome"),
) -> None:
    """Lift a relay suspension (support)."""

    async def body(client: PalisadeClient) -> int:
        outcomes = (contract.RelayAccessRestored, contract.RelaySuspensionLiftRejected)
        async with client.watch(*outcomes) as watch:
            env = await client.publish(contract.RelaySuspensionLifted(note=note), service_id=service_id)
            try:
                answer = await watch.next(lambda e: e.causation_id == env.message_id, timeout)
            except TimeoutError:
                console.print(f"[yellow]no answer within {timeout:g}s[/yellow] (message {env.message_id})")
                return 2
        if isinstance(answer.payload, contract.RelaySuspensionLiftRejected):
            console.print(f"[red]rejected[/red]: {answer.payload.reason}")
            return 1
        console.print(f"[green]relay access restored[/green] for {service_id}")
        return 0

    _run(body)
