"""Palisade worker `mfa`: email one-time codes and TOTP authenticator apps for platform accounts."""
