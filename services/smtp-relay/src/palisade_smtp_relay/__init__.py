"""Palisade's SMTP relay: sender rules, transactional mail only, 300 emails per hour per service."""
