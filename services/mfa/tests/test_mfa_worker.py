"""The MFA worker on the real broker and database, sending real email to a real SMTP
server (aiosmtpd) run by the test, its clock moved by hand.

For the whole module a spy listens to everything on `palisade.events` and
`palisade.audit` (and to the worker's logs); every secret, code and recovery code a
test handles is remembered, and the last test checks that none of them ever showed up
there or in the metrics.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import logging
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pyotp
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiosmtpd.controller import Controller
from prometheus_client import REGISTRY, generate_latest

from palisade_events import Actor, ManualClock, Payload, WorkerRuntime
from palisade_events.client import PalisadeClient
from palisade_events.contract import accounts
from palisade_events.contract import mfa as m
from palisade_events.topology import AUDIT_EXCHANGE, EVENTS_EXCHANGE, declare_exchanges
from palisade_mfa.crypto import KeyConfigError, generate_key
from palisade_mfa.settings import MfaSettings
from palisade_mfa.worker import spec
from tests.fixtures import AMQP_URL, DATABASE_URL, settings_for_test, unique, wait_until

START = datetime(2026, 11, 25, 9, 0, 7, tzinfo=UTC)
KEY_1 = generate_key("k1")
KEY_2 = generate_key("k2")
SCHEMA = "palisade_mfa"


# ------------------------------------------------------------------ module-wide: SMTP server, spy, secrets


@dataclass
class Mail:
    to: list[str]
    message: email.message.EmailMessage

    def text(self) -> str:
        body = self.message.get_body(("plain",))
        assert body is not None
        return str(body.get_content())

    def html(self) -> str:
        body = self.message.get_body(("html",))
        assert body is not None
        return str(body.get_content())

    def code(self) -> str:
        match = re.search(r"^ {4}(\d{6})\r?$", self.text(), re.MULTILINE)
        assert match, self.text()
        return match.group(1)


class Inbox:
    """aiosmtpd handler: keeps every message it accepts."""

    def __init__(self) -> None:
        self.mails: list[Mail] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.mails.append(Mail(list(envelope.rcpt_tos), msg))
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[Mail]:
        return [mail for mail in self.mails if address in mail.to]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = _free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


@dataclass
class Spy:
    """Everything that crossed palisade.events and palisade.audit, and every log record."""

    bodies: list[tuple[str, str, bytes]] = field(default_factory=list)  # (exchange, routing key, body)
    logs: list[str] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)  # long secrets: searched as substrings
    codes: set[str] = field(default_factory=set)  # 6-digit codes: searched as whole values

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(b) for ex, _, b in self.bodies if ex == EVENTS_EXCHANGE]

    def audits(self) -> list[dict[str, Any]]:
        return [json.loads(b) for ex, _, b in self.bodies if ex == AUDIT_EXCHANGE]

    def keep_secret(self, *values: str) -> None:
        for v in values:
            self.secrets.add(v)
            if "-" in v:
                self.secrets.add(v.replace("-", ""))

    def keep_code(self, *values: str) -> None:
        self.codes.update(values)


class _LogCapture(logging.Handler):
    def __init__(self, spy: Spy) -> None:
        super().__init__(logging.DEBUG)
        self.spy = spy

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("mail.log"):
            return  # aiosmtpd: the test's own receiving server, which is meant to see the code
        self.spy.logs.append(f"{record.name} {record.getMessage()} {record.exc_text or ''}")


@pytest.fixture(scope="module")
async def spy(amqp: AbstractRobustConnection) -> AsyncIterator[Spy]:
    found = Spy()
    channel = await amqp.channel()
    await declare_exchanges(channel)
    for exchange in (EVENTS_EXCHANGE, AUDIT_EXCHANGE):
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "#")

        async def on(msg: AbstractIncomingMessage, exchange: str = exchange) -> None:
            found.bodies.append((exchange, msg.routing_key or "", msg.body))

        await queue.consume(on, no_ack=True)
    handler = _LogCapture(found)
    palisade_logger = logging.getLogger("palisade")
    old_level = palisade_logger.level
    palisade_logger.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    yield found
    logging.getLogger().removeHandler(handler)
    palisade_logger.setLevel(old_level)
    await channel.close()


# ------------------------------------------------------------------ the harness


class Harness:
    def __init__(
        self, rt: WorkerRuntime[Any], client: PalisadeClient, spy: Spy, inbox: Inbox, clock: ManualClock
    ) -> None:
        self.rt, self.client, self.spy, self.inbox, self.clock = rt, client, spy, inbox, clock

    # accounts
    async def register(self, *, email_address: str | None = None) -> tuple[str, str]:
        account_id = unique("acc")
        address = email_address or f"{account_id}@example.com"
        await self.client.publish(
            accounts.AccountRegistered(account_id=account_id, email=address), account_id=account_id
        )
        await wait_until(lambda: self._email_known(account_id), what=f"{account_id} projected")
        return account_id, address

    async def _email_known(self, account_id: str) -> bool:
        return (await self.status(account_id)).email_known

    async def status(self, account_id: str) -> m.MfaStatusReply:
        reply: m.MfaStatusReply = await self.client.request(m.MfaStatus(), account_id=account_id, timeout=5)
        return reply

    # messages
    async def send(self, payload: Payload, account_id: str, **kw: Any) -> Any:
        return await self.client.publish(payload, account_id=account_id, **kw)

    def caused_by(self, env: Any) -> list[dict[str, Any]]:
        return [e for e in self.spy.events() if e["causation_id"] == str(env.message_id)]

    async def outcome(self, env: Any, count: int = 1) -> list[dict[str, Any]]:
        await wait_until(lambda: len(self.caused_by(env)) >= count, what=f"outcome of {env.type}")
        return self.caused_by(env)

    async def only_outcome(self, env: Any) -> dict[str, Any]:
        [event] = await self.outcome(env)
        return event

    def audits_of(self, env: Any) -> list[dict[str, Any]]:
        return [a for a in self.spy.audits() if a["message_id"] == str(env.message_id)]

    async def audit_of(self, env: Any) -> dict[str, Any]:
        await wait_until(lambda: len(self.audits_of(env)) >= 1, what=f"audit of {env.type}")
        [record] = self.audits_of(env)
        return record

    def events_of(self, account_id: str, type_name: str) -> list[dict[str, Any]]:
        return [e for e in self.spy.events() if e["account_id"] == account_id and e["type"] == type_name]

    # login
    async def challenge(self, account_id: str, login_id: str | None = None) -> tuple[str, dict[str, Any]]:
        login_id = login_id or unique("login")
        env = await self.send(m.LoginChallengeRequested(login_id=login_id), account_id)

        def decision() -> list[dict[str, Any]]:
            return [e for e in self.caused_by(env) if e["type"] in ("LoginChallengeIssued", "LoginChallengeRejected")]

        await wait_until(lambda: bool(decision()), what=f"the challenge of {login_id}")
        return login_id, decision()[0]

    async def emailed_code(self, address: str, count_before: int) -> str:
        await wait_until(lambda: len(self.inbox.to(address)) > count_before, what=f"an email to {address}")
        code = self.inbox.to(address)[-1].code()
        self.spy.keep_code(code)
        return code

    async def login_by_email(self, account_id: str, address: str) -> tuple[str, str]:
        before = len(self.inbox.to(address))
        login_id, issued = await self.challenge(account_id)
        assert issued["type"] == "LoginChallengeIssued", issued
        return login_id, await self.emailed_code(address, before)

    async def verify(self, login_id: str, code: str, account_id: str | None = None) -> m.VerifyLoginCodeReply:
        reply: m.VerifyLoginCodeReply = await self.client.request(
            m.VerifyLoginCode(login_id=login_id, code=code), account_id=account_id, timeout=5
        )
        return reply

    # TOTP
    async def setup_totp(self, account_id: str) -> m.MfaTotpSetupReply:
        reply: m.MfaTotpSetupReply = await self.client.request(
            m.MfaTotpSetupRequested(), account_id=account_id, timeout=5
        )
        if reply.secret:
            self.spy.keep_secret(reply.secret)
        return reply

    async def confirm_totp(self, account_id: str, code: str) -> m.MfaTotpConfirmReply:
        reply: m.MfaTotpConfirmReply = await self.client.request(
            m.MfaTotpConfirmRequested(code=code), account_id=account_id, timeout=5
        )
        self.spy.keep_secret(*reply.recovery_codes)
        return reply

    def totp(self, secret: str, steps: int = 0) -> str:
        code = pyotp.TOTP(secret).at(self.clock.now() + timedelta(seconds=30 * steps))
        self.spy.keep_code(code)
        return code

    async def enable_totp(self, account_id: str) -> tuple[str, list[str]]:
        setup = await self.setup_totp(account_id)
        assert setup.accepted, setup.reason
        assert setup.secret is not None
        confirm = await self.confirm_totp(account_id, self.totp(setup.secret))
        assert confirm.enabled, confirm.reason
        return setup.secret, confirm.recovery_codes

    def tick(self, seconds: float = 30) -> None:
        """The next TOTP step (a code is never accepted twice)."""
        self.clock.advance(timedelta(seconds=seconds))


def mfa_settings(port: int, key: str = KEY_1, old_keys: str | None = None) -> MfaSettings:
    return MfaSettings(
        mfa_key=key,
        mfa_old_keys=old_keys,
        platform_smtp=f"smtp://127.0.0.1:{port}",
        mfa_mail_from="Palisade <no-reply@palisade.test>",
        mfa_smtp_timeout_seconds=5,
    )


@pytest.fixture
async def h(run_worker: Any, client: PalisadeClient, spy: Spy, smtp: tuple[Inbox, int]) -> Harness:
    inbox, port = smtp
    clock = ManualClock(START)
    rt = await run_worker(spec(mfa_settings(port)), clock=clock)
    return Harness(rt, client, spy, inbox, clock)


# ------------------------------------------------------------------ email mode


async def test_a_new_account_uses_email_codes_and_the_code_arrives_by_email(h: Harness) -> None:
    account_id, address = await h.register()
    assert (await h.status(account_id)).mode == "email"
    before = len(h.inbox.to(address))
    login_id, issued = await h.challenge(account_id)
    assert issued["type"] == "LoginChallengeIssued"
    assert issued["payload"]["delivery"] == "email"
    assert issued["payload"]["expires_at"] == (START + timedelta(minutes=10)).isoformat().replace("+00:00", "Z")
    code = await h.emailed_code(address, before)
    mail = h.inbox.to(address)[-1]
    assert mail.message["From"] == "Palisade <no-reply@palisade.test>"
    assert code in mail.html()
    assert code not in mail.message["Subject"]
    assert "10 minutes" in mail.text()

    reply = await h.verify(login_id, code)
    assert (reply.valid, reply.reason) == (True, None)
    await wait_until(lambda: len(h.events_of(account_id, "LoginCodeChecked")) == 1, what="LoginCodeChecked")
    [checked] = h.events_of(account_id, "LoginCodeChecked")
    assert checked["payload"] == {"login_id": login_id, "valid": True, "reason": None, "method": "email"}
    await wait_until(
        lambda: any(a["action"] == "VerifyLoginCode" and a["account_id"] == account_id for a in h.spy.audits()),
        what="audit of VerifyLoginCode",
    )


async def test_an_email_code_works_once(h: Harness) -> None:
    account_id, address = await h.register()
    login_id, code = await h.login_by_email(account_id, address)
    assert (await h.verify(login_id, code)).valid
    again = await h.verify(login_id, code)
    assert (again.valid, again.reason) == (False, "code_already_used")
    # A verified login cannot be re-challenged to get a second code either.
    _, refused = await h.challenge(account_id, login_id)
    assert (refused["type"], refused["payload"]["reason"]) == ("LoginChallengeRejected", "code_already_used")


async def test_an_email_code_expires_after_ten_minutes(h: Harness) -> None:
    account_id, address = await h.register()
    early, early_code = await h.login_by_email(account_id, address)
    late, late_code = await h.login_by_email(account_id, address)
    h.clock.advance(timedelta(minutes=9, seconds=59))
    assert (await h.verify(early, early_code)).valid
    h.clock.advance(timedelta(seconds=1))
    expired = await h.verify(late, late_code)
    assert (expired.valid, expired.reason) == (False, "code_expired")


async def test_a_code_is_bound_to_its_login(h: Harness) -> None:
    account_id, address = await h.register()
    first, first_code = await h.login_by_email(account_id, address)
    second, second_code = await h.login_by_email(account_id, address)
    if first_code != second_code:  # both random: equal one time in a million
        assert (await h.verify(second, first_code)).reason == "invalid_code"
    assert (await h.verify(second, second_code)).valid
    other, _ = await h.register()
    assert (await h.verify(first, first_code, account_id=other)).reason == "unknown_login"
    assert (await h.verify("login-nobody", first_code)).reason == "unknown_login"


async def test_email_code_requests_are_limited_to_five_per_fifteen_minutes(h: Harness) -> None:
    account_id, address = await h.register()
    for _ in range(5):
        await h.login_by_email(account_id, address)
        h.clock.advance(timedelta(minutes=1))
    sent = len(h.inbox.to(address))
    _, refused = await h.challenge(account_id)
    assert refused["type"] == "LoginChallengeRejected"
    assert refused["payload"]["reason"] == "rate_limited"
    assert refused["payload"]["retry_at"] == (START + timedelta(minutes=15)).isoformat().replace("+00:00", "Z")
    action = await h.send(m.MfaEmailCodeRequested(), account_id)
    assert (await h.only_outcome(action))["payload"] == {"action": "email_code", "reason": "rate_limited"}
    assert len(h.inbox.to(address)) == sent
    h.clock.set(START + timedelta(minutes=15))
    await h.login_by_email(account_id, address)


async def test_the_command_form_of_verification_answers_with_an_event_and_an_audit_record(h: Harness) -> None:
    account_id, address = await h.register()
    login_id, code = await h.login_by_email(account_id, address)
    wrong = "000000" if code != "000000" else "111111"
    bad = await h.send(m.LoginCodeSubmitted(login_id=login_id, code=wrong), account_id)
    assert (await h.only_outcome(bad))["payload"]["reason"] == "invalid_code"
    record = await h.audit_of(bad)
    assert (record["outcome"], record["reason"]) == ("rejected", "invalid_code")
    good = await h.send(m.LoginCodeSubmitted(login_id=login_id, code=code), account_id)
    event = await h.only_outcome(good)
    assert (event["type"], event["payload"]["valid"], event["payload"]["method"]) == ("LoginCodeChecked", True, "email")
    assert (await h.audit_of(good))["outcome"] == "accepted"


# ------------------------------------------------------------------ TOTP


async def test_totp_setup_answers_by_request_reply_and_needs_a_valid_code(h: Harness) -> None:
    account_id, address = await h.register()
    setup = await h.setup_totp(account_id)
    assert setup.accepted
    assert setup.secret is not None
    assert len(setup.secret) == 32  # 160 bits of base32
    assert setup.otpauth_uri == pyotp.TOTP(setup.secret).provisioning_uri(name=address, issuer_name="Palisade")
    assert setup.otpauth_uri.startswith("otpauth://totp/Palisade:")
    assert "issuer=Palisade" in setup.otpauth_uri
    assert setup.qr_svg is not None
    assert setup.qr_svg.startswith("<svg")
    await wait_until(lambda: len(h.events_of(account_id, "MfaTotpSetupStarted")) == 1, what="MfaTotpSetupStarted")

    wrong = await h.confirm_totp(account_id, "000000" if h.totp(setup.secret) != "000000" else "111111")
    assert (wrong.enabled, wrong.reason, wrong.recovery_codes) == (False, "invalid_code", [])
    assert (await h.status(account_id)).mode == "email"

    confirm = await h.confirm_totp(account_id, h.totp(setup.secret))
    assert confirm.enabled
    assert len(confirm.recovery_codes) == len(set(confirm.recovery_codes)) == 10
    state = await h.status(account_id)
    assert (state.mode, state.recovery_codes_left) == ("totp", 10)
    await wait_until(lambda: len(h.events_of(account_id, "MfaTotpEnabled")) == 1, what="MfaTotpEnabled")
    [enabled] = h.events_of(account_id, "MfaTotpEnabled")
    assert enabled["payload"] == {"previous_mode": "email", "recovery_codes": 10}

    # Logging in now takes the app's code; no email is sent.
    before = len(h.inbox.to(address))
    login_id, issued = await h.challenge(account_id)
    assert issued["payload"]["delivery"] == "authenticator"
    h.tick()
    reply = await h.verify(login_id, h.totp(setup.secret))
    assert (reply.valid, reply.reason) == (True, None)
    assert len(h.inbox.to(address)) == before


async def test_a_totp_step_is_never_accepted_twice(h: Harness) -> None:
    account_id, _ = await h.register()
    secret, _ = await h.enable_totp(account_id)
    # The step that confirmed the setup is spent already.
    login_id, _ = await h.challenge(account_id)
    replay = await h.verify(login_id, h.totp(secret))
    assert (replay.valid, replay.reason) == (False, "code_already_used")
    h.tick()
    code = h.totp(secret)
    assert (await h.verify(login_id, code)).valid
    second_login, _ = await h.challenge(account_id)
    assert (await h.verify(second_login, code)).reason == "code_already_used"
    # The previous step is still inside the ±1 window, but older than the last used one.
    assert (await h.verify(second_login, h.totp(secret, steps=-1))).reason == "code_already_used"


async def test_totp_accepts_the_neighbouring_steps_and_not_further(h: Harness) -> None:
    account_id, _ = await h.register()
    secret, _ = await h.enable_totp(account_id)
    h.tick(300)
    login_id, _ = await h.challenge(account_id)
    too_old = h.totp(secret, steps=-2)
    if too_old not in {h.totp(secret, s) for s in (-1, 0, 1)}:
        assert (await h.verify(login_id, too_old)).reason == "invalid_code"
    assert (await h.verify(login_id, h.totp(secret, steps=-1))).valid
    second, _ = await h.challenge(account_id)
    assert (await h.verify(second, h.totp(secret, steps=1))).valid


async def test_setup_is_refused_while_totp_is_on_and_confirm_without_setup(h: Harness) -> None:
    account_id, _ = await h.register()
    nothing = await h.confirm_totp(account_id, "123456")
    assert (nothing.enabled, nothing.reason) == (False, "no_totp_setup_pending")
    setup = await h.setup_totp(account_id)
    assert setup.secret is not None
    h.clock.advance(timedelta(minutes=10))
    late = await h.confirm_totp(account_id, h.totp(setup.secret))
    assert (late.enabled, late.reason) == (False, "totp_setup_expired")
    await h.enable_totp(account_id)
    again = await h.setup_totp(account_id)
    assert (again.accepted, again.reason, again.secret) == (False, "totp_already_enabled", None)
    await wait_until(
        lambda: any(
            a["action"] == "MfaTotpSetupRequested" and a["account_id"] == account_id and a["outcome"] == "rejected"
            for a in h.spy.audits()
        ),
        what="audit of the refused setup",
    )


# ------------------------------------------------------------------ recovery codes


async def test_a_recovery_code_works_once(h: Harness) -> None:
    account_id, _ = await h.register()
    _, recovery = await h.enable_totp(account_id)
    login_id, _ = await h.challenge(account_id)
    typed = recovery[3].lower().replace("-", " ")  # as someone might type it from paper
    assert (await h.verify(login_id, typed)).valid
    await wait_until(lambda: len(h.events_of(account_id, "RecoveryCodeUsed")) == 1, what="RecoveryCodeUsed")
    assert h.events_of(account_id, "RecoveryCodeUsed")[0]["payload"] == {"remaining": 9}
    await wait_until(lambda: len(h.events_of(account_id, "LoginCodeChecked")) == 1, what="LoginCodeChecked")
    [checked] = h.events_of(account_id, "LoginCodeChecked")
    assert (checked["payload"]["valid"], checked["payload"]["method"]) == (True, "recovery")
    second, _ = await h.challenge(account_id)
    assert (await h.verify(second, recovery[3])).reason == "invalid_code"
    assert (await h.verify(second, recovery[4])).valid
    assert (await h.status(account_id)).recovery_codes_left == 8


# ------------------------------------------------------------------ lockout


async def test_five_wrong_codes_lock_the_account_for_fifteen_minutes(h: Harness) -> None:
    account_id, address = await h.register()
    login_id, code = await h.login_by_email(account_id, address)
    wrong = [f"{(int(code) + i) % 1_000_000:06d}" for i in range(1, 6)]
    for i, guess in enumerate(wrong):
        reply = await h.verify(login_id, guess)
        assert (reply.valid, reply.reason) == (False, "invalid_code"), i
    await wait_until(lambda: len(h.events_of(account_id, "MfaLocked")) == 1, what="MfaLocked")
    [locked] = h.events_of(account_id, "MfaLocked")
    until = START + timedelta(minutes=15)
    assert locked["payload"] == {"locked_until": until.isoformat().replace("+00:00", "Z"), "failures": 5}
    await wait_until(
        lambda: any(a["action"] == "MfaLocked" and a["account_id"] == account_id for a in h.spy.audits()),
        what="audit of the lock",
    )
    # Locked: even the right code is refused, and no new code is emailed.
    assert (await h.verify(login_id, code)).reason == "locked"
    assert (await h.status(account_id)).locked_until == until
    sent = len(h.inbox.to(address))
    _, refused = await h.challenge(account_id)
    assert refused["payload"]["reason"] == "locked"
    assert len(h.inbox.to(address)) == sent

    h.clock.set(until - timedelta(seconds=1))
    assert (await h.verify(login_id, code)).reason == "locked"
    h.clock.set(until)
    login_id, code = await h.login_by_email(account_id, address)
    assert (await h.verify(login_id, code)).valid
    assert (await h.status(account_id)).locked_until is None


async def test_the_lockout_counts_every_path_and_survives_mode_switching(h: Harness) -> None:
    """One counter per account: wrong codes through login (query and command), disable,
    and the TOTP-to-email downgrade all count, and switching modes neither resets it nor
    gets around the lock."""
    account_id, address = await h.register()
    secret, recovery = await h.enable_totp(account_id)
    h.tick()
    bad = "000000" if h.totp(secret) != "000000" else "111111"
    login_id, _ = await h.challenge(account_id)
    assert (await h.verify(login_id, bad)).reason == "invalid_code"
    submitted = await h.send(m.LoginCodeSubmitted(login_id=login_id, code=bad), account_id)
    assert (await h.only_outcome(submitted))["payload"]["reason"] == "invalid_code"
    disable = await h.send(m.MfaDisableRequested(confirmation="disable", code=bad), account_id)
    assert (await h.only_outcome(disable))["payload"]["reason"] == "invalid_code"
    downgrade = await h.send(m.MfaEmailEnableRequested(code=bad), account_id)
    assert (await h.only_outcome(downgrade))["payload"]["reason"] == "invalid_code"
    assert (await h.verify(login_id, "ZZZZZ-ZZZZZ")).reason == "invalid_code"  # a wrong recovery code: the 5th
    await wait_until(lambda: len(h.events_of(account_id, "MfaLocked")) == 1, what="MfaLocked")

    # Every way around it is refused while locked, with the right codes in hand.
    assert (await h.verify(login_id, h.totp(secret))).reason == "locked"
    assert (await h.verify(login_id, recovery[0])).reason == "locked"
    switch = await h.send(m.MfaEmailEnableRequested(code=h.totp(secret)), account_id)
    assert (await h.only_outcome(switch))["payload"]["reason"] == "locked"
    off = await h.send(m.MfaDisableRequested(confirmation="disable", code=recovery[0]), account_id)
    assert (await h.only_outcome(off))["payload"]["reason"] == "locked"
    assert (await h.setup_totp(account_id)).reason == "locked"
    _, refused = await h.challenge(account_id)
    assert refused["payload"]["reason"] == "locked"
    state = await h.status(account_id)
    assert (state.mode, state.recovery_codes_left) == ("totp", 10)
    assert not h.inbox.to(address)

    h.clock.advance(timedelta(minutes=15))
    back = await h.send(m.MfaEmailEnableRequested(code=h.totp(secret)), account_id)
    assert (await h.only_outcome(back))["type"] == "MfaEmailEnabled"
    assert (await h.status(account_id)).mode == "email"


async def test_leaving_totp_for_email_needs_a_code(h: Harness) -> None:
    account_id, _ = await h.register()
    secret, _ = await h.enable_totp(account_id)
    without = await h.send(m.MfaEmailEnableRequested(), account_id)
    assert (await h.only_outcome(without))["payload"] == {"action": "email_enable", "reason": "code_required"}
    assert (await h.audit_of(without))["reason"] == "code_required"
    h.tick()
    ok = await h.send(m.MfaEmailEnableRequested(code=h.totp(secret)), account_id)
    assert (await h.only_outcome(ok))["payload"] == {"previous_mode": "totp"}
    state = await h.status(account_id)
    assert (state.mode, state.recovery_codes_left) == ("email", 0)


# ------------------------------------------------------------------ disable and support reset


async def test_disable_is_refused_without_the_word_with_a_wrong_word_and_without_a_code(h: Harness) -> None:
    account_id, _ = await h.register()
    secret, _ = await h.enable_totp(account_id)
    h.tick()
    cases = [
        (m.MfaDisableRequested(code=h.totp(secret)), "confirmation_required"),
        (m.MfaDisableRequested(confirmation="Disable", code=h.totp(secret)), "confirmation_mismatch"),
        (m.MfaDisableRequested(confirmation="disable please", code=h.totp(secret)), "confirmation_mismatch"),
        (m.MfaDisableRequested(confirmation="disable"), "code_required"),
        (m.MfaDisableRequested(confirmation="disable", code=""), "code_required"),
    ]
    for payload, reason in cases:
        env = await h.send(payload, account_id)
        event = await h.only_outcome(env)
        assert (event["type"], event["payload"]) == ("MfaChangeRejected", {"action": "disable", "reason": reason})
        record = await h.audit_of(env)
        assert (record["action"], record["outcome"], record["reason"]) == ("MfaDisableRequested", "rejected", reason)
    assert (await h.status(account_id)).mode == "totp"
    ok = await h.send(m.MfaDisableRequested(confirmation="disable", code=h.totp(secret)), account_id)
    assert (await h.only_outcome(ok))["payload"] == {"previous_mode": "totp", "by": "user", "ticket": None}
    record = await h.audit_of(ok)
    assert (record["outcome"], record["detail"]["method"]) == ("accepted", "totp")
    state = await h.status(account_id)
    assert (state.mode, state.recovery_codes_left) == ("disabled", 0)
    # A disabled account's login needs no code.
    _, issued = await h.challenge(account_id)
    assert issued["payload"]["delivery"] == "none"


async def test_disable_in_email_mode_takes_an_emailed_code(h: Harness) -> None:
    account_id, address = await h.register()
    before = len(h.inbox.to(address))
    asked = await h.send(m.MfaEmailCodeRequested(), account_id)
    assert (await h.only_outcome(asked))["payload"]["purpose"] == "account_action"
    code = await h.emailed_code(address, before)
    assert "two-factor authentication" in h.inbox.to(address)[-1].text()
    h.clock.advance(timedelta(minutes=3))
    env = await h.send(m.MfaDisableRequested(confirmation="disable", code=code), account_id)
    assert (await h.only_outcome(env))["type"] == "MfaDisabled"
    # Spent: back in email mode, the same code no longer disables.
    enable = await h.send(m.MfaEmailEnableRequested(), account_id)
    await h.outcome(enable)
    again = await h.send(m.MfaDisableRequested(confirmation="disable", code=code), account_id)
    assert (await h.only_outcome(again))["payload"]["reason"] == "invalid_code"


async def test_a_recovery_code_can_disable(h: Harness) -> None:
    account_id, _ = await h.register()
    _, recovery = await h.enable_totp(account_id)
    env = await h.send(m.MfaDisableRequested(confirmation="disable", code=recovery[0]), account_id)
    assert [e["type"] for e in await h.outcome(env, 2)] == ["RecoveryCodeUsed", "MfaDisabled"]
    assert (await h.audit_of(env))["detail"]["method"] == "recovery"


async def test_support_reset_is_audited_with_operator_and_ticket(h: Harness) -> None:
    account_id, _ = await h.register()
    await h.enable_totp(account_id)
    not_support = await h.send(m.MfaResetBySupport(ticket="SUP-1", operator="mallory"), account_id)
    assert (await h.only_outcome(not_support))["payload"]["reason"] == "support_actor_required"
    assert (await h.status(account_id)).mode == "totp"

    env = await h.send(
        m.MfaResetBySupport(ticket="SUP-20931", operator="jane.support"),
        account_id,
        actor=Actor(kind="support", id="jane.support"),
    )
    event = await h.only_outcome(env)
    assert (event["type"], event["payload"]) == (
        "MfaDisabled",
        {"previous_mode": "totp", "by": "support", "ticket": "SUP-20931"},
    )
    record = await h.audit_of(env)
    assert (record["action"], record["outcome"]) == ("MfaResetBySupport", "accepted")
    assert record["actor"] == {"kind": "support", "id": "jane.support"}
    assert record["detail"]["operator"] == "jane.support"
    assert record["detail"]["ticket"] == "SUP-20931"
    assert record["detail"]["previous_mode"] == "totp"
    assert (await h.status(account_id)).mode == "disabled"


# ------------------------------------------------------------------ secrets at rest, keys


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


MFA_TABLES = ("accounts", "login_challenges", "action_codes", "recovery_codes")


async def _dump_schema() -> str:
    """The worker's own tables as JSON, plus the events and audit records of its outbox."""
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        out: list[str] = []
        for table in MFA_TABLES:
            rows = await conn.fetch(f'SELECT row_to_json(x)::text AS j FROM "{SCHEMA}"."{table}" x')
            out.extend(r["j"] for r in rows)
        bodies = await conn.fetch(f"SELECT convert_from(body, 'UTF8') AS b FROM \"{SCHEMA}\".outbox")
        out.extend(r["b"] for r in bodies)
        return "\n".join(out)
    finally:
        await conn.close()


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z0-9]+", text))


