"""The ratelimit worker end to end: the real broker and database, real test VMs whose
nginx sits in front of a small application that counts what reaches it.

Requests are pipelined on one connection (tests/rl_webclient.py), so a burst reaches
nginx within a few milliseconds: exact counts hold as long as a burst is shorter than
one refill interval, which each test checks rather than assumes. nginx's clock cannot
be moved, so the refill and the cache expiry are real, short, bounded waits, polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from rl_webclient import Batch, Request, Response, get, pipelined
from typer.testing import CliRunner, Result

from palisade_events import ManualClock, Payload, WorkerRuntime
from palisade_events.client import PalisadeClient, QueryRejectedError
from palisade_events.contract import platform
from palisade_events.contract import ratelimit as rl
from palisade_events.contract.platform import SshEndpoint
from palisade_events.topology import AUDIT_EXCHANGE, EVENTS_EXCHANGE
from palisade_hostctl import HostctlSettings
from palisade_hostctl.testvm import NamespaceVm, restart_sshd, start_sshd, stop_sshd
from palisade_ratelimit.cli import app as cli_app
from palisade_ratelimit.settings import RateLimitWorkerSettings
from palisade_ratelimit.worker import spec
from tests.fixtures import AMQP_URL, Collector, unique, wait_until
from tests.vms import VmSession

pytestmark = pytest.mark.root

START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
TESTS = Path(__file__).parent
APP_PORT = 8081  # the harness's own stand-in application holds 8080
ACME = rl.ACME_CHALLENGE_PREFIX


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _applies(outcome: str) -> float:
    return _metric("palisade_webpolicy_applies_total", outcome=outcome)


# ---------------------------------------------------------------- the application and the VM's nginx


class App:
    """The counting application inside a VM's namespace (tests/counting_app.py)."""

    def __init__(self, vm: NamespaceVm) -> None:
        self.vm = vm
        self.hits_file = vm.dir / "run" / "app-hits.jsonl"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        argv = [sys.executable, str(TESTS / "counting_app.py"), str(APP_PORT), str(self.hits_file)]
        self.proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.vm.namespace, *argv,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert await asyncio.wait_for(self.proc.stdout.readline(), 10) == b"ready\n"

    async def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            self.proc = None

    def hits(self, path: str | None = None, method: str | None = None) -> list[dict[str, Any]]:
        try:
            lines = self.hits_file.read_text().splitlines()
        except FileNotFoundError:
            return []
        records = [json.loads(line) for line in lines]
        return [r for r in records if (path is None or r["path"] == path) and (method is None or r["method"] == method)]

    def count(self, path: str, method: str = "GET") -> int:
        return len(self.hits(path, method))


@pytest.fixture
async def app(vm: NamespaceVm) -> AsyncIterator[App]:
    running = App(vm)
    await running.start()
    yield running
    await running.stop()


def nginx_workers(vm: NamespaceVm) -> set[int]:
    """PIDs of the VM's nginx workers that accept connections (not those shutting down)."""
    active = set()
    for pid, comm in vm.processes():
        if comm != "nginx":
            continue
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if title.startswith("nginx: worker process") and "shutting down" not in title:
            active.add(pid)
    return active


async def reloaded(vm: NamespaceVm, before: set[int]) -> None:
    """nginx runs the configuration it was last told to reload: none of the workers of
    `before` (taken before the change) accepts connections any more."""

    def done() -> bool:
        active = nginx_workers(vm)
        return bool(active) and not active & before

    await wait_until(done, timeout=10, what=f"nginx of {vm.name} reloaded")


async def from_vm(
    vm: NamespaceVm,
    path: str,
    count: int,
    *,
    bind: str | None = None,
    headers: dict[str, str] | None = None,
) -> Batch:
    """Requests from inside the VM's namespace: another client address (the VM's own,
    or `bind`), the same pipelined client."""
    argv = [sys.executable, str(TESTS / "rl_webclient.py"), f"http://{vm.address}{path}", str(count)]
    if bind:
        argv += ["--bind", bind]
    for name, value in (headers or {}).items():
        argv += ["--header", f"{name}: {value}"]
    _, out, _ = await vm.exec(*argv)
    data = json.loads(out)
    return Batch([Response(**r) for r in data["responses"]], data["elapsed"])


