"""Test VMs in network namespaces (see `harness`); `palisade testvm` is the CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_members

if TYPE_CHECKING:
    from .harness import (
        CLIENT_NETWORK,
        CLIENT_NETWORK6,
        DEFAULT_ROOT,
        NETWORK,
        NETWORK6,
        ClientNamespace,
        NamespaceVm,
        NamespaceVmLayouts,
        VmError,
        add_client,
        default_root,
        down,
        is_alive,
        list_vms,
        reap_orphans,
        restart_sshd,
        start_sshd,
        stop_sshd,
        traces,
        up,
    )

__all__ = [
    "CLIENT_NETWORK",
    "CLIENT_NETWORK6",
    "DEFAULT_ROOT",
    "NETWORK",
    "NETWORK6",
    "ClientNamespace",
    "NamespaceVm",
    "NamespaceVmLayouts",
    "VmError",
    "add_client",
    "default_root",
    "down",
    "is_alive",
    "list_vms",
    "reap_orphans",
    "restart_sshd",
    "start_sshd",
    "stop_sshd",
    "traces",
    "up",
]

# The harness (asyncssh under it) loads on first use, not with the `palisade testvm` plugin.
__getattr__ = lazy_members(__name__, dict.fromkeys(__all__, ".harness"))
