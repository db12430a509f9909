"""The pure MFA core, the keys and the email rendering: no broker, no database."""

from __future__ import annotations

import base64
import hmac
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyotp
import pytest

from palisade_mfa import domain
from palisade_mfa.crypto import DecryptionError, KeyConfigError, Keyring, UnknownKeyError, generate_key, parse_key
from palisade_mfa.domain import Account, Challenge, Lockout
from palisade_mfa.mail import render_code_email
from palisade_mfa.settings import MfaSettings, SmtpTarget

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# ------------------------------------------------------------------ RFC 6238 Appendix B

RFC6238_SHA1_SECRET = b"12345678901234567890"
RFC6238_SHA1_VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


@pytest.mark.parametrize(("unix_time", "expected"), RFC6238_SHA1_VECTORS)
def test_rfc6238_appendix_b_vectors_pass_our_verifier(unix_time: int, expected: str) -> None:
    now = at(unix_time)
    assert domain.hotp(RFC6238_SHA1_SECRET, domain.totp_step(now), digits=8) == expected
    check = domain.verify_totp(RFC6238_SHA1_SECRET, expected, now, last_used_step=None, digits=8, window=0)
    assert check.valid
    assert check.step == unix_time // 30


@pytest.mark.parametrize(("unix_time", "expected"), RFC6238_SHA1_VECTORS)
def test_rfc6238_vectors_are_refused_far_from_their_time(unix_time: int, expected: str) -> None:
    for offset in (-90, 90, 3600):
        check = domain.verify_totp(RFC6238_SHA1_SECRET, expected, at(unix_time + offset), last_used_step=None, digits=8)
        assert not check.valid
        assert check.reason == "invalid_code"


def test_our_hotp_agrees_with_pyotp() -> None:
    for _ in range(50):
        secret = domain.new_totp_secret()
        step = int.from_bytes(os.urandom(4), "big")
        assert domain.hotp(domain.totp_key(secret), step) == pyotp.HOTP(secret).at(step)
        now = at(step * 30 + 7)
        assert domain.hotp(domain.totp_key(secret), domain.totp_step(now)) == pyotp.TOTP(secret).at(now)


def test_new_totp_secret_is_160_bits_of_base32() -> None:
    secrets_seen = {domain.new_totp_secret() for _ in range(100)}
    assert len(secrets_seen) == 100
    for s in secrets_seen:
        assert len(s) == 32
        assert len(domain.totp_key(s)) == 20
        assert base64.b32decode(s) == domain.totp_key(s)


# ------------------------------------------------------------------ TOTP window and replay


def test_current_step_and_one_either_side_are_accepted_not_two() -> None:
    key = RFC6238_SHA1_SECRET  # fixed, so the five codes below are known to differ
    now = at(1234567890)
    step = domain.totp_step(now)
    codes = {delta: domain.hotp(key, step + delta) for delta in (-2, -1, 0, 1, 2)}
    assert len(set(codes.values())) == 5
    for delta, code in codes.items():
        check = domain.verify_totp(key, code, now, last_used_step=None)
        assert check.valid is (abs(delta) <= 1), delta


def test_a_step_is_never_accepted_twice_nor_an_older_one() -> None:
    key = domain.totp_key(domain.new_totp_secret())
    now = T0
    step = domain.totp_step(now)
    first = domain.verify_totp(key, domain.hotp(key, step), now, last_used_step=None)
    assert first.valid
    again = domain.verify_totp(key, domain.hotp(key, step), now, last_used_step=first.step)
    assert (again.valid, again.reason, again.step) == (False, "code_already_used", step)
    older = domain.verify_totp(key, domain.hotp(key, step - 1), now, last_used_step=first.step)
    assert (older.valid, older.reason) == (False, "code_already_used")
    later = domain.verify_totp(key, domain.hotp(key, step + 1), now + timedelta(seconds=30), last_used_step=step)
    assert later.valid


@pytest.mark.parametrize("typed", ["", "12345", "1234567", "abcdef", "١٢٣٤٥٦", "12 34 5x"])
def test_malformed_totp_codes_are_invalid(typed: str) -> None:
    key = domain.totp_key(domain.new_totp_secret())
    assert domain.verify_totp(key, typed, T0, last_used_step=None).reason == "invalid_code"