def assert_allowance(batch: Batch, allowed: int, refill_seconds: float, retry_after: str = "1") -> None:
    """The first `allowed` requests pass, the rest are refused 429 with Retry-After, give
    or take the refills that fit in the time the burst took."""
    refills = int(batch.elapsed / refill_seconds)
    statuses = batch.statuses()
    assert statuses[:allowed] == [200] * allowed, statuses
    assert allowed <= batch.count(200) <= allowed + refills, (batch.count(200), batch.elapsed)
    assert batch.count(200) + batch.count(429) == len(statuses)
    refused = [r for r in batch.responses if r.status == 429]
    assert len(refused) >= len(statuses) - allowed - refills
    assert refused
    assert all(r.header("retry-after") == retry_after for r in refused)


async def assert_refill(url: str, burst_started: float, refill_seconds: float, deadline: float = 5.0) -> None:
    """After a client spent its allowance: no request passes before one refill interval,
    one passes after it, and then no more than the time since allows (on an idle machine:
    none of the next three). Polled: refused requests use up nothing (nginx counts only
    admitted ones). Lower and upper bounds only, so a slow machine cannot make it fail."""
    while True:
        sent = time.monotonic()
        response = await get(url)
        if response.status == 200:
            break
        assert (response.status, response.header("retry-after")) == (429, "1"), response
        assert sent - burst_started < deadline, "no request admitted after the refill interval"
        await asyncio.sleep(0.01)
    # Not before the interval (half of it: slack for the time a request takes to reach nginx;
    # without the interval the first poll, ~10 ms after the burst, would pass).
    assert sent - burst_started >= refill_seconds / 2, sent - burst_started
    after = await pipelined(url, [Request("/")] * 3)
    refills = int((time.monotonic() - burst_started) / refill_seconds)  # at most this many since the burst
    assert 1 + after.count(200) <= max(refills, 1), (after.statuses(), refills)
    if refills < 2:
        assert after.statuses() == [429] * 3


# ---------------------------------------------------------------- the worker


