"""IP rate limiter and output cache of a service's web traffic (worker `ratelimit`).

The seed: "By default, all services are preconfigured with a rate limiter of 150
requests per minute and per IP address" and "All GET requests are cached for 3
seconds". The worker keeps each service's policy and renders it as nginx
configuration on the VM. Commands carry the service in the envelope (`service_id`).
An accepted change (`WebPolicyUpdated`) is followed by `WebPolicyApplyRequested`
(the worker asks itself, so the policy is recorded even while the VM is unreachable)
and then by `WebPolicyApplied` or `WebPolicyApplyFailed`, all with the command's
correlation id.

The include contract with the TLS worker's server blocks (see
services/ratelimit/README.md, "For the TLS worker"): every `server {}` of the service
includes `NGINX_SERVER_SNIPPET` (a real VM's path; `host.layout.path(...)` maps it),
at server level or in the location that proxies to the application, written as
`NGINX_SERVER_SNIPPET_INCLUDE` so that nginx accepts it before the rate-limit worker
wrote the file. Requests under `ACME_CHALLENGE_PREFIX` are never limited nor cached,
whatever location serves them.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, StringConstraints

from ..messages import Command, Event, Payload, Query, Reply, StrictModel
from ..types import Reason, ServiceId

OWNER = "ratelimit"

# The per-server snippet the TLS worker's server blocks include (a real VM's path).
NGINX_SERVER_SNIPPET = "/etc/nginx/snippets/palisade-ratelimit.conf"
# The same as an `include` argument: the one-character class makes it a pattern, which
# nginx accepts while nothing matches yet; it matches that one file only.
NGINX_SERVER_SNIPPET_INCLUDE = "/etc/nginx/snippets/palisade-ratelimit.con[f]"
# The http-level file (zones, cache path, real client IP, the default server on port 80).
NGINX_HTTP_CONF = "/etc/nginx/conf.d/palisade-ratelimit.conf"
ACME_CHALLENGE_PREFIX = "/.well-known/acme-challenge/"

MAX_REQUESTS = 100_000
MAX_TTL_SECONDS = 3600

Checksum = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-f]{64}$"),
    Field(description="SHA-256 (hex) of the rendered nginx files, in order"),
]
ApplyState = Literal["applied", "pending", "failed"]


class _RateLimit:
    owner: ClassVar[str] = OWNER


class RateLimitSettings(StrictModel):
    requests: int = Field(ge=1, le=MAX_REQUESTS, description="Requests allowed per period and client IP")
    per: Literal["second", "minute"] = Field(description="The period")
    enabled: bool = True


class OutputCacheSettings(StrictModel):
    ttl_seconds: int = Field(ge=0, le=MAX_TTL_SECONDS, description="How long a GET/HEAD response is reused (0: off)")
    enabled: bool = True


# ------------------------------------------------------------------ commands


class RateLimitConfigured(_RateLimit, Command):
    """The user saved the rate limiter (dashboard: Security > Rate Limiter > Save):
    `requests` per `per` and client IP. The first `requests` rapid requests of a client
    pass, the next is answered 429, then one more passes every period/`requests`."""

    requests: int = Field(ge=1, le=MAX_REQUESTS, examples=[150, 500])
    per: Literal["second", "minute"] = Field("minute", examples=["minute"])
    enabled: bool = Field(True, description="False turns the limit off (the numbers are kept)")


class OutputCacheConfigured(_RateLimit, Command):
    """The user saved the output cache (Security > Output Cache > Save): GET and HEAD
    responses reused for `ttl_seconds`, never with Authorization or cookies."""

    ttl_seconds: int = Field(ge=0, le=MAX_TTL_SECONDS, examples=[3])
    enabled: bool = Field(True, description="False turns the cache off (the TTL is kept)")


class WebPolicyApplyRequested(_RateLimit, Command):
    """Render the service's policy and apply it to its VM's nginx. The worker sends this
    to itself after every accepted change; an operator may send it to re-push."""

    reason: Literal["provisioned", "reprovisioned", "policy_changed", "reconcile", "operator"] = "operator"


class NginxFile(StrictModel):
    path: str = Field(max_length=500, description="Where the file is on the VM")
    content: str = Field(max_length=65_536)


class WebPolicyDetails(Reply):
    """A service's web policy and the nginx configuration it renders to (the seed's
    "Nginx Configuration — Show Config")."""

    service_id: ServiceId
    rate_limit: RateLimitSettings
    output_cache: OutputCacheSettings
    burst: int = Field(ge=0, le=MAX_REQUESTS, description="nginx `burst`: requests - 1 (nginx admits burst + 1)")
    retry_after_seconds: int = Field(ge=1, le=60, description="The Retry-After sent with a 429")
    version: int = Field(ge=1, description="Bumped by every change of the policy")
    state: ApplyState = Field(
        description="applied: the VM's nginx runs this policy; pending: an apply is due; failed: the last one failed"
    )
    applied_checksum: Checksum | None = None
    last_error: str | None = Field(None, max_length=500)
    checksum: Checksum = Field(description="Of the files below")
    files: list[NginxFile] = Field(max_length=4, description="The rendered files, in the order they are written")


class GetWebPolicy(_RateLimit, Query):
    """Ask for a service's rate limit, output cache and rendered nginx configuration."""

    reply: ClassVar[type[Reply]] = WebPolicyDetails
    service_id: ServiceId


# ------------------------------------------------------------------ events


class WebPolicyUpdated(_RateLimit, Event):
    """The service's policy as recorded after a command or at provisioning (the defaults:
    150/minute, cache 3 s); `WebPolicyApplied` follows once the VM's nginx runs it."""

    version: int = Field(ge=1)
    rate_limit: RateLimitSettings
    output_cache: OutputCacheSettings
    changed: bool = Field(description="False when the command repeated the current settings")


class WebPolicyRejected(_RateLimit, Event):
    """A change was refused (unknown_service); nothing changed."""

    reason: Reason


class WebPolicyApplied(_RateLimit, Event):
    """The VM's nginx validated and reloaded the rendered policy (or already ran it)."""

    version: int = Field(ge=1)
    checksum: Checksum
    changed: bool = Field(description="False when the VM already had these files")


class WebPolicyApplyFailed(_RateLimit, Event):
    """The policy could not be applied; the VM's nginx keeps serving its previous
    configuration. Transient failures (VM unreachable) are retried first and do not
    produce this event."""

    reason: Reason = Field(
        description="nginx_refused (nginx -t rejected the configuration), host_key_mismatch,"
        " authentication_failed, negotiation_failed, command_failed, unknown_service"
    )
    detail: str | None = Field(None, max_length=500)


TYPES: tuple[type[Payload], ...] = (
    RateLimitConfigured,
    OutputCacheConfigured,
    WebPolicyApplyRequested,
    GetWebPolicy,
    WebPolicyUpdated,
    WebPolicyRejected,
    WebPolicyApplied,
    WebPolicyApplyFailed,
)
