"""MFA attacks: timing-safe comparisons (read from the code), and codes of one account tried
against another's login, by email and by TOTP, with the lockout holding throughout. The MFA
worker's own tests already cover a code bound to its login id, reuse, and the lockout across
mode switching (services/mfa/tests/test_mfa_worker.py); these use its harness."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import palisade_mfa

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "services" / "mfa" / "tests"))
from test_mfa_worker import Harness, h, smtp, spy  # type: ignore[import-not-found]  # noqa: E402, F401 - fixtures

SECRET_WORDS = ("code", "secret", "digest", "hash", "token", "otp", "typed", "expected")


def _names(node: ast.AST) -> set[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id.lower())
        elif isinstance(n, ast.Attribute):
            out.add(n.attr.lower())
    return out


def test_no_secret_is_compared_with_a_plain_equality() -> None:
    """`==` on a code or hash stops at the first differing byte: the time tells an attacker how much
    of a guess was right. Every such comparison in the MFA package goes through hmac.compare_digest."""
    offenders = []
    package = Path(palisade_mfa.__file__).parent
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops):
                continue
            operands = [node.left, *node.comparators]
            # Comparing with None, a literal or a length is not comparing secrets.
            if any(isinstance(o, ast.Constant) for o in operands):
                continue
            if any(isinstance(o, ast.Call) and getattr(o.func, "id", "") == "len" for o in operands):
                continue
            if any(word in name for name in _names(node) for word in SECRET_WORDS):
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders


def test_the_verify_paths_use_compare_digest() -> None:
    from palisade_mfa import crypto, domain

    for fn in (domain.verify_totp, crypto.Keyring.matches):
        source = ast.unparse(ast.parse(__import__("inspect").getsource(fn).strip()))
        assert "hmac.compare_digest(" in source, fn.__qualname__


async def test_another_accounts_email_code_is_refused_and_counts_toward_the_lockout(h: Harness) -> None:  # noqa: F811
    victim, victim_address = await h.register()
    attacker, attacker_address = await h.register()
    victim_login, victim_code = await h.login_by_email(victim, victim_address)
    # The attacker collects fresh codes of its own account and replays them on the victim's login.
    for i in range(5):
        _, own_code = await h.login_by_email(attacker, attacker_address)
        if own_code == victim_code:
            continue  # one in a million: the same six digits
        reply = await h.verify(victim_login, own_code, account_id=victim)
        assert (reply.valid, reply.reason) in ((False, "invalid_code"), (False, "locked")), i
    # Five failures lock the victim: its own right code is refused now; the attacker is not locked.
    assert (await h.verify(victim_login, victim_code, account_id=victim)).reason == "locked"
    assert (await h.status(attacker)).locked_until is None


async def test_another_accounts_totp_code_is_refused(h: Harness) -> None:  # noqa: F811 - the imported fixture
    victim, _ = await h.register()
    attacker, _ = await h.register()
    victim_secret, _ = await h.enable_totp(victim)
    attacker_secret, _ = await h.enable_totp(attacker)
    h.tick()
    login_id, issued = await h.challenge(victim)
    assert issued["type"] == "LoginChallengeIssued", issued
    attacker_code, victim_code = h.totp(attacker_secret), h.totp(victim_secret)
    if attacker_code != victim_code:
        refused = await h.verify(login_id, attacker_code, account_id=victim)
        assert (refused.valid, refused.reason) == (False, "invalid_code")
    assert (await h.verify(login_id, victim_code, account_id=victim)).valid
    # Nor is the victim's login answerable under the attacker's account id.
    assert (await h.verify(login_id, victim_code, account_id=attacker)).valid is False
