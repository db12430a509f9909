"""The running platform of the end-to-end story: every worker as its own process
(`palisade run <worker>`), an OTLP receiver their spans are exported to, and their
/metrics read the way Prometheus reads them."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import re
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures import wait_until

REPO = Path(__file__).resolve().parents[2]
WORKERS = ("lifecycle", "smtp-relay", "mfa", "sshkeys", "firewall", "tls", "ratelimit")
# The workers that keep a projection of each service (MFA is about accounts).
SERVICE_WORKERS = ("lifecycle", "smtp-relay", "sshkeys", "firewall", "tls", "ratelimit")
_METRICS_LINE = re.compile(rb"metrics on http://127\.0\.0\.1:(\d+)/metrics")


def free_port() -> int:
    """A free TCP port on every address (the relay listens on all of them)."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- traces


@dataclass(frozen=True)
class SpanRecord:
    service: str  # the exporting process's service.name: palisade-<worker>
    name: str
    trace_id: str
    attributes: dict[str, str]

    @property
    def worker(self) -> str:
        return self.service.removeprefix("palisade-")


def _text(value: AnyValue) -> str:
    kind = value.WhichOneof("value")
    return "" if kind is None else str(getattr(value, kind))


class OtlpReceiver:
    """An OTLP/HTTP trace endpoint (`/v1/traces`, protobuf) keeping every span it gets:
    what an OpenTelemetry collector would receive from the workers."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self._runner: web.AppRunner | None = None
        self.endpoint = ""

    async def start(self) -> OtlpReceiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.endpoint = f"http://127.0.0.1:{port}/v1/traces"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            resource = {a.key: _text(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        SpanRecord(
                            service=resource.get("service.name", ""),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            attributes={a.key: _text(a.value) for a in span.attributes},
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    def processed(self) -> list[SpanRecord]:
        """The workers' consume spans (`palisade.<worker> process`): one per handled delivery."""
        return [s for s in self.spans if s.attributes.get("messaging.operation.type") == "process"]

    def workers_in(self, trace_id: str) -> set[str]:
        return {s.worker for s in self.processed() if s.trace_id == trace_id}

    def traces_of(self, correlation_id: str) -> set[str]:
        """Trace ids of every delivery the workers handled for one correlation id."""
        return {
            s.trace_id
            for s in self.processed()
            if s.attributes.get("messaging.message.conversation_id") == correlation_id
        }


# ---------------------------------------------------------------- worker processes


@dataclass
class WorkerProcess:
    name: str
    proc: asyncio.subprocess.Process
    log: Path
    metrics_port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.returncode is None

    def tail(self, limit: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""


@dataclass
class Workers:
    """Every worker as a child process, the way `palisade run --all` runs them, each with
    its own environment; the logs go to files under `logs`."""

    logs: Path
    procs: dict[str, WorkerProcess] = field(default_factory=dict)

    async def start(self, name: str, env: Mapping[str, str]) -> None:
        log = self.logs / f"{name}.log"
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "palisade_events.cli.main", "run", name,
                cwd=REPO,
                env=dict(env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                start_new_session=True,  # a Ctrl-C of pytest reaches them once, through the teardown
            )  # fmt: skip
        finally:
            os.close(fd)
        self.procs[name] = WorkerProcess(name, proc, log)

    def check_alive(self) -> None:
        for p in self.procs.values():
            if not p.alive():
                raise AssertionError(f"worker {p.name} exited with {p.proc.returncode}:\n{p.tail()}")

    async def ready(self, timeout: float = 60.0) -> None:
        """Each worker serves /healthz 200: connected to RabbitMQ and PostgreSQL, migrated,
        consuming. The metrics port (0: any free one) is read from its log."""

        async def up(p: WorkerProcess) -> bool:
            self.check_alive()
            if p.metrics_port is None:
                found = _METRICS_LINE.search(p.log.read_bytes()) if p.log.exists() else None
                if found is None:
                    return False
                p.metrics_port = int(found.group(1))
            try:
                async with httpx.AsyncClient(trust_env=False, timeout=2) as http:
                    return (await http.get(f"http://127.0.0.1:{p.metrics_port}/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

        for p in self.procs.values():
            await wait_until(lambda p=p: up(p), timeout=timeout, interval=0.1, what=f"worker {p.name} ready")

    async def metrics(self, name: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """One scrape of a worker's /metrics: (sample name, labels) -> value."""
        port = self.procs[name].metrics_port
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
            response = await http.get(f"http://127.0.0.1:{port}/metrics")
        response.raise_for_status()
        out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return out

    async def stop(self) -> dict[str, int]:
        """SIGTERM (finish in-flight messages, flush the outbox), then SIGKILL after a grace;
        the exit codes."""
        for p in self.procs.values():
            if p.alive():
                with contextlib.suppress(ProcessLookupError):
                    p.proc.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                await asyncio.wait_for(p.proc.wait(), 25)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.proc.kill()
                await p.proc.wait()
        return {name: -1 if p.proc.returncode is None else p.proc.returncode for name, p in self.procs.items()}


def sample(scrape: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """A sample's value in a scrape (0 when absent, as Prometheus' `or vector(0)`)."""
    return scrape.get((name, frozenset(labels.items())), 0.0)
