"""The TLS worker's settings, from `PALISADE_TLS_*` (and `PALISADE_ACME_DIRECTORY`); SSH itself:
`PALISADE_HOSTCTL_*` (see palisade-hostctl)."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from palisade_events.contract import ratelimit
from palisade_events.secrets import KeyConfigError, Keyring, development_key, parse_key, parse_keys

log = logging.getLogger("palisade.tls")

KEYRING_LABEL = b"palisade-tls"
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


class TlsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PALISADE_TLS_", extra="ignore", populate_by_name=True)

    # ---- the CA
    acme_directory: str = Field(
        LETS_ENCRYPT,
        validation_alias=AliasChoices("PALISADE_ACME_DIRECTORY", "PALISADE_TLS_ACME_DIRECTORY"),
        description="ACME v2 directory URL (PALISADE_ACME_DIRECTORY)",
    )
    acme_ca_bundle: Path | None = Field(
        None,
        description="PEM file of the CA(s) to trust for the ACME server's own HTTPS; default: the system's"
        " (tests: Pebble's listener certificate)",
    )
    acme_contact_email: str | None = Field(None, description="Contact address of the ACME account")
    acme_request_timeout_seconds: float = Field(30.0, gt=0)
    acme_poll_timeout_seconds: float = Field(
        120.0, gt=0, description="How long to wait for the CA to validate and to issue, per attempt"
    )

    # ---- secrets at rest (ACME account key, certificate keys)
    key: SecretStr | None = Field(None, description="Current key, KEY_ID:BASE64URL(32 bytes) (PALISADE_TLS_KEY)")
    old_keys: SecretStr | None = Field(None, description="Comma-separated older keys; only decrypt (key rotation)")
    allow_dev_key: bool = Field(False, description="Development only: without PALISADE_TLS_KEY, use dev_key_file")
    dev_key_file: Path = Field(Path(".run/tls-dev.key"))

    # ---- domains
    platform_domains: list[str] = Field(
        default_factory=lambda: ["vm.palisade.test"],
        description="The platform's own domains (service hostnames live under them); users cannot add them"
        " or their subdomains",
    )
    max_domains_per_service: int = Field(100, ge=1, le=100, description="Including the service hostname")

    # ---- DNS
    dns_servers: list[str] = Field(
        default_factory=list, description="Resolver addresses; empty: the system's (/etc/resolv.conf)"
    )
    dns_port: int = Field(53, ge=1, le=65535)
    dns_timeout_seconds: float = Field(3.0, gt=0)
    dns_recheck_initial_seconds: float = Field(60.0, gt=0)
    dns_recheck_max_seconds: float = Field(3600.0, gt=0)
    dns_give_up_seconds: float = Field(7 * 86400.0, gt=0, description="A domain pending this long is failed")
    cloudflare_ranges_file: Path | None = Field(
        None, description="Cloudflare's ranges (JSON); default: the file shipped with palisade-events"
    )

    # ---- issuance and renewal
    renew_when_left: float = Field(1 / 3, gt=0, lt=1, description="Renew when this fraction of the lifetime is left")
    renew_jitter: float = Field(
        0.05, ge=0, lt=0.3, description="Renew up to this fraction of the lifetime earlier, at random"
    )
    retry_initial_seconds: float = Field(60.0, gt=0)
    retry_max_seconds: float = Field(6 * 3600.0, gt=0)
    expiring_soon_seconds: float = Field(7 * 86400.0, gt=0)
    self_check_timeout_seconds: float = Field(
        5.0, gt=0, description="How long the challenge URL may take to answer right (nginx reloads) before giving up"
    )
    request_stale_seconds: float = Field(
        600.0, gt=0, description="An issuance or VM write asked for this long ago without an outcome is asked again"
    )

    # ---- the VM
    upstream: str = Field(
        "http://127.0.0.1:8080", description="Where nginx proxies the service's web traffic (the application)"
    )
    ratelimit_snippet: str = Field(
        ratelimit.NGINX_SERVER_SNIPPET,
        description="VM path of the rate-limit worker's per-server snippet; included (in the location that proxies"
        " to the application) when it exists",
    )
    certificates_dir: str = Field("/etc/nginx/palisade-tls", description="VM directory of certificates and keys")
    site_file: str = Field("/etc/nginx/sites-enabled/palisade-tls.conf", description="VM path of the server blocks")
    acme_webroot: str = Field("/var/www/palisade-acme", description="VM web root of HTTP-01 challenge files")
    nginx_pid_file: str = Field("/run/nginx.pid", description="VM path of nginx's master pid (to see a reload settle)")

    # ---- scheduled work
    dns_every_seconds: float = Field(30.0, gt=0)
    issue_every_seconds: float = Field(30.0, gt=0)
    expiry_every_seconds: float = Field(3600.0, gt=0)
    reencrypt_every_seconds: float = Field(300.0, gt=0, description="How often to re-encrypt keys under old keys")

    @field_validator("platform_domains")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [d.strip().strip(".").lower() for d in v if d.strip()]

    def keyring(self) -> Keyring:
        """The configured keys. Refuses to run without a key unless the development key is
        explicitly allowed."""
        old = parse_keys(self.old_keys.get_secret_value()) if self.old_keys else []
        if self.key is not None:
            return Keyring(parse_key(self.key.get_secret_value()), old, label=KEYRING_LABEL)
        if not self.allow_dev_key:
            raise KeyConfigError(
                "PALISADE_TLS_KEY is not set. Generate one with `palisade tls generate-key`, or set"
                " PALISADE_TLS_ALLOW_DEV_KEY=1 on a development machine."
            )
        log.warning("using the development TLS key in %s; never do this in production", self.dev_key_file)
        return Keyring(parse_key(development_key(self.dev_key_file)), old, label=KEYRING_LABEL)
