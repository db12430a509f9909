"""Prometheus metrics, the /metrics + /healthz endpoint, and OpenTelemetry tracing."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from .settings import RuntimeSettings

if TYPE_CHECKING:
    # aiohttp's server is imported when a worker starts it (HealthServer.start), not by every
    # `palisade` call that only publishes or reads: aiohttp.web is about a third of a second
    # of the CLI's start-up on this machine.
    from aiohttp import web

log = logging.getLogger("palisade.observability")

MESSAGES = Counter(
    "palisade_messages_total",
    "Messages consumed, by outcome (handled, duplicate, rejected, retried, parked)",
    ["worker", "type", "outcome"],
)
HANDLER_SECONDS = Histogram(
    "palisade_handler_seconds",
    "Time from delivery to commit of one message",
    ["worker", "type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
GROUP_COMMIT_MESSAGES = Histogram(
    "palisade_group_commit_messages",
    "Messages committed together in one transaction (workers with group commit; batches of 2+)",
    ["worker"],
    buckets=(2, 4, 8, 16, 32, 64, 128, 256),
)
OUTBOX_PENDING = Gauge("palisade_outbox_pending", "Outbox rows not yet published", ["worker"])
OUTBOX_PUBLISHED = Counter("palisade_outbox_published_total", "Outbox rows published", ["worker"])
OUTBOX_OLDEST_SECONDS = Gauge(
    "palisade_outbox_oldest_pending_seconds", "Age of the oldest unpublished outbox row", ["worker"]
)
DEAD_LETTERS = Counter("palisade_dead_letters_total", "Messages parked in the dead queue", ["worker"])
UP = Gauge("palisade_worker_ready", "1 when connected to RabbitMQ and PostgreSQL", ["worker"])

TRACER_NAME = "palisade"


def configure_tracing(settings: RuntimeSettings, service_name: str) -> None:
    """Install a tracer provider unless one is already set (tests install their own)."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return
    if settings.otel_exporter == "none":
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if settings.otel_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter: Any = (
            OTLPSpanExporter(endpoint=settings.otel_endpoint) if settings.otel_endpoint else OTLPSpanExporter()
        )
    else:
        exporter = ConsoleSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def tracing_on() -> bool:
    """Whether a tracer provider of the SDK is installed."""
    # Asked several times per message. Until a provider is set, trace.get_tracer_provider()
    # looks up an environment variable on each call (to load a provider named there): ~2 % of
    # a worker's CPU in a drain (py-spy, bench/bus.py). So the global it returns is read
    # directly; the worker's start (configure_tracing) has called get_tracer_provider() once,
    # which loads a provider named in the environment.
    provider = getattr(trace, "_TRACER_PROVIDER", _NOT_THERE)
    if provider is _NOT_THERE:  # an opentelemetry-api without that global: the public way
        provider = trace.get_tracer_provider()
    return isinstance(provider, TracerProvider)


_NOT_THERE = object()


@contextlib.contextmanager
def span(
    name: str,
    kind: trace.SpanKind,
    attributes: Callable[[], Mapping[str, str]],
    context: otel_context.Context | None = None,
) -> Iterator[trace.Span]:
    """`tracer().start_as_current_span(...)` when tracing is on. Without an SDK provider a span
    is a no-op, yet making it and its attributes cost about a tenth of a message's CPU on the
    hot path (bench/bus.py --profile): then only the given context is made current, so the
    caller's trace still passes through to what this code publishes."""
    if tracing_on():
        with tracer().start_as_current_span(name, context=context, kind=kind, attributes=attributes()) as current:
            yield current
        return
    token = otel_context.attach(context) if context is not None else None
    try:
        yield trace.INVALID_SPAN
    finally:
        if token is not None:
            otel_context.detach(token)


def inject_headers(headers: MutableMapping[str, Any] | None = None) -> dict[str, Any]:
    """W3C traceparent/tracestate of the current span, for AMQP headers."""
    carrier: dict[str, Any] = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, Any] | None) -> otel_context.Context:
    carrier = {}
    for k, v in (headers or {}).items():
        if k in ("traceparent", "tracestate"):
            carrier[k] = v.decode() if isinstance(v, bytes) else str(v)
    return propagate.extract(carrier)


def messaging_attributes(
    *, operation: str, destination: str, routing_key: str, message_id: str | None, correlation_id: str | None
) -> dict[str, str]:
    attrs = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": operation,
        "messaging.destination.name": destination,
        "messaging.rabbitmq.destination.routing_key": routing_key,
    }
    if message_id:
        attrs["messaging.message.id"] = message_id
    if correlation_id:
        attrs["messaging.message.conversation_id"] = correlation_id
    return attrs


class HealthServer:
    """Serves `/metrics` (Prometheus) and `/healthz` (200 only when ready)."""

    def __init__(self, host: str, port: int, ready: Callable[[], Awaitable[bool]]) -> None:
        self._host, self._port, self._ready = host, port, ready
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        from aiohttp import web

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_: web.Request) -> web.Response:
            ok = await self._ready()
            return web.json_response({"ready": ok}, status=200 if ok else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        log.info("metrics on http://%s:%d/metrics", self._host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
