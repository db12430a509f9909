"""One trace id spans publisher -> worker -> emitted event."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from palisade_events.topology import EVENTS_EXCHANGE
from tests.backbone.probe import probe_spec
from tests.fixtures import unique, wait_until


@pytest.fixture(scope="session")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def test_one_trace_from_publisher_through_worker_to_event(spans, run_worker, client, collect):
    spec, t = probe_spec(unique("probe"))
    events = await collect(EVENTS_EXCHANGE, f"{spec.name}.ProbeDone")
    await run_worker(spec)

    with trace.get_tracer("test").start_as_current_span("user clicks apply") as root:
        await client.publish(t.ProbeCommand(n=1), service_id="svc-a")
    trace_id = root.get_span_context().trace_id

    [event] = await events.wait_for(1)
    traceparent = event.headers["traceparent"]
    assert traceparent.split("-")[1] == f"{trace_id:032x}"

    def names_in_trace() -> set[str]:
        return {s.name for s in spans.get_finished_spans() if s.context.trace_id == trace_id}

    await wait_until(lambda: f"{spec.name}.ProbeDone publish" in names_in_trace(), what="event publish span")
    names = names_in_trace()
    assert f"{spec.name}.ProbeCommand publish" in names
    assert f"palisade.{spec.name} process" in names
    process = next(s for s in spans.get_finished_spans() if s.name == f"palisade.{spec.name} process")
    assert process.attributes is not None
    assert process.attributes["messaging.system"] == "rabbitmq"
    assert process.attributes["messaging.operation.type"] == "process"


async def test_group_commit_keeps_each_message_in_its_own_trace(spans, run_worker, client, collect):
    """A batch is handled in the group's own task: each handler must still run in its own
    message's trace, so what it emits continues that trace and not a neighbour's."""
    import dataclasses

    from tests.backbone.test_group_commit import committed_together

    spec, t = probe_spec(unique("probe"))
    spec = dataclasses.replace(spec, group_commit=True)
    events = await collect(EVENTS_EXCHANGE, f"{spec.name}.ProbeDone")
    rt = await run_worker(spec)
    await rt.pause()  # a backlog, so that batches form
    trace_of: dict[int, str] = {}
    for n in range(60):
        with trace.get_tracer("test").start_as_current_span(f"user action {n}") as root:
            await client.publish(t.ProbeCommand(n=n), service_id=f"svc-{n % 20}")
        trace_of[n] = f"{root.get_span_context().trace_id:032x}"
    await rt.resume()

    done = await events.wait_for(60)
    assert committed_together(rt.name) >= 2, "no batch formed: the test proves nothing"
    for event in done:
        assert event.headers["traceparent"].split("-")[1] == trace_of[event.json()["payload"]["n"]]
    # The relay publishes a batch's events in the group's task: each event's producer span must
    # still join its own message's trace.
    publish_span = f"{spec.name}.ProbeDone publish"

    def traces_with_a_publish_span() -> set[str]:
        return {f"{s.context.trace_id:032x}" for s in spans.get_finished_spans() if s.name == publish_span}

    await wait_until(
        lambda: set(trace_of.values()) <= traces_with_a_publish_span(),
        what="an event publish span in each message's trace",
    )