async def test_the_totp_secret_column_does_not_hold_the_secret_in_clear(h: Harness) -> None:
    account_id, address = await h.register()
    secret, recovery = await h.enable_totp(account_id)
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        row = await conn.fetchrow(
            f'SELECT totp_key_id, totp_secret FROM "{SCHEMA}".accounts WHERE account_id = $1', account_id
        )
    finally:
        await conn.close()
    assert row is not None
    stored = bytes(row["totp_secret"])
    assert row["totp_key_id"] == "k1"
    raw_secret = pyotp.TOTP(secret).byte_secret()
    for form in (secret.encode(), secret.lower().encode(), raw_secret, raw_secret.hex().encode()):
        assert form not in stored
    assert len(stored) == 12 + len(secret) + 16  # nonce, ciphertext, tag
    # Nowhere else in the worker's tables either: not the secret, not a recovery code, not an email code.
    _, email_code = await h.login_by_email(*(await h.register()))
    dump = await _dump_schema()
    assert secret not in dump
    assert raw_secret.hex() not in dump
    for code in recovery:
        assert code not in dump
        assert code.replace("-", "") not in dump
    assert email_code not in _tokens(dump)
    assert address in dump  # the dump did read the tables


async def test_key_rotation_keeps_old_secrets_working_and_reencrypts_them(
    h: Harness, run_worker: Any, smtp: tuple[Inbox, int]
) -> None:
    account_id, _ = await h.register()
    secret, recovery = await h.enable_totp(account_id)
    await h.rt.stop()

    _, port = smtp
    # Without the old key the worker refuses to start: those accounts could not log in.
    refusing: WorkerRuntime[Any] = WorkerRuntime(
        spec(mfa_settings(port, key=KEY_2)), settings_for_test(), clock=h.clock
    )
    with pytest.raises(KeyConfigError, match="k1"):
        await refusing.start()
    await refusing.stop()

    rotated = await run_worker(spec(mfa_settings(port, key=KEY_2, old_keys=KEY_1)), clock=h.clock)

    async def key_id() -> str:
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            return str(
                await conn.fetchval(f'SELECT totp_key_id FROM "{SCHEMA}".accounts WHERE account_id = $1', account_id)
            )
        finally:
            await conn.close()

    # The re-encryption job runs at start (and every few minutes) until nothing is left under old keys.
    await wait_until(lambda: _eq(key_id(), "k2"), what="the TOTP secret re-encrypted under k2")
    assert await rotated.run_job("reencrypt-secrets") == 0
    await wait_until(
        lambda: any(a["action"] == "SecretsReencrypted" for a in h.spy.audits()), what="audit of the re-encryption"
    )
    h.tick()
    login_id, _ = await h.challenge(account_id)
    assert (await h.verify(login_id, h.totp(secret))).valid
    # Recovery codes were hashed under k1 and stay checkable while k1 is configured.
    second, _ = await h.challenge(account_id)
    assert (await h.verify(second, recovery[0])).valid


