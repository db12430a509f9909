"""The `palisade` command: publish messages, tail the audit stream, look at and
replay parked messages, run and migrate workers, export the contract.

Settings come from the environment (`PALISADE_AMQP_URL`, `PALISADE_DATABASE_URL`,
...; see `RuntimeSettings`); `--amqp-url` overrides the broker for one call.
Exit codes: 0 done, 1 failed (one line on stderr says why), 2 wrong usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import aio_pika
import typer
import uvloop
from rich.console import Console
from rich.text import Text

from .. import topology
from ..amqp import PublishError, connect
from ..audit import AuditRecord
from ..audit_stream import AuditFilter, AuditStreamMissingError, AuditTail, StartAt
from ..contract import CONTRACT
from ..dead import DeadQueueError, ParkedMessage, list_parked, replay_parked
from ..settings import RuntimeSettings
from .publish import CliError, parse_actor, payload_json, publish_command
from .supervisor import Supervisor

T = TypeVar("T")

app = typer.Typer(
    name="palisade",
    help="Operate Palisade: publish, audit, parked messages, workers, contract.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals hold URLs with passwords
    rich_markup_mode="markdown",
)
audit_app = typer.Typer(help="The audit stream (every decision of every worker).", no_args_is_help=True)
dead_app = typer.Typer(help="Parked messages: what a worker gave up on, and why.", no_args_is_help=True)
schema_app = typer.Typer(help="The contract, for systems that talk to Palisade.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(dead_app, name="dead")
app.add_typer(schema_app, name="schema")

# Packages add command groups of their own (`palisade lifecycle protect ...`) by naming
# a typer app in this entry-point group.
PLUGIN_GROUP = "palisade.cli"


@dataclass(frozen=True)
class Options:
    amqp_url: str | None = None

    def settings(self) -> RuntimeSettings:
        if self.amqp_url is not None:
            return RuntimeSettings(amqp_url=self.amqp_url)
        return RuntimeSettings()


def _stdout() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _options(ctx: typer.Context) -> Options:
    return ctx.obj if isinstance(ctx.obj, Options) else Options()


def _fail(message: str) -> NoReturn:
    _stderr().print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(1)


def _quiet_amqp_logs() -> None:
    # The CLI reports a broker failure itself, in one line.
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's async part; expected failures become one line and exit 1."""
    try:
        return asyncio.run(coro)
    except (CliError, DeadQueueError, AuditStreamMissingError, PublishError) as exc:
        _fail(str(exc))
    except aio_pika.exceptions.AMQPConnectionError as exc:
        _fail(f"cannot connect to RabbitMQ: {exc}")
    except OSError as exc:
        _fail(f"connection failed: {exc}")


@app.callback()
def main(
    ctx: typer.Context,
    amqp_url: Annotated[
        str | None,
        typer.Option("--amqp-url", help="RabbitMQ URL (default: $PALISADE_AMQP_URL or the local broker)"),
    ] = None,
) -> None:
    ctx.obj = Options(amqp_url=amqp_url)


# --------------------------------------------------------------------- publish


@app.command()
def publish(
    ctx: typer.Context,
    type_name: Annotated[str, typer.Argument(metavar="TYPE", help="Message type, e.g. ServiceDeleteRequested")],
    payload: Annotated[str | None, typer.Option("--json", help="The payload as a JSON object")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read the payload from a file ('-' = stdin)")
    ] = None,
    assignments: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="field=value on top of the payload (repeatable; dotted paths; JSON values)"),
    ] = None,
    service_id: Annotated[
        str | None, typer.Option(help="Envelope service_id (default: the payload's service_id)")
    ] = None,
    account_id: Annotated[
        str | None, typer.Option(help="Envelope account_id (default: the payload's account_id)")
    ] = None,
    actor: Annotated[str, typer.Option(help="Who acts, kind:id (kind: user, system, support)")] = "system:palisade-cli",
    correlation_id: Annotated[str | None, typer.Option(help="Join an existing flow (default: a new one)")] = None,
) -> None:
    """Publish one command, query or event, validated against the contract first.

    Prints the message id. Fails (exit 1) on an unknown type, an invalid payload, or
    a publish the broker does not take (no queue bound for the routing key: the
    owning worker was never started or migrated)."""
    _quiet_amqp_logs()
    if payload is not None and file is not None:
        _fail("give the payload with --json or --file, not both")
    text = payload
    if file is not None:
        try:
            text = sys.stdin.read() if str(file) == "-" else file.read_text()
        except OSError as exc:
            _fail(f"cannot read {file}: {exc.strerror}")
    if text is None and not assignments:
        _fail("no payload: give --json, --file or --set")
    try:
        corr = uuid.UUID(correlation_id) if correlation_id is not None else None
    except ValueError:
        _fail(f"--correlation-id {correlation_id!r} is not a UUID")
    try:
        body = payload_json(text, assignments or ())
        who = parse_actor(actor)
    except CliError as exc:
        _fail(str(exc))
    env = _run(
        publish_command(
            CONTRACT,
            type_name,
            body,
            amqp_url=_options(ctx).settings().amqp_url,
            actor=who,
            service_id=service_id,
            account_id=account_id,
            correlation_id=corr,
        )
    )
    typer.echo(str(env.message_id))


