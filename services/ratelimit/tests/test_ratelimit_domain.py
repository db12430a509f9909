"""The web policy's rules and rendering, pure: golden files, the burst arithmetic, and
nginx itself (`nginx -t`, no VM) accepting what is rendered."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from palisade_events.cloudflare import cloudflare_ranges, parse_cloudflare_ranges
from palisade_events.contract import ratelimit as rl
from palisade_hostctl import REAL_VM, Layout
from palisade_ratelimit.domain import (
    DEFAULT_POLICY,
    OutputCache,
    RateLimit,
    Site,
    WebPolicy,
    render,
    site_for,
)

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("PALISADE_UPDATE_GOLDEN") == "1"  # regenerate after a deliberate change, then review the diff

CASES = {
    "default": (DEFAULT_POLICY, False),
    "500-per-minute-ttl-60-ipv6": (WebPolicy(RateLimit(500, "minute"), OutputCache(60)), True),
    "10-per-second-cache-off": (WebPolicy(RateLimit(10, "second"), OutputCache(3, enabled=False)), False),
    "all-off": (WebPolicy(RateLimit(150, "minute", enabled=False), OutputCache(0)), False),
}


# The golden files do not follow refreshes of the shipped ranges: they use these.
RANGES = parse_cloudflare_ranges(
    '{"as_of": "2026-01-31", "ipv4": ["173.245.48.0/20", "104.16.0.0/13"], "ipv6": ["2606:4700::/32"]}'
)


def _site(ipv6: bool, layout: Layout = REAL_VM) -> Site:
    return site_for("svc-redis-bgrkj", layout, upstream="127.0.0.1:8080", ipv6=ipv6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendering_matches_the_golden_files(name: str) -> None:
    policy, ipv6 = CASES[name]
    config = render(policy, _site(ipv6), RANGES)
    for suffix, text in (("http.conf", config.http_conf), ("snippet.conf", config.server_snippet)):
        golden = GOLDEN / f"{name}.{suffix}"
        if UPDATE:
            golden.write_text(text)
        assert text == golden.read_text(), f"{golden.name} differs (PALISADE_UPDATE_GOLDEN=1 rewrites it)"
    assert render(policy, _site(ipv6), RANGES) == config  # pure: same inputs, same bytes


def test_the_default_policy_is_150_per_minute_and_a_3_second_cache() -> None:
    config = render(DEFAULT_POLICY, _site(False), cloudflare_ranges())
    http, snippet = config.http_conf, config.server_snippet
    assert "limit_req_zone $palisade_rl_key zone=svc-redis-bgrkj:10m rate=150r/m;" in http
    assert '"429:" 1;' in http  # Retry-After: the next request passes within 0.4 s
    assert "limit_req zone=svc-redis-bgrkj burst=149 nodelay;" in snippet
    assert "limit_req_status 429;" in snippet
    assert "proxy_cache_valid 200 301 302 404 3s;" in snippet
    assert "proxy_cache_methods GET HEAD;" in snippet
    assert "proxy_cache_lock on;" in snippet
    assert "proxy_cache_use_stale updating;" in snippet
    assert "add_header X-Cache-Status $upstream_cache_status always;" in snippet
    # The default server carries exactly the snippet's directives.
    for line in snippet.splitlines()[4:]:
        assert (f"    {line}" if line else "") in http.splitlines()
    assert f"proxy_cache_path {REAL_VM.path('/var/cache/nginx/palisade-ratelimit')} " in http
    # Cloudflare's ranges, and only they, may name the client.
    ranges = cloudflare_ranges()
    trusted = [line.split()[1].rstrip(";") for line in http.splitlines() if line.startswith("set_real_ip_from")]
    assert trusted == [str(n) for n in ranges.networks]
    assert "real_ip_header CF-Connecting-IP;" in http
    assert ranges.as_of.isoformat() in http


@pytest.mark.parametrize(
    ("requests", "per", "burst", "refill", "retry_after", "rate"),
    [
        (150, "minute", 149, 0.4, 1, "150r/m"),
        (500, "minute", 499, 0.12, 1, "500r/m"),
        (10, "second", 9, 0.1, 1, "10r/s"),
        (1, "second", 0, 1.0, 1, "1r/s"),
        (7, "minute", 6, 60 / 7, 9, "7r/m"),
        (1, "minute", 0, 60.0, 60, "1r/m"),
        (100_000, "second", 99_999, 0.00001, 1, "100000r/s"),
    ],
)
def test_burst_is_one_period_allowance_minus_the_first_request(
    requests: int, per: str, burst: int, refill: float, retry_after: int, rate: str
) -> None:
    limit = RateLimit(requests, per)  # type: ignore[arg-type]
    assert (limit.burst, limit.retry_after_seconds, limit.nginx_rate) == (burst, retry_after, rate)
    assert limit.refill_seconds == pytest.approx(refill)


def test_out_of_range_settings_and_unsafe_names_are_refused() -> None:
    for bad in (0, 100_001):
        with pytest.raises(ValueError, match="requests"):
            RateLimit(bad)
    with pytest.raises(ValueError, match="per"):
        RateLimit(10, "hour")  # type: ignore[arg-type]
    for ttl in (-1, 3601):
        with pytest.raises(ValueError, match="ttl"):
            OutputCache(ttl)
    # Nothing but a plain name, a host:port and plain paths ever reaches a directive.
    for service_id in ("a;b", "a b", "a}", "a\nlimit_req off", "-x", "x" * 65):
        with pytest.raises(ValueError, match="zone name"):
            site_for(service_id, REAL_VM, upstream="127.0.0.1:8080", ipv6=False)
    for upstream in ("127.0.0.1", "127.0.0.1:80; return 200", "unix:/x", "h:80 backup"):
        with pytest.raises(ValueError, match="upstream"):
            site_for("svc", REAL_VM, upstream=upstream, ipv6=False)
    with pytest.raises(ValueError, match="path"):
        site_for("svc", Layout("/tmp/a b"), upstream="127.0.0.1:8080", ipv6=False)


def test_cache_off_when_disabled_or_ttl_zero_and_limit_off_when_disabled() -> None:
    off = render(CASES["all-off"][0], _site(False), cloudflare_ranges())
    assert "limit_req " not in off.server_snippet
    assert "proxy_cache off;" in off.server_snippet
    # The names every snippet may use stay declared, so any snippet stays valid against this file.
    assert "limit_req_zone $palisade_rl_key zone=svc-redis-bgrkj:10m rate=150r/m;" in off.http_conf
    assert "keys_zone=svc-redis-bgrkj-cache:10m" in off.http_conf


# ---------------------------------------------------------------- nginx itself


def _nginx_t(prefix: Path, http_includes: str) -> subprocess.CompletedProcess[str]:
    (prefix / "logs").mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"pid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log;\nevents {{}}\n"
        f"http {{\n    access_log off;\n    proxy_temp_path {prefix}/proxy;\n{http_includes}\n}}\n"
    )
    return subprocess.run(
        ["nginx", "-t", "-p", f"{prefix}/", "-e", f"{prefix}/logs/error.log", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _tls_like_server(layout: Layout, *, in_location: bool = False) -> str:
    """A server block as the TLS worker is asked to write it (README, "For the TLS worker"):
    the snippet included at server level, or in the location that proxies to the application."""
    include = f"include {layout.path(rl.NGINX_SERVER_SNIPPET_INCLUDE)};"
    return f"""
    server {{
        listen 127.0.0.1:8443;
        server_name shop.example.com;
        {"" if in_location else include}
        location ^~ {rl.ACME_CHALLENGE_PREFIX} {{
            root {layout.path("/var/www/acme")};
        }}
        location / {{
            {include if in_location else ""}
            proxy_pass http://127.0.0.1:8080;
        }}
    }}"""


def _write(layout: Layout, path: str, text: str) -> None:
    target = Path(layout.path(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


@pytest.mark.parametrize("in_location", [False, True], ids=["server-level", "in-location"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_nginx_accepts_the_rendered_files_and_a_tls_server_block_including_the_snippet(
    name: str, in_location: bool, tmp_path: Path
) -> None:
    layout = Layout(str(tmp_path))
    policy, _ = CASES[name]
    config = render(policy, _site(False, layout), cloudflare_ranges())
    (tmp_path / "var/cache/nginx").mkdir(parents=True)
    _write(layout, rl.NGINX_HTTP_CONF, config.http_conf)
    _write(layout, rl.NGINX_SERVER_SNIPPET, config.server_snippet)
    server = _tls_like_server(layout, in_location=in_location)
    result = _nginx_t(tmp_path, f"    include {layout.path(rl.NGINX_HTTP_CONF)};{server}")
    assert result.returncode == 0, result.stderr
    assert "[warn]" not in result.stderr, result.stderr


def test_the_include_pattern_is_accepted_before_the_snippet_exists_and_old_snippets_stay_valid(
    tmp_path: Path,
) -> None:
    layout = Layout(str(tmp_path))
    (tmp_path / "var/cache/nginx").mkdir(parents=True)
    # Before the first apply: the TLS worker's block includes a snippet that is not there yet.
    result = _nginx_t(tmp_path, _tls_like_server(layout))
    assert result.returncode == 0, result.stderr
    # A snippet of one policy against the http-level file of another (between the two steps of an apply).
    old = render(DEFAULT_POLICY, _site(False, layout), cloudflare_ranges())
    new = render(CASES["all-off"][0], _site(False, layout), cloudflare_ranges())
    _write(layout, rl.NGINX_HTTP_CONF, new.http_conf)
    _write(layout, rl.NGINX_SERVER_SNIPPET, old.server_snippet)
    result = _nginx_t(tmp_path, f"    include {layout.path(rl.NGINX_HTTP_CONF)};{_tls_like_server(layout)}")
    assert result.returncode == 0, result.stderr
