"""Palisade's ratelimit worker: the per-IP request limit and output cache of a service's web traffic."""
