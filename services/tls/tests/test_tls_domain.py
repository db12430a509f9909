"""The TLS worker's pure rules, without I/O (the rendered nginx configuration is checked by
the real nginx, `nginx -t`, in a scratch prefix)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from palisade_events.cloudflare import cloudflare_ranges
from palisade_events.contract import ratelimit
from palisade_events.secrets import DecryptionError, Keyring, UnknownKeyError, generate_key, parse_key
from palisade_tls import acme_client
from palisade_tls.cli import describe, ranges_from_text, ranges_json
from palisade_tls.domain import (
    DnsAnswer,
    DomainRefused,
    ServerBlocks,
    check_domain,
    dns_recheck_delay,
    expected_records,
    include_if_present,
    judge_dns,
    next_attempt_after_failure,
    render_server_blocks,
    renewal_time,
    retry_delay,
)
from palisade_tls.settings import TlsSettings

PLATFORM = ["vm.example.net"]
HOST = "redis-bgrkj-u76.vm.example.net"
T0 = dt.datetime(2026, 11, 25, 9, 0, tzinfo=dt.UTC)


# ---------------------------------------------------------------- domain checks


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("shop.example.com", "shop.example.com"),
        ("Shop.Example.COM", "shop.example.com"),
        ("  shop.example.com ", "shop.example.com"),
        ("shop.example.com.", "shop.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("a-b.c-d.example", "a-b.c-d.example"),
        ("1shop.example.com", "1shop.example.com"),
        ("example.vm.example.net.evil.com", "example.vm.example.net.evil.com"),
        ("notvm.example.net", "notvm.example.net"),
    ],
)
def test_acceptable_domains_are_stored_in_a_label_form(raw: str, name: str) -> None:
    assert check_domain(raw, platform_domains=PLATFORM).name == name


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "domain_empty"),
        (" \t ", "domain_empty"),
        ("127.0.0.1", "domain_is_ip"),
        ("127.0.0.1.", "domain_is_ip"),
        ("::1", "domain_is_ip"),
        ("[2001:db8::1]", "domain_is_ip"),
        ("1.2.3", "domain_is_ip"),
        ("shop.123", "domain_is_ip"),
        ("*.example.com", "domain_wildcard"),
        ("shop.*.example.com", "domain_wildcard"),
        ("shop.example.com;", "domain_invalid_characters"),
        ("shop.example.com include /etc/passwd", "domain_invalid_characters"),
        ("shop.example.com\nreturn", "domain_invalid_characters"),
        ("shop.example.com\r", "domain_invalid_characters"),
        ("shop.example.com\x00", "domain_invalid_characters"),
        ("shop{}.example.com", "domain_invalid_characters"),
        ("'shop'.example.com", "domain_invalid_characters"),
        ("$http_host", "domain_invalid_characters"),
        ("shop.example.com#x", "domain_invalid_characters"),
        ("shop\\.example.com", "domain_invalid_characters"),
        ("https://shop.example.com", "domain_invalid_characters"),
        ("user@shop.example.com", "domain_invalid_characters"),
        ("sh_op.example.com", "domain_invalid_characters"),
        ("shop\u2028.example.com", "domain_invalid_characters"),
        ("shop\u200d.example.com", "domain_invalid_characters"),
        ("shop\u00a0.example.com", "domain_invalid_characters"),
        (("a" * 63 + ".") * 4 + "com", "domain_too_long"),
        ("a" * 64 + ".com", "domain_idna_invalid"),
        ("-shop.example.com", "domain_idna_invalid"),
        ("shop-.example.com", "domain_idna_invalid"),
        ("shop..example.com", "domain_idna_invalid"),
        (".example.com", "domain_idna_invalid"),
        ("xn--a.example.com", "domain_idna_invalid"),
        ("shop.example.com..", "domain_idna_invalid"),
        ("localhost", "domain_not_fully_qualified"),
        ("vm.example.net", "domain_platform_reserved"),
        ("VM.Example.Net.", "domain_platform_reserved"),
        ("other-svc.vm.example.net", "domain_platform_reserved"),
    ],
)
def test_each_unacceptable_domain_has_its_reason(raw: str, reason: str) -> None:
    with pytest.raises(DomainRefused) as refused:
        check_domain(raw, platform_domains=PLATFORM)
    assert refused.value.reason == reason


def test_a_label_length_counts_after_idna_conversion() -> None:
    # 62 Unicode letters become a label of more than 63 octets.
    with pytest.raises(DomainRefused, match="domain_idna_invalid"):
        check_domain("ü" * 62 + ".example.com", platform_domains=PLATFORM)


# ---------------------------------------------------------------- DNS


def judge(**answer: Any) -> Any:
    return judge_dns(
        DnsAnswer(**answer),
        hostname=HOST,
        service_addresses=["23.88.47.208", "2a01:4f8::1"],
        cloudflare=cloudflare_ranges(),
    )


def test_dns_verdicts() -> None:
    assert judge(cname=HOST, addresses=("23.88.47.208",)).via == "cname"
    assert judge(cname=HOST).outcome == "ok"  # the CNAME is what counts
    assert judge(addresses=("23.88.47.208",)).via == "address"
    assert judge(addresses=("23.88.47.208", "2a01:4f8:0::1")).outcome == "ok"
    # www -> apex -> the service's address is fine too.
    assert judge(cname="example.com", addresses=("23.88.47.208",)).outcome == "ok"
    nothing = judge()
    assert (nothing.outcome, nothing.reason) == ("pending", "no_records")
    failed = judge(error="A: timed out")
    assert (failed.outcome, failed.reason) == ("pending", "lookup_failed")
    stray = judge(addresses=("23.88.47.208", "2001:db8::5"))
    assert (stray.outcome, stray.reason, stray.found) == (
        "pending",
        "points_elsewhere",
        ("23.88.47.208", "2001:db8::5"),
    )
    elsewhere = judge(cname="other.example.net", addresses=("198.51.100.7",))
    assert elsewhere.found == ("other.example.net", "198.51.100.7")
    proxied = judge(addresses=("104.16.132.229", "2606:4700::6810:84e5"))
    assert proxied.outcome == "proxied"


def test_expected_records_prefer_a_cname() -> None:
    records = expected_records("shop.example.com", HOST, "23.88.47.208", None)
    assert [(r.type, r.name, r.value) for r in records] == [
        ("CNAME", "shop.example.com", HOST),
        ("A", "shop.example.com", "23.88.47.208"),
    ]


def test_dns_rechecks_back_off_from_a_minute_to_an_hour() -> None:
    delays = [dns_recheck_delay(n, 60, 3600).total_seconds() for n in range(9)]
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]
    assert dns_recheck_delay(10_000, 60, 3600) == dt.timedelta(hours=1)


# ---------------------------------------------------------------- issuance timing


def test_failures_back_off_from_a_minute_doubling_to_six_hours() -> None:
    delays = [retry_delay(n, 60, 21600).total_seconds() for n in range(1, 12)]
    assert delays == [60, 120, 240, 480, 960, 1920, 3840, 7680, 15360, 21600, 21600]


def test_the_cas_retry_after_wins_over_a_shorter_back_off() -> None:
    assert next_attempt_after_failure(T0, 1, None, 60, 21600) == T0 + dt.timedelta(minutes=1)
    later = T0 + dt.timedelta(hours=3)
    assert next_attempt_after_failure(T0, 1, later, 60, 21600) == later
    assert next_attempt_after_failure(T0, 10, T0, 60, 21600) == T0 + dt.timedelta(hours=6)


def test_renewal_comes_when_a_third_of_the_lifetime_is_left_with_jitter() -> None:
    not_before, not_after = T0, T0 + dt.timedelta(days=90)
    at = renewal_time(T0, not_before, not_after, left=1 / 3, jitter=0.05, draw=0.0)
    assert at == T0 + dt.timedelta(days=60)
    earliest = renewal_time(T0, not_before, not_after, left=1 / 3, jitter=0.05, draw=0.999999)
    assert T0 + dt.timedelta(days=55, hours=12) < earliest < at
    # Shorter lifetimes renew proportionally earlier (not a fixed 30 days before expiry).
    six_days = renewal_time(T0, T0, T0 + dt.timedelta(days=6), left=1 / 3, jitter=0.0, draw=0.5)
    assert six_days == T0 + dt.timedelta(days=4)
    # Measured from when the worker got it: a worker clock ahead of the CA's does not make it due at once.
    ahead = T0 + dt.timedelta(days=61)
    assert renewal_time(ahead, not_before, not_after, left=1 / 3, jitter=0.0, draw=0) > ahead


# ---------------------------------------------------------------- nginx


def _blocks(**overrides: Any) -> ServerBlocks:
    base: dict[str, Any] = {
        "service_id": "svc-1",
        "https_names": (HOST, "shop.example.com"),
        "http_names": ("new.example.com",),
        "serial": "abc123",
        "certificate": "/etc/nginx/palisade-tls/abc123/fullchain.pem",
        "certificate_key": "/etc/nginx/palisade-tls/abc123/privkey.pem",
        "acme_webroot": "/var/www/palisade-acme",
        "upstream": "http://127.0.0.1:8080",
        "snippet": "/etc/nginx/snippets/palisade-ratelimit.conf",
    }
    base.update(overrides)
    return ServerBlocks(**base)


def test_the_server_blocks_name_every_domain_in_the_right_block() -> None:
    text = render_server_blocks(_blocks())
    assert f"server_name {HOST} shop.example.com;" in text
    assert "server_name new.example.com;" in text
    assert text.count("location ^~ /.well-known/acme-challenge/") == 2
    assert "return 301 https://$host$request_uri;" in text
    assert "listen 443 ssl http2;" in text
    assert "listen [::]:443 ssl http2;" in text
    assert "include /etc/nginx/snippets/palisade-ratelimit.con[f];" in text
    assert text.count("proxy_pass http://127.0.0.1:8080;") == 2
    only_http = render_server_blocks(_blocks(https_names=(), certificate=None, certificate_key=None, serial=None))
    assert "443" not in only_http
    assert "return 301" not in only_http


def test_the_renderer_refuses_anything_that_could_break_out_of_a_directive() -> None:
    for bad in ("a.com; return 200", "a.com\n}", "*.a.com", "a.com{"):
        with pytest.raises(ValueError, match="not a hostname"):
            render_server_blocks(_blocks(http_names=(bad,)))
    with pytest.raises(ValueError, match="unsafe path"):
        render_server_blocks(_blocks(acme_webroot="/var/www/x; root /"))
    with pytest.raises(ValueError, match="unsafe upstream"):
        render_server_blocks(_blocks(upstream="http://a;b"))


def test_include_if_present_is_a_glob_matching_only_that_file() -> None:
    assert include_if_present("/etc/nginx/snippets/ratelimit.conf") == "/etc/nginx/snippets/ratelimit.con[f]"
    # ... exactly the rate-limit worker's include contract.
    assert include_if_present(ratelimit.NGINX_SERVER_SNIPPET) == ratelimit.NGINX_SERVER_SNIPPET_INCLUDE
    assert TlsSettings().ratelimit_snippet == ratelimit.NGINX_SERVER_SNIPPET


def _self_signed(directory: Path, names: list[str]) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(T0 - dt.timedelta(days=1))
        .not_valid_after(T0 + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    chain, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return chain, key_path


def test_nginx_accepts_the_rendered_blocks_with_and_without_the_snippet(tmp_path: Path) -> None:
    chain, key = _self_signed(tmp_path, [HOST, "shop.example.com"])
    snippet = tmp_path / "ratelimit.conf"
    site = tmp_path / "site.conf"
    site.write_text(
        render_server_blocks(
            _blocks(certificate=str(chain), certificate_key=str(key), acme_webroot=str(tmp_path), snippet=str(snippet))
        )
    )
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"pid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{\n include {site};\n}}\n")

    def nginx_t() -> subprocess.CompletedProcess[str]:
        argv = ["nginx", "-t", "-q", "-p", f"{tmp_path}/", "-e", f"{tmp_path}/error.log", "-c", str(conf)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    result = nginx_t()
    assert result.returncode == 0, result.stderr
    snippet.write_text("limit_req_status 429;\n")  # present: included
    assert nginx_t().returncode == 0
    snippet.write_text("this is not nginx;\n")
    assert nginx_t().returncode != 0  # proof that it is read when present


# ---------------------------------------------------------------- secrets


def test_keys_at_rest_are_bound_to_their_owner_and_rotate() -> None:
    old = parse_key(generate_key("old"))
    ring = Keyring(old, label=b"palisade-tls")
    key_id, blob = ring.encrypt(b"-----BEGIN PRIVATE KEY-----", b"svc-1/abc")
    assert b"PRIVATE KEY" not in blob
    with pytest.raises(DecryptionError):
        ring.decrypt(key_id, blob, b"svc-2/abc")
    rotated = Keyring(parse_key(generate_key("new")), [old], label=b"palisade-tls")
    assert rotated.decrypt(key_id, blob, b"svc-1/abc") == b"-----BEGIN PRIVATE KEY-----"
    assert rotated.encrypt(b"x", b"a")[0] == "new"
    with pytest.raises(UnknownKeyError):
        Keyring(parse_key(generate_key("new")), label=b"palisade-tls").decrypt(key_id, blob, b"svc-1/abc")
    # Another worker's label derives another key from the same configured key.
    with pytest.raises(DecryptionError):
        Keyring(old, label=b"palisade-mfa").decrypt(key_id, blob, b"svc-1/abc")


# ---------------------------------------------------------------- the ACME client


def test_bad_nonces_are_retried_more_than_once(monkeypatch: pytest.MonkeyPatch) -> None:
    net = acme_client._Network(key=None)
    calls: list[int] = []

    def post_once(*args: Any, **kwargs: Any) -> str:
        calls.append(1)
        if len(calls) < 4:
            raise messages.Error.with_code("badNonce", detail="JWS has an invalid anti-replay nonce")
        return "ok"

    monkeypatch.setattr(net, "_post_once", post_once)
    response: Any = net.post("https://ca/x", None)
    assert response == "ok"
    assert len(calls) == 4

    def always_unauthorized(*args: Any, **kwargs: Any) -> str:
        raise messages.Error.with_code("unauthorized")

    monkeypatch.setattr(net, "_post_once", always_unauthorized)
    with pytest.raises(messages.Error):
        net.post("https://ca/x", None)


def test_retry_after_is_read_as_seconds_or_a_date() -> None:
    assert acme_client._parse_retry_after("120", T0) == T0 + dt.timedelta(seconds=120)
    assert acme_client._parse_retry_after("Wed, 25 Nov 2026 12:00:00 GMT", T0) == dt.datetime(
        2026, 11, 25, 12, 0, tzinfo=dt.UTC
    )
    assert acme_client._parse_retry_after("soon", T0) is None
    assert acme_client._parse_retry_after(None, T0) is None


# ---------------------------------------------------------------- the CLI's pure parts


def test_cloudflare_lists_become_the_dated_data_file() -> None:
    text = "173.245.48.0/20\n103.21.244.0/22\n# comment\n\n2400:cb00::/32\n"
    ranges = ranges_from_text(text, as_of=dt.date(2026, 11, 25), source="test")
    assert [str(n) for n in ranges.ipv4] == ["173.245.48.0/20", "103.21.244.0/22"]
    data = json.loads(ranges_json(ranges, "note"))
    assert (data["as_of"], data["ipv6"]) == ("2026-11-25", ["2400:cb00::/32"])
    for bad in ("10.0.0.0/8\n2400:cb00::/32\n", "173.245.48.1/20\n2400:cb00::/32\n", "173.245.48.0/20\n"):
        with pytest.raises(ValueError):
            ranges_from_text(bad, as_of=dt.date(2026, 11, 25), source="test")


def test_list_describes_each_domain_on_one_line() -> None:
    from palisade_events.contract import tls as contract

    listing = contract.DomainList(
        service_id="svc-1",
        hostname=HOST,
        port_80_open=True,
        domains=[
            contract.DomainInfo(domain=HOST, display=HOST, kind="hostname", state="active", expected_records=[]),
            contract.DomainInfo(
                domain="xn--bcher-kva.example",
                display="bücher.example",
                kind="custom",
                state="pending_dns",
                expected_records=[contract.DnsRecord(type="CNAME", name="xn--bcher-kva.example", value=HOST)],
                next_dns_check_at=T0,
            ),
        ],
    )
    lines = describe(listing)
    assert lines[1] == "no certificate yet"
    assert lines[3].startswith("  bücher.example (xn--bcher-kva.example)  pending_dns  next DNS check 09:00:00Z")
    assert lines[4] == f"    needs: CNAME {HOST}"


def test_the_acme_directory_comes_from_palisade_acme_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_DIRECTORY", "https://not-ours.example/dir")
    assert TlsSettings().acme_directory == "https://acme-v02.api.letsencrypt.org/directory"
    monkeypatch.setenv("PALISADE_ACME_DIRECTORY", "https://127.0.0.1:14000/dir")
    assert TlsSettings().acme_directory == "https://127.0.0.1:14000/dir"
