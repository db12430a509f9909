"""Private PostgreSQL and RabbitMQ servers for the fault tests, so that restarting or
stopping one never touches the machine's shared servers (other test runs use them).

- `PrivatePostgres`: a cluster made with `initdb` in a temp directory (owned by the
  postgres user when run as root: PostgreSQL refuses to run as root), listening on a
  free loopback port with its socket in the same directory; `pg_ctl` starts, stops and
  restarts it.
- `PrivateRabbit`: a RabbitMQ node with its own node name, AMQP and distribution
  ports, Mnesia and log directories, config, plugins file and Erlang cookie (HOME is
  its directory, so the server and `rabbitmqctl` both read `DIR/.erlang.cookie` and
  never the machine's). It registers with the machine's epmd like any other node; no
  plugin is enabled (the management and Prometheus plugins would want the machine's
  ports).

Both are started from the package's own binaries (`/usr/lib/postgresql/*/bin`,
`/usr/lib/rabbitmq/bin`), never through the Debian wrappers that act on the machine's
clusters and node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

_PG_BIN_ROOT = Path("/usr/lib/postgresql")
_RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def port_answers(port: int, timeout: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _run(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 120.0) -> str:
    def call() -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout, check=False)

    result = await asyncio.to_thread(call)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result.stdout


async def _until(what: str, probe: object, timeout: float = START_TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await probe():  # type: ignore[operator]
        if loop.time() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout}s")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------ PostgreSQL


def _pg_bin() -> Path:
    versions = sorted(_PG_BIN_ROOT.glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
    return versions[-1].parent


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on a free port."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="palisade-fault-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self._bin = _pg_bin()
        self._as_root = os.geteuid() == 0

    def url(self, database: str = "palisade") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _as_postgres(self, *argv: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if self._as_root else list(argv)

    async def start(self) -> None:
        if not self.data.exists():
            if self._as_root:
                shutil.chown(self.dir, "postgres", "postgres")
            await _run(
                self._as_postgres(
                    str(self._bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                    "--no-sync",
                )
            )  # fmt: skip
        await self._pg_ctl("start", "-w", "-l", str(self.dir / "server.log"), "-o", self._options())
        await _until("private PostgreSQL", lambda: port_answers(self.port))

    def _options(self) -> str:
        # fsync off: the tests restart the server, they do not pull its power cord.
        return f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"

    async def stop(self, mode: str = "fast") -> None:
        """`fast` rolls back open transactions and closes every session (what
        `pg_ctlcluster restart` does); `immediate` is a crash, recovered from WAL at start."""
        await self._pg_ctl("stop", "-w", "-m", mode)

    async def restart(self, mode: str = "fast") -> None:
        await self.stop(mode)
        await self.start()

    async def _pg_ctl(self, *args: str) -> None:
        await _run(self._as_postgres(str(self._bin / "pg_ctl"), "-D", str(self.data), *args))

    async def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                await self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------ RabbitMQ


class PrivateRabbit:
    """A throwaway RabbitMQ node (`pfault-<id>@localhost`) on free ports."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="palisade-fault-rmq-"))
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"pfault-{uuid.uuid4().hex[:8]}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        d = self.dir
        return {
            **os.environ,
            "HOME": str(d),  # the Erlang cookie: DIR/.erlang.cookie, made by the node on first start
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),  # not the machine's (which names its node)
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    async def start(self) -> None:
        self._spawn()
        await self.await_startup()

    def _spawn(self) -> None:
        d = self.dir
        (d / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n")
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq-env.conf").write_text("")
        with (d / "server.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [str(_RABBIT_BIN / "rabbitmq-server")],
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # its own process group: stopped as a whole, never the machine's node
            )

    async def await_startup(self) -> None:
        async def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.dir / "server.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"private RabbitMQ exited ({self.proc.returncode}): {tail}")
            return await port_answers(self.port)

        await _until(f"private RabbitMQ {self.node}", up)

    async def ctl(self, *args: str) -> str:
        return await _run([str(_RABBIT_BIN / "rabbitmqctl"), "-q", "-n", self.node, *args], env=self._env())

    async def stop_app(self) -> None:
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        await self.ctl("start_app")
        await self.await_startup()

    async def destroy(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                await self.ctl("stop")
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                # Only this node's own process group (started with start_new_session above).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 10)
        shutil.rmtree(self.dir, ignore_errors=True)