def test_spaces_in_a_typed_totp_code_are_forgiven() -> None:
    key = domain.totp_key(domain.new_totp_secret())
    code = domain.hotp(key, domain.totp_step(T0))
    assert domain.verify_totp(key, f"{code[:3]} {code[3:]}", T0, last_used_step=None).valid


# ------------------------------------------------------------------ email codes


def test_email_codes_are_six_digits_from_the_whole_range() -> None:
    codes = [domain.new_email_code() for _ in range(3000)]
    assert all(len(c) == 6 and c.isdigit() for c in codes)
    assert any(c.startswith("0") for c in codes)  # leading zeros are kept (P(miss) ~ 1e-137)
    assert len(set(codes)) > 2900


# ------------------------------------------------------------------ lockout


def test_five_failures_in_fifteen_minutes_lock_for_fifteen_minutes() -> None:
    lock = Lockout()
    for i in range(4):
        lock = lock.after_failure(T0 + timedelta(minutes=3 * i))
        assert not lock.is_locked(T0 + timedelta(minutes=3 * i))
    fifth = T0 + timedelta(minutes=14)
    locked = lock.after_failure(fifth)
    assert locked.just_locked(lock, fifth)
    assert locked.locked_until == fifth + timedelta(minutes=15)
    assert locked.is_locked(fifth + timedelta(minutes=14, seconds=59))
    assert not locked.is_locked(fifth + timedelta(minutes=15))


def test_failures_older_than_the_window_do_not_count() -> None:
    lock = Lockout()
    for i in range(4):
        lock = lock.after_failure(T0 + timedelta(minutes=i))
    # 15 minutes after the first failure it has left the window: 4 in the window, no lock.
    later = lock.after_failure(T0 + timedelta(minutes=15))
    assert not later.is_locked(T0 + timedelta(minutes=15))
    assert len(later.failures) == 4


def test_a_valid_code_clears_the_failures() -> None:
    lock = Lockout().after_failure(T0).after_failure(T0)
    assert lock.after_success() == Lockout()


def test_the_lock_is_the_accounts_whatever_its_mode() -> None:
    locked = Lockout(locked_until=T0 + timedelta(minutes=15))
    for mode in ("email", "totp"):
        account = Account("acc-1", mode, "a@example.com", lockout=locked)
        assert domain.refuse_email_code(account, T0) == ("locked", locked.locked_until)
        assert domain.refuse_totp_setup(account, T0) in ("locked",)
        assert domain.refuse_email_enable(account, "123456", T0) == "locked"
        assert domain.refuse_disable(account, "disable", "123456", T0) == "locked"
        challenge = Challenge("l-1", "acc-1", mode, T0 + timedelta(minutes=10))
        assert domain.refuse_login_code(account, challenge, T0) == "locked"


# ------------------------------------------------------------------ email rate limit


def test_five_email_codes_per_fifteen_minutes() -> None:
    sent: list[datetime] = []
    for i in range(5):
        now = T0 + timedelta(minutes=i)
        assert domain.email_code_allowance(sent, now).allowed
        sent.append(now)
    refused = domain.email_code_allowance(sent, T0 + timedelta(minutes=5))
    assert not refused.allowed
    assert refused.retry_at == T0 + timedelta(minutes=15)
    assert domain.email_code_allowance(sent, T0 + timedelta(minutes=15)).allowed


# ------------------------------------------------------------------ disable form checks


@pytest.mark.parametrize(
    ("confirmation", "code", "reason"),
    [
        ("", "123456", "confirmation_required"),
        ("Disable", "123456", "confirmation_mismatch"),
        ("disable ", "123456", "confirmation_mismatch"),
        ("DISABLE", "123456", "confirmation_mismatch"),
        ("disable", None, "code_required"),
        ("disable", "", "code_required"),
        ("disable", "123456", None),
    ],
)
def test_disable_needs_exactly_the_word_and_a_code(confirmation: str, code: str | None, reason: str | None) -> None:
    account = Account("acc-1", "totp", None)
    assert domain.refuse_disable(account, confirmation, code, T0) == reason


