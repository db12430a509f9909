"""The relay's settings, from `PALISADE_*` environment variables (the runtime's own
settings, broker and database, are `RuntimeSettings`)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .domain import IPNetwork, parse_networks


def split_host_port(value: str, default_port: int) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, or a bare host."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if value.count(":") == 1:
        host, port = value.split(":")
        return host, int(port)
    return value, default_port


class RelaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PALISADE_", extra="ignore")

    smtp_listen: str = Field("127.0.0.1:2525", description="Address:port of the SMTP listener (port 0: any free port)")
    private_network: str = Field(
        "10.0.0.0/8", description="Comma-separated CIDRs of the platform's private network; other peers get 554"
    )
    sender_domain: str = Field("vm.example.app", description="Services send as <slug>@<sender_domain>")
    smtp_hostname: str = Field(default_factory=socket.getfqdn, description="Name in the greeting and Received header")
    smtp_max_message_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="SIZE limit; larger messages get 552")
    smtp_session_timeout: float = Field(300.0, gt=0, description="Idle seconds before a client is disconnected")
    smtp_tls_cert: Path | None = Field(None, description="PEM certificate chain; with the key, STARTTLS is offered")
    smtp_tls_key: Path | None = None

    smarthost: str = Field("127.0.0.1:1025", description="host:port of the upstream SMTP server")
    smarthost_starttls: bool = Field(False, description="Require STARTTLS to the smarthost")
    smarthost_ca_file: Path | None = Field(None, description="CA bundle the smarthost certificate must chain to")
    smarthost_username: str | None = None
    smarthost_password: SecretStr | None = None
    smarthost_pool_size: int = Field(8, ge=1, le=256, description="Upstream connections kept open and reused")
    smarthost_timeout: float = Field(30.0, gt=0)

    quota_gauge_top: int = Field(20, ge=1, le=1000, description="Services exported in palisade_smtp_quota_used")
    quota_gauge_seconds: float = Field(30.0, gt=0, description="How often that gauge is recomputed")

    @field_validator("private_network")
    @classmethod
    def _networks(cls, v: str) -> str:
        parse_networks(v)
        return v

    @field_validator("smtp_listen", "smarthost")
    @classmethod
    def _host_port(cls, v: str) -> str:
        split_host_port(v, 25)
        return v

    def networks(self) -> tuple[IPNetwork, ...]:
        return parse_networks(self.private_network)

    def listen(self) -> tuple[str, int]:
        return split_host_port(self.smtp_listen, 2525)

    def upstream(self) -> tuple[str, int]:
        return split_host_port(self.smarthost, 25)

    def server_tls(self) -> ssl.SSLContext | None:
        if self.smtp_tls_cert is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.smtp_tls_cert, self.smtp_tls_key)
        return ctx

    def upstream_tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.smarthost_ca_file) if self.smarthost_ca_file else None)
