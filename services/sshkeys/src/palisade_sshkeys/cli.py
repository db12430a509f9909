"""`palisade sshkeys ...`: the dashboard's "Manage SSH Keys", from a terminal.

`add` and `remove` publish the change, then wait for the decision and for the
write to the VM; exit code 0 written, 1 refused or failed, 2 no answer in time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from palisade_events import Payload
from palisade_events.cli.commands import ask, console, report, run_with_client, send
from palisade_events.client import PalisadeClient
from palisade_events.contract import sshkeys as sk

app = typer.Typer(help="SSH keys allowed on a service's VM (root's authorized_keys).", no_args_is_help=True)
Timeout = Annotated[float, typer.Option(help="Seconds to wait for each answer")]
WRITTEN = (sk.SshKeysApplied, sk.SshKeysApplyFailed)


async def _change(
    client: PalisadeClient, payload: Payload, service_id: str, decisions: tuple[type[Payload], ...], timeout: float
) -> int:
    async with client.watch(*WRITTEN) as written:
        code, decision = await send(client, payload, decisions, service_id=service_id, timeout=timeout)
        if code != 0 or decision is None:
            return code
        console.print("writing to the VM …")
        try:
            outcome = await written.next(lambda e: e.correlation_id == decision.correlation_id, timeout)
        except TimeoutError:
            console.print(f"[yellow]the VM was not written within {timeout:g}s; the write is retried[/yellow]")
            return 2
    return report(outcome)


@app.command()
def add(
    service_id: str,
    title: Annotated[str, typer.Option("--title", help="The key's name (at most 100 characters)")],
    key_file: Annotated[Path, typer.Option("--key-file", help="Public key file, e.g. ~/.ssh/id_ed25519.pub")],
    timeout: Timeout = 30.0,
) -> None:
    """Allow a public key on the service's VM."""
    try:
        public_key = key_file.expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        console.print(f"[red]cannot read {key_file}[/red]: {exc}")
        raise typer.Exit(1) from None
    payload = sk.SshKeyAdded(title=title, public_key=public_key)
    decisions = (sk.SshKeyAccepted, sk.SshKeyRejected)
    run_with_client(lambda client: _change(client, payload, service_id, decisions, timeout))


@app.command()
def remove(service_id: str, fingerprint: str, timeout: Timeout = 30.0) -> None:
    """Remove a key (by its SHA256 fingerprint, as `list` shows it)."""
    payload = sk.SshKeyRemoved(fingerprint=fingerprint)
    decisions = (sk.SshKeyRemovalAccepted, sk.SshKeyRemovalRejected)
    run_with_client(lambda client: _change(client, payload, service_id, decisions, timeout))


@app.command("list")
def list_(service_id: str, timeout: Timeout = 10.0) -> None:
    """The service's keys and whether its VM has them."""

    async def body(client: PalisadeClient) -> int:
        code, reply = await ask(client, sk.ListSshKeys(service_id=service_id), service_id=service_id, timeout=timeout)
        if reply is None:
            return code
        console.print(f"[bold]{service_id}[/bold]: {reply.state}; automation key {reply.automation_fingerprint}")
        if reply.last_error:
            console.print(f"last error: {reply.last_error}", markup=False)
        if not reply.keys:
            console.print("No Keys Found")
        # One line per key, like `ssh-keygen -l`: nothing is cut on a narrow terminal.
        for key in reply.keys:
            added = key.added_at.isoformat(timespec="seconds")
            console.print(f"{key.bits} {key.fingerprint} {key.title} ({key.algorithm}, added {added})", markup=False)
        return 0

    run_with_client(body)
