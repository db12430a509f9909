"""Palisade's sshkeys worker: the SSH keys allowed on a service's VM."""