async def test_metrics_count_verifications_lockouts_and_accounts_by_mode(h: Harness) -> None:
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    valid_before = sample("palisade_mfa_verifications_total", mode="email", result="valid")
    invalid_before = sample("palisade_mfa_verifications_total", mode="email", result="invalid_code")
    locks_before = sample("palisade_mfa_lockouts_total")
    account_id, address = await h.register()
    login_id, code = await h.login_by_email(account_id, address)
    assert (await h.verify(login_id, code)).valid
    other, other_address = await h.register()
    other_login, other_code = await h.login_by_email(other, other_address)
    for i in range(5):
        await h.verify(other_login, f"{(int(other_code) + 1 + i) % 1_000_000:06d}")
    totp_account, _ = await h.register()
    await h.enable_totp(totp_account)
    assert sample("palisade_mfa_verifications_total", mode="email", result="valid") == valid_before + 1
    assert sample("palisade_mfa_verifications_total", mode="email", result="invalid_code") == invalid_before + 5
    assert sample("palisade_mfa_lockouts_total") == locks_before + 1
    await h.rt.run_job("refresh-gauges")
    assert sample("palisade_mfa_accounts", mode="email") == 2
    assert sample("palisade_mfa_accounts", mode="totp") == 1
    assert sample("palisade_mfa_stored_secrets", kind="recovery_code", key_id="k1") == 10


