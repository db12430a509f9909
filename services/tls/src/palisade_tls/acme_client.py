"""Talking to the CA (ACME v2, RFC 8555) with the `acme` library.

The library is synchronous (requests): every call to the CA runs in a thread
(`asyncio.to_thread`) so the worker's event loop never blocks. The order is driven
step by step here rather than with `poll_and_finalize()`, which sleeps a second
between polls: this polls quickly at first and backs off, honouring Retry-After.

Two things the library leaves to its caller:
- a `badNonce` rejection is retried only once by `ClientNetwork.post`; CAs may reject
  any nonce (Pebble rejects ~5 % on purpose), so `_Network.post` retries several times;
- an error's `Retry-After` header (rate limits) is not kept on the exception, so
  `_Network` remembers the last response's header.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.errors import DeserializationError
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from .metrics import ACME_BAD_NONCES

log = logging.getLogger("palisade.tls.acme")

BAD_NONCE_ATTEMPTS = 10
USER_AGENT = "palisade-tls (acme-python)"

FailureKind = Literal["validation_failed", "self_check_failed", "rate_limited", "ca_error", "ca_unreachable"]


class AcmeFailure(Exception):  # noqa: N818 - an outcome of an attempt, raised
    """An attempt that did not produce a certificate, and why."""

    def __init__(
        self,
        kind: FailureKind,
        detail: str,
        *,
        retry_after: dt.datetime | None = None,
        failed_domains: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.retry_after = retry_after
        self.failed_domains = failed_domains or {}
        self.code = code


class AccountGone(Exception):  # noqa: N818 - named for what happened
    """The CA does not know the stored account (e.g. the CA was reset): register again."""


# ------------------------------------------------------------------ keys


def new_private_key() -> bytes:
    """A fresh ECDSA P-256 key, PEM (PKCS#8): for an account or for one certificate order."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _jwk(key_pem: bytes) -> JWKEC:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the ACME account key must be an EC key")
    return JWKEC(key=key)


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class Challenge:
    """One HTTP-01 challenge: serve `key_authorization` at `path` for `domain`."""

    domain: str
    token: str
    path: str  # /.well-known/acme-challenge/<token>
    key_authorization: str
    body: Any = field(repr=False, compare=False)  # messages.ChallengeBody
    authorization: Any = field(repr=False, compare=False)  # messages.AuthorizationResource


@dataclass(frozen=True)
class Issued:
    fullchain_pem: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    domains: tuple[str, ...]


def describe_certificate(fullchain_pem: str) -> tuple[str, dt.datetime, dt.datetime, tuple[str, ...]]:
    """(serial hex, not_before, not_after, DNS names) of the leaf of a PEM chain."""
    leaf = x509.load_pem_x509_certificate(fullchain_pem.encode())
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return format(leaf.serial_number, "x"), leaf.not_valid_before_utc, leaf.not_valid_after_utc, names


# ------------------------------------------------------------------ the network


class _Network(client.ClientNetwork):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_retry_after: str | None = None
        self.session.trust_env = False  # no proxies or netrc from the environment; the CA bundle is explicit

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        self.last_retry_after = response.headers.get("Retry-After")
        return response

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for attempt in range(1, BAD_NONCE_ATTEMPTS + 1):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce" or attempt == BAD_NONCE_ATTEMPTS:
                    raise
                ACME_BAD_NONCES.inc()
                log.debug("badNonce from the CA (attempt %d); retrying with a fresh nonce", attempt)
        raise AssertionError("unreachable")


def _parse_retry_after(value: str | None, now: dt.datetime) -> dt.datetime | None:
    if not value:
        return None
    try:
        return now + dt.timedelta(seconds=max(0, int(value.strip())))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


# ------------------------------------------------------------------ one account's session


class AcmeSession:
    """One account at one CA. Synchronous methods (`_...`) run in threads; the async ones
    are what the worker calls. One session is used by one issuance at a time."""

    def __init__(
        self,
        directory_url: str,
        account_key_pem: bytes,
        account_uri: str | None,
        *,
        ca_bundle: Path | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.directory_url = directory_url
        self.account_uri = account_uri
        self._key = _jwk(account_key_pem)
        account = messages.RegistrationResource(body=messages.Registration(), uri=account_uri) if account_uri else None
        self._net = _Network(
            key=self._key,
            account=account,
            alg=ES256,
            verify_ssl=str(ca_bundle) if ca_bundle else True,  # requests takes a CA file path here
            user_agent=USER_AGENT,
            timeout=max(1, round(timeout)),
        )
        self._client: client.ClientV2 | None = None

    def close(self) -> None:
        self._net.session.close()

    # ---- plumbing: every CA call goes through here, in a thread, with its errors sorted

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(self._guarded, fn, *args)

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except messages.Error as error:
            now = dt.datetime.now(dt.UTC)
            retry_after = _parse_retry_after(self._net.last_retry_after, now)
            if error.code == "accountDoesNotExist":
                raise AccountGone(str(error)) from error
            kind: FailureKind = "rate_limited" if error.code == "rateLimited" else "ca_error"
            raise AcmeFailure(kind, _problem(error), retry_after=retry_after, code=error.code) from error
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise AcmeFailure("ca_unreachable", f"{type(exc).__name__}: {exc}"[:400]) from exc
        except (errors.ClientError, requests.RequestException, DeserializationError, ValueError) as exc:
            raise AcmeFailure("ca_error", f"{type(exc).__name__}: {exc}"[:400]) from exc

    def _directory_client(self) -> client.ClientV2:
        if self._client is None:
            directory = client.ClientV2.get_directory(self.directory_url, self._net)
            self._client = client.ClientV2(directory, self._net)
        return self._client

    # ---- account

    async def register(self, email: str | None) -> str:
        """Create the account (agreeing to the CA's terms); returns its URL."""

        def run() -> str:
            acme = self._directory_client()
            registration = messages.NewRegistration.from_data(email=email, terms_of_service_agreed=True)
            try:
                regr = acme.new_account(registration)
            except errors.ConflictError as conflict:  # the key already has an account
                return str(conflict.location)
            return str(regr.uri)

        uri: str = await self._call(run)
        self.account_uri = uri
        self._net.account = messages.RegistrationResource(body=messages.Registration(), uri=uri)
        return uri

    # ---- an order

    async def obtain(
        self,
        domains: Sequence[str],
        key_pem: bytes,
        *,
        place: Callable[[list[Challenge]], Awaitable[None]],
        self_check: Callable[[list[Challenge]], Awaitable[dict[str, str]]],
        poll_timeout: float,
    ) -> Issued:
        """Order a certificate for `domains` (the first is the common name).

        `place` puts the HTTP-01 responses where the CA will fetch them; `self_check`
        fetches them as the CA would and returns the domains that did not answer right
        (then the CA is not asked: no failed validation is spent). The caller removes
        the files afterwards."""
        csr_pem = crypto_util.make_csr(key_pem, list(domains))
        order: messages.OrderResource = await self._call(lambda: self._directory_client().new_order(csr_pem))
        pending = [c for c in (self._http01(a) for a in order.authorizations) if c is not None]
        if pending:
            await place(pending)
            failures = await self_check(pending)
            if failures:
                raise AcmeFailure(
                    "self_check_failed",
                    "; ".join(f"{d}: {e}" for d, e in sorted(failures.items()))[:400],
                    failed_domains=failures,
                )
            for challenge in pending:
                await self._call(
                    self._directory_client().answer_challenge, challenge.body, challenge.body.chall.response(self._key)
                )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + poll_timeout
        await self._wait_for_authorizations(order, deadline)
        return await self._finalize(order, csr_pem, deadline)

    def _http01(self, authzr: messages.AuthorizationResource) -> Challenge | None:
        """The HTTP-01 challenge of a pending authorization (None when already valid)."""
        if authzr.body.status == messages.STATUS_VALID:
            return None
        domain = authzr.body.identifier.value
        for challb in authzr.body.challenges:
            if isinstance(challb.chall, challenges.HTTP01):
                validation = challb.chall.validation(self._key)
                return Challenge(
                    domain=domain,
                    token=challb.chall.encode("token"),
                    path=challb.chall.path,
                    key_authorization=validation,
                    body=challb,
                    authorization=authzr,
                )
        raise AcmeFailure("ca_error", f"the CA offers no HTTP-01 challenge for {domain}")

    async def _wait_for_authorizations(self, order: messages.OrderResource, deadline: float) -> None:
        failed: dict[str, str] = {}
        for authzr in order.authorizations:
            status, body = await self._poll_until(
                functools.partial(self._poll_authorization, authzr),
                lambda result: result[0].body.status,
                deadline,
                what=f"validation of {authzr.body.identifier.value}",
            )
            if status != messages.STATUS_VALID:
                errors_ = [str(c.error.detail or c.error) for c in body[0].body.challenges if c.error is not None]
                failed[body[0].body.identifier.value] = "; ".join(errors_)[:300] or f"authorization {status}"
        if failed:
            raise AcmeFailure(
                "validation_failed",
                "; ".join(f"{d}: {e}" for d, e in sorted(failed.items()))[:400],
                failed_domains=failed,
            )

    def _poll_authorization(
        self, authzr: messages.AuthorizationResource
    ) -> tuple[messages.AuthorizationResource, requests.Response]:
        return self._directory_client().poll(authzr)

    async def _finalize(self, order: messages.OrderResource, csr_pem: bytes, deadline: float) -> Issued:
        acme = self._directory_client()
        finalized: messages.OrderResource = await self._call(acme.begin_finalization, order)
        body: messages.Order = finalized.body

        def fetch_order() -> tuple[messages.Order, requests.Response]:
            response = self._post_as_get(order.uri)
            return messages.Order.from_json(response.json()), response

        if body.status not in (messages.STATUS_VALID, messages.STATUS_INVALID):
            _, result = await self._poll_until(
                fetch_order, lambda r: r[0].status, deadline, what="issuance", done=(messages.STATUS_PROCESSING,)
            )
            body = result[0]
        if body.status != messages.STATUS_VALID or not body.certificate:
            detail = str(body.error) if body.error is not None else f"order {body.status}"
            raise AcmeFailure("ca_error", detail[:400])
        url = body.certificate
        pem: str = await self._call(lambda: self._post_as_get(url).text)
        serial, not_before, not_after, names = describe_certificate(pem)
        return Issued(pem, serial, not_before, not_after, names)

    def _post_as_get(self, url: str) -> requests.Response:
        return self._net.post(url, None, new_nonce_url=self._directory_client().directory["newNonce"])

    async def _poll_until(
        self,
        fetch: Callable[[], Any],
        status_of: Callable[[Any], Any],
        deadline: float,
        *,
        what: str,
        done: tuple[Any, ...] = (),
    ) -> tuple[Any, Any]:
        """Fetch until the status is no longer pending (or one of `done`'s "keep waiting"
        states): quick at first, then backing off, never sooner than the CA's Retry-After."""
        loop = asyncio.get_running_loop()
        delay = 0.02
        waiting = (messages.STATUS_PENDING, *done)
        while True:
            result = await self._call(fetch)
            status = status_of(result)
            if status not in waiting:
                return status, result
            if loop.time() > deadline:
                raise AcmeFailure("ca_error", f"{what} still {status} at the deadline")
            retry_after = _parse_retry_after(self._net.last_retry_after, dt.datetime.now(dt.UTC))
            pause = delay
            if retry_after is not None:
                pause = max(pause, (retry_after - dt.datetime.now(dt.UTC)).total_seconds())
            await asyncio.sleep(min(pause, max(0.0, deadline - loop.time()), 5.0))
            delay = min(delay * 2, 2.0)


def _problem(error: messages.Error) -> str:
    parts = [error.code or str(error.typ), error.detail or ""]
    for sub in error.subproblems or ():
        ident = sub.identifier.value if sub.identifier is not None else "?"
        parts.append(f"{ident}: {sub.detail}")
    return " ".join(p for p in parts if p)[:400]
