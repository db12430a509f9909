"""Commands and file replaces on a real test VM (its own sshd, nginx, nftables)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from palisade_hostctl import (
    ActivationFailed,
    CommandFailed,
    CommandTimeout,
    HostPool,
    ValidationFailed,
    sha256_hex,
)
from palisade_hostctl.testvm import NamespaceVm
from tests.fixtures import wait_until
from tests.vms import http_get

pytestmark = pytest.mark.root


def _host_nft_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout


async def test_arguments_reach_the_command_verbatim_and_never_as_shell_syntax(pool: HostPool, vm: NamespaceVm) -> None:
    marker = vm.dir / "pwned"
    nasty = [
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"; touch {marker}",
        f"a' ; touch {marker}; echo '",
        'double "quotes" and \\backslash',
        "new\nline",
        "  spaces  ",
        "*",
        "",
    ]
    result = await pool.host(vm.identity).run(["printf", "%s\\0", *nasty])
    assert result.stdout.split(b"\0")[:-1] == [a.encode() for a in nasty]
    assert not marker.exists()
    with pytest.raises(TypeError):
        await pool.host(vm.identity).run("echo hi")  # type: ignore[arg-type]


async def test_exit_status_is_checked_and_output_captured(pool: HostPool, vm: NamespaceVm) -> None:
    host = pool.host(vm.identity)
    with pytest.raises(CommandFailed) as failed:
        await host.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert failed.value.exit_status == 7
    assert (failed.value.stdout, failed.value.stderr) == (b"out\n", b"err\n")
    assert "exit 7" in str(failed.value)
    assert "err" in str(failed.value)

    result = await host.run(["sh", "-c", "exit 3"], check=False)
    assert result.exit_status == 3
    assert (await host.run(["cat"], input=b"stdin \x00 bytes")).stdout == b"stdin \x00 bytes"
    assert (await host.run(["hostname", "-I"])).text.split() == [vm.address]  # it runs inside the VM


async def test_a_command_over_its_timeout_is_killed_and_the_host_stays_usable(pool: HostPool, vm: NamespaceVm) -> None:
    host = pool.host(vm.identity)
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as timed_out:
        await host.run(["sleep", "30"], timeout=0.3)
    assert timed_out.value.transient
    assert time.monotonic() - started < 5

    await wait_until(lambda: "sleep" not in {comm for _, comm in vm.processes()}, what="the remote sleep killed")
    assert (await host.run(["echo", "still here"])).text == "still here\n"


async def test_replace_file_is_atomic_sets_mode_and_skips_unchanged_content(pool: HostPool, vm: NamespaceVm) -> None:
    host = pool.host(vm.identity)
    path = host.layout.path("/etc/palisade-test.conf")
    local = vm.path("/etc/palisade-test.conf")

    first = await host.replace_file(path, "one\n", mode=0o640, owner="root:root")
    assert (first.changed, first.previous_sha256, first.sha256) == (True, None, sha256_hex(b"one\n"))
    assert local.read_bytes() == b"one\n"
    assert oct(local.stat().st_mode & 0o7777) == oct(0o640)
    before = local.stat()

    again = await host.replace_file(path, "one\n", mode=0o640, owner="root:root")
    assert again.changed is False
    after = local.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    changed = await host.replace_file(path, b"two\n", mode=0o640)
    assert changed.changed
    assert changed.previous_sha256 == sha256_hex(b"one\n")
    assert local.read_bytes() == b"two\n"
    assert local.stat().st_ino != before.st_ino  # renamed into place, not rewritten
    assert (await host.replace_file(path, b"two\n", mode=0o600)).changed  # a mode change alone rewrites
    assert oct(local.stat().st_mode & 0o7777) == oct(0o600)
    assert sorted(p.name for p in local.parent.iterdir() if "palisade-test" in p.name) == ["palisade-test.conf"]

    assert await host.read_file(path) == b"two\n"
    assert await host.read_file(host.layout.path("/etc/nothing-here")) is None
    stat = await host.stat(path)
    assert stat is not None
    assert (stat.mode, stat.owner, stat.size) == (0o600, "root", 4)


async def test_nginx_validate_then_reload_and_a_refused_config_restores_the_previous(
    pool: HostPool, vm: NamespaceVm
) -> None:
    host = pool.host(vm.identity)
    layout = host.layout
    site = f"{layout.nginx_sites}/palisade-test"

    def server(text: str) -> str:
        return f'server {{ listen {vm.address}:8081; location / {{ return 200 "{text}\\n"; }} }}\n'

    async def serves(text: str) -> bool:
        try:
            return (await http_get(vm.address, 8081)) == (200, f"{text}\n".encode())
        except OSError:
            return False

    validate, activate = layout.nginx("-t"), layout.nginx("-s", "reload")
    await host.replace_file(site, server("v1"), validate=validate, activate=activate)
    await wait_until(lambda: serves("v1"), what="nginx serving v1")
    await host.replace_file(site, server("v2"), validate=validate, activate=activate)
    await wait_until(lambda: serves("v2"), what="nginx serving v2")

    with pytest.raises(ValidationFailed) as refused:
        await host.replace_file(site, "server { listen nowhere:; }\n", validate=validate, activate=activate)
    assert "nginx: [emerg]" in refused.value.output
    assert "test failed" in refused.value.output
    assert vm.path("/etc/nginx/sites-enabled/palisade-test").read_text() == server("v2")
    # (Right after a reload the old worker may still answer a request or two.)
    await wait_until(lambda: serves("v2"), what="nginx still serving v2")
    assert sorted(os.listdir(vm.path("/etc/nginx/sites-enabled"))) == ["palisade-test"]

    # A new file that fails validation is removed again: nothing is left behind.
    with pytest.raises(ValidationFailed):
        await host.replace_file(f"{layout.nginx_conf_d}/broken.conf", "nonsense;\n", validate=validate)
    assert os.listdir(vm.path("/etc/nginx/conf.d")) == []


async def test_a_failed_activation_puts_the_previous_file_back(pool: HostPool, vm: NamespaceVm) -> None:
    host = pool.host(vm.identity)
    path = host.layout.path("/etc/palisade-activate.conf")
    await host.replace_file(path, "good\n", activate=["true"])
    with pytest.raises(ActivationFailed) as failed:
        await host.replace_file(path, "next\n", activate=["sh", "-c", "echo reload refused >&2; exit 1"])
    assert "reload refused" in failed.value.output
    assert vm.path("/etc/palisade-activate.conf").read_text() == "good\n"


async def test_a_replace_interrupted_before_validation_is_rolled_back_not_taken_as_done(
    pool: HostPool, vm: NamespaceVm
) -> None:
    """A connection lost between install and validation leaves the new file and the
    kept previous one: the next replace puts the previous back first, so the
    unvalidated content is never skipped as 'unchanged'."""
    host = pool.host(vm.identity)
    path = f"{host.layout.nginx_conf_d}/zone.conf"
    local = vm.path("/etc/nginx/conf.d/zone.conf")
    good = "limit_req_zone $binary_remote_addr zone=z:1m rate=10r/s;\n"
    await host.replace_file(path, good, validate=host.layout.nginx("-t"))
    # What an install followed by a lost connection leaves behind:
    os.link(local, local.with_name(".zone.conf.palisade-prev"))
    bad = "limit_req_zone broken;\n"
    tmp = local.with_name("x.tmp")
    tmp.write_text(bad)
    tmp.replace(local)

    with pytest.raises(ValidationFailed):
        await host.replace_file(path, bad, validate=host.layout.nginx("-t"))
    assert local.read_text() == good
    assert os.listdir(local.parent) == ["zone.conf"]


async def test_nftables_rules_apply_inside_the_vm_only(pool: HostPool, vm: NamespaceVm) -> None:
    host = pool.host(vm.identity)
    path = f"{host.layout.nftables_dir}/palisade-test.nft"
    ruleset = (
        "table inet palisade_test {\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        "    tcp dport 9999 drop\n"
        "  }\n"
        "}\n"
    )
    validate, activate = host.layout.nft("-c", "-f", path), host.layout.nft("-f", path)
    await host.replace_file(path, ruleset, mode=0o600, validate=validate, activate=activate)
    listed = (await host.run(["nft", "list", "table", "inet", "palisade_test"])).text
    assert "tcp dport 9999 drop" in listed
    assert "palisade_test" not in _host_nft_tables()

    with pytest.raises(ValidationFailed) as refused:
        await host.replace_file(path, "table inet palisade_test { chain input { nonsense } }\n", validate=validate)
    assert "Error" in refused.value.output
    assert "tcp dport 9999 drop" in (await host.run(["nft", "list", "table", "inet", "palisade_test"])).text
    assert vm.path("/etc/nftables.d/palisade-test.nft").read_text() == ruleset