# ------------------------------------------------------------------- audit tail

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_OUTCOME_STYLE = {"accepted": "green", "rejected": "yellow", "failed": "bold red"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`30s`, `15m`, `2h`, `7d` ago, or an ISO 8601 time (UTC if no zone is given)."""
    now = now or datetime.now(UTC)
    if m := _DURATION.match(text.strip()):
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected e.g. 15m, 2h, 7d or 2025-01-31T12:00") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def render_record(record: AuditRecord) -> Text:
    when = record.occurred_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return Text.assemble(
        (when, "dim"),
        "  ",
        (record.worker, "cyan"),
        "  ",
        (record.action, "bold"),
        "  ",
        (record.outcome, _OUTCOME_STYLE.get(record.outcome, "")),
        "  ",
        record.reason or "-",
        "  ",
        (record.service_id or "-", "magenta"),
    )


@audit_app.command("tail")
def audit_tail(
    ctx: typer.Context,
    worker: Annotated[list[str] | None, typer.Option("--worker", "-w", help="Only this worker (repeatable)")] = None,
    service_id: Annotated[str | None, typer.Option(help="Only records about this service")] = None,
    outcome: Annotated[list[str] | None, typer.Option(help="Only accepted, rejected or failed (repeatable)")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-F", help="Keep printing new records until Ctrl-C")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per line")] = False,
    limit: Annotated[int, typer.Option("--limit", "-n", min=0, help="How many past records to show")] = 20,
    since: Annotated[
        str | None, typer.Option(help="Read history from this point only: 15m, 2h, 7d or an ISO time")
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds without a record after which the history counts as read")
    ] = 5.0,
) -> None:
    """Show the last audit records, from the stream `palisade.audit.log`.

    The history is read backwards from the end, only as far as the answer needs; a
    filter that matches little may read the whole stream, which `--since` bounds."""
    _quiet_amqp_logs()
    for o in outcome or ():
        if o not in _OUTCOME_STYLE:
            raise typer.BadParameter(f"{o!r}: expected accepted, rejected or failed", param_hint="--outcome")
    start: StartAt = parse_since(since) if since else ("next" if follow and limit == 0 else "last")
    audit_filter = AuditFilter.of(worker or (), service_id, outcome or ())
    out = _stdout()

    def show(record: AuditRecord) -> None:
        if as_json:
            sys.stdout.write(record.model_dump_json() + "\n")
            sys.stdout.flush()
        else:
            out.print(render_record(record))

    async def tail() -> None:
        connection = await connect(_options(ctx).settings().amqp_url)
        try:
            async with AuditTail(connection, audit_filter, start=start) as reader:
                if start != "next":
                    for record in await reader.catch_up(limit=limit, timeout=timeout):
                        show(record)
                if not follow:
                    return
                stop = _stop_on_signals()
                _stderr().print(Text(f"following {topology.AUDIT_LOG} (Ctrl-C to stop)", style="dim"))

                async def print_new() -> None:
                    async for record in reader.follow():
                        show(record)

                printer = asyncio.ensure_future(print_new())
                await asyncio.wait({printer, stop}, return_when=asyncio.FIRST_COMPLETED)
                printer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await printer
        finally:
            await connection.close()

    _run(tail())


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _stop_on_signals() -> asyncio.Future[None]:
    """A future set by SIGINT/SIGTERM, so following ends with exit code 0."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _settle, stop)
    return stop


# ---------------------------------------------------------------- dead letters


def render_parked(worker: str, parked: list[ParkedMessage]) -> Text:
    """One block per message, readable at any terminal width."""
    text = Text.assemble((f"{topology.dead_queue(worker)}: {len(parked)} parked", "bold"))
    for p in parked:
        attempts = "-" if p.attempts is None else str(p.attempts)
        text.append("\n\n")
        text.append(p.message_id or "(no message id)", style="cyan")
        text.append(f"  {p.type or '(no type)'}  attempts {attempts}  routing key {p.routing_key or '-'}")
        text.append("\n    ")
        text.append(p.error or "(no error recorded)", style="red")
    return text


@dead_app.command("list")
def dead_list(
    ctx: typer.Context,
    worker: Annotated[str, typer.Argument(help="Worker name, e.g. tls")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per message")] = False,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Show at most this many")] = None,
) -> None:
    """Show the parked messages of a worker (the queue is left untouched)."""
    _quiet_amqp_logs()

    async def go() -> list[ParkedMessage]:
        connection = await connect(_options(ctx).settings().amqp_url)
        try:
            return await list_parked(connection, worker, limit=limit)
        finally:
            await connection.close()

    parked = _run(go())
    if as_json:
        for p in parked:
            typer.echo(json.dumps(p.as_json()))
    else:
        _stdout().print(render_parked(worker, parked))


