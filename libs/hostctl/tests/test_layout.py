"""Pure parts of hostctl: layouts, host identities, settings."""

from __future__ import annotations

from pathlib import Path

import asyncssh
import pytest

from palisade_hostctl import REAL_VM, HostctlConfigError, HostctlSettings, HostIdentity, Layout


def test_the_default_layout_is_a_real_vm() -> None:
    assert REAL_VM.authorized_keys == "/root/.ssh/authorized_keys"
    assert REAL_VM.nginx_conf == "/etc/nginx/nginx.conf"
    assert REAL_VM.nginx_sites == "/etc/nginx/sites-enabled"
    assert REAL_VM.nftables_dir == "/etc/nftables.d"
    assert REAL_VM.path("/var/www/acme") == "/var/www/acme"
    assert REAL_VM.nginx("-t") == ["nginx", "-t"]
    assert REAL_VM.nft("-c", "-f", "/etc/nftables.d/x.nft") == ["nft", "-c", "-f", "/etc/nftables.d/x.nft"]


def test_a_test_vm_layout_keeps_every_path_under_its_directory() -> None:
    layout = Layout("/run/palisade-testvm/vm1/")
    assert layout.authorized_keys == "/run/palisade-testvm/vm1/root/.ssh/authorized_keys"
    assert layout.nftables_dir == "/run/palisade-testvm/vm1/etc/nftables.d"
    # `..` cannot climb out of the VM's directory.
    assert layout.path("/etc/../../../etc/passwd") == "/run/palisade-testvm/vm1/etc/passwd"
    assert layout.path("//etc//nginx/") == "/run/palisade-testvm/vm1/etc/nginx"
    assert layout.nginx("-s", "reload") == [
        "nginx",
        "-p",
        "/run/palisade-testvm/vm1/etc/nginx/",
        "-e",
        "/run/palisade-testvm/vm1/var/log/nginx/error.log",
        "-c",
        "/run/palisade-testvm/vm1/etc/nginx/nginx.conf",
        "-s",
        "reload",
    ]
    with pytest.raises(ValueError):
        layout.path("etc/nginx")
    with pytest.raises(ValueError):
        Layout("relative/root")


def test_host_identity_normalises_the_key_and_compares_by_it() -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    line = key.export_public_key().decode().strip()
    a = HostIdentity("10.0.0.5", 22, line + " some comment")
    b = HostIdentity("10.0.0.5", 22, line)
    assert a == b
    assert hash(a) == hash(b)
    assert (a.host_key, a.algorithm) == (line, "ssh-ed25519")
    assert a.fingerprint == key.get_fingerprint("sha256")
    assert a.fingerprint.startswith("SHA256:")
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    assert HostIdentity("10.0.0.5", 22, other) != a
    with pytest.raises(ValueError):
        HostIdentity("10.0.0.5", 22, "ssh-ed25519 AAAAnotakey")
    with pytest.raises(ValueError):
        HostIdentity("not-an-ip", 22, line)
    with pytest.raises(ValueError):
        HostIdentity("10.0.0.5", 0, line)


def test_the_automation_key_must_exist_unless_a_development_key_may_be_made(tmp_path: Path) -> None:
    missing = tmp_path / "keys" / "automation_ed25519"
    with pytest.raises(HostctlConfigError, match="PALISADE_HOSTCTL_KEY_FILE"):
        HostctlSettings(key_file=missing).automation_key()
    made = HostctlSettings(key_file=missing, allow_generated_key=True).automation_key()
    assert oct(missing.stat().st_mode & 0o777) == oct(0o600)
    assert HostctlSettings(key_file=missing).automation_key().get_fingerprint() == made.get_fingerprint()