class Harness:
    """Talks to the worker as the dashboard and the orchestrator would."""

    def __init__(self, rt: WorkerRuntime[Any], client: PalisadeClient, events: Collector, audit: Collector) -> None:
        self.rt, self.client, self.events, self.audit = rt, client, events, audit

    async def provision(self, vm: NamespaceVm, service_id: str | None = None, *, host_key: str | None = None) -> str:
        """Announce the service; returns once its policy is applied (and nginx reloaded)."""
        service_id = service_id or unique("svc")
        name = unique("web").lower()[:30]
        before = nginx_workers(vm)
        env = await self.client.publish(
            platform.ServiceProvisioned(
                service_id=service_id,
                name=name,
                software="wordpress",
                account_id="acc-1",
                hostname=f"{name}.vm.example.net",
                ipv4="203.0.113.10",
                private_ip=vm.address,
                ssh=SshEndpoint(host=vm.address, port=vm.port, host_key=host_key or vm.host_key),
            ),
            service_id=service_id,
        )
        applied = await self.outcome(env)
        assert applied["type"] == "WebPolicyApplied", applied
        if applied["payload"]["changed"]:
            await reloaded(vm, before)
        return service_id

    async def send(self, payload: Payload, service_id: str) -> Any:
        return await self.client.publish(payload, service_id=service_id)

    def _events(self) -> list[dict[str, Any]]:
        return [m.json() for m in self.events.messages]

    async def decision(self, env: Any) -> dict[str, Any]:
        """The event that answers a command (caused by it)."""

        def found() -> list[dict[str, Any]]:
            return [e for e in self._events() if e["causation_id"] == str(env.message_id)]

        await wait_until(lambda: bool(found()), what=f"decision on {env.type}")
        return found()[0]

    async def outcome(self, env: Any, timeout: float = 15) -> dict[str, Any]:
        """WebPolicyApplied or WebPolicyApplyFailed of the apply a message led to."""
        kinds = ("WebPolicyApplied", "WebPolicyApplyFailed")

        def found() -> list[dict[str, Any]]:
            return [e for e in self._events() if e["correlation_id"] == str(env.correlation_id) and e["type"] in kinds]

        await wait_until(lambda: bool(found()), timeout=timeout, what=f"apply after {env.type}")
        return found()[0]

    async def configure(self, vm: NamespaceVm, service_id: str, payload: Payload) -> dict[str, Any]:
        """Change the policy; returns once it is applied and nginx runs it."""
        before = nginx_workers(vm)
        env = await self.send(payload, service_id)
        assert (await self.decision(env))["type"] == "WebPolicyUpdated"
        applied = await self.outcome(env)
        assert applied["type"] == "WebPolicyApplied", applied
        if applied["payload"]["changed"]:
            await reloaded(vm, before)
        return applied

    async def policy(self, service_id: str) -> rl.WebPolicyDetails:
        reply: rl.WebPolicyDetails = await self.client.request(rl.GetWebPolicy(service_id=service_id), timeout=5)
        return reply

    def audits(self, **match: Any) -> list[dict[str, Any]]:
        records = [m.json() for m in self.audit.messages]
        return [r for r in records if all(r.get(k) == v for k, v in match.items())]

    async def audit_of(self, **match: Any) -> dict[str, Any]:
        await wait_until(lambda: bool(self.audits(**match)), what=f"audit record {match}")
        [record] = self.audits(**match)
        return record


def _hostctl(testvms: VmSession) -> HostctlSettings:
    return HostctlSettings(
        key_file=testvms.automation_key,
        testvm_root=testvms.root,
        connect_attempts=2,
        retry_backoff_seconds=0.05,
        command_timeout=10,
    )


@pytest.fixture
async def h(run_worker, client, collect, testvms: VmSession) -> Harness:
    events = await collect(EVENTS_EXCHANGE, "ratelimit.#")
    audit = await collect(AUDIT_EXCHANGE, "ratelimit.#")
    settings = RateLimitWorkerSettings(upstream=f"127.0.0.1:{APP_PORT}")
    rt = await run_worker(spec(settings, _hostctl(testvms)), clock=ManualClock(START))
    return Harness(rt, client, events, audit)


def vm_files(vm: NamespaceVm) -> tuple[bytes, bytes]:
    return vm.path(rl.NGINX_HTTP_CONF).read_bytes(), vm.path(rl.NGINX_SERVER_SNIPPET).read_bytes()


# ---------------------------------------------------------------- the rate limit


async def test_the_default_allows_150_rapid_requests_per_client_then_429_and_one_more_per_refill(
    h: Harness, vm: NamespaceVm, app: App
) -> None:
    applied_before = _applies("applied")
    service_id = await h.provision(vm)
    assert _applies("applied") == applied_before + 1
    url = f"http://{vm.address}"

    started = time.monotonic()
    burst = await pipelined(url, [Request("/")] * 160)
    assert_allowance(burst, 150, refill_seconds=0.4)  # 160 pipelined requests take ~10 ms: exactly 150
    passed = [r for r in burst.responses if r.status == 200]
    assert [r.header("x-cache-status") for r in passed] == ["MISS"] + ["HIT"] * 149
    assert app.count("/") == 1  # the output cache answered the other 149

    # The allowance refills at 150/minute: one request every 0.4 s, then refused again.
    await assert_refill(url, started, refill_seconds=0.4)

    # The ACME challenge path is never limited (nor cached) for a client out of allowance.
    acme = await pipelined(url, [Request(f"{ACME}token-1")] * 30)
    assert acme.statuses() == [200] * 30
    assert {r.header("x-cache-status") for r in acme.responses} == {"BYPASS"}
    assert app.count(f"{ACME}token-1") == 30

    # Another client address has an allowance of its own (the VM's own address, from its namespace).
    other = await from_vm(vm, "/", 151)
    assert_allowance(other, 150, refill_seconds=0.4)

    # "Show config": the settings and exactly the files the VM has.
    details = await h.policy(service_id)
    assert (details.rate_limit.requests, details.rate_limit.per, details.rate_limit.enabled) == (150, "minute", True)
    assert (details.output_cache.ttl_seconds, details.output_cache.enabled) == (3, True)
    assert (details.burst, details.retry_after_seconds, details.state) == (149, 1, "applied")
    assert [f.path for f in details.files] == [str(vm.path(rl.NGINX_HTTP_CONF)), str(vm.path(rl.NGINX_SERVER_SNIPPET))]
    assert tuple(f.content.encode() for f in details.files) == vm_files(vm)
    assert details.applied_checksum == details.checksum
    await h.audit_of(action="WebPolicyApplyRequested", outcome="accepted", service_id=service_id)