def test_disable_of_a_disabled_account_is_refused() -> None:
    assert domain.refuse_disable(Account("acc-1", "disabled", None), "disable", "1", T0) == "mfa_not_enabled"


# ------------------------------------------------------------------ recovery codes


def test_ten_distinct_recovery_codes_of_fifty_bits() -> None:
    codes = domain.new_recovery_codes()
    assert len(codes) == len(set(codes)) == 10
    for code in codes:
        assert len(code) == 11
        assert code[5] == "-"
        assert domain.normalize_recovery_code(code) == code.replace("-", "")


@pytest.mark.parametrize(("typed", "normal"), [("abcde-fghjk", "ABCDEFGHJK"), (" ABCDE FGHJK ", "ABCDEFGHJK")])
def test_recovery_codes_are_forgiving_to_type(typed: str, normal: str) -> None:
    assert domain.normalize_recovery_code(typed) == normal


@pytest.mark.parametrize("typed", ["123456", "ABCDE-FGHJ", "ABCDE-FGHIK", "ABCDE-FGHJKL", ""])
def test_what_cannot_be_a_recovery_code(typed: str) -> None:
    assert domain.normalize_recovery_code(typed) is None


def test_keyed_hash_messages_bind_codes_to_their_owner() -> None:
    assert domain.login_code_message("acc-1", "l-1", "123456") != domain.login_code_message("acc-2", "l-1", "123456")
    assert domain.login_code_message("acc-1", "l-1", "123456") != domain.login_code_message("acc-1", "l-2", "123456")
    assert domain.action_code_message("acc-1", "123456") != domain.login_code_message("acc-1", "", "123456")


# ------------------------------------------------------------------ keys


def keyring(*ids: str) -> Keyring:
    parsed = [parse_key(generate_key(i)) for i in ids]
    return Keyring(parsed[0], parsed[1:])


def test_aes_gcm_round_trip_without_the_plaintext_in_the_ciphertext() -> None:
    keys = keyring("k1")
    secret = domain.new_totp_secret().encode()
    key_id, blob = keys.encrypt(secret, b"acc-1")
    assert key_id == "k1"
    assert secret not in blob
    assert base64.b32decode(secret) not in blob
    assert keys.decrypt(key_id, blob, b"acc-1") == secret
    # Random nonces: the same secret never encrypts to the same bytes.
    assert keys.encrypt(secret, b"acc-1")[1] != blob


def test_ciphertext_is_bound_to_its_account_and_tamper_evident() -> None:
    keys = keyring("k1")
    _, blob = keys.encrypt(b"secret", b"acc-1")
    with pytest.raises(DecryptionError):
        keys.decrypt("k1", blob, b"acc-2")
    with pytest.raises(DecryptionError):
        keys.decrypt("k1", blob[:-1] + bytes([blob[-1] ^ 1]), b"acc-1")


def test_rotation_old_keys_decrypt_and_check_the_current_one_writes() -> None:
    k1, k2 = parse_key(generate_key("k1")), parse_key(generate_key("k2"))
    old = Keyring(k1)
    key_id, blob = old.encrypt(b"secret", b"aad")
    hash_id, digest = old.keyed_hash(b"code")
    rotated = Keyring(k2, [k1])
    assert rotated.current_id == "k2"
    assert rotated.decrypt(key_id, blob, b"aad") == b"secret"
    assert rotated.matches(hash_id, digest, b"code")
    assert not rotated.matches(hash_id, digest, b"other code")
    assert rotated.encrypt(b"secret", b"aad")[0] == "k2"
    with pytest.raises(UnknownKeyError):
        Keyring(k2).decrypt(key_id, blob, b"aad")


def test_the_same_key_bytes_never_serve_two_purposes() -> None:
    keys = keyring("k1")
    _, digest = keys.keyed_hash(b"x")
    assert keys._keys["k1"].mac_key != parse_key(generate_key("k1"))[1]
    assert len(digest) == 32


