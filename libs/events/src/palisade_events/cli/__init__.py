"""The `palisade` command line (`palisade_events.cli.main:app`)."""