async def test_cf_connecting_ip_names_the_client_only_on_connections_from_cloudflare(
    h: Harness, vm: NamespaceVm, app: App
) -> None:
    await h.provision(vm)
    url = f"http://{vm.address}"

    # From outside Cloudflare's ranges (the host) a made-up CF-Connecting-IP changes nothing:
    # one limit for the connection's address, whatever the header says.
    paths = ["/spoof-1", "/spoof-2", *["/"] * 158]
    spoofed = await pipelined(
        url, [Request(path, headers={"CF-Connecting-IP": f"198.51.100.{i % 250}"}) for i, path in enumerate(paths)]
    )
    assert_allowance(spoofed, 150, refill_seconds=0.4)
    assert {r["real_ip"] for r in app.hits()} == {vm.gateway}  # what the application was told

    # From an address of Cloudflare's ranges, the header names the visitor: each has its own allowance.
    cloudflare = "173.245.48.7"
    await vm.exec("ip", "addr", "add", f"{cloudflare}/32", "dev", "lo")
    for visitor in ("203.0.113.7", "203.0.113.8"):
        batch = await from_vm(vm, f"/for-{visitor}", 160, bind=cloudflare, headers={"CF-Connecting-IP": visitor})
        assert_allowance(batch, 150, refill_seconds=0.4)
        assert [r["real_ip"] for r in app.hits(f"/for-{visitor}")] == [visitor]  # one MISS, the rest cached
    # Without the header a Cloudflare address is limited as itself.
    assert_allowance(await from_vm(vm, "/", 151, bind=cloudflare), 150, refill_seconds=0.4)


async def test_500_per_minute_and_10_per_second_take_effect(h: Harness, vm: NamespaceVm, app: App) -> None:
    service_id = await h.provision(vm)
    url = f"http://{vm.address}"

    applied = await h.configure(vm, service_id, rl.RateLimitConfigured(requests=10, per="second"))
    assert applied["payload"]["changed"] is True
    started = time.monotonic()
    burst = await pipelined(url, [Request("/")] * 15)
    assert_allowance(burst, 10, refill_seconds=0.1)
    await assert_refill(url, started, refill_seconds=0.1)  # one every 0.1 s

    await h.configure(vm, service_id, rl.RateLimitConfigured(requests=500, per="minute"))
    # The first client's spent allowance carries over a reload (same zone), so a fresh address measures.
    big = await from_vm(vm, "/", 520)
    assert_allowance(big, 500, refill_seconds=0.12)
    details = await h.policy(service_id)
    assert (details.rate_limit.requests, details.burst, details.version) == (500, 499, 3)

    # Turned off: nothing refused; the numbers are kept.
    await h.configure(vm, service_id, rl.RateLimitConfigured(requests=500, per="minute", enabled=False))
    assert (await from_vm(vm, "/", 600)).statuses() == [200] * 600
    assert "limit_req " not in vm.path(rl.NGINX_SERVER_SNIPPET).read_text()
    assert (await h.policy(service_id)).rate_limit.requests == 500