@pytest.mark.parametrize(
    "spec",
    ["nokeyid", ":AAAA", "bad id:" + "A" * 43, "k1:" + base64.urlsafe_b64encode(b"short").decode(), "k1:!!!"],
)
def test_bad_keys_are_refused_without_echoing_them(spec: str) -> None:
    with pytest.raises(KeyConfigError) as err:
        parse_key(spec)
    assert spec.partition(":")[2] not in str(err.value) or spec.partition(":")[2] == ""


def test_no_key_no_start_unless_the_development_key_is_allowed(tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError, match="PALISADE_MFA_KEY"):
        MfaSettings(mfa_key=None, mfa_allow_dev_key=False).keyring()
    key_file = tmp_path / "run" / "mfa-dev.key"
    dev = MfaSettings(mfa_key=None, mfa_allow_dev_key=True, mfa_dev_key_file=key_file).keyring()
    assert dev.current_id == "dev"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = MfaSettings(mfa_key=None, mfa_allow_dev_key=True, mfa_dev_key_file=key_file).keyring()
    _, blob = dev.encrypt(b"s", b"a")
    assert again.decrypt("dev", blob, b"a") == b"s"


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    current, old = generate_key("k2"), generate_key("k1")
    monkeypatch.setenv("PALISADE_MFA_KEY", current)
    monkeypatch.setenv("PALISADE_MFA_OLD_KEYS", old)
    monkeypatch.setenv(
        "PALISADE_PLATFORM_SMTP", "smtp://relay%40example.com:p%3Ass@mail.example.com:587?starttls=required"
    )
    settings = MfaSettings()
    assert settings.keyring().key_ids == {"k1", "k2"}
    smtp = settings.smtp()
    assert (smtp.hostname, smtp.port, smtp.username, smtp.password, smtp.start_tls) == (
        "mail.example.com",
        587,
        "relay@example.com",
        "p:ss",
        True,
    )
    assert "p:ss" not in repr(smtp)
    assert current.partition(":")[2] not in repr(settings)


def test_smtps_means_implicit_tls() -> None:
    target = SmtpTarget.parse("smtps://mail.example.com", 5)
    assert (target.port, target.use_tls, target.start_tls) == (465, True, False)
    with pytest.raises(ValueError, match="smtp://"):
        SmtpTarget.parse("http://mail.example.com", 5)


# ------------------------------------------------------------------ the email


def test_code_email_is_plain_text_with_an_html_alternative() -> None:
    msg = render_code_email(
        to="ada@example.com",
        sender="Palisade <no-reply@palisade.example>",
        code="042917",
        purpose="login",
        valid_for=domain.EMAIL_CODE_TTL,
        now=T0,
        issuer="Palisade <Cloud>",
    )
    assert msg["To"] == "ada@example.com"
    assert "042917" not in msg["Subject"]
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None
    assert html is not None
    assert "042917" in text.get_content()
    assert "10 minutes" in text.get_content()
    assert "042917" in html.get_content()
    assert "Palisade &lt;Cloud&gt;" in html.get_content()
    assert "<Cloud>" not in html.get_content()


def test_the_shared_keyring_derives_the_keys_mfa_always_used() -> None:
    """MFA's keyring is the platform's shared one under MFA's label; what was stored before
    (TOTP secrets under HKDF info palisade-mfa/aes-gcm, code hashes under palisade-mfa/hmac)
    must stay readable. Derived here independently, with the primitives themselves."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key_id, master = parse_key(generate_key("k1"))

    def derived(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)

    keys = Keyring((key_id, master))
    nonce = b"\x01" * 12
    stored = nonce + AESGCM(derived(b"palisade-mfa/aes-gcm")).encrypt(nonce, b"JBSWY3DPEHPK3PXP", b"acc-1")
    assert keys.decrypt(key_id, stored, b"acc-1") == b"JBSWY3DPEHPK3PXP"
    stored_hash = hmac.digest(derived(b"palisade-mfa/hmac"), b"code-message", "sha256")
    assert keys.matches(key_id, stored_hash, b"code-message")
    assert keys.keyed_hash(b"code-message") == (key_id, stored_hash)
