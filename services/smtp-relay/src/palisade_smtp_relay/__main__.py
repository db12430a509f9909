"""`python -m palisade_smtp_relay`: run the worker (SMTP listener and bus consumer) until SIGTERM."""

import logging

import uvloop

from palisade_events import RuntimeSettings, WorkerRuntime

from .worker import spec

settings = RuntimeSettings()
logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
# The loop `palisade run smtp-relay` uses (cli/main.py): this entry point is what bench/smtp.py
# runs (it can run it under cProfile), and it measured the stdlib loop before.
uvloop.run(WorkerRuntime(spec(), settings).run_forever())