# ---------------------------------------------------------------- the output cache


async def test_get_is_cached_for_3_seconds_and_never_post_authorization_or_cookies(
    h: Harness, vm: NamespaceVm, app: App
) -> None:
    service_id = await h.provision(vm)
    url = f"http://{vm.address}"

    started = time.monotonic()
    ten = [await get(url, "/page") for _ in range(10)]
    assert time.monotonic() - started < 3
    assert [r.header("x-cache-status") for r in ten] == ["MISS"] + ["HIT"] * 9
    assert {r.body for r in ten} == {"GET /page #1\n"}
    assert app.count("/page") == 1

    # After the TTL the next GET reaches the application again (a real, bounded wait:
    # nginx's clock is its own; it counts whole seconds, so up to ~4 s).
    def expired(response: Response) -> bool:
        return response.header("x-cache-status") != "HIT"

    deadline = time.monotonic() + 5
    while not expired(response := await get(url, "/page")):
        assert time.monotonic() < deadline, "cached longer than its TTL"
        await asyncio.sleep(0.1)
    assert time.monotonic() - started >= 3
    assert response.header("x-cache-status") in ("EXPIRED", "MISS")
    assert (response.body, app.count("/page")) == ("GET /page #2\n", 2)

    never = {
        "post": [Request("/form", "POST", body=b"a=1")] * 3,
        "authorization": [Request("/account", headers={"Authorization": "Bearer t"})] * 3,
        "cookie": [Request("/cart", headers={"Cookie": "session=1"})] * 3,
        "marked private": [Request("/private/profile")] * 3,
        "setting a cookie": [Request("/session/start")] * 3,
    }
    for what, requests in never.items():
        batch = await pipelined(url, requests)
        assert batch.statuses() == [200] * 3, what
        assert "HIT" not in [r.header("x-cache-status") for r in batch.responses], what
        assert len(app.hits(requests[0].path, requests[0].method)) == 3, what
    head = await pipelined(url, [Request("/head", "HEAD")] * 3)
    assert [r.header("x-cache-status") for r in head.responses] == ["MISS", "HIT", "HIT"]

    # Off: every GET reaches the application, and no X-Cache-Status.
    await h.configure(vm, service_id, rl.OutputCacheConfigured(ttl_seconds=3, enabled=False))
    off = await pipelined(url, [Request("/off")] * 3)
    assert [r.header("x-cache-status") for r in off.responses] == [None] * 3
    assert app.count("/off") == 3
    details = await h.policy(service_id)
    assert (details.output_cache.ttl_seconds, details.output_cache.enabled) == (3, False)


# ---------------------------------------------------------------- the TLS worker's server blocks


