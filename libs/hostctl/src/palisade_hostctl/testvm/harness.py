"""Test VMs: a network namespace that behaves like a service's VM.

Each VM has
- a network namespace `palisade-NAME` joined to the host by a veth pair
  (`plhN` on the host, `plvN` inside) on its own /30 of 10.213.0.0/16: the host
  end is .1, the VM .2. Nothing else is routed: traffic goes only between the
  host and that address;
- its own OpenSSH sshd on VM:22 (key-only root login, a fresh ed25519 host key,
  `AuthorizedKeysFile` under the VM's directory);
- its own nginx master (config `etc/nginx/nginx.conf` under the VM's
  directory, a fallback server on port 80 in front of an "application" on
  127.0.0.1:8080 inside the namespace, which a worker's `default_server` or
  name-based server blocks take over);
- its own nftables tables (the namespace's; `nft` run over SSH changes only them);
- its own root home: `/etc/netns/palisade-NAME/passwd` (bind-mounted over
  `/etc/passwd` by `ip netns exec`) points root's home at `ROOT/NAME/root`;
- a directory `ROOT/NAME/` shaped like a real VM (`etc/ssh`, `etc/nginx`,
  `etc/nftables.d`, `root/.ssh/authorized_keys`, `var/log`, `run`), described by
  `ROOT/NAME/vm.json`. `Layout(root=ROOT/NAME)` maps a real VM's paths into it.

Processes: VMs made inside a long-lived process (the pytest fixture) run sshd and
nginx in the foreground as children of that process, so `down` kills and reaps
them: nothing is left. VMs made by the CLI (`palisade testvm up`) must outlive it,
so their daemons detach; where PID 1 does not reap orphans (some containers) a
`down` of those leaves zombie entries — run such containers with an init.

`down` kills every process in the namespace (leaves of the process tree first,
so each parent reaps its children), deletes the veth pair and the namespace,
waits until the kernel has removed them, then deletes the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import ipaddress
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncssh

from ..identity import HostIdentity
from ..layout import Layout

DEFAULT_ROOT = Path("/run/palisade-testvm")
NETWORK = ipaddress.IPv4Network(os.environ.get("PALISADE_TESTVM_NETWORK", "10.213.0.0/16"))
# IPv6 of VMs made with `ipv6=True`: the same /30 slots as /126s of this ULA prefix.
NETWORK6 = ipaddress.IPv6Network(os.environ.get("PALISADE_TESTVM_NETWORK6", "fd00:10:213::/64"))
# A client namespace's link to its VM (`add_client`): documentation prefixes, seen by no one else.
CLIENT_NETWORK = ipaddress.IPv4Network("192.0.2.0/24")
CLIENT_NETWORK6 = ipaddress.IPv6Network("2001:db8:c::/64")
SSH_PORT = 22
HTTP_PORT = 80
READY_TIMEOUT = 15.0

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
_SSHD = "/usr/sbin/sshd"


class VmError(RuntimeError):
    pass


def default_root() -> Path:
    return Path(os.environ.get("PALISADE_TESTVM_ROOT", str(DEFAULT_ROOT)))


@dataclass(frozen=True)
class NamespaceVm:
    """One test VM, as described by its `vm.json`."""

    name: str
    root: Path
    index: int
    host_key: str = ""
    owner: str = "cli"
    automation_key: Path | None = None
    session_probe: bool = False
    foreground: bool = False
    ipv6: bool = False
    state: str = "creating"
    created_at: str = ""

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def namespace(self) -> str:
        return f"palisade-{self.name}"

    @property
    def address(self) -> str:
        return str(NETWORK.network_address + self.index * 4 + 2)

    @property
    def gateway(self) -> str:
        """The host's end of the veth pair."""
        return str(NETWORK.network_address + self.index * 4 + 1)

    @property
    def address6(self) -> str:
        """The VM's IPv6 address on its veth (VMs made with `ipv6=True`)."""
        return str(NETWORK6.network_address + self.index * 4 + 2)

    @property
    def gateway6(self) -> str:
        return str(NETWORK6.network_address + self.index * 4 + 1)

    @property
    def port(self) -> int:
        return SSH_PORT

    @property
    def host_veth(self) -> str:
        return f"plh{self.index}"

    @property
    def vm_veth(self) -> str:
        return f"plv{self.index}"

    @property
    def layout(self) -> Layout:
        return Layout(str(self.dir))

    @property
    def identity(self) -> HostIdentity:
        return HostIdentity(self.address, self.port, self.host_key)

    def path(self, vm_path: str) -> Path:
        """Where this VM keeps a real VM's `vm_path`."""
        return Path(self.layout.path(vm_path))

    def ssh_endpoint(self) -> dict[str, Any]:
        """`ServiceProvisioned.ssh` for this VM."""
        return {"host": self.address, "port": self.port, "host_key": self.host_key}

    @property
    def host_key_fingerprint(self) -> str:
        return self.identity.fingerprint if self.host_key else ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "index": self.index,
            "address": self.address,
            "gateway": self.gateway,
            "port": self.port,
            "namespace": self.namespace,
            "host_key": self.host_key,
            "owner": self.owner,
            "automation_key": str(self.automation_key) if self.automation_key else None,
            "session_probe": self.session_probe,
            "foreground": self.foreground,
            "ipv6": self.ipv6,
            "state": self.state,
            "created_at": self.created_at,
            "dir": str(self.dir),
        }

    @classmethod
    def from_json(cls, root: Path, data: dict[str, Any]) -> NamespaceVm:
        return cls(
            name=data["name"],
            root=root,
            index=int(data["index"]),
            host_key=data.get("host_key") or "",
            owner=data.get("owner") or "cli",
            automation_key=Path(data["automation_key"]) if data.get("automation_key") else None,
            session_probe=bool(data.get("session_probe")),
            foreground=bool(data.get("foreground")),
            ipv6=bool(data.get("ipv6")),
            state=data.get("state") or "creating",
            created_at=data.get("created_at") or "",
        )

    async def exec(self, *argv: str, input: bytes | None = None, check: bool = True) -> tuple[int, bytes, bytes]:
        """Run a command inside the VM's namespace from the host (not over SSH)."""
        return await _run("ip", "netns", "exec", self.namespace, *argv, input=input, check=check)

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command name) of every live process in the VM's namespace."""
        return [(pid, _comm(pid)) for pid in _pids_in_netns(self.namespace) if _alive(pid)]

    # ---- the session probe (a ForceCommand wrapper counting concurrent SSH sessions)

    def sessions_max(self) -> int:
        """Most SSH sessions that ran at the same time on this VM (session_probe VMs)."""
        return _read_int(self.dir / "run" / "sessions.max")

    def sessions_now(self) -> int:
        return _read_int(self.dir / "run" / "sessions.now")

    def session_intervals(self) -> list[tuple[float, float]]:
        """(start, end) of every finished session, from the probe's log."""
        starts: list[float] = []
        out: list[tuple[float, float]] = []
        with contextlib.suppress(FileNotFoundError):
            for line in (self.dir / "run" / "sessions.log").read_text().splitlines():
                sign, stamp = line.split()
                if sign == "+":
                    starts.append(float(stamp))
                elif starts:
                    out.append((starts.pop(0), float(stamp)))
        return out


