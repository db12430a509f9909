"""`palisade demo` (`make demo`): the story of issue 10, step by step, against the workers
`make run` started: each step prints the command as the dashboard or the orchestrator
would send it (and the `palisade` command that does the same), then the events and audit
records it caused, as they arrive.

The demo only talks to RabbitMQ, like any other system. It uses the services the
simulator of `make run` provisioned (`sim-…`): the first active one for the security
layers, the last active one for the deletion (which deprovisions it: restart `make run`
to get it back). Its own account (`acc-demo-…`) is registered the way the platform does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyotp
from aio_pika.abc import AbstractIncomingMessage
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.rule import Rule
from rich.text import Text

from ..audit import AuditRecord
from ..client import PalisadeClient, QueryRejectedError, QueryTimeout
from ..clock import OffsetFileClock
from ..contract import CONTRACT, accounts, firewall, lifecycle, mfa, ratelimit, smtp, sshkeys, tls
from ..messages import Actor, DecodeError, Payload, Query, Reply
from ..simulator import SimulatedService
from ..topology import AUDIT_EXCHANGE, EVENTS_EXCHANGE, declare_exchanges

DASHBOARD = Actor(kind="user", id="demo-user")
METRICS = {
    "lifecycle": 9401,
    "smtp-relay": 9402,
    "mfa": 9403,
    "sshkeys": 9404,
    "firewall": 9405,
    "tls": 9406,
    "ratelimit": 9407,
}


class DemoError(RuntimeError):
    """The running system did not answer as the story expects."""


@dataclass(frozen=True)
class Seen:
    """One message from the event or the audit exchange."""

    kind: str  # "event" | "audit"
    type: str  # event type, or the audited action
    service_id: str | None
    account_id: str | None
    correlation_id: str | None
    payload: dict[str, Any]
    record: AuditRecord | None = None


def render(seen: Seen) -> Text:
    if seen.record is not None:
        r = seen.record
        style = {"accepted": "green", "rejected": "red", "failed": "red"}.get(r.outcome, "")
        return Text.assemble(
            ("    audit  ", "dim"),
            (r.worker, "cyan"),
            " ",
            (r.action, "bold"),
            " ",
            (r.outcome, style),
            f": {r.reason}" if r.reason else "",
        )
    negative = seen.type.endswith(("Rejected", "Failed", "Halted", "Locked"))
    body = _short(seen.payload)
    return Text.assemble(("    event  ", "dim"), (seen.type, "red" if negative else "green"), " ", (body, "dim"))


def _short(payload: dict[str, Any]) -> str:
    """`key=value` pairs, long values cut for a terminal."""
    parts: list[str] = []
    for key, value in payload.items():
        if value is None:
            continue
        if isinstance(value, list) and len(json.dumps(value, default=str)) > 60:
            text = f"[{len(value)} items]"
        else:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
            text = text if len(text) <= 80 else text[:77] + "..."
        parts.append(f"{key}={text}")
    return " ".join(parts)


class Story:
    def __init__(self, client: PalisadeClient, console: Console, *, timeout: float) -> None:
        self.client = client
        self.console = console
        self.timeout = timeout
        self._inbox: asyncio.Queue[Seen] = asyncio.Queue()
        self.seen: list[Seen] = []
        self._printed: set[int] = set()

    async def listen(self) -> None:
        channel = await self.client.connection.channel()
        await declare_exchanges(channel)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(EVENTS_EXCHANGE, "#")
        await queue.bind(AUDIT_EXCHANGE, "#")
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if message.exchange == AUDIT_EXCHANGE:
            try:
                record = AuditRecord.model_validate_json(message.body)
            except ValueError:
                return
            corr = str(record.correlation_id) if record.correlation_id else None
            item = Seen("audit", record.action, record.service_id, record.account_id, corr, {}, record)
        else:
            try:
                env = CONTRACT.decode(message.body)
            except DecodeError:
                return
            item = Seen(
                "event",
                env.type,
                env.service_id,
                env.account_id,
                str(env.correlation_id),
                env.payload.model_dump(mode="json"),
            )
        self.seen.append(item)
        await self._inbox.put(item)

    # ------------------------------------------------------------------ output

    def chapter(self, title: str) -> None:
        self.console.print()
        self.console.print(Rule(Text(title, style="bold")))

    def step(self, title: str, cli: str | None = None) -> None:
        self.console.print()
        self.console.print(Text.assemble(("▶ ", "bold cyan"), (title, "bold")))
        if cli:
            self.console.print(Text.assemble(("  $ ", "dim"), (cli, "yellow")))

    def note(self, text: str) -> None:
        self.console.print(Text("  " + text, style="italic"))

    # ------------------------------------------------------------------ messages

    async def send(
        self,
        payload: Payload,
        *,
        service_id: str | None = None,
        account_id: str | None = None,
        until: Sequence[str],
        timeout: float | None = None,
    ) -> list[Seen]:
        """Publish, then print what it caused (same correlation id) until one of the
        `until` event types and the command's audit record have arrived."""
        self._drain()
        env = await self.client.publish(payload, service_id=service_id, account_id=account_id, actor=DASHBOARD)
        self.console.print(
            Text.assemble(("    sent   ", "dim"), (env.type, "bold"), " ", (_short(_dump(payload)), "dim"))
        )
        corr = str(env.correlation_id)
        command = env.type if payload.kind == "command" else None
        return await self.follow(
            lambda s: s.correlation_id == corr, lambda got: audited_and(got, until, command), timeout
        )

    async def follow(
        self,
        match: Callable[[Seen], bool],
        done: Callable[[list[Seen]], bool],
        timeout: float | None = None,
    ) -> list[Seen]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.timeout)
        got: list[Seen] = [s for s in self.seen if match(s)]
        for s in got:
            self._print(s)
        while not done(got):
            left = deadline - loop.time()
            if left <= 0:
                raise DemoError(f"no answer within {timeout or self.timeout:g}s (saw {[s.type for s in got]})")
            try:
                item = await asyncio.wait_for(self._inbox.get(), left)
            except TimeoutError:
                continue
            if match(item):
                got.append(item)
                self._print(item)
        return got

    def _print(self, item: Seen) -> None:
        if id(item) not in self._printed:
            self._printed.add(id(item))
            self.console.print(render(item))

    def _drain(self) -> None:
        while not self._inbox.empty():
            self._inbox.get_nowait()

    async def ask(self, query: Query, *, service_id: str | None = None, account_id: str | None = None) -> Any:
        try:
            return await self.client.request(query, service_id=service_id, account_id=account_id, timeout=10.0)
        except (QueryRejectedError, QueryTimeout) as exc:
            raise DemoError(f"{query.type_name()}: {exc}") from None


