"""What sshkeys' handlers get from `bootstrap` (ctx.deps)."""

from __future__ import annotations

from dataclasses import dataclass

from palisade_hostctl import HostPool

from .settings import SshKeysSettings


@dataclass(frozen=True)
class Deps:
    hosts: HostPool
    automation_line: str  # Palisade's automation public key, "TYPE BASE64"
    automation_fingerprint: str
    settings: SshKeysSettings