@dead_app.command("replay")
def dead_replay(
    ctx: typer.Context,
    worker: Annotated[str, typer.Argument(help="Worker name, e.g. tls")],
    message_id: Annotated[str | None, typer.Option("--id", help="Only this message; the others stay parked")] = None,
) -> None:
    """Send parked messages back to the worker's queue, with a fresh retry ladder."""
    _quiet_amqp_logs()

    async def go() -> list[ParkedMessage]:
        connection = await connect(_options(ctx).settings().amqp_url)
        try:
            return await replay_parked(connection, worker, message_id=message_id)
        finally:
            await connection.close()

    moved = _run(go())
    for p in moved:
        typer.echo(f"replayed {p.message_id} ({p.type or 'unknown type'}) to {topology.work_queue(worker)}")
    if not moved:
        typer.echo(f"nothing parked in {topology.dead_queue(worker)}")


# --------------------------------------------------------------- run, migrate


def _installed() -> dict[str, Any]:
    from ..workers import installed_workers

    return installed_workers()


def _no_workers() -> NoReturn:
    from ..workers import GROUP

    _fail(f"no workers are installed (no package declares an entry point in the group {GROUP!r})")


def _check_names(names: list[str], installed: dict[str, Any]) -> None:
    unknown = [n for n in names if n not in installed]
    if unknown:
        known = ", ".join(installed) or "none"
        _fail(f"unknown worker {', '.join(map(repr, unknown))} (installed: {known})")


def _load(name: str) -> Any:
    from ..workers import load_worker

    try:
        return load_worker(name)
    except (KeyError, TypeError, ImportError) as exc:
        _fail(str(exc.args[0]) if exc.args else repr(exc))


@app.command()
def run(
    ctx: typer.Context,
    workers: Annotated[list[str] | None, typer.Argument(help="Workers to run", show_default=False)] = None,
    all_workers: Annotated[bool, typer.Option("--all", help="Run every installed worker")] = False,
    sim: Annotated[
        int,
        typer.Option("--sim", help="Also run the platform simulator provisioning this many services (0: none)"),
    ] = 0,
    vms: Annotated[
        bool, typer.Option("--vms", help="With --sim, as root: a test VM per simulated service as its host")
    ] = False,
) -> None:
    """Run workers until SIGTERM/SIGINT. One worker runs in this process; several run
    as one child process each, their output prefixed with the worker's name."""
    installed = _installed()
    if all_workers and workers:
        raise typer.BadParameter("name workers or give --all, not both")
    if all_workers and not installed:
        _no_workers()
    names = list(installed) if all_workers else list(dict.fromkeys(workers or ()))
    if not names:
        if not installed:
            _no_workers()
        raise typer.BadParameter(f"name the workers to run or give --all (installed: {', '.join(installed)})")
    _check_names(names, installed)
    options = _options(ctx)
    if len(names) == 1 and not sim:
        _run_one(names[0], options.settings())
        return
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if options.amqp_url is not None:
        env["PALISADE_AMQP_URL"] = options.amqp_url  # not on the command line, where `ps` shows it
    commands = {name: [sys.executable, "-m", "palisade_events.cli.main", "run", name] for name in names}
    if vms and not sim:
        raise typer.BadParameter("--vms gives the simulated services VMs: it needs --sim N")
    if vms:
        _need_root_for_vms()
        from palisade_hostctl.testvm import default_root

        # The VM-facing workers find each VM's files under its directory (NamespaceVmLayouts).
        env["PALISADE_HOSTCTL_TESTVM_ROOT"] = str(default_root())
    if sim:
        commands["simulator"] = [sys.executable, "-m", "palisade_events.cli.main", "sim", "--services", str(sim)]
        if vms:
            commands["simulator"].append("--vms")
    code = asyncio.run(Supervisor(commands, _stdout(), env=env).run())
    raise typer.Exit(code)


