"""`palisade tls ...`: the dashboard's "Manage SSL Domains", from a terminal.

Commands publish, wait for the event that answers them and print the outcome; exit
code 0 done, 1 refused or failed, 2 no answer in time."""

from __future__ import annotations

import ipaddress
import json
from datetime import UTC, date, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

import typer

from palisade_events import Payload
from palisade_events.cli.commands import ask, console, report, run_with_client, send
from palisade_events.client import PalisadeClient
from palisade_events.cloudflare import CloudflareRanges, load_cloudflare_ranges, parse_cloudflare_ranges
from palisade_events.contract import tls as contract
from palisade_events.secrets import generate_key

app = typer.Typer(
    help="Custom domains and their TLS certificates (ACME), served by the VM's nginx.", no_args_is_help=True
)

ISSUANCE_OUTCOMES = (contract.CertificateIssued, contract.CertificateRenewalFailed, contract.CertificateIssuanceFailed)


@app.command()
def add(
    service_id: str,
    domain: str,
    timeout: float = typer.Option(10.0, help="Seconds to wait for each answer"),
) -> None:
    """Add a domain; prints the DNS records it needs when they are not there yet."""

    async def body(client: PalisadeClient) -> int:
        dns_outcomes = (
            contract.DomainDnsVerified,
            contract.DomainDnsPending,
            contract.DomainProxied,
            contract.DomainBlocked,
        )
        async with client.watch(*dns_outcomes) as watch:
            code, decision = await send(
                client,
                contract.DomainAdded(domain=domain),
                (contract.DomainAccepted, contract.DomainRejected),
                service_id=service_id,
                timeout=timeout,
            )
            if code != 0 or decision is None:
                return code
            try:
                dns = await watch.next(lambda e: e.correlation_id == decision.correlation_id, timeout)
            except TimeoutError:
                return 2
        report(dns)
        if isinstance(dns.payload, contract.DomainDnsPending):
            console.print("Create one of these records (a CNAME is preferred: it survives a move of the service):")
            for record in dns.payload.expected_records:
                console.print(f"  {record.name}  {record.type}  {record.value}", markup=False)
        elif isinstance(dns.payload, contract.DomainProxied):
            console.print(dns.payload.guidance, markup=False)
        return 0

    run_with_client(body)


@app.command()
def remove(service_id: str, domain: str, timeout: float = typer.Option(10.0)) -> None:
    """Remove a domain (its server block goes at once; the certificate is reissued without it)."""

    async def body(client: PalisadeClient) -> int:
        outcomes = (contract.DomainReleased, contract.DomainRemovalRejected)
        payload = contract.DomainRemoved(domain=domain)
        return (await send(client, payload, outcomes, service_id=service_id, timeout=timeout))[0]

    run_with_client(body)


@app.command("list")
def list_(service_id: str, timeout: float = typer.Option(10.0)) -> None:
    """The service's domains, their states, the DNS they need, and its certificate."""

    async def body(client: PalisadeClient) -> int:
        code, reply = await ask(client, contract.GetDomains(service_id=service_id), timeout=timeout)
        if code != 0:
            return code
        for line in describe(reply):
            console.print(line, markup=False)
        return 0

    run_with_client(body)


def describe(listing: contract.DomainList) -> list[str]:
    """The lines `list` prints (one per domain, nothing cut on a narrow terminal)."""
    port = "open" if listing.port_80_open else "CLOSED (certificates cannot be issued)"
    lines = [f"{listing.service_id} ({listing.hostname}): port 80 {port}"]
    cert = listing.certificate
    if cert is not None:
        lines.append(
            f"certificate {cert.serial}: {', '.join(cert.domains)}; expires {cert.not_after:%Y-%m-%d %H:%M}Z,"
            f" renewal from {cert.renew_at:%Y-%m-%d %H:%M}Z"
        )
    else:
        lines.append("no certificate yet")
    if listing.last_error:
        lines.append(f"last attempt failed ({listing.failures}x): {listing.last_error}")
    if listing.next_attempt_at is not None:
        lines.append(f"next attempt {listing.next_attempt_at:%Y-%m-%d %H:%M:%S}Z")
    for d in listing.domains:
        shown = d.domain if d.display == d.domain else f"{d.display} ({d.domain})"
        line = f"  {shown}  {d.state}"
        if d.kind == "hostname":
            line += "  (service hostname)"
        if d.next_dns_check_at is not None:
            line += f"  next DNS check {d.next_dns_check_at:%H:%M:%S}Z"
        if d.last_error:
            line += f"  {d.last_error}"
        lines.append(line)
        if d.state in ("pending_dns", "proxied"):
            records = " or ".join(f"{r.type} {r.value}" for r in d.expected_records)
            lines.append(f"    needs: {records}")
    return lines


