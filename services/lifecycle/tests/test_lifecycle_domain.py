"""Lifecycle rules, without I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from palisade_lifecycle.domain import (
    GRACE_PERIOD,
    Backup,
    Service,
    purge_at,
    refuse_delete,
    refuse_operation,
    refuse_protection_change,
    refuse_restore,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def svc(**kw: object) -> Service:
    base: dict[str, object] = {"service_id": "s1", "name": "redis-bgrkj", "protected": False, "state": "active"}
    base.update(kw)
    return Service(**base)  # type: ignore[arg-type]


def test_grace_period_is_the_seeds_seven_days() -> None:
    assert timedelta(days=7) == GRACE_PERIOD
    assert purge_at(NOW) == datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("service", "reason"),
    [
        (None, "unknown_service"),
        (svc(state="terminated"), "service_terminated"),
        (svc(state="deprovisioned"), "service_terminated"),
        (svc(protected=True), "termination_protection_enabled"),
        (svc(state="deleting"), "deletion_in_progress"),
        (svc(), None),
    ],
)
def test_operations_refused_with_the_first_reason_that_applies(service: Service | None, reason: str | None) -> None:
    assert refuse_operation(service) == reason


def test_protection_is_reported_before_a_wrong_name() -> None:
    assert refuse_delete(svc(protected=True), "wrong") == "termination_protection_enabled"
    assert refuse_delete(svc(), "wrong") == "confirmation_mismatch"
    assert refuse_delete(svc(), "Redis-bgrkj") == "confirmation_mismatch"  # exact, as typed
    assert refuse_delete(svc(), "redis-bgrkj") is None


def test_protection_can_change_on_a_live_service_only() -> None:
    assert refuse_protection_change(None) == "unknown_service"
    assert refuse_protection_change(svc(state="deleting")) is None
    assert refuse_protection_change(svc(state="terminated")) == "service_terminated"


def test_restore_is_accepted_until_the_purge_time_and_not_at_it() -> None:
    retained = Backup("b1", "s1", purge_at(NOW), "retained")
    gone = svc(state="deprovisioned")
    assert refuse_restore(gone, retained, NOW + GRACE_PERIOD - timedelta(seconds=1)) is None
    assert refuse_restore(gone, retained, NOW + GRACE_PERIOD) == "grace_period_expired"
    assert refuse_restore(gone, Backup("b1", "s1", None, "purged"), NOW) == "grace_period_expired"
    assert refuse_restore(gone, Backup("b1", "other", None, "available"), NOW) == "unknown_backup"
    assert refuse_restore(gone, None, NOW) == "unknown_backup"
    assert refuse_restore(None, retained, NOW) == "unknown_service"