# ---------------------------------------------------------------------------- up


async def up(
    name: str,
    *,
    root: Path | None = None,
    automation_key: Path | None = None,
    authorized_keys: Sequence[str] = (),
    owner: str = "cli",
    session_probe: bool = False,
    foreground: bool = False,
    ipv6: bool = False,
) -> NamespaceVm:
    """Create and start a VM. `automation_key` is a private key file to authorize;
    without it a fresh key pair is made in the VM's `automation/` directory.
    `foreground` keeps sshd and nginx as children of this process (see module doc).
    `ipv6` also puts `address6`/`gateway6` on the veth pair (sshd and nginx stay on IPv4)."""
    root = root or default_root()
    _check_name(name)
    if os.geteuid() != 0:
        raise VmError("test VMs need root (network namespaces)")
    vm = await asyncio.to_thread(_reserve, root, name, owner)
    try:
        vm = dataclasses.replace(vm, session_probe=session_probe, foreground=foreground, ipv6=ipv6)
        vm = await asyncio.to_thread(_write_files, vm, automation_key, list(authorized_keys))
        await _network_up(vm)
        await _start_daemons(vm)
        vm = dataclasses.replace(vm, state="running")
        _write_json(vm)
        return vm
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(down(name, root=root))
        raise


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise VmError(f"invalid VM name {name!r}: lowercase letters, digits and '-', at most 40 characters")


