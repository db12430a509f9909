"""`python -m palisade_mfa`: run the worker until SIGTERM."""

import asyncio
import logging

from palisade_events import RuntimeSettings, WorkerRuntime

from .worker import spec

settings = RuntimeSettings()
logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
asyncio.run(WorkerRuntime(spec(), settings).run_forever())