def _need_root_for_vms() -> None:
    if os.geteuid() != 0:
        _fail("--vms needs root: test VMs are network namespaces with their own sshd, nginx and nftables")


def run_worker_process(name: str) -> None:
    """`python -m palisade_<worker>`: exactly `palisade run <worker>` (settings from the
    environment, uvloop, the worker's log format), for process managers that start modules."""
    try:
        _run_one(name, RuntimeSettings())
    except typer.Exit as stop:
        sys.exit(stop.exit_code)


def _run_one(name: str, settings: RuntimeSettings) -> None:
    from ..runtime import WorkerRuntime

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    # asyncssh logs every channel and command at INFO, many lines per VM operation; its
    # failures surface as the runtime's own warnings.
    logging.getLogger("asyncssh").setLevel(max(logging.WARNING, logging.getLogger().level))
    spec = _load(name)
    try:
        uvloop.run(WorkerRuntime(spec, settings).run_forever())
    except Exception:  # a worker that dies says why in its log, one plain traceback, and exits 1
        logging.getLogger("palisade.cli").exception("worker %s stopped by an error", name)
        raise typer.Exit(1) from None


@app.command()
def migrate(
    ctx: typer.Context,
    workers: Annotated[list[str] | None, typer.Argument(help="Workers to migrate (default: all installed)")] = None,
) -> None:
    """Apply each worker's SQL migrations and declare its queues and bindings, so
    commands are routable before the workers start. Also declares the shared
    exchanges and streams."""
    from ..runtime import WorkerRuntime

    _quiet_amqp_logs()
    installed = _installed()
    names = list(dict.fromkeys(workers)) if workers else list(installed)
    _check_names(names, installed)
    settings = _options(ctx).settings()
    out = _stdout()

    async def go() -> None:
        connection = await connect(settings.amqp_url)
        try:
            channel = await connection.channel()
            await topology.declare_exchanges(channel)
            out.print(
                f"exchanges {topology.COMMANDS_EXCHANGE}, {topology.EVENTS_EXCHANGE}, {topology.AUDIT_EXCHANGE},"
                f" {topology.LADDER_EXCHANGE}, {topology.REPLIES_EXCHANGE}"
                f" and streams {topology.EVENTS_LOG}, {topology.AUDIT_LOG}: declared"
            )
            if not names:
                out.print("no workers installed: nothing else to migrate")
            for name in names:
                runtime = WorkerRuntime(_load(name), settings)
                applied = await runtime.migrate()
                await runtime.declare(channel)
                done = f"applied {', '.join(applied)}" if applied else "migrations up to date"
                out.print(
                    Text.assemble(
                        (name, "bold cyan"),
                        f": schema {runtime.schema}: {done}; queue {topology.work_queue(name)}"
                        f" with {len(runtime.spec.bindings())} bindings, retry and dead queues declared",
                    )
                )
        finally:
            await connection.close()

    _run(go())


