"""Every worker with settings that keep its traffic on loopback: the hostile-input and
least-privilege tests start the whole set (or one of them) in-process."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from palisade_events import WorkerSpec
from palisade_events.secrets import generate_key
from palisade_hostctl import HostctlSettings

REPO = Path(__file__).resolve().parents[2]
# The relay's own test harness (a recording smarthost, SMTP clients from 127.0.0.x addresses).
sys.path.insert(0, str(REPO / "services" / "smtp-relay" / "tests"))
import smtp_harness  # type: ignore[import-not-found]  # noqa: E402 - found through the line above

Sink = smtp_harness.Sink

SENDER_DOMAIN = "vm.example.app"
PRIVATE_NETWORK = "127.0.0.0/24"  # 127.0.1.x stands for addresses outside it
AUTOMATION = ["127.0.0.0/8"]


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hostctl_settings(key_file: Path, testvm_root: Path | None = None) -> HostctlSettings:
    return HostctlSettings(
        key_file=key_file,
        allow_generated_key=True,
        testvm_root=testvm_root,
        connect_attempts=1,
        connect_timeout=3,
        retry_backoff_seconds=0.05,
        command_timeout=10,
    )


def spec_factories(
    tmp: Path, smtp_port: int, hostctl: HostctlSettings | None = None
) -> dict[str, Callable[[], WorkerSpec[Any]]]:
    """worker -> a function building its spec. `smtp_port`: where the MFA worker sends its codes
    and the relay relays to. Without `hostctl`, VM work goes to a key of `tmp` and hosts that the
    tests point at closed loopback ports (fails fast, retried, parked)."""
    from palisade_firewall.settings import FirewallSettings
    from palisade_firewall.worker import spec as firewall
    from palisade_lifecycle.worker import spec as lifecycle
    from palisade_mfa.settings import MfaSettings
    from palisade_mfa.worker import spec as mfa
    from palisade_ratelimit.settings import RateLimitWorkerSettings
    from palisade_ratelimit.worker import spec as ratelimit
    from palisade_smtp_relay.settings import RelaySettings
    from palisade_smtp_relay.worker import spec as relay
    from palisade_sshkeys.settings import SshKeysSettings
    from palisade_sshkeys.worker import spec as sshkeys
    from palisade_tls.settings import TlsSettings
    from palisade_tls.worker import spec as tls

    hosts = hostctl or hostctl_settings(tmp / "automation_ed25519")
    mfa_key = SecretStr(generate_key("hardening"))
    tls_key = SecretStr(generate_key("hardening"))
    return {
        "lifecycle": lifecycle,
        "mfa": lambda: mfa(
            MfaSettings(
                mfa_key=mfa_key,
                platform_smtp=SecretStr(f"smtp://127.0.0.1:{smtp_port}"),
                mfa_mail_from="Palisade <no-reply@palisade.test>",
                mfa_smtp_timeout_seconds=5,
            )
        ),
        "smtp-relay": lambda: relay(
            RelaySettings(
                smtp_listen="127.0.0.1:0",
                private_network=PRIVATE_NETWORK,
                sender_domain=SENDER_DOMAIN,
                smarthost=f"127.0.0.1:{smtp_port}",
                smtp_hostname="relay.test",
                smarthost_timeout=5,
            )
        ),
        "firewall": lambda: firewall(FirewallSettings(automation_sources=AUTOMATION), hosts),
        "sshkeys": lambda: sshkeys(SshKeysSettings(), hosts),
        "ratelimit": lambda: ratelimit(RateLimitWorkerSettings(upstream="127.0.0.1:8080"), hosts),
        "tls": lambda: tls(
            TlsSettings(
                acme_directory=f"https://127.0.0.1:{closed_port()}/dir",
                key=tls_key,
                platform_domains=["palisade.test"],
                dns_servers=["127.0.0.1"],
                dns_port=closed_port(),
                dns_timeout_seconds=0.5,
                acme_request_timeout_seconds=3,
                acme_poll_timeout_seconds=3,
                dns_every_seconds=3600,
                issue_every_seconds=3600,
                expiry_every_seconds=3600,
            ),
            hosts,
        ),
    }
