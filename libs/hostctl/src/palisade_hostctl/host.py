"""Operations on one host: run a command, read a file, replace a file safely.

Every remote command is an argv list joined with `shlex.join`, so data (paths,
titles, domains) can never become shell syntax. The small shell scripts below
take their inputs as positional parameters (`sh -c SCRIPT sh ARG...`), and file
contents travel on stdin, never in the command line.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ActivationFailed, CommandFailed, ValidationFailed
from .identity import HostIdentity
from .layout import Layout

if TYPE_CHECKING:
    from .pool import HostPool

# Before a replace: finish off a replace that was interrupted after its install
# (put the previous file back, or remove a file that had no predecessor), then
# report the current file's hash, mode, owner and group.
_PREPARE = r"""set -eu
p=$1 prev=$2 new=$3
if [ -e "$prev" ]; then mv -f -- "$prev" "$p"; sync -- "$(dirname -- "$p")"
elif [ -e "$new" ]; then rm -f -- "$p" "$new"; sync -- "$(dirname -- "$p")"; fi
if [ ! -e "$p" ]; then echo absent; exit 0; fi
h=$(sha256sum < "$p")
set -- $(stat -c '%a %U %G' -- "$p")
echo "${h%% *} $1 $2 $3"
"""

# Write stdin to a temp file beside the target, check it is exactly what was sent,
# fsync it, set mode/owner, keep the previous file (a hard link, or a marker when there
# was none) if it may have to come back, then rename over the target and fsync the
# directory. The check matters: when the client's connection dies after the command
# started, stdin simply ends, and without it a short or empty file would replace the
# target (an empty authorized_keys locks Palisade out of the VM).
_INSTALL = r"""set -eu
p=$1 tmp=$2 prev=$3 new=$4 mode=$5 owner=$6 keep=$7 sum=$8
trap 'rm -f -- "$tmp"' EXIT
# A signal's default action would skip the EXIT trap and leave the temp file behind:
# the client gone mid-copy closes our stderr, and the message below would die of
# SIGPIPE. Ignore it (the write fails, set -e exits) and turn the others into exits.
trap '' PIPE
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM
umask 077
cat > "$tmp"
h=$(sha256sum < "$tmp")
if [ "${h%% *}" != "$sum" ]; then echo "content incomplete: $p left as it was" >&2; exit 4; fi
chmod -- "$mode" "$tmp"
if [ -n "$owner" ]; then chown -- "$owner" "$tmp"; fi
sync -- "$tmp"
if [ "$keep" = 1 ]; then
  if [ -e "$p" ]; then ln -f -- "$p" "$prev"; else : > "$new"; fi
