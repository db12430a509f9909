"""Palisade's TLS worker: custom domains, DNS checks, ACME certificates, nginx server blocks."""
