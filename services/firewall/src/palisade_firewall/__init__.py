"""Palisade's firewall worker: per-service rules, rendered to nftables, applied atomically on the VM."""
