"""hostctl settings, from `PALISADE_HOSTCTL_*` environment variables (shared by every
worker that talks to VMs)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import asyncssh
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import HostctlError
from .layout import LayoutResolver, real_vm_layout

log = logging.getLogger("palisade.hostctl")


class HostctlConfigError(HostctlError):
    """hostctl cannot start as configured (e.g. no automation key)."""


class HostctlSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PALISADE_HOSTCTL_", extra="ignore")

    key_file: Path = Field(
        Path("/etc/palisade/automation_ed25519"),
        description="Palisade's automation private key (unencrypted OpenSSH/PEM), authorized on every VM",
    )
    allow_generated_key: bool = Field(
        False,
        description="Development only: when key_file is missing, create it with a new ed25519 key"
        " (VMs must then be given its public half)",
    )
    username: str = "root"
    max_sessions_per_host: int = Field(4, ge=1, le=10, description="Concurrent SSH sessions per host")
    idle_close_seconds: float = Field(60.0, gt=0, description="Close a host's connection after this long unused")
    connect_timeout: float = Field(10.0, gt=0, description="TCP connect + SSH handshake + authentication")
    command_timeout: float = Field(30.0, gt=0, description="Default limit for one remote command")
    connect_attempts: int = Field(3, ge=1, le=10, description="Connection attempts before giving up (transient)")
    retry_backoff_seconds: float = Field(0.5, ge=0, description="First back-off; tripled per attempt, jittered")
    keepalive_seconds: float = Field(15.0, gt=0)
    testvm_root: Path | None = Field(
        None,
        description="Development/test only: hosts are test VMs of this directory (`palisade testvm`), "
        "whose files live under their own directory",
    )

    def automation_key(self) -> asyncssh.SSHKey:
        """The automation private key from `key_file` (made first if allowed and missing)."""
        if not self.key_file.exists():
            if not self.allow_generated_key:
                raise HostctlConfigError(
                    f"automation key {self.key_file} not found: set PALISADE_HOSTCTL_KEY_FILE to Palisade's"
                    " SSH private key (or PALISADE_HOSTCTL_ALLOW_GENERATED_KEY=1 on a development machine)"
                )
            self.key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = asyncssh.generate_private_key("ssh-ed25519", comment="palisade-automation")
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.export_private_key())
            log.warning("generated a development automation key at %s", self.key_file)
        try:
            return asyncssh.read_private_key(str(self.key_file))
        except (OSError, asyncssh.KeyImportError) as exc:
            raise HostctlConfigError(f"cannot read the automation key {self.key_file}: {exc}") from None

    def layouts(self) -> LayoutResolver:
        if self.testvm_root is None:
            return real_vm_layout
        from .testvm.harness import NamespaceVmLayouts

        return NamespaceVmLayouts(self.testvm_root)