@app.command()
def renew(
    service_id: str,
    domain: str | None = typer.Argument(None, help="Also give this domain another chance if it is pending or failed"),
    timeout: float = typer.Option(60.0, help="Seconds to wait for the new certificate"),
) -> None:
    """Renew the service's certificate now."""
    payload = contract.CertificateRenewalRequested(domain=domain)
    _issue_and_wait(service_id, payload, (contract.CertificateRenewalRejected,), timeout)


@app.command()
def reset(service_id: str, timeout: float = typer.Option(60.0)) -> None:
    """Set the current certificate aside and issue a fresh one (the seed's "reset SSL_DATA")."""
    _issue_and_wait(service_id, contract.SslResetRequested(), (contract.SslResetRejected,), timeout)


def _issue_and_wait(service_id: str, payload: Payload, refusals: tuple[type[Payload], ...], timeout: float) -> None:
    async def body(client: PalisadeClient) -> int:
        async with client.watch(*refusals, *ISSUANCE_OUTCOMES) as watch:
            env = await client.publish(payload, service_id=service_id)
            try:
                outcome = await watch.next(lambda e: e.correlation_id == env.correlation_id, timeout)
            except TimeoutError:
                console.print(f"[yellow]no certificate within {timeout:g}s[/yellow] (message {env.message_id})")
                return 2
        return report(outcome)

    run_with_client(body)


@app.command("generate-key")
def generate_key_(key_id: str = typer.Option("k1", help="Id stored with every ciphertext")) -> None:
    """A new PALISADE_TLS_KEY (encrypts the ACME account key and certificate keys at rest)."""
    typer.echo(generate_key(key_id))


def packaged_ranges_file() -> Path:
    return Path(str(files("palisade_events") / "data" / "cloudflare_ranges.json"))


def ranges_from_text(text: str, *, as_of: date, source: str) -> CloudflareRanges:
    """Cloudflare's ranges from the data file's JSON, or from the plain lists Cloudflare
    publishes (https://www.cloudflare.com/ips-v4 and /ips-v6, one range a line, in any
    order or concatenated): validated by the same parser the workers use."""
    stripped = text.strip()
    if stripped.startswith("{"):
        data: dict[str, Any] = json.loads(stripped)
        data.setdefault("as_of", as_of.isoformat())
        data.setdefault("source", source)
    else:
        lines = [line.split("#")[0].strip() for line in stripped.splitlines()]
        ranges = [line for line in lines if line]
        data = {
            "as_of": as_of.isoformat(),
            "source": source,
            "ipv4": [r for r in ranges if ipaddress.ip_network(r, strict=True).version == 4],
            "ipv6": [r for r in ranges if ipaddress.ip_network(r, strict=True).version == 6],
        }
    return parse_cloudflare_ranges(json.dumps(data))


def ranges_json(ranges: CloudflareRanges, note: str) -> str:
    return (
        json.dumps(
            {
                "source": ranges.source,
                "as_of": ranges.as_of.isoformat(),
                "note": note,
                "ipv4": [str(n) for n in ranges.ipv4],
                "ipv6": [str(n) for n in ranges.ipv6],
            },
            indent=2,
        )
        + "\n"
    )


@app.command("refresh-cloudflare-ranges")
def refresh_cloudflare_ranges(
    file: Path = typer.Argument(..., help="Cloudflare's lists (ips-v4 + ips-v6, one range a line) or the JSON form"),
    out: Path | None = typer.Option(None, help="Where to write; default: the data file shipped with palisade-events"),
    as_of: str | None = typer.Option(None, help="Date the lists were taken (YYYY-MM-DD); default today"),
) -> None:
    """Replace the checked-in Cloudflare ranges (never fetched at run time) with FILE's, dated."""
    target = out or packaged_ranges_file()
    try:
        when = date.fromisoformat(as_of) if as_of else datetime.now(UTC).date()
        new = ranges_from_text(
            file.read_text(),
            as_of=when,
            source="https://www.cloudflare.com/ips-v4 and https://www.cloudflare.com/ips-v6",
        )
    except (OSError, ValueError) as exc:
        console.print(f"[red]cannot use {file}[/red]: {exc}")
        raise typer.Exit(1) from None
    note = "Cloudflare's published edge ranges, checked in with the date they were last compared. Never fetched at"
    note += " run time; refresh with `palisade tls refresh-cloudflare-ranges FILE`."
    try:
        old: CloudflareRanges | None = load_cloudflare_ranges(target)
    except (OSError, ValueError):
        old = None
    target.write_text(ranges_json(new, note))
    before = {str(n) for n in old.networks} if old else set()
    after = {str(n) for n in new.networks}
    console.print(f"{target}: {len(new.ipv4)} IPv4 and {len(new.ipv6)} IPv6 ranges as of {new.as_of}", markup=False)
    for added in sorted(after - before):
        console.print(f"  + {added}", markup=False)
    for gone in sorted(before - after):
        console.print(f"  - {gone}", markup=False)
    console.print("Restart the TLS and rate-limit workers to use them.", markup=False)
