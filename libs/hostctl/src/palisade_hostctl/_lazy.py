"""Package members that load on first use (PEP 562): `palisade`, which loads every command
plugin to know its commands, should not import asyncssh for that."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_members(package: str, members: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: each name in `members` is imported from the
    module named beside it (relative to the package) when first asked for, then kept."""

    def member(name: str) -> Any:
        module = members.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    return member
