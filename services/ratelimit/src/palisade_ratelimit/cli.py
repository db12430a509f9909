"""`palisade ratelimit ...`: the dashboard's "Rate Limiter", "Output Cache" and "Nginx
Configuration — Show Config", from a terminal.

`set` and `cache` publish the change, then wait for the decision and for the apply to
the VM's nginx; exit code 0 applied, 1 refused or failed, 2 no answer in time."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from palisade_events import Payload
from palisade_events.cli.commands import ask, console, report, run_with_client
from palisade_events.client import PalisadeClient
from palisade_events.contract import ratelimit as rl

app = typer.Typer(
    help="Per-IP request limit and output cache of a service's web traffic (its VM's nginx).", no_args_is_help=True
)
Timeout = Annotated[float, typer.Option(help="Seconds to wait for each answer")]


async def _change(client: PalisadeClient, payload: Payload, service_id: str, timeout: float) -> int:
    """Publish, print the decision, then wait for the apply of the same user action."""
    async with client.watch(
        rl.WebPolicyUpdated, rl.WebPolicyRejected, rl.WebPolicyApplied, rl.WebPolicyApplyFailed
    ) as watch:
        env = await client.publish(payload, service_id=service_id)
        try:
            decision = await watch.next(lambda e: e.causation_id == env.message_id, timeout)
        except TimeoutError:
            console.print(f"[yellow]no answer to {env.type} within {timeout:g}s[/yellow] (message {env.message_id})")
            return 2
        if report(decision) != 0:
            return 1
        console.print("applying to the VM's nginx …")
        try:
            applied = await watch.next(
                lambda e: (
                    e.correlation_id == env.correlation_id and e.type in ("WebPolicyApplied", "WebPolicyApplyFailed")
                ),
                timeout,
            )
        except TimeoutError:
            console.print(f"[yellow]not applied within {timeout:g}s; it is retried[/yellow]")
            return 2
    if applied.type == "WebPolicyApplyFailed":
        console.print(f"[red]WebPolicyApplyFailed[/red]: {applied.payload.reason} {applied.payload.detail or ''}")
        return 1
    return report(applied)


async def _current(client: PalisadeClient, service_id: str, timeout: float) -> tuple[int, rl.WebPolicyDetails | None]:
    code, reply = await ask(client, rl.GetWebPolicy(service_id=service_id), service_id=service_id, timeout=timeout)
    return code, reply


@app.command("set")
def set_(
    service_id: str,
    requests: Annotated[int | None, typer.Option(min=1, max=rl.MAX_REQUESTS, help="Requests per period and IP")] = None,
    per: Annotated[str, typer.Option(help="second or minute")] = "minute",
    off: Annotated[bool, typer.Option("--off", help="Turn the limit off (the numbers are kept)")] = False,
    timeout: Timeout = 30.0,
) -> None:
    """Set the rate limit, e.g. `--requests 500 --per minute`, or turn it off with `--off`."""
    if per not in ("second", "minute"):
        console.print(f"[red]--per must be second or minute[/red], not {per!r}")
        raise typer.Exit(1)
    if requests is None and not off:
        console.print("[red]give --requests N (and --per), or --off[/red]")
        raise typer.Exit(1)
    period: Literal["second", "minute"] = "second" if per == "second" else "minute"

    async def body(client: PalisadeClient) -> int:
        if requests is None:  # --off alone: keep the numbers the service has
            code, current = await _current(client, service_id, timeout)
            if current is None:
                return code
            limit = current.rate_limit
            payload = rl.RateLimitConfigured(requests=limit.requests, per=limit.per, enabled=False)
        else:
            payload = rl.RateLimitConfigured(requests=requests, per=period, enabled=not off)
        return await _change(client, payload, service_id, timeout)

    run_with_client(body)


@app.command()
def cache(
    service_id: str,
    ttl: Annotated[int | None, typer.Option(min=0, max=rl.MAX_TTL_SECONDS, help="Seconds a GET is cached")] = None,
    off: Annotated[bool, typer.Option("--off", help="Turn the output cache off (the TTL is kept)")] = False,
    timeout: Timeout = 30.0,
) -> None:
    """Set the output cache, e.g. `--ttl 3`, or turn it off with `--off`."""
    if ttl is None and not off:
        console.print("[red]give --ttl SECONDS, or --off[/red]")
        raise typer.Exit(1)

    async def body(client: PalisadeClient) -> int:
        if ttl is None:
            code, current = await _current(client, service_id, timeout)
            if current is None:
                return code
            payload = rl.OutputCacheConfigured(ttl_seconds=current.output_cache.ttl_seconds, enabled=False)
        else:
            payload = rl.OutputCacheConfigured(ttl_seconds=ttl, enabled=not off)
        return await _change(client, payload, service_id, timeout)

    run_with_client(body)


@app.command()
def show(
    service_id: str,
    config: Annotated[bool, typer.Option("--config/--no-config", help="Print the rendered nginx files")] = True,
    timeout: Timeout = 10.0,
) -> None:
    """The service's rate limit and output cache, and the nginx configuration they render to."""

    async def body(client: PalisadeClient) -> int:
        code, reply = await _current(client, service_id, timeout)
        if reply is None:
            return code
        limit, out = reply.rate_limit, reply.output_cache
        rate = f"{limit.requests} per {limit.per} per IP"
        rate += f" (burst {reply.burst}, Retry-After {reply.retry_after_seconds}s)"
        console.print(f"[bold]{service_id}[/bold]: policy version {reply.version}, {reply.state}")
        console.print(f"rate limit:   {rate if limit.enabled else 'off (' + rate + ')'}")
        cached = f"GET/HEAD cached {out.ttl_seconds}s"
        console.print(f"output cache: {cached if out.enabled and out.ttl_seconds else 'off (' + cached + ')'}")
        if reply.last_error:
            console.print(f"last error: {reply.last_error}", markup=False)
        if config:
            for f in reply.files:
                console.print(f"\n[bold]# {f.path}[/bold]")
                console.print(f.content, markup=False, end="")
        return 0

    run_with_client(body)