fi
mv -f -- "$tmp" "$p"
sync -- "$(dirname -- "$p")"
"""

_RESTORE = r"""set -eu
p=$1 prev=$2 new=$3
if [ -e "$prev" ]; then mv -f -- "$prev" "$p"; else rm -f -- "$p"; fi
rm -f -- "$new"
sync -- "$(dirname -- "$p")"
"""

_READ = r"""if [ -e "$1" ]; then exec cat -- "$1"; fi
exit 3
"""

_STAT = r"""if [ ! -e "$1" ]; then exit 3; fi
exec stat -c '%a %U %G %s' -- "$1"
"""

_OWNER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}(:[a-z_][a-z0-9_-]{0,31})?$")


@dataclass(frozen=True)
class CommandResult:
    argv: list[str]
    exit_status: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def output(self) -> str:
        return (self.stdout + self.stderr).decode("utf-8", "replace").strip()


@dataclass(frozen=True)
class FileStat:
    mode: int
    owner: str
    group: str
    size: int


@dataclass(frozen=True)
class ReplaceResult:
    path: str
    changed: bool
    sha256: str
    previous_sha256: str | None


@dataclass(frozen=True)
class _Current:
    sha256: str
    mode: int
    owner: str
    group: str


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


class Host:
    """One host, through the pool's shared connection and its session bound."""

    def __init__(self, pool: HostPool, identity: HostIdentity, layout: Layout) -> None:
        self.pool = pool
        self.identity = identity
        self.layout = layout

    def __repr__(self) -> str:
        return f"Host({self.identity}, layout root {self.layout.root})"

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | str | None = None,
        check: bool = True,
        timeout: float | None = None,
        operation: str | None = None,
    ) -> CommandResult:
        """Run `argv` on the host; with `check`, a non-zero exit raises CommandFailed."""
        data = input.encode() if isinstance(input, str) else input
        raw = await self.pool.run(self.identity, argv, input=data, timeout=timeout, operation=operation)
        result = CommandResult(list(argv), raw.exit_status, raw.stdout, raw.stderr)
        if check and result.exit_status != 0:
            raise self._failed(CommandFailed, f"{operation or argv[0]} failed", result)
        return result

    def _failed(self, cls: type[CommandFailed], what: str, result: CommandResult) -> CommandFailed:
        detail = result.output[-2000:] or "no output"
        return cls(
            f"{self.identity}: {what} (exit {result.exit_status}): {detail}",
            host=str(self.identity),
            argv=result.argv,
            exit_status=result.exit_status,
            stdout=result.stdout,
            stderr=result.stderr,
        )

    async def read_file(self, path: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        _check_path(path)
        result = await self.run(["sh", "-c", _READ, "sh", path], check=False, operation="read_file")
        if result.exit_status == 3:
            return None
        if result.exit_status != 0:
            raise self._failed(CommandFailed, f"reading {path} failed", result)
        return result.stdout

    async def stat(self, path: str) -> FileStat | None:
        _check_path(path)
        result = await self.run(["sh", "-c", _STAT, "sh", path], check=False, operation="stat")
        if result.exit_status == 3:
            return None
        if result.exit_status != 0:
            raise self._failed(CommandFailed, f"stat {path} failed", result)
        mode, owner, group, size = result.text.split()
        return FileStat(int(mode, 8), owner, group, int(size))

    async def replace_file(
        self,
        path: str,
        content: bytes | str,
        *,
        mode: int = 0o644,
        owner: str | None = None,
        validate: Sequence[str] | None = None,
        activate: Sequence[str] | None = None,
    ) -> ReplaceResult:
        """Put `content` at `path` atomically.

        Skipped (`changed=False`, nothing run after the check) when the file already
        has this content, mode and owner. Otherwise: temp file, fsync, rename; then
        `validate` (e.g. `nginx -t`), and on failure the previous file comes back and
        ValidationFailed carries the validator's output; then `activate` (a reload),
        and on failure the previous file comes back too (ActivationFailed), so the
        file on disk matches what runs. `owner` is `user` or `user:group`.
        """
        _check_path(path)
        if owner is not None and not _OWNER.match(owner):
            raise ValueError(f"invalid owner {owner!r}")
        if not 0 <= mode <= 0o7777:
            raise ValueError(f"invalid mode {mode:o}")
        data = content.encode() if isinstance(content, str) else content
        wanted = sha256_hex(data)
        directory, base = posixpath.split(path)
        tmp = posixpath.join(directory, f".{base}.palisade-tmp")
        prev = posixpath.join(directory, f".{base}.palisade-prev")
        new = posixpath.join(directory, f".{base}.palisade-new")
        keep = validate is not None or activate is not None
        async with self.pool.path_lock(self.identity, path):
            current = await self._prepare(path, prev, new)
            if current is not None and _same(current, wanted, mode, owner):
                return ReplaceResult(path, False, wanted, current.sha256)
            keep_flag = "1" if keep else "0"
            await self.run(
                ["sh", "-c", _INSTALL, "sh", path, tmp, prev, new, f"{mode:o}", owner or "", keep_flag, wanted],
                input=data,
                operation="install_file",
            )
            for step, argv, error in (
                ("validate", validate, ValidationFailed),
                ("activate", activate, ActivationFailed),
            ):
                if argv is None:
                    continue
                result = await self.run(argv, check=False, operation=step)
                if result.exit_status != 0:
                    await self.run(["sh", "-c", _RESTORE, "sh", path, prev, new], operation="restore_file")
                    raise self._failed(error, f"{step} of {path} failed, previous file restored", result)
            if keep:
                await self.run(["rm", "-f", "--", prev, new], operation="commit_file")
        return ReplaceResult(path, True, wanted, current.sha256 if current else None)

    async def _prepare(self, path: str, prev: str, new: str) -> _Current | None:
        result = await self.run(["sh", "-c", _PREPARE, "sh", path, prev, new], operation="check_file")
        fields = result.text.split()
        if fields == ["absent"]:
            return None
        digest, mode, owner, group = fields
        return _Current(digest, int(mode, 8), owner, group)


def _same(current: _Current, wanted: str, mode: int, owner: str | None) -> bool:
    if current.sha256 != wanted or current.mode != mode:
        return False
    if owner is None:
        return True
    user, _, group = owner.partition(":")
    return current.owner == user and (not group or current.group == group)


def _check_path(path: str) -> None:
    if not posixpath.isabs(path) or path.endswith("/"):
        raise ValueError(f"expected an absolute file path, got {path!r}")
    if any(c in path for c in "\x00\n\r"):
        raise ValueError("file paths cannot contain NUL or line breaks")


__all__ = ["CommandResult", "FileStat", "Host", "HostIdentity", "ReplaceResult", "sha256_hex"]
