"""`palisade firewall ...`: the dashboard's firewall settings, from a terminal.

`set`, `enable` and `disable` publish the change, then wait for the decision and for
the VM to enforce it; exit code 0 applied, 1 refused or failed, 2 no answer in time.

A rule is `PROTOCOL:PORTS[:SOURCES]`, e.g. `tcp:443:any`, `tcp:8000-8100`,
`udp:4242:203.0.113.0/24,2001:db8::/32`, `icmp:echo-request:any4`, `icmp::any`.
SOURCES: `any` (any IPv4 and IPv6, the default), `any4`, `any6`, or comma-separated
CIDRs/addresses.
"""

from __future__ import annotations

from typing import Annotated

import typer

from palisade_events import Payload
from palisade_events.cli.commands import ask, console, report, run_with_client
from palisade_events.client import PalisadeClient
from palisade_events.contract import firewall as fw

app = typer.Typer(help="The network firewall of a service's VM (nftables).", no_args_is_help=True)
Timeout = Annotated[float, typer.Option(help="Seconds to wait for each answer")]
_KEYWORDS = {"any": None, "any4": ["0.0.0.0/0"], "any6": ["::/0"]}


def parse_rule(text: str) -> fw.FirewallRule:
    """`PROTOCOL:PORTS[:SOURCES]` -> a rule (IPv6 sources may hold colons: they come last)."""
    protocol, _, rest = text.strip().partition(":")
    ports, _, sources_text = rest.partition(":")
    protocol = protocol.lower()
    if protocol not in ("tcp", "udp", "icmp"):
        raise typer.BadParameter(f"{text!r}: the protocol is tcp, udp or icmp")
    sources: list[str] | None
    if sources_text.strip().lower() in _KEYWORDS:
        sources = _KEYWORDS[sources_text.strip().lower()]
    elif sources_text.strip() == "":
        sources = None
    else:
        sources = []
        for part in sources_text.split(","):
            keyword = part.strip().lower()
            if keyword in _KEYWORDS:
                sources += _KEYWORDS[keyword] or ["0.0.0.0/0", "::/0"]
            elif part.strip():
                sources.append(part.strip())
    if protocol == "icmp":
        kind = ports.strip() or None
        return fw.FirewallRule(protocol="icmp", icmp_type=None if kind == "any" else kind, sources=sources)
    return fw.FirewallRule(protocol=protocol, ports=ports.strip() or None, sources=sources)  # type: ignore[arg-type]


def _describe(rule: fw.FirewallRuleView) -> str:
    what = rule.ports if rule.protocol != "icmp" else (rule.icmp_type or "all types")
    names = {"0.0.0.0/0": "Any IPv4 address", "::/0": "Any IPv6 address"}
    return f"INPUT  {rule.protocol:<5} {what:<12} {' , '.join(names.get(s, s) for s in rule.sources)}"


async def _change(client: PalisadeClient, payload: Payload, service_id: str, timeout: float) -> int:
    decisions = (fw.FirewallRulesReplaced, fw.FirewallEnabled, fw.FirewallDisabled, fw.FirewallChangeRejected)
    outcomes = (fw.FirewallApplied, fw.FirewallApplyFailed)
    async with client.watch(*decisions, *outcomes) as watch:
        env = await client.publish(payload, service_id=service_id)
        try:
            decision = await watch.next(
                lambda e: e.causation_id == env.message_id and e.type in _names(decisions), timeout
            )
        except TimeoutError:
            console.print(f"[yellow]no answer to {env.type} within {timeout:g}s[/yellow] (message {env.message_id})")
            return 2
        if report(decision) != 0:
            detail = getattr(decision.payload, "detail", None)
            if detail:
                console.print(detail, markup=False)
            return 1
        console.print("applying on the VM …")
        try:
            applied = await watch.next(
                lambda e: e.correlation_id == env.correlation_id and e.type in _names(outcomes), timeout
            )
        except TimeoutError:
            console.print(f"[yellow]the VM did not confirm within {timeout:g}s; the apply is retried[/yellow]")
            return 2
    code = report(applied)
    if code and applied.payload.detail:
        console.print(applied.payload.detail, markup=False)
    return code


def _names(types: tuple[type[Payload], ...]) -> set[str]:
    return {t.type_name() for t in types}


@app.command()
def show(service_id: str, timeout: Timeout = 10.0) -> None:
    """The service's firewall: on or off, its rules, and what the VM enforces."""

    async def body(client: PalisadeClient) -> int:
        code, reply = await ask(client, fw.GetFirewall(service_id=service_id), service_id=service_id, timeout=timeout)
        if code != 0:
            return code
        state: fw.FirewallState = reply
        status = "enabled" if state.enabled else "[red]disabled[/red] (the VM accepts everything)"
        console.print(f"[bold]{service_id}[/bold]: firewall {status}, version {state.version}, {state.state}")
        applied = state.applied_at.isoformat(timespec="seconds") if state.applied_at else "never"
        console.print(f"in force: version {state.applied_version}, {state.applied_checksum or '-'}, at {applied}")
        console.print(f"port 80 open: {'yes' if state.port_80_open else 'no'}; TLS domains: {state.tls_domains}")
        if state.last_error:
            console.print(f"last error: {state.last_error}", markup=False)
        for rule in state.rules:
            console.print(_describe(rule), markup=False)
        return 0

    run_with_client(body)


@app.command("set")
def set_(
    service_id: str,
    rule: Annotated[list[str], typer.Option("--rule", help="PROTOCOL:PORTS[:SOURCES], repeated; the whole set")],
    expected_version: Annotated[
        int | None, typer.Option(help="The version you edited (default: the current one, from `show`)")
    ] = None,
    acknowledge_tls_impact: Annotated[
        bool, typer.Option("--acknowledge-tls-impact", help="Close 80/tcp even though the service has TLS domains")
    ] = False,
    timeout: Timeout = 30.0,
) -> None:
    """Replace the service's rules ("Apply Changes")."""
    rules = [parse_rule(r) for r in rule]

    async def body(client: PalisadeClient) -> int:
        version = expected_version
        if version is None:
            code, reply = await ask(client, fw.GetFirewall(service_id=service_id), service_id=service_id)
            if code != 0:
                return code
            version = reply.version
        payload = fw.FirewallRulesReplaceRequested(
            rules=rules, expected_version=version, acknowledge_tls_impact=acknowledge_tls_impact
        )
        return await _change(client, payload, service_id, timeout)

    run_with_client(body)


@app.command()
def enable(
    service_id: str,
    acknowledge_tls_impact: Annotated[bool, typer.Option("--acknowledge-tls-impact")] = False,
    timeout: Timeout = 30.0,
) -> None:
    """Enable the firewall with the software's default rules."""
    payload = fw.FirewallEnableRequested(acknowledge_tls_impact=acknowledge_tls_impact)
    run_with_client(lambda client: _change(client, payload, service_id, timeout))


@app.command()
def disable(service_id: str, timeout: Timeout = 30.0) -> None:
    """Disable the firewall: its rules are deleted and the VM accepts everything."""
    console.print("[yellow]Disabling the firewall deletes its rules.[/yellow]")
    run_with_client(lambda client: _change(client, fw.FirewallDisableRequested(), service_id, timeout))
