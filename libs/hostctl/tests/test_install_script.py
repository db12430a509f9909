"""The install script run by `sh` itself, with the ends a dying client leaves it.

When the worker's connection dies mid-copy, sshd closes the command's stdin and its
stderr: the script then sees short content and its complaint about it hits a closed
pipe. A shell killed by SIGPIPE skips its EXIT trap, so before the script ignored it the
temp file stayed beside the target (the full-suite fault test caught it now and then).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from palisade_hostctl.host import _INSTALL, sha256_hex


def _install(target: Path, content: bytes, *, sent: bytes) -> subprocess.Popen[bytes]:
    tmp = target.with_name(f".{target.name}.palisade-tmp")
    args = [str(target), str(tmp), str(target) + ".prev", str(target) + ".new", "600", "", "0", sha256_hex(content)]
    read_end, write_end = os.pipe()
    os.close(read_end)  # stderr leads nowhere: the client is gone
    try:
        process = subprocess.Popen(["sh", "-c", _INSTALL, "sh", *args], stdin=subprocess.PIPE, stderr=write_end)
    finally:
        os.close(write_end)
    assert process.stdin is not None
    process.stdin.write(sent)
    process.stdin.close()
    return process


def test_short_content_with_the_client_gone_leaves_the_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "authorized_keys"
    target.write_bytes(b"ssh-ed25519 AAAA old\n")
    new = b"ssh-ed25519 AAAA old\nssh-ed25519 BBBB new\n"
    for _ in range(20):  # the closed stderr must not matter on any of the runs
        process = _install(target, new, sent=new[:10])
        assert process.wait(timeout=10) != 0
        assert process.returncode > 0, "the shell died of a signal, skipping its cleanup"
        assert target.read_bytes() == b"ssh-ed25519 AAAA old\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["authorized_keys"]


def test_a_terminated_install_removes_its_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "authorized_keys"
    target.write_bytes(b"old\n")
    tmp = tmp_path / ".authorized_keys.palisade-tmp"
    args = [str(target), str(tmp), str(target) + ".prev", str(target) + ".new", "600", "", "0", sha256_hex(b"new\n")]
    process = subprocess.Popen(
        ["sh", "-c", _INSTALL, "sh", *args], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 10
    while not tmp.exists():  # `cat` is copying stdin, which stays open
        assert time.monotonic() < deadline, "the install never started its copy"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGTERM)  # as a service manager stops the session: `cat` and its shell
    assert process.wait(timeout=10) == 143
    assert target.read_bytes() == b"old\n"
    assert not tmp.exists()
    assert process.stdin is not None
    process.stdin.close()