async def test_tls_server_blocks_including_the_snippet_get_the_limit_and_cache_and_acme_stays_free(
    h: Harness, vm: NamespaceVm, app: App
) -> None:
    """The include contract of README "For the TLS worker", with server blocks written as the
    TLS worker is asked to write them (here on port 80, plain HTTP): the snippet included at
    server level, and inside the location that proxies to the application."""
    service_id = await h.provision(vm)
    await h.configure(vm, service_id, rl.RateLimitConfigured(requests=10, per="second"))
    layout = vm.layout
    webroot = vm.path("/var/www/acme")
    token = webroot / ".well-known" / "acme-challenge" / "tok-42"
    token.parent.mkdir(parents=True)
    token.write_text("tok-42.thumbprint")
    include = f"include {layout.path(rl.NGINX_SERVER_SNIPPET_INCLUDE)};"
    for name, at_server, in_location in (("server-level", include, ""), ("in-location", "", include)):
        vm.path(f"/etc/nginx/sites-enabled/{name}.example.test.conf").write_text(
            f"""server {{
    listen 80;
    server_name {name}.example.test;
    {at_server}
    location ^~ {ACME} {{
        root {webroot};
    }}
    location / {{
        {in_location}
        proxy_pass http://127.0.0.1:{APP_PORT};
        proxy_set_header Host $host;
    }}
}}
"""
        )
    before = nginx_workers(vm)
    await vm.exec(*layout.nginx("-t"))
    await vm.exec(*layout.nginx("-s", "reload"))
    await reloaded(vm, before)
    url = f"http://{vm.address}"
    cloudflare = "173.245.48.9"  # a third client: a visitor behind Cloudflare
    await vm.exec("ip", "addr", "add", f"{cloudflare}/32", "dev", "lo")

    for n, name in enumerate(("server-level", "in-location")):
        host = {"Host": f"{name}.example.test"}
        # Cached per host name: each block's page and the default server's are separate entries.
        cached = await from_vm(vm, f"/page-{n}", 2, headers=host)
        assert [r.header("x-cache-status") for r in cached.responses] == ["MISS", "HIT"], name
        # Limited: 10 rapid requests, then 429 with Retry-After (a fresh client address each time).
        if name == "server-level":
            burst = await pipelined(url, [Request("/", headers=host)] * 15)
        else:
            burst = await from_vm(vm, "/", 15, bind=cloudflare, headers={**host, "CF-Connecting-IP": "203.0.113.9"})
        assert_allowance(burst, 10, refill_seconds=0.1)
        # The challenge is served from the webroot, never limited, whoever asks.
        challenges = await pipelined(url, [Request(f"{ACME}tok-42", headers=host)] * 30)
        assert challenges.statuses() == [200] * 30, name
        assert {r.body for r in challenges.responses} == {"tok-42.thumbprint"}
    assert [r.header("x-cache-status") for r in (await from_vm(vm, "/page-0", 1)).responses] == ["MISS"]
    assert (app.count("/page-0"), app.count("/page-1")) == (2, 1)
    assert app.count(f"{ACME}tok-42") == 0  # served from the webroot, not the application


# ---------------------------------------------------------------- failures


async def test_a_configuration_nginx_refuses_leaves_the_old_one_serving(h: Harness, vm: NamespaceVm, app: App) -> None:
    service_id = await h.provision(vm)
    await h.configure(vm, service_id, rl.RateLimitConfigured(requests=10, per="second"))
    before = vm_files(vm)
    refused_before = _applies("nginx_refused")

    # Someone else's file on the VM claims the service's zone: nginx -t refuses every new configuration.
    operator = vm.path("/etc/nginx/conf.d/zz-operator.conf")
    operator.write_text(f"limit_req_zone $binary_remote_addr zone={service_id}:1m rate=1r/s;\n")
    env = await h.send(rl.RateLimitConfigured(requests=500, per="minute"), service_id)
    assert (await h.decision(env))["type"] == "WebPolicyUpdated"  # recorded
    failed = await h.outcome(env)
    assert (failed["type"], failed["payload"]["reason"]) == ("WebPolicyApplyFailed", "nginx_refused")
    assert "[emerg]" in failed["payload"]["detail"]
    audit = await h.audit_of(action="WebPolicyApplyRequested", outcome="failed", correlation_id=str(env.correlation_id))
    assert audit["reason"] == "nginx_refused"
    assert _applies("nginx_refused") == refused_before + 1
    assert vm_files(vm) == before  # the previous files are back ...
    assert sorted(os.listdir(vm.path("/etc/nginx/conf.d"))) == ["palisade-ratelimit.conf", "zz-operator.conf"]
    details = await h.policy(service_id)
    assert (details.state, details.rate_limit.requests) == ("failed", 500)
    assert "nginx_refused" in (details.last_error or "")

    # ... and nginx still serves 10/second, not 500/minute.
    url = f"http://{vm.address}"
    assert_allowance(await pipelined(url, [Request("/")] * 15), 10, refill_seconds=0.1)

    # Once the VM is sound again, asking again applies the recorded policy.
    operator.unlink()
    workers = nginx_workers(vm)
    again = await h.send(rl.WebPolicyApplyRequested(reason="operator"), service_id)
    assert (await h.outcome(again))["type"] == "WebPolicyApplied"
    await reloaded(vm, workers)
    assert_allowance(await from_vm(vm, "/", 520), 500, refill_seconds=0.12)
    assert (await h.policy(service_id)).state == "applied"


