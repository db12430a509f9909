"""What the TLS worker writes on a service's VM, through hostctl: the server blocks, the
certificate and its key, and the HTTP-01 challenge files. Paths come from the host's layout."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

from palisade_hostctl import Host, ReplaceResult

from .acme_client import Challenge
from .settings import TlsSettings

CHALLENGE_DIR = "/.well-known/acme-challenge"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")

# Remove every certificate directory but the one in use (and anything a reset set aside).
_PRUNE = r"""set -eu
dir=$1 keep=$2
[ -d "$dir" ] || exit 0
for d in "$dir"/*/; do
  [ -d "$d" ] || continue
  name=$(basename -- "$d")
  [ "$name" = "$keep" ] || rm -rf -- "$d"
done
"""


# `nginx -s reload` only signals the master, which then starts new workers and tells the
# old ones to stop accepting; for a moment both answer new connections, and a CA
# validating from several places at once can meet an old worker that never heard of the
# challenge. So the reload waits (bounded) until every worker that ran before it has
# stopped accepting (it retitles itself "worker process is shutting down") or is gone.
_RELOAD_AND_SETTLE = r"""set -u
pidfile=$1; shift
old=""
if [ -r "$pidfile" ]; then old=$(ps -o pid= --ppid "$(cat -- "$pidfile")" 2>/dev/null || true); fi
"$@" || exit $?
i=0
while [ $i -lt 200 ]; do
  busy=0
  for p in $old; do
    if [ -r "/proc/$p/cmdline" ] && tr '\0' ' ' < "/proc/$p/cmdline" | grep -q 'worker process *$'; then busy=1; fi
  done
  [ $busy = 0 ] && exit 0
  sleep 0.02
  i=$((i + 1))
done
echo "nginx reloaded, but workers of the previous configuration still accept connections" >&2
exit 0
"""


@dataclass(frozen=True)
class VmPaths:
    """The TLS worker's files on one VM (real paths mapped through the host's layout)."""

    site_file: str
    certificates_dir: str
    acme_webroot: str
    snippet: str
    nginx_pid: str

    @classmethod
    def of(cls, host: Host, settings: TlsSettings) -> VmPaths:
        layout = host.layout
        return cls(
            site_file=layout.path(settings.site_file),
            certificates_dir=layout.path(settings.certificates_dir),
            acme_webroot=layout.path(settings.acme_webroot),
            snippet=layout.path(settings.ratelimit_snippet),
            nginx_pid=layout.path(settings.nginx_pid_file),
        )

    def certificate(self, serial: str) -> tuple[str, str]:
        """(full chain, private key) of certificate `serial`."""
        directory = f"{self.certificates_dir}/{serial}"
        return f"{directory}/fullchain.pem", f"{directory}/privkey.pem"

    @property
    def challenge_dir(self) -> str:
        return self.acme_webroot + CHALLENGE_DIR

    def challenge_file(self, token: str) -> str:
        if not _TOKEN.match(token):
            raise ValueError(f"unexpected ACME token {token!r}")
        return f"{self.challenge_dir}/{token}"


@dataclass(frozen=True, repr=False)
class CertificateFiles:
    serial: str
    fullchain_pem: str
    key_pem: bytes  # decrypted only for the write; never logged

    def __repr__(self) -> str:
        return f"CertificateFiles({self.serial})"


async def install(
    host: Host, paths: VmPaths, server_blocks: str, certificate: CertificateFiles | None
) -> ReplaceResult:
    """Certificate files first (new paths per serial, so the running configuration never
    sees a half-written pair), then the server blocks with `nginx -t` and a reload: a
    configuration nginx refuses is rolled back by hostctl and the previous one stays in
    force. Certificate directories no longer referenced are removed afterwards."""
    await host.run(
        ["mkdir", "-p", "--", paths.challenge_dir, posixpath.dirname(paths.site_file), paths.certificates_dir],
        operation="mkdir",
    )
    if certificate is not None:
        chain, key = paths.certificate(certificate.serial)
        await host.run(["mkdir", "-p", "-m", "0700", "--", posixpath.dirname(chain)], operation="mkdir")
        await host.replace_file(key, certificate.key_pem, mode=0o600)
        await host.replace_file(chain, certificate.fullchain_pem, mode=0o644)
    result = await host.replace_file(
        paths.site_file,
        server_blocks,
        mode=0o644,
        validate=host.layout.nginx("-t", "-q"),
        activate=["sh", "-c", _RELOAD_AND_SETTLE, "sh", paths.nginx_pid, *host.layout.nginx("-s", "reload")],
    )
    keep = certificate.serial if certificate is not None else ""
    await host.run(["sh", "-c", _PRUNE, "sh", paths.certificates_dir, keep], operation="prune_certificates")
    return result


async def place_challenges(host: Host, paths: VmPaths, challenges: Iterable[Challenge]) -> None:
    await host.run(["mkdir", "-p", "--", paths.challenge_dir], operation="mkdir")
    for challenge in challenges:
        await host.replace_file(paths.challenge_file(challenge.token), challenge.key_authorization, mode=0o644)


async def remove_challenges(host: Host, paths: VmPaths, challenges: Iterable[Challenge]) -> None:
    files = [paths.challenge_file(c.token) for c in challenges]
    if files:
        await host.run(["rm", "-f", "--", *files], operation="remove_challenges")
