"""Running several workers from one terminal: one child process each, their output
interleaved line by line with a coloured `[name]` prefix, signals passed on."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.text import Text

COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "bright_magenta")
_LINE_LIMIT = 1 << 20  # a worker's log line can be long (a traceback is many lines, each short)


class Supervisor:
    """`await Supervisor({"tls": argv, ...}, console).run()` -> 0 if every child exited 0."""

    def __init__(
        self,
        commands: Mapping[str, Sequence[str]],
        console: Console,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not commands:
            raise ValueError("nothing to run")
        self._commands = dict(commands)
        self._console = console
        self._env = dict(env) if env is not None else None
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._width = max(len(name) for name in self._commands) + 2
        self.exit_codes: dict[str, int] = {}

    def _print(self, name: str, style: str, line: str) -> None:
        self._console.print(Text.assemble((f"[{name}]".ljust(self._width), style), " ", line))

    async def run(self, *, handle_signals: bool = True) -> int:
        loop = asyncio.get_running_loop()
        # Handlers only from the main thread (the only place Python delivers signals).
        in_main_thread = threading.current_thread() is threading.main_thread()
        signals = (signal.SIGINT, signal.SIGTERM) if handle_signals and in_main_thread else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.forward, sig)
        try:
            for name, argv in self._commands.items():
                self._procs[name] = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    env=self._env,
                    # Own process group: a Ctrl-C reaches the children once, through us.
                    start_new_session=True,
                    limit=_LINE_LIMIT,
                )
            codes = await asyncio.gather(
                *(self._pump(name, COLOURS[i % len(COLOURS)]) for i, name in enumerate(self._procs))
            )
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            self.forward(signal.SIGTERM)  # only children still running (e.g. after an error here)
        return 0 if all(code == 0 for code in codes) else 1

    def forward(self, sig: int) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _pump(self, name: str, style: str) -> int:
        proc = self._procs[name]
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # longer than the limit: show what we have, in pieces
                raw = await proc.stdout.read(_LINE_LIMIT)
            if not raw:
                break
            self._print(name, style, raw.decode(errors="replace").rstrip("\r\n"))
        code = await proc.wait()
        self.exit_codes[name] = code
        if code != 0:
            self._print(name, f"bold {style}", f"exited with code {code}")
        return code


__all__ = ["Supervisor"]
