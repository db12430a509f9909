"""Fixtures of the end-to-end story: the service tests' real-traffic helpers on the import
path, and a Pebble with its DNS servers for the story's session."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# The story talks to the VMs with the helpers the workers' own tests use (pipelined HTTP,
# traffic probes, Pebble, the SMTP sink). Their directories are on sys.path only once
# pytest collects a test module there, which a run of tests/e2e alone never does; appended,
# not prepended, so they cannot shadow anything.
for helpers in ("ratelimit", "firewall", "tls", "smtp-relay"):
    path = str(REPO / "services" / helpers / "tests")
    if path not in sys.path:
        sys.path.append(path)


@pytest.fixture(scope="session")
async def e2e_ca(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """Pebble and its two DNS views (services/tls/tests/acme_ca.py), for this session."""
    from acme_ca import running_ca

    async with running_ca(tmp_path_factory.mktemp("e2e-pebble")) as ca:
        yield ca
