"""The MFA worker's own settings (`PALISADE_*` environment variables), beside the
runtime's `RuntimeSettings`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from palisade_events.secrets import development_key

from .crypto import KeyConfigError, Keyring, parse_key, parse_keys

log = logging.getLogger("palisade.mfa")

DEV_KEY_ID = "dev"


class MfaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PALISADE_", extra="ignore")

    mfa_key: SecretStr | None = Field(
        None, description="Current key, KEY_ID:BASE64URL(32 bytes); encrypts and hashes new secrets"
    )
    mfa_old_keys: SecretStr | None = Field(
        None, description="Comma-separated older keys, same form; only decrypt and check (key rotation)"
    )
    mfa_allow_dev_key: bool = Field(
        False,
        description="Development only: without PALISADE_MFA_KEY, use (or create) a key in mfa_dev_key_file",
    )
    mfa_dev_key_file: Path = Field(Path(".run/mfa-dev.key"), description="Where the development key lives")
    platform_smtp: SecretStr = Field(
        SecretStr("smtp://127.0.0.1:25"),
        description="The platform's SMTP server for login codes: smtp://[user:pass@]host[:port][?starttls=required|off]"
        " or smtps://... (implicit TLS)",
    )
    mfa_mail_from: str = Field("Palisade <no-reply@palisade.localhost>", description="From: of code emails")
    mfa_issuer: str = Field("Palisade", description="Issuer shown by authenticator apps")
    mfa_smtp_timeout_seconds: float = Field(10.0, gt=0)

    def keyring(self) -> Keyring:
        """The configured keys. Refuses to run without a key unless the development key is
        explicitly allowed."""
        old = parse_keys(self.mfa_old_keys.get_secret_value()) if self.mfa_old_keys else []
        if self.mfa_key is not None:
            return Keyring(parse_key(self.mfa_key.get_secret_value()), old)
        if not self.mfa_allow_dev_key:
            raise KeyConfigError(
                "PALISADE_MFA_KEY is not set. Generate one with `palisade mfa generate-key`, or set"
                " PALISADE_MFA_ALLOW_DEV_KEY=1 on a development machine."
            )
        log.warning("using the development MFA key in %s; never do this in production", self.mfa_dev_key_file)
        return Keyring(parse_key(development_key(self.mfa_dev_key_file, DEV_KEY_ID)), old)

    def smtp(self) -> SmtpTarget:
        return SmtpTarget.parse(self.platform_smtp.get_secret_value(), self.mfa_smtp_timeout_seconds)


@dataclass(frozen=True, repr=False)
class SmtpTarget:
    hostname: str
    port: int
    username: str | None
    password: str | None
    use_tls: bool  # implicit TLS (smtps)
    start_tls: bool | None  # None: STARTTLS when the server offers it
    timeout: float

    def __repr__(self) -> str:  # the password stays out of logs
        return f"SmtpTarget({self.hostname}:{self.port}, tls={self.use_tls}, starttls={self.start_tls})"

    @classmethod
    def parse(cls, url: str, timeout: float) -> SmtpTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("PALISADE_PLATFORM_SMTP must look like smtp://host:port or smtps://host:port")
        query = parse_qs(parts.query)
        starttls = (query.get("starttls") or [""])[0]
        if starttls not in ("", "required", "off"):
            raise ValueError("starttls must be required or off")
        use_tls = parts.scheme == "smtps"
        return cls(
            hostname=parts.hostname,
            port=parts.port or (465 if use_tls else 25),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            use_tls=use_tls,
            start_tls=False if use_tls else (None if starttls == "" else starttls == "required"),
            timeout=timeout,
        )