@app.command()
def sim(
    ctx: typer.Context,
    services: Annotated[int, typer.Option("--services", "-n", min=0, max=500, help="Services to provision")] = 3,
    backup_delay: Annotated[float, typer.Option(help="Seconds a simulated backup takes")] = 2.0,
    fail_backup: Annotated[
        list[str] | None, typer.Option("--fail-backup", help="Service id whose backups fail (repeatable)")
    ] = None,
    prefix: Annotated[str, typer.Option(help="Prefix of the simulated service ids")] = "sim",
    vms: Annotated[bool, typer.Option("--vms", help="As root: a test VM per service as its host")] = False,
) -> None:
    """Play the platform around Palisade (orchestrator, backup system): provision
    services, answer backup, termination and purge requests. For `make run` and tests;
    not a Palisade worker."""
    from ..simulator import run_simulator

    if vms:
        _need_root_for_vms()
    settings = _options(ctx).settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    _quiet_amqp_logs()

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_simulator(
            settings.amqp_url,
            count=services,
            backup_delay=backup_delay,
            fail_backups=fail_backup or (),
            prefix=prefix,
            stop=stop,
            vms=vms,
        )

    _run(go())


@app.command()
def demo(
    ctx: typer.Context,
    services: Annotated[
        int, typer.Option("--services", "-n", min=2, max=500, help="Services make run's simulator provisioned")
    ] = 3,
    prefix: Annotated[str, typer.Option(help="Prefix of the simulated service ids")] = "sim",
    clock_file: Annotated[
        Path | None,
        typer.Option("--clock-file", envvar="PALISADE_CLOCK_OFFSET_FILE", help="The workers' clock offset file"),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each step's outcome")] = 30.0,
) -> None:
    """The whole story against `make run`'s workers, step by step: each command, then
    the events and audit records it caused."""
    from ..client import PalisadeClient
    from ..messages import Actor
    from ..simulator import simulated_services
    from .demo import DemoError, run_story

    _quiet_amqp_logs()
    settings = _options(ctx).settings()
    out = _stdout()

    async def go() -> None:
        async with await PalisadeClient.connect(settings.amqp_url, actor=Actor(kind="user", id="demo")) as client:
            await run_story(
                client,
                out,
                services=simulated_services(services, prefix),
                hostname_domain="vm.palisade.test",
                clock_file=clock_file,
                timeout=timeout,
            )

    try:
        _run(go())
    except DemoError as exc:
        _fail(f"demo stopped: {exc}")


clock_app = typer.Typer(
    help="Development clock of workers started with PALISADE_CLOCK_OFFSET_FILE.", no_args_is_help=True
)
app.add_typer(clock_app, name="clock")


@clock_app.command("advance")
def clock_advance(
    duration: Annotated[str, typer.Argument(help="How far: 30s, 15m, 2h, 7d")],
    file: Annotated[Path, typer.Option("--file", envvar="PALISADE_CLOCK_OFFSET_FILE", help="The offset file")],
) -> None:
    """Move the clock of every worker reading this offset file (grace periods, renewals)."""
    from ..clock import OffsetFileClock

    m = _DURATION.match(duration.strip())
    if not m:
        raise typer.BadParameter(f"{duration!r}: expected e.g. 30s, 15m, 2h, 7d")
    clock = OffsetFileClock(file)
    clock.advance(timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)]))
    typer.echo(f"clock offset now {clock.offset()} (now {clock.now().isoformat()})")


# ---------------------------------------------------------------------- schema


@schema_app.command("export")
def schema_export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write schemas/ and asyncapi.yaml into")],
) -> None:
    """Write the JSON Schema of every message type and the AsyncAPI 3.0 document."""
    from ..schema_export import export

    written = export(out)
    typer.echo(f"wrote {len(written) - 1} JSON Schemas to {out / 'schemas'} and {out / 'asyncapi.yaml'}")


def add_plugin_commands(root: typer.Typer) -> list[str]:
    """Add the command groups installed packages declare in `palisade.cli`; returns
    their names. A plugin that fails to load is reported and left out, so one broken
    package cannot take the whole command down."""
    taken = {info.name for info in root.registered_groups} | {
        info.name or (info.callback.__name__ if info.callback else "") for info in root.registered_commands
    }
    added: list[str] = []
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        if ep.name in taken:
            print(f"palisade: commands {ep.name!r} from {ep.value} clash with a built-in command", file=sys.stderr)
            continue
        try:
            sub = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure of a plugin is reported the same way
            print(f"palisade: commands {ep.name!r} not loaded: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if not isinstance(sub, typer.Typer):
            print(f"palisade: {ep.value} is not a typer app; commands {ep.name!r} left out", file=sys.stderr)
            continue
        root.add_typer(sub, name=ep.name)
        taken.add(ep.name)
        added.append(ep.name)
    return added


add_plugin_commands(app)

if __name__ == "__main__":
    app()
