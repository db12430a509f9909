"""Where things live on a VM.

Workers never write a VM path literally: they ask the host's `Layout`. The
default layout is a real VM's (`/etc/nginx/...`, `/root/.ssh/authorized_keys`,
`/etc/nftables.d/...`); a test VM's layout has the same shape under its own
directory, and its nginx commands carry the prefix and config path.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass

from .identity import HostIdentity


@dataclass(frozen=True)
class Layout:
    root: str = "/"

    def __post_init__(self) -> None:
        if not posixpath.isabs(self.root):
            raise ValueError(f"layout root must be absolute: {self.root!r}")
        object.__setattr__(self, "root", posixpath.normpath(self.root))

    @property
    def is_real(self) -> bool:
        return self.root == "/"

    def path(self, vm_path: str) -> str:
        """The file a real VM keeps at `vm_path` (absolute), under this layout."""
        if not posixpath.isabs(vm_path):
            raise ValueError(f"VM paths are absolute: {vm_path!r}")
        clean = posixpath.normpath(vm_path)
        if clean.startswith("//"):  # POSIX keeps a leading '//'; it means '/' here
            clean = "/" + clean.lstrip("/")
        return clean if self.is_real else self.root + clean

    # ---- the files and directories Palisade's workers own (each file has one owner)

    @property
    def authorized_keys(self) -> str:
        """sshkeys: root's authorized_keys."""
        return self.path("/root/.ssh/authorized_keys")

    @property
    def nginx_dir(self) -> str:
        return self.path("/etc/nginx")

    @property
    def nginx_conf(self) -> str:
        return self.path("/etc/nginx/nginx.conf")

    @property
    def nginx_conf_d(self) -> str:
        """http-level includes (rate-limit zones, cache paths)."""
        return self.path("/etc/nginx/conf.d")

    @property
    def nginx_sites(self) -> str:
        """Server blocks (TLS)."""
        return self.path("/etc/nginx/sites-enabled")

    @property
    def nginx_snippets(self) -> str:
        """Per-server includes (rate-limit and cache snippets)."""
        return self.path("/etc/nginx/snippets")

    @property
    def nftables_dir(self) -> str:
        """Rulesets loaded with `nft -f` (firewall)."""
        return self.path("/etc/nftables.d")

    @property
    def www_dir(self) -> str:
        """Web roots (e.g. the ACME HTTP-01 webroot)."""
        return self.path("/var/www")

    # ---- commands whose arguments depend on the layout

    def nginx(self, *args: str) -> list[str]:
        """`nginx ARGS` for this VM's nginx, e.g. `layout.nginx("-t")`, `layout.nginx("-s", "reload")`."""
        if self.is_real:
            return ["nginx", *args]
        return [
            "nginx",
            "-p",
            self.nginx_dir + "/",
            "-e",
            self.path("/var/log/nginx/error.log"),
            "-c",
            self.nginx_conf,
            *args,
        ]

    def nft(self, *args: str) -> list[str]:
        """`nft ARGS`; a test VM runs it inside its own network namespace, so the argv is the same."""
        return ["nft", *args]


REAL_VM = Layout()

# How a pool finds the layout of a host: real VMs all share the default.
LayoutResolver = Callable[[HostIdentity], Layout]


def real_vm_layout(_: HostIdentity) -> Layout:
    return REAL_VM
