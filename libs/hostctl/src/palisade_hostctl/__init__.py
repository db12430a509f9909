"""palisade-hostctl: how Palisade's workers change a service's VM.

A worker's bootstrap builds one `HostPool` (from `HostctlSettings`); a handler
asks it for `pool.host(HostIdentity.from_endpoint(provisioned.ssh))` and uses
`run([...])`, `read_file`, `stat` and `replace_file(path, content, mode=...,
validate=[...], activate=[...])`, with paths from `host.layout`. Errors say
whether they are `transient` (retry later) or not (see `errors`).
"""

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
from .host import CommandResult, FileStat, Host, ReplaceResult, sha256_hex
from .identity import HostIdentity
from .layout import REAL_VM, Layout, LayoutResolver, real_vm_layout
from .pool import HostPool, HostStats, load_private_key
from .settings import HostctlConfigError, HostctlSettings

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
