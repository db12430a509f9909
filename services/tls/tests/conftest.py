"""Fixtures of the TLS worker's tests: a real ACME CA (Pebble) and DNS (challtestsrv) for the
session (see `acme_ca`), and the worker itself per test (see `test_tls_worker`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
async def acme_ca(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    # Imported here, not at the top: this directory is on sys.path once its test modules
    # are collected, which is after pytest loads this conftest.
    from acme_ca import running_ca

    async with running_ca(tmp_path_factory.mktemp("pebble")) as ca:
        yield ca


@pytest.fixture
def no_requests_ca_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's REQUESTS_CA_BUNDLE does not know Pebble: the worker must not rely on it."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca-bundle.pem")