def _reserve(root: Path, name: str, owner: str) -> NamespaceVm:
    """Pick a free /30 and claim the name, under a lock shared by every process using `root`."""
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        vm_dir = root / name
        if vm_dir.exists() or Path(f"/run/netns/palisade-{name}").exists():
            raise VmError(f"test VM {name!r} already exists")
        used = {vm.index for vm in list_vms(root)}
        used |= {int(n[3:]) for n in os.listdir("/sys/class/net") if re.fullmatch(r"plh\d+", n)}
        free = next((i for i in range(NETWORK.num_addresses // 4) if i not in used), None)
        if free is None:
            raise VmError(f"no free /30 left in {NETWORK}")
        vm_dir.mkdir(mode=0o755)
        vm = NamespaceVm(name=name, root=root, index=free, owner=owner, created_at=datetime.now(UTC).isoformat())
        _write_json(vm)
        return vm


def _write_json(vm: NamespaceVm) -> None:
    tmp = vm.dir / "vm.json.tmp"
    tmp.write_text(json.dumps(vm.to_json(), indent=2) + "\n")
    tmp.replace(vm.dir / "vm.json")


def _write_files(vm: NamespaceVm, automation_key: Path | None, extra_keys: list[str]) -> NamespaceVm:
    d = vm.dir
    for sub in (
        "etc/ssh",
        "etc/nginx/conf.d",
        "etc/nginx/sites-enabled",
        "etc/nginx/snippets",
        "etc/nftables.d",
        "var/www/html",
        "var/log/nginx",
        "var/lib/nginx",
        "run",
        "bin",
    ):
        (d / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
    (d / "root/.ssh").mkdir(mode=0o700, parents=True, exist_ok=True)

    host_key = asyncssh.generate_private_key("ssh-ed25519", comment=f"testvm-{vm.name}")
    _write_secret(d / "etc/ssh/ssh_host_ed25519_key", host_key.export_private_key())
    host_public = host_key.export_public_key().decode().split()
    (d / "etc/ssh/ssh_host_ed25519_key.pub").write_text(" ".join(host_public) + "\n")

    if automation_key is None:
        (d / "automation").mkdir(mode=0o700, exist_ok=True)
        automation_key = d / "automation" / "id_ed25519"
        key = asyncssh.generate_private_key("ssh-ed25519", comment="palisade-automation")
        _write_secret(automation_key, key.export_private_key())
        (d / "automation" / "id_ed25519.pub").write_bytes(key.export_public_key())
    automation_public = asyncssh.read_private_key(str(automation_key)).export_public_key().decode().split()
    lines = [f"{automation_public[0]} {automation_public[1]} palisade-automation", *extra_keys]
    _write_secret(d / "root/.ssh/authorized_keys", ("\n".join(lines) + "\n").encode())

    vm = dataclasses.replace(vm, host_key=f"{host_public[0]} {host_public[1]}", automation_key=automation_key)
    _write_netns_etc(vm)
    (d / "etc/ssh/sshd_config").write_text(_sshd_config(vm))
    (d / "etc/nginx/nginx.conf").write_text(_nginx_conf(vm))
    (d / "var/www/html/index.html").write_text(f"test VM {vm.name}\n")
    if vm.session_probe:
        probe = d / "bin" / "session-probe"
        probe.write_text(_session_probe(vm))
        probe.chmod(0o755)
    _write_json(vm)
    return vm


def _netns_etc(name: str) -> Path:
    return Path("/etc/netns") / f"palisade-{name}"


def _write_netns_etc(vm: NamespaceVm) -> None:
    """`ip netns exec` bind-mounts `/etc/netns/NS/*` over `/etc/*` for what it starts.
    The VM's passwd gives root the VM's home (`DIR/root`), so sessions start there
    and root's shell reads the VM's dotfiles, not the host's."""
    lines = []
    for line in Path("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) == 7 and fields[0] == "root":
            fields[5] = str(vm.dir / "root")
        lines.append(":".join(fields))
    etc = _netns_etc(vm.name)
    etc.mkdir(mode=0o755, parents=True, exist_ok=True)
    (etc / "passwd").write_text("\n".join(lines) + "\n")


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _sshd_config(vm: NamespaceVm) -> str:
    d = vm.dir
    lines = [
        f"# Test VM {vm.name}: its own sshd, key-only root login, files under {d}.",
        f"ListenAddress {vm.address}:{vm.port}",
        f"HostKey {d}/etc/ssh/ssh_host_ed25519_key",
        f"PidFile {d}/run/sshd.pid",
        f"AuthorizedKeysFile {d}/root/.ssh/authorized_keys",
        "PermitRootLogin prohibit-password",
        "AllowUsers root",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        # The files live under a temp-like tree whose parents are not root-only.
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "LogLevel INFO",
        "MaxStartups 64:30:128",
    ]
    if vm.session_probe:
        lines.append(f"ForceCommand {d}/bin/session-probe")
    return "\n".join(lines) + "\n"


def _session_probe(vm: NamespaceVm) -> str:
    run = vm.dir / "run"
    return f"""#!/bin/sh
# Counts this VM's concurrent SSH sessions, so tests can measure a per-host bound.
d='{run}'
exec 9>>"$d/sessions.lock"
flock 9
n=$(( $(cat "$d/sessions.now" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$d/sessions.now"
m=$(cat "$d/sessions.max" 2>/dev/null || echo 0)
if [ "$n" -gt "$m" ]; then echo "$n" > "$d/sessions.max"; fi
echo "+ $(date +%s.%N)" >> "$d/sessions.log"
flock -u 9
/bin/sh -c "$SSH_ORIGINAL_COMMAND" 9>&-
rc=$?
flock 9
echo "- $(date +%s.%N)" >> "$d/sessions.log"
echo $(( $(cat "$d/sessions.now") - 1 )) > "$d/sessions.now"
flock -u 9
exit $rc
"""


def _nginx_conf(vm: NamespaceVm) -> str:
    d = vm.dir
    return f"""# Test VM {vm.name}: its own nginx (prefix {d}/etc/nginx/), every path under {d}.
user www-data;
worker_processes 1;
pid {d}/run/nginx.pid;
error_log {d}/var/log/nginx/error.log;

events {{
    worker_connections 256;
}}

http {{
    default_type application/octet-stream;
    access_log {d}/var/log/nginx/access.log;
    client_body_temp_path {d}/var/lib/nginx/body;
    proxy_temp_path {d}/var/lib/nginx/proxy;
    fastcgi_temp_path {d}/var/lib/nginx/fastcgi;
    uwsgi_temp_path {d}/var/lib/nginx/uwsgi;
    scgi_temp_path {d}/var/lib/nginx/scgi;

    # http-level includes (rate-limit zones, cache paths)
    include {d}/etc/nginx/conf.d/*.conf;

    # The service's application, reachable only inside the VM.
    server {{
        listen 127.0.0.1:8080;
        location / {{
            default_type text/plain;
            return 200 "app {vm.name} $request_uri\\n";
        }}
    }}

    # A fallback on port 80 until a worker renders its own: any address (an address-specific
    # listen would shadow every worker's `listen 80` server) and not `default_server`, so a
    # worker's default server (rate limit) and name-based server blocks (TLS) take over.
    server {{
        listen {HTTP_PORT};
        server_name _;
        root {d}/var/www/html;
        location / {{
            proxy_pass http://127.0.0.1:8080;
        }}
    }}

    # server blocks (TLS)
    include {d}/etc/nginx/sites-enabled/*;
}}
"""


async def _network_up(vm: NamespaceVm) -> None:
    ns = vm.namespace
    await _run("ip", "netns", "add", ns)
    host_side = "\n".join(
        [
            f"link add {vm.host_veth} type veth peer name {vm.vm_veth} netns {ns}",
            f"addr add {vm.gateway}/30 dev {vm.host_veth}",
            f"link set {vm.host_veth} up",
        ]
    )
    await _run("ip", "-batch", "-", input=host_side.encode())
    vm_side = "\n".join([f"addr add {vm.address}/30 dev {vm.vm_veth}", f"link set {vm.vm_veth} up", "link set lo up"])
    await _run("ip", "-n", ns, "-batch", "-", input=vm_side.encode())
    if vm.ipv6:
        # nodad: usable at once, not after duplicate address detection's second or two.
        await _run("ip", "addr", "add", f"{vm.gateway6}/126", "dev", vm.host_veth, "nodad")
        await _run("ip", "-n", ns, "addr", "add", f"{vm.address6}/126", "dev", vm.vm_veth, "nodad")


# ---------------------------------------------------------------------------- client namespaces


@dataclass(frozen=True)
class ClientNamespace:
    """A second machine next to a VM: a namespace linked to the VM alone (not to the
    host), with addresses the caller picks in CLIENT_NETWORK/CLIENT_NETWORK6, so tests
    can send traffic from inside and outside a source CIDR. Removed with its VM."""

    vm: NamespaceVm
    addresses: tuple[str, ...]

    @property
    def namespace(self) -> str:
        return _client_namespace(self.vm.name)

    @property
    def vm_address(self) -> str:
        """The VM's IPv4 address on the client link."""
        return str(CLIENT_NETWORK.network_address + 1)

    @property
    def vm_address6(self) -> str:
        return str(CLIENT_NETWORK6.network_address + 1)

    async def exec(self, *argv: str, input: bytes | None = None, check: bool = True) -> tuple[int, bytes, bytes]:
        """Run a command inside the client namespace."""
        return await _run("ip", "netns", "exec", self.namespace, *argv, input=input, check=check)


def _client_namespace(name: str) -> str:
    return f"palisade-{name}-client"


async def add_client(vm: NamespaceVm, addresses: Sequence[str] = ("192.0.2.10", "2001:db8:c::10")) -> ClientNamespace:
    """Link a client namespace to `vm` (veth `plcv` in the VM, `plcc` in the client)."""
    for a in addresses:
        ip = ipaddress.ip_address(a)
        net = CLIENT_NETWORK if ip.version == 4 else CLIENT_NETWORK6
        if ip not in net or ip in (net[0], net[1]):
            raise VmError(f"client address {a} must be in {CLIENT_NETWORK} or {CLIENT_NETWORK6}, above .1 / ::1")
    client = ClientNamespace(vm, tuple(addresses))
    ns = client.namespace
    await _run("ip", "netns", "add", ns)
    try:
        await _run("ip", "-n", vm.namespace, "link", "add", "plcv", "type", "veth", "peer", "name", "plcc", "netns", ns)
        vm_side = [
            f"addr add {client.vm_address}/{CLIENT_NETWORK.prefixlen} dev plcv",
            f"addr add {client.vm_address6}/{CLIENT_NETWORK6.prefixlen} dev plcv nodad",
            "link set plcv up",
        ]
        await _run("ip", "-n", vm.namespace, "-batch", "-", input="\n".join(vm_side).encode())
        prefix = {4: CLIENT_NETWORK.prefixlen, 6: CLIENT_NETWORK6.prefixlen}
        client_side = [
            *(f"addr add {a}/{prefix[ipaddress.ip_address(a).version]} dev plcc nodad" for a in addresses),
            "link set plcc up",
            "link set lo up",
        ]
        await _run("ip", "-n", ns, "-batch", "-", input="\n".join(client_side).encode())
    except BaseException:
        await _remove_client(vm.name)
        raise
    return client


def _client_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{_client_namespace(name)}")


async def _remove_client(name: str) -> None:
    ns = _client_namespace(name)
    if _client_exists(name):
        await _kill_in_namespace(ns)
        await _run("ip", "netns", "del", ns, check=False)


# Processes started in the foreground by this process, per VM, so `down` can reap them.
_children: dict[tuple[Path, str], dict[str, asyncio.subprocess.Process]] = {}


async def _start_daemons(vm: NamespaceVm) -> None:
    _ensure_privsep_dir()
    await asyncio.gather(_start_sshd(vm), _start_nginx(vm))
    await asyncio.gather(_wait_ssh_banner(vm), _wait_port(vm, HTTP_PORT))


def _sshd_argv(vm: NamespaceVm) -> list[str]:
    argv = [_SSHD, "-f", str(vm.dir / "etc/ssh/sshd_config"), "-E", str(vm.dir / "var/log/sshd.log")]
    return [*argv, "-D"] if vm.foreground else argv


def _nginx_argv(vm: NamespaceVm) -> list[str]:
    argv = vm.layout.nginx()
    return [*argv, "-g", "daemon off;"] if vm.foreground else argv


async def _start_sshd(vm: NamespaceVm) -> None:
    await _start(vm, "sshd", _sshd_argv(vm))


async def _start_nginx(vm: NamespaceVm) -> None:
    await _start(vm, "nginx", _nginx_argv(vm))


async def _start(vm: NamespaceVm, program: str, argv: list[str]) -> None:
    full = ["ip", "netns", "exec", vm.namespace, *argv]
    # stderr goes to a file: a daemon that keeps the inherited descriptor open would
    # otherwise hold a pipe (and whoever reads it) forever.
    log = vm.dir / "var" / "log" / f"{program}.start.log"
    err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    finally:
        os.close(err)
    if vm.foreground:
        _children.setdefault((vm.root, vm.name), {})[program] = proc
        return
    if await proc.wait() != 0:  # the daemon detaches; this returns once it has
        raise VmError(f"{program} of test VM {vm.name} did not start: {_tail(log)}")


def _ensure_privsep_dir() -> None:
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory


def _check_running(vm: NamespaceVm) -> None:
    """A foreground daemon that already exited will never answer: say why now."""
    for program, proc in _children.get((vm.root, vm.name), {}).items():
        if proc.returncode is not None:
            log = vm.dir / "var" / "log" / f"{program}.start.log"
            raise VmError(f"{program} of test VM {vm.name} exited ({proc.returncode}): {_tail(log)}")


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip() or "no output"
    except FileNotFoundError:
        return "no output"


async def _wait_ssh_banner(vm: NamespaceVm) -> None:
    async def banner() -> bool:
        _check_running(vm)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(vm.address, vm.port), 1.0)
        except (OSError, TimeoutError):
            return False
        try:
            line = await asyncio.wait_for(reader.readline(), 2.0)
            return line.startswith(b"SSH-2.0-")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    await _poll(banner, f"sshd of test VM {vm.name} on {vm.address}:{vm.port}")


async def _wait_port(vm: NamespaceVm, port: int) -> None:
    async def accepts() -> bool:
        _check_running(vm)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(vm.address, port), 1.0)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    await _poll(accepts, f"{vm.address}:{port} of test VM {vm.name} accepting")


# ---------------------------------------------------------------------------- sshd restarts


async def stop_sshd(vm: NamespaceVm) -> None:
    """Stop the VM's sshd and every SSH session on it (as a reboot would)."""
    await _kill_in_namespace(vm.namespace, spare=lambda pid: _comm(pid) == "nginx")
    await _reap_children(vm, "sshd")


async def start_sshd(vm: NamespaceVm) -> None:
    await _start_sshd(vm)
    await _wait_ssh_banner(vm)


async def restart_sshd(vm: NamespaceVm, *, new_host_key: bool = False) -> NamespaceVm:
    """Restart sshd (ending every session); with `new_host_key` the VM gets a new
    identity, as a reinstalled machine at the same address would."""
    await stop_sshd(vm)
    if new_host_key:
        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"testvm-{vm.name}")
        _write_secret(vm.dir / "etc/ssh/ssh_host_ed25519_key", key.export_private_key())
        public = key.export_public_key().decode().split()
        (vm.dir / "etc/ssh/ssh_host_ed25519_key.pub").write_text(" ".join(public) + "\n")
        vm = dataclasses.replace(vm, host_key=f"{public[0]} {public[1]}")
        _write_json(vm)
    await start_sshd(vm)
    return vm


# ---------------------------------------------------------------------------- down


async def down(name: str, *, root: Path | None = None) -> bool:
    """Remove a VM completely; False when there was nothing to remove."""
    root = root or default_root()
    _check_name(name)
    vm = _load(root / name)
    leftovers = traces(name, root, vm.index if vm is not None else None)
    if _netns_path(name) in leftovers:
        await _stop_nginx(f"palisade-{name}")
        await _kill_in_namespace(f"palisade-{name}")
    if vm is not None:
        await _reap_children(vm, "sshd")
        await _reap_children(vm, "nginx")
        if _veth_path(vm.index) in leftovers:
            await _run("ip", "link", "del", vm.host_veth, check=False)
    if _netns_path(name) in leftovers:
        await _run("ip", "netns", "del", f"palisade-{name}")
    await _remove_client(name)
    if vm is not None:
        veth = _veth_path(vm.index)
        await _poll(lambda: not os.path.exists(veth), f"{vm.host_veth} removed")
    for path in (_netns_etc(name), root / name):
        await asyncio.to_thread(shutil.rmtree, path, True)
    return bool(leftovers)


def traces(name: str, root: Path | None = None, index: int | None = None) -> list[str]:
    """What exists of VM `name`: its directory, namespace, host veth, /etc/netns entry, client namespace."""
    root = root or default_root()
    if index is None:
        vm = _load(root / name)
        index = vm.index if vm is not None else None
    candidates = [str(root / name), _netns_path(name), str(_netns_etc(name)), f"/run/netns/{_client_namespace(name)}"]
    if index is not None:
        candidates.append(_veth_path(index))
    return [path for path in candidates if os.path.lexists(path)]


def _netns_path(name: str) -> str:
    return f"/run/netns/palisade-{name}"


def _veth_path(index: int) -> str:
    return f"/sys/class/net/plh{index}"


def _load(vm_dir: Path) -> NamespaceVm | None:
    try:
        return NamespaceVm.from_json(vm_dir.parent, json.loads((vm_dir / "vm.json").read_text()))
    except (FileNotFoundError, ValueError, KeyError):
        return None


def list_vms(root: Path | None = None) -> list[NamespaceVm]:
    root = root or default_root()
    if not root.is_dir():
        return []
    vms = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            vm = _load(entry)
            if vm is not None:
                vms.append(vm)
    return vms


def is_alive(vm: NamespaceVm) -> bool:
    """The namespace exists and has processes (sshd at least)."""
    if not os.path.exists(_netns_path(vm.name)):
        return False
    return any(_comm(pid) == "sshd" for pid in _pids_in_netns(vm.namespace))


def owner_is_gone(owner: str) -> bool:
    """VMs made by a test session are owned by `pytest-PID`; that PID no longer running
    means an interrupted session left the VM behind."""
    m = re.fullmatch(r"pytest-(\d+)", owner)
    return m is not None and not _alive(int(m.group(1)))


async def reap_orphans(root: Path | None = None) -> list[str]:
    """Remove VMs whose owning test session is gone."""
    gone = [vm.name for vm in list_vms(root) if owner_is_gone(vm.owner)]
    await asyncio.gather(*(down(name, root=root) for name in gone))
    return gone


# ---------------------------------------------------------------------------- processes


def _pids_in_netns(ns: str) -> list[int]:
    """PIDs whose network namespace is `ns` (what `ip netns pids` does, without a process)."""
    try:
        target = os.stat(f"/run/netns/{ns}")
    except FileNotFoundError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            out.append(int(entry))
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def _alive(pid: int) -> bool:
    info = _ppid_and_state(pid)
    return info is not None and info[1] != "Z"


async def _stop_nginx(ns: str) -> None:
    """nginx masters stop their workers and reap them (killing a worker first would
    only make the master start another)."""
    masters = [p for p in _pids_in_netns(ns) if _comm(p) == "nginx" and _comm(_ppid(p)) != "nginx"]
    for pid in masters:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    await _poll(lambda: not any(_alive(p) for p in masters), "nginx stopped")


async def _kill_in_namespace(ns: str, spare: Callable[[int], bool] = lambda pid: False) -> None:
    """SIGKILL the namespace's processes (but `spare`d ones), leaves of the process
    tree first and each round only once the previous one is gone, so every parent
    reaps its children and nothing is orphaned."""
    while pids := [p for p in _pids_in_netns(ns) if _alive(p) and not spare(p)]:
        parents = {_ppid(p) for p in pids}
        leaves = [p for p in pids if p not in parents] or pids
        for pid in leaves:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await _poll(functools.partial(_all_dead, leaves), f"processes of {ns} killed")


def _all_dead(pids: Iterable[int]) -> bool:
    return not any(_alive(p) for p in pids)


def _ppid(pid: int) -> int:
    info = _ppid_and_state(pid)
    return info[0] if info is not None else 0


async def _reap_children(vm: NamespaceVm, program: str) -> None:
    """Collect the exit of a foreground daemon this process started."""
    proc = _children.get((vm.root, vm.name), {}).pop(program, None)
    if proc is None:
        return
    if _alive(proc.pid):
        # os.kill, not proc.kill(): Popen.send_signal polls first, which would reap a
        # process asyncio's child watcher is about to collect.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()
    if not _children.get((vm.root, vm.name)):
        _children.pop((vm.root, vm.name), None)


async def _run(*argv: str, input: bytes | None = None, check: bool = True) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(input)
    code = proc.returncode if proc.returncode is not None else -1
    if check and code != 0:
        raise VmError(f"{' '.join(argv)} failed ({code}): {err.decode(errors='replace').strip()}")
    return code, out, err


async def _poll(condition: Any, what: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise VmError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------------------- layouts


class NamespaceVmLayouts:
    """A `LayoutResolver` for a pool whose hosts are test VMs under `root`: a host's
    files live under its VM's directory. Looked up by address, refreshed on a miss."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_address: dict[str, Layout] = {}

    def __call__(self, identity: HostIdentity) -> Layout:
        layout = self._by_address.get(identity.host)
        if layout is None:
            self._by_address = {vm.address: vm.layout for vm in list_vms(self.root)}
            layout = self._by_address.get(identity.host)
        if layout is None:
            raise LookupError(f"no test VM with address {identity.host} under {self.root}")
        return layout
