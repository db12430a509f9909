"""MFA's own metrics (the runtime adds the per-message ones). Labels are small closed
sets (modes, reasons, key ids): never a code, a secret or an account."""

from prometheus_client import Counter, Gauge

VERIFICATIONS = Counter(
    "palisade_mfa_verifications_total",
    "Codes checked, by the account's mode and the result (valid, or the reason it was refused)",
    ["mode", "result"],
)
LOCKOUTS = Counter("palisade_mfa_lockouts_total", "Accounts locked after too many failed codes")
ACCOUNTS = Gauge("palisade_mfa_accounts", "Known accounts by MFA mode", ["mode"])
EMAIL_CODES = Counter("palisade_mfa_email_codes_total", "Code emails, by purpose and outcome", ["purpose", "outcome"])
STORED_SECRETS = Gauge(
    "palisade_mfa_stored_secrets",
    "Stored TOTP secrets and unused recovery-code hashes by the key protecting them (key rotation)",
    ["kind", "key_id"],
)