async def test_an_unreachable_vm_is_retried_and_a_changed_host_key_is_refused(
    h: Harness, vm: NamespaceVm, app: App
) -> None:
    service_id = await h.provision(vm)
    url = f"http://{vm.address}"

    # sshd down for a moment: the apply goes round the retry ladder and lands once it is back.
    await stop_sshd(vm)
    retried = _applies("retried")
    workers = nginx_workers(vm)
    env = await h.send(rl.RateLimitConfigured(requests=10, per="second"), service_id)
    assert (await h.decision(env))["type"] == "WebPolicyUpdated"  # recorded while the VM is down
    await wait_until(lambda: _applies("retried") > retried, what="the apply retried")
    assert (await h.policy(service_id)).state == "pending"
    await start_sshd(vm)
    assert (await h.outcome(env))["type"] == "WebPolicyApplied"
    await reloaded(vm, workers)
    await app.start()  # stopping sshd stopped every process of the VM but nginx
    assert_allowance(await pipelined(url, [Request("/")] * 15), 10, refill_seconds=0.1)

    # Down for longer than the ladder: parked, then the reconcile job asks again.
    await stop_sshd(vm)
    env = await h.send(rl.OutputCacheConfigured(ttl_seconds=30), service_id)
    parked = {"action": "WebPolicyApplyRequested", "outcome": "failed", "correlation_id": str(env.correlation_id)}
    await h.audit_of(**parked)
    assert "30s;" not in vm.path(rl.NGINX_SERVER_SNIPPET).read_text()
    await start_sshd(vm)
    h.rt.clock.advance(timedelta(seconds=RateLimitWorkerSettings().reconcile_after_seconds + 1))  # type: ignore[attr-defined]
    await h.rt.run_job("reconcile-pending-applies")
    await wait_until(lambda: "30s;" in vm.path(rl.NGINX_SERVER_SNIPPET).read_text(), what="the reconciled apply")
    await wait_until(lambda: _state(h, service_id, "applied"), what="state applied")

    # Another machine at the same address: refused at once, not retried, files untouched.
    before = vm_files(vm)
    vm = await restart_sshd(vm, new_host_key=True)
    retried = _applies("retried")
    env = await h.send(rl.OutputCacheConfigured(ttl_seconds=5), service_id)
    failed = await h.outcome(env)
    assert (failed["type"], failed["payload"]["reason"]) == ("WebPolicyApplyFailed", "host_key_mismatch")
    audit = await h.audit_of(action="WebPolicyApplyRequested", outcome="failed", correlation_id=str(env.correlation_id))
    assert audit["detail"]["presented"] == vm.host_key_fingerprint
    assert (_applies("retried"), vm_files(vm)) == (retried, before)

    # The platform announces the reinstalled VM with its new key: the policy goes there.
    await h.provision(vm, service_id)
    assert "5s;" in vm.path(rl.NGINX_SERVER_SNIPPET).read_text()
    assert (await h.policy(service_id)).state == "applied"


async def _state(h: Harness, service_id: str, state: str) -> bool:
    return (await h.policy(service_id)).state == state


