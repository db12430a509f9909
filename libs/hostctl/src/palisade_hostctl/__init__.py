"""palisade-hostctl: how Palisade's workers change a service's VM.

A worker's bootstrap builds one `HostPool` (from `HostctlSettings`); a handler
asks it for `pool.host(HostIdentity.from_endpoint(provisioned.ssh))` and uses
`run([...])`, `read_file`, `stat` and `replace_file(path, content, mode=...,
validate=[...], activate=[...])`, with paths from `host.layout`. Errors say
whether they are `transient` (retry later) or not (see `errors`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_members
from .errors import (
    ActivationFailed,
    AuthenticationFailed,
    CommandFailed,
    CommandTimeout,
    HostctlError,
    HostKeyMismatch,
    HostUnreachable,
    NegotiationFailed,
    ValidationFailed,
)

if TYPE_CHECKING:
    from .host import CommandResult, FileStat, Host, ReplaceResult, sha256_hex
    from .identity import HostIdentity
    from .layout import REAL_VM, Layout, LayoutResolver, real_vm_layout
    from .pool import HostPool, HostStats, load_private_key
    from .settings import HostctlConfigError, HostctlSettings

# Everything but the errors reaches asyncssh (a quarter of a second to import): loaded on first
# use, so that `palisade`, which loads every command plugin to know its commands, starts quickly.
_LAZY = {
    "CommandResult": ".host",
    "FileStat": ".host",
    "Host": ".host",
    "ReplaceResult": ".host",
    "sha256_hex": ".host",
    "HostIdentity": ".identity",
    "REAL_VM": ".layout",
    "Layout": ".layout",
    "LayoutResolver": ".layout",
    "real_vm_layout": ".layout",
    "HostPool": ".pool",
    "HostStats": ".pool",
    "load_private_key": ".pool",
    "HostctlConfigError": ".settings",
    "HostctlSettings": ".settings",
}

__getattr__ = lazy_members(__name__, _LAZY)

__all__ = [
    "REAL_VM",
    "ActivationFailed",
    "AuthenticationFailed",
    "CommandFailed",
    "CommandResult",
    "CommandTimeout",
    "FileStat",
    "Host",
    "HostIdentity",
    "HostKeyMismatch",
    "HostPool",
    "HostStats",
    "HostUnreachable",
    "HostctlConfigError",
    "HostctlError",
    "HostctlSettings",
    "Layout",
    "LayoutResolver",
    "NegotiationFailed",
    "ReplaceResult",
    "ValidationFailed",
    "load_private_key",
    "real_vm_layout",
    "sha256_hex",
]
