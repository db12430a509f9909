"""`palisade lifecycle ...`: the dashboard's buttons, from a terminal.

Each command publishes, then waits for the event that answers it and prints the
outcome; exit code 0 approved, 1 rejected, 2 no answer in time."""

from __future__ import annotations

import typer
from rich.table import Table

from palisade_events import Payload
from palisade_events.cli.commands import ask, console, report, run_with_client, send
from palisade_events.client import PalisadeClient
from palisade_events.contract import lifecycle as lc

app = typer.Typer(
    help="Termination protection, deletion with its 7-day backup grace period, restores.", no_args_is_help=True
)


@app.command()
def protect(
    service_id: str,
    on: bool = typer.Option(..., "--on/--off", help="Turn termination protection on or off"),
    timeout: float = typer.Option(10.0, help="Seconds to wait for the outcome"),
) -> None:
    """Turn termination protection on or off."""
    payload: Payload = lc.TerminationProtectionEnableRequested() if on else lc.TerminationProtectionDisableRequested()
    outcomes = (
        lc.TerminationProtectionEnabled,
        lc.TerminationProtectionDisabled,
        lc.TerminationProtectionChangeRejected,
    )

    async def body(client: PalisadeClient) -> int:
        return (await send(client, payload, outcomes, service_id=service_id, timeout=timeout))[0]

    run_with_client(body)


@app.command()
def delete(
    service_id: str,
    confirm: str = typer.Option(..., "--confirm", help="The service name, typed to confirm"),
    no_backup: bool = typer.Option(False, "--no-backup", help="Delete all backups now instead of keeping one 7 days"),
    timeout: float = typer.Option(60.0, help="Seconds to wait for termination to be approved"),
) -> None:
    """Delete a service (by default after a backup that is kept 7 days)."""
    payload = lc.ServiceDeleteRequested(confirm_name=confirm, keep_backup=not no_backup)
    outcomes = (lc.BackupRequested, lc.ServiceTerminationApproved, lc.ServiceDeleteRejected)
    final = (lc.ServiceTerminationApproved, lc.ServiceDeletionHalted, lc.BackupRetained)

    async def body(client: PalisadeClient) -> int:
        async with client.watch(*final) as watch:
            code, first = await send(client, payload, outcomes, service_id=service_id, timeout=timeout)
            if code != 0 or first is None or first.type != "BackupRequested":
                return code
            console.print("waiting for the pre-deletion backup …")
            try:
                done = await watch.next(
                    lambda e: e.correlation_id == first.correlation_id and e.type != "BackupRetained", timeout
                )
            except TimeoutError:
                console.print(f"[yellow]backup not finished within {timeout:g}s; the deletion goes on[/yellow]")
                return 2
            code = report(done)
            if code == 0:
                retained = await watch.next(lambda e: e.correlation_id == first.correlation_id, timeout)
                report(retained)
            return code

    run_with_client(body)


@app.command()
def restore(service_id: str, backup_id: str, timeout: float = typer.Option(10.0)) -> None:
    """Restore a backup (a retained one only inside its grace period)."""
    outcomes = (lc.BackupRestoreApproved, lc.BackupRestoreRejected)

    async def body(client: PalisadeClient) -> int:
        restore = lc.BackupRestoreRequested(backup_id=backup_id)
        return (await send(client, restore, outcomes, service_id=service_id, timeout=timeout))[0]

    run_with_client(body)


@app.command()
def status(service_id: str, timeout: float = typer.Option(10.0)) -> None:
    """Show protection, deletion state and backups with their purge time."""

    async def body(client: PalisadeClient) -> int:
        code, reply = await ask(
            client, lc.LifecycleStatus(service_id=service_id), service_id=service_id, timeout=timeout
        )
        if reply is None:
            return code
        console.print(
            f"[bold]{reply.name}[/bold] ({reply.service_id}): state {reply.state}, "
            f"protection {'on' if reply.protection else 'off'}, deletion {reply.deletion}"
        )
        if reply.backups:
            table = Table("backup", "state", "purge at")
            for b in reply.backups:
                table.add_row(b.backup_id, b.state, b.purge_at.isoformat() if b.purge_at else "-")
            console.print(table)
        return 0

    run_with_client(body)