async def test_unknown_services_and_invalid_settings_are_refused_and_a_deprovisioned_service_forgotten(
    h: Harness, vm: NamespaceVm, app: App
) -> None:
    unknown = await h.send(rl.RateLimitConfigured(requests=10, per="second"), "svc-nobody")
    decision = await h.decision(unknown)
    assert (decision["type"], decision["payload"]["reason"]) == ("WebPolicyRejected", "unknown_service")
    assert (await h.audit_of(message_id=str(unknown.message_id)))["outcome"] == "rejected"
    with pytest.raises(QueryRejectedError):
        await h.policy("svc-nobody")

    # Out of range never reaches a handler: parked with the reason, audited as rejected.
    service_id = await h.provision(vm)
    for bad in (
        rl.RateLimitConfigured.model_construct(requests=0, per="minute", enabled=True),
        rl.RateLimitConfigured.model_construct(requests=100_001, per="minute", enabled=True),
        rl.OutputCacheConfigured.model_construct(ttl_seconds=3601, enabled=True),
    ):
        env = await h.send(bad, service_id)
        audit = await h.audit_of(message_id=str(env.message_id))
        assert audit["outcome"] == "rejected"
        assert "less than or equal" in audit["reason"] or "greater than or equal" in audit["reason"]
    assert (await h.policy(service_id)).version == 1

    # A repeated setting is recorded as unchanged and leaves the VM alone.
    env = await h.send(rl.RateLimitConfigured(requests=150, per="minute"), service_id)
    decision = await h.decision(env)
    assert (decision["type"], decision["payload"]["changed"], decision["payload"]["version"]) == (
        "WebPolicyUpdated",
        False,
        1,
    )
    assert (await h.outcome(env))["payload"]["changed"] is False

    await h.client.publish(platform.ServiceDeprovisioned(service_id=service_id), service_id=service_id)
    await wait_until(lambda: _forgotten(h, service_id), what="service forgotten")


async def _forgotten(h: Harness, service_id: str) -> bool:
    try:
        await h.policy(service_id)
    except QueryRejectedError:
        return True
    return False


# ---------------------------------------------------------------- the CLI


async def test_the_cli_sets_the_limit_and_the_cache_and_shows_the_config(
    h: Harness, vm: NamespaceVm, app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    service_id = await h.provision(vm)
    monkeypatch.setenv("PALISADE_AMQP_URL", AMQP_URL)
    runner = CliRunner()

    async def cli(*args: str) -> Result:
        # In a thread: the command runs its own event loop, as it does in a terminal.
        return await asyncio.to_thread(runner.invoke, cli_app, list(args))

    workers = nginx_workers(vm)
    done = await cli("set", service_id, "--requests", "500", "--per", "minute")
    assert done.exit_code == 0, done.output
    assert "WebPolicyUpdated" in done.output
    assert "WebPolicyApplied" in done.output
    await reloaded(vm, workers)
    assert_allowance(await pipelined(f"http://{vm.address}", [Request("/")] * 510), 500, refill_seconds=0.12)

    done = await cli("cache", service_id, "--ttl", "10")
    assert done.exit_code == 0, done.output
    # `show` through the `palisade` command itself, as an operator types it.
    shown = await asyncio.to_thread(
        subprocess.run,
        [str(Path(sys.executable).parent / "palisade"), "ratelimit", "show", service_id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "500 per minute per IP (burst 499, Retry-After 1s)" in shown.stdout
    assert "GET/HEAD cached 10s" in shown.stdout
    assert "proxy_cache_valid 200 301 302 404 10s;" in shown.stdout
    assert f"limit_req zone={service_id} burst=499 nodelay;" in shown.stdout

    done = await cli("set", service_id, "--off")
    assert done.exit_code == 0, done.output
    details = await h.policy(service_id)
    assert (details.rate_limit.enabled, details.rate_limit.requests) == (False, 500)
    done = await cli("cache", service_id, "--off")
    assert done.exit_code == 0, done.output
    assert (await h.policy(service_id)).output_cache.model_dump() == {"ttl_seconds": 10, "enabled": False}

    refused = await cli("set", "svc-nobody", "--requests", "5")
    assert (refused.exit_code, "unknown_service" in refused.output) == (1, True), refused.output
    assert (await cli("set", service_id, "--requests", "0")).exit_code == 2  # refused before anything is sent
    assert (await cli("set", service_id)).exit_code == 1  # neither --requests nor --off