def _dump(payload: Payload) -> dict[str, Any]:
    return payload.model_dump(mode="json")


def audited_and(got: list[Seen], until: Sequence[str], command: str | None) -> bool:
    """One of `until` seen, and (for a command) its audit record."""
    if not any(s.kind == "event" and s.type.endswith(tuple(until)) for s in got):
        return False
    return command is None or any(s.kind == "audit" and command.endswith(s.type) for s in got)


def types_seen(got: list[Seen], *names: str) -> bool:
    return all(any(s.type.endswith(name) for s in got) for name in names)


# ---------------------------------------------------------------------- the story


async def choose_services(
    story: Story, services: Sequence[SimulatedService]
) -> tuple[SimulatedService, SimulatedService]:
    """A web service (its firewall opens 80/tcp, which HTTP-01 needs: a Redis, as in the
    seed, does not) for the security layers, and another active one for the deletion."""
    active: list[SimulatedService] = []
    web: list[SimulatedService] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + story.timeout * 3
    while True:
        active.clear()
        web.clear()
        for svc in services:
            with contextlib.suppress(QueryRejectedError, QueryTimeout):
                status = await story.client.request(lifecycle.LifecycleStatus(service_id=svc.service_id), timeout=5.0)
                fw = await story.client.request(firewall.GetFirewall(service_id=svc.service_id), timeout=5.0)
                if status.state == "active":
                    active.append(svc)
                    if any(r.protocol == "tcp" and r.ports == "80" for r in fw.rules):
                        web.append(svc)
        if web and len(active) >= 2:
            others = [svc for svc in active if svc != web[0]]
            return web[0], others[-1]
        if loop.time() > deadline:
            raise DemoError(
                f"no web service and another active one among {[s.service_id for s in services]}:"
                " is `make run` running? (a past demo deleted one: restart `make run` to provision them again)"
            )
        await asyncio.sleep(1.0)  # the workers are starting: ask again