# ------------------------------------------------------------------ the CLI


async def _cli(*args: str, stdin: bytes | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "palisade_mfa.cli",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PALISADE_AMQP_URL": AMQP_URL, "COLUMNS": "200", "PYTHONIOENCODING": "utf-8"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_cli_sets_up_totp_with_a_terminal_qr_code_and_verifies(h: Harness) -> None:
    account_id, _ = await h.register()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "palisade_mfa.cli",
        "setup-totp",
        account_id,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PALISADE_AMQP_URL": AMQP_URL, "COLUMNS": "200", "PYTHONIOENCODING": "utf-8"},
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    shown: list[str] = []
    async with asyncio.timeout(30):
        while not any(line.startswith("Secret: ") for line in shown):
            line = (await proc.stdout.readline()).decode()
            assert line, "".join(shown)
            shown.append(line)
    secret = next(line for line in shown if line.startswith("Secret: ")).split()[1]
    h.spy.keep_secret(secret)
    assert any("\u2580" in line or "\u2584" in line or "\u2588" in line for line in shown), (
        "a QR code in block characters"
    )
    proc.stdin.write(f"{h.totp(secret)}\n".encode())
    await proc.stdin.drain()
    rest, _ = await asyncio.wait_for(proc.communicate(), 30)
    output = "".join(shown) + rest.decode()
    assert proc.returncode == 0, output
    assert "otpauth://totp/" in output
    recovery = re.findall(r"^\s+([0-9A-Z]{5}-[0-9A-Z]{5})$", output, re.MULTILINE)
    assert len(recovery) == 10
    h.spy.keep_secret(*recovery)
    assert (await h.status(account_id)).mode == "totp"

    login_id, _ = await h.challenge(account_id)
    code, out = await _cli("verify", login_id, recovery[0])
    assert (code, out.strip()) == (0, "valid")
    code, out = await _cli("verify", login_id, recovery[1])
    assert (code, out.strip()) == (1, "invalid: code_already_used")


# ------------------------------------------------------------------ last: nothing secret ever leaked


def _walk(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)
    else:
        yield value


def _is_timestamp(value: str) -> bool:
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _leaks(text: str, spy: Spy) -> list[str]:
    """Long secrets as substrings (any case, with or without dashes); 6-digit codes as
    whole tokens, so that ids and numbers that merely contain the digits do not count."""
    found = [s for s in spy.secrets if s.lower() in text.lower()]
    found += sorted(_tokens(text) & spy.codes)
    return found


async def test_zz_no_secret_code_or_recovery_code_ever_crossed_events_audit_logs_or_metrics(spy: Spy) -> None:
    """Runs last in this module (pytest keeps file order) and checks everything the spy saw."""
    assert spy.secrets, "the tests above handled secrets"
    assert spy.codes, "the tests above handled codes"
    assert spy.events()
    assert spy.audits()
    for exchange, routing_key, body in spy.bodies:
        assert not [s for s in spy.secrets if s.lower() in body.decode().lower()], (exchange, routing_key)
        for value in _walk(json.loads(body)):
            if isinstance(value, str) and not _is_timestamp(value):  # timestamps: the test clock's own
                assert not _leaks(value, spy), (exchange, routing_key, value)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 100_000:
                assert str(value) not in spy.codes, (exchange, routing_key)
    for line in spy.logs:
        assert not _leaks(line, spy), line
    metrics = generate_latest().decode()
    assert not [s for s in spy.secrets if s.lower() in metrics.lower()]
    for family in REGISTRY.collect():
        for sample in family.samples:
            for label_value in sample.labels.values():
                assert not _leaks(label_value, spy), (sample.name, label_value)
