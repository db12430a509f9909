"""`python -m palisade_hostctl.testvm up NAME | down NAME | list` (same as `palisade testvm`)."""

from .cli import app

app(prog_name="palisade testvm")
