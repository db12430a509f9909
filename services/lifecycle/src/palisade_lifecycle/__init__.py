"""Palisade's lifecycle worker: termination protection and the backup grace period."""
