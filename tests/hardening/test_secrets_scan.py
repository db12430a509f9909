"""The session-wide secrets scan (tests/hardening/hardening_secrets_scan.py, a plugin of the root
conftest): it can fail, and it is fed by the workers themselves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from palisade_events.topology import AUDIT_EXCHANGE, AUDIT_LOG, EVENTS_EXCHANGE, EVENTS_LOG
from tests.fixtures import AMQP_URL
from tests.hardening.hardening_secrets_scan import SEEN, Secrets, findings_in_body, findings_in_logs, read_stream

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "services" / "mfa" / "tests"))
from test_mfa_worker import Harness, h, smtp, spy  # type: ignore[import-not-found]  # noqa: E402, F401 - fixtures


def test_the_scan_finds_a_planted_secret_a_code_and_a_private_key() -> None:
    planted = Secrets()
    planted.keep("JBSWY3DPEHPK3PXPJBSWY3DP")
    planted.keep("abcd-efgh-ijkl")
    planted.codes.add("492039")

    def body(**payload: object) -> bytes:
        return json.dumps({"type": "X", "occurred_at": "2026-11-25T09:00:07.492039+00:00", "payload": payload}).encode()

    assert findings_in_body(body(note="secret JBSWY3DPEHPK3PXPJBSWY3DP here"), "events", planted)
    assert findings_in_body(body(note="abcdefghijkl"), "events", planted)  # typed without its dash
    assert findings_in_body(body(code="492039"), "audit", planted)
    assert findings_in_body(body(note="your code: 492039."), "audit", planted)
    assert findings_in_body(body(key="-----BEGIN EC PRIVATE KEY-----\nMHc"), "audit", Secrets())
    assert findings_in_logs(["palisade.mfa sent JBSWY3DPEHPK3PXPJBSWY3DP"], planted)
    # Not a hit: the same digits inside a timestamp, a longer number, a hex id.
    assert not findings_in_body(body(n="1492039", id="a492039b"), "events", planted)


async def test_the_workers_own_secrets_are_recorded_and_none_has_left_so_far(h: Harness) -> None:  # noqa: F811
    account_id, address = await h.register()
    _, code = await h.login_by_email(account_id, address)
    secret, recovery = await h.enable_totp(account_id)
    assert code in SEEN.codes
    assert secret in SEEN.long
    assert set(recovery) <= SEEN.long
    found = [
        f
        for exchange, stream in ((EVENTS_EXCHANGE, EVENTS_LOG), (AUDIT_EXCHANGE, AUDIT_LOG))
        for b in await read_stream(AMQP_URL, exchange, stream)
        for f in findings_in_body(b, stream)
    ]
    assert not found, found
    assert not findings_in_logs(SEEN.logs)
