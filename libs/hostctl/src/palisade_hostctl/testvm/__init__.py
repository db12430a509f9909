"""Test VMs in network namespaces (see `harness`); `palisade testvm` is the CLI."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    # The harness (asyncssh under it) loads on first use, not with the `palisade testvm` plugin.
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".harness", __name__), name)
    globals()[name] = value
    return value
