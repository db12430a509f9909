from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from palisade_hostctl import HostPool, load_private_key
from tests.vms import VmSession


@pytest.fixture
async def pool(testvms: VmSession) -> AsyncIterator[HostPool]:
    """A pool logging in with the session's automation key; test VM layouts."""
    p = HostPool(
        [load_private_key(testvms.automation_key)],
        layouts=testvms.layouts,
        connect_attempts=2,
        retry_backoff_seconds=0.05,
        command_timeout=10,
    )
    yield p
    await p.close()
