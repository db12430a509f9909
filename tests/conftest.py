# Helpers used to be imported from here; they live in tests.fixtures now.
from tests.fixtures import (  # noqa: F401
    AMQP_URL,
    DATABASE_URL,
    TEST_RETRY_DELAYS,
    Collector,
    drop_worker_state,
    settings_for_test,
    unique,
    wait_until,
)