async def run_story(
    client: PalisadeClient,
    console: Console,
    *,
    services: Sequence[SimulatedService],
    hostname_domain: str,
    clock_file: Path | None,
    timeout: float,
) -> None:
    story = Story(client, console, timeout=timeout)
    await story.listen()

    story.chapter("0. The services make run's simulator provisioned")
    web, doomed = await choose_services(story, services)
    hostname = web.provisioned(hostname_domain).hostname
    story.note(f"security layers on {web.service_id} ({hostname}); deletion story on {doomed.service_id}")
    fw: firewall.FirewallState = await story.ask(firewall.GetFirewall(service_id=web.service_id))
    console.print(
        Text(
            f"    firewall v{fw.version} {fw.state}: "
            + ", ".join(f"{r.protocol}/{r.ports or r.icmp_type or '*'}" for r in fw.rules),
            style="dim",
        )
    )
    policy: ratelimit.WebPolicyDetails = await story.ask(ratelimit.GetWebPolicy(service_id=web.service_id))
    console.print(
        Text(
            f"    web policy: {policy.rate_limit.requests}/{policy.rate_limit.per} per IP,"
            f" cache {policy.output_cache.ttl_seconds}s, {policy.state}",
            style="dim",
        )
    )
    if fw.state != "applied" or policy.state != "applied":
        story.note(
            "'pending'/'failed' means the VM is not reachable: without test VMs (make run as root) the"
            " VM-facing workers retry, then park their work in palisade.<worker>.dead"
        )

    story.chapter("1. A custom domain, and the firewall guarding it")
    domain = f"shop-{uuid.uuid4().hex[:6]}.example.com"
    story.step(f"add the domain {domain}", f"palisade tls add {web.service_id} {domain}")
    await story.send(
        tls.DomainAdded(domain=domain), service_id=web.service_id, until=["DomainAccepted", "DomainRejected"]
    )
    domains: tls.DomainList = await story.ask(tls.GetDomains(service_id=web.service_id))
    for d in domains.domains:
        records = ", ".join(f"{r.type} {r.name} -> {r.value}" for r in d.expected_records)
        console.print(Text(f"    {d.display:<40} {d.state:<12} {records}", style="dim"))

    story.step("close port 80 while the service has TLS domains (the dashboard's 'Apply Changes')")
    await wait_for_tls_domains(story, web.service_id)
    fw = await story.ask(firewall.GetFirewall(service_id=web.service_id))
    without_80 = [
        firewall.FirewallRule(protocol=r.protocol, ports=r.ports, icmp_type=r.icmp_type, sources=r.sources)
        for r in fw.rules
        if not (r.protocol == "tcp" and r.ports == "80")
    ]
    await story.send(
        firewall.FirewallRulesReplaceRequested(rules=without_80, expected_version=fw.version),
        service_id=web.service_id,
        until=["FirewallChangeRejected", "FirewallRulesReplaced"],
    )

    story.chapter("2. SSH keys and the web policy")
    key = Ed25519PrivateKey.generate().public_key()
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    story.step("add an SSH key", f"palisade sshkeys add {web.service_id} --title 'demo laptop' KEYFILE")
    # With a VM to write to, wait for the file on it too (SshKeysApplied carries its checksum).
    reachable = fw.state == "applied"
    await story.send(
        sshkeys.SshKeyAdded(title="demo laptop", public_key=f"{line} demo@laptop"),
        service_id=web.service_id,
        until=["SshKeysApplied", "SshKeysApplyFailed", "SshKeyRejected"] if reachable else ["SshKeyAccepted"],
    )
    story.step("limit every client IP to 10 requests per second", f"palisade ratelimit set {web.service_id} 10/second")
    await story.send(
        ratelimit.RateLimitConfigured(requests=10, per="second"),
        service_id=web.service_id,
        until=["WebPolicyUpdated", "WebPolicyRejected"],
    )
    policy = await story.ask(ratelimit.GetWebPolicy(service_id=web.service_id))
    snippet = next((f for f in policy.files if "limit_req " in f.content), None)
    if snippet is not None:
        console.print(Text(f"    {snippet.path}:", style="dim"))
        for text in snippet.content.splitlines()[:8]:
            console.print(Text(f"      {text}", style="dim"))

    story.chapter("3. Multi-factor authentication for an account")
    account = f"acc-demo-{uuid.uuid4().hex[:6]}"
    story.step(f"the platform registers the account {account}")
    await story.client.publish(accounts.AccountRegistered(account_id=account, email=f"{account}@example.com"))
    await wait_for_account(story, account)
    story.step(
        "set up an authenticator app (request/reply: the secret never travels in an event)",
        f"palisade mfa setup-totp {account}",
    )
    setup: mfa.MfaTotpSetupReply = await story.ask(mfa.MfaTotpSetupRequested(), account_id=account)
    if not setup.accepted or setup.secret is None:
        raise DemoError(f"TOTP setup refused: {setup.reason}")
    console.print(Text(f"    reply: otpauth URI and QR code ({len(setup.qr_svg or '')} bytes of SVG)", style="dim"))
    # The authenticator app reads the workers' clock (`palisade clock advance` may have moved it).
    offset = OffsetFileClock(clock_file).offset().total_seconds() if clock_file is not None else 0.0
    totp = pyotp.TOTP(setup.secret)

    def code_now() -> str:
        return totp.at(time.time() + offset)

    confirm: mfa.MfaTotpConfirmReply = await story.ask(mfa.MfaTotpConfirmRequested(code=code_now()), account_id=account)
    if not confirm.enabled:
        raise DemoError(f"TOTP confirmation refused: {confirm.reason}")
    console.print(
        Text(f"    enabled; {len(confirm.recovery_codes)} recovery codes in the reply, shown once", style="dim")
    )
    await story.follow(
        lambda s: s.account_id == account and s.kind == "event" and s.type.endswith("MfaTotpEnabled"),
        lambda got: bool(got),
    )

    story.step("log in with the authenticator's code")
    # The confirmation spent this 30-second step's code, and a step is never accepted twice:
    # like a person, the demo waits for the app's next code.
    wait = totp.interval - (time.time() + offset) % totp.interval + 0.5
    story.note(f"(the confirmation used the current code; waiting {wait:.0f}s for the next one)")
    await asyncio.sleep(wait)
    login = f"login-{uuid.uuid4().hex[:8]}"
    await story.send(
        mfa.LoginChallengeRequested(login_id=login),
        account_id=account,
        until=["LoginChallengeIssued", "LoginChallengeRejected"],
    )
    await story.send(
        mfa.LoginCodeSubmitted(login_id=login, code=code_now()), account_id=account, until=["LoginCodeChecked"]
    )
    story.step("another login: five wrong codes lock the account for 15 minutes")
    login = f"login-{uuid.uuid4().hex[:8]}"
    await story.send(
        mfa.LoginChallengeRequested(login_id=login),
        account_id=account,
        until=["LoginChallengeIssued", "LoginChallengeRejected"],
    )
    for attempt in range(5):
        # Far from the current code and its neighbours, so never valid by chance.
        wrong = f"{(int(code_now()) + 500_000 + attempt) % 1_000_000:06d}"
        await story.send(
            mfa.LoginCodeSubmitted(login_id=login, code=wrong), account_id=account, until=["LoginCodeChecked"]
        )
    await story.follow(lambda s: s.account_id == account and s.type.endswith("MfaLocked"), lambda got: bool(got))

    story.chapter("4. Termination protection and the 7-day backup grace period")
    sid, name = doomed.service_id, doomed.name
    story.step(f"turn termination protection on for {sid}", f"palisade lifecycle protect {sid} --on")
    await story.send(
        lifecycle.TerminationProtectionEnableRequested(),
        service_id=sid,
        until=["TerminationProtectionEnabled", "TerminationProtectionChangeRejected"],
    )
    story.step("delete it: refused", f"palisade lifecycle delete {sid} --confirm {name}")
    await story.send(
        lifecycle.ServiceDeleteRequested(confirm_name=name),
        service_id=sid,
        until=["ServiceDeleteRejected", "BackupRequested"],
    )
    story.step("reboot it: refused too")
    await story.send(
        lifecycle.ServiceRebootRequested(), service_id=sid, until=["ServiceRebootRejected", "ServiceRebootApproved"]
    )
    story.step("protection off", f"palisade lifecycle protect {sid} --off")
    await story.send(
        lifecycle.TerminationProtectionDisableRequested(),
        service_id=sid,
        until=["TerminationProtectionDisabled", "TerminationProtectionChangeRejected"],
    )
    story.step(
        "delete it, keeping a backup: backup, approval, deprovisioning, every worker forgets it",
        f"palisade lifecycle delete {sid} --confirm {name}",
    )
    await story.send(
        lifecycle.ServiceDeleteRequested(confirm_name=name, keep_backup=True),
        service_id=sid,
        until=["ServiceDeprovisioned", "ServiceDeletionHalted", "ServiceDeleteRejected"],
        timeout=timeout * 2,
    )
    await every_worker_forgot(story, sid)
    status: lifecycle.LifecycleStatusReply = await story.ask(lifecycle.LifecycleStatus(service_id=sid))
    for b in status.backups:
        console.print(Text(f"    backup {b.backup_id}: {b.state}, purge at {b.purge_at}", style="dim"))

    story.step("seven days later: the backup is purged, exactly once", "palisade clock advance 7d")
    if clock_file is None:
        story.note("no PALISADE_CLOCK_OFFSET_FILE: the workers run on real time, so the purge comes in 7 days")
    else:
        clock = OffsetFileClock(clock_file)
        clock.advance(timedelta(days=7, minutes=1))
        story.note(f"workers' clock offset now {clock.offset()}")
        await story.follow(
            lambda s: s.service_id == sid and s.type.endswith(("BackupPurgeRequested", "BackupPurged", "BackupPurge")),
            lambda got: types_seen(got, "BackupPurged"),
            timeout=timeout * 2,
        )

    story.chapter("Where to look")
    for worker, port in METRICS.items():
        console.print(Text(f"  {worker:<11} http://127.0.0.1:{port}/metrics   /healthz"))
    console.print(Text("  the audit stream:   .venv/bin/palisade audit tail --follow [--worker lifecycle]"))
    console.print(Text("  parked messages:    .venv/bin/palisade dead list <worker>   (dead replay <worker>)"))


