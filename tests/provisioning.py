"""A `platform.ServiceProvisioned` as the platform publishes it, for tests that stand in for
the platform and whose workers never open an SSH connection to the service (the ones that do
use a test VM's real host key: tests/vms.py)."""

from __future__ import annotations

from palisade_events.contract import platform
from palisade_events.contract.platform import SshEndpoint

# A well-formed ed25519 public key nobody holds the private half of.
TEST_HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3W3XqvGSHjZOLA1c5m6pY9bW2sF0H7n1d8oZk5y1Q"


def service_provisioned(
    service_id: str,
    name: str,
    *,
    private_ip: str,
    software: str = "redis",
    account_id: str = "acc-1",
    hostname: str | None = None,
    ipv4: str | None = None,
    ssh_host: str | None = None,
    ssh_port: int = 22,
) -> platform.ServiceProvisioned:
    """`hostname` defaults to `<name>.vm.example.net`, the SSH endpoint to the private address."""
    return platform.ServiceProvisioned(
        service_id=service_id,
        name=name,
        software=software,
        account_id=account_id,
        hostname=hostname or f"{name}.vm.example.net",
        ipv4=ipv4,
        private_ip=private_ip,
        ssh=SshEndpoint(host=ssh_host or private_ip, port=ssh_port, host_key=TEST_HOST_KEY),
    )
