"""`palisade testvm up NAME | down NAME... | list`: real small VMs for demos and
manual tests (network namespaces; needs root)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

# Through the package, whose members load on first use: every `palisade` call loads this plugin
# to know its commands, and the harness (asyncssh under it) is a quarter of a second.
from .. import testvm as harness

app = typer.Typer(
    help="Test VMs: a network namespace with its own sshd, nginx and nftables (root only).",
    no_args_is_help=True,
)
RootOption = Annotated[
    Path | None,
    typer.Option("--root", help="Directory of the test VMs (default: $PALISADE_TESTVM_ROOT or /run/palisade-testvm)"),
]


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _fail(message: str) -> None:
    Console(stderr=True, highlight=False).print(f"[bold red]error:[/bold red] {message}")
    raise typer.Exit(1)


@app.command()
def up(
    name: Annotated[str, typer.Argument(help="VM name: lowercase letters, digits, '-'")],
    automation_key: Annotated[
        Path | None,
        typer.Option(help="Private key to authorize as Palisade's automation key (default: a new pair in the VM)"),
    ] = None,
    authorized_key: Annotated[
        list[str] | None, typer.Option(help="Another public key line for root's authorized_keys (repeatable)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the VM as JSON")] = False,
    owner: Annotated[
        str, typer.Option(help="Recorded owner; 'pytest-PID' VMs are removed once that process is gone")
    ] = "cli",
    root: RootOption = None,
) -> None:
    """Create and start a test VM; prints its address, host key and automation key."""
    try:
        vm = asyncio.run(
            harness.up(
                name, root=root, automation_key=automation_key, authorized_keys=authorized_key or [], owner=owner
            )
        )
    except harness.VmError as exc:
        _fail(str(exc))
        return
    out = _console()
    if as_json:
        out.print_json(json.dumps(vm.to_json()))
        return
    out.print(f"[green]up[/green] {vm.name}: {vm.address} (namespace {vm.namespace}, files {vm.dir})")
    out.print(f"ssh endpoint for ServiceProvisioned: {json.dumps(vm.ssh_endpoint())}")
    out.print(f"host key fingerprint: {vm.host_key_fingerprint}")
    out.print(f"automation key: {vm.automation_key}")
    out.print(f"login: ssh -i {vm.automation_key} -o UserKnownHostsFile=/dev/null root@{vm.address}  (check the key)")
    out.print(f"worker setting: PALISADE_HOSTCTL_TESTVM_ROOT={vm.root}")


@app.command()
def down(
    names: Annotated[list[str], typer.Argument(help="VM names")],
    root: RootOption = None,
) -> None:
    """Stop and remove test VMs: processes, namespace, veth pair, files."""

    async def main() -> list[tuple[str, bool]]:
        found = await asyncio.gather(*(harness.down(n, root=root) for n in names))
        return list(zip(names, found, strict=True))

    try:
        results = asyncio.run(main())
    except harness.VmError as exc:
        _fail(str(exc))
        return
    out = _console()
    for name, found in results:
        out.print(f"[green]down[/green] {name}" if found else f"[yellow]no such VM[/yellow] {name}")


@app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines")] = False,
    root: RootOption = None,
) -> None:
    """List the test VMs under the root."""
    vms = harness.list_vms(root)
    out = _console()
    if as_json:
        for vm in vms:
            out.print(json.dumps({**vm.to_json(), "alive": harness.is_alive(vm)}))
        return
    if not vms:
        out.print("no test VMs")
        return
    table = Table("name", "address", "state", "owner", "host key", "dir")
    for vm in vms:
        state = vm.state if harness.is_alive(vm) else f"{vm.state} (not running)"
        table.add_row(vm.name, vm.address, state, vm.owner, vm.host_key_fingerprint, str(vm.dir))
    out.print(table)