async def every_worker_forgot(story: Story, service_id: str) -> None:
    """Each worker's view of a deprovisioned service: refused as unknown once its
    projection has the ServiceDeprovisioned."""
    questions: dict[str, Query] = {
        "firewall": firewall.GetFirewall(service_id=service_id),
        "ratelimit": ratelimit.GetWebPolicy(service_id=service_id),
        "tls": tls.GetDomains(service_id=service_id),
        "sshkeys": sshkeys.ListSshKeys(service_id=service_id),
        "smtp-relay": smtp.RelayStatus(service_id=service_id),
    }
    loop = asyncio.get_running_loop()
    for worker, query in questions.items():
        deadline = loop.time() + story.timeout
        while True:
            try:
                await story.client.request(query, service_id=service_id, timeout=5.0)
            except QueryRejectedError as exc:
                story.console.print(Text(f"    {worker:<11} {query.type_name()}: refused, {exc.reason}", style="dim"))
                break
            except QueryTimeout:
                pass
            if loop.time() > deadline:
                raise DemoError(f"{worker} still knows {service_id}")
            await asyncio.sleep(0.2)


async def wait_for_tls_domains(story: Story, service_id: str) -> None:
    """The firewall learns domains from the TLS worker's DomainAccepted; wait until it has."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + story.timeout
    while True:
        state: firewall.FirewallState = await story.ask(firewall.GetFirewall(service_id=service_id))
        if state.tls_domains >= 2:  # the hostname and the new domain
            return
        if loop.time() > deadline:
            raise DemoError("the firewall did not learn the TLS domains")
        await asyncio.sleep(0.2)


async def wait_for_account(story: Story, account_id: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + story.timeout
    while True:
        with contextlib.suppress(QueryRejectedError, QueryTimeout):
            reply: Reply = await story.client.request(mfa.MfaStatus(), account_id=account_id, timeout=5.0)
            story.console.print(
                Text(f"    MFA mode {getattr(reply, 'mode', '?')} (email codes by default)", style="dim")
            )
            return
        if loop.time() > deadline:
            raise DemoError(f"the MFA worker does not know {account_id}")
        await asyncio.sleep(0.2)
